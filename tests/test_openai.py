"""The served model as LLM users drive it: the official `openai` SDK against `canvasrt serve --openai-port`, and
tritonclient / Triton's generate endpoints with requests written for the vLLM backend and TensorRT-LLM's ensemble.
Same prompt and seed give the text of `canvasrt generate`; what cannot be honoured is a 400 (or a Triton error) that
names it, and the server serves the next request exactly. One `canvasrt serve` for the whole module."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc
import tritonclient.grpc.aio as grpcaio
from click.testing import CliRunner
from tokenizers import Tokenizer
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from canvasrt.cli import main
from canvasrt.exporter.export import export
from canvasrt.model.random_checkpoint import save_tokenizer
from canvasrt.serving.openai_api import FrontEnd, OpenAIServer
from canvasrt.serving.protocol import BATCHED_MODEL as BATCHED
from canvasrt.serving.repository import GENERATE_MODEL, write_repository
from canvasrt.serving.server import free_ports

pytestmark = pytest.mark.slow
MODEL = GENERATE_MODEL


@dataclass
class Served:
    artifacts: Path
    http: str  # Triton's HTTP host:port
    grpc: str
    metrics: str
    openai: str  # the OpenAI API's base URL


@pytest.fixture(scope="module")
def served(tiny_checkpoint, triton_env, tmp_path_factory):
    """`canvasrt serve REPO --openai-port P` as a user runs it; the checkpoint, and so its artifacts, carry the chat
    template `canvasrt random-checkpoint` writes. Stopped with Ctrl-C (SIGINT) at the end, which must exit cleanly."""
    root = tmp_path_factory.mktemp("openai")
    checkpoint = shutil.copytree(tiny_checkpoint, root / "ckpt")
    save_tokenizer(Tokenizer.from_file(str(checkpoint / "tokenizer.json")), checkpoint)
    artifacts = export(checkpoint, root / "art", max_context=128, vocab_chunk=100).directory
    repository = root / "repo"
    write_repository(artifacts, repository, "in-process", threads=1)
    http, grpc, metrics, api = free_ports(4)
    command = [str(Path(sys.executable).parent / "canvasrt"), "serve", str(repository), "--python-env", str(triton_env)]
    command += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    command += ["--openai-port", str(api), "--log", str(root / "tritonserver.log")]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = process.stderr.readline()
        assert line.startswith("serving") and f"OpenAI API http://127.0.0.1:{api}/v1" in line, line
        yield Served(
            artifacts, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}", f"http://127.0.0.1:{api}/v1"
        )
    finally:
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=90)
    log = (root / "tritonserver.log").read_text()
    assert process.returncode == 130 and "stopped tritonserver (exit code 0)" in rest, rest + log[-3000:]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.openai, api_key="unused", max_retries=0, timeout=120)


def generate(artifacts: Path, seed: int, *source: str) -> dict:
    result = CliRunner().invoke(
        main, ["generate", str(artifacts), *source, "--seed", str(seed), "--threads", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def reference(artifacts: Path, seed: int, *source: str) -> tuple[str, int, str]:
    """`canvasrt generate`'s text, the tokens it kept (up to EOS) and the finish reason it implies."""
    out = generate(artifacts, seed, *source)
    canvas = json.loads((artifacts / "manifest.json").read_text())["capacity"]["canvas"]
    new = out["sequences"][0][-len(out["steps_per_block"]) * canvas :]
    kept = new.index(1) if 1 in new else len(new)
    return out["text"][0], kept, "stop" if kept < len(new) else "length"


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("seed", [0, 3])
def test_sdk_completions_equal_generate(served, client, seed):
    text, kept, finish = reference(served.artifacts, seed, "--prompt", "hello triton")
    whole = client.completions.create(model=MODEL, prompt="hello triton", seed=seed, max_tokens=32)
    assert whole.choices[0].text == text and whole.choices[0].finish_reason == finish
    prompt_tokens = len(Tokenizer.from_file(str(served.artifacts / "tokenizer.json")).encode("hello triton").ids)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, kept)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="hello triton", seed=seed, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in pieces) == text
    # one chunk per committed canvas (the last with the finish reason); usage in a chunk of its own
    assert len(pieces) <= 2 and [c.choices[0].finish_reason for c in pieces][-1] == finish
    assert chunks[-1].usage.completion_tokens == kept and chunks[-1].usage.prompt_tokens == prompt_tokens


