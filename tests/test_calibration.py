"""FP8 calibration on the trained sort model: Q/DQ graphs that ONNX Runtime runs, the accuracy cost measured with
canvasrt eval, FP8 engines refused for a GPU without FP8 tensor cores (tests/test_engine_build.py builds and checks
them), and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from support import cli


def test_calibrated_graphs_hold_fp8_gemms_and_the_calibration(sort_fp8):
    manifest = json.loads((sort_fp8 / "manifest.json").read_text())
    calibration = json.loads((sort_fp8 / "calibration.json").read_text())
    assert (
        manifest["quantization"]["format"] == "fp8"
        and manifest["quantization"]["prompts"] == "task sort calibration split"
    )
    backbone = manifest["graphs"]["backbone"]
    assert any(name.endswith("experts.down_proj") for name in backbone["quantized"])
    assert not any("embed_tokens" in name or "router" in name for name in backbone["quantized"])
    model = onnx.load(str(sort_fp8 / "backbone.onnx"))
    fp8 = [
        t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.name.endswith(".fp8")
    ]
    assert len(fp8) == len(backbone["quantized"])
    # One dequantized weight each, read by one GEMM or (the dense experts' runs of tokens) several, each of which
    # quantizes its own input.
    readers = [n for n in model.graph.node if any(i.endswith(".dequantized") for i in n.input)]
    assert {n.op_type for n in readers} <= {"Gemm", "MatMul"}
    assert {i.removesuffix(".dequantized") for n in readers for i in n.input if i.endswith(".dequantized")} == set(
        backbone["quantized"]
    )
    assert sum(
        n.op_type == "DequantizeLinear" and n.output[0].endswith(".dequantized") for n in model.graph.node
    ) == len(backbone["quantized"])
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == len(readers)
    for entry in calibration["tensors"].values():  # scales rounded so that amax / scale stays within E4M3's 448
        assert (np.asarray(entry["amax"]) / np.asarray(entry["scale"]) <= 448).all()


def test_fp8_accuracy_cost_on_the_trained_model(sort_artifacts, sort_fp8):
    results = {}
    for name, target in (("fp32", sort_artifacts), ("fp8", sort_fp8)):
        result = cli("eval", target, "--task", "sort", "--samples", "100", "--json")
        assert result.exit_code == 0, result.output
        results[name] = json.loads(result.output)[0]
    assert results["fp8"]["exact_match"] >= results["fp32"]["exact_match"] - 0.01
    assert abs(results["fp8"]["tokens_per_forward"] / results["fp32"]["tokens_per_forward"] - 1) <= 0.05


def test_fp8_step_parity_within_the_fp8_budget(sort_checkpoint, sort_fp8, tmp_path):
    result = cli("parity", sort_checkpoint, sort_fp8, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["dtype"] == "fp8"


def test_fp8_simulation_is_checked_by_the_same_parity(sort_checkpoint, sort_fp8, tmp_path):
    """--backend torch on FP8 artifacts: the torch backend with their scales, through the same step parity as the
    graphs, judged by the same FP8 budget; its entropies agree with the graphs' where both are compared."""
    reports = {}
    for backend in ("torch", "onnxruntime"):
        result = cli(
            "parity", sort_checkpoint, sort_fp8, "--backend", backend, "--report", tmp_path / f"{backend}.json"
        )
        assert result.exit_code == 0, result.output
        reports[backend] = json.loads((tmp_path / f"{backend}.json").read_text())
    assert reports["torch"]["backend"] == "torch" and reports["torch"]["dtype"] == "fp8"
    checks = {b: {(c["stage"], c["output"]): c for c in r["checks"]} for b, r in reports.items()}
    shared = checks["torch"].keys() & checks["onnxruntime"].keys()
    assert {out for _, out in shared} >= {"key", "value", "argmax", "entropy", "next_self_cond", "next_canvas"}
    for key in shared:
        if key[1] == "entropy":
            simulated, graphs = (
                checks["torch"][key]["metrics"]["max_abs"],
                checks["onnxruntime"][key]["metrics"]["max_abs"],
            )
            assert abs(simulated - graphs) < 0.05


