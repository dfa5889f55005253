"""TensorRT engine building for exported graphs, one code path for `tensorrt` and `tensorrt_rtx`.

Polygraphy's TensorRT loaders drive either flavour: with POLYGRAPHY_USE_TENSORRT_RTX=1 set before
`polygraphy.backend.trt` is first imported they use tensorrt_rtx, whose builder compiles ahead of time for a named
compute capability without a GPU. Networks are strongly typed (precision lives in the graph: casts and Q/DQ), and
each graph gets the optimization profiles its manifest entry declares, optionally narrowed to a smaller batch and
context.

The builder's own logger keeps its errors (for one-line messages) and its layer information: at profiling verbosity
DETAILED, TensorRT-RTX's builder reports every engine layer with its type, tactic, input, weight and output
datatypes, the view an engine inspector gives, which otherwise needs a GPU to deserialise the engine.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import signal
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..core.contract import Capacity, Profiles, narrow_profiles
from ..core.errors import ArtifactError, CanvasrtError
from ..core.manifest import (
    ArtifactManifest,
    BuildKey,
    EngineEntry,
    EngineManifest,
    GraphEntry,
    record_files,
    sha256_file,
)
from ..core.output import ENGINE_OUTPUT, check_output, staged_directory

FLAVOURS = ("tensorrt", "tensorrt-rtx")
RTX_TARGETS = {"sm75": (7, 5), "sm80": (8, 0), "sm86": (8, 6), "sm89": (8, 9), "sm120": (12, 0), "sm121": (12, 1)}


class Phase(NamedTuple):
    """One open phase of a TensorRT build, as its progress monitor reports it: `done` of `steps` steps."""

    name: str
    done: int
    steps: int


PhaseCallback = Callable[[tuple[Phase, ...]], None]


@dataclass(frozen=True)
class BuiltEngine:
    bytes: int  # the size of the engine file written
    layers: str  # the builder's layer information, one line per layer; empty when the builder reported none
    activation_bytes: tuple[int, ...] = ()  # per optimization profile, in order, as the builder reported them
    weights_bytes: int | None = None


@dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine, parsed from the builder's layer information."""

    name: str
    kind: str  # TensorRT-RTX's LayerType: gemm, kgen, runtime_fusion, ...
    inputs: tuple[str, ...]  # datatypes of the activations it reads
    weights: tuple[str, ...]  # datatypes of the constants it reads, scalars (GEMM alpha/beta) left out
    outputs: tuple[str, ...]
    onnx: tuple[str, ...]  # the ONNX nodes it implements
    profile: int | None  # the optimization profile it belongs to (TensorRT-RTX compiles one program per profile)


def _load(flavour: str) -> tuple[Any, Any]:
    """The TensorRT module of `flavour` and Polygraphy's TensorRT loaders bound to it."""
    wanted = "1" if flavour == "tensorrt-rtx" else "0"
    loaded = "polygraphy.backend.trt" in sys.modules
    if loaded and os.environ.get("POLYGRAPHY_USE_TENSORRT_RTX", "0") != wanted:
        raise CanvasrtError(
            f"this process already loaded Polygraphy for the other TensorRT flavour; build {flavour} "
            "engines in a separate process"
        )
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = wanted
    package = "tensorrt-rtx" if flavour == "tensorrt-rtx" else "tensorrt"
    try:
        trt = importlib.import_module(package.replace("-", "_"))
        from polygraphy.backend import trt as loaders
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:
        raise CanvasrtError(
            f"building with {flavour} needs the {package} package ({exc}); install canvasrt[rtx] or [gpu]"
        ) from None
    if not hasattr(trt, "Builder"):  # tensorrt-stubs installs a `tensorrt` namespace package of .pyi files only
        raise CanvasrtError(f"the installed {package} is only type stubs; install canvasrt[gpu] for the real TensorRT")
    # Silenced (module_severity: this Polygraphy ignores `severity`): the builder's errors reach the CanvasrtError
    # through its own logger, and Polygraphy's messages would repeat them around the one-line error.
    G_LOGGER.module_severity = G_LOGGER.CRITICAL + 1
    return trt, loaders