def test_sdk_chat_applies_the_checkpoints_template(served, client):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort 3 1 2"}]
    ids = AutoTokenizer.from_pretrained(str(served.artifacts)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    text, kept, finish = reference(served.artifacts, 5, "--prompt-ids", ",".join(map(str, ids)))
    whole = client.chat.completions.create(model=MODEL, messages=messages, seed=5)
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == finish
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), kept)
    stream = client.chat.completions.create(model=MODEL, messages=messages, seed=5, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_stop_strings_cut_the_text_and_end_the_request(served, client):
    text, _, _ = reference(served.artifacts, 1, "--prompt", "stop here")
    word = text[3:5]
    assert len(word) == 2 and text.find(word) >= 0
    cut = client.completions.create(model=MODEL, prompt="stop here", seed=1, stop=[word])
    assert cut.choices[0].text == text[: text.find(word)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="stop here", seed=1, stop=word, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.find(word)]


@pytest.mark.parametrize(
    "options, named",
    [
        ({"n": 2}, "n=2"),
        ({"logprobs": 2}, "logprobs=2"),
        ({"model": "gpt-4o"}, "model 'gpt-4o' is not served"),
        ({"top_p": 0.5}, "top_p 0.5 is not supported"),
        ({"temperature": 0}, "temperature must be above 0"),
        ({"extra_body": {"colour": "blue"}}, "unknown field 'colour'"),
    ],
)
def test_unsupported_completion_options_are_a_400_naming_them(served, client, options, named):
    request = {"model": MODEL, "prompt": "hello triton", "seed": 0, **options}
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**request)
    assert named in refused.value.body["message"] and refused.value.status_code == 400
    text, _, _ = reference(served.artifacts, 0, "--prompt", "hello triton")
    assert client.completions.create(model=MODEL, prompt="hello triton", seed=0).choices[0].text == text


def test_tools_and_chat_logprobs_are_refused(client):
    messages = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
    for options, named in (({"tools": [tool]}, "tools="), ({"logprobs": True}, "logprobs=True")):
        with pytest.raises(openai.BadRequestError, match=named):
            client.chat.completions.create(model=MODEL, messages=messages, **options)
    with pytest.raises(openai.BadRequestError, match="messages is empty"):
        client.chat.completions.create(model=MODEL, messages=[])


def post(base: str, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_input_is_one_clear_400_each_and_the_next_request_is_served(served):
    long_prompt = "x" * 200  # beyond the artifacts' context of 128
    bad = [
        (b'{"model": "canvasrt_generate", "prompt": ', "the body is not valid JSON"),
        (b"[1, 2]", "the body must be a JSON object"),
        (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": "many"}).encode(), "max_tokens: "),
        (json.dumps({"model": MODEL, "prompt": 5}).encode(), "prompt"),
        (json.dumps({"model": MODEL, "prompt": ""}).encode(), "the prompt is empty"),
        (json.dumps({"model": MODEL, "prompt": long_prompt}).encode(), "more than the maximum context of 128"),
        (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 4096}).encode(), "more than the maximum context"),
        (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 2**40}).encode(), "does not fit the input's INT32"),
        (json.dumps({"model": MODEL, "prompt": "a", "colour": 1}).encode(), "unknown field 'colour'"),
        (json.dumps({"prompt": "a"}).encode(), "the field 'model' is required"),
        (json.dumps({"model": MODEL, "prompt": "a", "seed": -1}).encode(), "seed"),
    ]
    for body, message in bad:
        status, reply = post(served.openai, "/completions", body)
        assert status == 400 and message in reply["error"]["message"], (body, reply)
        assert reply["error"]["type"] == "invalid_request_error" and "Traceback" not in json.dumps(reply)
    status, reply = post(served.openai, "/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode())
    assert status == 400 and reply["error"]["param"] == "messages"
    text, _, _ = reference(served.artifacts, 2, "--prompt", "after the errors")
    status, reply = post(
        served.openai, "/completions", json.dumps({"model": MODEL, "prompt": "after the errors", "seed": 2}).encode()
    )
    assert status == 200 and reply["choices"][0]["text"] == text


def rows_in_slots(served: Served) -> int:
    metrics = urllib.request.urlopen(f"http://{served.metrics}/metrics").read().decode()
    return int(float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("canvasrt_rows "))))


