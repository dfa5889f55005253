"""`canvasrt verify`: everything a checkpoint, artifact or engine directory promises, checked in full."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..core.errors import CanvasrtError
from ..core.manifest import MANIFEST, directory_problems


@click.command("verify")
@click.argument("target", type=click.Path(path_type=Path))
def verify_command(target: Path) -> None:
    """Check TARGET in full: artifacts and engines against their manifest (every file inside the directory, its size
    and sha256, the FP8 calibration), a checkpoint's weights (inside the directory, shapes, float dtypes, finite
    values). One line per problem; exit 0 when clean, 2 otherwise."""
    if (target / MANIFEST).is_file():
        kind, problems = directory_problems(target)
        checked = "every file its manifest names: inside the directory, sizes and sha256 digests"
    elif (target / "config.json").is_file():
        kind, problems, checked = (
            "checkpoint",
            _checkpoint_problems(target),
            "every weight the model reads: inside the directory, shapes, float dtypes, finite values",
        )
    else:
        raise CanvasrtError(
            f"{target} is neither an artifact or engine directory (manifest.json) nor a checkpoint "
            "(config.json); pass one of them"
        )
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(2)
    click.echo(f"{target}: {kind} verified ({checked})")


def _checkpoint_problems(target: Path) -> list[str]:
    from ..model.checkpoint import Checkpoint

    try:
        checkpoint = Checkpoint.open(target)
    except CanvasrtError as exc:
        return [str(exc)]
    return checkpoint.problems()
