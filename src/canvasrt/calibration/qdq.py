"""FP8 (E4M3) Q/DQ graphs from calibrated ranges, rewritten on the graph proto with the weights streamed through.

Every GEMM whose weight matches `fp8.QUANTIZED` (the backbone's) or `fp8.VISION_QUANTIZED` (the vision graph's,
calibrated only with `--quantize-vision`) and has a calibrated range gets QuantizeLinear/DequantizeLinear on its
activation input (one scale per tensor, as an FP8 GEMM reads its activations) and an FP8 weight initializer behind a
DequantizeLinear (one scale per row of the initializer, or one per tensor): per output channel for 2-D weights,
the linear layers' and the dense experts' (whose down-projection weight is [hidden, experts x features]), per
expert for the grouped formulation's batched expert weights. Zero points are FP8 zeros (opset 21), so ONNX
Runtime's CPU provider runs the graphs and TensorRT builds them strongly typed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from ..core.errors import ArtifactError
from ..exporter.export import DATA_ALIGNMENT, WRAPPER_PREFIX
from ..model.checkpoint import COPY_BLOCK
from ..model.fp8 import E4M3_MAX, QUANTIZED, VISION_QUANTIZED, scale_for

WEIGHT_MODES = ("per-channel", "per-tensor")
BLOCK_BYTES = COPY_BLOCK  # of a weight read, quantized and written at a time


def read_graph(path: Path, load_external_data: bool = True) -> onnx.ModelProto:
    """onnx.load with a one-line error for a file that is no ONNX graph: empty, truncated or something else."""
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ArtifactError(f"{path} is not a readable ONNX graph ({reason}); re-run `canvasrt export`") from None
    if not model.graph.node:
        raise ArtifactError(f"{path} holds no ONNX graph (empty or not ONNX); re-run `canvasrt export`")
    return model


def quantize_graph(source: Path, destination: Path, amax: dict[str, Any], weights: str) -> list[str]:
    """Writes the Q/DQ version of one graph; returns the quantized weight names.

    The graph proto is read without its external data and every weight passes through in blocks of BLOCK_BYTES
    (read, quantized where it is a calibrated GEMM weight, written to `<graph>.onnx.data` at a page-aligned
    offset), so the peak memory does not grow with the weights: at the released width one expert tensor alone is
    2 GB in fp32."""
    model = read_graph(source, load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    store = _WeightStore(source.parent, destination if external else None)
    nodes, created, done = [], [], []
    readers: dict[str, int] = {}  # GEMMs seen per quantized weight (the dense experts' runs share theirs)
    for node in graph.node:
        if node.op_type == "Gemm":
            w_index, x_index = 1, 0
        elif node.op_type == "MatMul" and node.input[0] in initializers:
            w_index, x_index = 0, 1
        else:
            nodes.append(node)
            continue
        name = node.input[w_index].removeprefix(WRAPPER_PREFIX)
        weight = initializers.get(node.input[w_index])
        if weight is None or not (QUANTIZED.search(name) or VISION_QUANTIZED.search(name)) or name not in amax:
            nodes.append(node)
            continue
        dtype = helper.tensor_dtype_to_np_dtype(weight.data_type)
        act_amax = np.asarray(amax[name], dtype=np.float32)
        # A weight read by several GEMMs is quantized once and dequantized once; each reader quantizes its own
        # input with the weight's one input scale.
        reader = readers.get(name, 0)
        readers[name] = reader + 1
        suffix = f".{reader}" if reader else ""
        nodes += _qdq_activation(node.input[x_index], name, act_amax, dtype, created, suffix)
        if not reader:
            nodes += _dq_weight(store, weight, name, weights, dtype, created)
            done.append(name)
        node.input[x_index], node.input[w_index] = f"{name}.input_qdq{suffix}", f"{name}.dequantized"
        nodes.append(node)
    used = _consumed(nodes) | {o.name for o in graph.output}
    kept = [store.copy(t) for t in graph.initializer if t.name in used]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + created)
    store.close()
    default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    default.version = max(default.version, 21)
    onnx.save(model, str(destination))
    onnx.checker.check_model(str(destination), full_check=True)
    return done


def _consumed(nodes: list[onnx.NodeProto]) -> set[str]:
    """Every tensor name the nodes read, subgraphs (If/Loop bodies) included."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= _consumed(list(sub.node))
    return names


