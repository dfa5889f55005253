"""The request and response tensors of the `canvasrt_generate` Triton model, and their translation to the loop.

One request is one prompt. Every input but the prompt is optional; unset settings fall back to the artifacts'
generation config, exactly as in `canvasrt generate`. The model streams one response per committed canvas
(`event` "block"), per denoising step on request (`event` "draft"), and a final one (`event` "done") with the whole
generation. Every response carries every output, so clients read one schema.

What one request may cost is bounded: its settings by `GenerationSettings.validate` (at most MAX_DENOISING_STEPS
steps per canvas, finite float32 temperatures and thresholds), its prompt plus canvases by the model's context
capacity (`loop.check_request`), its run time by its own `deadline_ms`, and a request whose client cancels (gRPC
stream cancellation) leaves its slot at the next denoising step, so no slot is held by a request nobody waits for.

Plain numpy and the standard library: the Triton model, the repository writer and the clients share this file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import CanvasrtError
from ..runtime.loop import Committed, Draft, GenerationResult
from ..runtime.prompts import TextCodec, until_eos
from ..runtime.settings import GenerationSettings, resolve_settings, served_input


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # Triton's datatype name (the protocol's, as in "INT64"); TYPE_<dtype> in config.pbtxt
    dims: tuple[int, ...]
    doc: str


SETTING_INPUTS = (
    Field("max_new_tokens", "INT64", (1,), "tokens to generate, rounded up to whole canvases"),
    Field("max_denoising_steps", "INT64", (1,), "denoising steps per canvas at most"),
    Field("entropy_bound", "FP32", (1,), "entropy budget of the acceptance rule"),
    Field("t_min", "FP32", (1,), "temperature at the last step"),
    Field("t_max", "FP32", (1,), "temperature at the first step"),
    Field("stability_threshold", "INT64", (1,), "steps the argmax must stay unchanged before an early stop"),
    Field("confidence_threshold", "FP32", (1,), "mean entropy below which a stable canvas stops"),
)
INPUTS = (
    Field("prompt", "BYTES", (1,), "prompt text (UTF-8), tokenized with the artifacts' tokenizer"),
    Field("prompt_ids", "INT64", (-1,), "prompt token ids, instead of prompt text"),
    Field("seed", "INT64", (1,), "seed of the counter RNG (default 0); the same seed gives the same tokens anywhere"),
    Field("stream", "BOOL", (1,), "false: send only the final response (HTTP /generate takes exactly one)"),
    Field("stream_drafts", "BOOL", (1,), "also stream the argmax canvas after every denoising step"),
    Field("deadline_ms", "INT64", (1,), "milliseconds the generation may run; past it the request ends in an error"),
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
MAX_TOKEN_BYTES = 256  # no token of a tokenizer spans more bytes of text: the bound on a prompt's length
NUMPY = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}


@dataclass(frozen=True)
class GenerationRequest:
    ids: list[int]
    seed: int
    settings: GenerationSettings
    stream: bool
    stream_drafts: bool
    deadline_ms: int | None = None


def _scalar(inputs: dict[str, np.ndarray], name: str) -> Any:
    value = inputs[name].reshape(-1)
    if value.size != 1:
        raise CanvasrtError(f"input {name!r} takes one value, got {value.size}")
    item = value[0]
    return item.item() if isinstance(item, np.generic) else item


def parse_request(
    inputs: dict[str, np.ndarray], generation_config: dict[str, Any], encode: Any, max_context: int | None = None
) -> GenerationRequest:
    """inputs: name -> array as Triton delivered them (dtypes already checked against the model config).
    encode: text -> ids, or None when the artifacts carry no tokenizer. max_context: the model's context capacity;
    a prompt that cannot fit it is refused before it is tokenized or converted (a multi-megabyte body would
    otherwise hold the instance for minutes)."""
    has_text, has_ids = "prompt" in inputs, "prompt_ids" in inputs
    if has_text == has_ids:
        raise CanvasrtError("send exactly one of the inputs 'prompt' (text) and 'prompt_ids'")
    if has_text:
        if encode is None:
            raise CanvasrtError("these artifacts carry no tokenizer; send 'prompt_ids' instead of 'prompt'")
        raw = _scalar(inputs, "prompt")
        if max_context is not None and len(raw) > max_context * MAX_TOKEN_BYTES:
            raise CanvasrtError(
                f"the prompt has {len(raw)} bytes, more than a context of {max_context} tokens can hold; shorten it"
            )
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise CanvasrtError(
                f"the prompt is not UTF-8 text (byte {exc.start}); send UTF-8 or 'prompt_ids'"
            ) from None
        ids = encode(text)
    else:
        given = inputs["prompt_ids"].reshape(-1)
        if max_context is not None and given.size > max_context:
            raise CanvasrtError(
                f"prompt_ids has {given.size} ids, more than the context of {max_context} tokens; shorten it"
            )
        ids = [int(i) for i in given]
    if not ids:
        raise CanvasrtError("the prompt is empty")
    overrides = {f.name: _scalar(inputs, f.name) for f in SETTING_INPUTS if f.name in inputs}
    settings = resolve_settings(generation_config, overrides, served_input)
    seed = int(_scalar(inputs, "seed")) if "seed" in inputs else 0
    if seed < 0:
        raise CanvasrtError(f"seed must be non-negative, got {seed}")
    streaming = bool(_scalar(inputs, "stream")) if "stream" in inputs else True
    drafts = bool(_scalar(inputs, "stream_drafts")) if "stream_drafts" in inputs else False
    deadline = int(_scalar(inputs, "deadline_ms")) if "deadline_ms" in inputs else None
    if deadline is not None and deadline < 1:
        raise CanvasrtError(f"deadline_ms must be at least 1, got {deadline}")
    return GenerationRequest(
        ids=ids,
        seed=seed,
        settings=settings,
        stream=streaming,
        stream_drafts=streaming and drafts,
        deadline_ms=deadline,
    )


def response(
    event: str, block: int, step: int, ids: np.ndarray, text: str, tokens_per_forward: float = 0.0
) -> dict[str, np.ndarray]:
    """The output tensors of one streamed response."""
    return {
        "event": np.array([event.encode()], dtype=np.object_),
        "block": np.array([block], dtype=np.int32),
        "step": np.array([step], dtype=np.int32),
        "ids": np.asarray(ids, dtype=np.int64).reshape(-1),
        "text": np.array([text.encode("utf-8")], dtype=np.object_),
        "tokens_per_forward": np.array([tokens_per_forward], dtype=np.float32),
    }


def request_inputs(
    prompt: str | None = None,
    prompt_ids: list[int] | None = None,
    seed: int | None = None,
    stream: bool = True,
    stream_drafts: bool = False,
    deadline_ms: int | None = None,
    **settings: Any,
) -> dict[str, np.ndarray]:
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
    if deadline_ms is not None:
        inputs["deadline_ms"] = _setting_tensor("deadline_ms", deadline_ms, "INT64")
    fields = {f.name: f for f in SETTING_INPUTS}
    for name, value in settings.items():
        if name not in fields:
            raise CanvasrtError(f"unknown generation setting {name!r}; use one of {', '.join(fields)}")
        if value is not None:
            inputs[name] = _setting_tensor(name, value, fields[name].dtype)
    return inputs


def _setting_tensor(name: str, value: Any, triton_dtype: str) -> np.ndarray:
    # numpy would wrap an out-of-range int or turn a finite float into inf (with a warning), which the server then
    # refuses under a value the caller never sent
    dtype = NUMPY[triton_dtype]
    if np.issubdtype(dtype, np.integer):
        low, high = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
        span = f"{low} to {high}"
    else:
        low, high = float(np.finfo(dtype).min), float(np.finfo(dtype).max)
        span = f"{low:.4g} to {high:.4g}"
    if (isinstance(value, int) or np.isfinite(value)) and not low <= value <= high:
        raise CanvasrtError(
            f"{name} {value} does not fit the input's {triton_dtype} ({span}); send a value in that range"
        )
    return np.array([value], dtype=dtype)


class ResponseStream:
    """One request's responses from its events (as the loop or the scheduler yields them for a batch of one)."""

    def __init__(self, request: GenerationRequest, codec: TextCodec | None):
        self.request = request
        self.codec = codec
        self.started = time.monotonic()

    def text(self, tokens: np.ndarray) -> str:
        settings = self.request.settings
        return self.codec.decode(until_eos(tokens, settings.eos_token_ids, settings.pad_token_id)) if self.codec else ""

    def deadline_error(self, event: Draft | Committed | GenerationResult) -> str | None:
        """The error to end the request with when it is past its deadline (a finished generation is sent, however
        late)."""
        elapsed_ms = (time.monotonic() - self.started) * 1000
        if (
            self.request.deadline_ms is None
            or elapsed_ms <= self.request.deadline_ms
            or isinstance(event, GenerationResult)
        ):
            return None
        where = f"canvas {event.block}, step {event.step}" if isinstance(event, Draft) else f"canvas {event.block}"
        return (
            f"the request passed its deadline_ms of {self.request.deadline_ms} at {where} ({elapsed_ms:.0f} ms); "
            "raise deadline_ms or lower max_denoising_steps / max_new_tokens"
        )

    def responses(self, event: Draft | Committed | GenerationResult) -> list[dict[str, np.ndarray]]:
        """The output tensors of the responses this event makes (none for a draft unless drafts are streamed)."""
        if isinstance(event, Draft):
            return (
                [response("draft", event.block, event.step, event.argmax[0], "")] if self.request.stream_drafts else []
            )
        if isinstance(event, Committed):
            tokens = event.tokens[0]
            return (
                [response("block", event.block, event.steps, tokens, self.text(tokens))] if self.request.stream else []
            )
        new = event.new_tokens[0]
        return [
            response(
                "done",
                len(event.steps_per_block),
                sum(event.steps_per_block),
                new,
                self.text(new),
                float(event.tokens_per_forward[0]),
            )
        ]