def wait_for_free_slots(served: Served) -> None:
    deadline = time.monotonic() + 60
    while rows_in_slots(served) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rows_in_slots(served) == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served, client):
    host, port = served.openai.removeprefix("http://").removesuffix("/v1").split(":")
    body = {"model": MODEL, "prompt": "go on", "max_tokens": 112, "stream": True}  # 7 canvases
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.fp.readline()  # the first chunk arrived: the request holds a slot
    deadline = time.monotonic() + 60  # a busy loop model hands its metrics to Triton every 100 ms
    while not rows_in_slots(served) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rows_in_slots(served) == 1
    connection.sock.close()
    connection.close()
    wait_for_free_slots(served)  # left at the next step, not after its 7 canvases
    # a whole (non-streaming) request whose client leaves before the answer is cancelled too
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request(
        "POST", "/v1/completions", json.dumps({**body, "stream": False}), {"Content-Type": "application/json"}
    )
    deadline = time.monotonic() + 60
    while not rows_in_slots(served) and time.monotonic() < deadline:
        time.sleep(0.02)
    connection.sock.close()
    connection.close()
    wait_for_free_slots(served)
    text, _, _ = reference(served.artifacts, 4, "--prompt", "go on")
    assert client.completions.create(model=MODEL, prompt="go on", seed=4).choices[0].text == text


def one_request(model: str, inputs: dict[str, np.ndarray], parameters: dict | None = None):
    """The request iterator of a gRPC stream that carries one request."""
    tensors = []
    for name, array in inputs.items():
        tensor = grpcaio.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)

    async def one() -> object:
        yield {"model_name": model, "inputs": tensors, **({"parameters": parameters} if parameters else {})}

    return one


async def triton_stream(
    url: str, inputs: dict[str, np.ndarray], parameters: dict | None = None, model: str = MODEL
) -> list[dict]:
    """A request as a vLLM-backend (or, to the batched model, a TensorRT-LLM) client sends it: one gRPC stream."""
    client = grpcaio.InferenceServerClient(url)
    one = one_request(model, inputs, parameters)

    collected, failure = [], None
    try:  # read to the stream's end: closing it between the final response and its status leaks the request in Triton
        async for result, error in client.stream_infer(one()):
            if error is not None:
                failure = error.message()
                continue
            outputs = {name: result.as_numpy(name) for name in ("text_output", "finish_reason", "num_output_tokens")}
            collected.append(
                {
                    "shape": outputs["text_output"].shape,
                    "text_output": outputs["text_output"].reshape(-1)[0].decode(),
                    "finish_reason": outputs["finish_reason"].reshape(-1)[0].decode(),
                    "num_output_tokens": int(outputs["num_output_tokens"].reshape(-1)[0]),
                }
            )
    finally:
        await client.close()
    if failure is not None:
        raise RuntimeError(failure)
    return collected


