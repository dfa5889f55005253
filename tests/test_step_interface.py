"""The step interface's lifecycle (Polygraphy-style activate/deactivate) and the checks backends run when they load
graphs, against the real ONNX Runtime backend."""

from __future__ import annotations

import gc
import json
import shutil

import numpy as np
import pytest

from canvasrt.core.errors import ArtifactError
from canvasrt.runtime.backends import open_backend


def test_backend_lifecycle_is_guarded(tiny_artifacts):
    backend = open_backend(tiny_artifacts, "onnxruntime")
    assert not backend.is_active
    with pytest.raises(RuntimeError, match="not active"):
        backend.start(np.ones((1, 3), bool))
    with backend:
        assert backend.is_active
        with pytest.raises(RuntimeError, match="already active"):
            backend.activate()
    assert not backend.is_active
    with pytest.raises(RuntimeError, match="not active"):
        backend.deactivate()


def test_a_backend_left_active_warns(tiny_artifacts):
    backend = open_backend(tiny_artifacts, "onnxruntime")
    backend.activate()
    with pytest.warns(ResourceWarning, match="never deactivated"):
        del backend
        gc.collect()


def _copy_with_manifest(source, target, edit):
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    edit(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_onnxruntime_backend_checks_the_graphs_against_the_manifest(tiny_artifacts, tmp_path):
    def rename(manifest):
        manifest["graphs"]["backbone"]["inputs"][2]["name"] = "tokens"

    def reshape(manifest):
        spec = next(s for s in manifest["graphs"]["backbone"]["inputs"] if s["name"] == "context_mask")
        spec["shape"][1] += 1

    def retype(manifest):
        spec = next(s for s in manifest["graphs"]["backbone"]["outputs"] if s["name"] == "entropy")
        spec["dtype"] = "int64"

    for edit, message in (
        (rename, "missing \\['tokens'\\]"),
        (reshape, "context_mask is tensor\\(bool\\)"),
        (retype, "entropy is tensor\\(float\\)"),
    ):
        artifacts = _copy_with_manifest(tiny_artifacts, tmp_path / edit.__name__, edit)
        backend = open_backend(artifacts, "onnxruntime")
        with pytest.raises(ArtifactError, match=message):
            backend.activate()
        assert not backend.is_active


def test_inspection_reads_the_state_parity_compares(tiny_artifacts):
    with open_backend(tiny_artifacts, "onnxruntime") as backend:
        backend.start(np.ones((2, 5), bool))
        backend.encode(np.arange(10, 20).reshape(2, 5), np.arange(5), np.zeros(2, np.int64))
        keys, values = backend.kv_cache()
        assert len(keys) == len(backend.spec.kv_layout) and np.abs(keys[0][:, :, :5]).max() > 0
        state = np.full((2, 16, 64), 0.5, np.float32)
        backend.set_self_conditioning(state)
        assert np.array_equal(backend.self_conditioning(), state)
