"""Attention over the live context: the K/V inputs take a span of leading buffer slots that follows the longest row's
context (rounded up to whole canvases), not the capacity the artifacts were exported for.

The variant geometry has both span dims: full layers (`context`, 16 to 160 slots) and sliding rings of 19 slots, more
than its canvas of 16 (`window`, 16 to 19)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from canvasrt.cli import main
from canvasrt.core.contract import PHASES, kv_spans, no_chunk, span_dim
from canvasrt.core.kv import leading_slots
from canvasrt.core.manifest import ArtifactManifest, EngineManifest
from canvasrt.runtime.backends.onnxruntime import OnnxRuntimeExecutor
from canvasrt.runtime.loop import generate, left_pad
from canvasrt.runtime.rng import make_draws
from canvasrt.runtime.settings import resolve_settings
from canvasrt.runtime.step import StepBackend


def test_spans_are_the_context_in_whole_canvases_within_each_layers_slots(variant_artifacts):
    manifest = ArtifactManifest.load(variant_artifacts)
    layout, capacity = manifest.kv_layout, manifest.capacity
    dims = [span_dim(layer, capacity) for layer in layout]
    assert set(dims) == {"context", "window"}
    full = dims.index("context")
    ring = dims.index("window")
    for length, (want_full, want_ring) in {
        0: (16, 16),
        1: (16, 16),
        16: (16, 16),
        17: (32, 19),
        40: (48, 19),
        159: (160, 19),
        160: (160, 19),
    }.items():
        spans = kv_spans(layout, capacity, length)
        assert (spans[full], spans[ring]) == (want_full, want_ring), length
    profiles = manifest.backbone.profiles
    for phase in PHASES:
        assert profiles[phase]["context"] == [16, 160, 160] and profiles[phase]["window"] == [16, 19, 19]


class RecordingExecutor(OnnxRuntimeExecutor):
    """The real ONNX Runtime executor, recording the K/V span each backbone call was fed."""

    def run(self, phase, feeds, outputs):
        layers = len(self.spec.kv_layout)
        self.calls.append((phase, {dim: feeds[f"past_key_{i}"].shape[2] for i, dim in self.dims.items()}))
        self.fed.append([feeds[f"past_{kind}_{i}"] for kind in ("key", "value") for i in range(layers)])
        return super().run(phase, feeds, outputs)


def test_each_call_reads_the_span_of_its_context(variant_artifacts):
    manifest = ArtifactManifest.load(variant_artifacts)
    executor = RecordingExecutor(manifest)
    backend = StepBackend(executor)
    dims = [span_dim(layer, manifest.capacity) for layer in manifest.kv_layout]
    executor.dims, executor.calls, executor.fed = (
        {dims.index("context"): "context", dims.index("window"): "window"},
        [],
        [],
    )
    settings = resolve_settings(
        manifest.generation, {"max_new_tokens": 32, "max_denoising_steps": 2, "stability_threshold": 3}
    )
    ids, padding = left_pad([list(range(3, 23))], 0)  # 20 prompt tokens, two canvases of 16
    with backend:
        generate(backend, ids, padding, settings, make_draws("counter", 0, 1, manifest.model.vocab_size, 16))
        buffers = backend.state.keys + backend.state.values
    assert (
        executor.calls
        == [("prefill", {"context": 16, "window": 16})]
        + [("denoise", {"context": 32, "window": 19})] * 2
        + [("commit", {"context": 32, "window": 19})]
        + [("denoise", {"context": 48, "window": 19})] * 2
    )
    # The context is copied once per canvas, not per step: the steps of a canvas and its commit (same context, no
    # write in between) are fed the same arrays; the next canvas's steps, after the commit wrote, new ones.
    prefill, step_1a, step_1b, commit, step_2a, step_2b = executor.fed
    assert all(a is b for a, b in zip(step_1a, step_1b)) and all(a is b for a, b in zip(step_1a, commit))
    assert all(a is b for a, b in zip(step_2a, step_2b))
    assert not any(a is b for a, b, buffer in zip(commit, step_2a, buffers) if a is not buffer)
    copied = [a for fed in (prefill, step_1a, step_2a) for a, buffer in zip(fed, buffers) if a is not buffer]
    assert backend.context_copy_bytes == sum(a.nbytes for a in copied) > 0


def test_any_span_that_covers_the_context_gives_the_same_step(variant_artifacts):
    """A step at context 20 fed 32, 48 or all 160 full-layer slots (and 19 ring slots): the extra slots are masked,
    and the call's own keys come first, so they add exact zeros after every live term."""
    manifest = ArtifactManifest.load(variant_artifacts)
    backend = StepBackend(OnnxRuntimeExecutor(manifest))
    rng = np.random.default_rng(1)
    vocab, canvas, hidden = manifest.model.vocab_size, manifest.capacity.canvas, manifest.model.hidden_size
    with backend:
        backend.start(np.ones((2, 20), dtype=bool))
        backend.encode(rng.integers(3, vocab, size=(2, 20)), np.arange(20), np.zeros(2, np.int64))
        feeds = {
            **no_chunk(2),
            "canvas": rng.integers(3, vocab, size=(2, canvas)),
            "self_cond": rng.standard_normal((2, canvas, hidden)).astype(np.float32),
            "context_length": np.full(2, 20, np.int64),
            "context_mask": backend.state.mask,
            "temperature": np.full(2, 0.8, np.float32),
            "entropy_bound": np.full(2, 1.5, np.float32),
            "uniforms": rng.random((2, canvas), dtype=np.float32),
            "renoise_ids": rng.integers(3, vocab, size=(2, canvas)),
        }
        outputs = {}
        for full in (32, 48, 160):
            spans = [full if layer.slots > 19 else 19 for layer in manifest.kv_layout]
            past = {}
            state = backend.state
            for i, (k, v) in enumerate(zip(leading_slots(state.keys, spans), leading_slots(state.values, spans))):
                past[f"past_key_{i}"], past[f"past_value_{i}"] = k, v
            out = backend.executor.run("denoise", {**feeds, **past}, {})
            outputs[full] = {name: np.array(array) for name, array in out.items()}
    for full in (48, 160):
        for name in ("sampled", "argmax", "accepted", "next_canvas"):
            np.testing.assert_array_equal(outputs[full][name], outputs[32][name], err_msg=f"{name} at span {full}")
        for name in ("entropy", "next_self_cond", "mean_entropy"):
            np.testing.assert_allclose(
                outputs[full][name], outputs[32][name], rtol=1e-6, atol=1e-6, err_msg=f"{name} at span {full}"
            )


