"""The block-diffusion generation loop over any StepBackend (transformers 5.23's DiffusionGemma generate(), in
`models/diffusion_gemma/generation_diffusion_gemma.py`), written against numpy so that it runs without PyTorch.

Per canvas: a random canvas, up to N denoising steps with the linear temperature schedule, entropy-bound acceptance
and renoising (inside the step), the stable-and-confident adaptive stop with per-row freezing, then the argmax
canvas is committed (EOS handling, encoder pass over the block). `stream()` yields an event per step and per
committed block; `generate()` runs it to the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.errors import CanvasrtError
from .images import PromptImages, image_chunks
from .rng import DrawSource
from .settings import GenerationSettings
from .step import StepBackend, StepInputs


@dataclass
class Draft:
    """After each denoising step: the argmax canvas so far and the stop state."""

    block: int
    step: int  # 1-based steps run in this block
    argmax: np.ndarray
    accepted: np.ndarray
    mean_entropy: np.ndarray
    done: np.ndarray


@dataclass
class Committed:
    """A finished canvas, after EOS/pad handling, as appended to the sequences."""

    block: int
    tokens: np.ndarray
    finished: np.ndarray
    steps: int


@dataclass
class GenerationResult:
    sequences: np.ndarray  # [B, P + blocks * C]: left-padded prompt then the committed canvases, like transformers
    prompt_length: int
    steps_per_block: list[int]
    tokens_per_forward: np.ndarray  # [B]
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> np.ndarray:
        return self.sequences[:, self.prompt_length :]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, P] ids and the [B, P] mask of real tokens, padded on the left as transformers pads for generation."""
    if not rows or any(len(r) == 0 for r in rows):
        raise CanvasrtError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = True
    return ids, mask


