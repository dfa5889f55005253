"""The request and response tensors of the `canvasrt_generate` Triton model, and their translation to the loop.

One request is one prompt. Every input but the prompt is optional; unset settings fall back to the artifacts'
generation config, exactly as in `canvasrt generate`. The model streams one response per committed canvas
(`event` "block"), per denoising step on request (`event` "draft"), and a final one (`event` "done") with the whole
generation. Every response carries every output, so clients read one schema.

The LLM conventions of Triton (the inputs and outputs of TensorRT-LLM's ensemble and of the vLLM backend) are taken
beside these: a request that uses any of LLM_INPUTS, `sampling_parameters` (vLLM's JSON object) or request parameters
(what Triton's HTTP generate endpoint makes of `parameters` and of unknown fields) is an LLM request. It defaults to
one response (`stream` false), returns at most `max_tokens` tokens, and its streamed responses are deltas: one per
committed canvas, the last canvas's delta in the final response with its `finish_reason`, so no empty chunk trails.
`text_output` is the whole text (after the prompt, unless `exclude_input_in_output` is false) when not streaming.
Requests in canvasrt's own protocol get the LLM outputs too, `text_output` mirroring `text` (a block's canvas,
the whole text in "done").
`temperature` scales DiffusionGemma's temperature schedule (t_min and t_max alike: 1 keeps the checkpoint's); the
sampler has no nucleus, top-k, penalties or beams, so those options are refused unless they ask for nothing.

What one request may cost is bounded: its settings by `GenerationSettings.validate` (at most MAX_DENOISING_STEPS
steps per canvas, finite float32 temperatures and thresholds), its prompt plus canvases by the model's context
capacity (`loop.check_request`), its run time by its own `deadline_ms`, and a request whose client cancels (gRPC
stream cancellation) leaves its slot at the next denoising step, so no slot is held by a request nobody waits for.

Plain numpy and the standard library: the Triton model, the repository writer and the clients share this file.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..core.errors import CanvasrtError
from ..runtime.loop import Committed, Draft, GenerationResult, tokens_per_forward
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
    Field("images", "BYTES", (-1,), "encoded image files (PNG, JPEG, ...) for the prompt's <|image|> marks, in order"),
    *SETTING_INPUTS,
)
LLM_INPUTS = (
    Field("text_input", "BYTES", (1,), "prompt text (UTF-8), as TensorRT-LLM's and vLLM's Triton models take it"),
    Field("max_tokens", "INT32", (1,), "tokens to return at most (whole canvases are generated, the text is cut)"),
    Field("temperature", "FP32", (1,), "scales the t_min..t_max schedule (1: the checkpoint's); above 0"),
    Field("random_seed", "UINT64", (1,), "TensorRT-LLM's name of `seed`"),
    Field("stop", "BYTES", (-1,), "strings that end the text, cut before them (finish_reason stop)"),
    Field("stop_words", "BYTES", (-1,), "TensorRT-LLM's name of `stop`"),
    Field(
        "exclude_input_in_output", "BOOL", (1,), "false: the prompt text leads the output (default when not streaming)"
    ),
    Field("sampling_parameters", "BYTES", (1,), "vLLM's JSON object: max_tokens, temperature, seed, stop, ..."),
    Field("bad_words", "BYTES", (-1,), "refused unless empty: the sampler cannot ban words"),
    Field("top_p", "FP32", (1,), "refused unless 1: the sampler draws from the whole distribution"),
    Field("top_k", "INT32", (1,), "refused unless 0 (off)"),
    Field("beam_width", "INT32", (1,), "refused unless 1"),
    Field("num_return_sequences", "INT32", (1,), "refused unless 1"),
    Field("min_length", "INT32", (1,), "refused unless 0"),
    Field("repetition_penalty", "FP32", (1,), "refused unless 1"),
    Field("presence_penalty", "FP32", (1,), "refused unless 0"),
    Field("frequency_penalty", "FP32", (1,), "refused unless 0"),
    Field("length_penalty", "FP32", (1,), "refused unless 1"),
    Field("end_id", "INT32", (1,), "refused unless one of the model's EOS ids"),
    Field("pad_id", "INT32", (1,), "refused unless the model's pad id"),
    Field("return_finish_reason", "BOOL", (1,), "accepted: finish_reason is always sent"),
    Field("return_num_input_tokens", "BOOL", (1,), "accepted: num_input_tokens is always sent"),
    Field("return_num_output_tokens", "BOOL", (1,), "accepted: num_output_tokens is always sent"),
    Field("return_log_probs", "BOOL", (1,), "refused unless false: the loop keeps no log probabilities"),
    Field("return_logprobs", "BOOL", (1,), "refused unless false"),
    Field("return_cumulative_logprob", "BOOL", (1,), "refused unless false"),
)
ALL_INPUTS = INPUTS + LLM_INPUTS
OUTPUTS = (
    Field("text_output", "BYTES", (-1,), "streaming: the text this response adds; otherwise the whole text"),
    Field("finish_reason", "BYTES", (-1,), "final response: stop (EOS or a stop string), length or cancelled"),
    Field("num_input_tokens", "UINT32", (1,), "tokens in the prompt"),
    Field("num_output_tokens", "UINT32", (-1,), "tokens of text_output"),
    Field("event", "BYTES", (1,), "draft, block or done"),
    Field("block", "INT32", (1,), "canvas index (done: canvases generated)"),
    Field("step", "INT32", (1,), "denoising steps run in this canvas (done: in all canvases)"),
    Field("ids", "INT64", (-1,), "draft: argmax canvas; block: committed canvas; done: all generated ids"),
    Field("text", "BYTES", (1,), "block: the canvas's text; done: the whole text (up to EOS; empty without tokenizer)"),
    Field("tokens_per_forward", "FP32", (1,), "done: generated tokens per denoising forward; otherwise 0"),
)
NUMPY = {
    "BYTES": np.object_,
    "INT64": np.int64,
    "UINT64": np.uint64,
    "INT32": np.int32,
    "UINT32": np.uint32,
    "FP32": np.float32,
    "BOOL": np.bool_,
}
# Options the sampler cannot honour, accepted only at the value that asks for nothing (several names per option:
# TensorRT-LLM's inputs, vLLM's and OpenAI's sampling parameters).
NEUTRAL = {
    "top_p": (1,),
    "top_k": (0, -1),
    "min_p": (0,),
    "beam_width": (1,),
    "num_return_sequences": (1,),
    "n": (1,),
    "best_of": (1,),
    "min_length": (0,),
    "min_tokens": (0,),
    "repetition_penalty": (1,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "length_penalty": (1,),
    "use_beam_search": (False,),
    "ignore_eos": (False,),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "return_log_probs": (False,),
    "return_logprobs": (False,),
    "return_cumulative_logprob": (False,),
    "logprobs": (None, 0, False),
    "prompt_logprobs": (None, 0),
}
ACCEPTED = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")
# Names a sampling-parameters object or request parameters may carry beyond the inputs themselves
PARAMETERS = {
    "max_tokens",
    "temperature",
    "seed",
    "random_seed",
    "stop",
    "stop_words",
    "stream",
    "exclude_input_in_output",
    "bad_words",
    "end_id",
    "pad_id",
    *NEUTRAL,
    *ACCEPTED,
    *(f.name for f in SETTING_INPUTS),
}
GENERATE_MODEL = "canvasrt_generate"  # the loop model
BATCHED_MODEL = "canvasrt_generate_batched"  # the loop model's inputs and outputs with a batch dimension
# Leads the message of an error that is not the request's fault (the gRPC stream carries no status code)
INTERNAL_ERROR = "internal error: "
MAX_TOKEN_BYTES = 256  # no token of a tokenizer spans more bytes of text: the bound on a prompt's length
MAX_TEMPERATURE = 100.0  # far above any useful value: T(step) = temperature * schedule must stay a float32


@dataclass(frozen=True)
class GenerationRequest:
    ids: list[int]
    seed: int
    settings: GenerationSettings
    stream: bool
    stream_drafts: bool
    deadline_ms: int | None = None
    llm: bool = False  # the LLM conventions: deltas, max_tokens, stop strings, the final canvas in the final response
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    prefix: str = ""  # leads text_output (the prompt, where exclude_input_in_output is false)


def _scalar(inputs: dict[str, np.ndarray], name: str) -> Any:
    value = inputs[name].reshape(-1)
    if value.size != 1:
        raise CanvasrtError(f"input {name!r} takes one value, got {value.size}")
    item = value[0]
    return item.item() if isinstance(item, np.generic) else item


def _text(raw: Any, name: str) -> str:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        raise CanvasrtError(f"{name} must be text, got {raw!r}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CanvasrtError(f"{name} is not UTF-8 text (byte {exc.start}); send UTF-8") from None


def _strings(value: Any, name: str) -> list[str]:
    """A stop or bad-words list: one string, a list of strings, or a tensor of them (TensorRT-LLM's ensemble also
    takes one comma-separated string)."""
    if isinstance(value, np.ndarray):
        value = [v.item() if isinstance(v, np.generic) else v for v in value.reshape(-1)]
    if isinstance(value, (str, bytes)):
        value = [value]
    if not isinstance(value, list):
        raise CanvasrtError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    words = [_text(v, name) if isinstance(v, (str, bytes)) else None for v in value]
    if any(w is None for w in words):
        raise CanvasrtError(f"{name} must be a string or a list of strings")
    return [w for w in words if w]


def _number(value: Any, name: str, integer: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise CanvasrtError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return int(value) if integer else float(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise CanvasrtError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _llm_options(inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, Any]:
    """The LLM options of a request by name, from (lowest precedence first) request parameters, vLLM's
    `sampling_parameters` JSON and the input tensors. Unknown names and unhonoured values are refused."""
    options: dict[str, Any] = {}
    sources: list[tuple[str, dict[str, Any]]] = [("request parameter", parameters)]
    if "sampling_parameters" in inputs:
        raw = _text(_scalar(inputs, "sampling_parameters"), "sampling_parameters")
        try:
            sampling = json.loads(raw)
        except ValueError as exc:
            raise CanvasrtError(f"sampling_parameters is not JSON ({exc}); send a JSON object") from None
        if not isinstance(sampling, dict):
            raise CanvasrtError("sampling_parameters must be a JSON object of sampling parameters")
        sources.append(("sampling parameter", sampling))
    for kind, source in sources:
        unknown = sorted(set(source) - PARAMETERS)
        if unknown:
            raise CanvasrtError(
                f"unknown {kind}{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; DiffusionGemma's sampler "
                f"takes {', '.join(sorted(PARAMETERS - set(NEUTRAL) - set(ACCEPTED)))}"
            )
        options.update(source)
    for field in LLM_INPUTS:
        if field.name in inputs and field.name not in ("sampling_parameters", "text_input"):
            array = inputs[field.name]
            options[field.name] = array if field.dims == (-1,) else _scalar(inputs, field.name)
    for name, neutral in NEUTRAL.items():
        value = options.pop(name, None)
        if value is not None and value not in neutral:
            shown = " or ".join(repr(v) for v in neutral if v is not None)
            value = f"{value:.6g}" if isinstance(value, float) else repr(value)
            raise CanvasrtError(
                f"{name} {value} is not supported: DiffusionGemma's entropy-bound sampler draws every position "
                f"from the whole distribution, with no nucleus, top-k, penalties, beams or log probabilities; "
                f"leave {name} out (or send {shown})"
            )
    for name in ACCEPTED:
        options.pop(name, None)
    return options


def _prompt(inputs: dict[str, np.ndarray], encode: Any, max_context: int | None) -> tuple[list[int], str | None]:
    """The prompt's ids, and its text where it came as text."""
    texts = [name for name in ("prompt", "text_input") if name in inputs]
    if len(texts) + ("prompt_ids" in inputs) != 1:
        raise CanvasrtError("send exactly one of the inputs 'prompt' (or 'text_input', text) and 'prompt_ids'")
    text = None
    if texts:
        if encode is None:
            raise CanvasrtError(f"these artifacts carry no tokenizer; send 'prompt_ids' instead of {texts[0]!r}")
        raw = _scalar(inputs, texts[0])
        if max_context is not None and len(raw) > max_context * MAX_TOKEN_BYTES:
            raise CanvasrtError(
                f"the prompt has {len(raw)} bytes, more than a context of {max_context} tokens can hold; shorten it"
            )
        text = _text(raw, "the prompt")
        ids = encode(text)
    else:
        given = inputs["prompt_ids"].reshape(-1)
        if max_context is not None and given.size > max_context:
            raise CanvasrtError(
                f"prompt_ids has {given.size} ids, more than the context of {max_context} tokens; shorten it"
            )
        ids = [int(i) for i in given]
    if not ids:
        raise CanvasrtError("the prompt is empty; send at least one token of text")
    return ids, text


