"""`canvasrt generate` (with the live canvas), `canvasrt bench` and `canvasrt eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.live import Live
from rich.text import Text

from ..core.errors import CanvasrtError
from ..runtime.backends import BACKENDS, default_backend, open_backend, refuse_unused_device
from ..runtime.images import place_prompts, with_images
from ..runtime.loop import Committed, Draft, GenerationResult, stream
from ..runtime.prompts import TextCodec, UnreadableTokenizer, parse_ids, read_prompts_file, until_eos
from ..runtime.rng import RNG_MODES, make_draws
from ..runtime.settings import resolve_settings
from .options import INT, SEED, positive

err = Console(stderr=True)
device_option = click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="where the torch paths run (torch backend, transformers)",
)
image_option = click.option(
    "--image",
    "image",
    multiple=True,
    type=click.Path(path_type=Path),
    help="an image file for the prompt (repeatable; PNG, JPEG, ...): needs a vision export or checkpoint",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default=None,
    help="the torch backend's dtype (default fp32)",
)


def settings_options(fn: Any) -> Any:
    options = [
        click.option("--max-new-tokens", type=INT, default=None, help="rounded up to whole canvases"),
        click.option("--max-denoising-steps", type=INT, default=None),
        click.option("--entropy-bound", type=float, default=None),
        click.option("--t-min", type=float, default=None),
        click.option("--t-max", type=float, default=None),
        click.option("--stability-threshold", type=INT, default=None),
        click.option("--confidence-threshold", type=float, default=None),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


SETTING_KEYS = (
    "max_new_tokens",
    "max_denoising_steps",
    "entropy_bound",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
)


@click.command("generate")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--prompt", help="prompt text (needs the target's tokenizer)")
@click.option("--prompt-ids", help="prompt as comma-separated token ids, e.g. 5,6,7")
@click.option(
    "--prompts-file",
    type=click.Path(path_type=Path),
    help='JSONL, one {"text": ...} or {"ids": [...]} per line, each with optional "images": [files]',
)
@click.option("--backend", type=str, default=None, help=f"one of {', '.join(BACKENDS)} (default: by TARGET kind)")
@click.option("--provider", default="cpu", show_default=True, help="ONNX Runtime provider: cpu, cuda, tensorrt-ep")
@click.option("--rng", type=click.Choice(RNG_MODES), default="counter", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--threads", type=INT, default=None, callback=positive, help="CPU threads for the backend")
@click.option(
    "--json", "as_json", is_flag=True, help="print sequences, text, steps, tokens per forward and timings as JSON"
)
@click.option("--watch", is_flag=True, help="show the canvas denoising live")
@image_option
@device_option
@dtype_option
@settings_options
def generate_command(
    target: Path,
    prompt: str | None,
    prompt_ids: str | None,
    prompts_file: Path | None,
    backend: str | None,
    provider: str,
    rng: str,
    seed: int,
    threads: int | None,
    as_json: bool,
    watch: bool,
    image: tuple[Path, ...],
    device: str,
    dtype: str | None,
    **overrides: Any,
) -> None:
    """Generate from TARGET: a checkpoint directory (torch) or an artifact directory (onnxruntime). With --image (or
    a prompts file's "images"), each <|image|> in a prompt marks its next image (without markers the images go
    first); --image gives its images to every prompt."""
    prompts = _prompts(prompt, prompt_ids, prompts_file)
    runner = open_backend(
        target, backend, provider=provider, threads=threads, max_batch=max(16, len(prompts)), device=device, dtype=dtype
    )
    refuse_unused_device(device, [runner.name])
    if rng == "hf" and runner.name != "torch":
        raise CanvasrtError("--rng hf reproduces transformers' torch RNG and needs --backend torch")
    spec = runner.spec
    settings = resolve_settings(spec.generation, {k: overrides[k] for k in SETTING_KEYS})
    codec = _codec(target, spec.model.vocab_size)
    with runner:
        ids, padding, images = place_prompts(
            runner, target, with_images(prompts, list(image)), settings.pad_token_id or 0
        )
        draws = make_draws(rng, seed, ids.shape[0], spec.model.vocab_size, spec.capacity.canvas, device=device)
        events = stream(runner, ids, padding, settings, draws, images)
        result = _watch(events, codec, settings, ids.shape[0]) if watch else _last(events)
    texts = [
        codec.decode(until_eos(row, settings.eos_token_ids, settings.pad_token_id)) if codec else None
        for row in result.new_tokens
    ]
    if as_json:
        click.echo(json.dumps(_generation_json(result, texts, runner.name, rng, seed)))
    else:
        _echo_generation(result, texts, runner.name)


def _prompts(prompt: str | None, prompt_ids: str | None, prompts_file: Path | None) -> list[dict[str, Any]]:
    """The prompts of `generate`, from exactly one of its three sources."""
    sources = [s for s in (prompt, prompt_ids, prompts_file) if s is not None]
    if len(sources) != 1:
        raise CanvasrtError("give exactly one of --prompt, --prompt-ids, --prompts-file")
    if prompt is not None:
        return [{"text": prompt}]
    if prompt_ids is not None:
        return [{"ids": parse_ids(prompt_ids)}]
    return read_prompts_file(prompts_file)


def _generation_json(
    result: GenerationResult, texts: list[str | None], backend: str, rng: str, seed: int
) -> dict[str, Any]:
    """`generate --json`: sequences, text, steps, tokens per forward and the scalar timings of a run."""
    return {
        "sequences": result.sequences.tolist(),
        "text": texts,
        "steps_per_block": result.steps_per_block,
        "tokens_per_forward": result.tokens_per_forward.tolist(),
        "timings": {k: v for k, v in result.timings.items() if not isinstance(v, list)},
        "backend": backend,
        "rng": rng,
        "seed": seed,
    }


def _echo_generation(result: GenerationResult, texts: list[str | None], backend: str) -> None:
    """`generate`'s plain output: a line per row (its text, escaped, or its ids), and a summary line on stderr."""
    for i, row in enumerate(result.new_tokens):
        shown = _escaped(texts[i]) if texts[i] is not None else " ".join(map(str, row.tolist()))
        click.echo(f"[{i}] {shown}")
    err.print(
        f"{backend}: {sum(result.steps_per_block)} steps over {len(result.steps_per_block)} canvas(es), "
        f"tokens/forward {np.round(result.tokens_per_forward, 2).tolist()}, {result.timings['total_s']:.2f}s"
    )


