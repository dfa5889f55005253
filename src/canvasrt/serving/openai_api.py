"""An OpenAI-compatible HTTP API in front of `canvasrt_generate`: `/v1/models`, `/v1/completions`,
`/v1/chat/completions`, whole responses and server-sent-event streams.

A FastAPI app (under uvicorn with uvloop) that forwards every request to the loop model over Triton's gRPC streaming
(tritonclient's service stub on grpc's asyncio channel), so Triton stays the engine: its queue, a request's settings
bounds and its cancellation cover every request, and the front end holds nothing of its own but the tokenizer that
applies the chat template (transformers' `apply_chat_template`, the checkpoint's own template). Completions send their
prompt as text (`text_input`, tokenized by the model as `canvasrt generate --prompt` does); chat sends the templated
token ids. A stream carries one chunk per committed canvas, the last one with its finish_reason. The gRPC streams stay
open between requests, one request at a time on each (`_Stream`).

Errors have OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`): 400 for what the request asks (bad
JSON, wrong types, unknown fields, options the sampler cannot honour, what the model refuses), 503 when the model's
slots and queue are full, 500 otherwise. A client that disconnects cancels its Triton request, which frees its slot
at the next denoising step.

FastAPI reads the route functions' annotations at run time (the request models are built inside `app()`), so this
module does without `from __future__ import annotations`.
"""

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from starlette.responses import Response

from ..core.errors import CanvasrtError
from ..runtime.scheduler import SERVER_FULL
from .protocol import INTERNAL_ERROR, input_tensor
from .repository import GENERATE_MODEL

OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")
STREAM_END_S = 5.0  # how long shutdown waits for finished streams' closing status
IDLE_STREAMS = 64  # open gRPC streams kept for the next requests; one more request than this opens a stream of its own


IMAGE_MARKER = "<|image|>"  # the Gemma 4 tokenizer's image token: where an image_url part stood in the text


class APIError(Exception):
    """A request the API answers with an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def _triton_error(message: str) -> APIError:
    """An error the loop model (or Triton) answered with: the stream carries a message and no status code, so the
    model marks the two kinds that are not the request's fault."""
    if message.startswith(SERVER_FULL):
        return APIError(503, message, kind="server_error")
    if message.startswith(INTERNAL_ERROR):
        return APIError(500, message, kind="server_error")
    return APIError(400, message)


