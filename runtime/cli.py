"""The `canvasrt` command: one group, each stage contributing its commands.

User errors (CanvasrtError) become one line on stderr and exit code 2; parity failures exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..exporter.cli import build_command, calibrate_command, export_command, random_checkpoint_command
from ..exporter.errors import CanvasrtError
from ..serving.cli import serve_command, triton_command
from .commands import bench_command, eval_command, generate_command

out = Console(width=None if sys.stdout.isatty() else 160)


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


@main.command("parity")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--level", type=click.Choice(["step", "loop"]), default="step", show_default=True)
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="write the JSON report here")
@click.option("--junit", type=click.Path(path_type=Path), help="write a JUnit XML report here")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
@click.option("--bisect", is_flag=True, help="FP8 artifacts: rank the quantized layers by the logits error they cause")
def parity_command(
    checkpoint: Path, artifacts: Path, level: str, report_path: Path | None, junit: Path | None, seed: int,
    threads: int | None, bisect: bool,
) -> None:
    """Compare ARTIFACTS against the transformers reference built from CHECKPOINT. Exit 0 within tolerance, 1 not."""
    from .parity import loop_parity, step_parity

    if bisect:
        _bisect(checkpoint, artifacts, seed, threads, report_path)
        return

    run = step_parity if level == "step" else loop_parity
    with Console(stderr=True).status(f"running {level} parity: reference and artifacts on the same inputs"):
        report = run(checkpoint, artifacts, seed=seed, threads=threads)
    table = Table(title=f"parity --level {level} ({report.dtype})", show_lines=False)
    for column in ("stage", "output", "figures", "limits", "ok"):
        table.add_column(column)
    for check in report.checks:
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in check.metrics.items())
        limits = ", ".join(f"{k}={_fmt(v)}" for k, v in check.limits.items())
        table.add_row(check.stage, check.output, figures, limits, "[green]yes[/]" if check.passed else "[red]NO[/]")
    out.print(table)
    if level == "step" and not any(c.output == "logits" for c in report.checks):
        out.print("note: these graphs have no logits output; export with --debug-logits to check the logits directly")
    out.print(f"info: {report.info}")
    if report_path:
        report.write_json(report_path)
    if junit:
        report.write_junit(junit)
    failed = sum(not c.passed for c in report.checks)
    out.print(f"{len(report.checks) - failed} passed, {failed} failed")
    sys.exit(0 if report.passed else 1)


def _bisect(checkpoint: Path, artifacts: Path, seed: int, threads: int | None, report_path: Path | None) -> None:
    import json

    from ..calibration.bisect import bisect

    with Console(stderr=True).status("quantizing one group at a time"):
        ranking = bisect(checkpoint, artifacts, seed=seed, threads=threads)
    table = Table(title="FP8 cost per quantized group (logits against fp32, worst first)")
    for column in ("group", "nrmse", "argmax agreement"):
        table.add_column(column)
    for row in ranking:
        table.add_row(row["group"], f"{row['nrmse']:.4f}", f"{100 * row['argmax_agreement']:.1f}%")
    out.print(table)
    if report_path:
        report_path.write_text(json.dumps({"bisect": ranking}, indent=2) + "\n")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


main.add_command(random_checkpoint_command)
main.add_command(export_command)
main.add_command(build_command)
main.add_command(calibrate_command)
main.add_command(generate_command)
main.add_command(bench_command)
main.add_command(eval_command)
main.add_command(triton_command)
main.add_command(serve_command)
