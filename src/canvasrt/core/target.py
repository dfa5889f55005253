"""What a path names: a Hugging Face checkpoint, an artifact directory or an engine directory.

`open_target` is the one place that tells them apart; every command that takes a TARGET goes through it, so all of
them accept and refuse the same things with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import CanvasrtError
from .manifest import ENGINE_FORMAT, MANIFEST, ArtifactManifest, EngineManifest, manifest_format


@dataclass(frozen=True)
class CheckpointDir:
    """A Hugging Face checkpoint directory (config.json); loading it needs PyTorch (`canvasrt.model.checkpoint`)."""

    directory: Path


Target = CheckpointDir | ArtifactManifest | EngineManifest
KINDS = {CheckpointDir: "checkpoint", ArtifactManifest: "artifacts", EngineManifest: "engines"}


def open_target(path: str | Path) -> Target:
    path = Path(path)
    if not path.is_dir():
        raise CanvasrtError(f"{path} is not a directory; pass a checkpoint, artifact or engine directory")
    if (path / MANIFEST).is_file():
        if manifest_format(path) == ENGINE_FORMAT:
            return EngineManifest.load(path)
        return ArtifactManifest.load(path)
    if (path / "config.json").is_file():
        return CheckpointDir(path)
    raise CanvasrtError(
        f"{path} is neither an artifact directory nor an engine directory (manifest.json) nor a checkpoint "
        "directory (config.json)"
    )


def target_kind(target: Target) -> str:
    return KINDS[type(target)]