def strings(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


def test_a_vllm_backend_request_over_grpc_streaming(served):
    text, kept, finish = reference(served.artifacts, 6, "--prompt", "hello vllm")
    inputs = {
        "text_input": strings("hello vllm"),
        "stream": np.array([True]),
        "sampling_parameters": strings(json.dumps({"seed": 6, "max_tokens": 32, "temperature": 1.0, "top_p": 1.0})),
        "exclude_input_in_output": np.array([True]),
        "return_finish_reason": np.array([True]),
        "return_num_output_tokens": np.array([True]),
    }
    responses = asyncio.run(triton_stream(served.grpc, inputs))
    assert "".join(r["text_output"] for r in responses) == text
    assert responses[-1]["finish_reason"] == finish and sum(r["num_output_tokens"] for r in responses) == kept
    assert all(not r["finish_reason"] for r in responses[:-1])
    # the same through request parameters (tritonclient's `parameters`), not streaming: one response, the prompt first
    whole = asyncio.run(triton_stream(served.grpc, {"text_input": strings("hello vllm")}, {"seed": 6}))
    assert [r["text_output"] for r in whole] == ["hello vllm" + text]
    for inputs, parameters, message in (
        ({"text_input": strings("hi"), "max_tokens": np.array([3], dtype=np.int64)}, None, "expects 'INT32'"),
        ({"text_input": strings("")}, None, "the prompt is empty"),
        ({"text_input": strings("x" * 200)}, None, "more than the maximum context of 128"),
        ({"text_input": strings("hi"), "max_tokens": np.array([4096], dtype=np.int32)}, None, "maximum context"),
        ({"text_input": strings("hi")}, {"colour": "blue"}, "unknown request parameter colour"),
        ({"text_input": strings("hi"), "top_k": np.array([5], dtype=np.int32)}, None, "top_k 5 is not supported"),
    ):
        with pytest.raises(RuntimeError, match=message) as refused:
            asyncio.run(triton_stream(served.grpc, inputs, parameters))
        assert "Traceback" not in str(refused.value)
    neutral = {"text_input": strings("hello vllm"), "top_k": np.array([0], dtype=np.int32)}
    assert asyncio.run(triton_stream(served.grpc, neutral, {"seed": 6}))[0]["text_output"] == "hello vllm" + text


@pytest.mark.parametrize("model", [MODEL, BATCHED])
def test_tensorrt_llm_requests_on_the_generate_endpoints(served, model):
    """The generate endpoints shape the JSON for either model: without a batch dimension or with one."""
    text, kept, finish = reference(served.artifacts, 8, "--prompt", "hello trtllm")
    base = f"http://{served.http}/v2/models/{model}"
    body = {"text_input": "hello trtllm", "max_tokens": 32, "bad_words": "", "stop_words": "", "random_seed": 8}
    status, reply = post(base, "/generate", json.dumps(body).encode())
    assert status == 200 and reply["text_output"] == "hello trtllm" + text
    assert reply["finish_reason"] == finish and reply["num_output_tokens"] == kept
    stream = urllib.request.Request(
        base + "/generate_stream", data=json.dumps({**body, "stream": True}).encode(), method="POST"
    )
    with urllib.request.urlopen(stream, timeout=120) as events:
        chunks = [json.loads(line[5:]) for line in events.read().decode().splitlines() if line.startswith("data:")]
    assert "".join(c["text_output"] for c in chunks) == text and chunks[-1]["finish_reason"] == finish
    status, reply = post(base, "/generate", json.dumps({**body, "top_p": 0.5}).encode())
    assert status == 400 and "top_p 0.5 is not supported" in reply["error"]
    status, reply = post(base, "/generate", json.dumps({**body, "parameters": {"temperature": 0}}).encode())
    assert status == 400 and "temperature must be above 0" in reply["error"]
    status, reply = post(base, "/generate", json.dumps(body).encode())
    assert status == 200 and reply["text_output"] == "hello trtllm" + text


def test_generate_endpoints_refuse_what_the_inputs_cannot_take_with_a_400_naming_it(served):
    """Values an input's datatype cannot take (Triton 2.51 answers them with HTTP 500 before the model) and a
    streaming request in canvasrt's own protocol on /generate (200 with Triton's error): a 400 naming the field and
    the fix, from the relay on the HTTP port; the next request is served, and generate_stream still streams."""
    base = f"http://{served.http}/v2/models/{MODEL}"
    for body, message in (
        ({"prompt": "hi", "stream": False, "max_new_tokens": 1.5}, "max_new_tokens must be an integer from "),
        ({"text_input": "hi", "max_tokens": "7"}, "max_tokens must be an integer from -2147483648 to 2147483647"),
        ({"prompt": "hi", "stream": False, "seed": 2**63}, "seed must be an integer from "),
        ({"prompt": "hi", "stream": "yes"}, 'stream must be true or false (input type BOOL), got "yes"'),
        ({"prompt_ids": [2, 2.5], "stream": False}, "each of prompt_ids must be an integer"),
        ({"prompt": "hi"}, 'unless it says "stream": false; send "stream": false, or use /generate_stream'),
    ):
        status, reply = post(base, "/generate", json.dumps(body).encode())
        assert status == 400 and message in reply["error"] and "\n" not in reply["error"], (body, reply)
    status, reply = post(
        f"http://{served.http}/v2/models/{BATCHED}", "/generate", b'{"text_input": "hi", "top_k": 0.5}'
    )
    assert status == 400 and reply["error"].startswith("top_k must be an integer"), reply
    text, _, _ = reference(served.artifacts, 3, "--prompt", "hello")
    status, reply = post(base, "/generate", json.dumps({"prompt": "hello", "seed": 3, "stream": False}).encode())
    assert status == 200 and reply["text"] == text, reply
    stream = urllib.request.Request(base + "/generate_stream", data=b'{"prompt": "hello", "seed": 3}', method="POST")
    with urllib.request.urlopen(stream, timeout=120) as events:
        chunks = [json.loads(line[5:]) for line in events.read().decode().splitlines() if line.startswith("data:")]
    assert chunks[-1]["event"] == "done" and chunks[-1]["text"] == text


def batched(array: np.ndarray) -> np.ndarray:
    return array[None]


def test_tensorrt_llm_requests_with_a_batch_dimension(served):
    """TensorRT-LLM's gRPC clients send [1, 1] (its ensemble has a batch dimension): the batched model takes them,
    answers [1, N] and gives the loop model's text; the loop model itself refuses the shape, naming the one it
    expects."""
    text, kept, finish = reference(served.artifacts, 8, "--prompt", "hello trtllm")
    inputs = {
        "text_input": strings("hello trtllm"),
        "max_tokens": np.array([32], dtype=np.int32),
        "bad_words": strings(""),
        "stop_words": strings(""),
        "random_seed": np.array([8], dtype=np.uint64),
        "stream": np.array([True]),
    }
    streamed = asyncio.run(triton_stream(served.grpc, {k: batched(v) for k, v in inputs.items()}, model=BATCHED))
    assert "".join(r["text_output"] for r in streamed) == text and streamed[-1]["finish_reason"] == finish
    assert sum(r["num_output_tokens"] for r in streamed) == kept and {r["shape"] for r in streamed} == {(1, 1)}
    whole = {k: batched(v) for k, v in inputs.items() if k != "stream"}
    assert [r["text_output"] for r in asyncio.run(triton_stream(served.grpc, whole, model=BATCHED))] == [
        "hello trtllm" + text
    ]
    # request parameters reach the loop model (floats and lists too)
    parameters = {"temperature": 1.0, "stop": "zzz"}
    with_parameters = asyncio.run(triton_stream(served.grpc, whole, parameters, model=BATCHED))
    assert [r["text_output"] for r in with_parameters] == ["hello trtllm" + text]
    with pytest.raises(
        RuntimeError,
        match=r"unexpected shape for input '\w+' for model 'canvasrt_generate'. Expected \[-?1\], got \[1,1\]",
    ):
        asyncio.run(triton_stream(served.grpc, whole))
    with pytest.raises(RuntimeError, match="top_p 0.5 is not supported"):
        asyncio.run(triton_stream(served.grpc, {**whole, "top_p": np.array([[0.5]], dtype=np.float32)}, model=BATCHED))
    with pytest.raises(RuntimeError, match="batch-size must be <= 1"):
        asyncio.run(
            triton_stream(served.grpc, {"text_input": np.array([[b"a"], [b"b"]], dtype=np.object_)}, model=BATCHED)
        )


async def stream_outcome(url: str, inputs: dict[str, np.ndarray], model: str = MODEL) -> tuple:
    """What a tritonclient gRPC stream sees of a refused request: ("in stream", status, message) for an error inside
    the stream's responses, ("status", code, details) for a stream that ends with an error status."""
    client = grpcaio.InferenceServerClient(url)
    one = one_request(model, inputs)
    outcome = None
    try:
        async for _, error in client.stream_infer(one()):
            outcome = ("in stream", error.status(), error.message()) if error is not None else outcome
    except grpc.aio.AioRpcError as exc:
        outcome = ("status", exc.code(), exc.details())
    finally:
        await client.close()
    return outcome


def test_grpc_errors_come_as_messages_in_the_stream(served):
    """Triton 2.51 over gRPC: unary ModelInfer refuses a decoupled model (UNIMPLEMENTED); a stream carries an error,
    the model's refusal or what Triton checks before the model (datatypes, shapes), as a message inside its
    responses. No stream here sends the `triton_grpc_error: true` header, which turns the model's refusals into the
    stream's status: under load, Triton 2.51 dies with signal 11 on such streams (`scripts/stress_cancel.py --modes
    grpc-error`), which would take down the module's server."""
    kind, code, details = asyncio.run(stream_outcome(served.grpc, {"text_input": strings("")}))
    assert (kind, code) == ("in stream", None) and details.startswith("the prompt is empty")
    kind, code, details = asyncio.run(
        stream_outcome(served.grpc, {"text_input": strings("hi")[None], "top_k": np.array([[5]], np.int32)}, BATCHED)
    )
    assert (kind, code) == ("in stream", None) and "top_k 5 is not supported" in details
    wrong_type = {"text_input": strings("hi"), "max_tokens": np.array([3], dtype=np.int64)}
    kind, code, details = asyncio.run(stream_outcome(served.grpc, wrong_type))
    assert (kind, code) == ("in stream", None) and "expects 'INT32'" in details
    unary = tritonclient.grpc.InferenceServerClient(served.grpc)
    tensor = tritonclient.grpc.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(strings("hi"))
    with pytest.raises(InferenceServerException) as refused:
        unary.infer(MODEL, [tensor])
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED" and "decoupled" in refused.value.message()
    unary.close()
    text, _, _ = reference(served.artifacts, 6, "--prompt", "hello vllm")
    assert (
        asyncio.run(triton_stream(served.grpc, {"text_input": strings("hello vllm")}, {"seed": 6}))[0]["text_output"]
        == "hello vllm" + text
    )


def test_a_tokenizer_without_a_chat_template_refuses_chat_and_serves_completions(served, tmp_path):
    """Also: requests one after another, a refused one among them, share one gRPC stream to Triton."""
    shutil.copy(served.artifacts / "tokenizer.json", tmp_path / "tokenizer.json")  # no chat template beside it
    (port,) = free_ports(1)
    front_end = FrontEnd(served.grpc, tmp_path)
    with OpenAIServer(front_end, port=port) as front:
        plain = openai.OpenAI(base_url=front.url, api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError, match="has no chat template"):
            plain.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        text, _, _ = reference(served.artifacts, 0, "--prompt", "plain")
        assert plain.completions.create(model=MODEL, prompt="plain", seed=0).choices[0].text == text
        streams = list(front_end._idle)
        with pytest.raises(openai.BadRequestError, match="more than the maximum context"):
            plain.completions.create(model=MODEL, prompt="x" * 200)
        pieces = plain.completions.create(model=MODEL, prompt="plain", seed=0, stream=True)
        assert "".join(c.choices[0].text for c in pieces if c.choices) == text
        assert len(streams) == 1 and front_end._idle == streams
