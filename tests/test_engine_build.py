"""A real TensorRT builder (TensorRT-RTX, ahead of time for SM89 and SM120, no GPU) accepts every dense graph the
exporter writes; `canvasrt build` wraps it with an engine manifest and reuse."""

from __future__ import annotations

import json

import pytest

from canvasrt.exporter.builder import build_engine
from canvasrt.exporter.errors import CanvasrtError

pytest.importorskip("tensorrt_rtx")


@pytest.mark.parametrize("target", ["sm89", "sm120"])
@pytest.mark.parametrize("fixture", ["tiny_artifacts", "tiny_fp16_artifacts"])
@pytest.mark.parametrize("graph", ["encode", "denoise"])
def test_tensorrt_rtx_builds_graph(fixture, graph, target, request):
    artifacts = request.getfixturevalue(fixture)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    entry = manifest["graphs"][graph]
    engine = build_engine(artifacts / entry["file"], entry, "tensorrt-rtx", target)
    assert len(engine) > 100_000


def test_sparse_moe_graph_is_refused_by_tensorrt_rtx_with_a_clear_error(tiny_sparse_artifacts):
    manifest = json.loads((tiny_sparse_artifacts / "manifest.json").read_text())
    entry = manifest["graphs"]["denoise"]
    with pytest.raises(CanvasrtError, match="could not build denoise.onnx"):
        build_engine(tiny_sparse_artifacts / entry["file"], entry, "tensorrt-rtx", "sm89")


def test_build_command_writes_engines_and_reuses_a_matching_build(tiny_artifacts, tmp_path):
    from click.testing import CliRunner

    from canvasrt.runtime.cli import main

    out = tmp_path / "engines"
    first = CliRunner().invoke(main, ["build", str(tiny_artifacts), "-o", str(out), "--target", "sm120"])
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "manifest.json").read_text())
    source = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert manifest["key"]["target"] == "sm120" and manifest["key"]["builder"] == "tensorrt-rtx"
    assert {n: e["onnx_sha256"] for n, e in manifest["engines"].items()} == {
        n: g["sha256"] for n, g in source["graphs"].items()
    }
    assert all((out / e["file"]).stat().st_size == e["bytes"] for e in manifest["engines"].values())
    again = CliRunner().invoke(main, ["build", str(tiny_artifacts), "-o", str(out), "--target", "sm120"])
    assert again.exit_code == 0 and "up to date" in again.output


@pytest.mark.parametrize("args, message", [
    (["--target", "sm90"], "TensorRT-RTX builds for"),
    (["--workspace", "lots"], "--workspace takes a size"),
])
def test_build_bad_input(tiny_artifacts, tmp_path, args, message):
    from click.testing import CliRunner

    from canvasrt.runtime.cli import main

    result = CliRunner().invoke(main, ["build", str(tiny_artifacts), "-o", str(tmp_path / "e"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "e").exists()


def test_build_refuses_sparse_graphs_for_tensorrt_rtx_up_front(tiny_sparse_artifacts, tmp_path):
    from click.testing import CliRunner

    from canvasrt.runtime.cli import main

    result = CliRunner().invoke(main, ["build", str(tiny_sparse_artifacts), "-o", str(tmp_path / "e")])
    assert result.exit_code == 2 and "export with --moe dense" in result.output
    assert list(tmp_path.iterdir()) == []
