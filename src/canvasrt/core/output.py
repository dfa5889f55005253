"""Output directories written whole or not at all: staging, the swap into place, and what may be replaced.

Every command that writes a directory (export, calibrate, build, triton, random-checkpoint, slice) writes it into a
staging sibling named after the writing process and swaps it in only when the work succeeded, so an interrupted
run leaves nothing half-written at the output path. Before the work starts, the output path is checked: only an
empty directory or an earlier output of the same kind is replaced, never one of the command's inputs. When the result
is swapped in, what is at the path then is checked again, atomically where the OS allows, so that nothing put there
while the command ran is removed.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError
from .manifest import ENGINE_FORMAT, FORMAT, manifest_format


def _stem(name: str) -> str:
    """The output's name as its siblings (staging, retired) carry it: a long name is shortened to a digest so that
    the sibling's name stays within the file system's limit whenever the output's own name does."""
    return name if len(os.fsencode(name)) <= 64 else hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def staging_prefix(name: str, pid: int | None = None) -> str:
    """`.<name>.<host>-<pid>.`: a staging directory names the process that writes it, so a later run can tell a
    killed run's leftovers from a live run's work."""
    return f".{_stem(name)}.{socket.gethostname()}-{os.getpid() if pid is None else pid}."


def remove_stale_staging(parent: Path, name: str) -> None:
    """Removes the staging (`.partial`) siblings of `name` that a process of this host left behind when it was killed
    (SIGKILL, power loss): their pid is gone. A live process's are never touched; those of another host (a shared
    file system) neither, since their pid means nothing here. (A `.old` sibling may hold the only copy of a previous
    output, so it stays.)"""
    pattern = re.compile(re.escape(f".{_stem(name)}.{socket.gethostname()}-") + r"(\d+)\..*\.partial")
    for entry in parent.glob(f".{glob.escape(_stem(name))}.*"):
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


RENAME_NOREPLACE = 1  # <linux/fs.h>
AT_FDCWD = -100


def _renameat2() -> Callable[..., int] | None:
    """Linux's renameat2, for a rename that fails instead of replacing; None where libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return function


_RENAMEAT2 = _renameat2()


def rename_no_replace(source: Path, destination: Path) -> None:
    """Renames `source` to `destination`, raising FileExistsError when anything is at `destination`, atomically
    where the OS allows (renameat2 RENAME_NOREPLACE); elsewhere the check and the rename are two calls."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(destination), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):  # a file system without RENAME_NOREPLACE: the fallback below
            raise OSError(code, os.strerror(code), str(destination))
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination))
    os.rename(source, destination)


def _changed_during_the_run(final: Path, kind: OutputKind) -> ArtifactError:
    return ArtifactError(
        f"{final} changed while this command ran and now holds {_holding(final)}, not {kind.name}: only {kind.name} "
        f"(from {kind.commands}) is replaced; nothing was written, run the command again with a new or empty "
        "output path"
    )


def _swap_in(staging: Path, final: Path, kind: OutputKind) -> None:
    """Moves `staging` to `final`, checking what is at `final` again at this moment: nothing (a rename that never
    replaces), an empty directory (removed by rmdir, which fails on anything put in it meanwhile) or an earlier
    output of `kind`, which is first moved aside and checked where nobody else writes, then removed. Anything else,
    a file or directory put at `final` while the command ran, is refused and left as it is."""
    parent = final.parent
    for _attempt in range(3):
        try:
            rename_no_replace(staging, final)
            return
        except FileExistsError:
            pass
        if final.is_symlink() or not final.is_dir():
            raise _changed_during_the_run(final, kind)
        try:
            final.rmdir()
            continue
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not kind.holds(final):
            raise _changed_during_the_run(final, kind)
        retired = Path(tempfile.mkdtemp(prefix=f".{_stem(final.name)}.", suffix=".old", dir=parent))
        previous = retired / "previous"
        os.rename(final, previous)
        if not kind.holds(previous):  # replaced between the check and the move: put it back
            try:
                rename_no_replace(previous, final)
            except OSError:
                raise ArtifactError(
                    f"{final} changed while this command ran; what was there is now at {previous}, and nothing "
                    "was written: move it back and run the command again"
                ) from None
            shutil.rmtree(retired, ignore_errors=True)
            raise _changed_during_the_run(final, kind)
        try:
            rename_no_replace(staging, final)
        except FileExistsError:
            raise ArtifactError(
                f"{final} was created again while this command swapped its output in; the earlier output is at "
                f"{previous} and nothing was written: run the command again"
            ) from None
        shutil.rmtree(retired, ignore_errors=True)
        return
    raise _changed_during_the_run(final, kind)


def _as_umask_allows(staging: Path, umask: int) -> None:
    """Gives every file of the output the permissions the umask allows, as `cp` or a plain open would: writers that
    write through a temporary file (transformers' save_pretrained, say) leave it 0600, unreadable to the group that
    serves it."""
    for path in staging.rglob("*"):
        if path.is_file() and not path.is_symlink():
            executable = path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~umask)


def output_path(final: str | Path) -> Path:
    """The directory an output path names: a symbolic link's target (so that the link stays and points at the new
    output), else the path itself."""
    final = Path(final)
    return Path(os.path.realpath(final)) if final.is_symlink() else final


@contextmanager
def staged_directory(final: str | Path, kind: OutputKind, inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces `final` only if the block succeeds.

    An existing `final` is replaced only when it is empty or an earlier output of `kind`, and never when it is one
    of `inputs` or overlaps one (`check_output`); it is checked when the block starts and again, atomically, when
    the result is swapped in (`_swap_in`), so a directory put at `final` while the command ran is never removed. On
    failure nothing at `final` changes. A symbolic link at `final` stays: the output goes where it points.
    """
    final = output_path(final)
    check_output(final, kind, inputs)
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(parent, final.name)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(final.name), suffix=".partial", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp creates 0700; the result should look like any other directory
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise ArtifactError(
                f"the output path {final} is too long for the file system ({exc.strerror}); choose a shorter name"
            ) from None
        raise ArtifactError(f"cannot write to {parent} ({exc.strerror}); choose a writable output directory") from None
    try:
        yield staging
        _as_umask_allows(staging, umask)
        _swap_in(staging, final, kind)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
