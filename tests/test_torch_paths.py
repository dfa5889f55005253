"""The torch paths at scale: the sparse MoE (routed tokens only) against the dense formulation, calibration ranges
from either, and the --device plumbing (CUDA requested where torch sees none is one line)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from canvasrt.calibration.ranges import collect_ranges
from canvasrt.cli import main
from canvasrt.core.errors import CanvasrtError
from canvasrt.runtime.backends.torch import TorchExecutor
from canvasrt.runtime.loop import generate, left_pad
from canvasrt.runtime.rng import make_draws
from canvasrt.runtime.settings import resolve_settings
from canvasrt.runtime.step import StepBackend


def _run(checkpoint, moe):
    rows = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
    ids, padding = left_pad(rows, 0)
    with StepBackend(TorchExecutor(checkpoint, moe=moe, max_context=128)) as backend:
        settings = resolve_settings(backend.spec.generation, {"max_new_tokens": 32, "max_denoising_steps": 6})
        result = generate(
            backend,
            ids,
            padding,
            settings,
            make_draws("counter", 2, 2, backend.spec.model.vocab_size, backend.spec.capacity.canvas),
        )
        backend.start(padding)
        backend.encode(ids, np.arange(ids.shape[1]), np.zeros(2, np.int64))
        canvas = torch.from_numpy(np.arange(32).reshape(2, 16) % backend.spec.model.vocab_size)
        with torch.inference_mode():
            logits = backend.executor.model.denoise_logits(
                canvas,
                torch.zeros(2, 16, backend.spec.model.hidden_size),
                backend.state.keys,
                backend.state.values,
                torch.full((2,), ids.shape[1]),
                backend.state.mask,
            )
    return result, logits


@pytest.mark.parametrize("moe", ["sparse", pytest.param("grouped", marks=pytest.mark.slow)])
def test_routed_torch_moe_equals_the_dense_one(tiny_checkpoint, moe):
    dense, dense_logits = _run(tiny_checkpoint, "dense")
    sparse, sparse_logits = _run(tiny_checkpoint, moe)
    assert (sparse_logits - dense_logits).abs().max() < 1e-4 * dense_logits.abs().max()
    assert np.array_equal(dense.sequences, sparse.sequences)
    assert dense.steps_per_block == sparse.steps_per_block


@pytest.mark.slow
def test_sparse_calibration_ranges_equal_the_dense_ones(sort_checkpoint):
    rows = [[7, 8, 9, 10, 11], [12, 13, 14]]
    dense = collect_ranges(sort_checkpoint, rows, moe="dense")
    sparse = collect_ranges(sort_checkpoint, rows, moe="sparse")
    assert dense.amax.keys() == sparse.amax.keys() and any(k.endswith("down_proj") for k in dense.amax)
    for name in dense.amax:
        np.testing.assert_allclose(np.asarray(sparse.amax[name]), np.asarray(dense.amax[name]), rtol=1e-5)
    assert dense.expert_tokens == sparse.expert_tokens and sum(map(sum, dense.expert_tokens.values())) > 0


@pytest.mark.slow
def test_grouped_calibration_observes_exactly_the_routed_tokens(sort_checkpoint):
    """The grouped hook sees padding slots too; only routed ones may count. Token counts must equal the dense
    formulation's exactly; ranges agree to float noise, which grows with depth as each layer's GEMM shapes differ
    (measured here: 3e-7 in layer 0; 1.2e-5 for layers.1's expert inputs, where sparse shows 1.0e-5)."""
    rows = [[7, 8, 9, 10, 11], [12, 13, 14]]
    dense = collect_ranges(sort_checkpoint, rows, moe="dense")
    grouped = collect_ranges(sort_checkpoint, rows, moe="grouped")
    assert dense.amax.keys() == grouped.amax.keys()
    assert dense.expert_tokens == grouped.expert_tokens and sum(map(sum, dense.expert_tokens.values())) > 0
    for name in dense.amax:
        rtol = 1e-6 if name.startswith("layers.0.") else 5e-5
        np.testing.assert_allclose(np.asarray(grouped.amax[name]), np.asarray(dense.amax[name]), rtol=rtol)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where torch sees no GPU")
@pytest.mark.parametrize(
    "command",
    [
        ["generate", "{ckpt}", "--prompt-ids", "5,6", "--device", "cuda"],
        ["eval", "{sort}", "--task", "sort", "--samples", "2", "--backend", "transformers", "--device", "cuda"],
        ["parity", "{ckpt}", "{art}", "--device", "cuda"],
        ["calibrate", "{ckpt}", "{art}", "-o", "{out}", "--device", "cuda"],
    ],
)
def test_cuda_where_torch_sees_no_gpu_is_one_line(command, tiny_checkpoint, tiny_artifacts, sort_checkpoint, tmp_path):
    args = [
        a.format(ckpt=tiny_checkpoint, art=tiny_artifacts, sort=sort_checkpoint, out=tmp_path / "fp8") for a in command
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--device cuda requested but torch sees no GPU" in lines[0]
    assert not (tmp_path / "fp8").exists()


def _beyond_memory(source, tmp_path):
    """`source` with a config.json whose vocabulary puts the weights (17.6 TB in fp32, 8.8 TB in bf16) beyond any
    machine's memory; the weight files are the original ones, so only a refusal from the sizes alone passes."""
    out = tmp_path / "beyond-memory"
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["vocab_size"] = 1 << 36
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "{ckpt}", "--prompt-ids", "5,6", "--dtype", "fp32"],  # the torch backend
        ["eval", "{ckpt}", "--task", "sort", "--samples", "2", "--backend", "transformers"],  # the parity reference
    ],
)
def test_weights_beyond_memory_are_refused_before_loading_with_the_figure(command, sort_checkpoint, tmp_path):
    checkpoint = _beyond_memory(sort_checkpoint, tmp_path)
    result = CliRunner().invoke(main, [a.format(ckpt=checkpoint) for a in command])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "needs 17592.2 GB for the weights" in lines[0] and "GB available" in lines[0], lines[0]
    assert "--dtype bf16 (8796.1 GB)" in lines[0] and "free memory" in lines[0]