def test_fp8_engines_are_refused_for_sm80(sort_fp8, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    refused = cli("build", sort_fp8, "-o", tmp_path / "sm80", "--target", "sm80")
    assert refused.exit_code == 2 and "sm80 has no FP8 tensor cores" in refused.output
    assert not (tmp_path / "sm80").exists()


def test_calibrate_bad_input(sort_checkpoint, sort_artifacts, sort_fp8, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = cli("calibrate", sort_checkpoint, sort_artifacts, "-o", tmp_path / "x", "--prompts", empty)
    assert result.exit_code == 2 and "holds no prompts" in result.output
    result = cli("calibrate", sort_checkpoint, sort_fp8, "-o", tmp_path / "y", "--task", "sort")
    assert result.exit_code == 2 and "already quantized" in result.output
    # a malformed pattern is refused first, before the checks of the checkpoint and the samples, and the long run
    result = cli("calibrate", sort_checkpoint, sort_artifacts, "-o", tmp_path / "z", "--samples", "0", "--exclude", "(")
    assert result.exit_code == 2 and "--exclude pattern '(' is not a regular expression" in result.output
    assert not any((tmp_path / name).exists() for name in "xyz")


def test_torch_fake_quantization_agrees_with_the_fp8_graphs(sort_checkpoint, sort_fp8):
    """The torch backend simulating the calibration's scales matches ONNX Runtime's FP8 graphs to float rounding,
    while plain fp32 is far off: the Q/DQ nodes sit where intended, with the intended scales."""
    import torch

    from canvasrt.model.checkpoint import Checkpoint
    from canvasrt.runtime.backends import open_backend
    from canvasrt.runtime.backends.torch import TorchExecutor
    from canvasrt.runtime.step import Draws, StepBackend, StepInputs

    rng = np.random.default_rng(0)
    ids, padding = rng.integers(7, 19, (2, 9)), np.ones((2, 9), bool)
    canvas = rng.integers(0, 32, (2, 16))
    logits = []
    for backend in (open_backend(sort_fp8, "torch"), StepBackend(TorchExecutor(sort_checkpoint, max_context=64))):
        with backend:
            backend.start(padding)
            backend.encode(ids, np.arange(9), np.zeros(2, np.int64))
            with torch.inference_mode():
                logits.append(
                    backend.executor.model.denoise_logits(
                        torch.from_numpy(canvas),
                        torch.zeros(2, 16, 64),
                        backend.state.keys,
                        backend.state.values,
                        torch.full((2,), 9),
                        backend.state.mask,
                    )
                )
    simulated, fp32 = logits
    assert (fp32 - simulated).abs().max() > 0.05  # the simulation really quantizes

    with open_backend(sort_fp8, "onnxruntime") as graphs:
        graphs.start(padding)
        graphs.encode(ids, np.arange(9), np.zeros(2, np.int64))
        draws = Draws(renoise_ids=np.zeros((2, 16), np.int64), uniforms=np.full((2, 16), 0.5, np.float32))
        step = graphs.denoise(StepInputs.uniform(canvas, np.full(2, 9), 0.8, 0.1, draws, True))
        soft = graphs.self_conditioning()
    embedding = Checkpoint.open(sort_checkpoint).tensor("model.decoder.embed_tokens.weight")
    expected_soft = torch.softmax(simulated / 0.8, -1) @ embedding * 8.0  # sqrt(hidden 64)
    assert np.array_equal(step.argmax, simulated.argmax(-1).numpy())
    assert np.abs(soft - expected_soft.numpy()).max() < 1e-4


def test_fp8_loop_parity_against_the_fake_quantized_torch_backend(sort_checkpoint, sort_fp8, tmp_path):
    result = cli("parity", sort_checkpoint, sort_fp8, "--level", "loop", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["info"]["torch_backend"].startswith("fake-quantized")
    blocks = [c for c in report["checks"] if c["output"] == "committed_tokens"]
    assert blocks and all(c["metrics"]["agreement"] == 1.0 for c in blocks)


def test_bisect_ranks_every_quantized_group(sort_checkpoint, sort_fp8, sort_artifacts, tmp_path):
    result = cli("parity", sort_checkpoint, sort_fp8, "--bisect", "--report", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    ranking = json.loads((tmp_path / "b.json").read_text())["bisect"]
    groups = [r["group"] for r in ranking]
    assert groups[-1] == "all" and set(groups[:-1]) == {
        "layers.0",
        "layers.1",
        "layers.2",
        "layers.3",
        "self_conditioning",
    }
    costs = [r["nrmse"] for r in ranking[:-1]]
    assert costs == sorted(costs, reverse=True) and all(c > 0 for c in costs)
    assert ranking[-1]["nrmse"] >= max(costs)  # all groups together cost at least the worst one
    refused = cli("parity", sort_checkpoint, sort_artifacts, "--bisect")
    assert refused.exit_code == 2 and "is not quantized" in refused.output


def test_percentile_and_mse_ranges_clip_within_the_max_and_exclude_keeps_gemms_unquantized(
    sort_checkpoint, sort_artifacts, sort_fp8, tmp_path
):
    maxed = json.loads((sort_fp8 / "calibration.json").read_text())["tensors"]
    for method in ("percentile", "mse"):
        out = tmp_path / method
        result = cli(
            "calibrate",
            sort_checkpoint,
            sort_artifacts,
            "-o",
            out,
            "--task",
            "sort",
            "--samples",
            "32",
            "--method",
            method,
            "--exclude",
            r"layers\.1\.",
        )
        assert result.exit_code == 0, result.output
        calibration = json.loads((out / "calibration.json").read_text())
        assert calibration["method"] == method and calibration["excluded"]
        assert all(n.startswith("layers.1.") for n in calibration["excluded"])
        clipped = 0
        for name, entry in calibration["tensors"].items():
            ours, top = np.asarray(entry["amax"]), np.asarray(maxed[name]["amax"])
            assert (ours <= top + 1e-6).all()
            clipped += int((ours < top - 1e-6).sum())
        assert clipped > 0  # the method really chose tighter ranges somewhere
        backbone = json.loads((out / "manifest.json").read_text())["graphs"]["backbone"]
        assert not any(n.startswith("layers.1.") for n in backbone["quantized"])
        evaluation = cli("eval", out, "--task", "sort", "--samples", "50", "--json")
        assert json.loads(evaluation.output)[0]["exact_match"] >= 0.95


def test_qdq_graphs_stream_their_weights_in_bounded_blocks(tiny_fp16_artifacts, tmp_path, monkeypatch):
    """quantize_graph on a graph with external weights: blocks of 4 KiB give the same FP8 bytes as one block per
    tensor and as quantizing each weight whole, the weights land page-aligned in the new .data file, and what Python
    holds at once stays far below the graph's weights (never all of them loaded)."""
    import tracemalloc

    import ml_dtypes
    from onnx import numpy_helper

    from canvasrt.calibration import qdq
    from canvasrt.exporter.export import DATA_ALIGNMENT
    from canvasrt.model.fp8 import QUANTIZED, scale_for

    source = tiny_fp16_artifacts / "backbone.onnx"
    whole = onnx.load(str(source))
    initializers = {t.name: t for t in whole.graph.initializer}
    gemm_weights = {n.input[1] for n in whole.graph.node if n.op_type == "Gemm"}
    gemm_weights |= {n.input[0] for n in whole.graph.node if n.op_type == "MatMul" and n.input[0] in initializers}
    amax = {
        w.removeprefix("model."): np.float32(3.0)
        for w in gemm_weights
        if w in initializers and QUANTIZED.search(w.removeprefix("model."))
    }
    assert any(name.endswith("experts.gate_up_proj") for name in amax)
    weight_bytes = (tiny_fp16_artifacts / "backbone.onnx.data").stat().st_size

    def fp8_of(path):
        model = onnx.load(str(path))
        return {
            t.name: numpy_helper.to_array(t).view(np.uint8) for t in model.graph.initializer if t.name.endswith(".fp8")
        }

    done = qdq.quantize_graph(source, tmp_path / "one.onnx", amax, "per-channel")
    monkeypatch.setattr(qdq, "BLOCK_BYTES", 4096)
    tracemalloc.start()
    qdq.quantize_graph(source, tmp_path / "blocks.onnx", amax, "per-channel")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the graph proto (0.9 MB here) is read and serialised whole; the weights (3.2 MB) must not be
    assert peak < source.stat().st_size + weight_bytes / 4, (peak, source.stat().st_size, weight_bytes)
    assert sorted(done) == sorted(amax)
    one, blocks = fp8_of(tmp_path / "one.onnx"), fp8_of(tmp_path / "blocks.onnx")
    assert one.keys() == blocks.keys() == {f"{name}.fp8" for name in amax}
    for name in amax:
        values = numpy_helper.to_array(initializers["model." + name]).astype(np.float32)
        scale = scale_for(np.abs(values).reshape(values.shape[0], -1).max(axis=1))
        expected = np.clip(values / scale.reshape(-1, *[1] * (values.ndim - 1)), -448, 448)
        assert np.array_equal(one[f"{name}.fp8"], expected.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)), name
        assert np.array_equal(blocks[f"{name}.fp8"], one[f"{name}.fp8"]), name
    written = onnx.load(str(tmp_path / "blocks.onnx"), load_external_data=False)
    external = [t for t in written.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(
        {e.key: e.value for e in t.external_data}["location"] == "blocks.onnx.data"
        and int({e.key: e.value for e in t.external_data}["offset"]) % DATA_ALIGNMENT == 0
        for t in external
    )
    assert not any(t.name in initializers and t.name.removeprefix("model.") in amax for t in written.graph.initializer)
