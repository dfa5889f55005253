"""What the declared context capacity costs a step: the same request on exports of several --max-context, side by side.

    .venv/bin/python scripts/context_cost.py CKPT WORK --max-context 1024 --max-context 8192 [--prompt-length 64]

Exports CKPT (fp32, dense MoE) once per --max-context into WORK/ctx-<N> (kept and reused when present), then runs the
same request on ONNX Runtime on every export in alternating rounds (A B A B ...), so that the machine's drift hits
them alike: a prefill of a `--prompt-length` prompt, then two canvases of `--steps` denoising steps each (no early
stop), committed in between. Prints
the median step, prefill and commit time per capacity and each one's ratio to the first, and checks that every export
returns exactly the first one's tokens, step by step (same draws). The K/V inputs' span follows the live context
(docs/ARTIFACTS.md), so the ratios should stay near 1 however large the capacity. `--full-span` adds, as the control,
the largest export fed every slot of its buffers, which is what K/V inputs sized to the capacity cost.
`--per-step-copy` adds the largest export with the context's slots copied again at every step instead of once per
canvas, which is what the copy costs when it is not kept. Both controls are the step interface's `context_feed`
settings ("full-span", "per-step"; `canvasrt.runtime.state.CONTEXT_FEEDS`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from canvasrt.core.manifest import ArtifactManifest
from canvasrt.exporter.export import export
from canvasrt.runtime.backends.onnxruntime import OnnxRuntimeExecutor
from canvasrt.runtime.loop import GenerationResult, generate, left_pad
from canvasrt.runtime.rng import make_draws
from canvasrt.runtime.settings import resolve_settings
from canvasrt.runtime.step import StepBackend
from canvasrt.validation.bench import alternate


def _artifacts(checkpoint: Path, work: Path, max_context: int) -> ArtifactManifest:
    target = work / f"ctx-{max_context}"
    if not (target / "manifest.json").exists():
        export(checkpoint, target, max_context=max_context, max_batch=1)
    return ArtifactManifest.load(target)


def compare(
    checkpoint: Path,
    work: Path,
    contexts: list[int],
    prompt_length: int,
    steps: int,
    rounds: int,
    threads: int,
    full_span: bool = False,
    per_step_copy: bool = False,
) -> dict[str, Any]:
    manifests = [_artifacts(checkpoint, work, n) for n in contexts]
    backends = {
        str(n): StepBackend(OnnxRuntimeExecutor(m, threads=threads)) for n, m in zip(contexts, manifests, strict=True)
    }
    for flag, feed, label in ((full_span, "full-span", "full span"), (per_step_copy, "per-step", "copy per step")):
        if flag:
            control = StepBackend(OnnxRuntimeExecutor(manifests[-1], threads=threads))
            control.context_feed = feed
            backends[f"{contexts[-1]} {label}"] = control
    spec = manifests[0]
    canvas, vocab = spec.capacity.canvas, spec.model.vocab_size
    settings = resolve_settings(
        spec.generation, {"max_new_tokens": 2 * canvas, "max_denoising_steps": steps, "stability_threshold": steps + 1}
    )
    rng = np.random.default_rng(0)
    ids, padding = left_pad(rng.integers(3, vocab, size=(1, prompt_length)).tolist(), 0)

    def run(backend: StepBackend) -> tuple[GenerationResult, int]:
        backend.reset_counters()
        result = generate(backend, ids, padding, settings, make_draws("counter", 0, 1, vocab, canvas))
        return result, backend.context_copy_bytes // result.timings["steps"]

    for backend in backends.values():
        backend.activate()
    try:  # the warm-up round loads every session before anything is timed
        runs = alternate({n: lambda b=b: run(b) for n, b in backends.items()}, rounds)
    finally:
        for backend in backends.values():
            backend.deactivate()
    names = list(backends)
    times = {
        n: {
            "step": [t for result, _ in results for t in result.timings["step_wall_s"]],
            "prefill": [result.timings["prefill_s"] for result, _ in results],
            "commit": [result.timings["commit_s"] for result, _ in results],
        }
        for n, results in runs.items()
    }
    tokens = {n: results[-1][0].new_tokens for n, results in runs.items()}
    copied = {n: results[-1][1] for n, results in runs.items()}  # K/V bytes copied into the context inputs per step
    first = names[0]
    medians = {n: {kind: float(np.median(values) * 1e3) for kind, values in t.items()} for n, t in times.items()}
    return {
        "checkpoint": str(checkpoint),
        "prompt_length": prompt_length,
        "steps": steps,
        "rounds": rounds,
        "threads": threads,
        "contexts": {
            n: {
                **{f"{k}_ms": v for k, v in medians[n].items()},
                **{f"{k}_ratio": medians[n][k] / medians[first][k] for k in medians[n]},
                "same_tokens": bool(np.array_equal(tokens[n], tokens[first])),
                "context_copy_bytes_per_step": copied[n],
            }
            for n in names
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("work", type=Path, help="directory for the exports (reused when present)")
    parser.add_argument(
        "--max-context",
        dest="contexts",
        type=int,
        action="append",
        required=True,
        help="repeatable; the first is the baseline",
    )
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per export, after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--full-span",
        action="store_true",
        help="also run the largest export fed whole K/V buffers (capacity-sized inputs, the control)",
    )
    parser.add_argument(
        "--per-step-copy",
        action="store_true",
        help="also run the largest export with the context copied at every step, not once per canvas",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if min(args.prompt_length, args.steps, args.rounds, args.threads) < 1:
        parser.error("--prompt-length, --steps, --rounds and --threads must be at least 1")
    result = compare(
        args.checkpoint,
        args.work,
        args.contexts,
        args.prompt_length,
        args.steps,
        args.rounds,
        args.threads,
        args.full_span,
        args.per_step_copy,
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"prompt {args.prompt_length} tokens, {args.steps} steps x {args.rounds} rounds, "
            f"{args.threads} threads, ONNX Runtime CPU"
        )
        print(
            f"{'max context':>20}{'step ms':>10}{'ratio':>8}{'prefill ms':>12}{'ratio':>8}{'commit ms':>11}"
            f"{'ratio':>8}{'copied MB/step':>16}  same tokens"
        )
        for n, r in result["contexts"].items():
            print(
                f"{n:>20}{r['step_ms']:>10.1f}{r['step_ratio']:>8.3f}{r['prefill_ms']:>12.1f}{r['prefill_ratio']:>8.3f}"
                f"{r['commit_ms']:>11.1f}{r['commit_ratio']:>8.3f}{r['context_copy_bytes_per_step'] / 1e6:>16.2f}"
                f"  {r['same_tokens']}"
            )
    return 0 if all(r["same_tokens"] for r in result["contexts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
