"""DiffusionGemma's vision tower (Gemma 4's) and its projector into the text model, as plain PyTorch: the one
implementation the exporter traces into vision.onnx and the torch paths run.

The math follows transformers 5.23's `Gemma4VisionModel` and `DiffusionGemmaMultimodalEmbedder` (reached through
`DiffusionGemmaEncoderModel.get_image_features`) operation for operation, including where they compute in fp32
(norms, attention softmax, pooling, the sqrt(hidden) scale, standardisation) and where they cast back. Parameter
names are the checkpoint's below `model.encoder.` (`vision_tower.*`, `embed_vision.*`), so loading is a prefix.

Input: the Gemma 4 image processor's output, `pixel_values` [images, patches, 3 * patch^2] (values in [0, 1]) and
`image_position_ids` [images, patches, 2] ((x, y) per patch, (-1, -1) for padding patches); patches is a multiple of
pooling_kernel_size^2. Output: the projected soft tokens [images, patches / k^2, text hidden] and which of them are
real [images, patches / k^2]. transformers strips the padding soft tokens inside the model (a data-dependent shape);
here the caller does, with the mask, so the graph keeps static-rank outputs and no NonZero.

Differs from transformers where a graph needs it: one_hot is a comparison with arange, and the attention mask is an
additive bias with a finite minimum instead of -inf (it hides padding keys only, as transformers' bidirectional mask
does; padding patches' outputs are zeroed before pooling either way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import VisionConfig
from .modeling import _HIDDEN, RMSNorm, _linear, linear, rms_norm

CHECKPOINT_PREFIX = "model.encoder."


def _parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


class ClippableLinear(nn.Module):
    """Gemma 4's vision linear (weight under `.linear`), clamping input and output to stored bounds when the config
    says so. The GEMM itself is a `Linear` module, so FP8 calibration and simulation hook its input after the
    clamp, where the graph's Q/DQ sits."""

    def __init__(self, dim_in: int, dim_out: int, clipped: bool):
        super().__init__()
        self.linear = _linear(dim_in, dim_out)
        self.clipped = clipped
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                setattr(self, name, _parameter())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = torch.clamp(x, self.output_min, self.output_max)
        return x


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, P, heads, d]; cos/sin [N, P, d] laid out (x, x, y, y): the first half of the channels rotates by the
    patch's x position, the second by its y position, each half with rotate-half RoPE."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    part = x.shape[-1] // 2
    return torch.cat(
        [
            _rotate(x[..., :part], cos[..., :part], sin[..., :part]),
            _rotate(x[..., part:], cos[..., part:], sin[..., part:]),
        ],
        dim=-1,
    )


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h, d, clip = config.hidden_size, config.head_dim, config.clipped_linears
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.q_proj = ClippableLinear(h, config.num_heads * d, clip)
        self.k_proj = ClippableLinear(h, config.num_kv_heads * d, clip)
        self.v_proj = ClippableLinear(h, config.num_kv_heads * d, clip)
        self.o_proj = ClippableLinear(config.num_heads * d, h, clip)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.eps = config.rms_norm_eps

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [N, P, h]; bias [N, 1, 1, P] additive fp32 (padding keys hidden)."""
        n, p, _ = x.shape
        d, nkv = self.head_dim, self.num_kv_heads
        group = self.num_heads // nkv
        q = axial_rope(self.q_norm(self.q_proj(x).view(n, p, self.num_heads, d)), cos, sin)
        k = axial_rope(self.k_norm(self.k_proj(x).view(n, p, nkv, d)), cos, sin).transpose(1, 2)
        v = rms_norm(self.v_proj(x).view(n, p, nkv, d), None, self.eps).transpose(1, 2)
        # Grouped-query attention as a [N, nkv, group, P, d] view (heads h = kv * group + g, repeat_kv's order)
        q = q.transpose(1, 2).reshape(n, nkv, group, p, d)
        scores = torch.matmul(q, k[:, :, None].transpose(-1, -2))  # scaling is 1.0 in Gemma 4
        probs = torch.softmax(scores.float() + bias[:, :, None], dim=-1).to(x.dtype)
        out = torch.matmul(probs, v[:, :, None]).reshape(n, self.num_heads, p, d).transpose(1, 2)
        return self.o_proj(out.reshape(n, p, self.num_heads * d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h, i, clip = config.hidden_size, config.intermediate_size, config.clipped_linears
        self.gate_proj = ClippableLinear(h, i, clip)
        self.up_proj = ClippableLinear(h, i, clip)
        self.down_proj = ClippableLinear(i, h, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            setattr(self, name, RMSNorm(config.hidden_size, config.rms_norm_eps))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, bias))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Module()
        self.input_proj.weight = _parameter(config.hidden_size, 3 * config.patch_size**2)
        self.position_embedding_table = _parameter(2, config.position_embedding_size, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        weight = self.input_proj.weight
        hidden = linear((2 * (pixel_values - 0.5)).to(weight.dtype), weight)
        clamped = positions.clamp(min=0)
        table = self.position_embedding_table
        embedded = F.embedding(clamped[..., 0], table[0]) + F.embedding(clamped[..., 1], table[1])
        return hidden + torch.where(padding[..., None], torch.zeros((), dtype=embedded.dtype), embedded)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_layers))


class Gemma4VisionTower(nn.Module):
    """`model.encoder.vision_tower`: patch embedding, bidirectional encoder with axial RoPE, spatial pooling,
    standardisation."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.std_bias = _parameter(config.hidden_size)
            self.std_scale = _parameter(config.hidden_size)
        spatial = config.head_dim // 2
        exponents = torch.arange(0, spatial, 2, dtype=torch.float) / spatial
        self.register_buffer("rope_inv_freq", 1.0 / (config.rope_theta**exponents), persistent=False)

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.rope_inv_freq  # [N, P, 2, d / 4]
        fx, fy = freqs[:, :, 0], freqs[:, :, 1]
        angles = torch.cat([fx, fx, fy, fy], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled, scaled (and standardised) features [N, T, hidden] in the model dtype, and the real soft tokens
        [N, T] (T = P / k^2)."""
        k = self.config.pooling_kernel_size
        padding = (positions == -1).all(dim=-1)  # [N, P]
        h = self.patch_embedder(pixel_values, positions, padding)
        dtype = h.dtype
        bias = torch.where(padding, torch.full((), _HIDDEN), torch.zeros((), dtype=torch.float32))[:, None, None, :]
        cos, sin = self._rotary(positions, dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, bias)
        h = h.masked_fill(padding[..., None], 0.0)
        if k > 1:
            h, real = self._pool(h, positions, k)
        else:
            real = ~padding
        h = h.float() * self.config.hidden_size**0.5
        if self.config.standardize:
            h = (h - self.std_bias.float()) * self.std_scale.float()
        return h.to(dtype), real

    def _pool(self, h: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Averages each k x k block of patches (by their positions) into one soft token, in fp32, cast back."""
        tokens = h.shape[1] // (k * k)
        clamped = positions.clamp(min=0)
        width = clamped[..., 0].amax(dim=-1, keepdim=True) + 1
        cell = torch.div(clamped, k, rounding_mode="floor")
        index = cell[..., 0] + torch.div(width, k, rounding_mode="floor") * cell[..., 1]  # [N, P]
        slots = torch.arange(tokens, dtype=index.dtype, device=index.device)
        weights = (index[..., None] == slots).float() / (k * k)  # [N, P, T]
        pooled = torch.matmul(weights.transpose(1, 2), h.float())
        return pooled.to(h.dtype), (weights != 0).any(dim=1)


class MultimodalEmbedder(nn.Module):
    """`model.encoder.embed_vision`: RMSNorm without scale, then a linear map into the text model's width."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embedding_projection = _linear(config.hidden_size, config.text_hidden_size)
        self.eps = config.rms_norm_eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(rms_norm(features, None, self.eps))


class VisionModel(nn.Module):
    """The vision graph: the tower and the projector. forward(pixel_values, image_position_ids) -> soft tokens
    [images, tokens, text hidden] in the model dtype and the mask of real ones [images, tokens]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_tower = Gemma4VisionTower(config)
        self.embed_vision = MultimodalEmbedder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_vision.embedding_projection.weight.dtype

    def forward(
        self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features, real = self.vision_tower(pixel_values, image_position_ids)
        return self.embed_vision(features), real


def vision_checkpoint_name(param_name: str) -> str:
    """The checkpoint tensor behind a parameter of VisionModel."""
    return CHECKPOINT_PREFIX + param_name
