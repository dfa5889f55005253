"""Generation settings, resolved the way transformers' DiffusionGemma generate() resolves them.

Order: explicit overrides > the checkpoint's generation_config.json > transformers' built-in defaults
(`DiffusionGemmaGenerationConfig._get_default_generation_params`, copied here because the runtime must not need
transformers).

`GenerationSettings.validate` is the one check of a request's settings, for the CLI and Triton alike: integers
within their bounds, floats finite in float32 (the dtype the step takes them in; 1e39 would arrive as infinity and
turn every temperature into padding). The context capacity bounds max_new_tokens with the prompt
(`loop.check_request`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from ..core.errors import CanvasrtError

DEFAULTS = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}
# Far above the released config's 48; a request may not hold an instance for millions of steps. Also bounds the
# stability window, whose history the loop keeps per step.
MAX_DENOISING_STEPS = 1024
FLOAT32_MAX = 3.4028234663852886e38


def cli_option(name: str) -> str:
    """A setting as the command line spells it: --max-new-tokens."""
    return f"--{name.replace('_', '-')}"


def served_input(name: str) -> str:
    """A setting as a served request spells it: the input max_new_tokens."""
    return f"the input {name}"


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    def temperature(self, remaining: int) -> float:
        """Linear schedule over the remaining-step counter t = N..1: t_max at the first step."""
        return self.t_min + (self.t_max - self.t_min) * (remaining / self.max_denoising_steps)

    def validate(self, spell: Callable[[str], str] = cli_option) -> GenerationSettings:
        """Refuses a setting out of its range, naming it as `spell` does: a command-line option (`cli_option`)
        or a served request's input (`served_input`)."""
        for name in ("max_new_tokens", "max_denoising_steps", "stability_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise CanvasrtError(f"{spell(name)} must be an integer (got {value!r})")
        for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not _finite32(value):
                raise CanvasrtError(f"{spell(name)} must be a finite number (at most {FLOAT32_MAX:.3g}), got {value!r}")
        steps = self.max_denoising_steps
        checks = [
            (self.max_new_tokens > 0, f"{spell('max_new_tokens')} must be positive (got {self.max_new_tokens})"),
            (
                0 < steps <= MAX_DENOISING_STEPS,
                f"{spell('max_denoising_steps')} must be between 1 and {MAX_DENOISING_STEPS} (got {steps})",
            ),
            (self.entropy_bound > 0, f"{spell('entropy_bound')} must be positive (got {self.entropy_bound})"),
            (
                0 <= self.t_min < self.t_max,
                f"need 0 <= {spell('t_min')} < {spell('t_max')} (got {self.t_min}, {self.t_max})",
            ),
            (
                0 <= self.stability_threshold <= MAX_DENOISING_STEPS,
                f"{spell('stability_threshold')} must be between 0 and {MAX_DENOISING_STEPS} "
                f"(got {self.stability_threshold})",
            ),
            (
                self.confidence_threshold > 0,
                f"{spell('confidence_threshold')} must be positive (got {self.confidence_threshold})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise CanvasrtError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _finite32(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def resolve_settings(
    generation_config: dict[str, Any], overrides: dict[str, Any] | None = None, spell: Callable[[str], str] = cli_option
) -> GenerationSettings:
    """generation_config: the parsed generation_config.json (may be empty). overrides: non-None values win. spell:
    how errors name a setting (`cli_option`, `served_input`)."""
    values = dict(DEFAULTS)
    for key in DEFAULTS:
        if generation_config.get(key) is not None:
            values[key] = generation_config[key]
    sampler = generation_config.get("sampler_config") or {}
    if sampler.get("entropy_bound") is not None:
        values["entropy_bound"] = sampler["entropy_bound"]
    eos = generation_config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    settings = GenerationSettings(
        **values, eos_token_ids=tuple(int(e) for e in eos_ids), pad_token_id=generation_config.get("pad_token_id")
    )
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    return replace(settings, **changes).validate(spell)
