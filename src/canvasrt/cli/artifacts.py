"""The commands that write artifacts: `canvasrt random-checkpoint`, `export`, `calibrate` and `build`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..core.contract import DEFAULT_VOCAB_CHUNK
from .options import INT, SEED

if TYPE_CHECKING:
    from ..builder.engines import Phase

err = Console(stderr=True)
STAGE_COLUMNS = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())


@contextmanager
def stage_progress(*columns: ProgressColumn) -> Iterator[Progress]:
    """A stage's spinner (default columns) on stderr, kept when the stage completes. A failing stage's display is
    cleared instead, so that the error line printed next is the last line and stands alone, not after a frozen
    spinner (a log shows the spinner's last frame; a terminal the line redrawn once more)."""
    progress = Progress(*(columns or STAGE_COLUMNS), console=err, transient=False)
    progress.start()
    try:
        yield progress
    except BaseException:  # Ctrl-C and SIGTERM too: "interrupted" is the last line as well
        progress.live.transient = True
        progress.live.stop()  # not progress.stop(), which ends a log's last frame with a line break, here a blank line
        raise
    progress.stop()


@click.command("random-checkpoint")
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--preset",
    type=click.Choice(["tiny", "small", "bench", "released"]),
    default="tiny",
    show_default=True,
    help="released: the 26B-A4B's exact layer shapes, bf16 (use --layers: 2 layers are 4.8 GB)",
)
@click.option("--layers", type=INT, default=None, help="number of layers (default: the preset's; released: 30)")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option(
    "--max-positions",
    type=INT,
    default=None,
    help="max_position_embeddings, the longest context the model allows (default: the preset's)",
)
@click.option(
    "--vision",
    type=click.Choice(["tiny", "released"]),
    default=None,
    help="the vision tower's shapes (default: released for --preset released, else tiny)",
)
def random_checkpoint_command(
    output: Path, preset: str, layers: int | None, seed: int, max_positions: int | None, vision: str | None
) -> None:
    """Write a random DiffusionGemma checkpoint (Hugging Face format, with tokenizer and image processor) to
    OUTPUT."""
    from ..model.random_checkpoint import write_random_checkpoint

    with stage_progress() as progress:
        progress.add_task(f"writing {preset} checkpoint to {output}", total=None)
        write_random_checkpoint(
            output, preset=preset, seed=seed, layers=layers, max_positions=max_positions, vision=vision
        )
    click.echo(f"wrote {preset} checkpoint to {output}")