def test_engines_take_both_span_dims_in_every_profile(variant_artifacts, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    result = CliRunner().invoke(
        main, ["build", str(variant_artifacts), "-o", str(tmp_path / "eng"), "--target", "sm89", "--max-context", "96"]
    )
    assert result.exit_code == 0, result.output
    profiles = EngineManifest.load(tmp_path / "eng").backbone.profiles
    for phase in PHASES:  # the context range follows the narrowed capacity; the rings keep theirs
        assert profiles[phase]["context"] == [16, 96, 96] and profiles[phase]["window"] == [16, 19, 19]


def test_a_checkpoint_for_long_contexts_and_its_bad_size(tmp_path):
    """random-checkpoint --max-positions: the context a test model allows (the 32768-position comparison uses it);
    a size that leaves no room for a canvas is one line and exit 2, with nothing written."""
    bad = CliRunner().invoke(main, ["random-checkpoint", str(tmp_path / "bad"), "--max-positions", "16"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and not (tmp_path / "bad").exists()
    assert "--max-positions 16 leaves no room for a prompt before a canvas of 16 tokens; use at least 17" in bad.output
    good = CliRunner().invoke(main, ["random-checkpoint", str(tmp_path / "long"), "--max-positions", "32768"])
    assert good.exit_code == 0, good.output
    assert '"max_position_embeddings": 32768' in (tmp_path / "long" / "config.json").read_text()
