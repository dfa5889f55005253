"""`canvasrt parity`: the report table, JSON and JUnit files, and the exit code CI gates on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..core.errors import CanvasrtError
from .options import INT, SEED, positive

out = Console(width=None if sys.stdout.isatty() else 160)


@click.command("parity")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--level", type=click.Choice(["step", "loop"]), default="step", show_default=True)
@click.option(
    "--backend",
    default=None,
    help="torch (FP8 artifacts: simulated with their scales), onnxruntime or tensorrt; default: by TARGET",
)
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="write the JSON report here")
@click.option("--junit", type=click.Path(path_type=Path), help="write a JUnit XML report here")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--threads", type=INT, default=None, callback=positive, help="CPU threads for torch and ONNX Runtime")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="where the reference and the torch backends run",
)
@click.option(
    "--reference-dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="dtype of the reference and the torch backends (tolerances assume fp32)",
)
@click.option(
    "--max-new-tokens",
    type=INT,
    default=None,
    callback=positive,
    help="--level loop: tokens each row generates, rounded up to whole canvases (default: two canvases "
    "where the context allows, else one)",
)
@click.option(
    "--bisect",
    is_flag=True,
    help="FP8 artifacts: rank the quantized layers by the logits error they cause (with --image: on an image "
    "prompt, the vision graph's layers too where it is quantized)",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="build the prompts around this image (repeatable): the vision graph, its soft tokens in the prefill",
)
def parity_command(
    checkpoint: Path,
    target: Path,
    level: str,
    backend: str | None,
    report_path: Path | None,
    junit: Path | None,
    seed: int,
    threads: int | None,
    device: str,
    reference_dtype: str,
    max_new_tokens: int | None,
    bisect: bool,
    images: tuple[Path, ...],
) -> None:
    """Compare TARGET (artifacts or engines) against the transformers reference built from CHECKPOINT.
    Exit 0 within tolerance, 1 not."""
    from ..validation.parity import parity

    # Refused before the check runs: a report that cannot be written must not turn into exit code 1 after it
    _check_report_path(report_path, "--report")
    _check_report_path(junit, "--junit")
    if max_new_tokens is not None and level != "loop":
        raise CanvasrtError("--max-new-tokens sets what the loop level generates; add --level loop or leave it out")
    if bisect:
        _bisect(checkpoint, target, seed, threads, report_path, list(images))
        return

    with Console(stderr=True).status(f"running {level} parity: the reference, then {target}, on the same inputs"):
        report = parity(
            checkpoint,
            target,
            level,
            backend,
            seed=seed,
            threads=threads,
            max_new_tokens=max_new_tokens,
            device=device,
            reference_dtype=reference_dtype,
            images=list(images),
        )
    table = Table(title=f"parity --level {level} ({report.backend}, {report.dtype})", show_lines=False)
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


def _bisect(
    checkpoint: Path, artifacts: Path, seed: int, threads: int | None, report_path: Path | None, images: list[Path]
) -> None:
    import json

    from ..calibration.bisect import bisect

    with Console(stderr=True).status("quantizing one group at a time"):
        result = bisect(checkpoint, artifacts, seed=seed, threads=threads, images=images)
    ranking, vision = result["bisect"], result.get("vision")
    quantized_vision = bool(vision and vision["quantized"])
    table = Table(title="FP8 cost per quantized group (logits against fp32, worst first)")
    for column in ("group", "nrmse", "argmax agreement") + (("soft tokens nrmse",) if quantized_vision else ()):
        table.add_column(column)
    for row in ranking:
        cells = [row["group"], f"{row['nrmse']:.4f}", f"{100 * row['argmax_agreement']:.1f}%"]
        if quantized_vision:
            cells.append(f"{row['soft_tokens_nrmse']:.4f}" if "soft_tokens_nrmse" in row else "-")
        table.add_row(*cells)
    out.print(table)
    if vision and not vision["quantized"]:
        out.print(
            "note: the vision graph is not quantized (it keeps the export dtype); every group was scored on a prompt "
            "with the images. `canvasrt calibrate --quantize-vision` puts it in FP8 and its layers in this ranking"
        )
    if report_path:
        report_path.write_text(json.dumps(result, indent=2) + "\n")


def _check_report_path(path: Path | None, option: str) -> None:
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CanvasrtError(f"{option} {path} is a directory; name the report file to write")
    if not folder.is_dir():
        raise CanvasrtError(
            f"{option} {path}: the folder {folder} does not exist; create it or write the report elsewhere"
        )
    if not os.access(folder, os.W_OK):
        raise CanvasrtError(f"{option} {path}: the folder {folder} is not writable; write the report elsewhere")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
