"""A real TensorRT builder (TensorRT-RTX, ahead of time for SM89 and SM120, no GPU) accepts every dense graph the
exporter writes; `canvasrt build` wraps it with an engine manifest, narrowed profiles, reuse and one-line refusals.

Deserialising an engine (and so TensorRT's engine inspector) needs a CUDA driver, which this machine lacks; the layer
information TensorRT-RTX's builder reports at profiling verbosity DETAILED is the same per-layer view, and it is what
the FP8 checks below read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from canvasrt.builder.engines import build_engine, engine_layers
from canvasrt.core.errors import CanvasrtError
from canvasrt.core.manifest import ArtifactManifest, sha256_file
from canvasrt.model.modeling import DENSE_PIECES
from support import cli

pytest.importorskip("tensorrt_rtx")

PRECISIONS = {"fp32": "tiny_artifacts", "fp16": "tiny_fp16_artifacts", "fp8": "tiny_fp8_artifacts"}
SOURCES = {**PRECISIONS, "sort-fp8": "sort_fp8"}  # and the trained sort model's FP8 artifacts
# Each precision for SM89; fp32 and the tiny FP8 engines for SM120 too, the architecture with the other FP8 kernels.
BUILDS = [
    ("fp32", "sm89"),
    ("fp32", "sm120"),
    ("fp16", "sm89"),
    ("fp8", "sm89"),
    ("fp8", "sm120"),
    ("sort-fp8", "sm89"),
]


@pytest.fixture(scope="module")
def engines(request, tmp_path_factory):
    """The BUILDS, each built once through `canvasrt build` (fp32 for SM89 is the shared `tiny_engines`)."""
    root = tmp_path_factory.mktemp("engines")
    built = {("fp32", "sm89"): request.getfixturevalue("tiny_engines")}
    for precision, target in BUILDS:
        if (precision, target) in built:
            continue
        out = root / f"{precision}-{target}"
        result = cli("build", request.getfixturevalue(SOURCES[precision]), "-o", out, "--target", target)
        assert result.exit_code == 0, result.output
        built[precision, target] = out
    return built


def layers(engine_dir: Path, graph: str):
    return engine_layers((engine_dir / f"{graph}.layers.txt").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("precision, target", [build for build in BUILDS if build[0] in PRECISIONS])
def test_engine_manifest_records_what_was_built(engines, precision, target, request):
    artifacts = request.getfixturevalue(PRECISIONS[precision])
    source = json.loads((artifacts / "manifest.json").read_text())
    manifest = json.loads((engines[precision, target] / "manifest.json").read_text())
    key = manifest["key"]
    assert (key["builder"], key["target"]) == ("tensorrt-rtx", target) and key["builder_version"].startswith("1.")
    assert (key["max_batch"], key["max_context"]) == (4, source["capacity"]["max_context"])
    assert manifest["precision"] == source["dtype"] and manifest["capacity"] == source["capacity"]
    calibration = artifacts / "calibration.json"
    assert key["calibration_sha256"] == (sha256_file(calibration) if precision == "fp8" else None)
    for name, engine in manifest["engines"].items():
        graph = source["graphs"][name]
        assert engine["onnx_sha256"] == graph["sha256"] and engine["profiles"] == graph["profiles"]
        assert (engines[precision, target] / engine["file"]).stat().st_size == engine["bytes"] > 100_000
        built = layers(engines[precision, target], name)
        # One engine, every phase in it.
        assert {layer.profile for layer in built} == set(range(len(engine["profiles"])))
        assert list(engine["gemms"]) == list(engine["profiles"]) == ["prefill", "commit", "denoise"]
        for index, counts in enumerate(engine["gemms"].values()):
            assert sum(counts.values()) == sum(layer.kind == "gemm" and layer.profile == index for layer in built) > 0


def canvas_only(weight: str, layers: int) -> bool:
    """Projections only canvas tokens run through: self-conditioning, and the last layer's attention queries and
    output and its FFN (encoder tokens need only the last layer's K/V)."""
    last = f"layers.{layers - 1}."
    return weight.startswith("self_conditioning.") or (
        weight.startswith(last) and not weight.startswith((f"{last}self_attn.k_proj", f"{last}self_attn.v_proj"))
    )


@pytest.mark.slow
@pytest.mark.parametrize("model, target", [build for build in BUILDS if build[0].endswith("fp8")])
def test_fp8_engine_runs_every_quantized_gemm_as_an_fp8_gemm(engines, model, target, request):
    """Every quantized GEMM, the MoE experts' gate_up and down projections of every layer included, lands in a GEMM
    layer that reads FP8 (E4M3) activations and FP8 weights, once (the experts: once per run of tokens) in each
    optimization profile that runs it: the denoise profile runs them all, prefill and commit all but the canvas-only
    ones (which TensorRT removes there, on zero rows). Tiny preset and the trained sort model."""
    artifacts = request.getfixturevalue(SOURCES[model])
    source = json.loads((artifacts / "manifest.json").read_text())
    manifest = json.loads((engines[model, target] / "manifest.json").read_text())
    found = layers(engines[model, target], "backbone")
    quantized = source["graphs"]["backbone"]["quantized"]
    n_layers = len(source["model"]["layers"])
    experts = {f"layers.{i}.experts.{proj}" for i in range(n_layers) for proj in ("gate_up_proj", "down_proj")}
    assert experts <= set(quantized) and any(canvas_only(w, n_layers) for w in quantized)
    for index, phase in enumerate(manifest["engines"]["backbone"]["profiles"]):
        fp8_gemms = [
            layer
            for layer in found
            if layer.kind == "gemm" and layer.profile == index and set(layer.inputs + layer.weights) == {"FP8"}
        ]
        runs = {w: sum(f"{w}.dequantize" in layer.onnx for layer in fp8_gemms) for w in quantized}
        # The dense experts' weights are read once per run of tokens.
        readers = {w: DENSE_PIECES if w in experts else 1 for w in quantized}
        expected = {w: readers[w] * int(phase == "denoise" or not canvas_only(w, n_layers)) for w in quantized}
        assert runs == expected, phase
        assert manifest["engines"]["backbone"]["gemms"][phase]["FP8"] == len(fp8_gemms) > 0
    # Nothing but these GEMMs reads an FP8 weight: no fp32 runtime_fusion kernel converts FP8 weights on the fly.
    # (Kernels after a GEMM may list its weight's DequantizeLinear: they apply the per-channel scales, Float constants.)
    fp8_gemm = {layer.name for layer in found if layer.kind == "gemm" and set(layer.inputs + layer.weights) == {"FP8"}}
    assert [layer.name for layer in found if "FP8" in layer.weights and layer.name not in fp8_gemm] == []


@pytest.mark.slow
@pytest.mark.parametrize("precision, target", [build for build in BUILDS if build[0] in ("fp32", "fp16")])
def test_unquantized_engines_hold_no_fp8(engines, precision, target):
    dtype = {"fp32": "Float", "fp16": "Half"}[precision]
    found = layers(engines[precision, target], "backbone")
    assert not any("FP8" in layer.inputs + layer.weights + layer.outputs for layer in found)
    manifest = json.loads((engines[precision, target] / "manifest.json").read_text())
    for counts in manifest["engines"]["backbone"]["gemms"].values():
        assert dtype in counts and "FP8" not in counts


@pytest.mark.slow
def test_a_matching_build_is_reused_and_a_narrower_request_rebuilds(engines, tiny_artifacts, tmp_path):
    again = cli("build", tiny_artifacts, "-o", engines["fp32", "sm120"], "--target", "sm120")
    assert again.exit_code == 0 and "up to date" in again.output
    out = tmp_path / "narrow"
    shutil.copytree(engines["fp32", "sm120"], out)
    narrow = cli("build", tiny_artifacts, "-o", out, "--target", "sm120", "--max-batch", "2", "--max-context", "64")
    assert narrow.exit_code == 0 and "up to date" not in narrow.output, narrow.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["key"]["max_batch"], manifest["key"]["max_context"]) == (2, 64)
    assert manifest["capacity"] == {"max_batch": 2, "max_context": 64, "max_prefill": 64, "canvas": 16, "sliding": 7}
    assert manifest["engines"]["backbone"]["profiles"] == {  # the K/V span narrowed with the context
        "prefill": {"batch": [1, 2, 2], "chunk": [1, 64, 64], "rows": [0, 0, 0], "context": [16, 64, 64]},
        "commit": {"batch": [1, 2, 2], "chunk": [16, 16, 16], "rows": [0, 0, 0], "context": [16, 64, 64]},
        "denoise": {"batch": [1, 2, 2], "chunk": [0, 0, 0], "rows": [16, 16, 16], "context": [16, 64, 64]},
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "sm90"], "TensorRT-RTX builds for"),
        (["--workspace", "lots"], "--workspace takes a size"),
        (["--max-batch", "0"], "--max-batch must be at least 1 (got 0)"),
        (["--max-batch", "5"], "--max-batch 5 exceeds the artifacts' max_batch of 4; pass at most 4 or re-export"),
        (["--max-context", "0"], "--max-context must be at least 1"),
        (["--max-context", "129"], "--max-context 129 exceeds the artifacts' max_context of 128"),
        (["--timing-cache", "cache.bin"], "TensorRT-RTX keeps no timing cache"),
    ],
)
def test_build_bad_input(tiny_artifacts, tmp_path, args, message):
    result = cli("build", tiny_artifacts, "-o", tmp_path / "e", *args)
    assert result.exit_code == 2 and message in result.output
    assert list(tmp_path.iterdir()) == []


