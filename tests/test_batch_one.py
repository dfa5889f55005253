"""Max batch 1, the latency configuration most deployments use: export, TensorRT-RTX build, generation and a Triton
repository served by a real tritonserver, all at --max-batch 1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from canvasrt.cli import main
from canvasrt.serving.client import generate_grpc
from canvasrt.serving.protocol import request_inputs
from canvasrt.serving.server import TritonServer, free_ports
from support import cli

pytestmark = pytest.mark.slow  # every test here builds engines or serves

ROOT = Path(__file__).resolve().parents[1]
TRITON_ENV = Path(os.environ.get("CANVASRT_TRITON_ENV", ROOT / ".venv-triton"))


@pytest.fixture(scope="module")
def batch_one_artifacts(short_checkpoint, tmp_path_factory) -> Path:
    """The two-layer checkpoint exported at max batch 1 (the batch, not the depth, is what these tests are about)."""
    out = tmp_path_factory.mktemp("b1") / "art"
    result = cli("export", short_checkpoint, "-o", out, "--max-batch", 1, "--max-context", 64)
    assert result.exit_code == 0, result.output
    return out


def generated(target: Path, *args) -> dict:
    result = cli("generate", target, "--prompt-ids", "5,6,7,8,9", "--seed", 3, "--threads", 1, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_export_at_max_batch_1_generates_what_torch_generates(short_checkpoint, batch_one_artifacts):
    manifest = json.loads((batch_one_artifacts / "manifest.json").read_text())
    assert manifest["capacity"]["max_batch"] == 1
    assert all(p["batch"] == [1, 1, 1] for g in manifest["graphs"].values() for p in g["profiles"].values())
    ours = generated(batch_one_artifacts)
    assert ours["sequences"] == generated(short_checkpoint)["sequences"]
    assert len(ours["sequences"][0]) > 5


def test_a_second_prompt_exceeds_max_batch_1_with_one_line(batch_one_artifacts, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"ids": [5, 6]}\n{"ids": [7, 8]}\n')
    result = CliRunner().invoke(main, ["generate", str(batch_one_artifacts), "--prompts-file", str(prompts)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")][0].count("max batch 1")


def test_build_at_max_batch_1(batch_one_artifacts, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    result = cli("build", batch_one_artifacts, "-o", tmp_path / "engines", "--target", "sm89", "--max-batch", 1)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    assert manifest["key"]["max_batch"] == 1
    assert (tmp_path / "engines" / "backbone.engine").stat().st_size > 0
    assert {dims["batch"][2] for dims in manifest["engines"]["backbone"]["profiles"].values()} == {1}


def test_triton_serves_a_max_batch_1_repository(batch_one_artifacts, tmp_path):
    if not (TRITON_ENV / "pyvenv.cfg").is_file():
        pytest.fail(f"{TRITON_ENV} is missing: run scripts/setup.sh, which creates the Triton models' environment")
    repository = tmp_path / "repo"
    result = cli("triton", batch_one_artifacts, "-o", repository, "--step-backend", "python", "--max-batch", 1)
    assert result.exit_code == 0, result.output
    assert "max_batch_size: 1" in (repository / "canvasrt_backbone" / "config.pbtxt").read_text()
    reference = generated(batch_one_artifacts)
    http, grpc = free_ports(2)
    with TritonServer(repository, TRITON_ENV, http_port=http, grpc_port=grpc) as server:
        responses = generate_grpc(server.grpc_url, request_inputs(prompt_ids=[5, 6, 7, 8, 9], seed=3))
    assert responses[-1]["event"] == "done"
    assert [5, 6, 7, 8, 9] + responses[-1]["ids"] == reference["sequences"][0]