@click.command("slice")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--layers", required=True, help="comma-separated layer indices to keep, in order, e.g. 0,5")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="checkpoint directory to write")
def slice_command(checkpoint: Path, layers: str, output: Path) -> None:
    """Write a checkpoint of a few of CHECKPOINT's layers, real weights kept (few-layer numeric validation)."""
    from ..core.errors import CheckpointError
    from ..model.slicing import slice_checkpoint

    try:
        indices = [int(part) for part in layers.split(",")]
    except ValueError:
        raise CheckpointError(f"--layers {layers!r} is not a comma-separated list of layer indices, e.g. 0,5") from None
    with stage_progress() as progress:
        progress.add_task(f"slicing layers {layers} of {checkpoint}", total=None)
        written = slice_checkpoint(checkpoint, indices, output)
    click.echo(f"wrote layers {layers} of {checkpoint} to {output} ({written / 1e9:.2f} GB of tensors)")


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="artifact directory to write")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option(
    "--moe",
    type=click.Choice(["dense", "sparse", "grouped"]),
    default="dense",
    show_default=True,
    help="dense: every expert on every token, static shapes; sparse: routed tokens only, a branch per "
    "expert; grouped: routed tokens gathered per expert, one branch (ONNX Runtime)",
)
@click.option("--max-batch", type=INT, default=4, show_default=True)
@click.option("--max-context", type=INT, default=2048, show_default=True, help="committed tokens per request")
@click.option("--max-prefill", type=INT, default=None, help="encoder tokens per call (default: --max-context)")
@click.option("--debug-logits", is_flag=True, help="also output the [batch, canvas, vocab] logits (parity work)")
@click.option(
    "--vocab-chunk",
    type=INT,
    default=DEFAULT_VOCAB_CHUNK,
    show_default=True,
    help="vocabulary entries per chunk of the LM head and sampler: working memory per row grows with it; the "
    "vocabulary size or more computes them whole",
)
@click.option(
    "--external-data/--inline-weights",
    default=None,
    help="weights in <graph>.onnx.data, streamed from the checkpoint (default: above 64 MiB)",
)
@click.option(
    "--vision", is_flag=True, help="also the vision graph (vision.onnx), for image prompts (generate --image)"
)
def export_command(
    checkpoint: Path,
    output: Path,
    dtype: str,
    moe: str,
    max_batch: int,
    max_context: int,
    max_prefill: int | None,
    debug_logits: bool,
    vocab_chunk: int,
    external_data: bool | None,
    vision: bool,
) -> None:
    """Export CHECKPOINT's backbone (prefill, commit and one denoising step, one copy of the weights) to ONNX
    (backbone.onnx, manifest.json)."""
    from ..exporter.export import export

    start = time.perf_counter()
    with stage_progress() as progress:
        task = progress.add_task("starting", total=None)
        manifest = export(
            checkpoint,
            output,
            dtype=dtype,
            moe=moe,
            max_batch=max_batch,
            max_context=max_context,
            max_prefill=max_prefill,
            debug_logits=debug_logits,
            external_data=external_data,
            vocab_chunk=vocab_chunk,
            progress=lambda text: progress.update(task, description=text),
            vision=vision,
        )
        progress.update(task, description="done")
    sizes = ", ".join(
        f"{g.file} {(g.bytes + (g.data_bytes or 0)) / 1e6:.1f} MB"
        + (f" (weights in {g.data_file})" if g.data_file else "")
        for g in manifest.graphs.values()
    )
    click.echo(
        f"exported {dtype} graph to {output} in {time.perf_counter() - start:.1f}s: {sizes}"
        + f"; capacity {json.dumps(manifest.capacity.to_dict())}"
    )


@click.command("build")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="engine directory to write")
@click.option(
    "--target",
    default="sm89",
    show_default=True,
    help="sm75|sm80|sm86|sm89|sm120|sm121 (tensorrt-rtx, ahead of time) or current|sm90 (tensorrt)",
)
@click.option(
    "--builder",
    type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]),
    default="auto",
    show_default=True,
    help="auto: tensorrt where installed, else tensorrt-rtx",
)
@click.option("--max-batch", type=INT, default=None, help="largest batch the engines take (default: the artifacts')")
@click.option(
    "--max-context",
    type=INT,
    default=None,
    help="committed tokens per request (default: the artifacts'); also bounds the prefill chunk",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    default=None,
    help="tactic timing cache file: loaded if present, updated after the build (--builder tensorrt)",
)
@click.option("--workspace", default=None, help="builder workspace limit, e.g. 4G")
def build_command(
    artifacts: Path,
    output: Path,
    target: str,
    builder: str,
    max_batch: int | None,
    max_context: int | None,
    timing_cache: Path | None,
    workspace: str | None,
) -> None:
    """Build TensorRT engines (strongly typed, the manifest's optimization profiles) from ARTIFACTS."""
    from rich.progress import BarColumn

    from ..builder.engines import build_engines

    start = time.perf_counter()
    # stage_progress's columns plus a bar and a step count: TensorRT's progress monitor knows each phase's length.
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TimeElapsedColumn(),
    )
    with stage_progress(*columns) as progress:
        task = progress.add_task("starting", total=None, steps="")
        manifest, reused = build_engines(
            artifacts,
            output,
            builder=builder,
            target=target,
            workspace=workspace,
            max_batch=max_batch,
            max_context=max_context,
            timing_cache=timing_cache,
            progress=lambda text: progress.update(task, description=text),
            phases=_phase_bars(progress),
        )
        progress.update(task, description="done")
    key = manifest.key
    if reused:
        click.echo(f"{output} is up to date ({key.builder} {key.builder_version}, {key.target}); nothing built")
        return
    sizes = ", ".join(
        f"{n}.engine {e.bytes / 1e6:.1f} MB" + _gemms(e.gemms) + _activation(e.device_memory)
        for n, e in manifest.engines.items()
    )
    click.echo(
        f"built {key.builder} {key.builder_version} engines for {key.target} in "
        f"{time.perf_counter() - start:.1f}s (batch up to {key.max_batch}, context {key.max_context}): "
        f"{sizes}"
    )


