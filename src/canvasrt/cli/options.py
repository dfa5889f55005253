"""Integer options: the type every integer option has (`INT`, bounded to what the code it reaches can hold), and
range checks several commands share, as click callbacks.

They raise CanvasrtError rather than click's BadParameter, so a bad value is the same one line and exit code 2 as
every other user error instead of a usage screen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..core.errors import CanvasrtError

SEED_MAX = (1 << 63) - 1  # seeds travel as int64 (Triton's seed input, numpy's Philox key per row)
INT32 = (-(1 << 31), (1 << 31) - 1)


class BoundedInt(click.ParamType):
    """An integer option refused outside [low, high] before anything narrows it: Python's integers are unbounded,
    but the options end in C ints (ONNX Runtime's threads, TensorRT's profiles, Triton's config) and int64 tensors,
    where a larger value would wrap to another, valid-looking one. Every value an option means fits an int32; seeds
    take int64 (`SEED`)."""

    name = "integer"

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{value!r} is not a valid integer", param, ctx)
        if not self.low <= number <= self.high:
            option = param.opts[0] if param is not None and param.opts else "the value"
            raise CanvasrtError(f"{option} must be between {self.low} and {self.high}, got {value}")
        return number


INT = BoundedInt(*INT32)
SEED = BoundedInt(0, SEED_MAX)


def int_range(minimum: int, maximum: int | None = None) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback refusing an integer option outside [minimum, maximum]; None (unset) passes."""

    def check(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is not None and (value < minimum or (maximum is not None and value > maximum)):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise CanvasrtError(f"{param.opts[0]} must be {bounds}, got {value}")
        return value

    return check


positive = int_range(1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every command unwinds the same way (staged outputs removed, servers
    stopped) and then exits 143 where Ctrl-C exits 130."""


def terminate(signum: int, frame: object) -> None:
    raise Terminated
