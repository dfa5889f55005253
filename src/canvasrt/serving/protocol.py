"""The request and response tensors of the `canvasrt_generate` Triton model, and their translation to the loop.

One request is one prompt. Every input but the prompt is optional; unset settings fall back to the artifacts'
generation config, exactly as in `canvasrt generate`. The model streams one response per committed canvas
(`event` "block"), per denoising step on request (`event` "draft"), and a final one (`event` "done") with the whole
generation. Every response carries every output, so clients read one schema.

Plain numpy and the standard library: the Triton model, the repository writer and the clients share this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import CanvasrtError
from ..runtime.loop import Committed, Draft, left_pad, stream
from ..runtime.prompts import TextCodec, until_eos
from ..runtime.rng import make_draws
from ..runtime.settings import GenerationSettings, resolve_settings
from ..runtime.step import StepBackend


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # Triton's datatype name (the protocol's, as in "INT64"); TYPE_<dtype> in config.pbtxt
    dims: tuple[int, ...]
    doc: str


SETTING_INPUTS = (
    Field("max_new_tokens", "INT32", (1,), "tokens to generate, rounded up to whole canvases"),
    Field("max_denoising_steps", "INT32", (1,), "denoising steps per canvas at most"),
    Field("entropy_bound", "FP32", (1,), "entropy budget of the acceptance rule"),
    Field("t_min", "FP32", (1,), "temperature at the last step"),
    Field("t_max", "FP32", (1,), "temperature at the first step"),
    Field("stability_threshold", "INT32", (1,), "steps the argmax must stay unchanged before an early stop"),
    Field("confidence_threshold", "FP32", (1,), "mean entropy below which a stable canvas stops"),
)
INPUTS = (
    Field("prompt", "BYTES", (1,), "prompt text (UTF-8), tokenized with the artifacts' tokenizer"),
    Field("prompt_ids", "INT64", (-1,), "prompt token ids, instead of prompt text"),
    Field("seed", "INT64", (1,), "seed of the counter RNG (default 0); the same seed gives the same tokens anywhere"),
    Field("stream", "BOOL", (1,), "false: send only the final response (HTTP /generate takes exactly one)"),
    Field("stream_drafts", "BOOL", (1,), "also stream the argmax canvas after every denoising step"),
    *SETTING_INPUTS,
)
OUTPUTS = (
    Field("event", "BYTES", (1,), "draft, block or done"),
    Field("block", "INT32", (1,), "canvas index (done: canvases generated)"),
    Field("step", "INT32", (1,), "denoising steps run in this canvas (done: in all canvases)"),
    Field("ids", "INT64", (-1,), "draft: argmax canvas; block: committed canvas; done: all generated ids"),
    Field("text", "BYTES", (1,), "block: the canvas's text; done: the whole text (up to EOS; empty without tokenizer)"),
    Field("tokens_per_forward", "FP32", (1,), "done: generated tokens per denoising forward; otherwise 0"),
)
NUMPY = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}


@dataclass(frozen=True)
class GenerationRequest:
    ids: list[int]
    seed: int
    settings: GenerationSettings
    stream: bool
    stream_drafts: bool


def _scalar(inputs: dict[str, np.ndarray], name: str) -> Any:
    value = inputs[name].reshape(-1)
    if value.size != 1:
        raise CanvasrtError(f"input {name!r} takes one value, got {value.size}")
    item = value[0]
    return item.item() if isinstance(item, np.generic) else item


def parse_request(inputs: dict[str, np.ndarray], generation_config: dict[str, Any], encode: Any) -> GenerationRequest:
    """inputs: name -> array as Triton delivered them (dtypes already checked against the model config).
    encode: text -> ids, or None when the artifacts carry no tokenizer."""
    has_text, has_ids = "prompt" in inputs, "prompt_ids" in inputs
    if has_text == has_ids:
        raise CanvasrtError("send exactly one of the inputs 'prompt' (text) and 'prompt_ids'")
    if has_text:
        if encode is None:
            raise CanvasrtError("these artifacts carry no tokenizer; send 'prompt_ids' instead of 'prompt'")
        raw = _scalar(inputs, "prompt")
        ids = encode(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
    else:
        ids = [int(i) for i in inputs["prompt_ids"].reshape(-1)]
    if not ids:
        raise CanvasrtError("the prompt is empty")
    overrides = {f.name: _scalar(inputs, f.name) for f in SETTING_INPUTS if f.name in inputs}
    settings = resolve_settings(generation_config, overrides)
    seed = int(_scalar(inputs, "seed")) if "seed" in inputs else 0
    if seed < 0:
        raise CanvasrtError(f"seed must be non-negative, got {seed}")
    streaming = bool(_scalar(inputs, "stream")) if "stream" in inputs else True
    drafts = bool(_scalar(inputs, "stream_drafts")) if "stream_drafts" in inputs else False
    return GenerationRequest(ids=ids, seed=seed, settings=settings, stream=streaming, stream_drafts=streaming and drafts)


def response(event: str, block: int, step: int, ids: np.ndarray, text: str, tokens_per_forward: float = 0.0) -> dict[str, np.ndarray]:
    """The output tensors of one streamed response."""
    return {
        "event": np.array([event.encode()], dtype=np.object_),
        "block": np.array([block], dtype=np.int32),
        "step": np.array([step], dtype=np.int32),
        "ids": np.asarray(ids, dtype=np.int64).reshape(-1),
        "text": np.array([text.encode("utf-8")], dtype=np.object_),
        "tokens_per_forward": np.array([tokens_per_forward], dtype=np.float32),
    }


def request_inputs(prompt: str | None = None, prompt_ids: list[int] | None = None, seed: int | None = None,
                   stream: bool = True, stream_drafts: bool = False, **settings: Any) -> dict[str, np.ndarray]:
    """Client side: the input tensors for a request (None values are left out, so the model's defaults apply)."""
    inputs: dict[str, np.ndarray] = {}
    if prompt is not None:
        inputs["prompt"] = np.array([prompt.encode("utf-8")], dtype=np.object_)
    if prompt_ids is not None:
        inputs["prompt_ids"] = np.asarray(prompt_ids, dtype=np.int64)
    if seed is not None:
        inputs["seed"] = np.array([seed], dtype=np.int64)
    if not stream:
        inputs["stream"] = np.array([False])
    if stream_drafts:
        inputs["stream_drafts"] = np.array([True])
    fields = {f.name: f for f in SETTING_INPUTS}
    for name, value in settings.items():
        if name not in fields:
            raise CanvasrtError(f"unknown generation setting {name!r}; use one of {', '.join(fields)}")
        if value is not None:
            inputs[name] = np.array([value], dtype=NUMPY[fields[name].dtype])
    return inputs


def responses(backend: StepBackend, request: GenerationRequest, codec: TextCodec | None) -> Iterator[dict[str, np.ndarray]]:
    """Runs one request through the loop on a started backend, yielding the output tensors of each response."""
    settings = request.settings
    ids, padding = left_pad([request.ids], settings.pad_token_id or 0)
    draws = make_draws("counter", request.seed, 1, backend.spec.model.vocab_size, backend.spec.capacity.canvas)

    def text(tokens: np.ndarray) -> str:
        return codec.decode(until_eos(tokens, settings.eos_token_ids, settings.pad_token_id)) if codec else ""

    for event in stream(backend, ids, padding, settings, draws):
        if isinstance(event, Draft):
            if request.stream_drafts:
                yield response("draft", event.block, event.step, event.argmax[0], "")
        elif isinstance(event, Committed):
            if request.stream:
                yield response("block", event.block, event.steps, event.tokens[0], text(event.tokens[0]))
        else:
            new = event.new_tokens[0]
            yield response("done", len(event.steps_per_block), sum(event.steps_per_block), new, text(new),
                           float(event.tokens_per_forward[0]))
