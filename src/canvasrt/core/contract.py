"""The step graphs' contract: capacities, the K/V layout, and each graph's inputs and outputs, as plain data.

Written once here; the exporter traces a graph that honours it and copies it into the manifest, every backend checks
what it loads against it, and docs/ARTIFACTS.md documents it.

There is one graph, the backbone: the encoder and the decoder are the same transformer, so one set of weights serves
the three phases, told apart by the shapes of a call. Symbolic dims: `batch`, `chunk` (encoder tokens: a prompt chunk
or a canvas being committed) and `rows` (canvas tokens being denoised); a prefill or commit has rows = 0, a denoising
step chunk = 0, and each phase has its own TensorRT optimization profile (`PHASES`).

The K/V buffers are fed as their leading `context` slots (full-attention layers) or `window` slots (sliding rings),
the live context rounded up to whole canvases (`kv_spans`), so attention costs what the context holds, not what the
artifacts could hold. Everything else is a static number taken from the model config and the capacities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .config import SLIDING, ModelConfig, VisionConfig
from .errors import ArtifactError

GRAPHS = ("backbone",)
PHASES = ("prefill", "commit", "denoise")  # the backbone's optimization profiles, in this order
MODEL_DTYPE = "model"  # placeholder dtype in the contract: the export dtype (fp32, fp16 or bf16)
# Vocabulary entries per chunk of the LM head and the sampler in the graph (`DiffusionGemmaText.head`): at the
# released vocabulary (262144) 16 chunks, each [rows, canvas, chunk] fp32 tensor 16.8 MB per row of 256 tokens.
DEFAULT_VOCAB_CHUNK = 16384
Profiles = dict[str, dict[str, list[int]]]  # profile name -> symbolic dim -> [min, opt, max]
VISION_MAX_IMAGES = 16  # images per call of the vision graph (its profile); more are encoded in several calls


def prefill_limit(max_prefill: int, max_context: int, canvas: int) -> int:
    """Encoder tokens per call: within the context, yet a whole canvas, since a commit is one call over a canvas."""
    return max(min(max_prefill, max_context), canvas)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str
    doc: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), tuple(data["shape"]), str(data["dtype"]), str(data.get("doc", "")))


@dataclass(frozen=True)
class Capacity:
    """Static sizes a set of artifacts is built for; the K/V buffers and TensorRT profiles follow from them."""

    max_batch: int
    max_context: int  # committed tokens (prompt + committed canvases) a request can hold
    max_prefill: int  # encoder tokens per call; longer prompts are prefilled in chunks
    canvas: int
    sliding: int  # ring slots of a sliding layer: min(W - 1, max_context)

    @classmethod
    def for_model(cls, config: ModelConfig, max_batch: int, max_context: int, max_prefill: int | None) -> Capacity:
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

    def narrowed(self, max_batch: int | None, max_context: int | None) -> Capacity:
        """This capacity cut down to a smaller batch and context (`canvasrt build`); refuses values above it."""
        values = {"max_batch": self.max_batch, "max_context": self.max_context}
        for option, key, value in (
            ("--max-batch", "max_batch", max_batch),
            ("--max-context", "max_context", max_context),
        ):
            if value is None:
                continue
            if value < 1:
                raise ArtifactError(f"{option} must be at least 1 (got {value})")
            if value > values[key]:
                raise ArtifactError(
                    f"{option} {value} exceeds the artifacts' {key} of {values[key]}; pass at most "
                    f"{values[key]} or re-export with a larger {option}"
                )
            values[key] = value
        return Capacity(
            values["max_batch"],
            values["max_context"],
            prefill_limit(self.max_prefill, values["max_context"], self.canvas),
            self.canvas,
            self.sliding,
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class KVLayer:
    """One layer's K/V buffer: full layers hold one slot per absolute position, sliding layers a ring where
    position p lives in slot p mod slots."""

    layer: int
    kind: str
    num_kv_heads: int
    head_dim: int
    slots: int
    ring: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "slots": self.slots,
            "indexing": "position mod slots" if self.ring else "position",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayer:
        return cls(
            int(data["layer"]),
            str(data["kind"]),
            int(data["num_kv_heads"]),
            int(data["head_dim"]),
            int(data["slots"]),
            data["indexing"] == "position mod slots",
        )


def kv_layout(config: ModelConfig, capacity: Capacity) -> tuple[KVLayer, ...]:
    return tuple(
        KVLayer(
            i,
            layer.kind,
            layer.num_kv_heads,
            layer.head_dim,
            capacity.slots(layer.kind),
            capacity.slots(layer.kind) < capacity.max_context,
        )
        for i, layer in enumerate(config.layers)
    )


def span_dim(layer: KVLayer, capacity: Capacity) -> int | str:
    """The past K/V length of a layer in the graph: `context` (full-attention layers and sliding layers whose ring
    never wraps), `window` (rings), or the static slot count where a ring holds less than one canvas, since its span
    is then always all of it."""
    if not layer.ring:
        return "context"
    return "window" if capacity.canvas < layer.slots else layer.slots


def span_ranges(layout: tuple[KVLayer, ...], capacity: Capacity) -> dict[str, list[int]]:
    """[min, opt, max] of each symbolic span dim: from one canvas to every slot (TensorRT tunes for the most)."""
    ranges = {}
    for layer in layout:
        dim = span_dim(layer, capacity)
        if isinstance(dim, str):
            high = capacity.max_context if dim == "context" else layer.slots
            ranges[dim] = [min(capacity.canvas, high), high, high]
    return ranges


def kv_spans(layout: tuple[KVLayer, ...], capacity: Capacity, context_length: int) -> list[int]:
    """Per layer, how many leading buffer slots a call reads: the longest row's context rounded up to whole canvases
    (so the shapes change once per committed canvas, not per token), at most the layer's slots. Slots past a row's
    context are masked in the graph, so any span that covers the context gives the same result."""
    canvases = max(1, -(-int(context_length) // capacity.canvas))
    return [min(canvases * capacity.canvas, layer.slots, capacity.max_context) for layer in layout]


def kv_specs(layout: tuple[KVLayer, ...], prefix: str, length: list[int | str], doc: str) -> list[TensorSpec]:
    """K then V per layer, `length[i]` slots of layer i."""
    return [
        TensorSpec(
            f"{prefix}{part}_{kv.layer}",
            ("batch", kv.num_kv_heads, length[kv.layer], kv.head_dim),
            MODEL_DTYPE,
            f"layer {kv.layer} ({kv.kind}) {part}s: {doc}",
        )
        for part in ("key", "value")
        for kv in layout
    ]


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


def image_inputs(config: ModelConfig) -> list[TensorSpec]:
    """The backbone's inputs for image prompts (artifacts exported with the vision graph only)."""
    return [
        TensorSpec(
            "image_tokens",
            ("image_tokens", config.hidden_size),
            MODEL_DTYPE,
            "the soft tokens (vision graph outputs, padding stripped) of the images in this chunk; empty otherwise",
        ),
        TensorSpec(
            "image_slot",
            ("batch", "chunk"),
            "int64",
            "per encoder token: the row of image_tokens replacing its embedding, -1 for a text token",
        ),
    ]