def test_fp8_artifacts_without_their_calibration_are_refused(tiny_fp8_artifacts, tmp_path):
    broken = tmp_path / "fp8"
    shutil.copytree(tiny_fp8_artifacts, broken)
    (broken / "calibration.json").write_text("{}\n")
    result = cli("build", broken, "-o", tmp_path / "e")
    assert result.exit_code == 2 and "is not the calibration these FP8 graphs were written with" in result.output
    (broken / "calibration.json").unlink()
    result = cli("build", broken, "-o", tmp_path / "e")
    assert result.exit_code == 2 and "holds FP8 graphs but not their calibration.json" in result.output
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_sparse_moe_graph_is_refused_by_tensorrt_rtx_with_a_clear_error(tiny_sparse_artifacts, tmp_path):
    entry = ArtifactManifest.load(tiny_sparse_artifacts).backbone
    with pytest.raises(CanvasrtError, match="could not build backbone.onnx: .*NonZero"):
        build_engine(tiny_sparse_artifacts / entry.file, tmp_path / "e.engine", entry, "tensorrt-rtx", "sm89")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_build_refuses_sparse_graphs_for_tensorrt_rtx_up_front(tiny_sparse_artifacts, tmp_path):
    result = cli("build", tiny_sparse_artifacts, "-o", tmp_path / "e")
    assert result.exit_code == 2 and "export with --moe dense" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def monitored_build(tiny_artifacts, tmp_path_factory):
    """One build of the backbone that reports its phases and writes a timing cache."""
    entry = ArtifactManifest.load(tiny_artifacts).backbone
    cache = tmp_path_factory.mktemp("cache") / "timing.cache"
    engine = tmp_path_factory.mktemp("engine") / "backbone.engine"
    events = []
    built = build_engine(
        tiny_artifacts / entry.file, engine, entry, "tensorrt-rtx", "sm89", timing_cache=cache, phases=events.append
    )
    return entry, built, events, cache, engine


