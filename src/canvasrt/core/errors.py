"""User-facing errors. The CLI turns any `CanvasrtError`, an operating-system error of the environment (`os_error_line`)
and a missing dependency (`missing_module_line`) into one line on stderr and exit code 2."""

from __future__ import annotations

import errno
import os
import re
import sys


class CanvasrtError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class CheckpointError(CanvasrtError):
    """A checkpoint directory that cannot be loaded as DiffusionGemma."""


class ArtifactError(CanvasrtError):
    """An artifact directory (graphs plus manifest) that is missing, incomplete or incompatible."""


# What to do about an operating-system error the user's environment causes (a full disk, a limit, a path, a
# permission): a one-line CLI error instead of a traceback.
_OS_FIXES = {
    errno.ENOSPC: "the file system is full; free space on it or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free space or write elsewhere",
    errno.EFBIG: "a file grew past the file-size limit (`ulimit -f`) or the file system's largest file; raise the "
    "limit or write elsewhere",
    errno.ENAMETOOLONG: "a file name or path is too long for the file system; use a shorter one",
    errno.EACCES: "permission denied; give the user running canvasrt access to it, or use another path",
    errno.EPERM: "operation not permitted; give the user running canvasrt access to it, or use another path",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENOENT: "no such file or directory; check the path",
    errno.ENOTDIR: "a part of the path is not a directory; check the path",
    errno.EISDIR: "it is a directory where a file is needed; pass a file",
    errno.ELOOP: "too many levels of symbolic links; check the path",
    errno.EIO: "input/output error; check the device",
}


_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system error: the path (shortened when it is very long), what happened and the
    fix."""
    fix = _OS_FIXES.get(exc.errno or 0, exc.strerror or str(exc))
    path = exc.filename
    if path is None or exc.errno in _WRITES:  # a copy's error names its source, not the file system that is full
        return f"{fix} ({exc.strerror})" if exc.strerror and exc.errno in _WRITES else fix
    shown = str(path if not isinstance(path, bytes) else os.fsdecode(path))
    if len(shown) > 160:
        shown = f"{shown[:80]}...{shown[-40:]} ({len(shown)} characters)"
    return f"{shown}: {fix}"


def os_error_of(exc: BaseException) -> OSError | None:
    """The operating-system error behind an exception: itself, its cause or context, or one a native library
    wrapped in its own exception type with the OS's code in its text (safetensors: "... (os error 28)")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        match = re.search(r"\(os error (\d+)\)", str(seen))
        if match:
            code = int(match[1])
            return OSError(code, os.strerror(code))
        seen = seen.__cause__ or seen.__context__
    return None


def missing_module_line(name: str) -> str:
    """One line for a dependency this Python environment lacks (a command run from the serving environment, which
    holds only what the Triton models import)."""
    return (
        f"this command needs the Python package {name}, which {sys.prefix} lacks; run canvasrt from the environment "
        "made by scripts/setup.sh (.venv) or install canvasrt there with its dependencies (`pip install canvasrt`)"
    )
