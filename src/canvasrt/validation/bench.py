"""`canvasrt bench`: step latency, prefill/commit latency and throughput of several backends in one run.

Every backend runs the same request (random prompt ids, fixed seed) with the adaptive stop disabled, so each canvas
takes exactly `steps` denoising steps; one untimed warm-up run precedes the timed one. `transformers` times the
reference's own generate(), one step being the interval between consecutive draft callbacks within a canvas.

Working memory: the peak anonymous memory of the process while the request runs, beyond what it holds once the
backend is loaded (mapped weights are file pages, not anonymous; weights a backend copies, like the torch backend's,
are in the loaded figure), at one row and at the batch, and the growth per added row between the two.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rich.table import Table

from ..core.errors import CanvasrtError
from ..core.manifest import ArtifactManifest, EngineManifest
from ..core.target import CheckpointDir, Target, open_target, target_kind
from ..runtime.backends import default_backend, open_backend, refuse_unused_device
from ..runtime.loop import generate, left_pad
from ..runtime.rng import make_draws
from ..runtime.scheduler import RowRequest
from ..runtime.settings import GenerationSettings, resolve_settings
from ..runtime.step import StepBackend

Result = TypeVar("Result")


def alternate(
    runs: dict[str, Callable[[], Result]], rounds: int, warmup: bool = True, swap: bool = False
) -> dict[str, list[Result]]:
    """Runs every contender once per round, in turn (A, B, A, B, ...), so that the machine's drift hits all of them
    alike: two benchmarks run one after the other on a shared machine can differ by more than the change measured.
    With `warmup`, a first untimed round runs before the `rounds` kept ones. With `swap`, every other round runs
    them in reverse order (A, B, B, A, ...), so that no contender always runs first in its round. Returns each
    contender's results in round order."""
    results: dict[str, list[Result]] = {name: [] for name in runs}
    for round_ in range(rounds + int(warmup)):
        order = list(runs.items())
        for name, run in order[::-1] if swap and round_ % 2 else order:
            result = run()
            if round_ >= int(warmup):
                results[name].append(result)
    return results


def anonymous_bytes() -> int | None:
    """This process's resident anonymous memory (RssAnon), or None where /proc does not report it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class AnonymousPeak(contextlib.AbstractContextManager):
    """The peak of `anonymous_bytes` while the block runs, sampled by a thread every `interval` seconds (ONNX Runtime
    and torch release the GIL inside a call); `peak` is None where /proc does not report it."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            now = anonymous_bytes()
            if now is None:
                return
            self.peak = max(self.peak or 0, now)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        now = anonymous_bytes()
        if now is not None:
            self.peak = max(self.peak or 0, now)


def _working_memory(loaded: int | None, peaks: dict[int, int | None]) -> dict[str, Any] | None:
    """Peak anonymous memory beyond the loaded backend's, per row count, and its growth per added row."""
    if loaded is None or any(peak is None for peak in peaks.values()):
        return None
    working = {rows: int(peak) - loaded for rows, peak in peaks.items() if peak is not None}
    low, high = min(working), max(working)
    return {
        "loaded_anonymous_bytes": loaded,
        "peak_anonymous_bytes": {str(rows): int(peak) for rows, peak in peaks.items() if peak is not None},
        "working_bytes": {str(rows): value for rows, value in working.items()},
        "working_bytes_per_row": (working[high] - working[low]) / (high - low) if high > low else None,
    }


def _stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"median_ms": float(np.median(array) * 1e3), "p90_ms": float(np.percentile(array, 90) * 1e3)}


