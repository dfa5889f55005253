"""FP8 (E4M3) Q/DQ graphs from calibrated ranges, written with onnx-graphsurgeon.

Every GEMM whose weight matches `ranges.QUANTIZED` gets QuantizeLinear/DequantizeLinear on its activation input
(per tensor; per expert for the expert down-projection, whose input is [experts, features, tokens]) and an FP8
weight initializer behind a DequantizeLinear (per output channel for linear layers, per expert for expert weights,
or one scale per tensor). Zero points are FP8 zeros (opset 21), so ONNX Runtime's CPU provider runs the graphs and
TensorRT builds them strongly typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..core.errors import ArtifactError
from ..model.fp8 import E4M3_MAX, QUANTIZED, scale_for

WEIGHT_MODES = ("per-channel", "per-tensor")
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # it warns that FP8 has no NumPy type, which is expected
WRAPPER_PREFIX = "model."


def _fp8_constant(name: str, values: np.ndarray) -> gs.Constant:
    clipped = np.clip(values, -E4M3_MAX, E4M3_MAX)  # E4M3FN has no infinity: overflow would become NaN
    proto = numpy_helper.from_array(clipped.astype(ml_dtypes.float8_e4m3fn), name)
    return gs.Constant(name, LazyValues(proto))


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
    """Writes the Q/DQ version of one graph; returns the quantized weight names."""
    model = read_graph(source)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in read_graph(source, False).graph.initializer)
    graph = gs.import_onnx(model)
    done = []
    for node in list(graph.nodes):
        if node.op == "Gemm":
            w_index, x_index = 1, 0
        elif node.op == "MatMul" and isinstance(node.inputs[0], gs.Constant):
            w_index, x_index = 0, 1
        else:
            continue
        weight = node.inputs[w_index]
        name = weight.name.removeprefix(WRAPPER_PREFIX)
        if not isinstance(weight, gs.Constant) or not QUANTIZED.search(name) or name not in amax:
            continue
        values = np.asarray(weight.values)
        dtype = values.dtype
        act_amax = np.asarray(amax[name], dtype=np.float32)
        per_expert_act = act_amax.ndim == 1
        node.inputs[x_index] = _qdq_activation(graph, node.inputs[x_index], name, act_amax, dtype, per_expert_act)
        node.inputs[w_index] = _dq_weight(graph, values, name, weights, dtype)
        done.append(name)
    graph.cleanup().toposort()
    exported = gs.export_onnx(graph)
    exported.opset_import[0].version = max(exported.opset_import[0].version, 21)
    if external:
        onnx.save(exported, str(destination), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=destination.name + ".data", size_threshold=1024)
    else:
        onnx.save(exported, str(destination))
    onnx.checker.check_model(str(destination), full_check=True)
    return done


def _qdq_activation(graph: gs.Graph, x: gs.Variable, name: str, amax: np.ndarray, dtype: Any, per_axis: bool) -> gs.Variable:
    scale = gs.Constant(f"{name}.input_scale", np.asarray(scale_for(amax), dtype=dtype))
    zero = _fp8_constant(f"{name}.input_zero_point", np.zeros(amax.shape, np.float32))
    attrs = {"axis": 0} if per_axis else {}
    quantized = gs.Variable(f"{name}.input_fp8")
    restored = gs.Variable(f"{name}.input_qdq", dtype=dtype)
    graph.nodes.append(gs.Node("QuantizeLinear", inputs=[x, scale, zero], outputs=[quantized], attrs=attrs))
    graph.nodes.append(gs.Node("DequantizeLinear", inputs=[quantized, scale, zero], outputs=[restored], attrs=attrs))
    return restored


def _dq_weight(graph: gs.Graph, values: np.ndarray, name: str, mode: str, dtype: Any) -> gs.Variable:
    magnitude = np.abs(values.astype(np.float32))
    if mode == "per-tensor":
        amax = np.float32(magnitude.max())
        scale = scale_for(amax)
        attrs: dict[str, Any] = {}
        broadcast = scale
    else:  # one scale per output channel (linear [out, in]) or per expert (experts [E, ...])
        amax = magnitude.reshape(values.shape[0], -1).max(axis=1)
        scale = scale_for(amax)
        attrs = {"axis": 0}
        broadcast = scale.reshape(-1, *([1] * (values.ndim - 1)))
    fp8 = _fp8_constant(f"{name}.fp8", values.astype(np.float32) / broadcast)
    zero = _fp8_constant(f"{name}.zero_point", np.zeros(np.shape(scale), np.float32))
    restored = gs.Variable(f"{name}.dequantized", dtype=dtype)
    graph.nodes.append(gs.Node("DequantizeLinear", inputs=[fp8, gs.Constant(f"{name}.scale", np.asarray(scale, dtype=dtype)), zero],
                               outputs=[restored], attrs=attrs))
    return restored
