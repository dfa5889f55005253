"""manifest.json: the contract between export, calibration, build, runtime and Triton, as typed data.

A stage learns everything about a directory from its manifest: an artifact directory's `ArtifactManifest` (model
geometry, capacities, each graph's file, digest and I/O, dtype, generation defaults, tokenizer, FP8 calibration) or
an engine directory's `EngineManifest` (the same model description plus each engine's profiles and layer
precisions). Both share `StepSpec`, which is all the generation loop needs, and which the torch backend builds for a
checkpoint. This module is the only one that reads or writes manifest JSON; it needs only the standard library, so
the ONNX Runtime path and the Triton models use it without PyTorch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from .config import ModelConfig, VisionConfig
from .contract import GRAPHS, Capacity, KVLayer, Profiles, TensorSpec
from .errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT = "canvasrt-artifacts"
ENGINE_FORMAT = "canvasrt-engines"
# Bump on any change to graph I/O, buffer layout or what the manifest records; readers refuse other versions instead
# of misreading them. Artifacts 2 and engines 2: file sizes (and the engines' sha256) for the checks on load.
# Artifacts 3 and engines 3: one backbone graph and one engine (with a profile per phase) instead of encode + denoise.
# Artifacts 4 and engines 4: past K/V inputs of a symbolic span (`context`, `window`), the call's own keys first.
# Artifacts 5 and engines 5: `files`, the size and sha256 of every other file the directory relies on (tokenizer,
# generation config, the builder's layer information); the artifacts' `vocab_chunk` (the LM head and the sampler in
# vocabulary chunks), the engines' `device_memory` as the builder reports it.
FORMAT_VERSION = 5
ENGINE_FORMAT_VERSION = 5


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def resolves_inside(directory: Path, name: str) -> bool:
    """Whether `directory / name` resolves (symlinks followed) to a path strictly inside `directory`: a manifest or an
    index names files of its own directory, and a `../` or absolute name or a link out of it must not make a stage
    read, hash or copy anything the user did not name."""
    root = Path(directory).resolve()
    if Path(name).is_absolute():
        return False
    path = (root / name).resolve()
    return path != root and path.is_relative_to(root)


def file_problems(directory: Path, name: str, what: str, size: int | None, sha256: str | None, fix: str) -> list[str]:
    """What is wrong with a file a manifest names: outside its directory, missing, of another size or (when `sha256`
    is given) of other contents. Empty when the file is as promised."""
    path = directory / name
    if not resolves_inside(directory, name):
        return [
            f"{directory}: the {what} {name} resolves outside the directory (a ../ or absolute name, or a link); "
            f"put the file itself in {directory} or {fix}"
        ]
    if not path.is_file():
        return [f"{directory} lacks the {what} named in its manifest ({name}); {fix}"]
    actual = path.stat().st_size
    if size is not None and actual != size:
        return [
            f"{path} has {actual} bytes, its manifest says {size}: the {what} was changed, truncated or swapped "
            f"after it was written; {fix}"
        ]
    if sha256 is not None and sha256_file(path) != sha256:
        return [f"{path} does not match the sha256 in its manifest: the {what} was changed after it was written; {fix}"]
    return []


def record_files(directory: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The integrity record of a directory's files besides its graphs or engines (tokenizer, generation config,
    layer information): name -> {"bytes", "sha256"}, as `files_problems` checks them."""
    return {
        name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)} for name in names
    }


def files_problems(directory: Path, files: dict[str, dict[str, Any]], fix: str) -> list[str]:
    """What is wrong with the small files of a directory's integrity record: outside it, missing, of another size or
    other contents. Always with digests: these files are small, and a tokenizer swapped for another model's of the
    same size would turn every answer into another model's text."""
    found = []
    for name, record in files.items():
        what = "generation config" if name == "generation_config.json" else f"file {name}"
        if not isinstance(record, dict):
            found.append(f"{directory / MANIFEST}: the record of {name} is not an object; {fix}")
            continue
        found += file_problems(directory, name, what, record.get("bytes"), record.get("sha256"), fix)
    return found