def vision_io(vision: VisionConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The vision graph's inputs and outputs: the Gemma 4 image processor's arrays in, projected soft tokens out."""
    width = 3 * vision.patch_size**2
    inputs = [
        TensorSpec(
            "pixel_values",
            ("images", "patches", width),
            "float32",
            "the image processor's patches, values in [0, 1]; patches = pooling_kernel_size^2 x tokens",
        ),
        TensorSpec(
            "image_position_ids",
            ("images", "patches", 2),
            "int64",
            "(x, y) of each patch in its image, (-1, -1) for padding patches",
        ),
    ]
    outputs = [
        TensorSpec(
            "soft_tokens",
            ("images", "tokens", vision.text_hidden_size),
            MODEL_DTYPE,
            "each image's pooled, projected soft tokens (rows beyond the image's own are padding)",
        ),
        TensorSpec("soft_token_mask", ("images", "tokens"), "bool", "True for an image's real soft tokens"),
    ]
    return inputs, outputs


def vision_profiles(vision: VisionConfig, max_soft_tokens: int) -> Profiles:
    """The vision graph's one profile: 1 to VISION_MAX_IMAGES images of up to `max_soft_tokens` soft tokens."""
    k2 = vision.pooling_kernel_size**2
    return {
        "vision": {
            "images": [1, 1, VISION_MAX_IMAGES],
            "tokens": [1, max_soft_tokens, max_soft_tokens],
            "patches": [k2, k2 * max_soft_tokens, k2 * max_soft_tokens],
        }
    }


def backbone_io(
    config: ModelConfig, capacity: Capacity, debug_logits: bool, vision: bool = False
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    b, h = "batch", config.hidden_size
    layout = kv_layout(config, capacity)
    past_doc = (
        "the leading slots of the committed context's buffer (full layers: slot = position; sliding: slot = "
        "position mod slots), at least the longest row's context"
    )
    inputs = [
        TensorSpec("input_ids", (b, "chunk"), "int64", "encoder tokens: a prompt chunk or the canvas being committed"),
        TensorSpec("positions", (b, "chunk"), "int64", "absolute position of each encoder token"),
        TensorSpec("canvas", (b, "rows"), "int64", "the canvas being denoised (at the positions after the context)"),
        TensorSpec(
            "self_cond", (b, "rows", h), MODEL_DTYPE, "soft embedding of the previous step (zeros at the first step)"
        ),
        *_context_specs(capacity),
        TensorSpec("temperature", (b,), "float32", "this step's temperature t_min + (t_max - t_min) * t / N"),
        TensorSpec("entropy_bound", (b,), "float32", "entropy budget of the acceptance rule"),
        TensorSpec("uniforms", (b, "rows"), "float32", "one U[0,1) draw per position for sampling (inverse CDF)"),
        TensorSpec("renoise_ids", (b, "rows"), "int64", "uniform random token ids for rejected positions"),
        *(image_inputs(config) if vision else []),
        *kv_specs(layout, "past_", [span_dim(kv, capacity) for kv in layout], past_doc),
    ]
    outputs = [
        *kv_specs(
            layout,
            "",
            ["chunk"] * len(layout),
            "the encoder tokens' K/V, to be written into the buffers at their positions",
        ),
        TensorSpec(
            "sampled", (b, "rows"), "int64", "token sampled at each position from the temperature-scaled logits"
        ),
        TensorSpec("argmax", (b, "rows"), "int64", "argmax canvas (the draft; committed after the last step)"),
        TensorSpec("entropy", (b, "rows"), "float32", "entropy of each position's temperature-scaled distribution"),
        TensorSpec("accepted", (b, "rows"), "bool", "entropy-bound acceptance mask"),
        TensorSpec("next_canvas", (b, "rows"), "int64", "accepted samples kept, all other positions renoised"),
        TensorSpec("next_self_cond", (b, "rows", h), MODEL_DTYPE, "soft embedding for the next step"),
        TensorSpec(
            "mean_entropy",
            (b,),
            "float32",
            "mean entropy over the canvas (adaptive-stop confidence; NaN when rows = 0)",
        ),
    ]
    if debug_logits:
        outputs.append(
            TensorSpec(
                "logits", (b, "rows", config.vocab_size), "float32", "softcapped logits before temperature (debug)"
            )
        )
    return inputs, outputs


def graph_profiles(config: ModelConfig, capacity: Capacity, vision: bool = False) -> Profiles:
    """Shape ranges [min, opt, max] per symbolic dim, one entry per phase (TensorRT optimization profile)."""
    batch = [1, capacity.max_batch, capacity.max_batch]
    canvas, none = [capacity.canvas] * 3, [0, 0, 0]
    spans = span_ranges(kv_layout(config, capacity), capacity)
    profiles = {
        "prefill": {"batch": batch, "chunk": [1, capacity.max_prefill, capacity.max_prefill], "rows": none, **spans},
        "commit": {"batch": batch, "chunk": canvas, "rows": none, **spans},
        "denoise": {"batch": batch, "chunk": none, "rows": canvas, **spans},
    }
    if vision:  # soft tokens arrive in prefill chunks only
        most = capacity.max_batch * capacity.max_prefill
        profiles["prefill"]["image_tokens"] = [0, 0, most]
        profiles["commit"]["image_tokens"] = none
        profiles["denoise"]["image_tokens"] = none
    return profiles


def narrow_profiles(profiles: Profiles, capacity: Capacity) -> Profiles:
    """Profiles whose batch, chunk and context ranges stay within `capacity` (see Capacity.narrowed); a range that
    starts above the limit (the commit profile's chunk, one canvas) is kept as it is."""
    limits = {"batch": capacity.max_batch, "chunk": capacity.max_prefill, "context": capacity.max_context}
    narrowed: Profiles = {}
    for name, dims in profiles.items():
        narrowed[name] = {}
        for dim, (low, opt, high) in dims.items():
            high = max(low, min(high, limits.get(dim, high)))
            narrowed[name][dim] = [low, min(opt, high), high]
    return narrowed


def no_canvas(batch: int) -> dict[str, np.ndarray]:
    """The canvas group's inputs of an encoder call (rows = 0), self_cond aside: that one is backend state."""
    return {
        "canvas": np.zeros((batch, 0), np.int64),
        "temperature": np.ones(batch, np.float32),
        "entropy_bound": np.zeros(batch, np.float32),
        "uniforms": np.zeros((batch, 0), np.float32),
        "renoise_ids": np.zeros((batch, 0), np.int64),
    }


def no_chunk(batch: int) -> dict[str, np.ndarray]:
    """The encoder group's inputs of a denoising step (chunk = 0)."""
    return {"input_ids": np.zeros((batch, 0), np.int64), "positions": np.zeros((batch, 0), np.int64)}


def encoder_phase(chunk: int, canvas: int) -> str:
    """The phase (and so the optimization profile) of an encoder call over `chunk` tokens: a commit is one canvas."""
    return "commit" if chunk == canvas else "prefill"


# ONNX Runtime's and TensorRT's names for the contract's dtypes, for checking what a backend loaded.
ONNX_TYPES = {
    "int64": "tensor(int64)",
    "bool": "tensor(bool)",
    "float32": "tensor(float)",
    "fp32": "tensor(float)",
    "fp16": "tensor(float16)",
    "bf16": "tensor(bfloat16)",
}


def check_io(
    declared: list[TensorSpec],
    found: list[tuple[str, str, tuple[int | str | None, ...]]],
    model_dtype: str,
    source: str,
    types: dict[str, str],
    what: str,
) -> None:
    """Refuses a graph or engine whose `what` ("inputs"/"outputs") differ from the manifest's in name, dtype or static
    shape. found: (name, the runtime's dtype name, shape with symbolic dims as strings, None or -1)."""
    expected = {spec.name: spec for spec in declared}
    actual = {name: (dtype, shape) for name, dtype, shape in found}
    if set(expected) != set(actual):
        missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
        raise ArtifactError(
            f"{source} does not have the {what} its manifest declares (missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}); re-export or rebuild it"
        )
    for name, spec in expected.items():
        dtype, shape = actual[name]
        want = types[model_dtype if spec.dtype == MODEL_DTYPE else spec.dtype]
        static = [d if isinstance(d, int) else None for d in spec.shape]
        got = [d if isinstance(d, int) and d >= 0 else None for d in shape]
        if dtype != want or len(got) != len(static) or any(s is not None and s != g for s, g in zip(static, got)):
            raise ArtifactError(
                f"{source}: {what[:-1]} {name} is {dtype} {list(shape)}, its manifest declares {want} "
                f"{list(spec.shape)}; re-export or rebuild it"
            )
