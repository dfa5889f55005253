"""The prepared GPU check: the single verification a GPU machine runs, in under 10 minutes, one JSON summary.

Sections (each reports what it cannot do here as skipped, with the reason, instead of failing):
  conformance  `pytest -m conformance` (tests/test_conformance.py): every executor present runs the whole suite;
               the CUDA ones (ONNX Runtime CUDA and TensorRT EP, torch CUDA, TensorRT engines) run on a GPU machine.
  executors    on a tiny model exported here: step parity against transformers and loop agreement with the fp32
               torch executor for ONNX Runtime (CPU, CUDA) and an engine built by full TensorRT for this GPU (SM90 on
               an H100), then `canvasrt bench` of them side by side with the torch executor (bf16 on CUDA), each with
               its step time and the bytes crossing host<->device per call (prefill, commit, denoise).
  served       one request through `canvasrt triton` in process (TensorRT on engines where built, else ONNX Runtime)
               on a real tritonserver, equal to `canvasrt generate` token for token.
  torch        the torch executor at the released 26B-A4B's width (for N in --layers: a random checkpoint with the
               released layer shapes and N layers, built on the device): step parity and --rng hf generation parity
               against transformers, one denoising step timed at canvas 256, batch 1, bf16, for the sparse and the
               dense MoE, the extrapolation to the released 30 layers, and in-flight batching (8 requests through 8
               slots and through one, the late arrival's time to first block).
Prints every figure and writes them as JSON to $OUT/gpu_check.json when OUT is set. `--device cpu --preset tiny`
runs the same code on a CPU (tests/test_torch_paths.py does).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import numpy as np
import torch

from canvasrt.core.errors import CanvasrtError
from canvasrt.model.random_checkpoint import PRESETS, write_random_checkpoint
from canvasrt.runtime.backends.torch import TorchExecutor
from canvasrt.runtime.rng import make_draws
from canvasrt.runtime.settings import resolve_settings
from canvasrt.runtime.step import Draws, StepBackend, StepInputs
from canvasrt.validation.bench import bench_concurrency
from canvasrt.validation.parity import generate_parity, step_parity

RELEASED_LAYERS = 30
SECTIONS = ("conformance", "executors", "served", "torch")


def time_step(checkpoint: Path, device: str, moe: str, steps: int) -> float:
    """Median ms of one denoising step, canvas of the model, batch 1, bf16, after a 512-token prefill."""
    with StepBackend(
        TorchExecutor(checkpoint, dtype="bf16", moe=moe, max_batch=1, max_context=1024, device=device)
    ) as backend:
        spec = backend.spec
        canvas, vocab = spec.capacity.canvas, spec.model.vocab_size
        prompt = min(512, spec.capacity.max_context - canvas)
        ids = np.random.default_rng(0).integers(3, vocab, (1, prompt))
        backend.start(np.ones((1, prompt), bool))
        for begin in range(0, prompt, spec.capacity.max_prefill):
            chunk = ids[:, begin : begin + spec.capacity.max_prefill]
            backend.encode(chunk, np.arange(begin, begin + chunk.shape[1]), np.full(1, begin, np.int64))
        draws = make_draws("counter", 0, 1, vocab, canvas)
        times = []
        for step in range(steps + 2):  # two warm-up steps
            d: Draws = draws.step(0, step + 1)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            backend.denoise(StepInputs.uniform(draws.initial_canvas(0), np.full(1, prompt), 0.8, 0.1, d, step == 0))
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return float(np.median(times[2:]) * 1e3)


def inflight(checkpoint: Path, args: argparse.Namespace) -> dict:
    """`bench --concurrency` on the device: where a small-batch step is bound by reading the weights, rows that
    share step calls should cost little more than one, which the CPU (bound by compute) cannot show."""
    results = bench_concurrency(
        checkpoint, "torch", args.concurrency, 16, args.loop_steps * 2, 1, None, device=args.device, dtype="bf16"
    )
    batched, alone = results["inflight"], results["sequential"]
    return {
        "step_calls": batched["step_calls"],
        "row_steps": batched["row_steps"],
        "tokens_per_s_batched": batched["tokens_per_s"],
        "tokens_per_s_one_slot": alone["tokens_per_s"],
        "speedup": batched["speedup"],
        "late_arrival": results["late_arrival"],
        # bf16 routing can differ with the batch in the last bit; recorded, not gated on
        "same_ids": batched["ids"] == alone["ids"],
    }


def check(layers: int, args: argparse.Namespace, work: Path) -> dict:
    checkpoint = work / f"{args.preset}-{layers}"
    start = time.perf_counter()
    write_random_checkpoint(checkpoint, preset=args.preset, layers=layers, device=args.device)
    figures: dict = {"layers": layers, "write_s": time.perf_counter() - start}
    # fp32 parity: the torch backend against transformers, both on the device.
    start = time.perf_counter()
    backend = StepBackend(TorchExecutor(checkpoint, max_batch=2, max_context=args.max_context, device=args.device))
    report = step_parity(checkpoint, backend, target=checkpoint, device=args.device)
    figures["step_parity"] = {
        "passed": report.passed,
        "s": time.perf_counter() - start,
        "failed": [f"{c.stage}/{c.output}" for c in report.checks if not c.passed],
    }
    start = time.perf_counter()
    like = TorchExecutor(checkpoint, max_batch=2, max_context=args.max_context, device=args.device)
    settings = resolve_settings(
        like.spec.generation, {"max_new_tokens": like.spec.capacity.canvas, "max_denoising_steps": args.loop_steps}
    )
    rows = [list(range(3, 3 + 24)), list(range(40, 40 + 21))]
    checks = generate_parity(checkpoint, rows, settings, 0, None, args.max_context, like)
    figures["generate_parity"] = {
        "passed": all(c.passed for c in checks),
        "s": time.perf_counter() - start,
        "failed": [f"{c.stage}/{c.output}" for c in checks if not c.passed],
    }
    for moe in ("sparse", "dense"):
        figures[f"step_ms_{moe}"] = time_step(checkpoint, args.device, moe, args.steps)
    if args.concurrency:
        figures["inflight"] = inflight(checkpoint, args)
    if args.device == "cuda":
        figures["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return figures


def extrapolate(step_ms: dict[int, float], layers: int, canvas: int) -> dict[str, Any]:
    """A step's time at `layers` layers from the timings of the two smallest depths measured: a fixed part (embedding,
    LM head, sampler) plus a part per layer, fitted through both points. The fit means something only when the deeper
    model took longer and the fixed part comes out non-negative; otherwise the timings are noise (a loaded machine,
    depths too close) and the result says so instead of giving a time."""
    (a, at_a), (b, at_b) = sorted(step_ms.items())[:2]
    per_layer = (at_b - at_a) / (b - a)
    fixed = at_a - a * per_layer
    fit = {"fitted_from": {str(a): at_a, str(b): at_b}, "per_layer_ms": per_layer, "fixed_ms": fixed}
    if per_layer <= 0 or fixed < 0:
        why = "the deeper model was not slower" if per_layer <= 0 else "the fitted fixed part is negative"
        return {**fit, "meaningful": False, "why": f"{why}: the timings are noise; measure again on an idle machine"}
    at_layers = fixed + layers * per_layer
    return {
        **fit,
        "meaningful": True,
        f"step_ms_{layers}_layers": at_layers,
        "tokens_per_s_48_steps": canvas / (48 * at_layers / 1e3),
        "tokens_per_s_8_steps": canvas / (8 * at_layers / 1e3),
    }


def conformance(work: Path) -> dict:
    """The conformance suite over every executor present: per test, passed, failed or skipped (with the reason)."""
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed"}
    report = work / "conformance.xml"
    tests = Path(__file__).resolve().parents[1] / "tests" / "test_conformance.py"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(tests),
            "-m",
            "conformance",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )
    if not report.is_file():
        return {"skipped": "pytest wrote no report (tests/ missing or pytest failed to start)"}
    cases: dict[str, dict] = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = case.get("name", "?")
        executor = name[name.index("[") + 1 : -1] if "[" in name else "?"
        entry = cases.setdefault(executor, {"passed": 0, "failed": [], "skipped": None})
        skipped, failed = case.find("skipped"), case.find("failure") or case.find("error")
        if skipped is not None:
            entry["skipped"] = skipped.get("message", "")
        elif failed is not None:
            entry["failed"].append(name)
        else:
            entry["passed"] += 1
    return cases


def _missing_ort(provider: str) -> str | None:
    import onnxruntime as ort

    from canvasrt.runtime.backends.onnxruntime import PROVIDERS

    if PROVIDERS[provider] not in ort.get_available_providers():
        return f"this ONNX Runtime ({ort.__version__}) has no {PROVIDERS[provider]}"
    return None if provider == "cpu" or torch.cuda.is_available() else "no CUDA GPU"


def _missing_tensorrt() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    import tensorrt

    if not hasattr(tensorrt, "Runtime"):
        return "the installed `tensorrt` is not a working TensorRT"
    return None if torch.cuda.is_available() else "no CUDA GPU"


def executors(args: argparse.Namespace, work: Path) -> dict:
    """Step parity, loop agreement and bench side by side on a tiny model, for every executor present."""
    from canvasrt.runtime.backends import open_backend
    from canvasrt.validation.bench import bench
    from canvasrt.validation.parity import loop_agreement

    if importlib.util.find_spec("onnxscript") is None:
        return {"skipped": "cannot export here (onnxscript is not installed)"}
    from canvasrt.exporter.export import export

    checkpoint, artifacts = work / "tiny", work / "tiny-art"
    write_random_checkpoint(checkpoint, preset="tiny")
    export(checkpoint, artifacts, max_context=128, max_batch=2)
    targets: dict[str, tuple[Path, dict, str | None]] = {
        "onnxruntime-cpu": (artifacts, {"name": "onnxruntime"}, _missing_ort("cpu")),
        "onnxruntime-cuda": (artifacts, {"name": "onnxruntime", "provider": "cuda"}, _missing_ort("cuda")),
        "tensorrt": (work / "tiny-eng", {"name": "tensorrt"}, _missing_tensorrt()),
    }
    if targets["tensorrt"][2] is None:
        from canvasrt.builder.engines import build_engines

        build_engines(artifacts, work / "tiny-eng", builder="tensorrt", target="current")
    rows = [list(range(3, 17)), list(range(30, 39))]
    settings = resolve_settings(
        open_backend(artifacts, "onnxruntime").spec.generation, {"max_new_tokens": 32, "max_denoising_steps": 6}
    )
    results: dict = {}
    for label, (target, options, missing) in targets.items():
        if missing is not None:
            results[label] = {"skipped": missing}
            continue
        backend = open_backend(target, **options)
        report = step_parity(checkpoint, backend, target=target)
        reference = open_backend(artifacts, "torch")
        agreement = loop_agreement(open_backend(target, **options), reference, rows, settings, seed=4)
        results[label] = {
            "step_parity": report.passed,
            "loop_parity": all(c.passed for c in agreement),
            "failed": [f"{c.stage}/{c.output}" for c in (*report.checks, *agreement) if not c.passed],
        }
    side_by_side = [("onnxruntime", "cpu"), ("torch", "cpu")]
    if results["onnxruntime-cuda"].get("skipped") is None:
        side_by_side.append(("onnxruntime", "cuda"))
    for name, provider in side_by_side:
        figures = bench(artifacts, [name], 1, 16, args.loop_steps, 2, None, provider=provider)["backends"][name]
        results.setdefault("bench", {})[f"{name}-{provider}"] = _bench_figures(figures)
    if torch.cuda.is_available():
        figures = bench(artifacts, ["torch"], 1, 16, args.loop_steps, 2, None, device="cuda", dtype="bf16")
        results["bench"]["torch-cuda-bf16"] = _bench_figures(figures["backends"]["torch"])
    if results["tensorrt"].get("skipped") is None:
        figures = bench(work / "tiny-eng", ["tensorrt"], 1, 16, args.loop_steps, 2, None)["backends"]["tensorrt"]
        results["bench"]["tensorrt"] = _bench_figures(figures)
    results["passed"] = all(
        entry.get("skipped") is not None or (entry["step_parity"] and entry["loop_parity"])
        for key, entry in results.items()
        if key != "bench"
    )
    return results


def _bench_figures(entry: dict) -> dict:
    return {"step_median_ms": entry["step"]["median_ms"], "host_device_bytes": entry["host_device_bytes"]}


def served(work: Path) -> dict:
    """One request served in process (TensorRT on engines where they were built, else ONNX Runtime), equal to the
    loop run directly."""
    artifacts = work / "tiny-art"
    if not artifacts.is_dir():
        return {"skipped": "no tiny artifacts (the executors section was skipped)"}
    from canvasrt.runtime.backends import open_backend
    from canvasrt.runtime.loop import generate, left_pad
    from canvasrt.serving.client import generate_grpc
    from canvasrt.serving.protocol import request_inputs
    from canvasrt.serving.repository import write_repository
    from canvasrt.serving.server import TritonServer, free_ports

    target = work / "tiny-eng" if (work / "tiny-eng").is_dir() else artifacts
    env = os.environ.get("CANVASRT_TRITON_ENV", str(Path(__file__).resolve().parents[1] / ".venv-triton"))
    repository = work / "repo"
    summary = write_repository(target, repository, threads=1)
    http, grpc = free_ports(2)
    try:
        server = TritonServer(repository, env, http_port=http, grpc_port=grpc)
    except CanvasrtError as exc:  # no tritonserver or no environment for its Python models: reported, not failed
        return {"skipped": str(exc)}
    prompt, seed = [5, 6, 7, 8, 9], 3
    with open_backend(target) as backend:
        settings = resolve_settings(backend.spec.generation)
        ids, padding = left_pad([prompt], 0)
        vocab, canvas = backend.spec.model.vocab_size, backend.spec.capacity.canvas
        expected = generate(backend, ids, padding, settings, make_draws("counter", seed, 1, vocab, canvas))
    with server:
        responses = generate_grpc(server.grpc_url, request_inputs(prompt_ids=prompt, seed=seed))
    same = responses[-1]["ids"] == expected.new_tokens[0].tolist()
    return {"executor": summary["executor"], "equal_to_generate": same, "passed": same}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--preset", default="released", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=10, help="timed denoising steps per configuration")
    parser.add_argument("--loop-steps", type=int, default=8, help="denoising steps per canvas in generate parity")
    parser.add_argument("--max-context", type=int, default=1536)
    parser.add_argument("--concurrency", type=int, default=8, help="requests of the in-flight measurement (0: skip)")
    parser.add_argument(
        "--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="what to run (default: everything)"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but torch sees no GPU; run on a machine with one, or pass --device cpu",
            file=sys.stderr,
        )
        return 2
    results = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="canvasrt-gpu-check-") as work:
        if "conformance" in args.sections:
            results["conformance"] = conformance(Path(work))
            print(json.dumps({"conformance": results["conformance"]}), flush=True)
        if "executors" in args.sections:
            results["executors"] = executors(args, Path(work))
            print(json.dumps({"executors": results["executors"]}), flush=True)
        if "served" in args.sections:
            results["served"] = served(Path(work))
            print(json.dumps({"served": results["served"]}), flush=True)
        for layers in args.layers if "torch" in args.sections else ():
            figures = check(layers, args, Path(work))
            results["runs"].append(figures)
            print(json.dumps(figures), flush=True)
    runs = {r["layers"]: r for r in results["runs"]}
    if len(runs) >= 2:
        canvas = PRESETS[args.preset]["canvas_length"]
        for moe in ("sparse", "dense"):
            step_ms = {layers: run[f"step_ms_{moe}"] for layers, run in runs.items()}
            results[f"extrapolated_{moe}"] = extrapolate(step_ms, RELEASED_LAYERS, canvas)
    ok = all(r["step_parity"]["passed"] and r["generate_parity"]["passed"] for r in results["runs"])
    ok = ok and not any(
        entry.get("failed") for entry in results.get("conformance", {}).values() if isinstance(entry, dict)
    )
    ok = ok and results.get("executors", {}).get("passed", True) and results.get("served", {}).get("passed", True)
    results["passed"] = ok
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
