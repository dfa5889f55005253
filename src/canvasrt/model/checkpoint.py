"""A DiffusionGemma checkpoint directory in Hugging Face format, read lazily.

What is physically stored (transformers 5.23 `save_pretrained`): the single text stack under `model.decoder.*`
(encoder text weights and lm_head are tied to it and not saved), each encoder layer's own `layer_scalar`, and the
vision tower with its projector under `model.encoder.vision_tower.*` / `model.encoder.embed_vision.*`
(`load_vision_model`). Weights come from one `model.safetensors` or from shards listed in
`model.safetensors.index.json`; tensors are memory-mapped and materialised one at a time, straight into the model.

config.json is parsed by transformers' own config class, so both serialisations it accepts (the 5.23
`per_layer_config` form and the older explicit `global_head_dim` / `num_global_key_value_heads` form) and its
defaults are interpreted exactly as the reference interprets them, then reduced to canvasrt's `ModelConfig`.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..core.config import FULL, SLIDING, LayerSpec, ModelConfig, VisionConfig
from ..core.contract import DEFAULT_VOCAB_CHUNK
from ..core.errors import CanvasrtError, CheckpointError
from ..core.manifest import resolves_inside, sha256_file
from .modeling import DiffusionGemmaText, stored_layout
from .vision import VisionModel, vision_checkpoint_name

TEXT_PREFIX = "model.decoder."
ENCODER_SCALAR = "model.encoder.language_model.layers.{}.layer_scalar"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # the Gemma 4 image processor's settings
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What a DiffusionGemma weight can be stored as; anything else (integers, F64, FP8) is refused, not converted.
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
COPY_BLOCK = 1 << 24  # bytes per read of the streaming copy (checked, and converted where the dtype differs)


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    tensor_files: dict[str, Path]
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        config = load_model_config(path)
        return cls(path=path, config=config, tensor_files=_index_tensors(path))

    # -- tensors --------------------------------------------------------------------------------------------------

    def _handle(self, name: str) -> Any:
        file = self.tensor_files.get(name)
        if file is None:
            raise CheckpointError(
                f"{self.path} is missing tensor {name}; the checkpoint is incomplete or not DiffusionGemma"
            )
        if file not in self._handles:
            self._handles[file] = _open_safetensors(file)
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def _float_dtype(self, name: str, stored: str) -> torch.dtype:
        if stored not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name} is stored as {stored}, which cannot be a DiffusionGemma "
                f"weight ({', '.join(SAFETENSORS_DTYPES)}); re-save the checkpoint with float weights"
            )
        return SAFETENSORS_DTYPES[stored]

    def _check_finite(self, name: str, values: torch.Tensor, converted_to: str | None = None) -> None:
        # aminmax propagates NaN and shows +-Inf in one pass without a temporary: 20x isfinite().all() on a CPU
        # (2.3 GiB/s against 0.12 on one core here), which matters for a 52 GB checkpoint
        if values.numel() == 0:
            return
        low, high = torch.aminmax(values)
        if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
            return
        if converted_to is not None:
            raise CheckpointError(
                f"{self.path}: tensor {name} overflows {converted_to} (values beyond its range); "
                "use --dtype fp32 or bf16"
            )
        raise CheckpointError(
            f"{self.path}: tensor {name} holds NaN or Inf values; the checkpoint is corrupt: re-save or re-download it"
        )

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name`, refused unless it is a float weight with finite values."""
        self._float_dtype(name, self._handle(name).get_slice(name).get_dtype())
        values = self._handle(name).get_tensor(name)
        self._check_finite(name, values)
        return values

    def converted(self, name: str, dtype: str) -> torch.Tensor:
        """Tensor `name` in `dtype`, refused where the conversion overflows (fp16 holds at most 65504)."""
        values = self.tensor(name)
        if values.dtype == DTYPES[dtype]:
            return values
        values = values.to(DTYPES[dtype])
        self._check_finite(name, values, converted_to=dtype)
        return values

    def stored(self, name: str) -> StoredTensor:
        """Where tensor `name` lies in its safetensors file, read from the header alone."""
        file = self.tensor_files[name]
        entry = _safetensors_header(file)[name]
        begin, end = entry["data_offsets"]
        return StoredTensor(
            file, entry["dtype"], tuple(entry["shape"]), _safetensors_header_size(file) + begin, end - begin
        )

    def write_tensor(self, name: str, dtype: str | None, out: BinaryIO, row_axis: int = 0) -> int:
        """Appends tensor `name`, converted to `dtype` (None: as stored), to `out` without mapping the checkpoint
        into memory: COPY_BLOCK bytes at a time, each block checked as it passes (float, finite) and converted where
        the dtype differs, so that even a layer's expert tensor (0.5 GB at the released width) never sits in memory
        whole. row_axis: the stored axis written first (`StoredLayout.row_axis`), the others following in order."""
        stored = self.stored(name)
        source = self._float_dtype(name, stored.dtype)
        target = source if dtype is None else DTYPES[dtype]
        written = 0
        for view in self._stored_blocks(name, stored, source.itemsize, row_axis):
            values = torch.frombuffer(view, dtype=source)
            self._check_finite(name, values)
            if source != target:
                values = values.to(target)
                self._check_finite(name, values, converted_to=dtype)
                view = memoryview(values.view(torch.uint8).numpy())
            out.write(view)
            written += len(view)
        return written

    def _stored_blocks(self, name: str, stored: StoredTensor, itemsize: int, row_axis: int) -> Iterator[memoryview]:
        """The bytes of a stored tensor in blocks of at most COPY_BLOCK (one row along `row_axis` at least), with that
        axis moved first: a block of rows along it gathers one run of bytes per index of the axes before it."""
        if row_axis == 0:  # the stored order: consecutive bytes
            outer, rows, run = 1, stored.length // itemsize, itemsize
        else:
            outer = int(np.prod(stored.shape[:row_axis], dtype=np.int64))
            rows = stored.shape[row_axis]
            run = int(np.prod(stored.shape[row_axis + 1 :], dtype=np.int64)) * itemsize  # bytes of a row per index
        per_block = max(1, COPY_BLOCK // (outer * run))
        with open(stored.file, "rb") as src:
            for begin in range(0, rows, per_block):
                count = min(per_block, rows - begin)
                block = np.empty((count, outer, run), dtype=np.uint8)
                for index in range(outer):
                    part = block[:, index, :]
                    target = part if outer == 1 else np.empty_like(part)  # readinto needs contiguous memory
                    src.seek(stored.offset + (index * rows + begin) * run)
                    if src.readinto(memoryview(target.reshape(-1))) != target.size:
                        raise CheckpointError(
                            f"{stored.file} ends inside tensor {name}; the file is truncated: re-save or re-download it"
                        )
                    if outer > 1:
                        part[...] = target
                yield memoryview(block.reshape(-1))

    def _checked_shape(self, source: str, implied: tuple[int, ...]) -> None:
        shape = self.shape(source)
        if shape != implied:
            raise CheckpointError(
                f"{self.path}: tensor {source} has shape {list(shape)}, config.json implies {list(implied)}"
            )

    def load_text_model(
        self,
        moe: str = "dense",
        dtype: str = "fp32",
        device: str = "cpu",
        fake_mode: Any = None,
        vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    ) -> DiffusionGemmaText:
        """Builds the export-friendly model and fills it tensor by tensor (no second copy of the weights), each
        checked on the way in (float, finite, the shape config.json implies), converted and moved to `device`.

        fake_mode: a torch FakeTensorMode; the parameters are then fake tensors of it (shape and dtype only, no
        data), for tracing a model of any size without reading its weights."""
        if fake_mode is None:
            self.check_memory(dtype, device, "loading the PyTorch model")
        model = DiffusionGemmaText(self.config, moe=moe, vocab_chunk=vocab_chunk)
        for name, param in list(model.named_parameters()):
            source, layout = checkpoint_name(name), stored_layout(model, name)
            self._checked_shape(source, layout.shape)
            if fake_mode is not None:
                with fake_mode:
                    value = torch.empty(param.shape, dtype=DTYPES[dtype])
            else:
                value = layout.to_parameter(self.converted(source, dtype), param.shape).to(device)
            owner, attr = _owner(model, name)
            owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        text_config = read_config_json(self.path).get("text_config") or {}
        model.bidirectional_images = text_config.get("use_bidirectional_attention") == "vision"
        return model.eval() if fake_mode is not None else model.to(device).eval()  # .to: the RoPE buffers

    @functools.cached_property
    def vision(self) -> VisionConfig | None:
        """The vision tower's config, or None for a checkpoint that stores no vision tower."""
        if not any(name.startswith("model.encoder.vision_tower.") for name in self.tensor_files):
            return None
        return load_vision_config(self.path)

    def require_vision(self) -> VisionConfig:
        vision = self.vision
        if vision is None:
            raise CheckpointError(
                f"{self.path} stores no vision tower (model.encoder.vision_tower.*); it takes no images"
            )
        if not (self.path / PREPROCESSOR_CONFIG).is_file():
            raise CheckpointError(
                f"{self.path} has no {PREPROCESSOR_CONFIG}, the Gemma 4 image processor's settings; copy the "
                "checkpoint's own file there"
            )
        return vision

    def max_soft_tokens(self) -> int:
        """The most soft tokens per image the checkpoint's image processor emits (preprocessor_config.json's
        max_soft_tokens; transformers' default, 280, where it is not set)."""
        path = self.path / PREPROCESSOR_CONFIG
        try:
            data = json.loads(path.read_text())
            value = data.get("max_soft_tokens", 280) if isinstance(data, dict) else None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            value = None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{path} is not an image processor config with a max_soft_tokens; fix or re-copy it")
        return value

    def load_vision_model(self, dtype: str = "fp32", device: str = "cpu", fake_mode: Any = None) -> VisionModel:
        """The vision tower and projector, filled tensor by tensor like `load_text_model` (each checked: float,
        finite, the shape config.json implies)."""
        model = VisionModel(self.require_vision())
        for name, param in list(model.named_parameters()):
            source = vision_checkpoint_name(name)
            self._checked_shape(source, tuple(param.shape))
            if fake_mode is not None:
                with fake_mode:
                    value = torch.empty(param.shape, dtype=DTYPES[dtype])
            else:
                value = self.converted(source, dtype).reshape(param.shape).to(device)
            owner, attr = _owner(model, name)
            owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        return model.eval() if fake_mode is not None else model.to(device).eval()

    def check_memory(self, dtype: str, device: str, what: str) -> None:
        """Refuses, before a weight is read, a load that cannot fit: the weights in `dtype` (sizes from config.json)
        against the memory `device` has available now. Loading them anyway ends in the kernel's OOM killer or a CUDA
        error minutes later, with nothing said about why."""
        parameters = sum(p.numel() for p in DiffusionGemmaText(self.config).parameters())  # meta: shapes only
        needed = parameters * DTYPES[dtype].itemsize
        available = available_memory(device)
        if available is None or needed <= available:
            return
        where = "the GPU has" if device == "cuda" else "this machine has"
        smaller = "" if dtype == "bf16" else f", or --dtype bf16 ({parameters * 2 / 1e9:.1f} GB)"
        raise CanvasrtError(
            f"{what} needs {needed / 1e9:.1f} GB for the weights of {self.path} in {dtype} "
            f"({parameters / 1e9:.2f}B parameters), but {where} {available / 1e9:.1f} GB available; "
            f"free memory, use a machine with more{smaller}"
        )

    def problems(self) -> list[str]:
        """`canvasrt verify` of a checkpoint: every weight the model reads (the vision tower's too, where it has
        one), one at a time (shape, dtype, finite values), one line per problem."""
        found = []
        model = DiffusionGemmaText(self.config)  # meta tensors: shapes only
        for name, _ in model.named_parameters():
            source = checkpoint_name(name)
            try:
                self._checked_shape(source, stored_layout(model, name).shape)
                self.tensor(source)
            except CheckpointError as exc:
                found.append(str(exc))
        try:
            vision = VisionModel(self.vision) if self.vision is not None else None  # meta tensors: shapes only
        except CheckpointError as exc:
            return [*found, str(exc)]
        for name, param in vision.named_parameters() if vision is not None else ():
            source = vision_checkpoint_name(name)
            try:
                self._checked_shape(source, tuple(param.shape))
                self.tensor(source)
            except CheckpointError as exc:
                found.append(str(exc))
        return found

    # -- other files ----------------------------------------------------------------------------------------------

    def generation_config(self) -> dict[str, Any]:
        path = self.path / "generation_config.json"
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({_reason(exc)}); fix or remove it") from None
        if not isinstance(data, dict):
            raise CheckpointError(
                f"{path} holds a JSON {type(data).__name__}, not an object of generation settings; fix or remove it"
            )
        return data

    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    def file_digests(self) -> dict[str, str]:
        """sha256 of config.json and every weight file, so artifacts can name exactly what they came from."""
        files = [self.path / "config.json", *sorted(set(self.tensor_files.values()))]
        return {f.name: sha256_file(f) for f in files}

    def check_source_of(self, spec: Any, target: str | Path) -> None:
        """Refuses this checkpoint where `spec` (an artifact or engine manifest, or any StepSpec) was made from another
        one: another config, or, where the artifacts record the checkpoint's file digests, other weights (a
        checkpoint of the same config, retrained or re-written, at the same or another path). One line naming the
        files that differ."""
        if spec.model != self.config:
            raise CheckpointError(
                f"{target} was exported from a checkpoint with another config than {self.path}; pass the checkpoint "
                f"it came from, or re-export {target} from this one"
            )
        source = spec.source_checkpoint() if hasattr(spec, "source_checkpoint") else None
        if source is None:
            return
        recorded = dict(source.get("files") or {})
        actual = self.file_digests()
        differing = sorted(name for name in recorded.keys() | actual.keys() if recorded.get(name) != actual.get(name))
        if differing:
            shown = ", ".join(differing[:3]) + (f" and {len(differing) - 3} more" if len(differing) > 3 else "")
            raise CheckpointError(
                f"{self.path} is not the checkpoint {target} was exported from ({source.get('path')}): {shown} "
                f"differ from the digests its manifest records; pass that checkpoint, or re-export {target} from "
                "this one"
            )


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # of the first byte in the file
    length: int


def _index_tensors(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(
                f"{index} is not a safetensors index (an object whose weight_map maps tensor names "
                "to file names); re-save the checkpoint"
            )
        files = {name: _weight_file(path, file, index.name) for name, file in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{path} is missing shard(s) {', '.join(missing)} listed in {index.name}")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json; it holds no weights")
    _weight_file(path, single.name, single.name)
    return dict.fromkeys(_open_safetensors(single).keys(), single)


def _open_safetensors(path: Path) -> Any:
    """safe_open, which checks the header and that the tensors cover the file exactly; a bad file is one line."""
    try:
        return safe_open(str(path), framework="pt")
    except OSError:
        # safetensors reports every file it cannot open as "No such file"; Python's own open names the real cause
        # (permission denied, say), which the CLI prints as one line
        path.open("rb").close()
        raise
    except SafetensorError as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({_reason(exc)}); it is truncated or "
            "corrupt: copy or re-save the checkpoint"
        ) from None


def _weight_file(path: Path, name: str, source: str) -> Path:
    """`path / name`, refused when it resolves outside the checkpoint directory: an index naming `../x` or a link
    to elsewhere would make canvasrt read (and hash into the manifest) a file the user never named. The one link
    out accepted is the Hugging Face cache's: `<repo>/snapshots/<rev>/<file>` pointing into `<repo>/blobs/`, the
    layout of every checkpoint huggingface_hub downloads."""
    file = path / name
    if resolves_inside(path, name):
        return file
    snapshot = path.resolve()
    lexical = Path(name)
    in_hub_cache = (
        snapshot.parent.name == "snapshots"
        and not lexical.is_absolute()
        and ".." not in lexical.parts
        and file.resolve().parent == snapshot.parent.parent / "blobs"
    )
    if not in_hub_cache:
        raise CheckpointError(
            f"{path}: {source} names the weight file {name}, which resolves outside the checkpoint "
            f"directory; put the file itself in {path} (or fix {source})"
        )
    return file


@functools.lru_cache(maxsize=64)
def _safetensors_header_size(path: Path) -> int:
    _open_safetensors(path)  # the same checks as the tensors' reader before trusting the length field
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@functools.lru_cache(maxsize=64)
def _safetensors_header(path: Path) -> dict[str, Any]:
    size = _safetensors_header_size(path) - 8
    with open(path, "rb") as f:
        f.seek(8)
        return dict(json.loads(f.read(size)))


def _reason(exc: Exception) -> str:
    """An exception's message on one line (safetensors and transformers indent theirs over several)."""
    text = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
    return " ".join(text.split()).removeprefix("Error while deserializing header: ") or type(exc).__name__


DEVICES = ("cpu", "cuda")


def torch_device(device: str) -> str:
    """A --device value checked against what this PyTorch can use; one line naming the fix otherwise."""
    if device not in DEVICES:
        raise CanvasrtError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}, " + (
            "built without CUDA"
            if torch.version.cuda is None
            else f"CUDA {torch.version.cuda}, no GPU or driver visible"
        )
        raise CanvasrtError(f"--device cuda requested but torch sees no GPU ({build}); use --device cpu")
    return device


