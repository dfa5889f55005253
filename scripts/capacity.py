"""Rows one GPU holds at the released size: weights, K/V per row and measured working memory per row, with the
roofline step time at that many rows.

    python scripts/capacity.py ART --bench whole=BENCH1.json --bench chunked=BENCH2.json [--engine NAME=MANIFEST]

ART: a released-width export with a few layers (`canvasrt random-checkpoint DIR --preset released --layers 2`,
`canvasrt export`), whose shapes are scaled to `--layers` in the released pattern (as scripts/roofline.py does).
Each `--bench NAME=FILE` is the JSON of `canvasrt bench ART --batch N --json` (its `memory`: working memory at one
row and at N, and the growth per added row); each `--engine NAME=FILE` an engine manifest.json built at
`--max-batch 1` and a second one at a larger max batch, given as `NAME=FILE1,FILE2` (the builder's device activation
memory of the denoise profile at each); each `--working NAME=GB_AT_ONE_ROW,GB_PER_ROW` the two figures as given (a
growth per row measured or derived beyond the rows a bench ran). Per configuration:

    rows = (GPU memory - weights - reserve - working memory at one row + one row's share)
           / (K/V per row + working memory per added row)

weights: every GEMM weight scaled to `--layers` at `--weight-bytes` (FP8: 1) where calibration quantizes it, the
rest (embedding and LM head, routers, norms) at `--other-bytes`; K/V: every layer's slots at `--context` committed
tokens (full layers: the context; sliding layers: their ring) in `--kv-bytes`; reserve: the CUDA context, the
builder's workspace and what else the process holds (an assumption, `--reserve-gb`). vLLM's launch recipe for
DiffusionGemma (`--max-num-seqs 4`) is listed beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import roofline
from canvasrt.core.config import FULL, SLIDING
from canvasrt.core.manifest import ArtifactManifest
from canvasrt.model.fp8 import QUANTIZED
from canvasrt.model.modeling import DiffusionGemmaText

VLLM_MAX_SEQS = 4


def weight_bytes(manifest: ArtifactManifest, layers: int, weight: float, other: float) -> float:
    """The weights scaled to `layers` in the released pattern: per-layer bytes by layer kind, shared ones once."""
    model = DiffusionGemmaText(manifest.model)  # meta tensors: shapes only
    kinds = [spec.kind for spec in manifest.model.layers]
    per_layer: dict[int, float] = {}
    shared = 0.0
    for name, param in model.named_parameters():
        size = param.numel() * (weight if QUANTIZED.search(name) else other)
        if name.startswith("layers."):
            index = int(name.split(".")[1])
            per_layer[index] = per_layer.get(index, 0.0) + size
        else:
            shared += size
    by_kind = {kind: max(per_layer[i] for i, k in enumerate(kinds) if k == kind) for kind in set(kinds)}
    return shared + sum(by_kind[kind] for kind in roofline.released_pattern(layers))


def kv_bytes_per_row(manifest: ArtifactManifest, layers: int, context: int, element: float) -> float:
    """K and V of one row at `context` committed tokens, every layer of the released pattern."""
    spec = {layer.kind: layer for layer in manifest.model.layers}
    ring = manifest.model.sliding_capacity
    total = 0.0
    for kind in roofline.released_pattern(layers):
        slots = min(ring, context) if kind == SLIDING else context
        total += 2 * spec[kind].num_kv_heads * spec[kind].head_dim * slots * element
    return total


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} takes NAME=FILE, got {value!r}")
        pairs[name] = path
    return pairs


def bench_memory(path: str) -> tuple[float, float]:
    """(working bytes at one row, growth per added row) from a `canvasrt bench --json` report."""
    entry = next(iter(json.loads(Path(path).read_text())["backends"].values()))
    memory = entry.get("memory")
    if not memory or memory["working_bytes_per_row"] is None:
        raise SystemExit(f"{path} has no working memory at two row counts; run `canvasrt bench --batch N` with N > 1")
    return float(memory["working_bytes"]["1"]), float(memory["working_bytes_per_row"])


def engine_memory(paths: str) -> tuple[float, float]:
    """(device activation bytes of the denoise profile at one row, growth per added row) from two engine
    manifests built at different max batches."""
    points = []
    for path in paths.split(","):
        data = json.loads(Path(path).read_text())
        engine = data["engines"]["backbone"]
        memory = engine.get("device_memory")
        if not memory:
            raise SystemExit(f"{path}: the builder reported no device memory for this engine")
        points.append((data["key"]["max_batch"], float(memory["activation_bytes"]["denoise"])))
    points.sort()
    (b1, a1), (b2, a2) = points[0], points[-1]
    if b1 == b2:
        raise SystemExit(f"{paths}: give engines of two different max batches")
    per_row = (a2 - a1) / (b2 - b1)
    return a1 - (b1 - 1) * per_row, per_row


def working_figures(value: str) -> tuple[float, float]:
    """(working bytes at one row, growth per added row) given as `GB_AT_ONE_ROW,GB_PER_ROW`."""
    try:
        at_one, per_row = (float(part) * 1e9 for part in value.split(","))
    except ValueError:
        raise SystemExit(f"--working wants NAME=GB_AT_ONE_ROW,GB_PER_ROW, got {value!r}") from None
    return at_one, per_row


def capacity(args: argparse.Namespace) -> dict[str, Any]:
    manifest = ArtifactManifest.load(args.artifacts)
    gb = 1e9
    weights = weight_bytes(manifest, args.layers, args.weight_bytes, args.other_bytes)
    kv = kv_bytes_per_row(manifest, args.layers, args.context, args.kv_bytes)
    free = args.gpu_gb * gb - weights - args.reserve_gb * gb
    sources = {name: bench_memory(path) for name, path in _pairs(args.bench, "--bench").items()}
    sources.update({name: engine_memory(paths) for name, paths in _pairs(args.engine, "--engine").items()})
    sources.update({name: working_figures(value) for name, value in _pairs(args.working, "--working").items()})
    context = min(args.context, manifest.capacity.max_context)

    def step(rows: int) -> dict[str, Any]:
        formulations = roofline.roofline(
            args.artifacts,
            args.layers,
            rows,
            args.bandwidth,
            args.tflops,
            args.weight_bytes,
            args.other_bytes,
            args.kv_bytes,
            args.steps_per_canvas,
            context,
        )["formulations"]
        return {
            name: {"step_ms": r["step_ms"], "tokens_per_s": r["tokens_per_s"], "bound_by": r["bound_by"]}
            for name, r in formulations.items()
        }

    rows = {"vLLM recipe (--max-num-seqs 4)": {"rows": VLLM_MAX_SEQS, "roofline": step(VLLM_MAX_SEQS)}}
    for name, (at_one, per_row) in sources.items():
        fits = int((free - (at_one - per_row)) // (kv + per_row))
        rows[name] = {
            "working_bytes_at_one_row": at_one,
            "working_bytes_per_row": per_row,
            "rows": fits,
            "roofline": step(fits) if fits > 0 else {},
        }
    return {
        "artifacts": str(args.artifacts),
        "layers": args.layers,
        "gpu_gb": args.gpu_gb,
        "reserve_gb": args.reserve_gb,
        "weights_bytes": weights,
        "kv_bytes_per_row": kv,
        "context": args.context,
        "roofline_context": context,
        "layer_kinds": {k: roofline.released_pattern(args.layers).count(k) for k in (SLIDING, FULL)},
        "configurations": rows,
    }


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['layers']} layers, {result['gpu_gb']:.0f} GB GPU, weights {result['weights_bytes'] / 1e9:.2f} GB, "
        f"reserve {result['reserve_gb']:.1f} GB, K/V {result['kv_bytes_per_row'] / 1e9:.3f} GB per row at "
        f"{result['context']} tokens (roofline at context {result['roofline_context']})",
        f"{'configuration':<34}{'at 1 row GB':>12}{'per row GB':>11}{'rows':>6}"
        f"{'dense step ms':>15}{'tokens/s':>10}{'routed step ms':>16}{'tokens/s':>10}",
    ]
    for name, r in result["configurations"].items():
        one, per = (r.get(key) for key in ("working_bytes_at_one_row", "working_bytes_per_row"))
        one_gb = "-" if one is None else f"{one / 1e9:.3f}"
        per_gb = "-" if per is None else f"{per / 1e9:.3f}"
        dense, routed = (r["roofline"].get(f, {}) for f in ("dense", "routed"))
        lines.append(
            f"{name:<34}{one_gb:>12}{per_gb:>11}{r['rows']:>6}"
            f"{dense.get('step_ms', float('nan')):>15.2f}{dense.get('tokens_per_s', float('nan')):>10.0f}"
            f"{routed.get('step_ms', float('nan')):>16.2f}{routed.get('tokens_per_s', float('nan')):>10.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, help="a released-width export with a few layers (dense MoE)")
    parser.add_argument("--bench", action="append", default=[], help="NAME=FILE: `canvasrt bench --batch N --json`")
    parser.add_argument("--engine", action="append", default=[], help="NAME=MANIFEST1,MANIFEST2: two max batches")
    parser.add_argument(
        "--working", action="append", default=[], help="NAME=GB_AT_ONE_ROW,GB_PER_ROW: working memory given directly"
    )
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument("--reserve-gb", type=float, default=3.0, help="CUDA context, workspace, the process")
    parser.add_argument("--context", type=int, default=8192, help="committed tokens per row")
    parser.add_argument("--weight-bytes", type=float, default=1.0, help="per quantized GEMM weight (FP8: 1)")
    parser.add_argument("--other-bytes", type=float, default=2.0, help="per other weight (embedding, router: bf16)")
    parser.add_argument("--kv-bytes", type=float, default=2.0, help="per K/V element (bf16)")
    parser.add_argument("--bandwidth", type=float, default=3.35, help="TB/s (H100 SXM)")
    parser.add_argument("--tflops", type=float, default=989.0, help="dense GEMM TFLOP/s at the weights' precision")
    parser.add_argument("--steps-per-canvas", type=int, default=48)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = capacity(args)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