def _phase_bars(progress: Progress) -> Callable[[tuple[Phase, ...]], None]:
    """What `build_engines` calls with the stack of open TensorRT build phases: one bar per open phase, nested phases
    indented under their parent, bars of finished phases removed."""
    from rich.progress import TaskID

    bars: list[TaskID] = []

    def show(phases: tuple[Phase, ...]) -> None:
        while len(bars) > len(phases):
            progress.remove_task(bars.pop())
        for depth, phase in enumerate(phases):
            name, steps = "  " * (depth + 1) + phase.name, f"{phase.done}/{phase.steps}"
            if depth < len(bars):
                progress.update(bars[depth], description=name, completed=phase.done, total=phase.steps, steps=steps)
            else:  # added complete: the refresh thread may draw it before any update
                bars.append(progress.add_task(name, completed=phase.done, total=phase.steps, steps=steps))

    return show


def _activation(memory: dict[str, Any] | None) -> str:
    if not memory:
        return ""
    return f", device activation memory {memory['largest_activation_bytes'] / 1e6:.1f} MB ({memory['largest_profile']})"


def _gemms(profiles: dict[str, dict[str, int]] | None) -> str:
    phases = {phase: counts for phase, counts in (profiles or {}).items() if counts}  # a graph may have none
    if not phases:
        return ""
    return (
        " (GEMMs: "
        + "; ".join(
            f"{phase} " + ", ".join(f"{n} {dtype}" for dtype, n in counts.items()) for phase, counts in phases.items()
        )
        + ")"
    )


@click.command("calibrate")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="FP8 artifact directory to write")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    help='JSONL calibration prompts ({"text"} or {"ids"}, each with optional "images": [files])',
)
@click.option("--task", default=None, help="calibrate on a synthetic task's calibration split (e.g. sort)")
@click.option("--samples", type=INT, default=64, show_default=True)
@click.option(
    "--method",
    type=click.Choice(["max", "percentile", "mse"]),
    default="max",
    show_default=True,
    help="activation range: running max, 99.99th percentile of |x|, or the clip that minimises FP8 MSE",
)
@click.option("--weights", type=click.Choice(["per-channel", "per-tensor"]), default="per-channel", show_default=True)
@click.option(
    "--exclude", multiple=True, help="regex of GEMM weights to keep unquantized (repeatable), e.g. 'layers\\.1\\.'"
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="where the calibration loop (the torch backend, sparse MoE) runs",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="the calibration loop's dtype (bf16 halves its memory for the released model)",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="an image for every calibration prompt (repeatable; needs a --vision export): its soft tokens go through "
    "the prefill as at runtime",
)
@click.option(
    "--quantize-vision",
    is_flag=True,
    help="the vision graph's GEMMs in FP8 too, calibrated on the images (default: it keeps the export dtype)",
)
def calibrate_command(
    checkpoint: Path,
    artifacts: Path,
    output: Path,
    prompts_file: Path | None,
    task: str | None,
    samples: int,
    method: str,
    weights: str,
    exclude: tuple[str, ...],
    device: str,
    dtype: str,
    images: tuple[Path, ...],
    quantize_vision: bool,
) -> None:
    """FP8 (E4M3) Q/DQ artifacts, calibrated by running the loop over the whole denoising schedule."""
    from ..calibration.calibrate import calibrate
    from ..model.checkpoint import torch_device

    torch_device(device)  # before the progress display starts

    with stage_progress() as progress:
        stage = progress.add_task("starting", total=None)
        manifest = calibrate(
            checkpoint,
            artifacts,
            output,
            prompts_file,
            task,
            samples,
            method,
            weights,
            exclude,
            progress=lambda text: progress.update(stage, description=text),
            device=device,
            dtype=dtype,
            images=images,
            quantize_vision=quantize_vision,
        )
        progress.update(stage, description="done")
    q = manifest.quantization
    assert q is not None
    counts = {name: len(g.quantized or ()) for name, g in manifest.graphs.items()}
    click.echo(
        f"wrote FP8 artifacts to {output}: {counts} GEMMs quantized, {q.weights} weights, "
        f"{q.method} ranges from {q.samples} prompts ({q.prompts})"
        + (f", {len(q.excluded)} excluded" if q.excluded else "")
    )
