"""The two step graphs, `encode` and `denoise`: their I/O contract and the flat-argument modules that are traced.

The contract (names, shapes, dtypes, meaning) is written once here as plain data; the exporter copies it into the
manifest and docs/ARTIFACTS.md documents it. Symbolic dims: `batch` (dynamic), `chunk` (encoder tokens per call,
dynamic); everything else is a static number taken from the model config and the declared capacities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .config import SLIDING, ModelConfig
from .manifest import prefill_limit
from .model import DiffusionGemmaText

MODEL_DTYPE = "model"  # placeholder dtype in the contract: the export dtype (fp32, fp16 or bf16)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str
    doc: str

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


@dataclass(frozen=True)
class Capacity:
    """Static sizes a set of artifacts is built for; the KV buffers and TensorRT profiles follow from them."""

    max_batch: int
    max_context: int  # committed tokens (prompt + committed canvases) a request can hold
    max_prefill: int  # encoder tokens per call; longer prompts are prefilled in chunks
    canvas: int
    sliding: int  # ring slots of a sliding layer: min(W - 1, max_context)

    @classmethod
    def for_model(cls, config: ModelConfig, max_batch: int, max_context: int, max_prefill: int | None) -> "Capacity":
        prefill = prefill_limit(max_prefill or max_context, max_context, config.canvas_length)
        return cls(
            max_batch=max_batch,
            max_context=max_context,
            max_prefill=prefill,
            canvas=config.canvas_length,
            sliding=min(config.sliding_capacity, max_context),
        )

    def slots(self, kind: str) -> int:
        return self.sliding if kind == SLIDING else self.max_context


def kv_specs(config: ModelConfig, capacity: Capacity, prefix: str, length: int | str, doc: str) -> list[TensorSpec]:
    specs = []
    for part in ("key", "value"):
        for i, layer in enumerate(config.layers):
            size = capacity.slots(layer.kind) if length == "slots" else length
            specs.append(
                TensorSpec(
                    f"{prefix}{part}_{i}",
                    ("batch", layer.num_kv_heads, size, layer.head_dim),
                    MODEL_DTYPE,
                    f"layer {i} ({layer.kind}) {part}s: {doc}",
                )
            )
    return specs


def _context_specs(capacity: Capacity) -> list[TensorSpec]:
    return [
        TensorSpec(
            "context_length", ("batch",), "int64", "committed tokens in the K/V buffers (left padding included)"
        ),
        TensorSpec(
            "context_mask",
            ("batch", capacity.max_context),
            "bool",
            "per absolute position: False where the row is left padding",
        ),
    ]


def encode_io(config: ModelConfig, capacity: Capacity) -> tuple[list[TensorSpec], list[TensorSpec]]:
    past_doc = "buffer of the committed context (full layers: slot = position; sliding: slot = position mod slots)"
    inputs = [
        TensorSpec("input_ids", ("batch", "chunk"), "int64", "prompt chunk or committed canvas"),
        TensorSpec("positions", ("batch", "chunk"), "int64", "absolute position of each token"),
        *_context_specs(capacity),
        *kv_specs(config, capacity, "past_", "slots", past_doc),
    ]
    outputs = kv_specs(config, capacity, "", "chunk", "the chunk's K/V, to be written into the buffers at its positions")
    return inputs, outputs


def denoise_io(config: ModelConfig, capacity: Capacity, debug_logits: bool) -> tuple[list[TensorSpec], list[TensorSpec]]:
    b, c, h = "batch", capacity.canvas, config.hidden_size
    past_doc = "buffer of the committed context (read only)"
    inputs = [
        TensorSpec("canvas", (b, c), "int64", "current canvas token ids"),
        TensorSpec("self_cond", (b, c, h), MODEL_DTYPE, "soft embedding of the previous step (zeros at the first step)"),
        *_context_specs(capacity),
        TensorSpec("temperature", (b,), "float32", "this step's temperature t_min + (t_max - t_min) * t / N"),
        TensorSpec("entropy_bound", (b,), "float32", "entropy budget of the acceptance rule"),
        TensorSpec("uniforms", (b, c), "float32", "one U[0,1) draw per position for sampling (inverse CDF)"),
        TensorSpec("renoise_ids", (b, c), "int64", "uniform random token ids for rejected positions"),
        *kv_specs(config, capacity, "past_", "slots", past_doc),
    ]
    outputs = [
        TensorSpec("sampled", (b, c), "int64", "token sampled at each position from the temperature-scaled logits"),
        TensorSpec("argmax", (b, c), "int64", "argmax canvas (the draft; committed after the last step)"),
        TensorSpec("entropy", (b, c), "float32", "entropy of each position's temperature-scaled distribution"),
        TensorSpec("accepted", (b, c), "bool", "entropy-bound acceptance mask"),
        TensorSpec("next_canvas", (b, c), "int64", "accepted samples kept, all other positions renoised"),
        TensorSpec("next_self_cond", (b, c, h), MODEL_DTYPE, "soft embedding for the next step"),
        TensorSpec("mean_entropy", (b,), "float32", "mean entropy over the canvas (adaptive-stop confidence)"),
    ]
    if debug_logits:
        outputs.append(
            TensorSpec("logits", (b, c, config.vocab_size), "float32", "softcapped logits before temperature (debug)")
        )
    return inputs, outputs


class EncodeGraph(nn.Module):
    """Flat-argument wrapper traced into encode.onnx."""

    def __init__(self, model: DiffusionGemmaText):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, context_length, context_mask, *past):  # noqa: ANN001 - traced
        n = self.model.config.num_layers
        keys, values = self.model.encode(
            input_ids, positions, list(past[:n]), list(past[n:]), context_length, context_mask
        )
        return (*keys, *values)


class DenoiseGraph(nn.Module):
    """Flat-argument wrapper traced into denoise.onnx."""

    def __init__(self, model: DiffusionGemmaText, debug_logits: bool):
        super().__init__()
        self.model = model
        self.debug_logits = debug_logits

    def forward(
        self, canvas, self_cond, context_length, context_mask, temperature, entropy_bound, uniforms, renoise_ids, *past
    ):  # noqa: ANN001 - traced
        n = self.model.config.num_layers
        out = self.model.denoise(
            canvas,
            self_cond,
            list(past[:n]),
            list(past[n:]),
            context_length,
            context_mask,
            temperature,
            entropy_bound,
            uniforms,
            renoise_ids,
            with_logits=self.debug_logits,
        )
        result = (
            out.sampled,
            out.argmax,
            out.entropy,
            out.accepted,
            out.next_canvas,
            out.next_self_cond,
            out.mean_entropy,
        )
        return (*result, out.logits) if self.debug_logits else result


TORCH_DTYPES = {"int64": torch.int64, "bool": torch.bool, "float32": torch.float32}


def example_inputs(specs: list[TensorSpec], dims: dict[str, int], model_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Concrete tensors matching a contract, for tracing: all zeros except masks (True) and ids (valid ids)."""
    tensors = []
    for spec in specs:
        shape = [dims[d] if isinstance(d, str) else d for d in spec.shape]
        dtype = model_dtype if spec.dtype == MODEL_DTYPE else TORCH_DTYPES[spec.dtype]
        fill = True if dtype == torch.bool else 0
        tensors.append(torch.full(shape, fill, dtype=dtype))
    return tuple(tensors)