def _request_models() -> tuple[type, type]:
    """The two request bodies as pydantic models (built on first use, so importing this module needs no pydantic):
    unknown fields are refused, and OpenAI's options the loop has no use for are accepted at their neutral value."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class Common(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=False)

        model: str
        max_tokens: int | None = Field(default=None, ge=1)
        temperature: float | None = None
        top_p: float | None = None
        seed: int | None = Field(default=None, ge=0, lt=2**63)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        n: int | None = None
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        logit_bias: dict[str, float] | None = None
        user: str | None = None
        # vLLM's extras that load generators send
        ignore_eos: bool | None = None
        min_tokens: int | None = None

        @field_validator("stream_options")
        @classmethod
        def _stream_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
            unknown = set(value or {}) - {"include_usage", "continuous_usage_stats"}
            if unknown:
                raise ValueError(f"unknown stream_options {', '.join(sorted(unknown))}")
            return value

    class Completion(Common):
        prompt: str | list[str] | list[int]
        logprobs: int | None = None
        echo: bool = False
        best_of: int | None = None
        suffix: str | None = None

    class Chat(Common):
        messages: list[dict[str, Any]]
        max_completion_tokens: int | None = Field(default=None, ge=1)
        logprobs: bool | None = None
        top_logprobs: int | None = None
        tools: list[dict[str, Any]] | None = None
        tool_choice: Literal["none", "auto"] | dict[str, Any] | None = None
        parallel_tool_calls: bool | None = None
        response_format: dict[str, Any] | None = None

    return Completion, Chat


# OpenAI options whose only accepted value asks for nothing, with what the refusal says
UNSUPPORTED = {
    "n": ((None, 1), "one choice per request"),
    "best_of": ((None, 1), "one choice per request"),
    "logprobs": ((None, False, 0), "no log probabilities (the loop keeps none)"),
    "top_logprobs": ((None, 0), "no log probabilities (the loop keeps none)"),
    "echo": ((False,), "no echo (send exclude_input_in_output to Triton's endpoint instead)"),
    "suffix": ((None, ""), "no suffix (no fill-in-the-middle)"),
    "logit_bias": ((None, {}), "no logit bias"),
    "tools": ((None, []), "no tools (the model has no tool-calling format)"),
    "tool_choice": ((None, "none"), "no tools (the model has no tool-calling format)"),
    "parallel_tool_calls": ((None, False), "no tools"),
    "ignore_eos": ((None, False), "no generation past EOS"),
    "min_tokens": ((None, 0), "no minimum length"),
}


class FrontEnd:
    """The OpenAI API for the loop model served by Triton at `grpc_url`; `tokenizer` is the directory of the
    checkpoint's tokenizer files (the model repository's copy of the artifacts)."""

    def __init__(self, grpc_url: str, tokenizer: str | Path | None, model: str = GENERATE_MODEL):
        self.grpc_url, self.model = grpc_url, model
        self.tokenizer = _load_tokenizer(Path(tokenizer)) if tokenizer is not None else None
        self.completion, self.chat = _request_models()
        self._channel: Any = None
        self._stub: Any = None
        self._ending: set[asyncio.Task[None]] = set()  # streams read to their end after their final response
        self._idle: list[_Stream] = []  # open streams whose last request has had its final response

    @property
    def stub(self) -> Any:
        """Triton's gRPC service (tritonclient's stub) on a channel made on the event loop that serves requests."""
        if self._stub is None:
            import grpc
            from tritonclient.grpc import service_pb2_grpc

            limit = 2**31 - 1  # images travel in the request: no message size cap below protobuf's own
            options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
            self._channel = grpc.aio.insecure_channel(self.grpc_url, options=options)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def app(self) -> Any:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            yield
            while self._idle:
                self.end_stream(self._idle.pop())
            if self._ending:  # closing the channel first would cancel them after their final response
                await asyncio.wait(set(self._ending), timeout=STREAM_END_S)
            if self._channel is not None:
                await self._channel.close()
                self._channel = self._stub = None

        app = FastAPI(title="canvasrt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

        @app.exception_handler(APIError)
        async def api_error(request: Request, exc: APIError) -> JSONResponse:
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            error = _validation_error(exc.errors())
            return JSONResponse(error.body(), status_code=error.status)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
            kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
            return JSONResponse(APIError(exc.status_code, str(exc.detail), kind=kind).body(), exc.status_code)

        @app.exception_handler(Exception)
        async def internal(request: Request, exc: Exception) -> JSONResponse:
            error = APIError(500, f"{INTERNAL_ERROR}{type(exc).__name__}: {exc}", kind="server_error")
            return JSONResponse(error.body(), status_code=500)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{name}")
        async def model(name: str) -> dict[str, Any]:
            if name != self.model:
                raise APIError(404, f"model {name!r} is not served here; use {self.model!r}", "model")
            return self._model_card()

        Completion, Chat = self.completion, self.chat

        @app.post("/v1/completions")
        async def completions(body: Completion, request: Request) -> Any:  # type: ignore[valid-type]
            return await self._serve(request, body, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: Chat, request: Request) -> Any:  # type: ignore[valid-type]
            return await self._serve(request, body, chat=True)

        return app

    def stream(self) -> "_Stream":
        """An open gRPC stream for one request: an idle one, or a new one."""
        return self._idle.pop() if self._idle else _Stream(self.stub)

    def reuse(self, stream: "_Stream") -> None:
        """Keeps a stream whose request has had its final response for the next request, or ends it."""
        if len(self._idle) < IDLE_STREAMS:
            self._idle.append(stream)
        else:
            self.end_stream(stream)

    def end_stream(self, stream: "_Stream") -> None:
        """Ends a stream whose last request has had its final response: sends the end of its requests and reads it
        up to the server's closing status, on a task of its own.

        Such a stream must not be cancelled (nor dropped, which cancels it) before that status: Triton's gRPC front
        end (2.51) then marks the finished request cancelled and waits for a callback that never comes, so the
        request, and with it the model, is never released, and tritonserver cannot unload the model when it stops
        (it waits out its exit timeout)."""
        import grpc

        async def drain() -> None:
            with contextlib.suppress(Exception):
                await stream.call.done_writing()
                while await stream.call.read() is not grpc.aio.EOF:
                    pass

        task = asyncio.ensure_future(drain())
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": 0, "owned_by": "canvasrt"}

    # -- one request ------------------------------------------------------------------------------------------------

    def _inputs(self, body: Any, chat: bool) -> dict[str, np.ndarray]:
        """The loop model's input tensors (LLM conventions) for a validated request body."""
        if body.model != self.model:
            raise APIError(400, f"model {body.model!r} is not served here; use {self.model!r}", "model")
        for name, (neutral, what) in UNSUPPORTED.items():
            value = getattr(body, name, None)
            if value is not None and value not in neutral:
                raise APIError(400, f"{name}={value!r} is not supported: this server returns {what}", name)
        inputs: dict[str, np.ndarray] = {}
        if chat:
            images: list[bytes] = []
            inputs["prompt_ids"] = np.asarray(self._chat_ids(body.messages, images), dtype=np.int64)
            if images:
                inputs["images"] = np.array(images, dtype=np.object_)
            if body.max_tokens is not None and body.max_completion_tokens is not None:
                raise APIError(400, "send max_tokens or max_completion_tokens, not both", "max_tokens")
            max_tokens = body.max_completion_tokens or body.max_tokens
        else:
            prompt = body.prompt
            if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                if len(prompt) != 1:
                    raise APIError(400, f"one prompt per request, got {len(prompt)}", "prompt")
                prompt = prompt[0]
            if isinstance(prompt, str):
                if not prompt:
                    raise APIError(400, "the prompt is empty; send some text", "prompt")
                inputs["text_input"] = np.array([prompt.encode("utf-8")], dtype=np.object_)
            else:
                if not prompt:
                    raise APIError(400, "the prompt is empty; send some text", "prompt")
                if not all(0 <= token < 2**63 for token in prompt):
                    raise APIError(400, "prompt token ids must be non-negative integers below 2^63", "prompt")
                inputs["prompt_ids"] = np.asarray(prompt, dtype=np.int64)
            max_tokens = body.max_tokens
        scalars = {
            "max_tokens": ("INT32", max_tokens),
            "temperature": ("FP32", body.temperature),
            "top_p": ("FP32", body.top_p),
            "presence_penalty": ("FP32", body.presence_penalty),
            "frequency_penalty": ("FP32", body.frequency_penalty),
            "seed": ("INT64", body.seed),
        }
        for name, (dtype, value) in scalars.items():
            if value is None:
                continue
            try:
                inputs[name] = input_tensor(name, value, dtype)
            except CanvasrtError as exc:
                raise APIError(400, str(exc), name) from None
        if body.stop:
            stops = [body.stop] if isinstance(body.stop, str) else body.stop
            inputs["stop"] = np.array([s.encode("utf-8") for s in stops], dtype=np.object_)
        inputs["stream"] = np.array([bool(body.stream)])
        inputs["exclude_input_in_output"] = np.array([True])
        return inputs

    def _chat_ids(self, messages: list[dict[str, Any]], images: list[bytes]) -> list[int]:
        """The chat's prompt ids; `image_url` parts (data: URLs) are appended to `images` and marked in the text
        with the image token, which the loop model expands."""
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise APIError(
                400,
                "this model's tokenizer has no chat template, so chat is not available; use /v1/completions with "
                "the prompt as text",
                "messages",
            )
        if not messages:
            raise APIError(400, "messages is empty; send at least one message", "messages")
        conversation = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            unknown = set(message) - {"role", "content", "name"}
            if unknown:
                raise APIError(400, f"messages[{i}] has unsupported fields {', '.join(sorted(unknown))}", "messages")
            if not isinstance(role, str) or role not in ("system", "developer", "user", "assistant"):
                raise APIError(
                    400, f"messages[{i}].role must be system, developer, user or assistant, got {role!r}", "messages"
                )
            if isinstance(content, list):  # content parts: text, and images as data: URLs
                parts = []
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "image_url":
                        images.append(_data_url(part.get("image_url"), i))
                        parts.append(IMAGE_MARKER)
                    elif isinstance(part, dict) and part.get("type") == "text" and "text" in part:
                        parts.append(str(part["text"]))
                    else:
                        raise APIError(
                            400, f"messages[{i}].content: only text and image_url parts are supported", "messages"
                        )
                content = "".join(parts)
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be text", "messages")
            conversation.append({"role": role, "content": content})
        try:
            ids = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # the template's own refusal (jinja raise_exception, say)
            raise APIError(400, f"the chat template refused the messages: {exc}", "messages") from None
        return [int(i) for i in ids]

    async def _serve(self, request: Any, body: Any, chat: bool) -> Any:
        from fastapi.responses import JSONResponse

        inputs = self._inputs(body, chat)
        reply = _Reply(self.model, chat, body.stream_options or {})
        generation = _Generation(self, inputs, request)
        try:  # the first response (or the request's error) before any status is sent
            first = await generation.next()
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            if not body.stream:
                generation.cancel()
        if not body.stream:
            return JSONResponse(reply.whole(first))

        async def events() -> AsyncIterator[bytes]:
            try:
                item = first
                while not generation.finished:
                    yield reply.chunk(item).encode()
                    item = await generation.next()
                yield (reply.chunk(item) + "".join(reply.tail())).encode()  # the final chunk and closing events
            except _ClientGone:
                pass
            except APIError as exc:  # after the status went out: an error event ends the stream
                yield f"data: {json.dumps(exc.body())}\n\n".encode()
            finally:
                generation.cancel()

        return _EventStream(events())


