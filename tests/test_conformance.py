"""The executor conformance suite (`pytest -m conformance`): the same cases over every executor this machine has.

An executor joins by being registered in CANDIDATES (how to open it on the tiny artifacts, and what it needs); it
then runs every case here: lifecycle, start/encode/denoise, slots joining and leaving, state inspection, the bytes
crossed per step, errors, and step and loop parity. One that cannot run here (no GPU, no TensorRT, no GPU build of
ONNX Runtime) is reported as skipped with the reason.
"""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from canvasrt.core.errors import CanvasrtError
from canvasrt.runtime.backends import open_backend
from canvasrt.runtime.loop import generate, left_pad
from canvasrt.runtime.rng import make_draws
from canvasrt.runtime.scheduler import RowRequest, Scheduler, Ticket
from canvasrt.runtime.settings import resolve_settings
from canvasrt.runtime.step import Draws, StepBackend, StepInputs
from canvasrt.validation.parity import loop_agreement, step_parity

pytestmark = pytest.mark.conformance


def _cuda() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


def _ort_provider(name: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        import onnxruntime as ort

        if name not in ort.get_available_providers():
            return f"this ONNX Runtime ({ort.__version__}) has no {name} (onnxruntime-gpu)"
        return _cuda()

    return missing


def _tensorrt() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    import tensorrt

    if not hasattr(tensorrt, "Runtime"):
        return "the installed `tensorrt` is not a working TensorRT"
    return _cuda()


@dataclass(frozen=True)
class Candidate:
    """An executor under test: how to open it on the tiny artifacts (or engines) and why it cannot run here."""

    open: Callable[[pytest.FixtureRequest], StepBackend]
    missing: Callable[[], str | None]


def _artifacts(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("tiny_artifacts")


def _engines(request: pytest.FixtureRequest) -> Path:
    """Engines of the tiny artifacts built by full TensorRT for this GPU (built once per session)."""
    return request.getfixturevalue("tiny_local_engines")


CANDIDATES: dict[str, Candidate] = {
    "onnxruntime-cpu": Candidate(lambda r: open_backend(_artifacts(r), "onnxruntime", threads=1), lambda: None),
    "torch-cpu": Candidate(lambda r: open_backend(_artifacts(r), "torch", threads=1), lambda: None),
    "onnxruntime-cuda": Candidate(
        lambda r: open_backend(_artifacts(r), "onnxruntime", provider="cuda"), _ort_provider("CUDAExecutionProvider")
    ),
    "onnxruntime-tensorrt-ep": Candidate(
        lambda r: open_backend(_artifacts(r), "onnxruntime", provider="tensorrt-ep"),
        _ort_provider("TensorrtExecutionProvider"),
    ),
    "torch-cuda": Candidate(lambda r: open_backend(_artifacts(r), "torch", device="cuda"), _cuda),
    "tensorrt": Candidate(lambda r: open_backend(_engines(r), "tensorrt"), _tensorrt),
}


@pytest.fixture(scope="session")
def tiny_local_engines(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from canvasrt.builder.engines import build_engines

    out = tmp_path_factory.mktemp("eng") / "tiny-local"
    build_engines(tiny_artifacts, out, target="current", builder="tensorrt")
    return out


@pytest.fixture(params=list(CANDIDATES))
def opener(request: pytest.FixtureRequest) -> Callable[[], StepBackend]:
    """Opens inactive backends of each registered executor (skipped, with the reason, where it cannot run)."""
    entry = CANDIDATES[request.param]
    reason = entry.missing()
    if reason is not None:
        pytest.skip(f"{request.param}: {reason}")
    return lambda: entry.open(request)


@pytest.fixture
def candidate(opener: Callable[[], StepBackend]) -> StepBackend:
    return opener()


def _settings(backend: StepBackend, canvases: int = 2, steps: int = 4):
    return resolve_settings(
        backend.spec.generation,
        {"max_new_tokens": canvases * backend.spec.capacity.canvas, "max_denoising_steps": steps},
    )


def _draws(backend: StepBackend, batch: int, seed: int = 0) -> Draws:
    rng = np.random.default_rng(seed)
    vocab, canvas = backend.spec.model.vocab_size, backend.spec.capacity.canvas
    return Draws(
        renoise_ids=rng.integers(3, vocab, size=(batch, canvas)), uniforms=rng.random((batch, canvas), np.float32)
    )


def _prefill(backend: StepBackend, ids: np.ndarray) -> None:
    backend.start(np.ones(ids.shape, bool))
    backend.encode(ids, np.arange(ids.shape[1]), np.zeros(ids.shape[0], np.int64))


def _step(backend: StepBackend, context: int, batch: int, first: bool = True, frozen=None, seed: int = 0):
    canvas = np.random.default_rng(seed + 1).integers(
        3, backend.spec.model.vocab_size, (batch, backend.spec.capacity.canvas)
    )
    return backend.denoise(
        StepInputs.uniform(canvas, np.full(batch, context), 0.8, 1.5, _draws(backend, batch, seed), first, frozen)
    )


def test_lifecycle(candidate, opener):
    with pytest.raises(RuntimeError, match="not active"):
        candidate.start(np.ones((1, 3), bool))
    with candidate:
        assert candidate.is_active
        with pytest.raises(RuntimeError, match="already active"):
            candidate.activate()
    assert not candidate.is_active
    with pytest.raises(RuntimeError, match="not active"):
        candidate.deactivate()
    left = opener()
    left.activate()
    with pytest.warns(ResourceWarning, match="never deactivated"):
        del left
        gc.collect()


def test_start_encode_denoise(candidate):
    spec = candidate.spec
    canvas, vocab, hidden = spec.capacity.canvas, spec.model.vocab_size, spec.model.hidden_size
    with candidate:
        _prefill(candidate, np.arange(3, 13).reshape(2, 5))
        result = _step(candidate, 5, 2)
        for name in ("argmax", "next_canvas", "accepted", "entropy"):
            assert getattr(result, name).shape == (2, canvas), name
        assert result.argmax.dtype == np.int64 and result.accepted.dtype == bool
        assert result.mean_entropy.shape == (2,) and ((result.argmax >= 0) & (result.argmax < vocab)).all()
        state = candidate.self_conditioning()
        assert state.shape == (2, canvas, hidden) and np.abs(state).max() > 0
        # first_step starts from a zero state, whatever the state was
        candidate.set_self_conditioning(np.full((2, canvas, hidden), 0.5, np.float32))
        again = _step(candidate, 5, 2)
        np.testing.assert_allclose(again.entropy, result.entropy, rtol=1e-5, atol=1e-5)
        # a frozen row keeps its state
        before = candidate.self_conditioning()
        _step(candidate, 5, 2, first=False, frozen=np.array([True, False]), seed=3)
        after = candidate.self_conditioning()
        np.testing.assert_array_equal(after[0], before[0])
        assert not np.array_equal(after[1], before[1])


def test_state_inspection(candidate):
    spec = candidate.spec
    with candidate:
        _prefill(candidate, np.arange(10, 20).reshape(2, 5))
        keys, values = candidate.kv_cache()
        assert len(keys) == len(values) == len(spec.kv_layout)
        for layer, k, v in zip(spec.kv_layout, keys, values):
            assert k.shape == v.shape == (2, layer.num_kv_heads, layer.slots, layer.head_dim)
            assert np.abs(k[:, :, :5]).max() > 0 and not k[:, :, 5:].any()
        state = np.random.default_rng(0).standard_normal((2, spec.capacity.canvas, spec.model.hidden_size))
        candidate.set_self_conditioning(state.astype(np.float32))
        tolerance = 0 if spec.dtype == "fp32" else 1e-2
        np.testing.assert_allclose(
            candidate.self_conditioning(), state.astype(np.float32), atol=tolerance, rtol=tolerance
        )


def test_slots_joining_and_leaving_equal_their_own_runs(candidate):
    """Three requests of different lengths share three slots (joining at different steps, leaving as they finish):
    each row's tokens equal its own batch-of-one run on the same executor."""
    rng = np.random.default_rng(5)
    with candidate:
        vocab, canvas = candidate.spec.model.vocab_size, candidate.spec.capacity.canvas
        requests = [
            RowRequest(rng.integers(3, vocab, int(n)).tolist(), seed, _settings(candidate, canvases=c, steps=3))
            for seed, (n, c) in enumerate(((6, 2), (20, 1), (11, 2)))
        ]
        alone = []
        for request in requests:
            ids, padding = left_pad([request.ids], 0)
            draws = make_draws("counter", request.seed, 1, vocab, canvas)
            alone.append(generate(candidate, ids, padding, request.settings, draws).new_tokens[0].tolist())
        scheduler = Scheduler(candidate, max_queue=3, slots=3)
        tickets = [scheduler.submit(Ticket(requests[0]))]
        scheduler.step()
        tickets += [scheduler.submit(Ticket(r)) for r in requests[1:]]
        scheduler.run()
    assert [t.events[-1].new_tokens[0].tolist() for t in tickets] == alone
    assert scheduler.stats.step_calls < scheduler.stats.row_steps  # rows shared step calls


def test_bytes_crossed_per_step_are_canvas_sized_and_do_not_follow_the_context(candidate):
    """Per denoising step only the loop's canvas-sized arrays cross: in, the canvas, renoise ids and uniforms [B, C]
    and five [B] values; out, argmax, sampled, next canvas, entropy, accepted [B, C] and the mean entropy [B]."""
    spec = candidate.spec
    canvas = spec.capacity.canvas
    per_step = {}
    with candidate:
        for prompt in (5, 2 * canvas + 3):  # one canvas of context, then three
            _prefill(candidate, np.full((1, prompt), 7))
            candidate.reset_counters()
            for step in range(3):
                _step(candidate, prompt, 1, first=step == 0)
            per_step[prompt] = candidate.bytes_per_call()["denoise"]
    assert candidate.executor.capabilities.keeps_state
    batch = 1
    expected = batch * canvas * (8 + 8 + 4 + 8 + 8 + 8 + 4 + 1) + batch * (8 + 4 + 4 + 1 + 1 + 4)
    assert per_step == {5: expected, 2 * canvas + 3: expected}


def test_errors(candidate):
    spec = candidate.spec
    with candidate:
        with pytest.raises(CanvasrtError, match="max batch"):
            candidate.start(np.ones((spec.capacity.max_batch + 1, 2), bool))
        with pytest.raises(CanvasrtError, match="max batch"):
            candidate.open_slots(spec.capacity.max_batch + 1)
        candidate.open_slots(2)
        with pytest.raises(RuntimeError, match="outside the 2 open slots"):
            candidate.admit(2)
        step = StepInputs.uniform(
            np.full((3, spec.capacity.canvas), 5), np.zeros(3), 1.0, 1.0, _draws(candidate, 3), True
        )
        with pytest.raises(RuntimeError, match="outside the 2 open slots"):
            candidate.denoise_rows(3, step)
        _prefill(candidate, np.full((1, 4), 7))
        exponential = Draws(renoise_ids=_draws(candidate, 1).renoise_ids, exponentials=_exponentials(spec))
        inputs = StepInputs.uniform(np.full((1, spec.capacity.canvas), 5), np.full(1, 4), 1.0, 1.0, exponential, True)
        if "exponentials" in candidate.executor.capabilities.draws:
            assert candidate.denoise(inputs).argmax.shape == (1, spec.capacity.canvas)
        else:
            with pytest.raises(CanvasrtError, match="samples from uniforms"):
                candidate.denoise(inputs)


def _exponentials(spec):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.empty(spec.capacity.canvas, spec.model.vocab_size).exponential_(generator=generator)


def test_step_parity(candidate, tiny_checkpoint, tiny_artifacts):
    report = step_parity(tiny_checkpoint, candidate, threads=1, target=tiny_artifacts)
    assert report.passed, [c for c in report.checks if not c.passed]


def test_loop_parity(candidate, tiny_artifacts):
    """The loop on the executor commits the tokens the fp32 torch executor commits, canvas for canvas."""
    reference = open_backend(tiny_artifacts, "torch", threads=1)
    rows = [list(range(3, 17)), list(range(30, 39))]
    checks = loop_agreement(candidate, reference, rows, _settings(candidate, steps=6), seed=4)
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
