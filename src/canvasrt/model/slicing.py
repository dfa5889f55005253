"""`canvasrt slice`: a checkpoint made of a few of another checkpoint's layers, with their real weights.

A CI machine cannot hold the released model, but it can hold two of its layers: the embedding, the final norm, the
self-conditioning MLP, the vision tower and the chosen layers are copied byte for byte (tensor by tensor, never the
whole checkpoint in memory), renumbered, and described by a config.json whose layer pattern and per-layer geometry
are those of the chosen layers. The result is an ordinary checkpoint: transformers loads it, canvasrt exports it,
and parity of the few layers checks the real weights' numerics (few-layer numeric validation).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..core.config import FULL
from ..core.errors import CheckpointError
from ..core.manifest import write_json
from ..core.output import staged_directory
from .checkpoint import Checkpoint, read_config_json
from .random_checkpoint import CHECKPOINT_OUTPUT, MARKER, MARKER_FORMAT

# Per-layer tensors of the text stack (decoder) and the encoder's own layer scalars.
LAYER_TENSOR = re.compile(r"^(model\.(?:decoder|encoder\.language_model)\.layers\.)(\d+)(\..+)$")
SHARD_BYTES = 4 << 30  # output shards stay below this (a single tensor larger than it gets a shard of its own)
ALIGNMENT = 8  # safetensors pads its header so that the data starts 8-byte aligned
WEIGHT_FILES = re.compile(r"^model.*\.safetensors(\.index\.json)?$")


def slice_checkpoint(checkpoint_dir: str | Path, layers: list[int], output: str | Path) -> int:
    """Writes the checkpoint of `layers` (in that order) to `output`; returns the bytes of tensors written."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    checkpoint = Checkpoint.open(checkpoint_dir)
    config = checkpoint.config
    _check_layers(Path(checkpoint_dir), layers, [spec.kind for spec in config.layers])
    # Every tensor config.json implies must be there with its shape, checked from the headers without reading the
    # weights: first in the source (so that an error names it), then in the result.
    checkpoint.load_text_model(fake_mode=FakeTensorMode())
    renumber = {old: new for new, old in enumerate(layers)}
    plan = []  # (output name, source name) in the source's order
    for name in sorted(checkpoint.tensor_files):
        match = LAYER_TENSOR.match(name)
        if match is None:
            plan.append((name, name))
        elif int(match.group(2)) in renumber:
            plan.append((f"{match.group(1)}{renumber[int(match.group(2))]}{match.group(3)}", name))
    with staged_directory(output, CHECKPOINT_OUTPUT, inputs=[checkpoint_dir]) as staging:
        for source in Path(checkpoint_dir).iterdir():
            if source.is_file() and source.name not in ("config.json", MARKER) and not WEIGHT_FILES.match(source.name):
                shutil.copy2(source, staging / source.name)
        write_json(
            staging / MARKER,
            {
                "format": MARKER_FORMAT,
                "written_by": "canvasrt slice",
                "source": str(Path(checkpoint_dir).resolve()),
                "layers": layers,
            },
        )
        (staging / "config.json").write_text(json.dumps(_sliced_config(Path(checkpoint_dir), layers), indent=2) + "\n")
        written = _write_shards(checkpoint, plan, staging)
        Checkpoint.open(staging).load_text_model(fake_mode=FakeTensorMode())
    return written


def _check_layers(path: Path, layers: list[int], kinds: list[str]) -> None:
    n = len(kinds)
    missing = [i for i in layers if not 0 <= i < n]
    if missing:
        raise CheckpointError(
            f"{path} has no layer {missing[0]}: it has {n} layers (0-{n - 1}); pass indices in that range"
        )
    if len(set(layers)) != len(layers):
        raise CheckpointError(f"--layers lists a layer more than once ({','.join(map(str, layers))}); list each once")
    if kinds[layers[-1]] != FULL:
        full = [i for i, kind in enumerate(kinds) if kind == FULL]
        raise CheckpointError(
            f"layer {layers[-1]} is a sliding-window layer, but a checkpoint's last layer must be full attention "
            f"(transformers forces it); end --layers with a full-attention layer: {', '.join(map(str, full))}"
        )


def _sliced_config(path: Path, layers: list[int]) -> dict:
    """config.json with the chosen layers: count, layer types and, in the per_layer_config form, their geometry
    (the older form's global_head_dim / num_global_key_value_heads apply to any full layer as they are)."""
    config = read_config_json(path)
    from transformers import DiffusionGemmaConfig

    text = config["text_config"]
    layer_types = list(DiffusionGemmaConfig.from_pretrained(str(path)).text_config.layer_types)
    text["num_hidden_layers"] = len(layers)
    text["layer_types"] = [layer_types[i] for i in layers]
    if "per_layer_config" in text:
        per_layer = {str(k): v for k, v in text["per_layer_config"].items()}
        text["per_layer_config"] = {
            str(new): per_layer[str(old)] for new, old in enumerate(layers) if str(old) in per_layer
        }
    return config


def _write_shards(checkpoint: Checkpoint, plan: list[tuple[str, str]], directory: Path) -> int:
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for entry in plan:
        length = checkpoint.stored(entry[1]).length
        if shards[-1] and size + length > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += length
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        total += _write_safetensors(checkpoint, shard, directory / name)
        weight_map.update({out: name for out, _ in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _write_safetensors(checkpoint: Checkpoint, tensors: list[tuple[str, str]], path: Path) -> int:
    """One safetensors file: the header from the sources' headers, then each tensor's bytes copied as stored."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for out, source in tensors:
        stored = checkpoint.stored(source)
        header[out] = {
            "dtype": stored.dtype,
            "shape": list(stored.shape),
            "data_offsets": [offset, offset + stored.length],
        }
        offset += stored.length
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, source in tensors:
            checkpoint.write_tensor(source, None, f)
    return offset