def digest_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def canvasrt_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("canvasrt")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class Quantization:
    """FP8 artifacts: how they were calibrated, and the calibration record they were written with."""

    method: str
    weights: str
    prompts: str
    excluded: tuple[str, ...]
    samples: int
    calibration: str = "calibration.json"
    calibration_sha256: str | None = None
    format: str = "fp8"
    vision: bool = False  # the vision graph's GEMMs quantized too (`calibrate --quantize-vision`)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "method": self.method,
            "weights": self.weights,
            "prompts": self.prompts,
            "excluded": list(self.excluded),
            "samples": self.samples,
            "calibration": self.calibration,
            "calibration_sha256": self.calibration_sha256,
            "vision": self.vision,
        }

    @classmethod
    def from_calibration(cls, record: dict[str, Any]) -> Quantization:
        """The quantization a calibration record (calibration.json) describes."""
        return cls(
            method=record["method"],
            weights=record["weights"],
            prompts=record["prompts"],
            excluded=tuple(record.get("excluded", ())),
            samples=int(record["samples"]),
            vision=bool(record.get("vision", False)),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Quantization | None:
        if not data:
            return None
        return cls(
            method=data["method"],
            weights=data["weights"],
            prompts=data["prompts"],
            excluded=tuple(data.get("excluded", ())),
            samples=int(data["samples"]),
            calibration=data.get("calibration", "calibration.json"),
            calibration_sha256=data.get("calibration_sha256"),
            format=data.get("format", "fp8"),
            vision=bool(data.get("vision", False)),
        )


@dataclass(frozen=True)
class StepSpec:
    """What the loop needs to know about whatever runs the step: model geometry, capacities, K/V layout, the
    precision the step computes in, the generation defaults (a generation_config.json's dict), and for FP8 how it
    was quantized."""

    model: ModelConfig
    capacity: Capacity
    kv_layout: tuple[KVLayer, ...]
    dtype: str
    generation: dict[str, Any]
    quantization: Quantization | None

    @property
    def precision(self) -> str:
        """fp8 for Q/DQ artifacts (and their simulation or engines), else the dtype: what parity tolerances and
        reports are keyed by."""
        return "fp8" if self.quantization else self.dtype


@dataclass(frozen=True)
class GraphEntry:
    file: str
    sha256: str
    bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: Profiles
    data_file: str | None = None
    data_sha256: str | None = None
    data_bytes: int | None = None
    quantized: tuple[str, ...] | None = None  # FP8 artifacts: the weights behind Q/DQ

    @classmethod
    def of_file(
        cls,
        path: Path,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        profiles: Profiles,
        quantized: Sequence[str] | None = None,
    ) -> GraphEntry:
        """The entry for a graph just written at `path`, with its external data file `<file>.data` if there is one:
        names, sizes and digests, as the checks on load and `canvasrt verify` expect them."""
        data = path.with_name(path.name + ".data")
        external = data.is_file()
        return cls(
            file=path.name,
            sha256=sha256_file(path),
            bytes=path.stat().st_size,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            profiles=profiles,
            data_file=data.name if external else None,
            data_sha256=sha256_file(data) if external else None,
            data_bytes=data.stat().st_size if external else None,
            quantized=tuple(quantized) if quantized is not None else None,
        )

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)

    def has_output(self, name: str) -> bool:
        return any(spec.name == name for spec in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}
        if self.data_file is not None:
            data.update(data_file=self.data_file, data_sha256=self.data_sha256, data_bytes=self.data_bytes)
        data.update(
            inputs=[s.to_dict() for s in self.inputs],
            outputs=[s.to_dict() for s in self.outputs],
            profiles=self.profiles,
        )
        if self.quantized is not None:
            data["quantized"] = list(self.quantized)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphEntry:
        return cls(
            file=str(data["file"]),
            sha256=str(data["sha256"]),
            bytes=int(data["bytes"]),
            inputs=tuple(TensorSpec.from_dict(s) for s in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(s) for s in data["outputs"]),
            profiles={name: {dim: list(r) for dim, r in dims.items()} for name, dims in data["profiles"].items()},
            data_file=data.get("data_file"),
            data_sha256=data.get("data_sha256"),
            data_bytes=int(data["data_bytes"]) if data.get("data_file") is not None else None,
            quantized=tuple(data["quantized"]) if data.get("quantized") is not None else None,
        )


SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def check_field_types(value: Any, where: str = "manifest") -> None:
    """TypeError naming the first field of a loaded manifest (nested dataclasses, tuples and dicts of them included)
    whose value is not of its declared scalar type: JSON gives "4" as readily as 4, and a string capacity would
    only fail deep inside a backend."""
    if is_dataclass(value):
        for item in fields(value):
            inner = getattr(value, item.name)
            expected = SCALARS.get(getattr(item.type, "__name__", str(item.type)))
            if expected is not None and (
                not isinstance(inner, expected) or (bool not in expected and isinstance(inner, bool))
            ):
                raise TypeError(f"{where}.{item.name} is {inner!r}, not {item.type}")
            check_field_types(inner, f"{where}.{item.name}")
    elif isinstance(value, (tuple, list)):
        for index, inner in enumerate(value):
            check_field_types(inner, f"{where}[{index}]")
    elif isinstance(value, dict):
        for key, inner in value.items():
            check_field_types(inner, f"{where}.{key}")


def _read_json(directory: Path, what: str, fix: str) -> dict[str, Any]:
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory; pass {what}")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}; it is not {what} ({fix})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc.msg}); {fix}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a canvasrt manifest (a JSON object); {fix}")
    return data


def _version_problem(found: Any, expected: int, kind: str) -> str:
    """Why a manifest's format_version is not readable, in words true of what is there: another integer version,
    or a value that is no version at all (a string "4", a missing field)."""
    if isinstance(found, int) and not isinstance(found, bool):
        return f"its manifest is of {kind} format {found}, this canvasrt reads format {expected}"
    if found is None:
        return f"its manifest has no format_version, this canvasrt reads {kind} format {expected}"
    return (
        f"its manifest's format_version is {json.dumps(found)}, not an integer (a hand edit?); this canvasrt reads "
        f"{kind} format {expected}"
    )


def manifest_format(directory: Path) -> str | None:
    """The `format` a directory's manifest declares, or None when it has no readable one."""
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data.get("format") if isinstance(data, dict) else None