_LOGGERS: dict[str, Any] = {}
# The builder's memory report (INFO): the device memory an execution context needs for each profile's largest
# shapes, and the weights'. A deserialised engine would say the same (device_memory_size_v2), but deserialising needs
# a GPU, and TensorRT-RTX builds without one.
_ACTIVATION = re.compile(r"Total Activation Memory: (\d+) bytes")
_WEIGHTS = re.compile(r"Total Weights Memory: (\d+) bytes")


def _build_log(flavour: str, trt: Any) -> Any:
    # One logger per flavour for the whole process: TensorRT keeps the first logger a builder gets as its global one.
    if flavour not in _LOGGERS:

        class BuildLog(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.reset()

            def reset(self) -> None:
                self.errors: list[str] = []
                self.layers = ""
                self.activation: list[int] = []
                self.weights: int | None = None

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.Logger.ERROR, trt.Logger.INTERNAL_ERROR):
                    self.errors.append(msg)
                elif msg.startswith("Layers:"):
                    self.layers = "\n".join(line for line in msg.splitlines() if line.startswith("Name: "))
                elif found := _ACTIVATION.match(msg):  # once per profile, in profile order
                    self.activation.append(int(found.group(1)))
                elif found := _WEIGHTS.match(msg):
                    self.weights = int(found.group(1))

        _LOGGERS[flavour] = BuildLog()
    return _LOGGERS[flavour]


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM recorded instead of raised while the block runs, then delivered again on leaving it.

    During a build Python runs only inside TensorRT's callbacks, and an exception raised in its logger's callback
    is lost in the bindings, so a Ctrl-C raised there would vanish and the build run to the end. Recorded here, the
    signal cancels the build through the progress monitor, and is re-raised once TensorRT has returned. Outside the main
    thread (where handlers cannot be set) nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    numbers = [n for n in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(n) is not signal.SIG_IGN]
    previous = {n: signal.signal(n, lambda signum, frame: received.append(signum)) for n in numbers}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


