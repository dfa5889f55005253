"""Where the loop's random numbers come from.

counter (default): every draw is a pure function of (row seed, block, step, purpose), taken from numpy's Philox
  counter-based generator. Any backend, any batch composition and any server gets the same draws for a row, so
  backends can be compared token for token and a batched request equals its sequential run.
hf: torch's global generator, consumed in exactly the order transformers' generate() consumes it (initial canvas,
  then per step the multinomial's exponentials and the renoise ids), so the torch backend reproduces generate()
  bit for bit. Torch is imported only in this mode.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .step import Draws

RNG_MODES = ("counter", "hf")
_CANVAS, _STEP = 1, 2  # purpose words of the Philox counter


class DrawSource(Protocol):
    def initial_canvas(self, block: int) -> np.ndarray: ...

    def step(self, block: int, step: int) -> Draws: ...


class CounterDraws:
    def __init__(self, seeds: np.ndarray, vocab_size: int, canvas: int):
        self.seeds = [int(s) for s in seeds]
        self.vocab_size = vocab_size
        self.canvas = canvas

    def _generator(self, seed: int, purpose: int, block: int, step: int) -> np.random.Generator:
        # Counter words increment from the lowest, so the stream identity sits in the high words.
        return np.random.Generator(np.random.Philox(key=seed, counter=[0, purpose, block, step]))

    def initial_canvas(self, block: int) -> np.ndarray:
        rows = [self._generator(s, _CANVAS, block, 0).integers(0, self.vocab_size, self.canvas) for s in self.seeds]
        return np.stack(rows).astype(np.int64)

    def step(self, block: int, step: int) -> Draws:
        uniforms, renoise = [], []
        for seed in self.seeds:
            gen = self._generator(seed, _STEP, block, step)
            uniforms.append(gen.random(self.canvas, dtype=np.float32))
            renoise.append(gen.integers(0, self.vocab_size, self.canvas))
        return Draws(renoise_ids=np.stack(renoise).astype(np.int64), uniforms=np.stack(uniforms))


class TorchDraws:
    """Draws on `device`'s generator, as transformers draws on the device its inputs live on."""

    def __init__(self, seed: int, batch: int, vocab_size: int, canvas: int, device: str = "cpu"):
        import torch

        self.torch = torch
        torch.manual_seed(seed)
        self.batch, self.vocab_size, self.canvas, self.device = batch, vocab_size, canvas, device

    def initial_canvas(self, block: int) -> np.ndarray:
        return self.torch.randint(0, self.vocab_size, (self.batch, self.canvas), device=self.device).cpu().numpy()

    def step(self, block: int, step: int) -> Draws:
        # torch.multinomial(p, 1) is argmax(p / q) with q ~ Exp(1) drawn over the whole [B*C, V] probability matrix.
        torch = self.torch
        exponentials = torch.empty(self.batch * self.canvas, self.vocab_size, device=self.device).exponential_(1)
        renoise = torch.randint(0, self.vocab_size, (self.batch, self.canvas), device=self.device)
        return Draws(renoise_ids=renoise.cpu().numpy(), exponentials=exponentials)


def make_draws(
    mode: str,
    seed: int,
    batch: int,
    vocab_size: int,
    canvas: int,
    row_seeds: list[int] | None = None,
    device: str = "cpu",
) -> DrawSource:
    """row_seeds overrides the per-row seeds of counter mode (default seed + row index); device: where hf mode
    draws (the torch backend's device)."""
    if mode == "counter":
        seeds = np.asarray(row_seeds if row_seeds is not None else [seed + r for r in range(batch)], dtype=np.uint64)
        return CounterDraws(seeds, vocab_size, canvas)
    if mode == "hf":
        return TorchDraws(seed, batch, vocab_size, canvas, device)
    raise ValueError(f"unknown rng mode {mode!r}")