def test_calibration_refuses_weights_beyond_memory_before_its_loop(sort_checkpoint, tmp_path):
    with pytest.raises(CanvasrtError, match=r"needs 8796\.1 GB for the weights .* in bf16 .* available"):
        collect_ranges(_beyond_memory(sort_checkpoint, tmp_path), [[7, 8, 9]], dtype="bf16")


def test_device_cpu_and_dtype_reach_the_torch_backend(tiny_checkpoint):
    result = CliRunner().invoke(
        main,
        [
            "generate",
            str(tiny_checkpoint),
            "--prompt-ids",
            "5,6,7",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--max-denoising-steps",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    with StepBackend(TorchExecutor(tiny_checkpoint, dtype="bf16", device="cpu")) as backend:
        assert next(backend.executor.model.parameters()).dtype == torch.bfloat16


def test_the_extrapolation_to_30_layers_says_when_its_fit_means_nothing():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    fit = gpu_check.extrapolate({2: 30.0, 4: 50.0}, 30, 256)  # 10 ms per layer, 10 ms fixed
    assert fit["meaningful"] and fit["step_ms_30_layers"] == pytest.approx(310.0)
    assert fit["tokens_per_s_48_steps"] == pytest.approx(256 / (48 * 0.310))
    faster_when_deeper = gpu_check.extrapolate({4: 29.0, 2: 30.0}, 30, 256)
    assert not faster_when_deeper["meaningful"] and "step_ms_30_layers" not in faster_when_deeper
    assert "not slower" in faster_when_deeper["why"]
    negative_fixed = gpu_check.extrapolate({2: 10.0, 4: 30.0}, 30, 256)  # 10 ms per layer, -10 ms fixed
    assert not negative_fixed["meaningful"] and "negative" in negative_fixed["why"]


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_on_cpu(tmp_path):
    """scripts/gpu_check.py is the one script a GPU machine runs; on a CPU with the tiny preset it runs the same code
    end to end in seconds: parity passes, the 30-layer extrapolation is printed, the in-flight rows share calls."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--layers",
            "2",
            "4",
            "--steps",
            "2",
            "--loop-steps",
            "4",
            "--max-context",
            "96",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["passed"] and [r["layers"] for r in figures["runs"]] == [2, 4]
    conformance = figures["conformance"]
    assert conformance["onnxruntime-cpu"]["passed"] > 0 and not conformance["onnxruntime-cpu"]["failed"]
    assert conformance["torch-cpu"]["passed"] > 0 and "no CUDA GPU" in conformance["torch-cuda"]["skipped"]
    executors = figures["executors"]
    assert executors["onnxruntime-cpu"]["step_parity"] and executors["onnxruntime-cpu"]["loop_parity"]
    assert "onnxruntime-cuda" in executors and "skipped" in executors["tensorrt"]
    for name in ("onnxruntime-cpu", "torch-cpu"):  # canvas-sized arrays only: the tiny canvas of 16, batch 1
        assert executors["bench"][name]["host_device_bytes"]["denoise"] == 49 * 16 + 22
    assert figures["served"]["passed"] and figures["served"]["executor"] == "onnxruntime"
    for moe in ("sparse", "dense"):  # CPU timings of the tiny preset may or may not give a meaningful fit
        fit = figures[f"extrapolated_{moe}"]
        assert fit["step_ms_30_layers"] > 0 if fit["meaningful"] else "noise" in fit["why"]
    for run in figures["runs"]:
        batched = run["inflight"]
        assert batched["step_calls"] * 4 <= batched["row_steps"] and batched["late_arrival"]["ratio"] > 0


def test_fake_quantization_refuses_per_expert_down_ranges_of_older_calibrations(tiny_checkpoint):
    """A calibration that ranges the experts' down-projection input per expert is refused: the graphs and the
    simulation apply one scale per tensor, the down-projection being one GEMM over all experts."""
    from canvasrt.core.errors import ArtifactError
    from canvasrt.model.checkpoint import Checkpoint
    from canvasrt.model.fp8 import apply_fake_quantization

    model = Checkpoint.open(tiny_checkpoint).load_text_model()
    tensors = {"layers.0.experts.gate_up_proj": {"scale": 0.01}, "layers.0.experts.down_proj": {"scale": [0.01] * 4}}
    with pytest.raises(ArtifactError, match="layers.0.experts.down_proj has an input range per expert"):
        apply_fake_quantization(model, {"weights": "per-channel", "tensors": tensors})
    tensors["layers.0.experts.down_proj"] = {"scale": 0.01}
    assert apply_fake_quantization(model, {"weights": "per-channel", "tensors": tensors}) == list(tensors)