def available_memory(device: str) -> int | None:
    """Bytes a load on `device` can take now: the host's MemAvailable, lowered to what the cgroup (a container's
    memory limit) leaves; the GPU's free memory for cuda. None where the system does not say (no /proc)."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    meminfo = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 memory controller here: the host's figure stands
    return available


def checkpoint_name(param_name: str) -> str:
    """The checkpoint tensor behind a parameter of DiffusionGemmaText."""
    if param_name.endswith("encoder_layer_scalar"):
        return ENCODER_SCALAR.format(param_name.split(".")[1])
    return TEXT_PREFIX + param_name


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def read_config_json(checkpoint_dir: Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / "config.json"
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(f"{checkpoint_dir} is not a directory; pass a Hugging Face checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no config.json; pass a Hugging Face checkpoint directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix or re-save it") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; fix or re-save it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not a config object; fix or re-save it")
    model_type = data.get("model_type")
    if model_type != "diffusion_gemma":
        raise CheckpointError(
            f"{path} has model_type {model_type!r}, not 'diffusion_gemma'; "
            "canvasrt only handles DiffusionGemma checkpoints"
        )
    return data


def load_model_config(checkpoint_dir: Path) -> ModelConfig:
    """Parses config.json (either serialisation) into a ModelConfig, with transformers' own checks (types, layer
    types and their count) and then `check_model_config`'s: every config value is checked here, once."""
    read_config_json(checkpoint_dir)
    from huggingface_hub.errors import StrictDataclassError
    from transformers import DiffusionGemmaConfig

    path = Path(checkpoint_dir) / "config.json"
    try:
        hf = DiffusionGemmaConfig.from_pretrained(str(checkpoint_dir))
    except (ValueError, TypeError, KeyError, StrictDataclassError) as exc:
        # transformers' type errors go on to list every type a field could have; the field and its value say enough
        reason = _reason(exc).split(" doesn't match any type")[0]
        raise CheckpointError(f"{path} is not a valid DiffusionGemma config: {reason[:300]}; fix config.json") from None
    try:
        config = model_config_from_hf(hf)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}; fix config.json") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(
            f"{path} is not a valid DiffusionGemma config ({type(exc).__name__}: {_reason(exc)[:200]}); fix config.json"
        ) from None
    problem = check_model_config(config)
    if problem:
        raise CheckpointError(f"{path}: {problem}; fix config.json")
    return config


