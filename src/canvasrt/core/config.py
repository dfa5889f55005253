"""The text-stack configuration of a DiffusionGemma model, as plain data (standard library only).

`canvasrt.model.checkpoint` fills it from a checkpoint's config.json through transformers' own config class; every
later stage reads it back from a manifest (`ModelConfig.from_dict`). Nothing downstream sees transformers' config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The inverse of to_dict (lists back to tuples); KeyError/TypeError on a malformed dict."""
        fields = dict(data)
        fields["layers"] = tuple(LayerSpec(**layer) for layer in fields["layers"])
        fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
        return cls(**fields)


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower (Gemma 4's), its projector into the text model, and how image prompts are laid out: the
    tokens that mark an image in a prompt and whether the encoder attends bidirectionally within an image."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    standardize: bool  # the pooled features are standardised with the checkpoint's std_bias / std_scale
    clipped_linears: bool  # every linear clamps its input and output to the checkpoint's stored bounds
    text_hidden_size: int
    image_token_id: int  # the soft-token placeholder: one per soft token of an image
    boi_token_id: int  # begin of image
    eoi_token_id: int  # end of image
    bidirectional: bool  # text_config.use_bidirectional_attention == "vision": soft tokens of one image see each other

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        return cls(**data)
