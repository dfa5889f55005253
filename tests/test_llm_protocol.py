"""The loop model's LLM conventions as parsed, without a server: which inputs, sampling parameters and request
parameters are taken, how temperature maps onto the schedule, and what is refused (fast tier)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from canvasrt.core.errors import CanvasrtError
from canvasrt.model.random_checkpoint import CHAT_TEMPLATE, byte_level_tokenizer, save_tokenizer
from canvasrt.serving.protocol import parse_request

CONFIG = {"max_new_tokens": 32, "t_min": 0.4, "t_max": 0.8, "eos_token_id": [1], "pad_token_id": 0}


def encode(text: str) -> list[int]:
    return [3 + (b % 200) for b in text.encode()]


def text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)


def parse(inputs: dict, parameters: dict | None = None):
    return parse_request(inputs, CONFIG, encode, parameters, lambda ids: "".join(chr(i) for i in ids))


def test_a_vllm_request_with_sampling_parameters():
    request = parse(
        {
            "text_input": text("hello"),
            "stream": np.array([True]),
            "sampling_parameters": text(json.dumps({"temperature": 0.5, "max_tokens": 20, "seed": 7, "top_p": 1})),
            "exclude_input_in_output": np.array([True]),
            "return_num_output_tokens": np.array([True]),
        }
    )
    assert request.llm and request.stream and request.seed == 7 and request.max_tokens == 20
    assert request.settings.max_new_tokens == 20 and request.prefix == ""
    # temperature scales the checkpoint's schedule, both ends
    assert (request.settings.t_min, request.settings.t_max) == pytest.approx((0.2, 0.4))


def test_a_tensorrt_llm_request_defaults_to_one_response_with_the_prompt_in_front():
    request = parse(
        {
            "text_input": text("hello"),
            "max_tokens": np.array([8], dtype=np.int32),
            "bad_words": np.array([b""], dtype=np.object_),
            "stop_words": np.array([b"x", b"yz"], dtype=np.object_),
            "random_seed": np.array([5], dtype=np.uint64),
            "end_id": np.array([1], dtype=np.int32),
        }
    )
    assert not request.stream and request.prefix == "hello" and request.stop == ("x", "yz") and request.seed == 5


def test_the_generate_endpoints_parameters_are_options_too():
    request = parse({"text_input": text("hi")}, {"stream": True, "temperature": 2, "stop": "."})
    assert request.stream and request.stop == (".",) and request.settings.t_max == pytest.approx(1.6)
    legacy = parse({"prompt": text("hi")})
    assert not legacy.llm and legacy.stream  # today's protocol keeps streaming blocks by default


@pytest.mark.parametrize(
    "inputs, parameters, message",
    [
        ({"top_p": np.array([0.9], dtype=np.float32)}, None, r"top_p 0.9 is not supported: .*leave top_p out"),
        ({}, {"top_k": 40}, "top_k 40 is not supported"),
        ({}, {"n": 2}, "n 2 is not supported"),
        ({"beam_width": np.array([2], dtype=np.int32)}, None, "beam_width 2 is not supported"),
        ({"return_log_probs": np.array([True])}, None, "return_log_probs True is not supported"),
        ({"temperature": np.array([0], dtype=np.float32)}, None, r"temperature must be above 0 .* 0 \(greedy\)"),
        ({}, {"temperature": "hot"}, "temperature must be a number"),
        ({}, {"max_tokens": 0}, "max_tokens must be at least 1"),
        ({}, {"max_tokens": 2.5}, "max_tokens must be an integer"),
        ({}, {"colour": "blue"}, "unknown request parameter colour"),
        ({"sampling_parameters": text("{not json")}, None, "sampling_parameters is not JSON"),
        ({"sampling_parameters": text("[1]")}, None, "sampling_parameters must be a JSON object"),
        ({"bad_words": np.array([b"no"], dtype=np.object_)}, None, "bad_words is not supported"),
        ({"end_id": np.array([7], dtype=np.int32)}, None, r"end_id must be the model's own \(1\)"),
        (
            {"max_tokens": np.array([4], dtype=np.int32), "max_new_tokens": np.array([4], dtype=np.int32)},
            None,
            "not both",
        ),
        ({"seed": np.array([1]), "random_seed": np.array([1], dtype=np.uint64)}, None, "seed or random_seed"),
        ({"random_seed": np.array([2**64 - 1], dtype=np.uint64)}, None, "below 2\\^63"),
        ({"stream": np.array([True])}, {"stream": "yes"}, None),
    ],
)
def test_refused_options_name_themselves(inputs, parameters, message):
    request = {"text_input": text("hi"), **inputs}
    if message is None:  # the stream input wins over a parameter of the same name
        assert parse(request, parameters).stream
        return
    with pytest.raises(CanvasrtError, match=message):
        parse(request, parameters)


def test_the_prompt_must_be_there_and_not_empty():
    with pytest.raises(CanvasrtError, match="exactly one of"):
        parse({"text_input": text("a"), "prompt": text("b")})
    with pytest.raises(CanvasrtError, match="the prompt is empty"):
        parse({"text_input": text("")})
    with pytest.raises(CanvasrtError, match="the prompt is not UTF-8"):
        parse({"text_input": np.array([b"caf\xe9"], dtype=np.object_)})


def test_random_checkpoints_ship_a_gemma_style_chat_template(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(byte_level_tokenizer(300), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == "<bos><|turn>user\nhi<turn|>\n<|turn>model\nyo<turn|>\n<|turn>user\n?<turn|>\n<|turn>model\n"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--openai-port", "8000"], "--http-port and --openai-port are both 8000"),
        (["--openai-port", "0"], "--openai-port must be between 1 and 65535"),
        (["--openai-port", "9000", "--openai-host", "203.0.113.7"], "port 9000 on 203.0.113.7 cannot be bound"),
    ],
)
def test_serve_checks_the_openai_options_first(tmp_path, options, message):
    from click.testing import CliRunner

    from canvasrt.cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path), *options])
    assert result.exit_code == 2 and message in result.output, result.output


def test_the_batched_model_forwards_a_batch_of_one_without_its_batch_dimension():
    from canvasrt.serving.batched_model import forwarded_inputs

    inputs = {
        "text_input": np.array([[b"hi"]], dtype=np.object_),
        "stop_words": np.array([[b"a", b"b"]], dtype=np.object_),
        "max_tokens": np.array([[8]], dtype=np.int32),
    }
    plain = forwarded_inputs(inputs, {})
    assert {k: v.shape for k, v in plain.items()} == {"text_input": (1,), "stop_words": (2,), "max_tokens": (1,)}
    assert "sampling_parameters" not in plain
    # request parameters (floats and lists, which BLS parameters cannot carry) travel in sampling_parameters, whose
    # own values win as in the loop model
    sampling = np.array([[json.dumps({"seed": 3}).encode()]], dtype=np.object_)
    merged = forwarded_inputs({**inputs, "sampling_parameters": sampling}, {"temperature": 0.5, "seed": 1})
    assert json.loads(merged["sampling_parameters"][0]) == {"temperature": 0.5, "seed": 3}
    request = parse(merged)
    assert request.seed == 3 and request.settings.t_max == pytest.approx(0.4) and request.stop == ("a", "b")
    assert request.max_tokens == 8
