"""Roofline lower bound of one denoising step, counted from an exported backbone graph's shapes.

Reads `backbone.onnx` of an artifact directory without its weights (the graph proto and the initializers' shapes),
fixes the shapes of a denoising step (the batch, no encoder tokens, a canvas of rows), runs ONNX shape inference,
and counts for every GEMM (MatMul, Gemm) its FLOPs, and as bytes the weight each GEMM node reads and the K/V slots
the step reads (those covering `--context` committed tokens). A weight that several nodes read counts once for each:
the dense experts' in their runs of tokens (up to `DENSE_PIECES`; a run on zero rows reads nothing), the embedding in
the LM head and in the self-conditioning product. Activations are left out, so the bytes are a lower bound too.
Counts are attributed per layer (weights by name, activation GEMMs by the exporter's module scope) and
scaled per layer kind to `--layers` layers in the released pattern (five sliding layers, then one full, the last
layer full): export the released width with a few layers (`canvasrt random-checkpoint DIR --preset released
--layers 2`, then `canvasrt export`) and count the 30-layer model from it.

Two MoE formulations from the same graph:
- dense: what the graph runs, every expert on every token (the dense export);
- routed: each token through its top-k experts only (what `sparse` and, at perfect balance, `grouped` run): the
  expert GEMMs' FLOPs times k / experts; each expert weight read once, times the expected share of experts that at
  least one of the step's tokens is routed to under uniform routing, 1 - (1 - k / experts) ** tokens.

The defaults are an H100 SXM: 3.35 TB/s, 989 dense FP8 TFLOP/s, GEMM weights in FP8 (1 byte; the embedding, which
is also the LM head, and the router in bf16) and a bf16 K/V cache. Prints a table, or JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import shape_inference

from canvasrt.core.config import FULL, SLIDING
from canvasrt.core.contract import kv_spans, span_dim
from canvasrt.core.manifest import ArtifactManifest
from canvasrt.exporter.embedding import chunk_source
from canvasrt.model.fp8 import QUANTIZED

WRAPPER_PREFIX = "model."
LAYER = re.compile(r"(?:^|[./_])layers[._](\d+)[._]")
SCOPE_KEYS = ("pkg.torch.onnx.name_scopes", "namespace")
SHARED = "shared"  # embedding, self-conditioning, final norm, LM head, sampler: once per step
FOLD_ROUNDS = 8  # shape inference and folding alternate until nothing more folds
# Shape values are a few integers; anything larger is data, left to the graph.
FOLD_ELEMENTS = 64


def released_pattern(layers: int) -> list[str]:
    """The released layer kinds cut to `layers`: (5 sliding + 1 full) repeated, the last layer full."""
    kinds = [FULL if i % 6 == 5 else SLIDING for i in range(layers)]
    kinds[-1] = FULL
    return kinds


def _denoise_shapes(model: onnx.ModelProto, batch: int, canvas: int, spans: dict[str, int]) -> onnx.ModelProto:
    sizes = {"batch": batch, "chunk": 0, "rows": canvas, **spans}  # the denoise phase of the backbone
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
    del model.graph.value_info[:]  # the exporter's symbolic shapes; inference redoes them at these sizes
    for _ in range(FOLD_ROUNDS):
        model = shape_inference.infer_shapes(model, data_prop=True)
        if not _fold_shape_values(model):
            return model
    return model


def _fold_shape_values(model: onnx.ModelProto) -> bool:
    """Replaces every small node output that is computable from static shapes and constants (the shape arithmetic
    of a Reshape target, say, which ONNX's data propagation does not follow through every op) by an initializer.
    Weights stay untouched: external initializers are never read. Returns whether anything was folded."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    shapes = _shapes(model)
    values = {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(t.dims)) <= FOLD_ELEMENTS
    }
    kept, folded = [], []
    for node in model.graph.node:
        known = node.op_type == "Shape" and node.input[0] in shapes
        if not known and (not node.input or not all(i in values for i in node.input if i)):
            kept.append(node)
            continue
        if node.op_type == "Shape":
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            outputs = [np.asarray(shapes[node.input[0]][start:end], dtype=np.int64)]
        else:
            outputs = ReferenceEvaluator(node).run(None, {i: values[i] for i in node.input if i})
        if any(np.asarray(o).size > FOLD_ELEMENTS for o in outputs):
            kept.append(node)
            continue
        for name, value in zip(node.output, outputs):
            values[name] = np.asarray(value)
            folded.append(numpy_helper.from_array(np.asarray(value), name))
    if not folded:
        return False
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(folded)
    return True


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def gemm_flops(op: str, a: tuple[int, ...], b: tuple[int, ...], attrs: dict[str, int]) -> int:
    """2 x multiply-adds of one MatMul (NumPy broadcasting over leading dims) or Gemm (2-D, transA/transB)."""
    if op == "Gemm":
        m, k = (a[1], a[0]) if attrs.get("transA") else a
        n = b[0] if attrs.get("transB") else b[1]
        return 2 * m * n * k
    a2, b2 = (a if len(a) > 1 else (1, *a)), (b if len(b) > 1 else (*b, 1))
    batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    return 2 * int(np.prod(batch, dtype=np.int64)) * a2[-2] * a2[-1] * b2[-1]


