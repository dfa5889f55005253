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
        from polygraphy.logger import G_LOGGER

        G_LOGGER.severity = G_LOGGER.ERROR  # parser errors still show; the per-profile dumps do not
    except ImportError as exc:
        package = "tensorrt-rtx" if flavour == "tensorrt-rtx" else "tensorrt"
        raise CanvasrtError(f"building with {flavour} needs the {package} package ({exc}); install canvasrt[rtx] or [gpu]") from None
    return trt


def _memory_pools(workspace: int | None) -> dict[str, Any]:
    if workspace is None:
        return {}
    import importlib

    trt = importlib.import_module("tensorrt_rtx" if os.environ.get("POLYGRAPHY_USE_TENSORRT_RTX") == "1" else "tensorrt")
    return {"memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: workspace}}


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


def build_engine(onnx_path: str | Path, graph: dict[str, Any], flavour: str, target: str | None = None,
                 workspace: int | None = None) -> bytes:
    """Parses and builds one graph; returns the serialized engine."""
    if flavour not in FLAVOURS:
        raise CanvasrtError(f"unknown builder {flavour!r}; use one of {', '.join(FLAVOURS)}")
    trt_loaders = _polygraphy_trt(flavour)
    network = trt_loaders.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    if flavour == "tensorrt-rtx":
        if target not in RTX_TARGETS:
            raise CanvasrtError(f"TensorRT-RTX targets are {', '.join(RTX_TARGETS)}; got {target!r}")
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        config = CreateConfigRTX(compute_capabilities=[RTX_TARGETS[target]], profiles=profiles_for(graph),
                                 **_memory_pools(workspace))
    else:
        config = trt_loaders.CreateConfig(profiles=profiles_for(graph), **_memory_pools(workspace))
    try:
        engine = trt_loaders.EngineBytesFromNetwork(network, config=config)()
    except Exception as exc:  # Polygraphy raises its own error type after logging the parser's messages
        raise CanvasrtError(f"{flavour} could not build {Path(onnx_path).name}: {exc}") from None
    return bytes(engine)


ENGINE_FORMAT = "canvasrt-engines"
FP8_TARGETS = {"sm89", "sm90", "sm120", "sm121"}  # Ada, Hopper and Blackwell have FP8 tensor cores
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'4G', '512M', '1048576' -> bytes."""
    text = text.strip().upper().removesuffix("B")
    scale = SIZE_UNITS.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise CanvasrtError(f"--workspace takes a size like 4G or 512M, not {text!r}") from None


def resolve_builder(builder: str) -> str:
    if builder != "auto":
        return builder
    try:
        import tensorrt
    except ImportError:
        return "tensorrt-rtx"
    # tensorrt-stubs installs a namespace package of .pyi files under the same name: only a real module has a version
    return "tensorrt" if hasattr(tensorrt, "__version__") else "tensorrt-rtx"


def build_engines(
    artifacts: str | Path,
    output: str | Path,
    builder: str = "auto",
    target: str = "sm89",
    workspace: str | None = None,
    progress: Any = None,
) -> tuple[dict[str, Any], bool]:
    """Builds one engine per graph of an artifact directory. Returns the engine manifest and whether it was reused
    (an earlier build in `output` from the same graphs, builder version, target and options)."""
    from .manifest import read_manifest, staged_directory, write_json

    artifacts, output = Path(artifacts), Path(output)
    manifest = read_manifest(artifacts)
    flavour = resolve_builder(builder)
    if flavour == "tensorrt-rtx" and target not in RTX_TARGETS:
        raise CanvasrtError(f"TensorRT-RTX builds for {', '.join(RTX_TARGETS)}; {target!r} is not one (SM90 needs --builder tensorrt)")
    if flavour == "tensorrt" and target not in ("current", "sm90"):
        raise CanvasrtError(f"--builder tensorrt builds for the GPU in this machine; use --target current or sm90, not {target!r}")
    if flavour == "tensorrt-rtx" and manifest["moe"] == "sparse":
        raise CanvasrtError("sparse-MoE graphs use NonZero, which TensorRT-RTX cannot parse; export with --moe dense")
    quantization = manifest.get("quantization") or {}
    if quantization.get("format") == "fp8" and target not in FP8_TARGETS:
        raise CanvasrtError(f"{target} has no FP8 tensor cores; build FP8 artifacts for one of {', '.join(sorted(FP8_TARGETS))}")
    workspace_bytes = parse_size(workspace) if workspace else None
    key = {
        "graphs": {name: graph["sha256"] for name, graph in manifest["graphs"].items()},
        "builder": flavour,
        "builder_version": _builder_version(flavour),
        "target": target,
        "workspace": workspace_bytes,
    }
    previous = output / "manifest.json"
    if previous.is_file():
        import json

        try:
            earlier = json.loads(previous.read_text())
        except json.JSONDecodeError:
            earlier = {}
        if earlier.get("format") == ENGINE_FORMAT and earlier.get("key") == key:
            return earlier, True
    engines = {}
    with staged_directory(output) as staging:
        for name, graph in manifest["graphs"].items():
            if progress:
                progress(f"building {name} engine ({flavour}, {target})")
            data = build_engine(artifacts / graph["file"], graph, flavour, target, workspace_bytes)
            (staging / f"{name}.engine").write_bytes(data)
            engines[name] = {"file": f"{name}.engine", "onnx_sha256": graph["sha256"], "bytes": len(data),
                             "profiles": graph["profiles"], "inputs": graph["inputs"], "outputs": graph["outputs"]}
        engine_manifest = {
            "format": ENGINE_FORMAT,
            "key": key,
            "artifacts": str(artifacts.resolve()),
            "precision": manifest["dtype"],
            "quantization": manifest.get("quantization"),
            "model": manifest["model"],
            "capacity": manifest["capacity"],
            "kv_layout": manifest["kv_layout"],
            "generation": manifest.get("generation"),
            "engines": engines,
        }
        write_json(staging / "manifest.json", engine_manifest)
    return engine_manifest, False


def _builder_version(flavour: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for package in (("tensorrt-rtx", "tensorrt_rtx") if flavour == "tensorrt-rtx" else ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")):
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    raise CanvasrtError(f"{flavour} is not installed; install canvasrt[{'rtx' if flavour == 'tensorrt-rtx' else 'gpu'}]")
