"""The checks the ONNX Runtime executor runs when it loads graphs (the lifecycle and state inspection of every
executor are the conformance suite's: tests/test_conformance.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from canvasrt.core.errors import ArtifactError
from canvasrt.runtime.backends import open_backend


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