def bench(
    target: str | Path,
    backends: list[str] | None,
    batch: int,
    prompt_length: int,
    steps: int,
    canvases: int,
    threads: int | None,
    provider: str = "cpu",
    device: str = "cpu",
    dtype: str | None = None,
) -> dict[str, Any]:
    """device, dtype: the torch backend's."""
    opened = open_target(target)
    kind = target_kind(opened)
    backends = (
        backends or {"artifacts": ["onnxruntime", "torch"], "engines": ["tensorrt"], "checkpoint": ["torch"]}[kind]
    )
    refuse_unused_device(device, backends)
    results: dict[str, Any] = {
        "config": {
            "batch": batch,
            "prompt_length": prompt_length,
            "steps": steps,
            "canvases": canvases,
            "threads": threads,
        },
        "backends": {},
    }
    for name in backends:
        if name == "transformers":
            results["backends"][name] = _bench_transformers(
                opened, batch, prompt_length, steps, canvases, threads, device, dtype
            )
        else:
            results["backends"][name] = _bench_backend(
                opened, name, batch, prompt_length, steps, canvases, threads, provider, device, dtype
            )
    first = backends[0]
    base = results["backends"][first]["step"]["median_ms"]
    for entry in results["backends"].values():
        entry["step_speedup_vs_" + first] = base / entry["step"]["median_ms"]
    if "transformers" in results["backends"]:
        ref = results["backends"]["transformers"]["step"]["median_ms"]
        for entry in results["backends"].values():
            entry["step_speedup_vs_transformers"] = ref / entry["step"]["median_ms"]
    return results


