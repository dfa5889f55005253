"""Range checks for the integer options several commands share, as click callbacks.

They raise CanvasrtError rather than click's BadParameter, so a bad value is the same one line and exit code 2 as
every other user error instead of a usage screen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..core.errors import CanvasrtError

SEED_MAX = (1 << 63) - 1  # seeds travel as int64 (Triton's seed input, numpy's Philox key per row)


def int_range(minimum: int, maximum: int | None = None) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback refusing an integer option outside [minimum, maximum]; None (unset) passes."""

    def check(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is not None and (value < minimum or (maximum is not None and value > maximum)):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise CanvasrtError(f"{param.opts[0]} must be {bounds}, got {value}")
        return value

    return check


seed_range = int_range(0, SEED_MAX)
positive = int_range(1)