def progress_monitor(trt: Any, report: PhaseCallback | None, cancelled: Callable[[], bool] = lambda: False) -> Any:
    """A `trt.IProgressMonitor` of either flavour that reports the stack of open phases after every event and
    cancels the build once `cancelled()` is true."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases: list[Phase] = []
            self.interrupted: BaseException | None = None

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.phases.append(Phase(phase_name, 0, num_steps))
            self._report()

        def step_complete(self, phase_name: str, step: int) -> bool:
            for index in range(len(self.phases) - 1, -1, -1):
                if self.phases[index].name == phase_name:
                    self.phases[index] = self.phases[index]._replace(done=step + 1)
                    break
            return self._report()

        def phase_finish(self, phase_name: str) -> None:
            for index in range(len(self.phases) - 1, -1, -1):
                if self.phases[index].name == phase_name:
                    del self.phases[index]
                    break
            self._report()

        def _report(self) -> bool:
            # Ctrl-C and callback errors surface here, inside TensorRT's callback, where raising cannot cross back
            # into the builder: keep the exception, cancel the build (step_complete returns False), re-raise later.
            if self.interrupted is None and report is not None:
                try:
                    report(tuple(self.phases))
                except BaseException as exc:
                    self.interrupted = exc
            return self.interrupted is None and not cancelled()

    return Monitor()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _memory_pools(trt: Any, workspace: int | None) -> dict[str, Any]:
    return {} if workspace is None else {"memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: workspace}}


def profiles_for(graph: GraphEntry, profiles: Profiles | None = None) -> list[Any]:
    """Polygraphy Profiles from a manifest graph entry: static dims as declared, symbolic dims per profile
    (`profiles` replaces the entry's own, e.g. narrowed ones)."""
    from polygraphy.backend.trt import Profile

    result = []
    for dims in (profiles or graph.profiles).values():
        profile = Profile()
        for spec in graph.inputs:
            shapes = [[d if isinstance(d, int) else dims[d][i] for d in spec.shape] for i in range(3)]
            profile.add(spec.name, min=shapes[0], opt=shapes[1], max=shapes[2])
        result.append(profile)
    return result


def build_engine(
    onnx_path: str | Path,
    engine_path: Path,
    graph: GraphEntry,
    flavour: str,
    target: str | None = None,
    workspace: int | None = None,
    profiles: Profiles | None = None,
    timing_cache: Path | None = None,
    phases: PhaseCallback | None = None,
) -> BuiltEngine:
    """Parses and builds one graph into `engine_path`. `timing_cache` is loaded when it exists and replaced
    (atomically) after the build; `phases` hears the stack of open build phases from TensorRT's progress monitor.

    Memory: the peak is inside the build, about two copies of the weights in anonymous memory (the parser's and the
    builder's) plus the graph's weights file as it is read (docs/PERFORMANCE.md, released width). The parser, the
    network and the builder are released before the engine is written, from TensorRT's own buffer rather than
    through a Python bytes copy, so writing adds nothing to that peak."""
    if flavour not in FLAVOURS:
        raise CanvasrtError(f"unknown builder {flavour!r}; use one of {', '.join(FLAVOURS)}")
    if flavour == "tensorrt-rtx" and target not in RTX_TARGETS:
        raise CanvasrtError(f"TensorRT-RTX targets are {', '.join(RTX_TARGETS)}; got {target!r}")
    trt, loaders = _load(flavour)
    name = Path(onnx_path).name
    log = _build_log(flavour, trt)
    log.reset()
    builder, network, parser = _parsed_network(trt, log, onnx_path, flavour)
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(deferred_signals())  # entered first, so it re-raises after the cleanup below
        monitor = progress_monitor(trt, phases, lambda: bool(signals))
        options: dict[str, Any] = {
            "profiles": profiles_for(graph, profiles),
            "profiling_verbosity": trt.ProfilingVerbosity.DETAILED,  # the layer information needs it
            "progress_monitor": monitor,
            **_memory_pools(trt, workspace),
        }
        fresh = None if timing_cache is None else _timing_cache_files(stack, timing_cache, options)
        config = _builder_config(loaders, flavour, target, options)
        try:
            data = loaders.EngineBytesFromNetwork((builder, network, parser), config=config, save_timing_cache=fresh)()
        except Exception as exc:  # Polygraphy raises its own error type; the builder's first error says more
            if monitor.interrupted is not None:
                raise monitor.interrupted from None
            if signals:  # cancelled by the signal; leaving the ExitStack delivers it again to its own handler
                raise KeyboardInterrupt from None
            detail = log.errors[0] if log.errors else str(exc)
            raise CanvasrtError(f"{flavour} could not build {name}: {_one_line(detail)}") from None
        if signals:  # it came after the last step: the engine is built, but the user asked to stop
            raise KeyboardInterrupt
        if timing_cache is not None and fresh is not None:
            _replace_timing_cache(fresh, timing_cache)
    del config, network, parser, builder
    with open(engine_path, "wb") as out:
        out.write(memoryview(data))
    size = int(data.nbytes)
    del data
    return BuiltEngine(size, log.layers, tuple(log.activation), log.weights)


def _parsed_network(trt: Any, log: Any, onnx_path: str | Path, flavour: str) -> tuple[Any, Any, Any]:
    """The builder, the strongly typed network parsed from `onnx_path` and its parser; the parser's first error,
    or a file that parses to no layers, as a one-line error."""
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        detail = f"{errors[0].node_name() or 'graph'}: {errors[0].desc()}" if errors else "the ONNX parser failed"
        raise CanvasrtError(f"{flavour} could not build {Path(onnx_path).name}: {_one_line(detail)}")
    if network.num_layers == 0:  # the parser takes an empty file, or bytes that decode to nothing, as an empty model
        raise ArtifactError(f"{onnx_path} holds no ONNX graph (empty or not ONNX); re-run `canvasrt export`")
    return builder, network, parser


def _builder_config(loaders: Any, flavour: str, target: str | None, options: dict[str, Any]) -> Any:
    """Polygraphy's builder config of the flavour: TensorRT-RTX compiles ahead of time for `target`'s compute
    capability, TensorRT for the GPU in this machine."""
    if flavour == "tensorrt-rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        return CreateConfigRTX(compute_capabilities=[RTX_TARGETS[str(target)]], **options)
    return loaders.CreateConfig(**options)


def _timing_cache_files(stack: contextlib.ExitStack, timing_cache: Path, options: dict[str, Any]) -> Any:
    """Opens the timing cache to load (when it exists) into the builder `options`, and returns the temporary file
    next to it that the build saves the updated cache into, removed when `stack` closes unless it replaced the
    cache. Open files rather than paths: Polygraphy locks a path through a `.lock` file it leaves behind."""
    if timing_cache.is_file():
        options["load_timing_cache"] = stack.enter_context(open(timing_cache, "rb"))
    fresh = stack.enter_context(
        tempfile.NamedTemporaryFile(
            dir=timing_cache.parent, prefix=f".{timing_cache.name}.", suffix=".partial", delete=False
        )
    )
    stack.callback(lambda: Path(fresh.name).unlink(missing_ok=True))
    return fresh


def _replace_timing_cache(fresh: Any, timing_cache: Path) -> None:
    """Moves the updated cache over the old one atomically, readable as a file created with the user's umask."""
    fresh.close()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(fresh.name, 0o666 & ~umask)  # mkstemp's 0600 would hide the cache from a team's other builds
    os.replace(fresh.name, timing_cache)


_LAYER = re.compile(
    r"Name: (?P<name>.*?), LayerType: (?P<kind>\w+), Inputs: \[(?P<inputs>.*?)\], "
    r"Constants: \[(?P<constants>.*?)\], Outputs: \[(?P<outputs>.*?)\], TacticName: "
)
_PROFILE = re.compile(r"_myl(\d+)_\d+$")  # TensorRT-RTX names each profile's layers "..._myl<profile>_<n>"
_TENSOR = re.compile(r"\{[^{}]*?Dimensions: \[(?P<dims>[^\]]*)\][^{}]*?Datatype: (?P<dtype>\w+)[^{}]*\}")


def _dtypes(tensors: str, scalars: bool = True) -> tuple[str, ...]:
    return tuple(
        t["dtype"]
        for t in _TENSOR.finditer(tensors)
        if scalars or any(d.strip() not in ("1", "") for d in t["dims"].split(","))
    )


def engine_layers(information: str) -> list[EngineLayer]:
    """Parses the builder's layer information (`BuiltEngine.layers`, or an engine directory's `*.layers.txt`)."""
    layers = []
    for line in information.splitlines():
        match = _LAYER.match(line)
        if match is not None:
            layers.append(
                EngineLayer(
                    name=match["name"],
                    kind=match["kind"],
                    inputs=_dtypes(match["inputs"]),
                    weights=_dtypes(match["constants"], scalars=False),
                    outputs=_dtypes(match["outputs"]),
                    onnx=tuple(re.findall(r"\[ONNX Layer: ([^\]]+)\]", line)),
                    profile=int(profile[1]) if (profile := _PROFILE.search(match["name"])) else None,
                )
            )
    return layers


def gemm_precisions(layers: list[EngineLayer]) -> dict[str, int]:
    """GEMM layers counted by the datatypes they read (activations and weights), e.g. {"FP8": 19, "Float": 9}."""
    counts = Counter("+".join(sorted(set(layer.inputs + layer.weights))) for layer in layers if layer.kind == "gemm")
    return dict(sorted(counts.items()))


def gemms_per_profile(layers: list[EngineLayer], profiles: Profiles) -> dict[str, dict[str, int]]:
    """`gemm_precisions` for each optimization profile, by the profile's (phase's) name."""
    return {
        name: gemm_precisions([layer for layer in layers if layer.profile == index])
        for index, name in enumerate(profiles)
    }


FP8_TARGETS = {"sm89", "sm90", "sm120", "sm121"}  # Ada, Hopper and Blackwell have FP8 tensor cores
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def device_memory(built: BuiltEngine, profiles: list[str]) -> dict[str, Any] | None:
    """The engine manifest's `device_memory`: the builder's activation bytes per profile (None unless it reported
    one per profile), the largest profile, and the weights bytes."""
    if len(built.activation_bytes) != len(profiles):
        return None
    activation = dict(zip(profiles, built.activation_bytes, strict=True))
    largest = max(activation, key=activation.__getitem__)
    return {
        "activation_bytes": activation,
        "largest_profile": largest,
        "largest_activation_bytes": activation[largest],
        "weights_bytes": built.weights_bytes,
    }


def parse_size(text: str) -> int:
    """'4G', '512M', '1048576' -> bytes (at least one)."""
    given = text
    text = text.strip().upper().removesuffix("B")
    scale = SIZE_UNITS.get(text[-1:], 1)
    try:
        size = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        size = math.nan
    if not (math.isfinite(size) and size >= 1):
        raise CanvasrtError(f"--workspace takes a size like 4G or 512M, at least one byte, not {given!r}")
    return int(size)


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
    progress: Callable[[str], None] | None = None,
    max_batch: int | None = None,
    max_context: int | None = None,
    timing_cache: str | Path | None = None,
    phases: PhaseCallback | None = None,
) -> tuple[EngineManifest, bool]:
    """Builds the backbone's engine, one optimization profile per phase (and, for --vision artifacts, the vision
    graph's, with its own profile of images x patches). Returns the engine manifest and whether it
    was reused (an earlier build in `output` from the same graphs, calibration, builder version, target and options).

    Every refusal comes before anything is built or written."""
    output = Path(output)
    manifest = ArtifactManifest.load(artifacts)
    check_output(output, ENGINE_OUTPUT, inputs=[artifacts])
    flavour = resolve_builder(builder)
    _refuse_target(manifest, flavour, target)
    workspace_bytes = parse_size(workspace) if workspace else None
    capacity = manifest.capacity.narrowed(max_batch, max_context)
    manifest.verify()  # graphs, external data and calibration as exported: hashing them is cheap next to a build
    cache = _timing_cache(timing_cache, flavour)
    key = _build_key(manifest, flavour, target, workspace_bytes, capacity)
    earlier = EngineManifest.load_if_current(output, key)
    if earlier is not None:
        return earlier, True
    with staged_directory(output, ENGINE_OUTPUT, inputs=[artifacts]) as staging:
        engines = {}
        for name, graph in manifest.graphs.items():
            if progress:
                progress(f"building {name} engine ({flavour}, {target})")
            profiles = narrow_profiles(graph.profiles, capacity)
            built = build_engine(
                manifest.graph_path(name),
                staging / f"{name}.engine",
                graph,
                flavour,
                target,
                workspace_bytes,
                profiles,
                cache,
                phases,
            )
            engines[name] = _engine_entry(staging, name, graph, profiles, built)
        engine_manifest = _engine_manifest(manifest, capacity, output, key, engines, staging)
        engine_manifest.write(staging)
        manifest.check_unchanged("build")  # the graphs built are the ones verified at the start
    return engine_manifest, False


