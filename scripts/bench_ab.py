"""Two artifact directories timed on one backend in one run, alternating (A, B, A, B, ...), so that both see the
same machine load: on a shared machine two `canvasrt bench` runs one after the other can differ by more than the
change being measured.

    python scripts/bench_ab.py BEFORE AFTER --rounds 3 --steps 4 --canvases 2 --prompt-length 64 --threads 2

Each round is one `canvasrt bench` of each directory (its own warm-up run, then the timed one); printed per
directory: every round's step median, their median, and AFTER's speedup over BEFORE, as JSON with --json.

Two code versions on the same artifacts: --before-canvasrt and --after-canvasrt name the `canvasrt` executables
of two checkouts (each its own environment); every bench then runs as a `canvasrt bench --json` process of that
checkout, still alternating:

    python scripts/bench_ab.py ART ART --before-canvasrt ../main/.venv/bin/canvasrt --after-canvasrt .venv/bin/canvasrt
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from canvasrt.validation.bench import alternate, bench


def bench_ab(
    before: Path,
    after: Path,
    backend: str,
    rounds: int,
    batch: int,
    prompt_length: int,
    steps: int,
    canvases: int,
    threads: int | None,
    executables: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    targets = {"before": before, "after": after}
    executables = executables or {}

    def run(name: str) -> dict[str, Any]:
        executable = executables.get(name)
        if executable is None:
            return bench(targets[name], [backend], batch, prompt_length, steps, canvases, threads)["backends"][backend]
        command = [executable, "bench", str(targets[name]), "--backend", backend, "--batch", str(batch), "--json"]
        command += ["--prompt-length", str(prompt_length), "--steps", str(steps), "--canvases", str(canvases)]
        command += ["--threads", str(threads)] if threads else []
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return json.loads(out)["backends"][backend]

    # each bench warms up its own sessions
    runs = alternate({name: lambda name=name: run(name) for name in targets}, rounds, warmup=False)
    summary: dict[str, Any] = {"backend": backend, "rounds": rounds}
    for name, entries in runs.items():
        summary[name] = {
            "target": str(targets[name]),
            "step_median_ms": [e["step"]["median_ms"] for e in entries],
            "prefill_ms": [e["prefill_ms"] for e in entries],
            "commit_ms": [e["commit_ms"] for e in entries],
        }
        for key in ("step_median_ms", "prefill_ms", "commit_ms"):
            summary[name][f"{key}_median"] = float(np.median(summary[name][key]))
    for key in ("step_median_ms", "prefill_ms", "commit_ms"):
        summary[f"{key.removesuffix('_ms')}_speedup"] = (
            summary["before"][f"{key}_median"] / summary["after"][f"{key}_median"]
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--canvases", type=int, default=2, help="at least 2, so that a commit is timed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--before-canvasrt", default=None, help="the canvasrt executable that benches BEFORE")
    parser.add_argument("--after-canvasrt", default=None, help="the canvasrt executable that benches AFTER")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.canvases < 2:
        parser.error("--canvases must be at least 2: the commit between two canvases is one of the figures")
    summary = bench_ab(
        args.before,
        args.after,
        args.backend,
        args.rounds,
        args.batch,
        args.prompt_length,
        args.steps,
        args.canvases,
        args.threads,
        {"before": args.before_canvasrt, "after": args.after_canvasrt},
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for name in ("before", "after"):
        entry = summary[name]
        rounds = ", ".join(f"{v:.1f}" for v in entry["step_median_ms"])
        print(
            f"{name:6} {entry['target']}: step median per round {rounds} ms -> "
            f"{entry['step_median_ms_median']:.1f} ms; prefill {entry['prefill_ms_median']:.1f} ms, "
            f"commit {entry['commit_ms_median']:.1f} ms"
        )
    print(
        f"after vs before: step {summary['step_median_speedup']:.2f}x, prefill {summary['prefill_speedup']:.2f}x, "
        f"commit {summary['commit_speedup']:.2f}x faster"
    )


if __name__ == "__main__":
    main()
