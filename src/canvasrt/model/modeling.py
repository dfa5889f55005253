"""DiffusionGemma's text stack as plain PyTorch with explicit state: the one model canvasrt exports and runs.

The encoder and the decoder are the same transformer, so there is one traced entry point,
`DiffusionGemmaText.step`, a pure function of its tensor inputs (no cache objects, no data-dependent control flow, no
in-place updates of inputs) that `torch.onnx.export` traces into the one backbone graph. Its phase follows from the
shape of the sampler inputs: `rows` (= self_cond.shape[1]) is 0 for the encoder and the chunk length for a denoising
step, "the first `rows` tokens of the chunk are canvas tokens".

- encoder phase (rows = 0: prompt prefill or canvas commit): causal over the chunk, which reads the K/V buffers of
  the committed context; the caller writes the chunk's K/V (an output of every call) into the buffers at its
  positions. The last layer's attention and FFN, the LM head and the sampler run on zero rows: they cost nothing.
- denoising phase (rows = chunk = canvas): bidirectional over the canvas with self-conditioning, then the sampler
  math of transformers' `generate` (temperature, sampling, entropy-bound acceptance, renoising, the next
  self-conditioning soft embedding), so that no [batch, canvas, vocabulary] tensor has to leave the step.

`encode` and `denoise` are the eager forms of the two phases (the torch backend, parity and calibration use them);
they run the same layers as `step`.

K/V buffer layout (see docs/ARTIFACTS.md): full-attention layers keep one slot per absolute position up to the
declared context capacity; sliding layers keep a ring of `sliding_capacity` slots (slot = position mod capacity),
which is exactly what a sliding layer may see (transformers keeps the last W - 1 tokens). Which slot holds which
position, and whether it is visible, is recomputed in the graph from `context_length` and `context_mask`.

The math follows transformers 5.23's `modeling_diffusion_gemma.py` operation for operation, including where it
computes in fp32 (norms, softmaxes, router, logits) and where it casts back, because parity is measured against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import SLIDING, LayerSpec, ModelConfig
from ..core.contract import DEFAULT_VOCAB_CHUNK

MOE_FORMULATIONS = ("dense", "sparse", "grouped")
# Tokens per sampling group: the chunked sampler keeps one probability mass per group, then looks inside one group.
SAMPLING_GROUP = 16
# Runs of tokens the dense experts process one after the other (`Experts._dense`).
DENSE_PIECES = 4
DownInputHook = Callable[[torch.Tensor, torch.Tensor, int], "torch.Tensor | None"]


@dataclass(frozen=True)
class StoredLayout:
    """Where a parameter's values lie in its checkpoint tensor: that tensor's shape, and which of its axes runs along
    the parameter's first axis; the other axes follow in their order, and the result is reshaped to the parameter's
    shape. Row axis 0 is the stored order itself (a reshape at most: the same bytes)."""

    shape: tuple[int, ...]
    row_axis: int = 0

    def to_parameter(self, stored: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return stored.movedim(self.row_axis, 0).reshape(shape)


# Differs from transformers (which masks with -inf through its mask builders): the additive bias for hidden keys is
# finite on purpose. A query that sees no key (a left-padding position in prefill) must get a uniform softmax, not
# NaN, because NaN would leak into the K/V buffers; visible keys get exactly the same probabilities either way.
_HIDDEN = torch.finfo(torch.float32).min


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma RMSNorm: fp32 inside, weight applied as-is (not 1 + w), cast back to the input dtype."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through a 2-D matmul: it exports as Gemm(transB=1), so the graph keeps the weight as stored
    instead of carrying a transposed copy of it (which would double the export's memory and the file size)."""
    return F.linear(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def _linear(dim_in: int, dim_out: int) -> Linear:
    return Linear(dim_in, dim_out, bias=False, device="meta").requires_grad_(False)


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)): the dense MLP of every layer and the self-conditioning MLP."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = _linear(hidden, intermediate)
        self.up_proj = _linear(hidden, intermediate)
        self.down_proj = _linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def inverse_frequencies(spec: LayerSpec) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim / 2], computed exactly as transformers computes them; pairs beyond
    `rotary_pairs` get frequency 0 (they pass through unrotated)."""
    half = spec.head_dim // 2
    exponents = torch.arange(0, 2 * spec.rotary_pairs, 2, dtype=torch.int64).float() / spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta**exponents)
    return torch.cat([inv_freq, torch.zeros(half - spec.rotary_pairs)])


def rotary_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, head_dim] for rotate-half RoPE at absolute positions."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, d]; cos/sin [B, S, d]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.num_heads = config.num_heads
        d, nkv = spec.head_dim, spec.num_kv_heads
        self.q_proj = _linear(config.hidden_size, config.num_heads * d)
        self.k_proj = _linear(config.hidden_size, nkv * d)
        self.v_proj = None if spec.value_from_key else _linear(config.hidden_size, nkv * d)
        self.o_proj = _linear(config.num_heads * d, config.hidden_size)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.eps = config.rms_norm_eps

    def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V this layer caches for tokens x: post-norm, post-RoPE keys and normalised values [B, nkv, S, d]."""
        b, s, _ = x.shape
        raw_k = self.k_proj(x).view(b, s, self.spec.num_kv_heads, self.spec.head_dim)
        raw_v = raw_k if self.v_proj is None else self.v_proj(x).view(b, s, self.spec.num_kv_heads, self.spec.head_dim)
        k = apply_rotary(self.k_norm(raw_k), cos, sin).transpose(1, 2)
        v = rms_norm(raw_v, None, self.eps).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, S, H]; keys/values [B, nkv, L, d] (the call's tokens, then the context); bias [B, 1, S or 1, L]
        additive fp32."""
        b, s, _ = x.shape
        d, nkv = self.spec.head_dim, self.spec.num_kv_heads
        group = self.num_heads // nkv
        q = apply_rotary(self.q_norm(self.q_proj(x).view(b, s, self.num_heads, d)), cos, sin)
        # Differs from transformers' repeat_kv + matmul: grouped-query attention as a [B, nkv, group, S, d] view, so
        # the graph never materialises repeated K/V; heads h = kv * group + g, the same order as repeat_kv.
        q = q.transpose(1, 2).reshape(b, nkv, group, s, d)
        scores = torch.matmul(q, keys[:, :, None].transpose(-1, -2))  # scaling is 1.0 in Gemma 4
        probs = torch.softmax(scores.float() + bias[:, :, None], dim=-1).to(x.dtype)
        out = torch.matmul(probs, values[:, :, None])  # [B, nkv, group, S, d]
        return self.o_proj(out.reshape(b, self.num_heads, s, d).transpose(1, 2).reshape(b, s, self.num_heads * d))


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.proj = _linear(config.hidden_size, config.num_experts)
        self.scale = nn.Parameter(torch.empty(config.hidden_size, device="meta"), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.empty(config.num_experts, device="meta"), requires_grad=False)
        self.top_k = config.top_k_experts
        self.eps = config.rms_norm_eps
        self.root_size = config.hidden_size**-0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert weights (fp32, renormalised, then scaled per expert) and indices, [T, k] each."""
        z = rms_norm(x, None, self.eps) * self.scale * self.root_size
        probs = torch.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """The routed experts, in one of three exact formulations (`MOE_FORMULATIONS`). All differ from transformers'
    eager experts, a Python loop over the experts hit by the batch, which cannot be traced into a static graph; the
    sums they compute are the same up to float summation order. Each applies the routing weights to the activations
    between the two GEMMs (transformers scales the down-projection's output: the same product, since the
    down-projection is linear), so that every formulation's down-projection reads the same values: the routed
    activations, already weighted, zero where a token is not routed to an expert.

    dense: every expert runs on every token, as two plain 2-D GEMMs over all experts' concatenated weights:
      x [T, H] times gate_up [E*2I, H] (the checkpoint's [E, 2I, H] as it is stored), the gated activation
      [T, E, I] times a [T, E] weight matrix (zero for unselected experts), then [T, E*I] times down [H, E*I] (the
      checkpoint's [E, H, I] with the hidden axis first, see `stored_layouts`). Static shapes, and GEMMs that
      TensorRT runs on FP8 tensor cores once their weights are FP8; num_experts / top_k times the routed FLOPs.
    sparse: each expert runs only on the tokens routed to it (select, compute, scatter-add back), so shapes depend
      on the routing; routed FLOPs only, but one NonZero/ScatterND branch per expert in the graph.
    grouped: the tokens routed to each expert are gathered into one [experts, capacity, H] batch, where capacity is
      the busiest expert's token count in this call (a runtime value, so no token is ever dropped), and run through
      batched GEMMs over the weights as stored ([E, 2I, H], [E, H, I]); one branch for all experts, at
      experts x capacity token-rows instead of experts x tokens. Slots beyond an expert's own tokens hold other
      tokens at routing weight zero.
    """

    def __init__(self, config: ModelConfig, formulation: str):
        super().__init__()
        if formulation not in MOE_FORMULATIONS:
            raise ValueError(f"unknown MoE formulation {formulation!r}; use one of {MOE_FORMULATIONS}")
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        gate_up, down = (e, 2 * i, h), (e, h, i)  # the checkpoint's shapes
        # How the parameters lie in the checkpoint's tensors, where that is not as they are used: the dense
        # formulation's 2-D weights, whose down-projection takes the checkpoint's hidden axis as its rows.
        self.stored_layouts: dict[str, StoredLayout] = {}
        if formulation == "dense":
            self.stored_layouts = {"gate_up_proj": StoredLayout(gate_up), "down_proj": StoredLayout(down, row_axis=1)}
            gate_up, down = (e * 2 * i, h), (h, e * i)
        self.gate_up_proj = nn.Parameter(torch.empty(gate_up, device="meta"), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(down, device="meta"), requires_grad=False)
        self.num_experts = e
        self.intermediate = i
        self.canvas = config.canvas_length
        self.formulation = formulation
        # Calibration's hook on the down-projection's input: (act [N, E', I], routed [N, E'], first), a view of the
        # weighted activations of N token slots and the E' consecutive experts from `first`, and which slots are
        # routed to each (dense: all tokens and experts; grouped: every expert's slots; sparse: one expert, its
        # routed tokens). It records ranges, or returns a replacement (fake quantization). Eager only; None while
        # exporting.
        self.down_input_hook: DownInputHook | None = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x [T, H] (already pre-normed); weights/index [T, k] from the router."""
        if self.formulation == "dense":
            return self._dense(x, weights, index)
        if self.formulation == "grouped":
            return self._grouped(x, weights, index)
        return self._sparse(x, weights, index)

    def _gated(self, gate_up: torch.Tensor, axis: int) -> torch.Tensor:
        gate, up = gate_up.split(self.intermediate, dim=axis)
        return F.gelu(gate, approximate="tanh") * up

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """In up to DENSE_PIECES consecutive runs of the tokens, one after the other, each of at least a canvas
        (`canvas_length`) and of a DENSE_PIECES-th of the tokens: every expert's activations of a run
        ([run, E, 2I] and its gated halves) are what the experts keep alive, so up to DENSE_PIECES canvases they
        hold one canvas's worth whatever the number of rows, beyond that a DENSE_PIECES-th of the tokens' worth.
        A call of one canvas or less is one run, as one GEMM pair; runs past the tokens are empty."""
        experts = torch.arange(self.num_experts, dtype=index.dtype, device=index.device)
        combine = ((index[:, :, None] == experts).to(weights.dtype) * weights[:, :, None]).sum(dim=1)  # [T, E]
        tokens = x.shape[0]
        run = torch.sym_max(self.canvas, (tokens + DENSE_PIECES - 1) // DENSE_PIECES)
        bounds = [torch.sym_min(tokens, run * piece) for piece in range(DENSE_PIECES + 1)]
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            part, mix = x[start:end], combine[start:end]
            gate_up = linear(part, self.gate_up_proj).reshape(-1, self.num_experts, 2 * self.intermediate)
            act = (self._gated(gate_up, -1) * mix[:, :, None]).to(x.dtype)  # [T / pieces, E, I]
            if self.down_input_hook is not None:
                act = _hooked(self.down_input_hook, act, mix != 0, 0)
            outs.append(linear(act.reshape(-1, self.num_experts * self.intermediate), self.down_proj))
        return torch.cat(outs)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        experts = torch.arange(self.num_experts, dtype=index.dtype, device=index.device)
        picked = index[:, :, None] == experts  # [T, k, E]
        combine = (picked.to(weights.dtype) * weights[:, :, None]).sum(dim=1).t()  # [E, T]
        routed = picked.any(dim=1).t()  # [E, T]
        capacity = routed.sum(dim=1).max().item()
        torch._check(capacity >= 0)
        torch._check(capacity <= x.shape[0])
        # Routed tokens first in each expert's row; the padding slots are filled with unrouted tokens.
        _, tokens = torch.topk(routed.to(torch.float32), capacity, dim=1)  # [E, capacity]
        slots = tokens.reshape(-1)
        grouped = x.index_select(0, slots).reshape(self.num_experts, capacity, x.shape[1])
        # Token-minor layout ([E, features, capacity]) multiplies the expert weights as stored.
        gate_up = torch.matmul(self.gate_up_proj, grouped.transpose(1, 2))  # [E, 2I, capacity]
        act = (self._gated(gate_up, 1) * torch.gather(combine, 1, tokens)[:, None, :]).to(x.dtype)
        if self.down_input_hook is not None:
            seen = torch.gather(routed, 1, tokens).t()
            act = _hooked(self.down_input_hook, act.permute(2, 0, 1), seen, 0).permute(1, 2, 0)
        out = torch.matmul(self.down_proj, act)  # [E, H, capacity]
        summed = torch.zeros(x.shape, dtype=out.dtype, device=x.device)
        return summed.index_add(0, slots, out.transpose(1, 2).reshape(-1, x.shape[1]))

    def _sparse(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            routed = index == e  # [T, k]
            tokens = torch.nonzero(routed.any(dim=-1)).squeeze(-1)
            w = (weights * routed.to(weights.dtype)).sum(dim=-1).index_select(0, tokens)
            gate_up = F.linear(x.index_select(0, tokens), self.gate_up_proj[e])
            inner = (self._gated(gate_up, -1) * w[:, None]).to(x.dtype)  # [T_e, I]
            if self.down_input_hook is not None:
                seen = torch.ones(inner.shape[0], 1, dtype=torch.bool, device=inner.device)
                inner = _hooked(self.down_input_hook, inner[:, None], seen, e)[:, 0]
            out = out.index_add(0, tokens, F.linear(inner, self.down_proj[e]))
        return out


def stored_layout(module: nn.Module, name: str) -> StoredLayout:
    """How parameter `name` of `module` lies in its checkpoint tensor: the loader and the exporter's weight streaming
    both read the checkpoint through this."""
    owner, _, attr = name.rpartition(".")
    layouts: dict[str, StoredLayout] = getattr(module.get_submodule(owner), "stored_layouts", {})
    return layouts.get(attr) or StoredLayout(tuple(module.get_parameter(name).shape))


def _hooked(hook: DownInputHook, act: torch.Tensor, routed: torch.Tensor, first: int) -> torch.Tensor:
    replaced = hook(act, routed, first)
    return act if replaced is None else replaced


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec, moe: str):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, spec)
        self.mlp = GatedMLP(h, config.intermediate_size)
        self.router = Router(config)
        self.experts = Experts(config, moe)
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm_1",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_2",
        ):
            setattr(self, name, RMSNorm(h, eps))
        # Buffers are not tied in the checkpoint, so encoder and decoder each carry their own scalar.
        self.layer_scalar = nn.Parameter(torch.empty(1, device="meta"), requires_grad=False)
        self.encoder_layer_scalar = nn.Parameter(torch.empty(1, device="meta"), requires_grad=False)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        bias: torch.Tensor,
        scalar: torch.Tensor,
        queries_from: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the new hidden states and the K/V of every token of h. scalar [T, 1]: the per-token layer scalar
        (the encoder's or the decoder's). queries_from: only tokens from this index on go on through attention and
        the FFN (the last layer, where the encoder tokens are needed for their K/V only)."""
        x = self.input_layernorm(h)
        k, v = self.self_attn.key_value(x, cos, sin)
        # The call's own tokens first: a key keeps its index whatever context span is fed, so rows sharing a call
        # with a longer context only add masked (exactly zero) terms after theirs.
        keys, values = torch.cat([k, past_k], dim=2), torch.cat([v, past_v], dim=2)
        if queries_from is not None:
            h, x, cos, sin = h[:, queries_from:], x[:, queries_from:], cos[:, queries_from:], sin[:, queries_from:]
            bias, scalar = bias[:, :, queries_from:], scalar[queries_from:]
        h = h + self.post_attention_layernorm(self.self_attn(x, cos, sin, keys, values, bias))
        residual = h
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(residual)))
        flat = residual.reshape(-1, residual.shape[-1])
        weights, index = self.router(flat)
        routed = self.experts(self.pre_feedforward_layernorm_2(flat), weights, index)
        routed = self.post_feedforward_layernorm_2(routed.reshape(residual.shape))
        h = residual + self.post_feedforward_layernorm(dense + routed)
        return h * scalar, k, v


