"""Command-line entry points of the export stage: `canvasrt random-checkpoint` and `canvasrt export`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

err = Console(stderr=True)


def stage_progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=False)


@click.command("random-checkpoint")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "small", "bench"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def random_checkpoint_command(output: Path, preset: str, seed: int) -> None:
    """Write a random DiffusionGemma checkpoint (Hugging Face format, with tokenizer) to OUTPUT."""
    from .random_checkpoint import write_random_checkpoint

    with stage_progress() as progress:
        progress.add_task(f"writing {preset} checkpoint to {output}", total=None)
        write_random_checkpoint(output, preset=preset, seed=seed)
    click.echo(f"wrote {preset} checkpoint to {output}")


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="artifact directory to write")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--moe", type=click.Choice(["dense", "sparse"]), default="dense", show_default=True,
              help="dense: every expert on every token, static shapes; sparse: routed tokens only")
@click.option("--max-batch", type=int, default=4, show_default=True)
@click.option("--max-context", type=int, default=2048, show_default=True, help="committed tokens per request")
@click.option("--max-prefill", type=int, default=None, help="encoder tokens per call (default: --max-context)")
@click.option("--debug-logits", is_flag=True, help="also output the [batch, canvas, vocab] logits (parity work)")
@click.option("--external-data/--inline-weights", default=None,
              help="weights in <graph>.onnx.data, streamed from the checkpoint (default: above 64 MiB)")
def export_command(
    checkpoint: Path, output: Path, dtype: str, moe: str, max_batch: int, max_context: int,
    max_prefill: int | None, debug_logits: bool, external_data: bool | None,
) -> None:
    """Export CHECKPOINT's encoder and one denoising step to ONNX (encode.onnx, denoise.onnx, manifest.json)."""
    from .export import export

    start = time.perf_counter()
    with stage_progress() as progress:
        task = progress.add_task("starting", total=None)
        manifest = export(
            checkpoint, output, dtype=dtype, moe=moe, max_batch=max_batch, max_context=max_context,
            max_prefill=max_prefill, debug_logits=debug_logits, external_data=external_data,
            progress=lambda text: progress.update(task, description=text),
        )
        progress.update(task, description="done")
    sizes = {name: (output / g["file"]).stat().st_size for name, g in manifest["graphs"].items()}
    click.echo(
        f"exported {dtype} graphs to {output} in {time.perf_counter() - start:.1f}s: "
        + ", ".join(f"{n}.onnx {s / 1e6:.1f} MB" for n, s in sizes.items())
        + f"; capacity {json.dumps(manifest['capacity'])}"
    )


@click.command("build")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="engine directory to write")
@click.option("--target", default="sm89", show_default=True,
              help="sm75|sm80|sm86|sm89|sm120|sm121 (tensorrt-rtx, ahead of time) or current|sm90 (tensorrt)")
@click.option("--builder", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]), default="auto", show_default=True,
              help="auto: tensorrt where installed, else tensorrt-rtx")
@click.option("--workspace", default=None, help="builder workspace limit, e.g. 4G")
def build_command(artifacts: Path, output: Path, target: str, builder: str, workspace: str | None) -> None:
    """Build TensorRT engines (strongly typed, the manifest's optimization profiles) from ARTIFACTS."""
    from .builder import build_engines

    start = time.perf_counter()
    with stage_progress() as progress:
        task = progress.add_task("starting", total=None)
        manifest, reused = build_engines(
            artifacts, output, builder=builder, target=target, workspace=workspace,
            progress=lambda text: progress.update(task, description=text),
        )
        progress.update(task, description="done")
    key = manifest["key"]
    if reused:
        click.echo(f"{output} is up to date ({key['builder']} {key['builder_version']}, {key['target']}); nothing built")
        return
    sizes = ", ".join(f"{n}.engine {e['bytes'] / 1e6:.1f} MB" for n, e in manifest["engines"].items())
    click.echo(f"built {key['builder']} {key['builder_version']} engines for {key['target']} in "
               f"{time.perf_counter() - start:.1f}s: {sizes}")
