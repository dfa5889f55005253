"""canvasrt export and step-level parity: graphs, manifest contract, parity on several configs and dtypes,
and one-line errors with nothing half-written."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from canvasrt.cli import main
from canvasrt.core.manifest import sha256_file
from canvasrt.model.checkpoint import Checkpoint
from canvasrt.model.random_checkpoint import PRESETS
from support import cli


def test_export_writes_checked_graphs_and_manifest(tiny_artifacts):
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert manifest["format_version"] == 5 and list(manifest["graphs"]) == ["backbone"] and manifest["dtype"] == "fp32"
    assert manifest["vocab_chunk"] == 100
    assert {"tokenizer.json"} <= set(manifest["tokenizer"]) and (tiny_artifacts / "tokenizer.json").is_file()
    assert (tiny_artifacts / "generation_config.json").is_file()
    vocab = manifest["model"]["vocab_size"]
    for graph in manifest["graphs"].values():
        path = tiny_artifacts / graph["file"]
        onnx.checker.check_model(str(path), full_check=True)
        assert sha256_file(path) == graph["sha256"]
        model = onnx.load(str(path), load_external_data=False)
        assert [i.name for i in model.graph.input] == [s["name"] for s in graph["inputs"]]
        assert [o.name for o in model.graph.output] == [s["name"] for s in graph["outputs"]]
        for output in model.graph.output:  # no [batch, canvas, vocab] tensor leaves the default graphs
            assert vocab not in [d.dim_value for d in output.type.tensor_type.shape.dim]
        # the LM head runs as one GEMM per vocabulary chunk, each on a chunk of the embedding matrix stored as an
        # initializer of its own; together they are the matrix, which is no initializer itself
        initializers = {t.name: list(t.dims) for t in model.graph.initializer}
        chunks = {"model.embed_tokens.weight.rows_0_100", "model.embed_tokens.weight.rows_100_200"}
        chunks.add(f"model.embed_tokens.weight.rows_200_{vocab}")
        assert {name for name in initializers if "embed_tokens" in name} == chunks
        assert sum(initializers[name][0] for name in chunks) == vocab
        heads = [n for n in model.graph.node if n.op_type == "Gemm" and n.input[1] in chunks]
        assert len(heads) == 3
        assert not any(n.op_type == "Slice" and n.input[0] in initializers for n in model.graph.node)
    slots = {entry["kind"]: entry["slots"] for entry in manifest["kv_layout"]}
    assert slots == {"sliding_attention": PRESETS["tiny"]["text"]["sliding_window"] - 1, "full_attention": 128}


def test_split_embedding_keeps_the_results_and_stores_the_matrix_once(tmp_path):
    """A graph that slices an external embedding into vocabulary chunks for its GEMMs and gathers token rows from it:
    after `split_embedding` the GEMMs read chunk initializers, each a range of the same external data (the data file
    untouched), the gathers read the chunks, and ONNX Runtime computes exactly the same outputs."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from canvasrt.exporter.embedding import split_embedding

    vocab, hidden = 10, 4
    table = np.random.default_rng(0).standard_normal((vocab, hidden)).astype(np.float32)
    (tmp_path / "g.onnx.data").write_bytes(b"\0" * 64 + table.tobytes())
    weight = onnx.TensorProto(name="E", data_type=TensorProto.FLOAT, dims=[vocab, hidden])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "g.onnx.data", "offset": "64", "length": str(table.nbytes)}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    bounds = [(0, 4), (4, 8), (8, 12)]  # the last slice's end beyond the vocabulary, as torch traces it
    consts = [numpy_helper.from_array(np.array([v], np.int64), f"c{v}") for v in {0, 4, 8, 12}]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["rows"], axis=0)]
    for i, (start, end) in enumerate(bounds):
        nodes += [
            helper.make_node("Slice", ["E", f"c{start}", f"c{end}", "c0"], [f"part{i}"]),
            helper.make_node("Gemm", ["x", f"part{i}"], [f"logits{i}"], transB=1),
            helper.make_node("MatMul", [f"logits{i}", f"part{i}"], [f"soft{i}"]),
        ]
    outputs = ["rows", *(f"{kind}{i}" for kind in ("logits", "soft") for i in range(3))]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, hidden]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3]),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [weight, *consts],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    feeds = {"x": np.ones((2, hidden), np.float32), "ids": np.array([[0, 3, 4], [9, 8, 5]], np.int64)}
    before = ort.InferenceSession(str(path)).run(outputs, feeds)
    data = (tmp_path / "g.onnx.data").read_bytes()

    assert split_embedding(path, "E") == 3
    model = onnx.load(str(path), load_external_data=False)
    offsets = {
        t.name: ({e.key: e.value for e in t.external_data}["offset"], list(t.dims))
        for t in model.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    }
    assert offsets == {
        "E.rows_0_4": ("64", [4, hidden]),
        "E.rows_4_8": (str(64 + 4 * hidden * 4), [4, hidden]),
        "E.rows_8_10": (str(64 + 8 * hidden * 4), [2, hidden]),
    }
    assert not any(node.op_type == "Slice" for node in model.graph.node)
    after = ort.InferenceSession(str(path)).run(outputs, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert np.array_equal(after[0], table[feeds["ids"]])
    assert (tmp_path / "g.onnx.data").read_bytes() == data


def test_logits_output_keeps_the_whole_vocabulary(tiny_debug_artifacts):
    """Graphs that output the logits compute the head over the whole vocabulary: the default chunk, larger than
    the tiny vocabulary, is recorded as the vocabulary size."""
    assert json.loads((tiny_debug_artifacts / "manifest.json").read_text())["vocab_chunk"] == 288


@pytest.mark.parametrize("chunk", ["0", "-3"])
def test_export_refuses_a_vocabulary_chunk_below_one(tiny_checkpoint, tmp_path, chunk):
    result = CliRunner().invoke(
        main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "art"), "--vocab-chunk", chunk]
    )
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --vocab-chunk must be at least 1 (got {chunk}); leave it out for 16384"
    assert not (tmp_path / "art").exists() and _no_leftovers(tmp_path)


