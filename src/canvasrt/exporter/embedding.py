"""The embedding matrix as vocabulary chunks of its own in the backbone graph: one initializer per chunk, together
the whole matrix, each an external-data range of the one copy the data file holds.

The traced graph reads the chunked LM head's and self-conditioning's rows of the tied embedding through Slices of
the one embedding initializer. Runtimes fold a Slice of a constant into a constant of its own: ONNX Runtime into an
anonymous copy of the embedding when a session loads, TensorRT into engine weights (twice: the LM head and the
self-conditioning product read the rows in different layouts). With the chunks as initializers nothing is left to
fold: the GEMMs read the chunks, the token embedding's Gathers become one Gather per chunk (each with the ids that
fall in it), and the whole matrix is no initializer any more. On disk the chunks are consecutive ranges of the
embedding's bytes, stored once as before.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# A chunk's initializer name: the embedding's name and the vocabulary rows [start, end) it holds.
_CHUNK = re.compile(r"^(?P<name>.+)\.rows_(?P<start>\d+)_(?P<end>\d+)$")


def chunk_name(name: str, start: int, end: int) -> str:
    return f"{name}.rows_{start}_{end}"


def chunk_source(name: str) -> str | None:
    """The embedding initializer a chunk initializer is part of (None for any other name)."""
    found = _CHUNK.match(name)
    return found.group("name") if found else None


def split_embedding(path: Path, name: str) -> int:
    """Rewrites the graph file at `path` (external data untouched) so that the embedding initializer `name` is read
    as its vocabulary chunks, where the graph slices it into chunks along the vocabulary; returns the number of
    chunks (0: the graph does not slice it and is left as it was)."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    embedding = initializers.get(name)
    if embedding is None:
        return 0
    vocab, hidden = embedding.dims
    constants = {t.name: t for t in graph.initializer if t.name != name}
    readers = [node for node in graph.node if name in node.input]
    slices = {node.output[0]: _rows(node, constants, vocab) for node in readers if node.op_type == "Slice"}
    gathers = [node for node in readers if node.op_type == "Gather"]
    ranges = sorted(set(slices.values()) - {None})
    if len(ranges) < 2 or None in slices.values() or len(slices) + len(gathers) != len(readers):
        return 0
    if [start for start, _ in ranges] != [0, *(end for _, end in ranges[:-1])] or ranges[-1][1] != vocab:
        return 0  # not a tiling of the vocabulary: leave the graph as traced
    chunks = {rows: _chunk(embedding, *rows, hidden) for rows in ranges}
    renamed = {output: chunks[rows].name for output, rows in slices.items()}
    dtypes = _element_types(graph)
    gathered = {id(node) for node in gathers}
    nodes = []
    for node in graph.node:
        if node.op_type == "Slice" and node.output[0] in renamed:
            continue
        if id(node) in gathered:
            nodes.extend(_gather_per_chunk(node, [(rows, chunks[rows].name) for rows in ranges], dtypes))
            continue
        node.input[:] = [renamed.get(i, i) for i in node.input]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name != name]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *chunks.values()])
    live = [v for v in graph.value_info if v.name not in renamed]
    del graph.value_info[:]
    graph.value_info.extend(live)
    onnx.save(model, str(path))
    return len(ranges)


def _constant(name: str, constants: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    tensor = constants.get(name)
    if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return numpy_helper.to_array(tensor)


def _rows(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], vocab: int) -> tuple[int, int] | None:
    """The vocabulary rows [start, end) a Slice of the embedding takes, when it takes whole rows along axis 0 with
    constant bounds; None otherwise."""
    inputs = list(node.input) + [""] * (5 - len(node.input))
    starts, ends = _constant(inputs[1], constants), _constant(inputs[2], constants)
    axes = _constant(inputs[3], constants) if inputs[3] else np.array([0])
    steps = _constant(inputs[4], constants) if inputs[4] else np.array([1])
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(axes[0]) != 0 or int(steps[0]) != 1:
        return None
    start, end = (min(max(int(v[0]) + (vocab if int(v[0]) < 0 else 0), 0), vocab) for v in (starts, ends))
    return (start, end) if start < end else None


def _chunk(embedding: onnx.TensorProto, start: int, end: int, hidden: int) -> onnx.TensorProto:
    """Rows [start, end) of the embedding as a tensor of their own: a range of its external data, or a copy of
    inline data."""
    name = chunk_name(embedding.name, start, end)
    if embedding.data_location != onnx.TensorProto.EXTERNAL:
        rows = numpy_helper.to_array(embedding)[start:end]
        return numpy_helper.from_array(np.ascontiguousarray(rows), name)
    entries = {entry.key: entry.value for entry in embedding.external_data}
    row_bytes = int(entries["length"]) // embedding.dims[0]
    chunk = onnx.TensorProto(name=name, data_type=embedding.data_type, dims=[end - start, hidden])
    chunk.data_location = onnx.TensorProto.EXTERNAL
    placed = {
        **entries,
        "offset": str(int(entries.get("offset", "0")) + start * row_bytes),
        "length": str((end - start) * row_bytes),
    }
    for key, value in placed.items():
        entry = chunk.external_data.add()
        entry.key, entry.value = key, value
    return chunk


def _element_types(graph: onnx.GraphProto) -> dict[str, int]:
    values = [*graph.input, *graph.value_info, *graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}


def _gather_per_chunk(
    node: onnx.NodeProto, chunks: list[tuple[tuple[int, int], str]], dtypes: dict[str, int]
) -> list[onnx.NodeProto]:
    """Gather(embedding, ids) as one Gather per chunk (two at least), each with the ids inside the chunk (others read
    its row 0), the rows then taken from the chunk each id falls in."""
    ids, out = node.input[1], node.output[0]
    index_type = dtypes.get(ids, onnx.TensorProto.INT64)
    numpy_type = helper.tensor_dtype_to_np_dtype(index_type)
    prefix = f"{node.name or out}/chunk"
    made = []

    def const(value: int | list[int], suffix: str, dtype: np.dtype = numpy_type) -> str:
        made.append(
            helper.make_node(
                "Constant", [], [f"{prefix}/{suffix}"], value=numpy_helper.from_array(np.asarray(value, dtype=dtype))
            )
        )
        return made[-1].output[0]

    zero = const(0, "zero")
    last = const([-1], "last_axis", np.dtype(np.int64))
    rows = ""
    for i, ((start, end), chunk) in enumerate(chunks):
        p = f"{prefix}{i}"
        low, high = const(start, f"{i}/start"), const(end, f"{i}/end")
        made += [
            helper.make_node("GreaterOrEqual", [ids, low], [f"{p}/above"]),
            helper.make_node("Less", [ids, high], [f"{p}/below"]),
            helper.make_node("And", [f"{p}/above", f"{p}/below"], [f"{p}/inside"]),
            helper.make_node("Sub", [ids, low], [f"{p}/local"]),
            helper.make_node("Where", [f"{p}/inside", f"{p}/local", zero], [f"{p}/index"]),
        ]
        gathered = f"{p}/rows"
        made.append(helper.make_node("Gather", [chunk, f"{p}/index"], [gathered], axis=0))
        if i == 0:
            rows = gathered
            continue
        merged = out if i == len(chunks) - 1 else f"{p}/merged"
        made += [
            helper.make_node("Unsqueeze", [f"{p}/inside", last], [f"{p}/mask"]),
            helper.make_node("Where", [f"{p}/mask", gathered, rows], [merged]),
        ]
        rows = merged
    return made
