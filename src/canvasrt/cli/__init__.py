"""The `canvasrt` command: one group; each module of this package holds the commands of one stage and calls that
stage's API. No stage imports this package.

User errors (CanvasrtError) become one line on stderr and exit code 2; parity failures exit 1.
"""

from __future__ import annotations

import sys

import click

from ..core.errors import CanvasrtError
from .artifacts import build_command, calibrate_command, export_command, random_checkpoint_command, slice_command
from .parity import parity_command
from .run import bench_command, eval_command, generate_command
from .serve import serve_command, triton_command
from .verify import verify_command


class Group(click.Group):
    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click API
        try:
            return super().invoke(ctx)
        except CanvasrtError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="canvasrt")
def main() -> None:
    """canvasrt: export, quantize, build and run DiffusionGemma block-diffusion models."""


main.add_command(random_checkpoint_command)
main.add_command(slice_command)
main.add_command(export_command)
main.add_command(calibrate_command)
main.add_command(build_command)
main.add_command(generate_command)
main.add_command(bench_command)
main.add_command(eval_command)
main.add_command(parity_command)
main.add_command(triton_command)
main.add_command(serve_command)
main.add_command(verify_command)