def _request(vocab: int, batch: int, prompt_length: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return left_pad(rng.integers(3, vocab, size=(batch, prompt_length)).tolist(), 0)


def _no_early_stop(generation: dict[str, Any], steps: int, canvas: int, canvases: int) -> Any:
    # An unreachable stability threshold keeps every canvas at exactly `steps` steps, so runs compare like for like.
    return resolve_settings(
        generation,
        {"max_new_tokens": canvases * canvas, "max_denoising_steps": steps, "stability_threshold": steps + 1},
    )


def _bench_backend(
    target: Target,
    name: str,
    batch: int,
    prompt_length: int,
    steps: int,
    canvases: int,
    threads: int | None,
    provider: str,
    device: str,
    dtype: str | None,
) -> dict[str, Any]:
    backend = open_backend(
        target, name, provider=provider, threads=threads, max_batch=batch, device=device, dtype=dtype
    )
    spec = backend.spec
    canvas, vocab = spec.capacity.canvas, spec.model.vocab_size
    settings = _no_early_stop(spec.generation, steps, canvas, canvases)
    ids, padding = _request(vocab, batch, prompt_length)
    with backend:
        loaded = anonymous_bytes()
        peaks: dict[int, int | None] = {}
        if batch > 1:  # one row first, before the batch grows the allocators
            with AnonymousPeak() as one:
                generate(backend, ids[:1], padding[:1], settings, make_draws("counter", 0, 1, vocab, canvas))
            peaks[1] = one.peak
        for run in range(2):  # the first run warms up sessions and allocators; its memory is sampled, not timed
            backend.reset_counters()
            sampled = AnonymousPeak() if run == 0 else contextlib.nullcontext()
            with sampled:
                result = generate(backend, ids, padding, settings, make_draws("counter", 0, batch, vocab, canvas))
            if isinstance(sampled, AnonymousPeak):
                peaks[batch] = sampled.peak
    t = result.timings
    wall, inside = sum(t["step_wall_s"]), sum(t["step_backend_s"])
    new_tokens = int((result.new_tokens != settings.pad_token_id).sum())
    return {
        "step": _stats(t["step_wall_s"]),
        "step_backend": _stats(t["step_backend_s"]),
        "host_overhead_share": (wall - inside) / wall,
        "prefill_ms": t["prefill_s"] * 1e3,
        "commit_ms": t["commit_s"] * 1e3 / max(len(result.steps_per_block) - 1, 1),
        "steps_per_block": result.steps_per_block,
        "tokens_per_forward": float(np.mean(result.tokens_per_forward)),
        "tokens_per_s": new_tokens / t["total_s"],
        # bytes between host and the executor's device per call of each kind (runtime/step.py defines them)
        "host_device_bytes": backend.bytes_per_call(),
        # K/V slots copied into the calls' context inputs (once per canvas and prefill chunk, not per step)
        "context_copy_bytes_per_step": backend.context_copy_bytes / max(t["steps"], 1),
        "memory": _working_memory(loaded, peaks),
    }


def bench_concurrency(
    target: str | Path,
    name: str | None,
    concurrency: int,
    prompt_length: int,
    steps: int,
    canvases: int,
    threads: int | None,
    provider: str = "cpu",
    device: str = "cpu",
    dtype: str | None = None,
) -> dict[str, Any]:
    """`concurrency` requests (seeds 0..N-1) through the in-flight scheduler with that many slots, then the same
    requests through one slot (one at a time, no batching), in one run: step calls, row-steps, tokens/s, time to
    first block, and the weight bytes read per generated token (every backbone call reads the weights once: what
    batching saves on a GPU, where a step at small batch is bound by that read). Both must return the same ids."""
    opened = open_target(target)
    name = name or default_backend(opened)
    refuse_unused_device(device, [name])
    backend = open_backend(
        opened, name, provider=provider, threads=threads, max_batch=concurrency, device=device, dtype=dtype
    )
    spec = backend.spec
    if concurrency > spec.capacity.max_batch:  # one slot per request; refused before the backend activates
        raise CanvasrtError(
            f"--concurrency {concurrency} needs {concurrency} slots, more than the max batch "
            f"{spec.capacity.max_batch} of {target}; use --concurrency {spec.capacity.max_batch} or "
            "less, or re-export with a larger --max-batch"
        )
    canvas, vocab = spec.capacity.canvas, spec.model.vocab_size
    settings = _no_early_stop(spec.generation, steps, canvas, canvases)
    ids, _ = _request(vocab, concurrency, prompt_length)
    requests = [RowRequest(row.tolist(), seed, settings) for seed, row in enumerate(ids)]
    results: dict[str, Any] = {}
    weights = _weight_bytes(opened)
    with backend:
        _warm_up(backend, requests, concurrency, _no_early_stop(spec.generation, 1, canvas, 1))
        for mode, slots in (("inflight", concurrency), ("sequential", 1)):
            results[mode] = _scheduled(backend, requests, concurrency, slots, settings, weights)
        results["late_arrival"] = _late_arrival(backend, requests, concurrency, steps)
    results["inflight"]["speedup"] = results["inflight"]["tokens_per_s"] / results["sequential"]["tokens_per_s"]
    return results


def _warm_up(backend: StepBackend, requests: list[RowRequest], concurrency: int, warm: GenerationSettings) -> None:
    """The timed modes' call shapes (one row, N rows, prefill) once, one step per request (`warm`: settings of one
    step); running the whole schedule instead cost as much as the sequential mode."""
    from ..runtime.scheduler import Scheduler, Ticket

    for slots in (1, concurrency):
        scheduler = Scheduler(backend, max_queue=concurrency, slots=slots)
        for request in requests[:slots]:
            scheduler.submit(Ticket(RowRequest(request.ids, request.seed, warm)))
        scheduler.run()


def _scheduled(
    backend: StepBackend,
    requests: list[RowRequest],
    concurrency: int,
    slots: int,
    settings: GenerationSettings,
    weights: int | None,
) -> dict[str, Any]:
    """All requests through a scheduler with `slots` slots, timed: its calls, occupancy, tokens/s, each request's
    time to first block and the ids it generated, and the weight bytes read per generated token (`weights` per
    backbone call)."""
    from ..runtime.scheduler import Scheduler, Ticket

    scheduler = Scheduler(backend, max_queue=concurrency, slots=slots)
    start = time.perf_counter()
    tickets = [scheduler.submit(Ticket(r)) for r in requests]
    scheduler.run()
    total = time.perf_counter() - start
    done = [t.events[-1] for t in tickets]
    new_tokens = sum(int((d.new_tokens != settings.pad_token_id).sum()) for d in done)
    stats = scheduler.stats
    calls = stats.step_calls + stats.prefill_chunks + stats.commits
    return {
        "slots": slots,
        "step_calls": stats.step_calls,
        "row_steps": stats.row_steps,
        "backbone_calls": calls,
        "weight_bytes_per_token": weights * calls / new_tokens if weights is not None else None,
        "occupancy": dict(sorted(stats.occupancy.items())),
        "tokens_per_s": new_tokens / total,
        "total_s": total,
        "first_block_ms": [round(t.first_block_s * 1e3, 2) for t in tickets],
        "ids": [d.new_tokens[0].tolist() for d in done],
    }


def _late_arrival(
    backend: StepBackend, requests: list[RowRequest], concurrency: int, steps: int, repeats: int = 3
) -> dict[str, Any]:
    """Time to first block of the last request alone, and arriving while the others are halfway through their
    first canvas (so it waits for its prefill between their steps and joins their step calls). Medians of `repeats`
    interleaved pairs: one first block is a few dozen steps, short enough for the machine's noise to show."""
    from ..runtime.scheduler import Scheduler, Ticket

    alone_s, with_others_s = [], []
    for _ in range(repeats):
        alone = Scheduler(backend, max_queue=concurrency, slots=concurrency)
        ticket = alone.submit(Ticket(requests[-1]))
        alone.run()
        busy = Scheduler(backend, max_queue=concurrency, slots=concurrency)
        for request in requests[:-1]:
            busy.submit(Ticket(request))
        for _ in range(max(steps // 2, 1)):
            busy.step()
        late = busy.submit(Ticket(requests[-1]))
        busy.run()
        assert ticket.first_block_s is not None and late.first_block_s is not None
        alone_s.append(ticket.first_block_s)
        with_others_s.append(late.first_block_s)
    alone_ms, with_others_ms = float(np.median(alone_s)) * 1e3, float(np.median(with_others_s)) * 1e3
    return {
        "alone_ms": alone_ms,
        "with_others_ms": with_others_ms,
        "ratio": with_others_ms / alone_ms,
        "ratios": [w / a for w, a in zip(with_others_s, alone_s)],
        "others": concurrency - 1,
    }


def _weight_bytes(target: Target) -> int | None:
    """Bytes of the weights a backbone call reads: the graph's weights or the engine (None for a checkpoint)."""
    if isinstance(target, ArtifactManifest):
        return sum(graph.data_bytes or graph.bytes for graph in target.graphs.values())
    if isinstance(target, EngineManifest):
        return sum(entry.bytes for entry in target.engines.values())
    return None


def _bench_transformers(
    target: Target,
    batch: int,
    prompt_length: int,
    steps: int,
    canvases: int,
    threads: int | None,
    device: str,
    dtype: str | None,
) -> dict[str, Any]:
    import torch

    from .reference import Reference

    if isinstance(target, EngineManifest):  # engines -> the artifacts they were built from -> their checkpoint
        target = ArtifactManifest.load(target.artifacts)
    source = target.directory if isinstance(target, CheckpointDir) else target.checkpoint_path
    if threads:
        torch.set_num_threads(threads)
    reference = Reference(source, device=device, dtype=dtype or "fp32")
    config = reference.model.config
    canvas, vocab = config.canvas_length, config.text_config.vocab_size
    ids, padding = _request(vocab, batch, prompt_length)
    stamps: list[tuple[int, float]] = []

    class Clock:
        block = 0

        def put(self, value: Any) -> None:
            self.block += 1

        def put_draft(self, value: Any) -> None:
            stamps.append((self.block, time.perf_counter()))

        def end(self) -> None:
            pass

    kwargs = dict(
        max_new_tokens=canvases * canvas, max_denoising_steps=steps, stability_threshold=steps + 1, streamer=Clock()
    )
    for _ in range(2):
        stamps.clear()
        start = time.perf_counter()
        torch.manual_seed(0)
        reference.model.generate(
            torch.from_numpy(ids).to(reference.device),
            attention_mask=torch.from_numpy(padding).long().to(reference.device),
            **kwargs,
        )
        total = time.perf_counter() - start
    intervals = [b[1] - a[1] for a, b in zip(stamps, stamps[1:]) if a[0] == b[0]]
    return {
        "step": _stats(intervals),
        "steps_per_block": [steps] * canvases,
        "tokens_per_s": batch * canvases * canvas / total,
    }


def _format_working(entry: dict[str, Any]) -> str:
    memory = entry.get("memory")
    if not memory:
        return "-"
    return ", ".join(f"{rows}: {value / 1e9:.3f}" for rows, value in memory["working_bytes"].items())


def _format_per_row(entry: dict[str, Any]) -> str:
    memory = entry.get("memory")
    per_row = memory and memory["working_bytes_per_row"]
    return "-" if per_row is None else f"{per_row / 1e9:.3f}"


def format_table(results: dict[str, Any]) -> Table:
    names = list(results["backends"])
    table = Table(title=f"canvasrt bench {results['config']}")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    rows = [
        ("step median (ms)", lambda e: f"{e['step']['median_ms']:.2f}"),
        ("step p90 (ms)", lambda e: f"{e['step']['p90_ms']:.2f}"),
        ("host overhead", lambda e: f"{100 * e['host_overhead_share']:.2f}%" if "host_overhead_share" in e else "-"),
        ("prefill (ms)", lambda e: f"{e['prefill_ms']:.1f}" if "prefill_ms" in e else "-"),
        ("commit (ms)", lambda e: f"{e['commit_ms']:.1f}" if "commit_ms" in e else "-"),
        ("steps per block", lambda e: str(e["steps_per_block"])),
        ("tokens per second", lambda e: f"{e['tokens_per_s']:.1f}"),
        (
            "K/V context copied per step (MB)",
            lambda e: f"{e['context_copy_bytes_per_step'] / 1e6:.3f}" if "context_copy_bytes_per_step" in e else "-",
        ),
        ("working memory, GB (rows: GB)", _format_working),
        ("working memory per added row (GB)", _format_per_row),
        (f"step speedup vs {names[0]}", lambda e: f"{e['step_speedup_vs_' + names[0]]:.2f}x"),
    ]
    if "transformers" in results["backends"]:
        rows.append(("step speedup vs transformers", lambda e: f"{e['step_speedup_vs_transformers']:.2f}x"))
    for label, fmt in rows:
        table.add_row(label, *(fmt(results["backends"][n]) for n in names))
    return table


def bench_images(
    target: str | Path,
    images: list[Path],
    backends: list[str] | None,
    steps: int,
    threads: int | None,
    provider: str = "cpu",
    rounds: int = 5,
) -> dict[str, Any]:
    """Image prompts, side by side in one run: the vision graph's time per image on each backend (and transformers'
    vision tower on the same pixel values), and the time to first canvas of a prompt holding the images (their
    encoding included) against a text prompt of the same length, in alternating rounds (`alternate`)."""
    from ..runtime.images import ImageProcessor

    opened = open_target(target)
    if isinstance(opened, EngineManifest):
        raise CanvasrtError(f"{target}: bench --image times artifacts or a checkpoint; pass the artifact directory")
    batch = ImageProcessor(opened.directory)(images)
    results: dict[str, Any] = {
        "config": {"images": [str(p) for p in images], "soft_tokens": batch.soft_tokens, "steps": steps},
        "backends": {},
    }
    for name in backends or [default_backend(opened), "transformers"]:
        if name == "transformers":
            source = opened.directory if isinstance(opened, CheckpointDir) else opened.checkpoint_path
            results["backends"][name] = _reference_vision(source, batch, threads, rounds)
        else:
            results["backends"][name] = _image_prompt(opened, name, batch, steps, threads, provider, rounds)
    return results


def _reference_vision(source: Path, batch: Any, threads: int | None, rounds: int) -> dict[str, Any]:
    """transformers' vision tower and projector, one image per call."""
    import torch

    from .reference import Reference

    if threads:
        torch.set_num_threads(threads)
    reference = Reference(source)
    one = [_one_image(batch, i) for i in range(batch.count)]
    times = alternate({"vision": lambda: _timed(lambda: [reference.image_features(b) for b in one])}, rounds)
    return {"vision_ms_per_image": _stats([t / batch.count for t in times["vision"]])}


def _image_prompt(
    target: Target, name: str, batch: Any, steps: int, threads: int | None, provider: str, rounds: int
) -> dict[str, Any]:
    """One backend: its vision encoder per image, and the first canvas of an image prompt (images encoded in the
    timed span) against a random text prompt of the same length."""
    from ..runtime.images import PromptImages, expand_ids, soft_tokens

    backend = open_backend(target, name, provider=provider, threads=threads, max_batch=1)
    spec = backend.spec
    canvas, vocab = spec.capacity.canvas, spec.model.vocab_size
    settings = _no_early_stop(spec.generation, steps, canvas, 1)
    with backend:
        encoder, vision = backend.executor.vision_encoder(), backend.executor.vision
        one = [_one_image(batch, i) for i in range(batch.count)]
        rng = np.random.default_rng(0)
        text = rng.integers(3, vocab, size=8).tolist()
        row = expand_ids(text[:4] + [vision.image_token_id] * batch.count + text[4:], batch.soft_tokens, vision)
        ids, padding = left_pad([row], 0)
        plain, plain_padding = left_pad([rng.integers(3, vocab, size=len(row)).tolist()], 0)

        def image_prompt() -> None:
            placed = PromptImages.place(soft_tokens(encoder, batch), ids, vision)
            generate(backend, ids, padding, settings, make_draws("counter", 0, 1, vocab, canvas), placed)

        def text_prompt() -> None:
            generate(backend, plain, plain_padding, settings, make_draws("counter", 0, 1, vocab, canvas))

        times = alternate(
            {
                "vision": lambda: _timed(lambda: [encoder.encode(b.pixel_values, b.positions) for b in one]),
                "image": lambda: _timed(image_prompt),
                "text": lambda: _timed(text_prompt),
            },
            rounds,
        )
    image_ms, text_ms = _stats(times["image"]), _stats(times["text"])
    return {
        "vision_ms_per_image": _stats([t / batch.count for t in times["vision"]]),
        "first_canvas_image_prompt": image_ms,
        "first_canvas_text_prompt": text_ms,
        "prompt_length": len(row),
        "image_over_text": image_ms["median_ms"] / text_ms["median_ms"],
    }


def _one_image(batch: Any, index: int) -> Any:
    from ..runtime.images import ImageBatch

    return ImageBatch(
        batch.pixel_values[index : index + 1], batch.positions[index : index + 1], batch.soft_tokens[index : index + 1]
    )


def _timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench_against(
    target: str | Path,
    other: str | Path,
    backend: str | None,
    batch: int,
    prompt_length: int,
    steps: int,
    threads: int | None,
    provider: str = "cpu",
    rounds: int = 6,
) -> dict[str, Any]:
    """The same text request on two targets of one model (say one export with and one without --vision), side by
    side in alternating rounds, the order swapped every other round (`alternate`): each round generates one canvas
    (the prefill and `steps` steps) on each. Per target the first canvas, the prefill and the step (every step of
    every round); `other` over `target` as ratios of the medians."""
    targets = {"target": open_target(target), "other": open_target(other)}
    runners = {
        role: open_backend(
            opened, backend or default_backend(opened), provider=provider, threads=threads, max_batch=batch
        )
        for role, opened in targets.items()
    }
    spec = runners["target"].spec
    if runners["other"].spec.model != spec.model or runners["other"].spec.capacity.canvas != spec.capacity.canvas:
        raise CanvasrtError(f"{other} holds another model than {target}; --against compares two forms of one model")
    canvas, vocab = spec.capacity.canvas, spec.model.vocab_size
    settings = _no_early_stop(spec.generation, steps, canvas, 1)
    ids, padding = _request(vocab, batch, prompt_length)

    def one_canvas(runner: StepBackend) -> tuple[float, Any]:
        start = time.perf_counter()
        result = generate(runner, ids, padding, settings, make_draws("counter", 0, batch, vocab, canvas))
        return time.perf_counter() - start, result.timings

    with contextlib.ExitStack() as stack:
        for runner in runners.values():
            stack.enter_context(runner)
        times = alternate({role: lambda r=runner: one_canvas(r) for role, runner in runners.items()}, rounds, swap=True)
    results: dict[str, Any] = {
        "config": {"batch": batch, "prompt_length": prompt_length, "steps": steps, "rounds": rounds},
        "targets": {},
    }
    for role, path in (("target", target), ("other", other)):
        runs = times[role]
        results["targets"][role] = {
            "path": str(path),
            "backend": runners[role].name,
            "first_canvas": _stats([total for total, _ in runs]),
            "prefill": _stats([timings["prefill_s"] for _, timings in runs]),
            "step": _stats([s for _, timings in runs for s in timings["step_wall_s"]]),
        }
    mine, theirs = results["targets"]["target"], results["targets"]["other"]
    results["other_over_target"] = {
        key: theirs[key]["median_ms"] / mine[key]["median_ms"] for key in ("first_canvas", "prefill", "step")
    }
    # Each round's pair ran back to back: the median of their ratios is what the machine's drift moves least
    pairs = [b[0] / a[0] for a, b in zip(times["target"], times["other"])]
    results["first_canvas_pair_ratios"] = {"median": float(np.median(pairs)), "ratios": pairs}
    return results
