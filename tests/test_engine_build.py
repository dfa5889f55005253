"""A real TensorRT builder (TensorRT-RTX, ahead of time for SM89, no GPU) accepts every graph the exporter writes."""

from __future__ import annotations

import json

import pytest

from canvasrt.exporter.builder import build_engine
from canvasrt.exporter.errors import CanvasrtError

pytest.importorskip("tensorrt_rtx")


@pytest.mark.parametrize("fixture", ["tiny_artifacts", "tiny_fp16_artifacts"])
@pytest.mark.parametrize("graph", ["encode", "denoise"])
def test_tensorrt_rtx_builds_graph_for_sm89(fixture, graph, request):
    artifacts = request.getfixturevalue(fixture)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    entry = manifest["graphs"][graph]
    engine = build_engine(artifacts / entry["file"], entry, "tensorrt-rtx", "sm89")
    assert len(engine) > 100_000


def test_sparse_moe_graph_is_refused_by_tensorrt_rtx_with_a_clear_error(tiny_sparse_artifacts):
    manifest = json.loads((tiny_sparse_artifacts / "manifest.json").read_text())
    entry = manifest["graphs"]["denoise"]
    with pytest.raises(CanvasrtError, match="could not build denoise.onnx"):
        build_engine(tiny_sparse_artifacts / entry["file"], entry, "tensorrt-rtx", "sm89")
