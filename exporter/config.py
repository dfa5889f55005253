"""The text-stack configuration of a DiffusionGemma checkpoint, as plain data.

transformers' own config class parses config.json, so both serialisations it accepts (the 5.23 `per_layer_config`
form and the older explicit `global_head_dim` / `num_global_key_value_heads` form) and its defaults are interpreted
exactly as the reference interprets them. Everything downstream (the export-friendly model, the manifest, the
runtime) sees only the frozen `ModelConfig` below.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class LayerSpec:
    """Attention geometry of one layer; sliding and full layers differ in all of it."""

    kind: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rotary_pairs: int  # frequency pairs that rotate (inv_freq[i] = theta^(-2i/head_dim)); the rest have frequency 0
    value_from_key: bool  # full layers have no v_proj: V is the normalised raw k_proj output


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    layers: tuple[LayerSpec, ...]
    sliding_window: int
    rms_norm_eps: float
    logit_softcap: float
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    canvas_length: int
    max_position_embeddings: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...] = field(default=())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def sliding_capacity(self) -> int:
        """Cached tokens a sliding layer can see: W - 1, exactly what transformers' sliding cache keeps."""
        return self.sliding_window - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    model_type = data.get("model_type")
    if model_type != "diffusion_gemma":
        raise CheckpointError(
            f"{path} has model_type {model_type!r}, not 'diffusion_gemma'; canvasrt only handles DiffusionGemma checkpoints"
        )
    return data


def load_model_config(checkpoint_dir: Path) -> ModelConfig:
    """Parses config.json (either serialisation) into a ModelConfig."""
    read_config_json(checkpoint_dir)
    from transformers import DiffusionGemmaConfig

    try:
        hf = DiffusionGemmaConfig.from_pretrained(str(checkpoint_dir))
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{checkpoint_dir}/config.json is not a valid DiffusionGemma config: {exc}") from None
    return model_config_from_hf(hf)


def model_config_from_hf(hf: Any) -> ModelConfig:
    text = hf.text_config
    layers = []
    for idx, kind in enumerate(text.layer_types):
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