def _seed(inputs: dict[str, np.ndarray], options: dict[str, Any]) -> int:
    """The request's seed from `seed` or TensorRT-LLM's `random_seed` (an input or an option); 0 without one."""
    seeds = [name for name in ("seed", "random_seed") if name in inputs or name in options]
    if len(seeds) > 1:
        raise CanvasrtError("send seed or random_seed, not both")
    seed = 0
    if seeds:
        raw = _scalar(inputs, seeds[0]) if seeds[0] in inputs else options.pop(seeds[0])
        seed = _number(raw, seeds[0], integer=True)
        options.pop(seeds[0], None)
    if not 0 <= seed < 2**63:
        raise CanvasrtError(f"seed must be non-negative and below 2^63, got {seed}")
    return seed


def parse_request(
    inputs: dict[str, np.ndarray],
    generation_config: dict[str, Any],
    encode: Any,
    parameters: dict[str, Any] | None = None,
    decode: Any = None,
    max_context: int | None = None,
) -> GenerationRequest:
    """inputs: name -> array as Triton delivered them (dtypes already checked against the model config).
    encode / decode: text <-> ids, or None when the artifacts carry no tokenizer. parameters: the request's
    parameters (Triton's; its HTTP generate endpoint passes unknown fields there). max_context: the model's context
    capacity; a prompt that cannot fit it is refused before it is tokenized or converted (a multi-megabyte body
    would otherwise hold the instance for minutes)."""
    parameters = dict(parameters or {})
    llm = bool(parameters) or any(field.name in inputs for field in LLM_INPUTS)
    options = _llm_options(inputs, parameters) if llm else {}
    ids, text = _prompt(inputs, encode, max_context)
    overrides = {f.name: _scalar(inputs, f.name) for f in SETTING_INPUTS if f.name in inputs}
    for field in SETTING_INPUTS:  # canvasrt's own settings inside sampling_parameters or request parameters
        if field.name in options:
            value = options.pop(field.name)
            overrides.setdefault(field.name, _number(value, field.name, field.dtype.startswith("INT")))
    max_tokens = None
    if "max_tokens" in options:
        max_tokens = _number(options.pop("max_tokens"), "max_tokens", integer=True)
        if max_tokens < 1:
            raise CanvasrtError(f"max_tokens must be at least 1, got {max_tokens}")
        if "max_new_tokens" in overrides:
            raise CanvasrtError("send max_tokens or max_new_tokens, not both")
        overrides["max_new_tokens"] = max_tokens
    settings = resolve_settings(generation_config, overrides, served_input)
    if "temperature" in options:
        temperature = _number(options.pop("temperature"), "temperature", integer=False)
        if not 0 < temperature <= MAX_TEMPERATURE:
            raise CanvasrtError(
                f"temperature must be above 0 and at most {MAX_TEMPERATURE:g}, got {temperature:g}: it scales "
                "DiffusionGemma's temperature schedule, whose canvas starts from noise, so 0 (greedy) does not "
                "exist; send a seed for reproducible output"
            )
        settings = replace(settings, t_min=settings.t_min * temperature, t_max=settings.t_max * temperature).validate()
    for name, allowed in (("end_id", settings.eos_token_ids), ("pad_id", (settings.pad_token_id,))):
        if options.get(name) is not None and _number(options.pop(name), name, integer=True) not in allowed:
            raise CanvasrtError(f"{name} must be the model's own ({', '.join(map(str, allowed))}) or left out")
        options.pop(name, None)
    if "bad_words" in options and _strings(options.pop("bad_words"), "bad_words"):
        raise CanvasrtError("bad_words is not supported: the sampler cannot ban words; send it empty or leave it out")
    stop = [w for name in ("stop", "stop_words") if name in options for w in _strings(options.pop(name), name)]
    seed = _seed(inputs, options)
    stream_value = options.pop("stream", None)
    if "stream" in inputs:
        stream_value = _scalar(inputs, "stream")
    streaming = (not llm) if stream_value is None else _flag(stream_value, "stream")
    exclude = options.pop("exclude_input_in_output", None)
    prefix = ""
    if llm and not (streaming if exclude is None else _flag(exclude, "exclude_input_in_output")):
        prefix = text if text is not None else (decode(ids) if decode is not None else "")
    drafts = bool(_scalar(inputs, "stream_drafts")) if "stream_drafts" in inputs else False
    deadline = int(_scalar(inputs, "deadline_ms")) if "deadline_ms" in inputs else None
    if deadline is not None and deadline < 1:
        raise CanvasrtError(f"deadline_ms must be at least 1, got {deadline}")
    assert not options, options  # every option was read above
    return GenerationRequest(
        ids=ids,
        seed=seed,
        settings=settings,
        stream=streaming,
        stream_drafts=streaming and drafts,
        deadline_ms=deadline,
        llm=llm,
        max_tokens=max_tokens,
        stop=tuple(stop),
        prefix=prefix,
    )