class SelfConditioning(GatedMLP):
    """Adds an MLP of the previous step's soft embedding to the canvas embedding (zeros at the first step give
    exactly rms(embeds), since the MLP has no bias)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config.hidden_size, config.intermediate_size)
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eps = config.rms_norm_eps

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return rms_norm(embeds + super().forward(self.pre_norm(soft)), None, self.eps)


@dataclass
class DenoiseOutputs:
    """One denoising step's results; every tensor is [B, C] or [B] except the self-conditioning state."""

    sampled: torch.Tensor
    argmax: torch.Tensor
    entropy: torch.Tensor
    accepted: torch.Tensor
    next_canvas: torch.Tensor
    next_self_cond: torch.Tensor
    mean_entropy: torch.Tensor
    logits: torch.Tensor | None = None  # [B, C, V] softcapped, before temperature; only for parity work


class _GroupVisibility(NamedTuple):
    """Which tokens of one backbone call each group sees, before the context and the sliding window apply."""

    chunk: torch.Tensor  # [B, S, S]: encoder tokens see earlier real encoder tokens (causal)
    apart: torch.Tensor  # [B, S, R], all False: the encoder and the canvas do not see each other
    canvas: torch.Tensor  # [B, R, R], all True: the canvas sees itself both ways
    same_image: torch.Tensor | None  # [B, S, S]: encoder tokens of one image (None: no bidirectional images)