def _codec(target: Path, vocab_size: int) -> TextCodec | None:
    """The tokenizer for text output; None without one, and the output is ids. The prompt came as ids, so a
    tokenizer.json that cannot be read costs the text only: a warning, before the run, and the ids are printed."""
    if not (target / "tokenizer.json").is_file():
        return None
    try:
        return TextCodec(target, vocab_size)
    except UnreadableTokenizer as exc:
        click.echo(
            f"warning: {exc.path} cannot be read as a tokenizer ({exc.reason}); printing token ids instead of "
            "text (copy the checkpoint's tokenizer.json back for text)",
            err=True,
        )
        return None


def _last(events: Any) -> GenerationResult:
    for event in events:
        if isinstance(event, GenerationResult):
            return event
    raise AssertionError("generation ended without a result")


def _watch(events: Any, codec: TextCodec | None, settings: Any, batch: int) -> GenerationResult:
    """Live view: per row the committed text, then the current draft with accepted positions highlighted."""
    committed: list[list[int]] = [[] for _ in range(batch)]

    def render(draft: Draft | None) -> Text:
        text = Text()
        for row in range(batch):
            text.append(f"[{row}] ", style="bold")
            text.append(_decode(codec, committed[row]), style="green")
            if draft is not None:
                for token, ok in zip(draft.argmax[row].tolist(), draft.accepted[row].tolist()):
                    text.append(_piece(codec, token) or "·", style="bold yellow" if ok else "dim")
                text.append(
                    f"  (canvas {draft.block}, step {draft.step}, H={draft.mean_entropy[row]:.3f})", style="cyan"
                )
            text.append("\n")
        return text

    if not err.is_terminal:  # logs and CI: one line per step instead of a redrawn screen
        for event in events:
            if isinstance(event, Draft):
                err.print(render(event), end="", markup=False, highlight=False)
            elif isinstance(event, Committed):
                for row in range(batch):
                    committed[row] += until_eos(event.tokens[row], settings.eos_token_ids, settings.pad_token_id)
            else:
                return event
        raise AssertionError("generation ended without a result")
    with Live(render(None), console=err, refresh_per_second=20, transient=False) as live:
        for event in events:
            if isinstance(event, Draft):
                live.update(render(event))
            elif isinstance(event, Committed):
                for row in range(batch):
                    committed[row] += until_eos(event.tokens[row], settings.eos_token_ids, settings.pad_token_id)
                live.update(render(None))
            else:
                return event
    raise AssertionError("generation ended without a result")


def _piece(codec: TextCodec | None, token: int) -> str:
    return _printable(codec.piece(token)) if codec else f"{token} "


def _printable(text: str) -> str:
    # Control characters (random models emit them) would move the cursor and tear the live view.
    return "".join(ch if ch.isprintable() else "·" for ch in text)