@pytest.mark.slow
def test_progress_monitor_reports_the_build_phases(monitored_build):
    _, built, events, _, engine = monitored_build
    assert engine.stat().st_size == built.bytes > 100_000 and built.layers
    assert events[0][0].name == "Building engine" and events[0][0].steps > 1 and events[-1] == ()
    assert {"Building engine", "Optimizing graph"} <= {phase.name for stack in events for phase in stack}
    assert all(0 <= phase.done <= phase.steps for stack in events for phase in stack)
    assert max(stack[0].done for stack in events if stack) > 0  # steps are counted, not only phases opened


def test_progress_monitor_turns_an_interrupt_into_a_cancelled_build(tiny_artifacts, tmp_path):
    entry = ArtifactManifest.load(tiny_artifacts).backbone

    def interrupt(stack):
        if len(stack) > 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_engine(
            tiny_artifacts / entry.file, tmp_path / "e.engine", entry, "tensorrt-rtx", "sm89", phases=interrupt
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_timing_cache_is_written_atomically_and_survives_a_rebuild(monitored_build, tiny_artifacts, tmp_path):
    """TensorRT-RTX times no tactics (its timing cache stays empty: 0 keys), so this checks the file handling that
    the TensorRT path shares: written by rename, no lock or temporary file left, loaded and rewritten by the next
    build."""
    entry, _, _, cache, _ = monitored_build
    assert cache.is_file() and cache.stat().st_size > 0
    assert sorted(p.name for p in cache.parent.iterdir()) == ["timing.cache"]
    first = cache.read_bytes()
    build_engine(tiny_artifacts / entry.file, tmp_path / "e.engine", entry, "tensorrt-rtx", "sm89", timing_cache=cache)
    assert cache.read_bytes() == first and sorted(p.name for p in cache.parent.iterdir()) == ["timing.cache"]