class _Stream:
    """A gRPC stream to Triton (ModelStreamInfer) that carries one request at a time: the next request goes on it
    once the last one's final response has come. A request then costs one message rather than a stream of its own
    (an HTTP/2 stream opened and closed, and grpc's per-call setup: the largest share of the front end's CPU time per
    request where each request opens a stream). Requests are written and responses read on the call itself (grpc's
    reader-writer style), in the task that serves the HTTP request: no request iterator and no task of its own.
    Cancelling the stream cancels the request on it; Triton 2.51 has no other way to cancel a streamed request."""

    def __init__(self, stub: Any):
        self.call = stub.ModelStreamInfer()


class _Generation:
    """One request to the loop model on a gRPC stream: its responses as plain values, up to the final one, after
    which the stream serves the next request; `cancel()` before that cancels the Triton request (and ends the
    stream), which frees its slot at the next denoising step.

    The HTTP request's client is watched by the one task the request has beside its own: when the client goes away
    it cancels the generation, so a read waiting for the next response ends in _ClientGone. The HTTP side then
    needs no task per response to watch the client."""

    def __init__(self, front_end: FrontEnd, inputs: dict[str, np.ndarray], client: Any):
        self.request = _infer_request(front_end.model, inputs)
        self.front_end = front_end
        self.stream = front_end.stream()
        self.written = self.finished = self.gone = False
        self.watch = asyncio.ensure_future(_disconnected(client))
        self.watch.add_done_callback(self._client_gone)

    def _client_gone(self, watch: "asyncio.Future[None]") -> None:
        if not watch.cancelled():
            self.gone = True
            self.cancel()

    async def next(self) -> dict[str, Any]:
        import grpc
        from tritonclient.grpc import InferResult

        try:
            if not self.written:
                self.written = True
                await self.stream.call.write(self.request)
            response = await self.stream.call.read()
        except BaseException as exc:  # the stream failed, the client went away, or this read was cancelled
            self.cancel()
            if self.gone and isinstance(exc, (asyncio.CancelledError, grpc.aio.AioRpcError)):
                raise _ClientGone from None
            raise
        if self.gone:  # the client left while this response came: its stream is cancelled, not kept for reuse
            raise _ClientGone
        if response is grpc.aio.EOF:
            self.finished = True
            self.watch.cancel()
            raise APIError(
                500, f"{INTERNAL_ERROR}the model's stream ended without a final response", kind="server_error"
            )
        if response.error_message:  # the request's final response
            self._end()
            raise _triton_error(response.error_message)
        result = InferResult(response.infer_response)
        item = {
            "text": result.as_numpy("text_output")[0].decode("utf-8"),
            "finish_reason": result.as_numpy("finish_reason")[0].decode(),
            "input_tokens": int(result.as_numpy("num_input_tokens")[0]),
            "output_tokens": int(result.as_numpy("num_output_tokens")[0]),
        }
        if item["finish_reason"]:
            self._end()
        return item

    def _end(self) -> None:
        self.finished = True
        self.watch.cancel()
        self.front_end.reuse(self.stream)

    def cancel(self) -> None:
        self.watch.cancel()
        if not self.finished:
            self.finished = True
            self.stream.call.cancel()