def test_step_parity_fp32_reports_and_exits_zero(tiny_checkpoint, tiny_debug_artifacts, tmp_path):
    result = cli(
        "parity",
        tiny_checkpoint,
        tiny_debug_artifacts,
        "--level",
        "step",
        "--report",
        tmp_path / "r.json",
        "--junit",
        tmp_path / "r.xml",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["info"]["past_sliding_window"]
    stages = {c["stage"] for c in report["checks"]}
    assert stages == {"prefill", "step_first", "step_self_conditioned", "commit", "step_after_commit"}
    logits = [c for c in report["checks"] if c["output"] == "logits"]
    assert len(logits) == 3 and all(c["metrics"]["rel"] <= 1e-4 for c in logits)  # the tiny preset: even the max
    assert all(c["metrics"]["agreement"] == 1.0 for c in report["checks"] if c["output"] == "logits_argmax")
    suite = ET.parse(tmp_path / "r.xml").getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) == len(report["checks"])


def test_step_parity_on_variant_geometry_sharded_old_format(variant_checkpoint, variant_artifacts):
    result = cli("parity", variant_checkpoint, variant_artifacts)
    assert result.exit_code == 0, result.output


def test_streamed_external_data_is_listed_and_digested(tiny_fp16_artifacts):
    manifest = json.loads((tiny_fp16_artifacts / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        data = tiny_fp16_artifacts / graph["data_file"]
        assert data.stat().st_size > 100_000 and sha256_file(data) == graph["data_sha256"]
        model = onnx.load(str(tiny_fp16_artifacts / graph["file"]), load_external_data=False)
        external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert "model.embed_tokens.weight" in external and "model.layers.0.experts.gate_up_proj" in external


@pytest.mark.parametrize(
    "fixture",
    [
        "tiny_fp16_artifacts",
        pytest.param("tiny_sparse_artifacts", marks=pytest.mark.slow),
        pytest.param("tiny_grouped_artifacts", marks=pytest.mark.slow),
    ],
)
def test_step_parity_fp16_sparse_and_grouped(tiny_checkpoint, fixture, request, tmp_path):
    artifacts = request.getfixturevalue(fixture)
    result = cli("parity", tiny_checkpoint, artifacts, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output


def test_parity_fails_on_artifacts_with_other_weights(write_checkpoint, tmp_path, tiny_debug_artifacts):
    """Same config, other random weights: refused by the checkpoint digests the manifest records; and where the
    record is made to name the other checkpoint, parity's numbers notice and exit 1."""
    other = write_checkpoint(tmp_path / "other", PRESETS["tiny"]["text"], seed=7)
    refused = cli("parity", other, tiny_debug_artifacts)
    assert refused.exit_code == 2 and "is not the checkpoint" in refused.output
    artifacts = Path(shutil.copytree(tiny_debug_artifacts, tmp_path / "art"))
    manifest = json.loads((artifacts / "manifest.json").read_text())
    manifest["checkpoint"]["files"] = Checkpoint.open(other).file_digests()
    (artifacts / "manifest.json").write_text(json.dumps(manifest))
    result = cli("parity", other, artifacts)
    assert result.exit_code == 1
    assert "failed" in result.output


def test_parity_refuses_artifacts_of_another_config(variant_checkpoint, tiny_artifacts):
    result = CliRunner().invoke(main, ["parity", str(variant_checkpoint), str(tiny_artifacts)])
    assert result.exit_code == 2
    assert "exported from a checkpoint with another config" in result.output


def _no_leftovers(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", ["file", "foreign_dir", "bad_checkpoint", "under_file"])
def test_export_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    checkpoint = tiny_checkpoint
    if case == "file":
        out.write_text("not a directory")
    elif case == "foreign_dir":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    elif case == "bad_checkpoint":
        checkpoint = tmp_path / "empty"
        checkpoint.mkdir()
    else:
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "out"
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert _no_leftovers(tmp_path)
    if case == "foreign_dir":
        assert (out / "keep.txt").read_text() == "user data"


def test_export_fails_cleanly_on_missing_tensor(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    tensors = load_file(str(checkpoint / "model.safetensors"))
    del tensors["model.decoder.layers.0.experts.down_proj"]
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(tmp_path / "art")])
    assert result.exit_code == 2
    assert "missing tensor model.decoder.layers.0.experts.down_proj" in result.output
    assert not (tmp_path / "art").exists() and _no_leftovers(tmp_path)