@dataclass(frozen=True)
class ArtifactManifest(StepSpec):
    """An artifact directory of `canvasrt export` (or `canvasrt calibrate`)."""

    directory: Path
    graphs: dict[str, GraphEntry]
    moe: str
    opset: int
    debug_logits: bool
    vocab_chunk: int  # vocabulary entries per chunk of the LM head and sampler in the graph (the vocabulary: one)
    config_digest: str
    checkpoint: dict[str, Any]  # {"path": the checkpoint exported from, "files": sha256 per config/weight file}
    tokenizer: tuple[str, ...]
    canvasrt_version: str
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # tokenizer and generation config: size, sha256
    vision: VisionConfig | None = None  # exported with the vision graph (`graphs.vision`): the tower and prompt layout

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint["path"])

    def source_checkpoint(self) -> dict[str, Any]:
        """The checkpoint these artifacts were exported from: its path and the sha256 of its config and weights."""
        return self.checkpoint

    def graph_path(self, graph: str) -> Path:
        return self.directory / self.graphs[graph].file

    @property
    def backbone(self) -> GraphEntry:
        return self.graphs["backbone"]

    def calibration_path(self) -> Path:
        if self.quantization is None:
            raise ArtifactError(f"{self.directory} is not quantized; run `canvasrt calibrate` for FP8 artifacts")
        return self.directory / self.quantization.calibration

    def calibration(self) -> dict[str, Any]:
        """The FP8 calibration record (scales per tensor) these Q/DQ graphs were written with."""
        path = self.calibration_path()
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            raise ArtifactError(
                f"{self.directory} holds FP8 graphs but no readable {path.name}; copy it back or "
                "re-run `canvasrt calibrate`"
            ) from None

    def with_capacity(self, capacity: Capacity) -> ArtifactManifest:
        return replace(self, capacity=capacity)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "canvasrt_version": self.canvasrt_version,
            "versions": self.versions,
            "model": self.model.to_dict(),
            "config_digest": self.config_digest,
            "checkpoint": self.checkpoint,
            "dtype": self.dtype,
            "moe": self.moe,
            "opset": self.opset,
            "debug_logits": self.debug_logits,
            "vocab_chunk": self.vocab_chunk,
            "capacity": self.capacity.to_dict(),
            "kv_layout": [kv.to_dict() for kv in self.kv_layout],
            "graphs": {name: graph.to_dict() for name, graph in self.graphs.items()},
            "generation": self.generation,
            "tokenizer": list(self.tokenizer),
            "files": self.files,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            **({"vision": self.vision.to_dict()} if self.vision else {}),
        }

    def write(self, directory: Path) -> None:
        write_json(directory / MANIFEST, self.to_json())

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> ArtifactManifest:
        return cls(
            model=ModelConfig.from_dict(data["model"]),
            capacity=Capacity(**data["capacity"]),
            kv_layout=tuple(KVLayer.from_dict(kv) for kv in data["kv_layout"]),
            dtype=str(data["dtype"]),
            generation=dict(data.get("generation") or {}),
            directory=directory,
            graphs={name: GraphEntry.from_dict(entry) for name, entry in data["graphs"].items()},
            moe=str(data["moe"]),
            opset=int(data["opset"]),
            debug_logits=bool(data["debug_logits"]),
            vocab_chunk=int(data["vocab_chunk"]),
            config_digest=str(data["config_digest"]),
            checkpoint=dict(data["checkpoint"]),
            tokenizer=tuple(data.get("tokenizer") or ()),
            quantization=Quantization.from_dict(data.get("quantization")),
            canvasrt_version=str(data.get("canvasrt_version", "?")),
            versions=dict(data.get("versions") or {}),
            files=dict(data["files"]),
            vision=VisionConfig.from_dict(data["vision"]) if data.get("vision") is not None else None,
        )

    @classmethod
    def read(cls, directory: str | Path) -> ArtifactManifest:
        """Parses an artifact directory's manifest (format, version, fields) without checking the files it names."""
        directory = Path(directory)
        fix = "re-run `canvasrt export`"
        data = _read_json(directory, "a canvasrt artifact directory (the output of `canvasrt export`)", fix)
        path = directory / MANIFEST
        if data.get("format") == ENGINE_FORMAT:
            raise ArtifactError(
                f"{directory} is an engine directory (`canvasrt build`); pass the artifact directory it was built from"
            )
        if data.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not a canvasrt manifest (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{directory}: {_version_problem(data.get('format_version'), FORMAT_VERSION, 'artifact')} "
                f"(written by canvasrt {data.get('canvasrt_version', '?')}); re-export it"
            )
        try:
            manifest = cls.from_json(data, directory)
            check_field_types(manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{path} is missing or mistypes a field ({type(exc).__name__}: {exc}); {fix}") from None
        return manifest

    @classmethod
    def load(cls, directory: str | Path, require_graphs: bool = True) -> ArtifactManifest:
        """Loads and checks an artifact directory's manifest; every failure is a one-line ArtifactError.
        require_graphs=False: a copy of the manifest whose graphs live elsewhere (Triton's loop model)."""
        manifest = cls.read(directory)
        manifest.validate(require_graphs)
        return manifest

    @property
    def fix(self) -> str:
        return "re-run `canvasrt calibrate`" if self.quantization else "re-run `canvasrt export`"

    def problems(self, digests: bool = False, require_graphs: bool = True) -> list[str]:
        """Everything that does not match the manifest: graph and external data files outside the directory,
        missing or of another size (and with `digests`, of other contents), tokenizer and calibration files named
        outside it, and with `digests` a calibration record other than the one the FP8 graphs were written with."""
        found = self._graph_problems(digests, require_graphs) + self._tokenizer_problems()
        found += files_problems(self.directory, self.files, self.fix)
        if self.quantization is not None:
            found += self._calibration_problems(self.quantization, digests and require_graphs)
        if len(self.kv_layout) != self.model.num_layers:
            found.append(
                f"{self.directory / MANIFEST}: kv_layout has {len(self.kv_layout)} layers, the model "
                f"{self.model.num_layers}; re-run `canvasrt export`"
            )
        return found

    def _graph_problems(self, digests: bool, require_graphs: bool) -> list[str]:
        """Graphs the manifest names but has no entry for, and (with `require_graphs`) graph and external data files
        missing, outside the directory or of another size (with `digests`, of other contents)."""
        found = []
        for graph in (*GRAPHS, *(("vision",) if self.vision is not None else ())):
            entry = self.graphs.get(graph)
            if entry is None:
                found.append(f"{self.directory} lacks the {graph} graph named in its manifest; {self.fix}")
                continue
            if not require_graphs:
                continue
            found += file_problems(
                self.directory, entry.file, f"{graph} graph", entry.bytes, entry.sha256 if digests else None, self.fix
            )
            if entry.data_file is not None:
                found += file_problems(
                    self.directory,
                    entry.data_file,
                    f"{graph} graph's external data",
                    entry.data_bytes,
                    entry.data_sha256 if digests else None,
                    self.fix,
                )
        return found

    def _tokenizer_problems(self) -> list[str]:
        """Tokenizer files named outside the directory, or without a size and digest in the record of files."""
        found = []
        for name in self.tokenizer:
            if not resolves_inside(self.directory, name):
                found.append(
                    f"{self.directory}: the tokenizer file {name} resolves outside the directory; put the "
                    f"file itself in {self.directory} or {self.fix}"
                )
            elif name not in self.files:
                found.append(
                    f"{self.directory / MANIFEST}: the tokenizer file {name} has no size and digest in its record "
                    f"(files); {self.fix}"
                )
        return found

    def _calibration_problems(self, quantization: Quantization, digests: bool) -> list[str]:
        """A calibration record named outside the directory, and with `digests` one that is missing or is not the
        one the FP8 graphs were written with."""
        record = quantization.calibration
        if not resolves_inside(self.directory, record):
            return [
                f"{self.directory}: the calibration record {record} resolves outside the directory; put "
                f"the file itself in {self.directory} or re-run `canvasrt calibrate`"
            ]
        if not digests:
            return []
        path = self.directory / record
        recorded = quantization.calibration_sha256
        if not path.is_file():
            return [
                f"{self.directory} holds FP8 graphs but not their {record}; copy it back or re-run `canvasrt calibrate`"
            ]
        if recorded is not None and sha256_file(path) != recorded:
            return [f"{path} is not the calibration these FP8 graphs were written with; re-run `canvasrt calibrate`"]
        return []

    def validate(self, require_graphs: bool = True) -> None:
        """Raises the first problem found without reading file contents (sizes, not digests): cheap enough for
        every load."""
        for problem in self.problems(require_graphs=require_graphs):
            raise ArtifactError(problem)

    def verify(self) -> None:
        """Raises the first problem, digests included: for the stages whose work dwarfs hashing the graphs once
        (calibrate, build, Triton packaging)."""
        for problem in self.problems(digests=True):
            raise ArtifactError(problem)

    def check_unchanged(self, command: str) -> None:
        """Raises when the directory no longer holds what this manifest, read when `command` started, describes:
        another manifest, or files of other contents. A writer whose work reads the graphs long after its checks at
        the start (calibrate, build) calls it again before its output is swapped in, so that its output never pairs
        one model's weights with another's manifest."""
        try:
            current = ArtifactManifest.read(self.directory).to_json()
        except ArtifactError:
            current = None
        if current != self.to_json() or self.problems(digests=True):
            raise ArtifactError(
                f"{self.directory} changed while `canvasrt {command}` ran (another export into it?); nothing was "
                f"written: run `canvasrt {command}` again once the directory stays unchanged"
            )


@dataclass(frozen=True)
class EngineEntry:
    file: str
    sha256: str
    onnx_sha256: str
    bytes: int
    profiles: Profiles
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layers: str | None  # the builder's layer information file
    gemms: dict[str, dict[str, int]] | None  # per profile: GEMM layers by the datatypes they read
    # What the builder reported it plans on the device: activation bytes per profile (at the profile's largest
    # shapes), the largest profile's name and bytes, weights bytes; None where it reported none.
    device_memory: dict[str, Any] | None = None

    def input(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)

    def has_output(self, name: str) -> bool:
        return any(spec.name == name for spec in self.outputs)

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "onnx_sha256": self.onnx_sha256,
            "bytes": self.bytes,
            "profiles": self.profiles,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "layers": self.layers,
            "gemms": self.gemms,
            "device_memory": self.device_memory,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineEntry:
        return cls(
            file=str(data["file"]),
            sha256=str(data["sha256"]),
            onnx_sha256=str(data["onnx_sha256"]),
            bytes=int(data["bytes"]),
            profiles={name: {dim: list(r) for dim, r in dims.items()} for name, dims in data["profiles"].items()},
            inputs=tuple(TensorSpec.from_dict(s) for s in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(s) for s in data["outputs"]),
            layers=data.get("layers"),
            gemms=data.get("gemms"),
            device_memory=data.get("device_memory"),
        )


@dataclass(frozen=True)
class BuildKey:
    """Everything an engine build depends on; an earlier build with an equal key is reused."""

    graphs: dict[str, str]  # graph -> ONNX sha256
    calibration_sha256: str | None
    builder: str
    builder_version: str
    target: str
    workspace: int | None
    max_batch: int
    max_context: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class EngineManifest(StepSpec):
    """An engine directory of `canvasrt build`: the backbone's engine (a profile per phase), built for one target."""

    directory: Path
    key: BuildKey
    artifacts: Path  # the artifact directory the engines were built from
    engines: dict[str, EngineEntry]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # the layer information: size, sha256
    vision: VisionConfig | None = None  # the artifacts' (engines.vision built from their vision graph)

    def engine_path(self, graph: str) -> Path:
        return self.directory / self.engines[graph].file

    def source_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint the engines' artifacts were exported from, as those artifacts record it; None when the
        artifact directory is gone or unreadable (the engines alone do not record it)."""
        try:
            return ArtifactManifest.read(self.artifacts).checkpoint
        except ArtifactError:
            return None

    @property
    def backbone(self) -> EngineEntry:
        return self.engines["backbone"]

    @property
    def max_batch(self) -> int:
        """The largest batch every engine's profiles take (a build may narrow them below the artifacts')."""
        return min(
            dims["batch"][2] for entry in self.engines.values() for dims in entry.profiles.values() if "batch" in dims
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": ENGINE_FORMAT,
            "format_version": ENGINE_FORMAT_VERSION,
            "key": self.key.to_dict(),
            "artifacts": str(self.artifacts),
            "precision": self.dtype,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "model": self.model.to_dict(),
            "capacity": self.capacity.to_dict(),
            "kv_layout": [kv.to_dict() for kv in self.kv_layout],
            "generation": self.generation,
            "engines": {name: entry.to_dict() for name, entry in self.engines.items()},
            "files": self.files,
            **({"vision": self.vision.to_dict()} if self.vision else {}),
        }

    def write(self, directory: Path) -> None:
        write_json(directory / MANIFEST, self.to_json())

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> EngineManifest:
        return cls(
            model=ModelConfig.from_dict(data["model"]),
            capacity=Capacity(**data["capacity"]),
            kv_layout=tuple(KVLayer.from_dict(kv) for kv in data["kv_layout"]),
            dtype=str(data["precision"]),
            generation=dict(data.get("generation") or {}),
            directory=directory,
            key=BuildKey(**data["key"]),
            artifacts=Path(data["artifacts"]),
            quantization=Quantization.from_dict(data.get("quantization")),
            engines={name: EngineEntry.from_dict(entry) for name, entry in data["engines"].items()},
            files=dict(data["files"]),
            vision=VisionConfig.from_dict(data["vision"]) if data.get("vision") is not None else None,
        )

    @classmethod
    def read(cls, directory: str | Path) -> EngineManifest:
        """Parses an engine directory's manifest (format, version, fields) without checking the files it names."""
        directory = Path(directory)
        fix = "rebuild it with `canvasrt build`"
        data = _read_json(directory, "an engine directory (the output of `canvasrt build`)", fix)
        if data.get("format") != ENGINE_FORMAT:
            raise ArtifactError(f"{directory} is not an engine directory (run `canvasrt build` on the artifacts)")
        if data.get("format_version") != ENGINE_FORMAT_VERSION:
            raise ArtifactError(
                f"{directory}: {_version_problem(data.get('format_version'), ENGINE_FORMAT_VERSION, 'engine')}; {fix}"
            )
        try:
            manifest = cls.from_json(data, directory)
            check_field_types(manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{directory / MANIFEST} is missing or mistypes a field ({type(exc).__name__}: {exc}); {fix}"
            ) from None
        return manifest

    @classmethod
    def load(cls, directory: str | Path) -> EngineManifest:
        manifest = cls.read(directory)
        for problem in manifest.problems():
            raise ArtifactError(problem)
        return manifest

    def problems(self, digests: bool = False) -> list[str]:
        """Everything that does not match the manifest: engine files outside the directory, missing or of another
        size (and with `digests`, of other contents), layer files named outside it, and build keys that disagree
        with the engines or the quantization they record."""
        fix = "rebuild it with `canvasrt build`"
        found = []
        for graph in dict.fromkeys((*GRAPHS, *self.engines)):  # the backbone's, and every other engine built
            entry = self.engines.get(graph)
            if entry is None:
                found.append(f"{self.directory} lacks the {graph} engine named in its manifest; {fix}")
                continue
            found += file_problems(
                self.directory, entry.file, f"{graph} engine", entry.bytes, entry.sha256 if digests else None, fix
            )
            if entry.layers is not None and entry.layers not in self.files:
                found.append(
                    f"{self.directory / MANIFEST}: the {graph} layer information {entry.layers} has no size and "
                    f"digest in its record (files); {fix}"
                )
            if self.key.graphs.get(graph) != entry.onnx_sha256:
                found.append(
                    f"{self.directory / MANIFEST}: the {graph} engine's graph digest disagrees with the build "
                    f"key; {fix}"
                )
        found += files_problems(self.directory, self.files, fix)
        recorded = self.quantization.calibration_sha256 if self.quantization else None
        if self.key.calibration_sha256 != recorded:
            found.append(
                f"{self.directory / MANIFEST}: the build key's calibration digest disagrees with the "
                f"quantization it records; {fix}"
            )
        return found

    def verify(self) -> None:
        """Raises the first problem, engine digests included (Triton packaging)."""
        for problem in self.problems(digests=True):
            raise ArtifactError(problem)

    def artifact_problems(self) -> list[str]:
        """What is wrong between the engines and the artifact directory they were built from, which Triton packages
        with them (its tokenizer and manifest): an artifact directory that cannot be loaded, other graphs than the
        engines were built from, or another model, K/V layout, dtype, quantization or generation defaults."""
        fix = f"rebuild the engines from {self.artifacts} with `canvasrt build`"
        try:
            artifacts = ArtifactManifest.load(self.artifacts)
        except ArtifactError as exc:
            return [f"the artifacts the engines in {self.directory} were built from cannot be used: {exc}"]
        found = []
        stale = [
            g
            for g, e in self.engines.items()
            if g not in artifacts.graphs or e.onnx_sha256 != artifacts.graphs[g].sha256
        ]
        if stale:
            found.append(
                f"the engines in {self.directory} were built from other graphs than {self.artifacts} now holds; {fix}"
            )
        for what in ("model", "kv_layout", "dtype", "quantization", "generation", "vision"):
            if getattr(self, what) != getattr(artifacts, what):
                found.append(f"{self.directory / MANIFEST} records another {what} than {self.artifacts}; {fix}")
        for graph, entry in self.engines.items():
            source = artifacts.graphs.get(graph)
            if source is not None and (entry.inputs, entry.outputs) != (source.inputs, source.outputs):
                found.append(
                    f"{self.directory / MANIFEST}: the {graph} engine's inputs or outputs differ from its graph's in "
                    f"{self.artifacts}; {fix}"
                )
        return found

    @classmethod
    def load_if_current(cls, directory: Path, key: BuildKey) -> EngineManifest | None:
        """The engine manifest in `directory` when it was built with exactly `key` and its engine files are still
        the ones built (sizes and digests), else None: a build to redo."""
        if manifest_format(directory) != ENGINE_FORMAT:
            return None
        try:
            manifest = cls.load(directory)
        except ArtifactError:
            return None
        return manifest if manifest.key == key and not manifest.problems(digests=True) else None


def directory_problems(directory: str | Path) -> tuple[str, list[str]]:
    """`canvasrt verify` of an artifact or engine directory: its kind and every problem (one line each), digests
    included; a manifest that cannot be read is one problem."""
    directory = Path(directory)
    engines = manifest_format(directory) == ENGINE_FORMAT
    try:
        manifest = EngineManifest.read(directory) if engines else ArtifactManifest.read(directory)
    except ArtifactError as exc:
        return ("engines" if engines else "artifacts"), [str(exc)]
    return ("engines" if engines else "artifacts"), manifest.problems(digests=True)