def _infer_request(model: str, inputs: dict[str, np.ndarray]) -> Any:
    """Triton's ModelInferRequest for `inputs` (raw contents, as tritonclient sends them) asking for OUTPUTS."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        dtype = np_to_triton_dtype(array.dtype)
        request.inputs.add(name=name, datatype=dtype, shape=array.shape)
        raw = serialize_byte_tensor(array).item() if dtype == "BYTES" else array.tobytes()
        request.raw_input_contents.append(raw)
    for name in OUTPUTS:
        request.outputs.add(name=name)
    return request


class _EventStream(Response):
    """A server-sent-event response (an ASGI app, as Starlette's responses are): the events as they come, one write
    each. The client's disconnect is watched by the request's generation, which ends `events` when it happens;
    Starlette's StreamingResponse would watch it again, with a task group per response."""

    status_code = 200
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]):  # no super().__init__(): it renders a whole body
        self.events = events
        self.background = None
        self.init_headers({"cache-control": "no-cache"})  # Starlette's raw_headers, behind its `headers` view

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Reply:
    """OpenAI's response objects for one request, from the loop model's responses."""

    def __init__(self, model: str, chat: bool, stream_options: dict[str, Any]):
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.usage_in_stream = bool(stream_options.get("include_usage"))
        self.input_tokens = self.output_tokens = 0
        self.started = False

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def whole(self, item: dict[str, Any]) -> dict[str, Any]:
        self.input_tokens, self.output_tokens = item["input_tokens"], item["output_tokens"]
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": item["text"]},
                "finish_reason": item["finish_reason"],
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": item["text"], "finish_reason": item["finish_reason"], "logprobs": None}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(),
        }

    def chunk(self, item: dict[str, Any]) -> str:
        self.input_tokens = item["input_tokens"]
        self.output_tokens += item["output_tokens"]
        finish = item["finish_reason"] or None
        if self.chat:
            delta = {"content": item["text"]}
            if not self.started:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": item["text"], "finish_reason": finish, "logprobs": None}
        self.started = True
        return self._event({"choices": [choice], **({"usage": None} if self.usage_in_stream else {})})

    def tail(self) -> list[str]:
        """The closing events: the usage chunk where stream_options asked for it, then [DONE]."""
        usage = [self._event({"choices": [], "usage": self._usage()})] if self.usage_in_stream else []
        return [*usage, "data: [DONE]\n\n"]

    def _event(self, fields: dict[str, Any]) -> str:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            **fields,
        }
        return f"data: {json.dumps(chunk)}\n\n"