class _WeightStore:
    """Reads initializers of the source graph in row blocks and writes those of the new graph: into
    `<destination>.data` at DATA_ALIGNMENT offsets (as the exporter lays them out, so ONNX Runtime maps them),
    or inline when `destination` is None (graphs exported without external data)."""

    def __init__(self, source_dir: Path, destination: Path | None):
        self.source_dir = source_dir
        self.location = None if destination is None else destination.name + ".data"
        self.data = None if destination is None else open(destination.with_name(self.location), "wb")

    def close(self) -> None:
        if self.data is not None:
            self.data.close()

    def rows(self, tensor: onnx.TensorProto) -> Iterator[tuple[slice, np.ndarray]]:
        """The tensor's values as consecutive blocks of whole rows (first axis) of at most BLOCK_BYTES each (one
        row at least), with the rows each block covers."""
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        shape = tuple(tensor.dims) or (1,)  # a scalar as one row
        row_shape = shape[1:]
        row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize)
        per_block = max(1, BLOCK_BYTES // row_bytes)
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            values = numpy_helper.to_array(tensor).reshape(shape)
            for begin in range(0, shape[0], per_block):
                rows = slice(begin, min(begin + per_block, shape[0]))
                yield rows, values[rows]
            return
        info = {entry.key: entry.value for entry in tensor.external_data}
        path = self.source_dir / info["location"]
        try:
            with open(path, "rb") as src:
                src.seek(int(info.get("offset", 0)))
                for begin in range(0, shape[0], per_block):
                    rows = slice(begin, min(begin + per_block, shape[0]))
                    count = (rows.stop - rows.start) * row_bytes
                    block = src.read(count)
                    if len(block) != count:
                        raise ArtifactError(
                            f"{path} ends inside weight {tensor.name}; the file is truncated: re-run `canvasrt export`"
                        )
                    yield rows, np.frombuffer(block, dtype=dtype).reshape(-1, *row_shape)
        except OSError as exc:
            raise ArtifactError(
                f"cannot read weight {tensor.name} from {path} ({exc.strerror or exc}); re-run `canvasrt export`"
            ) from None

    def write(self, name: str, data_type: int, dims: tuple[int, ...], blocks: Iterable[bytes]) -> onnx.TensorProto:
        tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
        if self.data is None:
            tensor.raw_data = b"".join(blocks)
            return tensor
        self.data.write(b"\0" * (-self.data.tell() % DATA_ALIGNMENT))
        offset = self.data.tell()
        for block in blocks:
            self.data.write(block)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", self.data.tell() - offset)):
            tensor.external_data.add(key=key, value=str(value))
        return tensor

    def copy(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """An initializer kept as it is; external ones are copied block by block into the new data file."""
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return tensor
        return self.write(
            tensor.name,
            tensor.data_type,
            tuple(tensor.dims),
            (np.ascontiguousarray(block).tobytes() for _, block in self.rows(tensor)),
        )


def _fp8_constant(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(_to_fp8(values), name)


def _to_fp8(values: np.ndarray) -> np.ndarray:
    clipped = np.clip(values, -E4M3_MAX, E4M3_MAX)  # E4M3FN has no infinity: overflow would become NaN
    return clipped.astype(ml_dtypes.float8_e4m3fn)


def _qdq_activation(
    x: str, name: str, amax: np.ndarray, dtype: Any, created: list[onnx.TensorProto], suffix: str = ""
) -> list[onnx.NodeProto]:
    """The Q/DQ pair on a GEMM's input x; `suffix` names the pair of a further reader of the same weight, which
    shares the first reader's scale."""
    scale, zero = f"{name}.input_scale", f"{name}.input_zero_point"
    if not suffix:
        created += [
            numpy_helper.from_array(np.asarray(scale_for(amax), dtype=dtype), scale),
            _fp8_constant(zero, np.zeros(amax.shape, np.float32)),
        ]
    return [
        helper.make_node(
            "QuantizeLinear", [x, scale, zero], [f"{name}.input_fp8{suffix}"], name=f"{name}.input_quantize{suffix}"
        ),
        helper.make_node(
            "DequantizeLinear",
            [f"{name}.input_fp8{suffix}", scale, zero],
            [f"{name}.input_qdq{suffix}"],
            name=f"{name}.input_dequantize{suffix}",
        ),
    ]


def _dq_weight(
    store: _WeightStore, weight: onnx.TensorProto, name: str, mode: str, dtype: Any, created: list[onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """The FP8 weight (one pass for its ranges, one to write it) and its DequantizeLinear."""
    shape = tuple(weight.dims)
    row_amax = np.concatenate(
        [np.abs(block.astype(np.float32)).reshape(block.shape[0], -1).max(axis=1) for _, block in store.rows(weight)]
    )
    if mode == "per-tensor":
        scale = scale_for(np.float32(row_amax.max()))
        attrs: dict[str, Any] = {}
        row_scale = np.full(shape[0], scale, dtype=np.float32)
    else:  # one scale per row: output channel of a 2-D weight [out, in], expert of a batched one [E, ...]
        scale = scale_for(row_amax)
        attrs = {"axis": 0}
        row_scale = scale
    trailing = [1] * (len(shape) - 1)
    blocks = (
        _to_fp8(block.astype(np.float32) / row_scale[rows].reshape(-1, *trailing)).tobytes()
        for rows, block in store.rows(weight)
    )
    fp8, scale_name, zero = f"{name}.fp8", f"{name}.scale", f"{name}.zero_point"
    created += [
        store.write(fp8, onnx.TensorProto.FLOAT8E4M3FN, shape, blocks),
        numpy_helper.from_array(np.asarray(scale, dtype=dtype), scale_name),
        _fp8_constant(zero, np.zeros(np.shape(scale), np.float32)),
    ]
    return [
        helper.make_node(
            "DequantizeLinear", [fp8, scale_name, zero], [f"{name}.dequantized"], name=f"{name}.dequantize", **attrs
        )
    ]
