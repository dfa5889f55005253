"""Output directories written whole or not at all: staging, the swap into place, and what may be replaced.

Every command that writes a directory (export, calibrate, build, triton, random-checkpoint, slice) writes it into a
staging sibling named after the writing process and swaps it in only when the work succeeded, so an interrupted
run leaves nothing half-written at the output path. Before the work starts, the output path is checked: only an
empty directory or an earlier output of the same kind is replaced, never one of the command's inputs.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError
from .manifest import ENGINE_FORMAT, FORMAT, manifest_format


def _staging_prefix(name: str, pid: int | None = None) -> str:
    """`.<name>.<host>-<pid>.`: a staging directory names the process that writes it, so a later run can tell a
    killed run's leftovers from a live run's work."""
    return f".{name}.{socket.gethostname()}-{os.getpid() if pid is None else pid}."


def remove_stale_staging(parent: Path, name: str) -> None:
    """Removes the staging (`.partial`) siblings of `name` that a process of this host left behind when it was killed
    (SIGKILL, power loss): their pid is gone. A live process's are never touched; those of another host (a shared
    file system) neither, since their pid means nothing here. (A `.old` sibling may hold the only copy of a previous
    output, so it stays.)"""
    pattern = re.compile(re.escape(f".{name}.{socket.gethostname()}-") + r"(\d+)\..*\.partial")
    for entry in parent.glob(f".{glob.escape(name)}.*"):
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match[1])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@dataclass(frozen=True)
class OutputKind:
    """What a command writes, and how to recognise an earlier output of it: the only non-empty directory the
    command may replace."""

    name: str  # "an artifact directory"
    commands: str  # the commands that write it, for the message
    holds: Callable[[Path], bool]


ARTIFACT_OUTPUT = OutputKind(
    "an artifact directory",
    "`canvasrt export` and `canvasrt calibrate`",
    lambda directory: manifest_format(directory) == FORMAT,
)
ENGINE_OUTPUT = OutputKind(
    "an engine directory", "`canvasrt build`", lambda directory: manifest_format(directory) == ENGINE_FORMAT
)


def _holding(directory: Path) -> str:
    kind = manifest_format(directory)
    if kind == FORMAT:
        return "canvasrt artifacts"
    if kind == ENGINE_FORMAT:
        return "canvasrt engines"
    if (directory / "config.json").is_file():
        return "a checkpoint (config.json)"
    return "files of another kind"


def check_output(final: str | Path, kind: OutputKind, inputs: Sequence[str | Path] = ()) -> None:
    """Refuses an output path the command must not replace: a file, one of its own inputs (the same directory,
    one inside it or one holding it, links resolved), or a non-empty directory that is not an earlier output of
    the same kind. Writers call it before their work starts; `staged_directory` calls it again."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ArtifactError(f"{final} exists and is not a directory; choose another output path")
    resolved = final.resolve()
    for source in inputs:
        origin = Path(source).resolve()
        relation = (
            "is"
            if resolved == origin
            else "lies inside"
            if resolved.is_relative_to(origin)
            else "contains"
            if origin.is_relative_to(resolved)
            else None
        )
        if relation:
            raise ArtifactError(
                f"the output {final} {relation} the input {source}, which writing it would replace "
                "or change; choose an output path outside the input"
            )
    if final.is_dir() and any(final.iterdir()) and not kind.holds(final):
        raise ArtifactError(
            f"{final} is not empty and holds {_holding(final)}, not {kind.name}: only {kind.name} "
            f"(from {kind.commands}) is replaced; choose a new or empty output path, or remove "
            f"{final} yourself"
        )


@contextmanager
def staged_directory(final: str | Path, kind: OutputKind, inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces `final` only if the block succeeds.

    An existing `final` is replaced only when it is empty or an earlier output of `kind`, and never when it is one
    of `inputs` or overlaps one (`check_output`), so a typo cannot wipe an unrelated directory or the command's own
    source; on failure nothing at `final` changes.
    """
    final = Path(final)
    check_output(final, kind, inputs)
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(parent, final.name)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(final.name), suffix=".partial", dir=parent))
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
