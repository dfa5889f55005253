"""`python -m canvasrt` and the `canvasrt` console script: the command group, or one line and exit code 2 when this
Python environment lacks a package the command line itself needs (click, numpy, rich)."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from canvasrt.cli import main as command
    except ModuleNotFoundError as exc:
        from canvasrt.core.errors import missing_module_line

        if exc.name is None or exc.name.split(".")[0] == "canvasrt":
            raise
        sys.stderr.write(f"error: {missing_module_line(exc.name)}\n")
        sys.exit(2)
    command(prog_name="canvasrt")


if __name__ == "__main__":
    main()
