"""`canvasrt eval`: exact-match accuracy on a synthetic task's held-out prompts, through the full generation loop.

The same prompts, settings and seed go through every backend, so the figures compare the reference
(`transformers`: its own generate()), the torch backend, the ONNX graphs and, later, quantized graphs and engines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CanvasrtError
from ..core.target import CheckpointDir, open_target
from ..runtime.backends import open_backend
from ..runtime.loop import generate, left_pad
from ..runtime.prompts import TextCodec, until_eos
from ..runtime.rng import make_draws
from ..runtime.settings import resolve_settings
from ..runtime.step import StepBackend
from . import tasks


def evaluate(
    target: str | Path,
    task: str,
    samples: int,
    backend: str,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
) -> dict[str, Any]:
    """device, dtype: where and in what the torch paths run (the torch backend, transformers)."""
    target = Path(target)
    if task not in tasks.TASKS:
        raise CanvasrtError(f"unknown task {task!r}; use one of {', '.join(tasks.TASKS)}")
    if samples < 1:
        raise CanvasrtError(f"--samples must be at least 1 (got {samples})")
    spec = tasks.get_task(task)
    examples = tasks.examples(task, "heldout", samples, seed=seed)
    codec = TextCodec(target)
    rows = [codec.encode(example.prompt) for example in examples]
    start = time.perf_counter()
    if backend == "transformers":
        outputs = _generate_transformers(target, rows, seed, threads, device, dtype or "fp32")
    else:
        outputs = _generate_backend(target, backend, rows, seed, threads, device, dtype)
    elapsed = time.perf_counter() - start
    correct, steps, tpf = 0, [], []
    failures = []
    for example, (new_tokens, row_steps, row_tpf, settings) in zip(examples, outputs):
        text = codec.decode(until_eos(new_tokens, settings.eos_token_ids, settings.pad_token_id))
        ok = spec.score(example.prompt, text)
        correct += ok
        steps.append(row_steps)
        tpf.append(row_tpf)
        if not ok and len(failures) < 5:
            failures.append({"prompt": example.prompt, "expected": example.answer, "got": text})
    return {
        "task": task,
        "backend": backend,
        "samples": samples,
        "exact_match": correct / samples,
        "steps_per_block": float(np.mean(steps)),
        "max_denoising_steps": outputs[0][3].max_denoising_steps,
        "tokens_per_forward": float(np.mean(tpf)),
        "seconds": elapsed,
        "failures": failures,
    }


def _batches(rows: list[list[int]], size: int) -> list[list[list[int]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _generate_backend(
    target: Path, name: str, rows: list[list[int]], seed: int, threads: int | None, device: str, dtype: str | None
) -> list:
    with open_backend(target, name, threads=threads, max_batch=16, device=device, dtype=dtype) as runner:
        return _generate_batches(runner, rows, seed)


def _generate_batches(runner: StepBackend, rows: list[list[int]], seed: int) -> list:
    spec = runner.spec
    settings = resolve_settings(spec.generation)
    vocab, canvas = spec.model.vocab_size, spec.capacity.canvas
    results = []
    offset = 0
    for batch in _batches(rows, spec.capacity.max_batch):
        ids, padding = left_pad(batch, settings.pad_token_id or 0)
        # One seed per prompt, independent of how prompts are batched.
        draws = make_draws(
            "counter", seed, len(batch), vocab, canvas, row_seeds=[seed + offset + i for i in range(len(batch))]
        )
        result = generate(runner, ids, padding, settings, draws)
        for i in range(len(batch)):
            # Steps a row took per canvas: its non-pad tokens over its tokens per forward, as transformers reports.
            valid = int((result.new_tokens[i] != settings.pad_token_id).sum())
            row_steps = valid / float(result.tokens_per_forward[i]) / len(result.steps_per_block)
            results.append((result.new_tokens[i], row_steps, float(result.tokens_per_forward[i]), settings))
        offset += len(batch)
    return results


def _generate_transformers(
    target: Path, rows: list[list[int]], seed: int, threads: int | None, device: str, dtype: str
) -> list:
    import torch

    from .reference import Reference

    if not isinstance(open_target(target), CheckpointDir):
        raise CanvasrtError("--backend transformers evaluates a checkpoint directory, not exported artifacts")
    if threads:
        torch.set_num_threads(threads)
    # eager attention cannot generate left-padded batches (5.23)
    reference = Reference(target, attention="sdpa", device=device, dtype=dtype)
    from ..model.checkpoint import Checkpoint

    settings = resolve_settings(Checkpoint.open(target).generation_config())
    results = []
    for batch in _batches(rows, 16):
        ids, padding = left_pad(batch, settings.pad_token_id or 0)
        out = reference.generate(ids, padding, seed)
        new = out.sequences[:, ids.shape[1] :].numpy()
        blocks = new.shape[1] // reference.model.config.canvas_length
        for i in range(len(batch)):
            valid = int((new[i] != settings.pad_token_id).sum())
            tpf = float(out.tokens_per_forward[i])
            results.append((new[i], valid / tpf / blocks, tpf, settings))
    return results