def _escaped(text: str) -> str:
    """Generated text as printed: control characters (NUL, ESC, ...; random and badly trained models emit them)
    escaped as \\x00, so that the output is text a terminal shows and a pipe reads, not raw bytes; line breaks and
    tabs stay."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else ch.encode("unicode_escape").decode() for ch in text)


def _decode(codec: TextCodec | None, ids: list[int]) -> str:
    if codec is None:
        return "".join(f"{i} " for i in ids)
    return _printable(codec.decode(ids))


@click.command("bench")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--backend", "backends", multiple=True, help="repeatable; also 'transformers' for the reference step")
@click.option("--batch", type=INT, default=1, show_default=True, callback=positive)
@click.option("--prompt-length", type=INT, default=64, show_default=True, callback=positive)
@click.option(
    "--steps",
    type=INT,
    default=8,
    show_default=True,
    callback=positive,
    help="denoising steps per canvas (no early stop)",
)
@click.option(
    "--canvases",
    type=INT,
    default=1,
    show_default=True,
    callback=positive,
    help="canvases to generate (commits = canvases - 1)",
)
@click.option("--threads", type=INT, default=None, callback=positive)
@click.option("--provider", default="cpu", show_default=True)
@click.option(
    "--concurrency",
    type=INT,
    default=None,
    callback=positive,
    help="N requests through the in-flight scheduler (N slots) against the same N one at a time",
)
@click.option(
    "--rounds",
    type=INT,
    default=None,
    callback=positive,
    help="--against and --image: timed rounds after the warm-up (default 6 and 5)",
)
@click.option(
    "--against",
    type=click.Path(path_type=Path),
    default=None,
    help="another export of the same model (say without --vision): the same text request on both, alternating",
)
@image_option
@device_option
@dtype_option
@click.option("--json", "as_json", is_flag=True)
def bench_command(
    target: Path,
    backends: tuple[str, ...],
    batch: int,
    prompt_length: int,
    steps: int,
    canvases: int,
    threads: int | None,
    provider: str,
    concurrency: int | None,
    rounds: int | None,
    against: Path | None,
    image: tuple[Path, ...],
    device: str,
    dtype: str | None,
    as_json: bool,
) -> None:
    """Time the step backends on TARGET side by side in one run; ratios are against the first backend. With
    --image: the vision graph per image (against transformers' vision tower) and the first canvas of an image
    prompt against a text prompt of the same length."""
    if rounds is not None and against is None and not image:
        raise CanvasrtError("--rounds sets how many rounds --against and --image time; add one of them or drop it")
    if against is not None:
        if image or concurrency is not None or len(backends) > 1:
            raise CanvasrtError(
                "--against times one text request on two targets; leave out --image, --concurrency "
                "and all but one --backend"
            )
        backend = backends[0] if backends else None
        _bench_against(target, against, backend, batch, prompt_length, steps, threads, provider, rounds, as_json)
    elif image:
        if concurrency is not None:
            raise CanvasrtError("--image and --concurrency measure different things; give one of them")
        _bench_images(target, list(image), list(backends) or None, steps, threads, provider, rounds, as_json)
    elif concurrency is not None:
        names = list(backends) or [None]
        _bench_concurrency(
            target, names, concurrency, prompt_length, steps, canvases, threads, provider, device, dtype, as_json
        )
    else:
        from ..validation.bench import bench, format_table

        results = bench(
            target, list(backends) or None, batch, prompt_length, steps, canvases, threads, provider, device, dtype
        )
        if as_json:
            click.echo(json.dumps(results, indent=2))
        else:
            Console().print(format_table(results))


def _bench_against(
    target: Path,
    against: Path,
    backend: str | None,
    batch: int,
    prompt_length: int,
    steps: int,
    threads: int | None,
    provider: str,
    rounds: int | None,
    as_json: bool,
) -> None:
    """`bench --against`: one text request on TARGET and on another export of the same model, alternating; prints
    each target's medians and the other's time over TARGET's."""
    from ..validation.bench import bench_against

    results = bench_against(target, against, backend, batch, prompt_length, steps, threads, provider, rounds or 6)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for role in ("target", "other"):
        entry = results["targets"][role]
        click.echo(
            f"{entry['path']} ({entry['backend']}): first canvas {entry['first_canvas']['median_ms']:.1f} ms, "
            f"prefill {entry['prefill']['median_ms']:.1f} ms, step {entry['step']['median_ms']:.2f} ms"
        )
    ratios = results["other_over_target"]
    click.echo(
        f"{against} over {target}: first canvas {ratios['first_canvas']:.3f}x (median of the rounds' pairs "
        f"{results['first_canvas_pair_ratios']['median']:.3f}x), prefill {ratios['prefill']:.3f}x, "
        f"step {ratios['step']:.3f}x"
    )


def _bench_images(
    target: Path,
    images: list[Path],
    backends: list[str] | None,
    steps: int,
    threads: int | None,
    provider: str,
    rounds: int | None,
    as_json: bool,
) -> None:
    """`bench --image`: the vision graph per image and, per backend, the first canvas of an image prompt against a
    text prompt of the same length."""
    from ..validation.bench import bench_images

    results = bench_images(target, images, backends, steps, threads, provider, rounds or 5)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for name, entry in results["backends"].items():
        line = f"{name}: vision {entry['vision_ms_per_image']['median_ms']:.1f} ms per image"
        if "image_over_text" in entry:
            line += (
                f", first canvas of a {entry['prompt_length']}-token prompt with images "
                f"{entry['first_canvas_image_prompt']['median_ms']:.1f} ms against "
                f"{entry['first_canvas_text_prompt']['median_ms']:.1f} ms as text "
                f"({entry['image_over_text']:.2f}x)"
            )
        click.echo(line)


def _bench_concurrency(
    target: Path,
    backends: list[str | None],
    concurrency: int,
    prompt_length: int,
    steps: int,
    canvases: int,
    threads: int | None,
    provider: str,
    device: str,
    dtype: str | None,
    as_json: bool,
) -> None:
    """`bench --concurrency N`: per backend, N requests through the in-flight scheduler against the same N one at a
    time, then the first block of a request that arrives while the others are mid-canvas."""
    from ..validation.bench import bench_concurrency

    results = {
        "config": {
            "concurrency": concurrency,
            "prompt_length": prompt_length,
            "steps": steps,
            "canvases": canvases,
            "threads": threads,
        },
        "backends": {
            name or "default": bench_concurrency(
                target, name, concurrency, prompt_length, steps, canvases, threads, provider, device, dtype
            )
            for name in backends
        },
    }
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for name, entry in results["backends"].items():
        for mode in ("inflight", "sequential"):
            e = entry[mode]
            read = e["weight_bytes_per_token"]
            click.echo(
                f"{name} {mode}: {e['step_calls']} step calls for {e['row_steps']} row-steps, "
                f"{e['tokens_per_s']:.1f} tokens/s, first block median "
                f"{float(np.median(e['first_block_ms'])):.1f} ms"
                + (f", {read / 1e6:.1f} MB of weights read per token" if read is not None else "")
            )
        late = entry["late_arrival"]
        click.echo(
            f"{name} first block of a request arriving while {late['others']} others are mid-canvas: "
            f"{late['with_others_ms']:.1f} ms, alone {late['alone_ms']:.1f} ms ({late['ratio']:.2f}x; "
            f"medians of {len(late['ratios'])}, ratios " + ", ".join(f"{r:.2f}" for r in late["ratios"]) + ")"
        )


@click.command("eval")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--task", required=True, help="synthetic task the model was trained on (e.g. sort)")
@click.option("--samples", type=INT, default=100, show_default=True, help="held-out prompts")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    help="repeatable: transformers (checkpoint), torch, onnxruntime (default: by TARGET kind)",
)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--threads", type=INT, default=None, callback=positive)
@click.option("--json", "as_json", is_flag=True)
@device_option
@dtype_option
def eval_command(
    target: Path,
    task: str,
    samples: int,
    backends: tuple[str, ...],
    seed: int,
    threads: int | None,
    as_json: bool,
    device: str,
    dtype: str | None,
) -> None:
    """Exact-match accuracy, steps per canvas and tokens per forward on TASK's held-out prompts."""
    from ..core.target import open_target
    from ..validation.evaluate import evaluate

    results = []
    for name in backends or [default_backend(open_target(target))]:
        with err.status(f"{name}: generating {samples} held-out {task} answers"):
            results.append(evaluate(target, task, samples, name, seed, threads, device, dtype))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(
            f"{r['backend']}: exact match {100 * r['exact_match']:.1f}% of {r['samples']} held-out "
            f"{r['task']} prompts, "
            f"{r['steps_per_block']:.2f} steps per canvas (max {r['max_denoising_steps']}), "
            f"{r['tokens_per_forward']:.2f} tokens per forward, {r['seconds']:.1f}s"
        )
        for failure in r["failures"]:
            click.echo(f"  miss: {failure['prompt']!r} -> {failure['got']!r} (expected {failure['expected']!r})")