def load_vision_config(checkpoint_dir: Path) -> VisionConfig:
    """The vision tower's geometry and the image prompt layout from config.json (through transformers' config)."""
    from transformers import DiffusionGemmaConfig

    hf = DiffusionGemmaConfig.from_pretrained(str(checkpoint_dir))
    vision, text = hf.vision_config, hf.text_config
    rope = dict(vision.rope_parameters or {})
    if rope.get("rope_type", "axial") != "axial":
        raise CheckpointError(
            f"{checkpoint_dir}/config.json: the vision tower uses RoPE {rope}; Gemma 4's vision tower is axial; "
            "fix config.json"
        )
    if getattr(vision, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(
            f"{checkpoint_dir}/config.json: the vision tower's activation {vision.hidden_activation!r} is not "
            "gelu_pytorch_tanh, Gemma 4's; fix config.json"
        )
    head_dim = int(getattr(vision, "head_dim", None) or vision.hidden_size // vision.num_attention_heads)
    config = VisionConfig(
        hidden_size=int(vision.hidden_size),
        intermediate_size=int(vision.intermediate_size),
        num_layers=int(vision.num_hidden_layers),
        num_heads=int(vision.num_attention_heads),
        num_kv_heads=int(vision.num_key_value_heads),
        head_dim=head_dim,
        rms_norm_eps=float(vision.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 100.0)),
        patch_size=int(vision.patch_size),
        pooling_kernel_size=int(vision.pooling_kernel_size),
        position_embedding_size=int(vision.position_embedding_size),
        standardize=bool(vision.standardize),
        clipped_linears=bool(vision.use_clipped_linears),
        text_hidden_size=int(text.hidden_size),
        image_token_id=int(hf.image_token_id),
        boi_token_id=int(hf.boi_token_id),
        eoi_token_id=int(hf.eoi_token_id),
        bidirectional=getattr(text, "use_bidirectional_attention", None) == "vision",
    )
    outside = [
        name
        for name in ("image_token_id", "boi_token_id", "eoi_token_id")
        if not 0 <= getattr(config, name) < int(text.vocab_size)
    ]
    if outside:
        raise CheckpointError(
            f"{checkpoint_dir}/config.json: {outside[0]} {getattr(config, outside[0])} is outside the vocabulary "
            f"[0, {text.vocab_size}); fix config.json"
        )
    if head_dim % 4 or config.num_heads % config.num_kv_heads:
        raise CheckpointError(
            f"{checkpoint_dir}/config.json: the vision tower's head_dim {head_dim} must be a multiple of 4 (axial "
            f"RoPE) and its {config.num_kv_heads} key/value heads must divide its {config.num_heads} heads; fix "
            "config.json"
        )
    return config


def check_model_config(config: ModelConfig) -> str | None:
    """The first value of `config` that the model cannot run with, or None. Beyond transformers' checks: what
    canvasrt's graphs (and the reference's own modules) need, e.g. top-k within the experts, a sliding window of at
    least 2 (a ring of W - 1 cached tokens), GQA head counts, even head dims for RoPE, ids inside the vocabulary.
    (Layer types are checked while reading them: each selects its RoPE parameters.)"""
    positive = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_heads,
        "num_experts": config.num_experts,
        "top_k_experts": config.top_k_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "canvas_length": config.canvas_length,
        "max_position_embeddings": config.max_position_embeddings,
        "num_hidden_layers": config.num_layers,
    }
    for name, value in positive.items():
        if value < 1:
            return f"{name} must be at least 1, got {value}"
    if config.top_k_experts > config.num_experts:
        return f"top_k_experts {config.top_k_experts} exceeds num_experts {config.num_experts}"
    if config.sliding_window < 2:
        return f"sliding_window must be at least 2 (a token and one cached neighbour), got {config.sliding_window}"
    if config.canvas_length >= config.max_position_embeddings:
        return (
            f"canvas_length {config.canvas_length} leaves no position for a prompt within "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    for name, value in (("rms_norm_eps", config.rms_norm_eps), ("final_logit_softcapping", config.logit_softcap)):
        if not (math.isfinite(value) and value > 0):
            return f"{name} must be a positive number, got {value}"
    for idx, layer in enumerate(config.layers):
        if layer.head_dim < 2 or layer.head_dim % 2:
            return f"layer {idx} has head_dim {layer.head_dim}; RoPE needs an even head_dim of at least 2"
        if layer.num_kv_heads < 1 or config.num_heads % layer.num_kv_heads:
            return (
                f"layer {idx} has {layer.num_kv_heads} key/value heads, which do not divide "
                f"num_attention_heads {config.num_heads}"
            )
        if not (math.isfinite(layer.rope_theta) and layer.rope_theta > 0):
            return f"layer {idx} has rope_theta {layer.rope_theta}; it must be a positive number"
    for name, ids in (("pad_token_id", (config.pad_token_id,)), ("eos_token_id", config.eos_token_ids)):
        outside = [i for i in ids if not 0 <= i < config.vocab_size]
        if outside:
            return f"{name} {outside[0]} is outside the vocabulary [0, {config.vocab_size})"
    return None


def model_config_from_hf(hf: Any) -> ModelConfig:
    text = hf.text_config
    layers = []
    for idx, kind in enumerate(text.layer_types):
        if kind not in (SLIDING, FULL):
            raise CheckpointError(
                f"layer {idx} has layer type {kind!r}; DiffusionGemma layers are {SLIDING!r} or {FULL!r}"
            )
        per_layer = text.per_layer_config[idx]
        rope = text.rope_parameters[kind]
        head_dim = int(per_layer.head_dim)
        rope_type = rope.get("rope_type", "default")
        if rope_type == "proportional":
            # Proportional RoPE rotates int(factor * head_dim // 2) frequency pairs; exponents use the full head_dim.
            rotary_pairs = int(rope.get("partial_rotary_factor", 1.0) * head_dim // 2)
        elif rope_type == "default" and rope.get("partial_rotary_factor", 1.0) == 1.0:
            rotary_pairs = head_dim // 2
        else:
            raise CheckpointError(f"layer {idx} uses RoPE {rope}, which canvasrt does not implement")
        layers.append(
            LayerSpec(
                kind=kind,
                head_dim=head_dim,
                num_kv_heads=int(per_layer.num_key_value_heads),
                rope_theta=float(rope["rope_theta"]),
                rotary_pairs=rotary_pairs,
                value_from_key=kind == FULL,
            )
        )
    eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        eos = text.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    if not text.num_experts or not text.top_k_experts:
        raise CheckpointError("config has no MoE (num_experts/top_k_experts unset); DiffusionGemma always has experts")
    if text.final_logit_softcapping is None:  # the reference divides the logits by it unconditionally
        raise CheckpointError(
            "config has no final_logit_softcapping; DiffusionGemma's logits are always softcapped "
            "(30.0 in the released config)"
        )
    return ModelConfig(
        vocab_size=int(text.vocab_size),
        hidden_size=int(text.hidden_size),
        intermediate_size=int(text.intermediate_size),
        num_heads=int(text.num_attention_heads),
        layers=tuple(layers),
        sliding_window=int(text.sliding_window),
        rms_norm_eps=float(text.rms_norm_eps),
        logit_softcap=float(text.final_logit_softcapping),
        num_experts=int(text.num_experts),
        top_k_experts=int(text.top_k_experts),
        moe_intermediate_size=int(text.moe_intermediate_size),
        canvas_length=int(hf.canvas_length),
        max_position_embeddings=int(text.max_position_embeddings),
        pad_token_id=int(text.pad_token_id if text.pad_token_id is not None else 0),
        eos_token_ids=tuple(int(e) for e in eos_ids),
    )
