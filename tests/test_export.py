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
        # the LM head runs as one GEMM per vocabulary chunk, on slices of the embedding matrix
        producers = {out: node for node in model.graph.node for out in node.output}
        heads = [
            n
            for n in model.graph.node
            if n.op_type == "Gemm"
            and n.input[1] in producers
            and producers[n.input[1]].op_type == "Slice"
            and producers[n.input[1]].input[0] == "model.embed_tokens.weight"
        ]
        assert len(heads) == 3
    slots = {entry["kind"]: entry["slots"] for entry in manifest["kv_layout"]}
    assert slots == {"sliding_attention": PRESETS["tiny"]["text"]["sliding_window"] - 1, "full_attention": 128}


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
