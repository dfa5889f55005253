"""`canvasrt verify`: everything a checkpoint, artifact or engine directory promises, checked in full, with every
check any command that consumes the directory runs, so that a directory `verify` passes is one that every command
accepts."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..core.errors import CanvasrtError
from ..core.manifest import MANIFEST, ArtifactManifest, EngineManifest, directory_problems


@click.command("verify")
@click.argument("target", type=click.Path(path_type=Path))
def verify_command(target: Path) -> None:
    """Check TARGET in full: artifacts and engines against their manifest (every file inside the directory, its size
    and sha256, the FP8 calibration, the tokenizer fitting the model, the graph's inputs and outputs as declared,
    engines against the artifacts they were built from), a checkpoint's weights (inside the directory, shapes, float
    dtypes, finite values) and tokenizer. One line per problem; exit 0 when clean, 2 otherwise."""
    if (target / MANIFEST).is_file():
        kind, problems = directory_problems(target)
        if not problems:
            problems = _consumer_problems(target, kind)
        checked = (
            "every file its manifest names: inside the directory, sizes and sha256 digests; what every command that "
            "reads it checks"
        )
    elif (target / "config.json").is_file():
        kind, problems, checked = (
            "checkpoint",
            _checkpoint_problems(target),
            "every weight the model reads: inside the directory, shapes, float dtypes, finite values; the tokenizer",
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


def _consumer_problems(target: Path, kind: str) -> list[str]:
    """The checks of the commands that read the directory, beyond its integrity record: the tokenizer fits the
    model (generate, serve), the graph's I/O is the manifest's (ONNX Runtime), the engines belong to the artifacts
    they name (triton)."""
    from ..runtime.prompts import TextCodec

    try:
        if kind == "engines":
            engines = EngineManifest.load(target)
            found = engines.artifact_problems()
            if found:
                return found
            manifest = ArtifactManifest.load(engines.artifacts)
        else:
            manifest = ArtifactManifest.load(target)
            from ..runtime.backends.onnxruntime import checked_session

            checked_session(manifest, threads=1)
            if manifest.vision is not None:  # the vision graph's I/O and the image processor it is fed by
                from ..runtime.backends.onnxruntime import OnnxVisionEncoder
                from ..runtime.images import ImageProcessor

                OnnxVisionEncoder(manifest, "cpu", 1)
                ImageProcessor(manifest.directory)
        if "tokenizer.json" in manifest.files:
            TextCodec(manifest.directory, manifest.model.vocab_size)
    except CanvasrtError as exc:
        return [str(exc)]
    return []


def _checkpoint_problems(target: Path) -> list[str]:
    from ..model.checkpoint import Checkpoint
    from ..runtime.prompts import TextCodec

    try:
        checkpoint = Checkpoint.open(target)
        if (target / "tokenizer.json").is_file():
            TextCodec(target, checkpoint.config.vocab_size)
    except CanvasrtError as exc:
        return [str(exc)]
    return checkpoint.problems()
