"""The `canvasrt` command: one group; each module of this package holds the commands of one stage and calls that
stage's API. No stage imports this package.

User errors (CanvasrtError) become one line on stderr and exit code 2, and so do a command's bad options and
arguments (click's usage errors, which it would print as usage, hint and error on three lines), errors of the
environment (a full disk, a file-size limit, a name too long, a permission: `os_error_line`) and a dependency the
Python environment lacks (`missing_module_line`); parity failures exit
1; Ctrl-C exits 130 and SIGTERM 143, after the command has unwound (no staged output left behind).
"""

from __future__ import annotations

import signal
import sys
import threading

import click

from ..core.errors import CanvasrtError, missing_module_line, os_error_line, os_error_of
from .artifacts import build_command, calibrate_command, export_command, random_checkpoint_command, slice_command
from .options import Terminated, terminate
from .parity import parity_command
from .run import bench_command, eval_command, generate_command
from .serve import serve_command, triton_command
from .verify import verify_command


class Group(click.Group):
    def invoke(self, ctx: click.Context):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
        try:
            return super().invoke(ctx)
        except CanvasrtError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] == "canvasrt":
                raise
            click.echo(f"error: {missing_module_line(exc.name)}", err=True)
            sys.exit(2)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"error: {path}: {exc.format_message().rstrip('.')}; see `{path} --help`", err=True)
            sys.exit(2)
        except Terminated:
            click.echo("terminated (SIGTERM)", err=True)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # after click's own errors: the environment's (disk full, limits, paths) is one line
            cause = os_error_of(exc)
            if cause is None:
                raise
            click.echo(f"error: {os_error_line(cause)}", err=True)
            sys.exit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=Group, name="canvasrt")
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