def _refuse_target(manifest: ArtifactManifest, flavour: str, target: str) -> None:
    """Refuses a target the builder flavour cannot build for, MoE graphs TensorRT-RTX cannot parse, and FP8
    artifacts for a GPU without FP8 tensor cores."""
    if flavour == "tensorrt-rtx" and target not in RTX_TARGETS:
        raise CanvasrtError(
            f"TensorRT-RTX builds for {', '.join(RTX_TARGETS)}; {target!r} is not one (SM90 needs --builder tensorrt)"
        )
    if flavour == "tensorrt" and target not in ("current", "sm90"):
        raise CanvasrtError(
            f"--builder tensorrt builds for the GPU in this machine; use --target current or sm90, not {target!r}"
        )
    if flavour == "tensorrt-rtx" and manifest.moe in ("sparse", "grouped"):
        raise CanvasrtError(
            f"{manifest.moe}-MoE graphs use "
            + ("NonZero" if manifest.moe == "sparse" else "ScatterND with a reduction")
            + ", which TensorRT-RTX cannot parse; export with --moe dense"
        )
    if manifest.quantization is not None and target not in FP8_TARGETS:
        raise CanvasrtError(
            f"{target} has no FP8 tensor cores; build FP8 artifacts for one of {', '.join(sorted(FP8_TARGETS))}"
        )