def _layer_of(names: list[str]) -> str:
    for name in names:
        found = LAYER.search(name)
        if found:
            return found.group(1)
    return SHARED


def count_graph(path: Path, batch: int, canvas: int, spans: dict[str, int]) -> dict[str, Any]:
    """Every GEMM of the graph (node, op, weight, layer, expert, FLOPs) and the K/V inputs' element counts."""
    model = _denoise_shapes(onnx.load(str(path), load_external_data=False), batch, canvas, spans)
    shapes = _shapes(model)
    initializers = {t.name for t in model.graph.initializer}
    # A weight may reach its GEMM as a part of a larger one: a Slice of an initializer, or a vocabulary chunk of the
    # embedding stored as an initializer of its own (`split_embedding`); either is counted under the whole's name.
    sliced = {
        node.output[0]: node.input[0]
        for node in model.graph.node
        if node.op_type == "Slice" and node.input[0] in initializers
    }
    sliced.update({name: whole for name in initializers if (whole := chunk_source(name))})
    gemms = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = (shapes.get(name) for name in node.input[:2])
        if a is None or b is None:
            raise SystemExit(
                f"{path}: no static shape for the inputs of {node.name} at batch {batch}; "
                "is this an export with data-dependent shapes (sparse or grouped MoE)? count the dense one"
            )
        attrs = {attr.name: attr.i for attr in node.attribute}
        tensor = next((n for n in node.input[:2] if n in initializers or n in sliced), None)
        weight = sliced.get(tensor, tensor).removeprefix(WRAPPER_PREFIX) if tensor else None
        scope = [p.value for p in node.metadata_props if p.key in SCOPE_KEYS]
        gemms.append(
            {
                "node": node.name,
                "op": node.op_type,
                "weight": weight,
                "weight_tensor": tensor,  # the initializer or the part of one read
                "weight_elements": int(np.prod(shapes[tensor])) if tensor else 0,
                "layer": _layer_of([weight or "", *scope, node.name]),
                "expert": bool(weight and ".experts." in weight),
                "flops": gemm_flops(node.op_type, a, b, attrs),
            }
        )
    kv = {value.name: int(np.prod(shapes[value.name])) for value in model.graph.input if value.name.startswith("past_")}
    return {"gemms": gemms, "kv": kv}


