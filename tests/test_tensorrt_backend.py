"""The TensorRT backend's GPU-free parts: engine manifest checks, profile selection, buffer planning, and a clear
error where no TensorRT/GPU is present. (The engines themselves are built in test_engine_build.py.)"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from canvasrt.cli import main
from canvasrt.core.contract import PHASES, encoder_phase
from canvasrt.core.errors import CanvasrtError
from canvasrt.core.manifest import EngineManifest
from canvasrt.runtime.backends.tensorrt import check_engines_fit, plan_buffers


@pytest.fixture(scope="module")
def engines(tiny_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("eng") / "tiny"
    result = CliRunner().invoke(main, ["build", str(tiny_artifacts), "-o", str(out), "--target", "sm89"])
    assert result.exit_code == 0, result.output
    return out


def test_engines_from_another_builder_version_or_gpu_are_refused(engines):
    manifest = EngineManifest.load(engines)
    with pytest.raises(CanvasrtError, match="built with tensorrt-rtx"):
        check_engines_fit(manifest, "10.13.0", (9, 0))
    as_trt = replace(manifest, key=replace(manifest.key, builder="tensorrt", builder_version="10.13.0", target="sm90"))
    check_engines_fit(as_trt, "10.13.0", (9, 0))
    with pytest.raises(CanvasrtError, match="this is TensorRT 10.14.1; rebuild"):
        check_engines_fit(as_trt, "10.14.1", (9, 0))
    with pytest.raises(CanvasrtError, match="built for sm90, this GPU is sm89"):
        check_engines_fit(as_trt, "10.13.0", (8, 9))


def test_each_phase_has_its_profile_and_takes_its_calls(engines):
    """The backend binds one execution context to each phase's profile; every call a phase makes fits it."""
    manifest = EngineManifest.load(engines)
    profiles = manifest.backbone.profiles
    assert tuple(profiles) == PHASES
    canvas, prefill = manifest.capacity.canvas, manifest.capacity.max_prefill
    for chunk in (1, 5, canvas - 1, canvas + 1, prefill):
        assert encoder_phase(chunk, canvas) == "prefill"
        assert profiles["prefill"]["chunk"][0] <= chunk <= profiles["prefill"]["chunk"][2]
    assert encoder_phase(canvas, canvas) == "commit" and profiles["commit"]["chunk"] == [canvas] * 3
    assert profiles["prefill"]["rows"] == profiles["commit"]["rows"] == profiles["denoise"]["chunk"] == [0, 0, 0]
    assert profiles["denoise"]["rows"] == [canvas] * 3
    # Every phase reads from one canvas of context up to all of it; the tiny preset's rings (7 slots) are static.
    for phase in PHASES:
        assert profiles[phase]["context"] == [canvas, manifest.capacity.max_context, manifest.capacity.max_context]
        assert "window" not in profiles[phase]


def test_buffer_plan_matches_the_graphs_and_is_allocated_once(engines, tiny_artifacts):
    manifest = EngineManifest.load(engines)
    plan = plan_buffers(manifest, 2)
    backbone = json.loads((tiny_artifacts / "manifest.json").read_text())["graphs"]["backbone"]
    spans = backbone["profiles"]["denoise"]
    past = [
        (2, s["shape"][1], s["shape"][2] if isinstance(s["shape"][2], int) else spans[s["shape"][2]][2], s["shape"][3])
        for s in backbone["inputs"]
        if s["name"].startswith("past_key_")
    ]
    assert plan.kv == past  # the buffers hold the largest span each K/V input takes
    assert plan.context_mask == (2, 128) and plan.self_cond == (2, 16, 64)
    assert plan.device_bytes == 2 * sum(2 * h * s * d for _, h, s, d in plan.kv) * 4 + 2 * 128 + 2 * 2 * 16 * 64 * 4
    with pytest.raises(CanvasrtError, match="exceeds the engines' max batch 4"):
        plan_buffers(manifest, 5)


def test_buffer_plan_of_engines_built_for_a_shorter_context_keeps_the_graphs_mask(engines):
    manifest = EngineManifest.load(engines)
    narrowed = replace(manifest, capacity=manifest.capacity.narrowed(2, 64))
    plan = plan_buffers(narrowed, 2)
    assert plan.context_mask == (2, 128) and plan.kv == plan_buffers(manifest, 2).kv
    with pytest.raises(CanvasrtError, match="exceeds the engines' max batch 2"):
        plan_buffers(narrowed, 3)


def test_generate_on_engines_without_tensorrt_is_a_clear_error(engines):
    result = CliRunner().invoke(main, ["generate", str(engines), "--prompt-ids", "5,6"])
    assert result.exit_code == 2
    assert "install canvasrt[gpu]" in result.output or "built with tensorrt-rtx" in result.output
    wrong = CliRunner().invoke(main, ["generate", str(engines), "--prompt-ids", "5,6", "--backend", "onnxruntime"])
    assert wrong.exit_code == 2 and "run on --backend tensorrt" in wrong.output


def test_bench_on_engines_without_tensorrt_is_a_clear_error(engines):
    result = CliRunner().invoke(main, ["bench", str(engines), "--backend", "tensorrt", "--steps", "2"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "install canvasrt[gpu]" in lines[0]


def test_parity_on_engines_runs_up_to_the_gpu(engines, tiny_checkpoint):
    """Parity takes engine directories like artifacts; without TensorRT and CUDA it stops with one line saying so,
    before the reference spends any time."""
    result = CliRunner().invoke(main, ["parity", str(tiny_checkpoint), str(engines)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "CUDA" in lines[0] and "tensorrt backend" in lines[0]