class DiffusionGemmaText(nn.Module):
    """The shared text stack (checkpoint prefix `model.decoder.`), used in encoder and decoder mode."""

    def __init__(self, config: ModelConfig, moe: str = "dense", vocab_chunk: int = DEFAULT_VOCAB_CHUNK):
        super().__init__()
        if vocab_chunk < 1:
            raise ValueError(f"vocab_chunk must be at least 1 (got {vocab_chunk})")
        self.config = config
        self.moe = moe
        self.vocab_chunk = vocab_chunk
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device="meta").requires_grad_(False)
        self.layers = nn.ModuleList(Layer(config, spec, moe) for spec in config.layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.embed_scale = math.sqrt(config.hidden_size)
        # With images in a prompt: whether the encoder's soft tokens of one image attend to each other both ways
        # (text_config.use_bidirectional_attention == "vision"), as transformers' generate() applies it.
        self.bidirectional_images = False
        # Buffers, so that the graphs carry the exact frequencies as constants: computing them in the graph would
        # let the runtime's pow() differ in the last bit, an angle error that grows with the position.
        self._rope_buffers = {}
        for spec in dict.fromkeys(config.layers):
            name = f"rope_inv_freq_{len(self._rope_buffers)}"
            self.register_buffer(name, inverse_frequencies(spec), persistent=False)
            self._rope_buffers[spec] = name

    def _rotary(self, spec: LayerSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_tables(getattr(self, self._rope_buffers[spec]), positions, self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # The scale is rounded to the weight dtype first (53.0 instead of 53.07 in bf16), as transformers does.
        scale = torch.tensor(self.embed_scale, dtype=self.dtype)
        return self.embed_tokens(ids) * scale

    # -- attention visibility -------------------------------------------------------------------------------------

    def _context_visibility(
        self, spec: LayerSpec, span: int, context_length: torch.Tensor, context_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each of the `span` leading buffer slots fed: the absolute position it holds ([B, span], or [1, span] on
        full layers) and whether that slot holds a live token [B, span]."""
        slots = torch.arange(span, dtype=torch.int64, device=context_length.device)[None, :]
        length = context_length[:, None]
        if spec.kind != SLIDING:
            # Slot = position: the padding mask applies as it is. (Gathering it through positions broadcast to the
            # batch would be a constant at a static batch of 1, which TensorRT-RTX's Myelin compiler rejects.)
            return slots, (slots < length) & context_mask[:, :span]
        # Ring buffer: the newest position p < length with p = slot (mod ring). The ring is W - 1 slots whatever span
        # is fed; a ring cut to max_context < W - 1 never wraps, and p mod (W - 1) = p there too.
        ring = self.config.sliding_capacity
        position = length - 1 - torch.remainder(length - 1 - slots, ring)
        live = (position >= 0) & (position < length)
        padded_ok = torch.gather(context_mask, 1, position.clamp(min=0))
        return position, live & padded_ok

    def _bias(self, visible: torch.Tensor) -> torch.Tensor:
        return torch.where(visible, torch.zeros((), dtype=torch.float32), torch.full((), _HIDDEN))

    # -- the backbone: encoder tokens and canvas tokens in one pass -------------------------------------------------

    def backbone(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        canvas: torch.Tensor,
        self_cond: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        context_length: torch.Tensor,
        context_mask: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        image_slot: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """One pass over S encoder tokens (input_ids at `positions` [B, S]: a prompt chunk or a canvas to commit)
        and R canvas tokens (`canvas` [B, R] with its self-conditioning input [B, R, H], at the positions after the
        context). Returns the encoder tokens' K/V per layer ([B, nkv, S, d]) and the canvas tokens' final hidden
        states [B, R, H], normed.

        The two groups do not see each other: encoder tokens attend causally to the context and to each other,
        canvas tokens bidirectionally to the context and the canvas, so a call is a prefill or commit (R = 0), a
        denoising step (S = 0), or both at once. context_length [B]: committed tokens before the call;
        context_mask [B, capacity]: False at left padding (the encoder tokens' own positions included);
        past_keys/past_values [B, nkv, span, d]: the leading slots of each layer's buffer, as many as cover the
        longest row's context (`core.contract.kv_spans`; more only cost time).

        Images (`place_images`): image_tokens [n, H] the soft tokens of the images in this chunk, image_slot [B, S]
        the row of image_tokens each encoder token takes instead of its embedding (-1: a text token). None: a
        text-only model or call.
        """
        b, s = input_ids.shape
        r = canvas.shape[1]
        h, chunk_ok, same_image = self._backbone_inputs(
            input_ids, positions, canvas, self_cond, context_mask, image_tokens, image_slot
        )
        all_pos, is_encoder, visible = self._token_groups(
            positions, canvas, context_length, chunk_ok, same_image, b, s, r
        )
        tables, biases = {}, {}
        new_keys, new_values = [], []
        last = len(self.layers) - 1
        for i, (layer, spec) in enumerate(zip(self.layers, self.config.layers)):
            if spec not in tables:  # layers of one kind share their rotary tables and attention bias
                tables[spec] = self._rotary(spec, all_pos)
                slots = past_keys[i].shape[2]
                biases[spec] = self._bias(
                    self._visibility(spec, slots, context_length, context_mask, positions, visible)
                )
            cos, sin = tables[spec]
            scalar = torch.where(is_encoder, layer.encoder_layer_scalar, layer.layer_scalar)
            h, k, v = layer(
                h, cos, sin, past_keys[i], past_values[i], biases[spec], scalar, queries_from=s if i == last else None
            )
            new_keys.append(k[:, :, :s])
            new_values.append(v[:, :, :s])
        return new_keys, new_values, self.norm(h)

    def _backbone_inputs(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        canvas: torch.Tensor,
        self_cond: torch.Tensor,
        context_mask: torch.Tensor,
        image_tokens: torch.Tensor | None,
        image_slot: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The first layer's input [B, S + R, H]: the encoder tokens' embeddings (image tokens replaced by their soft
        tokens), then the canvas tokens' embeddings through the self-conditioning MLP. Also which encoder tokens are
        real [B, 1, S], and which pairs of encoder tokens belong to one image [B, S, S] (None: no bidirectional
        images)."""
        encoder = self.embed(input_ids)
        chunk_ok = torch.gather(context_mask, 1, positions)[:, None, :]
        same_image = None
        if image_slot is not None and image_tokens is not None:
            encoder, same_image = self.place_images(encoder, image_tokens, image_slot)
            same_image = None if same_image is None else same_image & chunk_ok
        h = torch.cat([encoder, self.self_conditioning(self.embed(canvas), self_cond)], dim=1)
        return h, chunk_ok, same_image

    def _token_groups(
        self,
        positions: torch.Tensor,
        canvas: torch.Tensor,
        context_length: torch.Tensor,
        chunk_ok: torch.Tensor,
        same_image: torch.Tensor | None,
        b: int,
        s: int,
        r: int,
    ) -> tuple[torch.Tensor, torch.Tensor, _GroupVisibility]:
        """The positions of the encoder and canvas tokens [B, S + R] (the canvas right after the context), which rows
        are encoder tokens [S + R, 1], and which tokens of the call each group sees."""
        # A cumulative sum rather than arange(R): shape inference follows it through the graph (scripts/roofline.py)
        canvas_pos = context_length[:, None] + torch.cumsum(torch.ones_like(canvas), dim=1) - 1
        all_pos = torch.cat([positions, canvas_pos], dim=1)
        # Transformers keeps separate layer scalars for the encoder and the decoder (buffers are not tied)
        encoder_rows = torch.ones(s, 1, dtype=torch.bool, device=canvas.device)
        canvas_rows = torch.zeros(r, 1, dtype=torch.bool, device=canvas.device)
        is_encoder = torch.cat([encoder_rows, canvas_rows])  # [S + R, 1]
        chunk_visible = (positions[:, None, :] <= positions[:, :, None]) & chunk_ok
        apart = torch.zeros(b, s, r, dtype=torch.bool, device=canvas.device)
        canvas_visible = torch.ones(b, r, r, dtype=torch.bool, device=canvas.device)
        return all_pos, is_encoder, _GroupVisibility(chunk_visible, apart, canvas_visible, same_image)

    def _visibility(
        self,
        spec: LayerSpec,
        slots: int,
        context_length: torch.Tensor,
        context_mask: torch.Tensor,
        positions: torch.Tensor,
        visible: _GroupVisibility,
    ) -> torch.Tensor:
        """[B, 1, S + R, S + R + slots]: which key (encoder token, canvas token, context slot) each query sees.
        The canvas sees every live slot: the sliding window applies to the encoder only, as in transformers.
        Encoder tokens of one image (`visible.same_image`) see each other whatever the causal and sliding rules say
        (transformers ORs its blockwise overlay into the causal or sliding mask, then applies padding)."""
        chunk_visible, apart, canvas_visible, same_image = visible
        slot_pos, live = self._context_visibility(spec, slots, context_length, context_mask)
        s, r = chunk_visible.shape[1], canvas_visible.shape[1]
        encoder_ctx = live[:, None, :].expand(-1, s, -1)
        encoder_chunk = chunk_visible
        if spec.kind == SLIDING:
            window_start = positions[:, :, None] - self.config.sliding_window
            encoder_ctx = encoder_ctx & (slot_pos[:, None, :] > window_start)
            encoder_chunk = encoder_chunk & (positions[:, None, :] > window_start)
        if same_image is not None:
            encoder_chunk = encoder_chunk | same_image
        encoder = torch.cat([encoder_chunk, apart, encoder_ctx], dim=2)
        canvas = torch.cat([apart.transpose(1, 2), canvas_visible, live[:, None, :].expand(-1, r, -1)], dim=2)
        return torch.cat([encoder, canvas], dim=1)[:, None]

    def place_images(
        self, embedded: torch.Tensor, image_tokens: torch.Tensor, image_slot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder tokens' embeddings [B, S, H] with each image token's replaced by its soft token (transformers'
        masked_scatter of the image features into the prompt's embeddings, in the encoder only), and, where images
        attend bidirectionally, which pairs of tokens belong to one image [B, S, S]: a contiguous run of image
        tokens is one image, as transformers' `get_block_sequence_ids_for_mask` groups them."""
        is_image = image_slot >= 0
        table = torch.cat([image_tokens.to(embedded.dtype), embedded.new_zeros(1, embedded.shape[-1])])
        index = torch.where(is_image, image_slot, torch.full_like(image_slot, image_tokens.shape[0]))
        placed = torch.where(is_image[..., None], F.embedding(index, table), embedded)
        if not self.bidirectional_images:
            return placed, None
        previous = torch.cat([torch.zeros_like(is_image[:, :1]), is_image[:, :-1]], dim=1)
        group = torch.cumsum((is_image & ~previous).to(torch.int64), dim=1)
        same = (group[:, :, None] == group[:, None, :]) & is_image[:, :, None] & is_image[:, None, :]
        return placed, same

    def encode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        context_length: torch.Tensor,
        context_mask: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        image_slot: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The encoder phase (prefill or commit): the chunk's K/V per layer ([B, nkv, S, d] each)."""
        b = input_ids.shape[0]
        canvas = input_ids.new_zeros(b, 0)
        none = torch.zeros(b, 0, self.config.hidden_size, dtype=self.dtype, device=input_ids.device)
        keys, values, _ = self.backbone(
            input_ids,
            positions,
            canvas,
            none,
            past_keys,
            past_values,
            context_length,
            context_mask,
            image_tokens,
            image_slot,
        )
        return keys, values

    def denoise_logits(
        self,
        canvas: torch.Tensor,
        self_cond: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        context_length: torch.Tensor,
        context_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The denoising phase's bidirectional pass over the canvas [B, C]; fp32 softcapped logits [B, C, V]."""
        nothing = canvas.new_zeros(canvas.shape[0], 0)
        _, _, hidden = self.backbone(
            nothing, nothing, canvas, self_cond, past_keys, past_values, context_length, context_mask
        )
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The tied LM head with Gemma's final softcap, in fp32: over the whole vocabulary, or over `rows`, a
        contiguous slice of the embedding matrix."""
        logits = linear(hidden, self.embed_tokens.weight if rows is None else rows).float()
        return self._softcap(logits)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.logit_softcap
        return torch.tanh(logits / cap) * cap

    def head(
        self,
        hidden: torch.Tensor,
        temperature: torch.Tensor,
        entropy_bound: torch.Tensor,
        uniforms: torch.Tensor | None,
        renoise_ids: torch.Tensor,
        exponentials: torch.Tensor | None = None,
        with_logits: bool = False,
    ) -> DenoiseOutputs:
        """The LM head and the sampler over the canvas tokens' final hidden states [B, C, H].

        With a vocabulary chunk smaller than the vocabulary (and uniform draws, no logits wanted) they run chunk by
        chunk (`_sample_chunked`), so that no [B, C, vocabulary] tensor exists; otherwise over the whole logits
        (`sample`), which the exponential draws of `--rng hf` and the debug logits need."""
        if exponentials is not None or with_logits or self.vocab_chunk >= self.config.vocab_size:
            logits = self.logits(hidden)
            return self.sample(logits, temperature, entropy_bound, uniforms, renoise_ids, exponentials, with_logits)
        return self._sample_chunked(hidden, temperature, entropy_bound, uniforms, renoise_ids)

    def _sample_chunked(
        self,
        hidden: torch.Tensor,
        temperature: torch.Tensor,
        entropy_bound: torch.Tensor,
        uniforms: torch.Tensor,
        renoise_ids: torch.Tensor,
    ) -> DenoiseOutputs:
        """`sample`'s results from the LM head computed one vocabulary chunk at a time (a fixed chain of nodes in
        the graph), the largest tensor alive [B, C, chunk]: each chunk's statistics (`_chunk_statistics`), combined
        after the last chunk exactly as one softmax over the vocabulary would give them (`_combine_chunks`).
        Inverse-CDF sampling finds the group of SAMPLING_GROUP tokens holding the draw's cumulative mass, recomputes
        the logits of that group's tokens alone (a gather of their embedding rows) and draws within it with the
        remainder of the draw: the token the whole-vocabulary CDF selects, up to float rounding at its boundaries."""
        embedding = self.embed_tokens.weight
        vocab = embedding.shape[0]
        group = math.gcd(self.vocab_chunk, vocab, SAMPLING_GROUP)
        scale = temperature[:, None, None]
        chunks, soft = self._chunk_statistics(hidden, scale, group)
        entropy, argmax, group_mass = _combine_chunks(chunks)
        chosen, remainder = _inverse_cdf_with_remainder(group_mass, uniforms)
        sampled = (
            chosen if group == 1 else chosen * group + self._draw_in_group(hidden, scale, chosen, remainder, group)
        )
        accepted = entropy_bound_accept(entropy, entropy_bound)
        return DenoiseOutputs(
            sampled=sampled,
            argmax=argmax,
            entropy=entropy,
            accepted=accepted,
            next_canvas=torch.where(accepted, sampled, renoise_ids),
            next_self_cond=soft.result(),
            mean_entropy=entropy.mean(dim=-1),
        )

    def _chunk_statistics(
        self, hidden: torch.Tensor, scale: torch.Tensor, group: int
    ) -> tuple[_ChunkStatistics, _SoftEmbeddingSum]:
        """Per vocabulary chunk, from its temperature-scaled logits z: their maximum and first argmax, the chunk's
        own softmax p, its normaliser S = sum(exp(z - max)), the mean of (z - max) under p, and the probability mass
        of each group of `group` tokens; the self-conditioning product p @ embedding rows accumulates in the sum
        returned with them."""
        embedding = self.embed_tokens.weight
        chunks = _ChunkStatistics([], [], [], [], [])
        soft = _SoftEmbeddingSum(embedding)
        for start in range(0, embedding.shape[0], self.vocab_chunk):
            rows = embedding[start : start + self.vocab_chunk]
            z = self.logits(hidden, rows) / scale
            top, index = torch.max(z, dim=-1)
            shifted = z - top[..., None]
            weights = torch.exp(shifted)
            total = weights.sum(dim=-1)
            probs = weights / total[..., None]
            chunks.maxima.append(top)
            chunks.argmaxes.append(index + start)
            chunks.normalisers.append(total)
            chunks.centred.append((probs * shifted).sum(dim=-1))
            # Explicit sizes, no -1: with zero canvas rows (the encoder phase) a wildcard has no unique value.
            grouped = probs.reshape(probs.shape[0], probs.shape[1], probs.shape[2] // group, group)
            chunks.masses.append(grouped.sum(dim=-1))
            soft.add(z, rows, top, total, probs)
        return chunks, soft

    def _draw_in_group(
        self, hidden: torch.Tensor, scale: torch.Tensor, chosen: torch.Tensor, remainder: torch.Tensor, group: int
    ) -> torch.Tensor:
        """The token within group `chosen` [B, C] that the draw's remainder [B, C] in [0, 1) selects by inverse CDF
        over the group's own probabilities: its logits recomputed from gathered embedding rows [B, C, g, H], one
        vocabulary chunk at a time (a group lies inside one chunk), so that the graph reads the embedding only
        through its chunks (`exporter/embedding.py`) and holds one chunk's gathered rows at a time."""
        tokens = chosen[..., None] * group + torch.arange(group, dtype=chosen.dtype, device=chosen.device)
        embedding = self.embed_tokens.weight
        z: torch.Tensor | None = None
        for start in range(0, embedding.shape[0], self.vocab_chunk):
            rows = embedding[start : start + self.vocab_chunk]
            inside = (tokens >= start) & (tokens < start + rows.shape[0])
            local = torch.where(inside, tokens - start, torch.zeros_like(tokens))
            part = self._softcap(torch.matmul(F.embedding(local, rows), hidden[..., None])[..., 0].float()) / scale
            z = part if z is None else torch.where(inside, part, z)
        assert z is not None
        return sample_inverse_cdf(torch.softmax(z, dim=-1), remainder)

    def soft_embedding(self, processed_logits: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        return soft_embedding(processed_logits, self.embed_tokens.weight, probs)

    def sample(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        entropy_bound: torch.Tensor,
        uniforms: torch.Tensor | None,
        renoise_ids: torch.Tensor,
        exponentials: torch.Tensor | None = None,
        with_logits: bool = False,
    ) -> DenoiseOutputs:
        """The sampler over a denoising step's logits [B, C, V].

        temperature, entropy_bound [B] fp32; renoise_ids [B, C]: the fresh random tokens for rejected positions.
        Sampling draws either come as `uniforms` [B, C] (inverse CDF: the portable form the graphs use) or as
        `exponentials` [B*C, V] (argmax(p / q), which is what torch.multinomial computes, for bit-exact
        reproduction of transformers' generate()).
        """
        z = logits / temperature[:, None, None]
        probs = torch.softmax(z, dim=-1, dtype=torch.float32)
        if exponentials is not None:
            sampled = torch.argmax(probs.reshape(exponentials.shape) / exponentials, dim=-1).reshape(renoise_ids.shape)
        else:
            sampled = sample_inverse_cdf(probs, uniforms)
        argmax = torch.argmax(z, dim=-1)
        entropy = categorical_entropy(z)
        accepted = entropy_bound_accept(entropy, entropy_bound)
        return DenoiseOutputs(
            sampled=sampled,
            argmax=argmax,
            entropy=entropy,
            accepted=accepted,
            next_canvas=torch.where(accepted, sampled, renoise_ids),
            next_self_cond=self.soft_embedding(z, probs),
            mean_entropy=entropy.mean(dim=-1),
            logits=logits if with_logits else None,
        )

    def denoise(
        self,
        canvas: torch.Tensor,
        self_cond: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        context_length: torch.Tensor,
        context_mask: torch.Tensor,
        temperature: torch.Tensor,
        entropy_bound: torch.Tensor,
        uniforms: torch.Tensor | None,
        renoise_ids: torch.Tensor,
        exponentials: torch.Tensor | None = None,
        with_logits: bool = False,
    ) -> DenoiseOutputs:
        """The denoising phase: one step over the canvas plus the LM head and the sampler (see `head`)."""
        nothing = canvas.new_zeros(canvas.shape[0], 0)
        _, _, hidden = self.backbone(
            nothing, nothing, canvas, self_cond, past_keys, past_values, context_length, context_mask
        )
        return self.head(hidden, temperature, entropy_bound, uniforms, renoise_ids, exponentials, with_logits)

    def step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        canvas: torch.Tensor,
        self_cond: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        context_length: torch.Tensor,
        context_mask: torch.Tensor,
        temperature: torch.Tensor,
        entropy_bound: torch.Tensor,
        uniforms: torch.Tensor,
        renoise_ids: torch.Tensor,
        with_logits: bool = False,
        image_tokens: torch.Tensor | None = None,
        image_slot: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], DenoiseOutputs]:
        """The backbone graph: `backbone`, then the LM head and the sampler over the canvas tokens (none in the
        encoder phase, where they cost nothing)."""
        keys, values, hidden = self.backbone(
            input_ids,
            positions,
            canvas,
            self_cond,
            past_keys,
            past_values,
            context_length,
            context_mask,
            image_tokens,
            image_slot,
        )
        out = self.head(hidden, temperature, entropy_bound, uniforms, renoise_ids, with_logits=with_logits)
        return keys, values, out


# -- sampler math (shared by every backend through the graphs or this module) ------------------------------------


def soft_embedding(
    processed_logits: torch.Tensor, embedding: torch.Tensor, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """The next step's self-conditioning input: softmax of the temperature-scaled logits (as stored in the
    embedding dtype) times the embedding matrix [V, H], times the embedding scale sqrt(H) rounded to that dtype.
    `probs`: softmax(processed_logits) in fp32, reused when the embedding is fp32 (the cast is then the identity, so
    it is the same softmax)."""
    if probs is None or embedding.dtype != torch.float32:
        probs = torch.softmax(processed_logits.to(embedding.dtype), dim=-1, dtype=torch.float32)
    scale = torch.tensor(math.sqrt(embedding.shape[1]), dtype=embedding.dtype)
    return torch.matmul(probs.to(embedding.dtype), embedding) * scale


def categorical_entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) per position, computed like torch.distributions.Categorical(logits=z).entropy()."""
    log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)
    return -(log_p * torch.softmax(log_p, dim=-1)).sum(dim=-1)


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Accept the lowest-entropy positions while the entropy summed over strictly lower ranks stays <= bound.

    Sort, cumulative sum and scatter back, exactly like transformers' EntropyBoundSampler, so that borderline
    positions are decided by the same fp32 sums.
    """
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    selected = (torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy) <= bound[:, None]
    return torch.zeros_like(selected).scatter(1, order, selected)


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Categorical sample per position from one uniform in [0, 1): the first index whose CDF exceeds u."""
    return _inverse_cdf(probs, uniforms)[0]


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse-CDF index (see `sample_inverse_cdf`), the CDF and the draw's threshold on it."""
    cdf = torch.cumsum(probs, dim=-1)
    threshold = uniforms[..., None] * cdf[..., -1:]
    # Counted in int32 (exact below 2^31 entries): the mask's cast is then half the bytes of an int64 one.
    index = (cdf <= threshold).to(torch.int32).sum(dim=-1, dtype=torch.int32).to(torch.int64)
    return torch.clamp(index, max=probs.shape[-1] - 1), cdf, threshold


def _inverse_cdf_with_remainder(masses: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse-CDF index over `masses` [..., n] and where the draw falls inside the selected entry, as a
    fraction of its mass in [0, 1): the uniform draw for choosing within it."""
    index, cdf, threshold = _inverse_cdf(masses, uniforms)
    mass = torch.gather(masses, -1, index[..., None])
    below = torch.gather(cdf, -1, index[..., None]) - mass
    fraction = torch.where(mass > 0, (threshold - below) / mass, torch.zeros_like(mass))
    return index, torch.clamp(fraction, 0.0, 1.0 - 2.0**-24)[..., 0]


class _ChunkStatistics(NamedTuple):
    """What the chunked sampler keeps of each vocabulary chunk, in chunk order: [B, C] each, masses [B, C, groups]."""

    maxima: list[torch.Tensor]
    argmaxes: list[torch.Tensor]  # vocabulary ids
    normalisers: list[torch.Tensor]
    centred: list[torch.Tensor]
    masses: list[torch.Tensor]


def _combine_chunks(chunks: _ChunkStatistics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entropy and argmax [B, C] of the softmax over the whole vocabulary, and each token group's probability
    mass [B, C, groups], from the chunks' statistics: a chunk's share of the probability is S * exp(max - global
    max), normalised; the argmax is the first chunk holding the global maximum, at its own argmax; the entropy is
    log(sum of shares) minus the share-weighted mean of (z - global max)."""
    maxima, normalisers = torch.stack(chunks.maxima, dim=-1), torch.stack(chunks.normalisers, dim=-1)  # [B, C, chunks]
    top = maxima.amax(dim=-1, keepdim=True)
    shares = normalisers * torch.exp(maxima - top)
    total = shares.sum(dim=-1)
    shares = shares / total[..., None]
    entropy = torch.log(total) - (shares * (torch.stack(chunks.centred, dim=-1) + maxima - top)).sum(dim=-1)
    first = torch.argmax(maxima, dim=-1, keepdim=True)  # the first chunk holding the maximum
    argmax = torch.gather(torch.stack(chunks.argmaxes, dim=-1), -1, first)[..., 0]
    group_mass = torch.cat([m * shares[..., i : i + 1] for i, m in enumerate(chunks.masses)], dim=-1)
    return entropy, argmax, group_mass


class _SoftEmbeddingSum:
    """The self-conditioning soft embedding (`soft_embedding`) accumulated over vocabulary chunks: the running
    mixture of each chunk's softmax times its embedding rows, weighted by the chunk's share of the probability
    (its normaliser relative to the running maximum), kept normalised so that it stays within the embedding's
    range. For a non-fp32 embedding the softmax is over the logits rounded to the embedding dtype, as there."""

    def __init__(self, embedding: torch.Tensor):
        self.embedding = embedding
        self.fp32 = embedding.dtype == torch.float32
        self.mixed: torch.Tensor | None = None
        self.top: torch.Tensor | None = None
        self.total: torch.Tensor | None = None

    def add(
        self, z: torch.Tensor, rows: torch.Tensor, top: torch.Tensor, total: torch.Tensor, probs: torch.Tensor
    ) -> None:
        """One chunk: its scaled logits z [B, C, n], embedding rows [n, H], and (fp32) maximum, normaliser and
        softmax."""
        if not self.fp32:
            rounded = z.to(rows.dtype).float()
            top = rounded.amax(dim=-1)
            weights = torch.exp(rounded - top[..., None])
            total = weights.sum(dim=-1)
            probs = weights / total[..., None]
        part = torch.matmul(probs.to(rows.dtype), rows).float()
        if self.mixed is None or self.top is None or self.total is None:
            self.mixed, self.top, self.total = part, top, total
            return
        new_top = torch.maximum(self.top, top)
        old = (self.total * torch.exp(self.top - new_top))[..., None]
        new = (total * torch.exp(top - new_top))[..., None]
        self.mixed = (self.mixed * old + part * new) / (old + new)
        self.top, self.total = new_top, (old + new)[..., 0]

    def result(self) -> torch.Tensor:
        assert self.mixed is not None, "no chunk added"
        scale = torch.tensor(math.sqrt(self.embedding.shape[1]), dtype=self.embedding.dtype)
        return self.mixed.to(self.embedding.dtype) * scale
