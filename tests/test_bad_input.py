"""Bad input gets one line naming the problem and the fix, exit code 2, no traceback, nothing written; Ctrl-C and
SIGTERM stop a command without leaving staged output behind.

Each bad input is made from a good one (a copy of a session fixture, then corrupted).
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from canvasrt.core.manifest import MANIFEST
from canvasrt.core.output import staging_prefix
from support import assert_refused, cli

CANVASRT = str(Path(sys.executable).parent / "canvasrt")


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.*")), list(output.parent.iterdir())


def copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    """Rewrites a JSON file after `change` edited its data in place."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# -- checkpoint files -------------------------------------------------------------------------------------------------


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _header_length(path: Path, length: int) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + data[8:])


def _header_garbage(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{garbage" + data[16:])


WEIGHTS = "model.safetensors"
CHECKPOINT_FILES = [
    ("empty weights", lambda c: (c / WEIGHTS).write_bytes(b""), ["model.safetensors", "header too small", "re-save"]),
    ("truncated header", lambda c: _truncate(c / WEIGHTS, 1000), ["invalid header length", "truncated or corrupt"]),
    (
        "truncated data",
        lambda c: _truncate(c / WEIGHTS, (c / WEIGHTS).stat().st_size - 100),
        ["file not fully covered", "truncated or corrupt"],
    ),
    ("corrupt header", lambda c: _header_garbage(c / WEIGHTS), ["invalid JSON in header", "truncated or corrupt"]),
    ("oversized header", lambda c: _header_length(c / WEIGHTS, 1 << 40), ["header too large"]),
    (
        "index is a list",
        lambda c: (c / "model.safetensors.index.json").write_text("[1, 2]"),
        ["is not a safetensors index", "re-save the checkpoint"],
    ),
    (
        "weight_map is a list",
        lambda c: (c / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
        ["is not a safetensors index"],
    ),
    ("config is a list", lambda c: (c / "config.json").write_text("[1, 2]"), ["config.json holds a JSON list", "fix"]),
    (
        "text_config is a list",
        lambda c: edit_json(c / "config.json", lambda d: d.update(text_config=[1])),
        ["not a valid DiffusionGemma config", "text_config", "fix config.json"],
    ),
    (
        "generation config is a list",
        lambda c: (c / "generation_config.json").write_text("[1]"),
        ["generation_config.json holds a JSON list", "fix or remove it"],
    ),
    ("config not UTF-8", lambda c: (c / "config.json").write_bytes(b'{"model_type": "\xff"}'), ["not UTF-8"]),
]


@pytest.mark.parametrize("corrupt, fragments", [c[1:] for c in CHECKPOINT_FILES], ids=[c[0] for c in CHECKPOINT_FILES])
def test_malformed_checkpoint_files(tiny_checkpoint, tmp_path, corrupt, fragments):
    checkpoint = copy(tiny_checkpoint, tmp_path / "ckpt")
    corrupt(checkpoint)
    assert_refused(cli("export", checkpoint, "-o", tmp_path / "out"), *fragments)
    assert_nothing_written(tmp_path / "out")


def _text(key: str, value: object) -> Callable[[dict], None]:
    return lambda config: config["text_config"].update({key: value})


def _layer_types(change: Callable[[list], object]) -> Callable[[dict], None]:
    return lambda config: change(config["text_config"]["layer_types"])


CONFIG_VALUES = [
    ("top-k above the experts", _text("top_k_experts", 99), "top_k_experts 99 exceeds num_experts 4"),
    ("canvas length 0", lambda c: c.update(canvas_length=0), "canvas_length must be at least 1, got 0"),
    ("canvas length negative", lambda c: c.update(canvas_length=-3), "canvas_length must be at least 1, got -3"),
    ("canvas length not a number", lambda c: c.update(canvas_length="x"), "Field 'canvas_length'"),
    ("sliding window 0", _text("sliding_window", 0), "sliding_window must be at least 2"),
    ("sliding window 1", _text("sliding_window", 1), "sliding_window must be at least 2"),
    ("unknown layer type", _layer_types(lambda t: t.__setitem__(0, "bogus_attention")), "layer_types"),
    (
        "layer type transformers knows, canvasrt does not",
        _layer_types(lambda t: t.__setitem__(0, "linear_attention")),
        "layer 0 has layer type 'linear_attention'",
    ),
    ("layer types too short", _layer_types(lambda t: t.pop()), "must be equal to the number of `layer_types`"),
    ("head count not a number", _text("num_attention_heads", "eight"), "Field 'num_attention_heads'"),
    ("head count fractional", _text("num_attention_heads", 2.5), "Field 'num_attention_heads'"),
    ("head count 0", _text("num_attention_heads", 0), "num_attention_heads must be at least 1"),
    ("hidden size 0", _text("hidden_size", 0), "hidden_size must be at least 1"),
    ("kv heads not dividing heads", _text("num_key_value_heads", 3), "3 key/value heads, which do not divide"),
    ("odd head dim", _text("head_dim", 7), "RoPE needs an even head_dim"),
    ("negative norm epsilon", _text("rms_norm_eps", -1.0), "rms_norm_eps must be a positive number"),
    ("no softcap", _text("final_logit_softcapping", None), "final_logit_softcapping"),
    ("eos outside the vocabulary", _text("eos_token_id", 10**6), "eos_token_id 1000000 is outside the vocabulary"),
    ("pad outside the vocabulary", _text("pad_token_id", 10**6), "pad_token_id 1000000 is outside the vocabulary"),
    ("canvas beyond the positions", lambda c: c.update(canvas_length=10**7), "leaves no position for a prompt"),
]


@pytest.mark.parametrize("change, fragment", [c[1:] for c in CONFIG_VALUES], ids=[c[0] for c in CONFIG_VALUES])
def test_config_values_are_checked_where_the_config_is_read(tiny_checkpoint, tmp_path, change, fragment):
    checkpoint = copy(tiny_checkpoint, tmp_path / "ckpt")
    edit_json(checkpoint / "config.json", change)
    assert_refused(cli("export", checkpoint, "-o", tmp_path / "out"), fragment, "config.json")
    assert_nothing_written(tmp_path / "out")


# -- artifact files -------------------------------------------------------------------------------------------------


def _manifest(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda artifacts: edit_json(artifacts / "manifest.json", change)


ARTIFACT_FILES = [
    ("manifest is a list", lambda a: (a / "manifest.json").write_text("[]"), "not a canvasrt manifest"),
    ("graphs a list", _manifest(lambda m: m.update(graphs=[])), "mistypes a field"),
    ("no capacity", _manifest(lambda m: m.pop("capacity")), "KeyError: 'capacity'"),
    ("capacity a list", _manifest(lambda m: m.update(capacity=[1])), "mistypes a field"),
    (
        "capacity value a string",
        _manifest(lambda m: m["capacity"].update(max_batch="4")),
        "manifest.capacity.max_batch is '4', not int",
    ),
    ("layer spec a list", _manifest(lambda m: m["model"]["layers"].__setitem__(0, [1])), "mistypes a field"),
    (
        "layer head_dim a string",
        _manifest(lambda m: m["model"]["layers"][0].update(head_dim="16")),
        "manifest.model.layers[0].head_dim",
    ),
    ("kv layout slots not a number", _manifest(lambda m: m["kv_layout"][0].update(slots="x")), "mistypes a field"),
    ("graph entry a list", _manifest(lambda m: m["graphs"].update(backbone=[1])), "mistypes a field"),
    ("empty graph", lambda a: (a / "backbone.onnx").write_bytes(b""), "backbone.onnx"),
    ("truncated graph", lambda a: _truncate(a / "backbone.onnx", 5000), "backbone.onnx"),
    ("graph not ONNX", lambda a: (a / "backbone.onnx").write_text("hello, not a graph"), "backbone.onnx"),
]


@pytest.mark.parametrize("corrupt, fragment", [c[1:] for c in ARTIFACT_FILES], ids=[c[0] for c in ARTIFACT_FILES])
def test_malformed_artifacts_generate(tiny_artifacts, tmp_path, corrupt, fragment):
    artifacts = copy(tiny_artifacts, tmp_path / "art")
    corrupt(artifacts)
    assert_refused(cli("generate", artifacts, "--prompt-ids", "1,2,3", "--max-new-tokens", 16), fragment)


GRAPH_FILES = [c for c in ARTIFACT_FILES if "graph" in c[0] and "entry" not in c[0]]


@pytest.mark.parametrize("corrupt, fragment", [c[1:] for c in GRAPH_FILES], ids=[c[0] for c in GRAPH_FILES])
def test_malformed_graphs_calibrate_and_build(tiny_checkpoint, tiny_artifacts, tmp_path, corrupt, fragment):
    artifacts = copy(tiny_artifacts, tmp_path / "art")
    corrupt(artifacts)
    result = cli("calibrate", tiny_checkpoint, artifacts, "-o", tmp_path / "fp8", "--samples", 1)
    assert_refused(result, fragment, "re-run `canvasrt export`")
    assert_nothing_written(tmp_path / "fp8")
    pytest.importorskip("tensorrt_rtx")
    assert_refused(cli("build", artifacts, "-o", tmp_path / "engines", "--max-context", 32), fragment)
    assert_nothing_written(tmp_path / "engines")


@pytest.mark.parametrize("content", [b'{"a": 1}', b"[1]", b"\xff\xfe"], ids=["object", "list", "binary"])
def test_a_tokenizer_that_is_not_a_tokenizer(tiny_checkpoint, tmp_path, content):
    checkpoint = copy(tiny_checkpoint, tmp_path / "ckpt")  # artifacts refuse it earlier, by their integrity record
    (checkpoint / "tokenizer.json").write_bytes(content)
    assert_refused(cli("generate", checkpoint, "--prompt", "hi"), "is not a tokenizers tokenizer.json", "--prompt-ids")


def test_ids_printed_for_an_unreadable_tokenizer_say_why(tiny_checkpoint, tmp_path):
    """The prompt came as ids, so the run goes on; the text it cannot print is said once, on stderr, not dropped
    silently; a readable tokenizer prints text and no warning. (A checkpoint: artifacts refuse a tokenizer other
    than the one their manifest records.)"""
    artifacts = copy(tiny_checkpoint, tmp_path / "art")
    (artifacts / "tokenizer.json").write_bytes(b'{"a": 1}')
    args = ["--prompt-ids", "5,6,7", "--max-new-tokens", 16]
    for output in ([], ["--json"]):
        result = cli("generate", artifacts, *args, *output)
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
        assert warnings == [
            f"warning: {artifacts}/tokenizer.json cannot be read as a tokenizer (expected `,` or `}}` "
            "at line 1 column 5); printing token ids instead of text (copy the checkpoint's "
            "tokenizer.json back for text)"
        ]
        if output:
            assert json.loads(result.stdout)["text"] == [None]
        else:
            assert re.fullmatch(r"\[0\]( [0-9]+){16}", result.stdout.strip()), result.stdout
    readable = cli("generate", tiny_checkpoint, *args)
    assert readable.exit_code == 0 and "warning" not in readable.stderr
    assert not re.fullmatch(r"\[0\]( [0-9]+){16}", readable.stdout.strip())


# -- options and prompts --------------------------------------------------------------------------------------------

GENERATE_OPTIONS = [
    (["--prompt-ids", "1 2, 3"], "--prompt-ids must be comma-separated integers"),
    (["--prompt-ids", "1,,2"], "--prompt-ids must be comma-separated integers"),
    (["--prompt-ids", f"1,{1 << 64}"], f"prompt token id {1 << 64} does not fit in int64"),
    (["--prompt-ids", "1,2", "--seed", str(1 << 70)], "--seed must be between 0 and 9223372036854775807"),
    (["--prompt-ids", "1,2", "--seed", "-1"], "--seed must be between 0"),
    (["--prompt-ids", "1,2", "--threads", "-1"], "--threads must be at least 1, got -1"),
    (["--prompt-ids", "1,2", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["--prompt-ids", "1,2", "--t-max", "inf"], "--t-max must be a finite number"),
    (["--prompt-ids", "1,2", "--t-max", "1e39"], "--t-max must be a finite number"),
    (["--prompt-ids", "1,2", "--t-min", "nan"], "--t-min must be a finite number"),
    (["--prompt-ids", "1,2", "--entropy-bound", "inf"], "--entropy-bound must be a finite number"),
    (["--prompt-ids", "1,2", "--confidence-threshold", "inf"], "--confidence-threshold must be a finite number"),
    (["--prompt-ids", "1,2", "--confidence-threshold", "nan"], "--confidence-threshold must be a finite number"),
    (["--prompt-ids", "1,2", "--max-denoising-steps", str((1 << 31) - 1)], "between 1 and 1024"),
    (["--prompt-ids", "1,2", "--stability-threshold", "100000"], "--stability-threshold must be between 0 and 1024"),
    (["--prompt", "caf\udce9"], "is not valid UTF-8"),  # how argv bytes that are not UTF-8 reach Python
]


@pytest.mark.parametrize("args, fragment", GENERATE_OPTIONS, ids=[" ".join(a[-2:]) for a, _ in GENERATE_OPTIONS])
def test_generate_refuses_options_that_make_no_sense(tiny_artifacts, args, fragment):
    assert_refused(cli("generate", tiny_artifacts, *args), fragment)


PROMPTS_FILES = [
    (b'{"ids": [1, 99999999999999999999999]}\n', "does not fit in int64"),
    (b'{"text": "caf\xe9"}\n', "is not UTF-8 text (byte 13); re-encode it as UTF-8"),
    (b'{"text": 5}\n', '"text" must be a string'),
    (b'{"ids": [1, true]}\n', "must be a list of integers"),
]


@pytest.mark.parametrize(
    "content, fragment", PROMPTS_FILES, ids=["id beyond int64", "latin-1", "text a number", "bool id"]
)
def test_prompts_files_generate_and_calibrate(tiny_checkpoint, tiny_artifacts, tmp_path, content, fragment):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(content)
    assert_refused(cli("generate", tiny_artifacts, "--prompts-file", prompts), fragment)
    assert_refused(
        cli("calibrate", tiny_checkpoint, tiny_artifacts, "-o", tmp_path / "fp8", "--prompts", prompts, "--samples", 1),
        fragment,
    )
    assert_nothing_written(tmp_path / "fp8")


def test_other_commands_refuse_options_that_make_no_sense(tiny_checkpoint, tiny_artifacts, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"ids": [1, 2, 3]}\n')
    for args, fragment in [
        (["export", tiny_checkpoint, "-o", tmp_path / "out", "--max-prefill", 0], "--max-prefill must be at least 1"),
        (["export", tiny_checkpoint, "-o", tmp_path / "out", "--max-prefill", -5], "--max-prefill must be at least 1"),
        (["build", tiny_artifacts, "-o", tmp_path / "out", "--workspace", "-1G"], "at least one byte"),
        (["build", tiny_artifacts, "-o", tmp_path / "out", "--workspace", "0"], "at least one byte"),
        (
            [
                "calibrate",
                tiny_checkpoint,
                tiny_artifacts,
                "-o",
                tmp_path / "out",
                "--task",
                "sort",
                "--prompts",
                prompts,
            ],
            "at most one of --prompts and --task",
        ),
        (["bench", tiny_artifacts, "--threads", -1], "--threads must be at least 1"),
        (["bench", tiny_artifacts, "--steps", 0], "--steps must be at least 1"),
        (["eval", tiny_artifacts, "--task", "sort", "--threads", 0], "--threads must be at least 1"),
        (["parity", tiny_checkpoint, tiny_artifacts, "--seed", -2], "--seed must be between 0"),
        (["random-checkpoint", tmp_path / "out", "--seed", 1 << 64], "--seed must be between 0"),
    ]:
        assert_refused(cli(*args), fragment)
        assert_nothing_written(tmp_path / "out")


# -- serving options -------------------------------------------------------------------------------------------------

TRITON_OPTIONS = [
    (["--slots", 0], ["--slots must be between 1 and the max batch 4, got 0"]),
    (["--slots", -3], ["--slots must be between 1 and the max batch 4, got -3"]),
    (
        ["--slots", 5],
        [
            "--slots must be between 1 and the max batch 4, got 5",
            "takes batches of at most 4",
            "re-export with `canvasrt export --max-batch`",
        ],
    ),
    (
        ["--max-batch", 2, "--slots", 3],
        ["--slots must be between 1 and the max batch 2, got 3", "raise --max-batch (up to 4)"],
    ),
    (["--max-batch", 0], ["--max-batch must be between 1 and the artifacts' max batch 4, got 0"]),
    (["--max-queue", -1], ["--max-queue must be 0 or more, got -1"]),
    (["--batch-window-ms", -5], ["--batch-window-ms must be 0 (step at once) or more, got -5"]),
    (["--instances", -1], ["--instances must be at least 1, got -1"]),
    (["--threads", -2], ["--threads must be 0 (ONNX Runtime's default) or more, got -2"]),
]


@pytest.mark.parametrize("args, fragments", TRITON_OPTIONS, ids=[" ".join(map(str, a)) for a, _ in TRITON_OPTIONS])
def test_triton_refuses_serving_options_that_make_no_sense(tiny_artifacts, tmp_path, args, fragments):
    for step_backend in ("in-process", "onnxruntime"):
        assert_refused(
            cli("triton", tiny_artifacts, "-o", tmp_path / "repo", "--step-backend", step_backend, *args), *fragments
        )
        assert_nothing_written(tmp_path / "repo")


def test_triton_checks_its_options_before_hashing_the_graphs(tiny_artifacts, tmp_path):
    artifacts = copy(tiny_artifacts, tmp_path / "art")
    graph = bytearray((artifacts / "backbone.onnx").read_bytes())
    graph[-1] ^= 0xFF  # same size: only the digest tells
    (artifacts / "backbone.onnx").write_bytes(bytes(graph))
    assert_refused(cli("triton", artifacts, "-o", tmp_path / "repo", "--slots", 0), "--slots must be between 1")
    assert_refused(cli("triton", artifacts, "-o", tmp_path / "repo"), "backbone.onnx")
    assert_nothing_written(tmp_path / "repo")


SERVE_OPTIONS = [
    (["--http-port", -1], "--http-port must be between 1 and 65535, got -1"),
    (["--grpc-port", 70000], "--grpc-port must be between 1 and 65535, got 70000"),
    (["--metrics-port", 0], "--metrics-port must be between 1 and 65535, got 0"),
    (
        ["--http-port", 18000, "--grpc-port", 18000],
        "--http-port and --grpc-port are both 18000; give each endpoint its own port",
    ),
    (["--grpc-port", 18002, "--metrics-port", 18002], "--grpc-port and --metrics-port are both 18002"),
]


@pytest.mark.parametrize("args, fragment", SERVE_OPTIONS, ids=[" ".join(map(str, a)) for a, _ in SERVE_OPTIONS])
def test_serve_refuses_ports_that_make_no_sense(tiny_artifacts, tmp_path, args, fragment):
    assert cli("triton", tiny_artifacts, "-o", tmp_path / "repo", "--step-backend", "in-process").exit_code == 0
    assert_refused(cli("serve", tmp_path / "repo", *args), fragment)


@pytest.mark.parametrize("where", ["in a missing folder", "a folder"])
def test_serve_refuses_a_log_it_cannot_write_and_leaves_no_scratch(
    tiny_artifacts, triton_env, tmp_path, monkeypatch, where
):
    from canvasrt.serving.server import free_ports

    assert cli("triton", tiny_artifacts, "-o", tmp_path / "repo", "--step-backend", "in-process").exit_code == 0
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the server's scratch directory goes
    log = tmp_path / "missing" / "server.log" if where == "in a missing folder" else tmp_path
    ports = [
        x
        for option, port in zip(("--http-port", "--grpc-port", "--metrics-port"), free_ports(3))
        for x in (option, port)
    ]
    result = cli("serve", tmp_path / "repo", "--python-env", triton_env, "--log", log, *ports)
    assert_refused(result, f"cannot write the server log {log}", "give --log a file in a writable directory")
    assert list(scratch.iterdir()) == []


MALFORMED = [
    (
        ["triton", "ART", "-o", "REPO", "--slots", "x"],
        "canvasrt triton: Invalid value for '--slots': 'x' is not a valid integer; see `canvasrt triton --help`",
    ),
    (["generate", "ART", "--seed", "x"], "canvasrt generate: Invalid value for '--seed': 'x' is not a valid integer"),
    (["export"], "canvasrt export: Missing argument 'CHECKPOINT'; see `canvasrt export --help`"),
    (["build", "ART", "--bogus"], "canvasrt build: No such option '--bogus'"),
    (["exprt"], "canvasrt: No such command 'exprt'. Did you mean 'export'?; see `canvasrt --help`"),
]


@pytest.mark.parametrize("args, fragment", MALFORMED, ids=[" ".join(a) for a, _ in MALFORMED])
def test_malformed_command_lines_are_one_line(tiny_artifacts, tmp_path, args, fragment):
    """click's usage errors (a value of the wrong type, a missing argument, an unknown option or command) would be
    usage, hint and error on three lines: they are one error line and exit 2 like every other bad input."""
    names = {"ART": tiny_artifacts, "REPO": tmp_path / "repo"}
    assert_refused(cli(*(names.get(a, a) for a in args)), fragment)
    assert_nothing_written(tmp_path / "repo")


@pytest.mark.parametrize(
    "value, fragments",
    [
        (0, ["--concurrency must be at least 1, got 0"]),
        (-2, ["--concurrency must be at least 1, got -2"]),
        (
            5,
            [
                "--concurrency 5 needs 5 slots, more than the max batch 4",
                "use --concurrency 4 or less",
                "re-export with a larger --max-batch",
            ],
        ),
    ],
    ids=["0", "negative", "above the max batch"],
)
def test_bench_refuses_a_concurrency_that_makes_no_sense(tiny_artifacts, value, fragments):
    for backend in ("onnxruntime", "torch"):
        assert_refused(
            cli("bench", tiny_artifacts, "--backend", backend, "--concurrency", value, "--steps", 1), *fragments
        )


def test_device_is_refused_where_it_would_be_ignored(tiny_artifacts):
    """--device places the torch paths; ONNX Runtime would silently run on its provider instead."""
    for command in (["bench", "--concurrency", 2], ["bench"], ["generate", "--prompt-ids", "2,3"]):
        assert_refused(
            cli(command[0], tiny_artifacts, "--backend", "onnxruntime", "--device", "cuda", *command[1:]),
            "--device cuda places the torch paths; --backend onnxruntime runs on its own runtime",
            "drop --device or use --backend torch",
        )


def test_triton_on_engines_with_a_missing_engine(tiny_engines, tmp_path):
    copy(tiny_engines, tmp_path / "engines")
    (tmp_path / "engines" / "backbone.engine").unlink()
    assert_refused(
        cli("triton", tmp_path / "engines", "-o", tmp_path / "repo"), "lacks the backbone engine", "canvasrt build"
    )
    assert_nothing_written(tmp_path / "repo")


# -- progress display -------------------------------------------------------------------------------------------------


def _screen(output: bytes) -> list[str]:
    """The lines a terminal shows after `output`: text, carriage return, line feed, erase line (CSI 2K), cursor up
    (CSI nA); other escape sequences (colours, cursor visibility) draw nothing."""
    lines, row, column = [""], 0, 0
    for token in re.findall(r"\x1b\[[?0-9;]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", output.decode(errors="replace")):
        if token == "\r":
            column = 0
        elif token == "\n":
            row += 1
            lines += [""] * (row + 1 - len(lines))
        elif token.startswith("\x1b["):
            if token.endswith("K"):
                lines[row] = ""
            elif token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
        else:
            lines[row] = lines[row][:column].ljust(column) + token + lines[row][column + len(token) :]
            column += len(token)
    return [line.rstrip() for line in lines if line.strip()]


def _stderr_on_a_terminal(
    command: list, watch: Callable[[bytes, subprocess.Popen], None] | None = None
) -> tuple[int, bytes, bytes]:
    """Runs `command` with its stderr on a terminal, where rich draws its live display; `watch(drawn, process)` sees
    what it has drawn so far after every read. Returns the exit status, what it drew and its stdout."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [CANVASRT, *map(str, command)],
        stdout=subprocess.PIPE,
        stderr=secondary,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "160"},
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the command's end of the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
        if watch is not None:
            watch(b"".join(chunks), process)
    os.close(primary)
    stdout = process.stdout.read() if process.stdout else b""
    return process.wait(timeout=120), b"".join(chunks), stdout


@pytest.mark.slow
def test_a_failing_stage_clears_its_spinner_before_the_error(tiny_checkpoint, tmp_path):
    """The export's spinner is drawn before the checkpoint is read; the error must stand alone as the last line, in a
    log (stderr a pipe) and on a terminal, where the spinner line was drawn."""
    checkpoint = copy(tiny_checkpoint, tmp_path / "ckpt")
    (checkpoint / "config.json").write_text("[1, 2]")
    command = ["export", checkpoint, "-o", tmp_path / "out"]
    logged = subprocess.run([CANVASRT, *map(str, command)], capture_output=True, text=True, timeout=120)
    assert logged.returncode == 2
    assert logged.stderr.splitlines() == [
        f"error: {checkpoint}/config.json holds a JSON list, not a config object; fix or re-save it"
    ]
    code, drawn, _ = _stderr_on_a_terminal(command)
    assert code == 2 and b"\x1b[" in drawn  # rich drew a live display
    assert _screen(drawn) == logged.stderr.splitlines()
    assert_nothing_written(tmp_path / "out")


# -- signals ----------------------------------------------------------------------------------------------------------


def _signal_inside(
    drawn_marker: bytes, output: Path, number: int, signalled: list[int]
) -> Callable[[bytes, subprocess.Popen], None]:
    """A `watch` for a command on a terminal that stages `output`: it sends `number` once the command's progress
    display shows `drawn_marker` (a stage inside the staged work), with no wait of a set length, and notes it in
    `signalled`. The command is stopped (SIGSTOP) from then until the signal is pending, and its state checked
    meanwhile: its staging directory exists without the manifest (written last, just before the staged result is
    moved into place) and `output` does not exist, so the signal arrives inside the staged work, whatever the
    machine's load (only the whole rest of that work between the marker's drawing and the stop could fail that check,
    which then says so)."""

    def watch(drawn: bytes, process: subprocess.Popen) -> None:
        if signalled or drawn_marker not in drawn:
            return
        process.send_signal(signal.SIGSTOP)
        _, status = os.waitpid(process.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        staging = list(output.parent.glob(f".{output.name}.*.partial"))
        if len(staging) != 1 or (staging[0] / MANIFEST).exists() or output.exists():
            process.kill()
            pytest.fail(f"the staged work ended before the signal; give {drawn_marker!r} more work to do")
        process.send_signal(number)
        process.send_signal(signal.SIGCONT)
        signalled.append(number)

    return watch


@pytest.mark.slow
@pytest.mark.parametrize(
    "number, code, line",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_stops_build_and_leaves_nothing(tiny_artifacts, tmp_path, number, code, line):
    """The signal reaches the build inside TensorRT's builder, which cancels the build through its progress monitor;
    the command exits with the signal's status and one line, the progress display cleared, and writes nothing."""
    pytest.importorskip("tensorrt_rtx")
    output = tmp_path / "engines"
    signalled: list[int] = []
    exit_code, drawn, stdout = _stderr_on_a_terminal(
        ["build", tiny_artifacts, "-o", output, "--max-context", 32],
        _signal_inside(b"Building engine", output, number, signalled),
    )
    assert signalled == [number] and exit_code == code, drawn
    assert _screen(drawn)[-1] == line and b"Traceback" not in drawn
    assert b"built" not in stdout
    assert_nothing_written(output)


@pytest.mark.slow
def test_sigterm_stops_export_and_leaves_nothing(tiny_checkpoint, tmp_path):
    """SIGTERM reaches the export inside the ONNX export of its backbone: the command exits 143 with one line, the
    progress display cleared, and writes nothing."""
    output = tmp_path / "art"
    signalled: list[int] = []
    exit_code, drawn, stdout = _stderr_on_a_terminal(
        ["export", tiny_checkpoint, "-o", output, "--max-context", 64],
        _signal_inside(b"exporting backbone.onnx", output, signal.SIGTERM, signalled),
    )
    assert signalled == [signal.SIGTERM] and exit_code == 143, drawn
    assert _screen(drawn)[-1] == "terminated (SIGTERM)" and b"Traceback" not in drawn
    assert b"exported" not in stdout
    assert_nothing_written(output)


def test_staging_left_by_a_killed_run_is_removed_and_a_live_runs_kept(tiny_artifacts, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{staging_prefix('repo', dead.pid)}abc.partial"
    live = tmp_path / f"{staging_prefix('repo', os.getpid())}def.partial"  # this test's process: alive
    foreign = tmp_path / ".repo.another-host-1.ghi.partial"
    for directory in (stale, live, foreign):
        directory.mkdir()
        (directory / "backbone.onnx").write_bytes(b"x" * 1000)
    assert cli("triton", tiny_artifacts, "-o", tmp_path / "repo", "--step-backend", "in-process").exit_code == 0
    assert not stale.exists() and live.is_dir() and foreign.is_dir()


# -- integers range-checked before they narrow ----------------------------------------------------------------------

WIDE_INTEGERS = [
    (["generate", "ART", "--prompt-ids", "5", "--threads", 2**32 + 1], "--threads must be between"),
    (["generate", "ART", "--prompt-ids", "5", "--max-new-tokens", 2**32 + 16], "--max-new-tokens must be between"),
    (["generate", "ART", "--prompt-ids", "5", "--max-denoising-steps", 2**32 + 1], "--max-denoising-steps must be"),
    (["generate", "ART", "--prompt-ids", "5", "--seed", 2**64 + 1], "--seed must be between 0"),
    (["export", "CKPT", "-o", "OUT", "--max-batch", 2**32 + 1], "--max-batch must be between"),
    (["export", "CKPT", "-o", "OUT", "--max-context", -(2**32) + 64], "--max-context must be between"),
    (["triton", "ART", "-o", "OUT", "--instances", 2**32 + 1], "--instances must be between"),
    (["triton", "ART", "-o", "OUT", "--batch-window-ms", 2**63], "--batch-window-ms must be between"),
    (["bench", "ART", "--steps", 2**32 + 8], "--steps must be between"),
    (["serve", "OUT", "--http-port", 2**32 + 8000], "--http-port must be between"),
    (["random-checkpoint", "OUT", "--layers", 2**32 + 2], "--layers must be between"),
]


@pytest.mark.parametrize("args, fragment", WIDE_INTEGERS, ids=[" ".join(map(str, a[-2:])) for a, _ in WIDE_INTEGERS])
def test_integer_options_are_range_checked_before_they_narrow(
    tiny_checkpoint, tiny_artifacts, tmp_path, args, fragment
):
    """An integer past what the code it reaches holds (a C int, an int64) is refused with the value given, never
    wrapped to a small valid-looking one."""
    names = {"ART": tiny_artifacts, "CKPT": tiny_checkpoint, "OUT": tmp_path / "out"}
    result = cli(*(names.get(a, a) for a in args))
    assert_refused(result, fragment, f"got {args[-1]}")
    assert_nothing_written(tmp_path / "out")


# -- the environment's errors: one line -----------------------------------------------------------------------------


def _limited(args: list, limit: int, **kwargs) -> subprocess.CompletedProcess:
    """`canvasrt ARGS` under a file-size limit of `limit` bytes (RLIMIT_FSIZE, as `ulimit -f`)."""
    import resource

    return subprocess.run(
        [CANVASRT, *map(str, args)],
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        **kwargs,
    )


def assert_one_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.slow  # each command runs to its limit in a subprocess, the export a whole trace
@pytest.mark.parametrize("command", ["random-checkpoint", "export", "slice"])
def test_a_file_size_limit_or_a_full_disk_is_one_line_and_leaves_nothing(
    command, tiny_checkpoint, short_checkpoint, tmp_path
):
    out = tmp_path / "out"
    args = {
        "random-checkpoint": ["random-checkpoint", out],
        "export": ["export", short_checkpoint, "-o", out, "--max-context", 64],  # 1.3 MB of graph, half the trace
        "slice": ["slice", tiny_checkpoint, "--layers", "1", "-o", out],
    }[command]
    assert_one_line(_limited(args, 64 << 10), "file-size limit", "raise the limit or write elsewhere")
    assert_nothing_written(out)
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], capture_output=True)
    if mounted.returncode != 0:
        return  # a full disk needs a tmpfs this user cannot mount; the file-size limit above is the same class
    try:
        out = full / "out"
        args[args.index(tmp_path / "out")] = out
        assert_one_line(_limited(args, 1 << 40), "file system is full", "free space")
        assert_nothing_written(out)
    finally:
        subprocess.run(["umount", str(full)], check=True)


LONG_NAME = "n" * 300


@pytest.mark.parametrize(
    "args",
    [
        ["verify", f"ART/{LONG_NAME}"],
        ["generate", f"ART/{LONG_NAME}", "--prompt-ids", "5"],
        ["generate", "ART", "--prompts-file", f"TMP/{LONG_NAME}"],
        ["parity", "CKPT", "ART", "--report", f"TMP/{LONG_NAME}"],
        ["export", "CKPT", "-o", f"TMP/{LONG_NAME}"],
        ["triton", "ART", "-o", f"TMP/{LONG_NAME}"],
    ],
    ids=["verify", "generate", "--prompts-file", "--report", "export -o", "triton -o"],
)
def test_a_name_too_long_is_one_line(args, tiny_checkpoint, tiny_artifacts, tmp_path):
    names = {"ART": str(tiny_artifacts), "CKPT": str(tiny_checkpoint), "TMP": str(tmp_path)}
    args = [a.replace(a.split("/")[0], names[a.split("/")[0]], 1) if a.split("/")[0] in names else a for a in args]
    result = cli(*args)
    assert_refused(result, "too long")
    assert "cannot write to" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unreadable_weights_are_said_to_be_unreadable(tiny_checkpoint, tmp_path):
    checkpoint = copy(tiny_checkpoint, tmp_path / "ckpt")
    (checkpoint / "model.safetensors").chmod(0)
    command = [CANVASRT, "generate", str(checkpoint), "--prompt-ids", "5"]
    if os.geteuid() == 0:  # root reads any file: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to run as root without CAP_DAC_OVERRIDE")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    assert_one_line(subprocess.run(command, capture_output=True, text=True), "model.safetensors: permission denied")


def test_a_command_run_where_its_dependencies_are_missing_is_one_line(tiny_checkpoint, triton_env, tmp_path):
    """The serving environment holds canvasrt but not torch (nor click): what the models import, nothing more."""
    python = str(triton_env / "bin" / "python")
    done = subprocess.run(
        [python, "-m", "canvasrt", "export", str(tiny_checkpoint), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert_one_line(done, "needs the Python package", "scripts/setup.sh")
    assert_nothing_written(tmp_path / "out")


def test_python_m_canvasrt_runs_the_command(tiny_artifacts):
    done = subprocess.run(
        [sys.executable, "-m", "canvasrt", "verify", str(tiny_artifacts)], capture_output=True, text=True
    )
    assert done.returncode == 0 and "verified" in done.stdout, done.stderr


# -- texts that say what is true --------------------------------------------------------------------------------------


def test_texts_say_what_is_true(tiny_artifacts, tmp_path):
    artifacts = copy(tiny_artifacts, tmp_path / "art")
    edit_json(artifacts / "manifest.json", lambda d: d.update(format_version=str(d["format_version"])))
    result = cli("generate", artifacts, "--prompt-ids", "5")
    assert_refused(result, 'format_version is "5", not an integer')
    assert "is of artifact format" not in result.stderr
    assert_refused(cli("generate", tiny_artifacts, "--prompts-file", "/dev/null"), "/dev/null holds no prompts")
    assert_refused(
        cli("generate", tiny_artifacts, "--prompts-file", "/proc/self/mem"), "read prompts file /proc/self/mem"
    )
    piped = cli("generate", tiny_artifacts, "--prompts-file", "-", input='{"ids": [5]}\n')
    assert piped.exit_code == 0 and piped.stdout.startswith("[0] "), piped.output


def test_generated_text_on_stdout_has_no_control_characters(tiny_artifacts):
    """A random model emits control characters (NUL among them): printed escaped, so stdout is text."""
    result = cli("generate", tiny_artifacts, "--prompt-ids", "5,6,7", "--max-new-tokens", 64)
    assert result.exit_code == 0, result.output
    assert "\\x" in result.stdout  # this seed's text holds control characters, shown escaped
    assert all(ch.isprintable() or ch in "\n\t" for ch in result.stdout), repr(result.stdout)
