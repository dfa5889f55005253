"""Activation ranges for FP8: the input amax of every quantized GEMM, recorded while the real loop runs.

The torch backend (sparse MoE, any device and dtype) runs the whole generation loop (prefill, every denoising step from near-uniform noise to a
near-clean canvas, commits) on calibration prompts with hooks on the GEMM inputs, so the ranges cover the whole
schedule. Expert down-projections are ranged per expert over the tokens routed to it; an expert that saw fewer
than `min_tokens` tokens falls back to the largest range of its layer (conservative: no clipping).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.fp8 import E4M3_MAX, QUANTIZED, scale_for
from ..model.modeling import Experts, Linear
from ..runtime.backends.torch import TorchBackend
from ..runtime.loop import generate, left_pad
from ..runtime.rng import make_draws
from ..runtime.settings import resolve_settings



METHODS = ("max", "percentile", "mse")
SAMPLE_CAP = 1 << 15  # |x| values kept per tensor (per expert) for the percentile and MSE methods
PERCENTILE = 99.99


@dataclass
class Ranges:
    """amax per quantized GEMM input; per-expert lists for expert down-projections. Alongside the running max, a
    bounded random sample of |x| per tensor lets `finalize` pick a clipping range by percentile or by MSE."""

    amax: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[np.ndarray]] = field(default_factory=dict)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    fallbacks: dict[str, list[int]] = field(default_factory=dict)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    def update(self, name: str, value: np.ndarray | float) -> None:
        old = self.amax.get(name)
        self.amax[name] = value if old is None else np.maximum(old, value)

    def sample(self, name: str, values: list[np.ndarray]) -> None:
        """values: |x| per slice (one slice per tensor, or one per expert)."""
        for i, v in enumerate(values):
            self.sample_slice(name, i, v, len(values))

    def sample_slice(self, name: str, index: int, values: np.ndarray, slices: int) -> None:
        kept = self.samples.setdefault(name, [np.zeros(0, np.float32) for _ in range(slices)])
        pool = np.concatenate([kept[index], values.ravel()])
        kept[index] = pool if pool.size <= SAMPLE_CAP else self.rng.choice(pool, SAMPLE_CAP, replace=False)

    def finalize(self, method: str) -> None:
        """Replaces the running max by the method's range (max keeps it)."""
        if method == "max":
            return
        for name, slices in self.samples.items():
            chosen = [_choose(sample, method) for sample in slices]
            current = np.asarray(self.amax[name], dtype=np.float64)
            value = np.minimum(np.asarray(chosen if current.ndim else chosen[0]), current)
            self.amax[name] = value if current.ndim else float(value)


def _choose(sample: np.ndarray, method: str) -> float:
    if sample.size == 0:
        return 0.0
    if method == "percentile":
        return float(np.percentile(sample, PERCENTILE))
    # mse: the clipping range, among fractions of the max, that minimises the FP8 round-trip error of the sample
    import ml_dtypes

    best, best_error = float(sample.max()), np.inf
    for fraction in np.linspace(0.25, 1.0, 16):
        amax = float(sample.max()) * fraction
        scale = scale_for(amax)
        restored = np.clip(sample / scale, 0, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
        error = float(np.mean((restored - sample) ** 2))
        if error < best_error:
            best, best_error = amax, error
    return best


def collect_ranges(checkpoint_dir: str | Path, prompts: list[list[int]], seed: int = 0, batch: int = 8,
                   min_tokens: int = 16, method: str = "max", device: str = "cpu", dtype: str = "fp32",
                   moe: str = "sparse") -> Ranges:
    """moe: sparse (default) runs each expert on its routed tokens only, at the cost of the active parameters; the
    dense formulation gives the same ranges at num_experts / top_k times the expert work."""
    backend = TorchBackend(checkpoint_dir, dtype=dtype, moe=moe, max_batch=batch, device=device)
    ranges = Ranges()
    spec = backend.spec
    settings = resolve_settings(spec.generation)
    vocab, canvas = spec.model.vocab_size, spec.capacity.canvas
    with backend:
        for name, module in backend.model.named_modules():
            if isinstance(module, Linear) and QUANTIZED.search(f"{name}.weight"):
                module.register_forward_pre_hook(_amax_hook(ranges, f"{name}.weight"))
            if isinstance(module, Experts):
                module.register_forward_pre_hook(_amax_hook(ranges, f"{name}.gate_up_proj"))
                module.down_input_hook = _expert_observer(ranges, f"{name}.down_proj", module.num_experts)
        for start in range(0, len(prompts), batch):
            rows = prompts[start : start + batch]
            ids, padding = left_pad(rows, settings.pad_token_id or 0)
            draws = make_draws("counter", seed, len(rows), vocab, canvas, row_seeds=[seed + start + i for i in range(len(rows))])
            generate(backend, ids, padding, settings, draws)
    ranges.finalize(method)
    _fall_back_sparse_experts(ranges, min_tokens)
    return ranges


def _amax_hook(ranges: Ranges, name: str) -> Any:
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if args[0].numel() == 0:  # an encoder call runs the last layer's attention and FFN on no tokens
            return
        magnitude = args[0].detach().abs()
        ranges.update(name, float(magnitude.amax()))
        flat = magnitude.reshape(-1).float().numpy()
        ranges.sample(name, [flat[ranges.rng.integers(0, flat.size, min(flat.size, 4096))]])

    return hook


def _expert_observer(ranges: Ranges, name: str, experts: int) -> Any:
    def observe(act: torch.Tensor, routed: torch.Tensor, first: int) -> None:  # records only: returns no replacement
        # act [E', I, T]; only routed tokens matter: the others are multiplied by a zero routing weight.
        magnitude = act.detach().abs().float()
        amax = np.asarray(ranges.amax.get(name, np.zeros(experts)), dtype=np.float64).copy()
        counts = ranges.expert_tokens.setdefault(name, [0] * experts)
        kept = ranges.samples.setdefault(name, [np.zeros(0, np.float32) for _ in range(experts)])
        for offset in range(act.shape[0]):
            e = first + offset
            values = magnitude[offset][:, routed[offset]].reshape(-1).numpy()
            counts[e] += int(routed[offset].sum())
            if values.size:
                amax[e] = max(amax[e], float(values.max()))
                pick = values[ranges.rng.integers(0, values.size, min(values.size, 4096))]
                ranges.sample_slice(name, e, pick, len(kept))
        ranges.amax[name] = amax

    return observe


def _fall_back_sparse_experts(ranges: Ranges, min_tokens: int) -> None:
    for name, counts in ranges.expert_tokens.items():
        amax = np.asarray(ranges.amax[name], dtype=np.float64)
        starved = [e for e, n in enumerate(counts) if n < min_tokens]
        if starved:
            amax[starved] = amax.max()
            ranges.fallbacks[name] = starved
        ranges.amax[name] = amax