def _per_layer(
    counted: dict[str, Any], weight_bytes: float, other_bytes: float, kv_bytes: float
) -> dict[str, dict[str, float]]:
    """FLOPs and bytes per layer ('shared' for the rest), experts apart from everything else. A GEMM node reads its
    weight once, a node on zero rows (a run of tokens past the step's) none; `expert_weight_bytes` counts each expert
    weight once, as a formulation that reads every weight in one GEMM (the routed one) does."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    seen = set()
    for g in counted["gemms"]:
        part = "expert" if g["expert"] else "other"
        totals[g["layer"]][f"{part}_flops"] += g["flops"]
        if g["weight"] and g["flops"]:
            size = g["weight_elements"] * (weight_bytes if QUANTIZED.search(g["weight"]) else other_bytes)
            totals[g["layer"]][f"{part}_bytes"] += size
            if g["expert"] and g["weight_tensor"] not in seen:
                seen.add(g["weight_tensor"])
                totals[g["layer"]]["expert_weight_bytes"] += size
    for name, elements in counted["kv"].items():
        totals[name.rsplit("_", 1)[1]]["other_bytes"] += elements * kv_bytes
    return totals


def context_spans(manifest: ArtifactManifest, context: int) -> dict[str, int]:
    """The K/V span dims a step at `context` committed tokens is fed (what the runtime's kv_spans picks)."""
    spans = kv_spans(manifest.kv_layout, manifest.capacity, context)
    return {
        dim: span
        for layer, span in zip(manifest.kv_layout, spans)
        if isinstance(dim := span_dim(layer, manifest.capacity), str)
    }


def _scaled_step(per_layer: dict[str, dict[str, float]], kinds: list[str], target: list[str]) -> dict[str, float]:
    """One step's counts at the `target` layer pattern: the shared part once, plus each target layer as the mean of
    the exported layers of its kind."""
    fields = ("expert_flops", "other_flops", "expert_bytes", "expert_weight_bytes", "other_bytes")
    by_kind = {
        kind: {f: float(np.mean([per_layer[str(i)][f] for i, k in enumerate(kinds) if k == kind])) for f in fields}
        for kind in set(kinds)
    }
    return {f: per_layer[SHARED][f] + sum(by_kind[kind][f] for kind in target) for f in fields}


def _bound(
    flops: float,
    moved: float,
    expert_flops: float,
    expert_bytes: float,
    tokens: int,
    steps_per_canvas: int,
    bandwidth: float,
    tflops: float,
) -> dict[str, Any]:
    """The roofline of one step: the slower of its compute at `tflops` and its bytes at `bandwidth` (TB/s)."""
    compute_ms, memory_ms = flops / (tflops * 1e12) * 1e3, moved / (bandwidth * 1e12) * 1e3
    bound = max(compute_ms, memory_ms)
    return {
        "gflop": flops / 1e9,
        "expert_gflop": expert_flops / 1e9,
        "gbyte": moved / 1e9,
        "expert_gbyte": expert_bytes / 1e9,
        "compute_ms": compute_ms,
        "memory_ms": memory_ms,
        "step_ms": bound,
        "bound_by": "compute" if compute_ms >= memory_ms else "memory",
        "canvas_positions_per_s": tokens / bound * 1e3,
        "tokens_per_s": tokens / (steps_per_canvas * bound) * 1e3,
    }


def roofline(
    artifacts: Path,
    layers: int,
    batch: int,
    bandwidth: float,
    tflops: float,
    weight_bytes: float,
    other_bytes: float,
    kv_bytes: float,
    steps_per_canvas: int,
    context: int | None = None,
) -> dict[str, Any]:
    manifest = ArtifactManifest.load(artifacts)
    config = manifest.model
    context = manifest.capacity.max_context if context is None else context
    if not 0 <= context <= manifest.capacity.max_context:
        raise SystemExit(f"--context {context} is outside the artifacts' 0..{manifest.capacity.max_context}")
    counted = count_graph(
        manifest.graph_path("backbone"), batch, manifest.capacity.canvas, context_spans(manifest, context)
    )
    kinds = [spec.kind for spec in config.layers]
    target = released_pattern(layers)
    missing = sorted(set(target) - set(kinds))
    if missing:
        raise SystemExit(f"{artifacts} has no {' or '.join(missing)} layer to scale from; export at least one of each")
    step = _scaled_step(_per_layer(counted, weight_bytes, other_bytes, kv_bytes), kinds, target)
    tokens = batch * manifest.capacity.canvas
    share = config.top_k_experts / config.num_experts
    hit = 1.0 - (1.0 - share) ** tokens
    formulations = {
        "dense": (step["expert_flops"], step["expert_bytes"]),
        "routed": (step["expert_flops"] * share, step["expert_weight_bytes"] * hit),
    }
    rows = {
        name: _bound(
            step["other_flops"] + expert_flops,
            step["other_bytes"] + expert_bytes,
            expert_flops,
            expert_bytes,
            tokens,
            steps_per_canvas,
            bandwidth,
            tflops,
        )
        for name, (expert_flops, expert_bytes) in formulations.items()
    }
    return {
        "artifacts": str(artifacts),
        "exported_layers": len(kinds),
        "layers": layers,
        "layer_kinds": {SLIDING: target.count(SLIDING), FULL: target.count(FULL)},
        "batch": batch,
        "canvas": manifest.capacity.canvas,
        "max_context": manifest.capacity.max_context,
        "context": context,
        "steps_per_canvas": steps_per_canvas,
        "experts_hit_share": hit,
        "device": {
            "bandwidth_tb_s": bandwidth,
            "tflops": tflops,
            "weight_bytes": weight_bytes,
            "other_weight_bytes": other_bytes,
            "kv_bytes": kv_bytes,
        },
        "formulations": rows,
        "gemms": counted["gemms"],
    }


def _table(result: dict[str, Any]) -> str:
    head = (
        f"{result['layers']} layers ({result['layer_kinds'][SLIDING]} sliding, {result['layer_kinds'][FULL]} full) "
        f"scaled from {result['exported_layers']} exported; batch {result['batch']}, canvas {result['canvas']}, "
        f"context {result['context']} of {result['max_context']}; {result['device']['bandwidth_tb_s']} TB/s, "
        f"{result['device']['tflops']} TFLOP/s"
    )
    lines = [
        head,
        f"{'formulation':<12}{'GFLOP':>10}{'experts':>10}{'GB':>9}{'compute ms':>12}{'memory ms':>11}"
        f"{'step ms':>9}  {'bound':<8}{'tokens/s':>10}",
    ]
    for name, r in result["formulations"].items():
        lines.append(
            f"{name:<12}{r['gflop']:>10.1f}{r['expert_gflop']:>10.1f}{r['gbyte']:>9.2f}{r['compute_ms']:>12.3f}"
            f"{r['memory_ms']:>11.3f}{r['step_ms']:>9.3f}  {r['bound_by']:<8}{r['tokens_per_s']:>10.0f}"
        )
    lines.append(
        f"tokens/s at {result['steps_per_canvas']} steps per canvas; experts hit per layer (routed, uniform): "
        f"{100 * result['experts_hit_share']:.2f}%"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, help="an artifact directory of `canvasrt export` (dense MoE)")
    parser.add_argument("--layers", type=int, default=30, help="layers to scale to, in the released pattern")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bandwidth", type=float, default=3.35, help="memory bandwidth, TB/s")
    parser.add_argument("--tflops", type=float, default=989.0, help="dense GEMM TFLOP/s at the weights' precision")
    parser.add_argument("--weight-bytes", type=float, default=1.0, help="bytes per quantized GEMM weight (FP8: 1)")
    parser.add_argument("--other-bytes", type=float, default=2.0, help="bytes per other weight (embedding, router)")
    parser.add_argument("--kv-bytes", type=float, default=2.0, help="bytes per K/V element")
    parser.add_argument("--steps-per-canvas", type=int, default=48, help="denoising steps per committed canvas")
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="committed tokens the step attends to (default: the artifacts' max context)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (every GEMM included)")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.batch < 1 or args.steps_per_canvas < 1:
        parser.error("--layers, --batch and --steps-per-canvas must be at least 1")
    result = roofline(
        args.artifacts,
        args.layers,
        args.batch,
        args.bandwidth,
        args.tflops,
        args.weight_bytes,
        args.other_bytes,
        args.kv_bytes,
        args.steps_per_canvas,
        args.context,
    )
    print(json.dumps(result, indent=1) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