def response(
    event: str,
    block: int,
    step: int,
    ids: np.ndarray,
    text: str,
    tokens_per_forward: float = 0.0,
    *,
    text_output: str = "",
    finish_reason: str = "",
    input_tokens: int = 0,
    output_tokens: int = 0,
) -> dict[str, np.ndarray]:
    """The output tensors of one streamed response."""
    return {
        "text_output": np.array([text_output.encode("utf-8")], dtype=np.object_),
        "finish_reason": np.array([finish_reason.encode()], dtype=np.object_),
        "num_input_tokens": np.array([input_tokens], dtype=np.uint32),
        "num_output_tokens": np.array([output_tokens], dtype=np.uint32),
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
        inputs["deadline_ms"] = input_tensor("deadline_ms", deadline_ms, "INT64")
    fields = {f.name: f for f in SETTING_INPUTS}
    for name, value in settings.items():
        if name not in fields:
            raise CanvasrtError(f"unknown generation setting {name!r}; use one of {', '.join(fields)}")
        if value is not None:
            inputs[name] = input_tensor(name, value, fields[name].dtype)
    return inputs


def generate_json_error(body: Any, one_response: bool) -> str | None:
    """What Triton's HTTP generate endpoints would answer badly for a JSON request body, as one line that names the
    field and the fix: a value its input's datatype cannot take (Triton 2.51 answers those with HTTP 500 before the
    model sees them), and, on /generate (`one_response`), a request in canvasrt's own protocol that streams (Triton
    then answers 200 with its own "expects exactly 1 response" error). None for a body the model should judge."""
    if not isinstance(body, dict):
        return None  # Triton refuses what is not a JSON object itself
    fields = {f.name: f for f in ALL_INPUTS}
    for name, value in body.items():
        field = fields.get(name)
        if field is None or field.dtype == "BYTES":
            continue
        listed = isinstance(value, list) and field.dims == (-1,)
        for item in value if listed else [value]:
            problem = _json_value_problem(item, field.dtype)
            if problem is not None:
                what = f"each of {name}" if listed else name
                return f"{what} must be {problem} (input type {field.dtype}), got {json.dumps(item)[:80]}"
    native = not body.get("parameters") and set(body) - {"parameters"} <= {f.name for f in INPUTS}
    if one_response and native and body.get("stream", True) is not False:
        return (
            "/generate sends one response, and a request in canvasrt's own protocol (prompt, prompt_ids) streams "
            'unless it says "stream": false; send "stream": false, or use /generate_stream'
        )
    return None


def _json_value_problem(value: Any, dtype: str) -> str | None:
    """What a JSON value for an input of Triton datatype `dtype` must be, where it is not that; None where it is."""
    if dtype == "BOOL":
        return None if isinstance(value, bool) else "true or false"
    if dtype.startswith("FP"):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    info = np.iinfo(NUMPY[dtype])
    if isinstance(value, int) and not isinstance(value, bool) and info.min <= value <= info.max:
        return None
    return f"an integer from {info.min} to {info.max}"


def input_tensor(name: str, value: Any, triton_dtype: str) -> np.ndarray:
    """One value as a one-element input tensor of `triton_dtype`, refused where the type cannot hold it."""
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

    def __init__(self, request: GenerationRequest, codec: TextCodec | None, canvas: int):
        self.request = request
        self.codec = codec
        self.started = time.monotonic()
        self.last_block = math.ceil(request.settings.max_new_tokens / canvas) - 1
        self.generated: list[np.ndarray] = []  # committed canvases
        self.steps = 0
        self.kept: list[int] = []  # generated ids up to EOS (and max_tokens), pads dropped
        self.sent = ""  # text_output sent so far, after the prefix
        self.sent_tokens = 0
        self.ended = False  # an LLM request's final response is out (at a stop string, EOS or max_tokens)

    def text(self, tokens: np.ndarray | list[int]) -> str:
        settings = self.request.settings
        if self.codec is None:
            return ""
        return self.codec.decode(until_eos(np.asarray(tokens), settings.eos_token_ids, settings.pad_token_id))

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

    def responses(self, event: Draft | Committed | GenerationResult) -> list[tuple[dict[str, np.ndarray], bool]]:
        """The output tensors of the responses this event makes, each with whether it is the request's final one
        (none for a draft unless drafts are streamed)."""
        request = self.request
        inputs = len(request.ids)
        if isinstance(event, Draft):
            if not request.stream_drafts:
                return []
            return [(response("draft", event.block, event.step, event.argmax[0], "", input_tokens=inputs), False)]
        if request.llm:
            return self._llm_responses(event)
        if isinstance(event, Committed):
            tokens = event.tokens[0]
            if not request.stream:
                return []
            text = self.text(tokens)
            count = len(until_eos(tokens, request.settings.eos_token_ids, request.settings.pad_token_id))
            block = response(
                "block",
                event.block,
                event.steps,
                tokens,
                text,
                text_output=text,
                input_tokens=inputs,
                output_tokens=count,
            )
            return [(block, False)]
        new = event.new_tokens[0]
        kept = until_eos(new, request.settings.eos_token_ids, request.settings.pad_token_id)
        text = self.text(new)
        done = response(
            "done",
            len(event.steps_per_block),
            sum(event.steps_per_block),
            new,
            text,
            float(event.tokens_per_forward[0]),
            text_output=text,
            finish_reason="stop" if len(kept) < len(new) else "length",
            input_tokens=inputs,
            output_tokens=len(kept),
        )
        return [(done, True)]

    def _llm_responses(self, event: Committed | GenerationResult) -> list[tuple[dict[str, np.ndarray], bool]]:
        """Deltas per committed canvas; the final response carries the canvas that ends the request."""
        if self.ended or isinstance(event, GenerationResult):  # the final response went out with its last canvas
            return []
        request, settings = self.request, self.request.settings
        tokens = event.tokens[0]
        self.generated.append(tokens)
        self.steps += event.steps
        self.kept += until_eos(tokens, settings.eos_token_ids, settings.pad_token_id)
        finish = ""
        if request.max_tokens is not None and len(self.kept) >= request.max_tokens:
            self.kept, finish = self.kept[: request.max_tokens], "length"
        elif settings.eos_token_ids and np.isin(tokens, settings.eos_token_ids).any():
            finish = "stop"
        elif event.block >= self.last_block:
            finish = "length"
        text = self.codec.decode(self.kept) if self.codec else ""
        cut = min((i for i in (text.find(word) for word in request.stop) if i >= 0), default=-1)
        count = len(self.kept)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            count = self._tokens_within(cut)
        if not finish:
            text = text.rstrip("\ufffd")  # a character whose bytes the next canvas completes
        delta, added = text[len(self.sent) :], count - self.sent_tokens
        self.sent, self.sent_tokens = text, count
        if not finish and not request.stream:
            return []
        first = len(self.generated) == 1 or (not request.stream)
        output = (request.prefix if first else "") + (delta if request.stream else text)
        new = np.concatenate(self.generated)
        common = dict(
            text_output=output,
            finish_reason=finish,
            input_tokens=len(request.ids),
            output_tokens=added if request.stream else count,
        )
        if not finish:
            return [(response("block", event.block, event.steps, tokens, self.text(tokens), **common), False)]
        self.ended = True
        forwards = tokens_per_forward(new[None], np.asarray([self.steps]), settings)
        done = response("done", len(self.generated), self.steps, new, self.text(new), float(forwards[0]), **common)
        return [(done, True)]

    def _tokens_within(self, length: int) -> int:
        """How many of the kept tokens decode to at most `length` characters (the text before a stop string)."""
        assert self.codec is not None
        low, high = 0, len(self.kept)
        while low < high:
            middle = (low + high + 1) // 2
            if len(self.codec.decode(self.kept[:middle])) <= length:
                low = middle
            else:
                high = middle - 1
        return low

    def cancelled(self) -> dict[str, np.ndarray]:
        """The final response of an LLM request whose client cancelled it (Triton wants one, for nobody to read)."""
        new = np.concatenate(self.generated) if self.generated else np.zeros(0, dtype=np.int64)
        return response(
            "done",
            len(self.generated),
            self.steps,
            new,
            "",
            finish_reason="cancelled",
            input_tokens=len(self.request.ids),
        )
