"""What a denoising step keeps alive, counted from an exported backbone graph's shapes.

Reads `backbone.onnx` of an artifact directory without its weights, fixes the shapes of a denoising step at two row
counts (`scripts/roofline.py`'s shape fixing: the batch, no encoder tokens, a canvas of rows, the K/V spans of
`--context` committed tokens) and walks the nodes in graph order as a sequential executor does: every node output
is allocated when its node runs and freed after its last consumer (graph outputs stay); weights, what is computed
from weights alone (folded when a session loads) and graph inputs are not counted. Prints the peak of the live
bytes at each row count, the growth per added row, the largest tensors, and the tensors alive at the peak grouped by
the module and source line that produced them, largest first.

It is a model of the exported graph, not of ONNX Runtime's optimised one: fusions, in-place kernels, the
memory arena's rounding and the session's execution order (its default order moves nodes; canvasrt's sessions keep
the graph's order where they can, `ExecutionOrder.PRIORITY_BASED`) change the figures (`canvasrt bench --json`
measures the process), but it names what is alive per row and how much.

    python scripts/working_memory.py ART [--rows 1 --rows 4] [--context 16] [--top 12] [--json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from canvasrt.core.manifest import ArtifactManifest
from roofline import _denoise_shapes, _shapes, context_spans

ITEM_BYTES = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.INT64: 8,
    onnx.TensorProto.INT32: 4,
    onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.FLOAT8E4M3FN: 1,
    onnx.TensorProto.DOUBLE: 8,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT8: 1,
}

VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def _scope(node: onnx.NodeProto) -> str:
    """Where the node came from: the innermost module of the exporter's name scopes and the last source line of
    its stack trace, or its op type."""
    props = {prop.key: prop.value for prop in node.metadata_props}
    scopes = props.get("pkg.torch.onnx.name_scopes", "")
    modules = re.findall(r"'([^']*)'", scopes)[:-1]
    lines = re.findall(r'File "[^"]*/([^/"]+)", line (\d+)', props.get("pkg.torch.onnx.stack_trace", ""))
    where = f"{lines[-1][0]}:{lines[-1][1]}" if lines else node.op_type
    return f"{modules[-1] if modules and modules[-1] else 'model'} ({where})"


def liveness(path: Path, rows_batch: int, canvas: int, spans: dict[str, int]) -> dict[str, Any]:
    """The peak live bytes of one denoising step at batch `rows_batch`, and what is alive at the peak."""
    model = _denoise_shapes(onnx.load(str(path), load_external_data=False), rows_batch, canvas, spans)
    shapes = _shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    # Weights, and what a session computes from weights alone once when it loads (ONNX Runtime's constant folding:
    # the embedding's vocabulary chunks, say), are not working memory.
    constant = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if all(name in constant for name in node.input if name):
            constant.update(node.output)
    fixed = constant | {v.name for v in model.graph.input}
    outputs = {v.name for v in model.graph.output}
    # A view's output shares its input's buffer: it keeps the buffer alive, it does not add to it.
    root: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in VIEWS and node.input and node.input[0] not in fixed:
            root[node.output[0]] = root.get(node.input[0], node.input[0])
    last_use: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            last_use[root.get(name, name)] = index
            if name in outputs:
                last_use[root.get(name, name)] = len(model.graph.node)
    live: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    current = peak = 0
    at_peak: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    largest: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    unknown = 0
    for index, node in enumerate(model.graph.node):
        scope = _scope(node)
        for name in node.output:
            if not name or name in fixed or name in root:
                continue
            shape = shapes.get(name)
            if shape is None:
                unknown += 1
                continue
            size = int(np.prod(shape, dtype=np.int64)) * ITEM_BYTES.get(types.get(name, onnx.TensorProto.FLOAT), 4)
            live[name] = (size, f"{scope} {node.op_type}", shape)
            current += size
            last_use.setdefault(name, len(model.graph.node) if name in outputs else index)
        for name in node.output:
            if name in live and live[name][0] > largest.get(name, (0, "", ()))[0]:
                largest[name] = live[name]
        if current > peak:
            peak, at_peak = current, dict(live)
        for name in [n for n in live if last_use[n] <= index]:
            current -= live.pop(name)[0]
    return {"peak_bytes": peak, "alive_at_peak": at_peak, "largest": largest, "tensors_without_shape": unknown}


def working_memory(artifacts: Path, rows: list[int], context: int, top: int) -> dict[str, Any]:
    manifest = ArtifactManifest.load(artifacts)
    canvas = manifest.capacity.canvas
    spans = context_spans(manifest, context)
    counted = {n: liveness(manifest.graph_path("backbone"), n, canvas, spans) for n in rows}
    low, high = min(rows), max(rows)
    largest = counted[high]["alive_at_peak"]
    grouped: dict[str, list[int]] = defaultdict(list)
    for size, label, shape in largest.values():
        grouped[f"{label} {list(shape)}"].append(size)
    ranked = sorted(grouped.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "artifacts": str(artifacts),
        "vocab_chunk": manifest.vocab_chunk,
        "context": context,
        "peak_bytes": {str(n): counted[n]["peak_bytes"] for n in rows},
        "per_added_row_bytes": (counted[high]["peak_bytes"] - counted[low]["peak_bytes"]) / (high - low)
        if high > low
        else None,
        "alive_at_peak": [{"tensor": label, "count": len(s), "bytes": sum(s)} for label, s in ranked],
        "alive_at_peak_rows": high,
        "largest": [
            {"tensor": label, "shape": list(shape), "bytes": size}
            for size, label, shape in sorted(counted[high]["largest"].values(), key=lambda item: -item[0])[:top]
        ],
        "tensors_without_shape": counted[high]["tensors_without_shape"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--rows", type=int, action="append", help="row counts (default: 1 and 4)")
    parser.add_argument("--context", type=int, default=16, help="committed tokens of context per row (default 16)")
    parser.add_argument("--top", type=int, default=12, help="how many groups of live tensors to list")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = working_memory(args.artifacts, args.rows or [1, 4], args.context, args.top)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for rows, size in result["peak_bytes"].items():
        print(f"peak live at {rows} rows: {size / 1e9:.3f} GB")
    if result["per_added_row_bytes"] is not None:
        print(f"per added row: {result['per_added_row_bytes'] / 1e9:.3f} GB")
    print(f"largest tensors, {result['alive_at_peak_rows']} rows:")
    for entry in result["largest"][:5]:
        print(f"  {entry['bytes'] / 1e6:10.1f} MB  {entry['tensor']} {entry['shape']}")
    print(f"alive at the peak, {result['alive_at_peak_rows']} rows:")
    for entry in result["alive_at_peak"]:
        print(f"  {entry['bytes'] / 1e6:10.1f} MB  {entry['count']:>3} x {entry['tensor']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
