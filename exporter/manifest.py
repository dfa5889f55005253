"""manifest.json: the contract between export, calibration, build, runtime and Triton.

A stage learns everything about an artifact directory from this file: the model geometry, the capacities, each
graph's file, digest and I/O, the dtype, the generation defaults and the tokenizer. Reading it needs only the
standard library, so the runtime's ONNX Runtime path and the Triton model can use it without PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT = "canvasrt-artifacts"
# Bump on any change to graph I/O or buffer layout; readers refuse other versions instead of misreading them.
FORMAT_VERSION = 1
GRAPHS = ("encode", "denoise")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def prefill_limit(max_prefill: int, max_context: int, canvas: int) -> int:
    """Encoder tokens per call: within the context, yet a whole canvas, since a commit is one call over a canvas."""
    return max(min(max_prefill, max_context), canvas)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Loads and checks an artifact directory's manifest; every failure is a one-line ArtifactError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory; pass the output directory of `canvasrt export`")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}; it is not a canvasrt artifact directory (run `canvasrt export`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc.msg}); re-run `canvasrt export`") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a canvasrt manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} was written by canvasrt {manifest.get('canvasrt_version', '?')} (artifact format "
            f"{manifest.get('format_version')}), this canvasrt reads format {FORMAT_VERSION}; re-export it"
        )
    for graph in GRAPHS:
        entry = manifest.get("graphs", {}).get(graph)
        if entry is None or not (directory / entry["file"]).is_file():
            raise ArtifactError(f"{directory} lacks the {graph} graph named in its manifest; re-run `canvasrt export`")
    return manifest


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def staged_directory(final: str | Path, marker: str = MANIFEST) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces `final` only if the block succeeds.

    An existing `final` is replaced only when it is empty or holds `marker` (a previous output of the same kind),
    so a typo cannot wipe an unrelated directory; on failure nothing at `final` changes.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ArtifactError(f"{final} exists and is not a directory; choose another output path")
    if final.is_dir() and any(final.iterdir()) and not (final / marker).is_file():
        raise ArtifactError(f"{final} exists, is not empty and holds no {marker}; choose an empty or new path")
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp creates 0700; the result should look like any other directory
    except OSError as exc:
        raise ArtifactError(f"cannot write to {parent} ({exc.strerror}); choose a writable output directory") from None
    try:
        yield staging
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=parent))
            os.replace(final, retired / "previous")
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
