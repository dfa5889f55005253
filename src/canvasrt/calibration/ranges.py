"""Activation ranges for FP8: the input amax of every quantized GEMM, recorded while the real loop runs.

The torch backend (sparse MoE, any device and dtype) runs the whole generation loop (prefill, every denoising step
from near-uniform noise to a near-clean canvas, commits) on calibration prompts with hooks on the GEMM inputs, so
the ranges cover the whole schedule. Prompts with images run their images through the vision model and place the
soft tokens in the prefill as the runtime does, so the backbone's ranges cover image tokens too; the vision
model's own GEMM inputs are recorded only for `--quantize-vision`. An expert layer's down-projection reads the
routed activations already multiplied by their routing weights (`Experts`), all experts in one tensor (the dense
formulation's single GEMM), so it gets one range over the values of every routed token and expert; the tokens each
expert saw are counted alongside, for the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.fp8 import E4M3_MAX, QUANTIZED, VISION_QUANTIZED, scale_for
from ..model.modeling import Experts, Linear
from ..runtime.backends.torch import TorchExecutor
from ..runtime.images import place_prompts
from ..runtime.loop import generate
from ..runtime.rng import make_draws
from ..runtime.settings import resolve_settings
from ..runtime.step import StepBackend

METHODS = ("max", "percentile", "mse")
SAMPLE_CAP = 1 << 15  # |x| values kept per tensor for the percentile and MSE methods
PERCENTILE = 99.99


@dataclass
class Ranges:
    """amax per quantized GEMM input, and per expert layer the tokens routed to each expert. Alongside the running
    max, a bounded random sample of |x| per tensor lets `finalize` pick a clipping range by percentile or by MSE."""

    amax: dict[str, float] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    def update(self, name: str, magnitude: np.ndarray) -> None:
        """Takes |x| values seen at input `name`: the running max and up to 4096 of them into the sample."""
        self.amax[name] = max(self.amax.get(name, 0.0), float(magnitude.max()))
        picked = magnitude[self.rng.integers(0, magnitude.size, min(magnitude.size, 4096))]
        pool = np.concatenate([self.samples.get(name, np.zeros(0, np.float32)), picked])
        self.samples[name] = pool if pool.size <= SAMPLE_CAP else self.rng.choice(pool, SAMPLE_CAP, replace=False)

    def finalize(self, method: str) -> None:
        """Replaces the running max by the method's range (max keeps it)."""
        if method == "max":
            return
        for name, sample in self.samples.items():
            self.amax[name] = min(_choose(sample, method), self.amax[name])


def _choose(sample: np.ndarray, method: str) -> float:
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


def collect_ranges(
    checkpoint_dir: str | Path,
    prompts: list[list[int]] | list[dict[str, Any]],
    seed: int = 0,
    batch: int = 8,
    method: str = "max",
    device: str = "cpu",
    dtype: str = "fp32",
    moe: str = "sparse",
    vision: bool = False,
) -> Ranges:
    """prompts: token ids, or prompts as `runtime.images.place_prompts` takes them ({"text"} or {"ids"}, with
    optional "images"), whose images' soft tokens go through the prefill as at runtime. moe: sparse (default) runs
    each expert on its routed tokens only, at the cost of the active parameters; the dense formulation gives the same
    ranges at num_experts / top_k times the expert work. vision: also the input ranges of the vision model's GEMMs
    (`VISION_QUANTIZED`), over the prompts' images (each distinct set of images is encoded once)."""
    backend = StepBackend(TorchExecutor(checkpoint_dir, dtype=dtype, moe=moe, max_batch=batch, device=device))
    ranges = Ranges()
    spec = backend.spec
    settings = resolve_settings(spec.generation)
    vocab, canvas = spec.model.vocab_size, spec.capacity.canvas
    with backend:
        for name, module in backend.executor.model.named_modules():
            if isinstance(module, Linear) and QUANTIZED.search(f"{name}.weight"):
                module.register_forward_pre_hook(_amax_hook(ranges, f"{name}.weight"))
            if isinstance(module, Experts):
                module.register_forward_pre_hook(_amax_hook(ranges, f"{name}.gate_up_proj"))
                module.down_input_hook = _expert_observer(ranges, f"{name}.down_proj", module.num_experts)
        if vision:
            for name, module in backend.executor.vision_encoder().model.named_modules():
                if isinstance(module, Linear) and VISION_QUANTIZED.search(f"{name}.weight"):
                    module.register_forward_pre_hook(_amax_hook(ranges, f"{name}.weight"))
        encoded: dict[Any, Any] = {}
        for start in range(0, len(prompts), batch):
            rows = [p if isinstance(p, dict) else {"ids": p} for p in prompts[start : start + batch]]
            ids, padding, images = place_prompts(
                backend, Path(checkpoint_dir), rows, settings.pad_token_id or 0, encoded
            )
            draws = make_draws(
                "counter", seed, len(rows), vocab, canvas, row_seeds=[seed + start + i for i in range(len(rows))]
            )
            generate(backend, ids, padding, settings, draws, images)
    ranges.finalize(method)
    return ranges


def _amax_hook(ranges: Ranges, name: str) -> Any:
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if args[0].numel() == 0:  # an encoder call runs the last layer's attention and FFN on no tokens
            return
        ranges.update(name, args[0].detach().abs().reshape(-1).float().numpy())

    return hook


def _expert_observer(ranges: Ranges, name: str, experts: int) -> Any:
    def observe(act: torch.Tensor, routed: torch.Tensor, first: int) -> None:  # records only: returns no replacement
        # act [N, E', I], routed [N, E']: the slots not routed hold zeros (routing weight zero), which would only
        # dilute the sample, so the range is taken over the routed ones.
        counts = ranges.expert_tokens.setdefault(name, [0] * experts)
        for offset, seen in enumerate(routed.sum(dim=0).tolist()):
            counts[first + offset] += int(seen)
        values = act.detach()[routed].abs().reshape(-1).float().numpy()
        if values.size:
            ranges.update(name, values)

    return observe