class Timer:
    """Accumulates wall time inside backend calls, so the loop can report its own (host) overhead."""

    def __init__(self) -> None:
        self.backend = 0.0
        self.last = 0.0

    def run(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.last = time.perf_counter() - start
            self.backend += self.last


def check_request(
    backend: StepBackend, ids: np.ndarray, settings: GenerationSettings, images: PromptImages | None = None
) -> int:
    """Validates a request against the model and capacities; returns the number of canvases to generate. Image soft
    tokens are prompt tokens: they count against the context like text."""
    vocab = backend.spec.model.vocab_size
    capacity = backend.spec.capacity
    canvas = capacity.canvas
    if ids.min() < 0 or ids.max() >= vocab:
        bad = int(ids.max() if ids.max() >= vocab else ids.min())
        raise CanvasrtError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
    if ids.shape[0] > capacity.max_batch:
        raise CanvasrtError(
            f"{ids.shape[0]} prompts exceed the max batch {capacity.max_batch}; "
            "re-export with a larger --max-batch or split the prompts file"
        )
    blocks = math.ceil(settings.max_new_tokens / canvas)
    needed = ids.shape[1] + (blocks - 1) * canvas
    if needed > capacity.max_context:
        of_images = "" if images is None else f" ({images.tokens.shape[0]} of them image soft tokens)"
        raise CanvasrtError(
            f"a prompt of {ids.shape[1]} tokens{of_images} plus {blocks} canvas(es) of {canvas} needs {needed} context "
            f"positions, more than the maximum context of {capacity.max_context}; shorten the prompt, lower "
            "max_new_tokens, or re-export the model with a larger maximum context"
        )
    return blocks


def stop_rule(
    history: np.ndarray, argmax: np.ndarray, mean_entropy: np.ndarray, settings: GenerationSettings
) -> tuple[np.ndarray, np.ndarray]:
    """The adaptive stop after a step: rows whose argmax [B, C] has stayed the same for `stability_threshold` steps
    (history [T, B, C], -1 where not yet seen) and whose mean entropy is below the confidence threshold. Returns
    those rows [B] and the history, updated in place."""
    if settings.stability_threshold == 0:
        stable = np.ones(argmax.shape[0], dtype=bool)
    else:
        stable = (history == argmax[None]).all(axis=(0, 2))
        history[:-1] = history[1:]  # in place: the oldest argmax out, this one in
        history[-1] = argmax
    return stable & (mean_entropy < settings.confidence_threshold), history


def commit_rule(
    argmax: np.ndarray, finished: np.ndarray, settings: GenerationSettings
) -> tuple[np.ndarray, np.ndarray]:
    """A stopped canvas [B, C] as committed: rows finished before are all pad, everything after a row's first EOS is
    pad. Returns the block's tokens and the rows finished after it."""
    eos = np.asarray(settings.eos_token_ids, dtype=np.int64)
    block_tokens = argmax.copy()
    finished_now = np.isin(block_tokens, eos).any(axis=1) if eos.size else np.zeros(argmax.shape[0], dtype=bool)
    if settings.pad_token_id is not None:
        block_tokens[finished] = settings.pad_token_id
        if eos.size:
            is_eos = np.isin(block_tokens, eos)
            seen = np.cumsum(is_eos, axis=1)
            block_tokens[(seen > 0) & ~((seen == 1) & is_eos)] = settings.pad_token_id  # keep the first EOS
    return block_tokens, finished | finished_now


def tokens_per_forward(new: np.ndarray, forwards: np.ndarray, settings: GenerationSettings) -> np.ndarray:
    """Generated tokens [B, N] that are not pad, per denoising forward each row ran."""
    valid = (new != settings.pad_token_id).sum(axis=1) if settings.pad_token_id is not None else new.shape[1]
    # float32, as transformers divides two integer tensors in torch's default dtype
    return np.float32(valid) / np.maximum(forwards, 1).astype(np.float32)


def stream(
    backend: StepBackend,
    ids: np.ndarray,
    padding: np.ndarray,
    settings: GenerationSettings,
    draws: DrawSource,
    images: PromptImages | None = None,
) -> Iterator[Draft | Committed | GenerationResult]:
    """Runs generation, yielding a Draft per step, a Committed per canvas, and finally the GenerationResult.
    images: the prompt's image soft tokens and their places (`runtime.images.PromptImages`), or None."""
    blocks = check_request(backend, ids, settings, images)
    canvas_len = backend.spec.capacity.canvas
    batch, prompt_len = ids.shape
    n_steps = settings.max_denoising_steps
    bound = np.full(batch, settings.entropy_bound, dtype=np.float32)
    timer = Timer()
    timings: dict[str, Any] = {"prefill_s": 0.0, "commit_s": 0.0, "steps": 0, "step_s": 0.0}
    step_wall: list[float] = []  # per denoising step: whole loop iteration
    step_backend: list[float] = []  # per denoising step: inside the backend call
    started = time.perf_counter()
    context, timings["prefill_s"] = _prefill(backend, ids, padding, images, timer)

    sequences = ids
    finished = np.zeros(batch, dtype=bool)
    forwards = np.zeros(batch, dtype=np.int64)
    steps_per_block: list[int] = []
    for block in range(blocks):
        if block > 0:
            t0 = time.perf_counter()
            context = _commit(backend, sequences, context, canvas_len, timer)
            timings["commit_s"] += time.perf_counter() - t0
        canvas = draws.initial_canvas(block)
        argmax = canvas
        done = np.zeros(batch, dtype=bool)
        history = np.full((settings.stability_threshold, batch, canvas_len), -1, dtype=np.int64)
        step = 0
        t0 = time.perf_counter()
        # The steps stay inline: a call or a generator per step would add to the host's time of every step.
        for remaining in range(n_steps, 0, -1):
            iteration_start = time.perf_counter()
            step += 1
            forwards += ~(done | finished)
            temperature = np.full(batch, settings.temperature(remaining), dtype=np.float32)
            first_step = np.full(batch, step == 1)
            inputs = StepInputs(canvas, context, temperature, bound, draws.step(block, step), first_step, done)
            result = timer.run(backend.denoise, inputs)
            # Rows that already stopped keep their canvas and argmax (transformers freezes them the same way).
            new_argmax = np.where(done[:, None], argmax, result.argmax)
            canvas = np.where(done[:, None], canvas, result.next_canvas)
            stopping, history = stop_rule(history, new_argmax, result.mean_entropy, settings)
            done = done | stopping
            argmax = new_argmax
            step_backend.append(timer.last)
            step_wall.append(time.perf_counter() - iteration_start)
            yield Draft(block, step, argmax, result.accepted, result.mean_entropy, done.copy())
            if done.all():
                break
        timings["step_s"] += time.perf_counter() - t0
        timings["steps"] += step
        steps_per_block.append(step)

        block_tokens, finished = commit_rule(argmax, finished, settings)
        sequences = np.concatenate([sequences, block_tokens], axis=1)
        yield Committed(block, block_tokens, finished.copy(), step)
        if finished.all():
            break

    timings["total_s"] = time.perf_counter() - started
    timings["backend_s"] = timer.backend
    timings["step_wall_s"] = step_wall
    timings["step_backend_s"] = step_backend
    yield GenerationResult(
        sequences=sequences,
        prompt_length=prompt_len,
        steps_per_block=steps_per_block,
        tokens_per_forward=tokens_per_forward(sequences[:, prompt_len:], forwards, settings),
        timings=timings,
    )


def _prefill(
    backend: StepBackend, ids: np.ndarray, padding: np.ndarray, images: PromptImages | None, timer: Timer
) -> tuple[np.ndarray, float]:
    """Starts the request and encodes the prompt in chunks of at most max_prefill tokens (no image split between
    two); returns each row's context length after it and the encoding's wall time."""
    batch, prompt_len = ids.shape
    chunks = image_chunks(None if images is None else images.slot, prompt_len, backend.spec.capacity.max_prefill)
    backend.start(padding)
    context = np.zeros(batch, dtype=np.int64)
    t0 = time.perf_counter()
    for begin, end in chunks:
        positions = np.arange(begin, end, dtype=np.int64)
        placed = None if images is None else images.chunk(begin, end)
        timer.run(backend.encode, ids[:, begin:end], positions, context, placed)
        context = context + (end - begin)
    return context, time.perf_counter() - t0


def _commit(
    backend: StepBackend, sequences: np.ndarray, context: np.ndarray, canvas_len: int, timer: Timer
) -> np.ndarray:
    """Encodes the canvas committed last (the sequences' last `canvas_len` tokens) into the context; returns the
    context lengths after it."""
    positions = np.arange(sequences.shape[1] - canvas_len, sequences.shape[1], dtype=np.int64)
    timer.run(backend.encode, np.ascontiguousarray(sequences[:, -canvas_len:]), positions, context)
    return context + canvas_len


def generate(
    backend: StepBackend,
    ids: np.ndarray,
    padding: np.ndarray,
    settings: GenerationSettings,
    draws: DrawSource,
    images: PromptImages | None = None,
) -> GenerationResult:
    for event in stream(backend, ids, padding, settings, draws, images):
        if isinstance(event, GenerationResult):
            return event
    raise AssertionError("stream() ended without a result")