def _timing_cache(timing_cache: str | Path | None, flavour: str) -> Path | None:
    """The `--timing-cache` file, refused for TensorRT-RTX (which keeps none) and where no file can be written."""
    cache = Path(timing_cache) if timing_cache is not None else None
    if cache is not None:
        if flavour == "tensorrt-rtx":
            raise CanvasrtError(
                "TensorRT-RTX keeps no timing cache (its timing-cache calls do nothing); drop "
                "--timing-cache or build with --builder tensorrt"
            )
        if cache.is_dir() or not cache.parent.is_dir():
            raise CanvasrtError(f"--timing-cache {cache} must name a file in an existing directory")
    return cache


def _build_key(
    manifest: ArtifactManifest, flavour: str, target: str, workspace: int | None, capacity: Capacity
) -> BuildKey:
    """What an engine directory is built from: the graphs, the calibration, the builder and its version, the
    target and the options. An earlier build with the same key is reused."""
    return BuildKey(
        graphs={name: graph.sha256 for name, graph in manifest.graphs.items()},
        calibration_sha256=manifest.quantization.calibration_sha256 if manifest.quantization else None,
        builder=flavour,
        builder_version=_builder_version(flavour),
        target=target,
        workspace=workspace,
        max_batch=capacity.max_batch,
        max_context=capacity.max_context,
    )


