"""TensorRT engine building for exported graphs, one code path for `tensorrt` and `tensorrt_rtx`.

Polygraphy's TensorRT loaders drive either flavour: with POLYGRAPHY_USE_TENSORRT_RTX=1 set before
`polygraphy.backend.trt` is first imported they use tensorrt_rtx, whose builder compiles ahead of time for a named
compute capability without a GPU. Networks are strongly typed (precision lives in the graph: casts and Q/DQ), and
each graph gets the optimization profiles its manifest entry declares.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .errors import CanvasrtError

FLAVOURS = ("tensorrt", "tensorrt-rtx")
RTX_TARGETS = {"sm75": (7, 5), "sm80": (8, 0), "sm86": (8, 6), "sm89": (8, 9), "sm120": (12, 0), "sm121": (12, 1)}


def _polygraphy_trt(flavour: str) -> Any:
    wanted = "1" if flavour == "tensorrt-rtx" else "0"
    loaded = "polygraphy.backend.trt" in sys.modules
    if loaded and os.environ.get("POLYGRAPHY_USE_TENSORRT_RTX", "0") != wanted:
        raise CanvasrtError(f"this process already loaded Polygraphy for the other TensorRT flavour; build {flavour} "
                            "engines in a separate process")
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = wanted
    try:
        from polygraphy.backend import trt
    except ImportError as exc:
        package = "tensorrt-rtx" if flavour == "tensorrt-rtx" else "tensorrt"
        raise CanvasrtError(f"building with {flavour} needs the {package} package ({exc}); install canvasrt[rtx] or [gpu]") from None
    return trt


def profiles_for(graph: dict[str, Any]) -> list[Any]:
    """Polygraphy Profiles from a manifest graph entry: static dims as declared, symbolic dims per profile."""
    from polygraphy.backend.trt import Profile

    profiles = []
    for dims in graph["profiles"].values():
        profile = Profile()
        for spec in graph["inputs"]:
            shapes = [[d if isinstance(d, int) else dims[d][i] for d in spec["shape"]] for i in range(3)]
            profile.add(spec["name"], min=shapes[0], opt=shapes[1], max=shapes[2])
        profiles.append(profile)
    return profiles


def build_engine(onnx_path: str | Path, graph: dict[str, Any], flavour: str, target: str | None = None) -> bytes:
    """Parses and builds one graph; returns the serialized engine."""
    if flavour not in FLAVOURS:
        raise CanvasrtError(f"unknown builder {flavour!r}; use one of {', '.join(FLAVOURS)}")
    trt_loaders = _polygraphy_trt(flavour)
    network = trt_loaders.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    if flavour == "tensorrt-rtx":
        if target not in RTX_TARGETS:
            raise CanvasrtError(f"TensorRT-RTX targets are {', '.join(RTX_TARGETS)}; got {target!r}")
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        config = CreateConfigRTX(compute_capabilities=[RTX_TARGETS[target]], profiles=profiles_for(graph))
    else:
        config = trt_loaders.CreateConfig(profiles=profiles_for(graph))
    try:
        engine = trt_loaders.EngineBytesFromNetwork(network, config=config)()
    except Exception as exc:  # Polygraphy raises its own error type after logging the parser's messages
        raise CanvasrtError(f"{flavour} could not build {Path(onnx_path).name}: {exc}") from None
    return bytes(engine)