class _ClientGone(Exception):
    """The HTTP client disconnected: its request is cancelled, and nobody reads what would follow."""


def _data_url(image_url: Any, message: int) -> bytes:
    """The bytes of an image_url part's `data:` URL (base64); other URLs are refused (the server fetches nothing)."""
    import base64
    import binascii

    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    where = f"messages[{message}].content: image_url"
    if not isinstance(url, str) or not url.startswith("data:"):
        raise APIError(
            400, f"{where} must be a data: URL (data:image/png;base64,...); this server fetches no URLs", "messages"
        )
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise APIError(400, f"{where} must be base64 encoded (data:image/png;base64,...)", "messages")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where} holds no valid base64 data", "messages") from None


async def _disconnected(request: Any) -> None:
    """Returns once the client has disconnected (its body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _validation_error(errors: Any) -> APIError:
    """One line for pydantic's first complaint: malformed JSON, a missing or unknown field, a wrong type."""
    error = errors[0]
    kind = error.get("type", "")
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    field = ".".join(location) or None
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'malformed')})")
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field {field!r}; this server takes OpenAI's fields only", field)
    if kind == "missing":
        return APIError(400, f"the field {field!r} is required", field)
    if not location:
        return APIError(400, f"the body must be a JSON object ({error.get('msg')})")
    return APIError(400, f"{field}: {error.get('msg')} (got {error.get('input')!r})", field)


def _load_tokenizer(directory: Path) -> Any:
    """The checkpoint's tokenizer through transformers (the chat template comes with it); None without one."""
    if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many kinds for an unreadable tokenizer
        raise CanvasrtError(f"cannot load the tokenizer in {directory} for the OpenAI API: {exc}") from None


class OpenAIServer:
    """The API under uvicorn on a thread of this process, beside the tritonserver it forwards to."""

    def __init__(self, front_end: FrontEnd, host: str = "127.0.0.1", port: int = 9000):
        import uvicorn

        self.host, self.port = host, port
        config = uvicorn.Config(
            front_end.app(),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            loop="uvloop",  # libuv's event loop: less CPU per event-loop turn than asyncio's pure-Python one
            http="httptools",  # C parser and writer: less CPU per request and per chunk than h11's pure Python
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> None:
        import threading

        self.thread = threading.Thread(target=self.server.run, name="canvasrt-openai", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise CanvasrtError(
                    f"the OpenAI API did not start on {self.host}:{self.port}; is the port free? choose another "
                    "with --openai-port"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=30)
            self.thread = None

    def __enter__(self) -> "OpenAIServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