def _engine_manifest(
    manifest: ArtifactManifest,
    capacity: Capacity,
    output: Path,
    key: BuildKey,
    engines: dict[str, EngineEntry],
    staging: Path,
) -> EngineManifest:
    """The manifest of the engines built into `staging` from `manifest`'s artifacts, for the directory `output`."""
    return EngineManifest(
        model=manifest.model,
        capacity=capacity,
        kv_layout=manifest.kv_layout,
        dtype=manifest.dtype,
        generation=manifest.generation,
        directory=output,
        key=key,
        artifacts=manifest.directory.resolve(),
        quantization=manifest.quantization,
        engines=engines,
        files=record_files(staging, [entry.layers for entry in engines.values() if entry.layers is not None]),
        vision=manifest.vision,
    )


def _engine_entry(staging: Path, name: str, graph: GraphEntry, profiles: Profiles, built: BuiltEngine) -> EngineEntry:
    """The engine manifest's entry for graph `name`, built into `staging`; its layer information, when the builder
    reported any, is written next to the engine as `<name>.layers.txt`."""
    if built.layers:
        (staging / f"{name}.layers.txt").write_text(built.layers + "\n")
    return EngineEntry(
        file=f"{name}.engine",
        sha256=sha256_file(staging / f"{name}.engine"),
        onnx_sha256=graph.sha256,
        bytes=built.bytes,
        profiles=profiles,
        inputs=graph.inputs,
        outputs=graph.outputs,
        layers=f"{name}.layers.txt" if built.layers else None,
        gemms=gemms_per_profile(engine_layers(built.layers), profiles) if built.layers else None,
        device_memory=device_memory(built, list(profiles)),
    )


def _builder_version(flavour: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for package in (
        ("tensorrt-rtx", "tensorrt_rtx")
        if flavour == "tensorrt-rtx"
        else ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")
    ):
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    raise CanvasrtError(
        f"{flavour} is not installed; install canvasrt[{'rtx' if flavour == 'tensorrt-rtx' else 'gpu'}]"
    )
