"""`canvasrt calibrate`: FP8 artifacts from fp32/fp16 artifacts and the checkpoint they were exported from.

Writes a new artifact directory: Q/DQ graphs (the vision graph of a `--vision` export rewritten as it is, in the
export dtype, unless `--quantize-vision` quantizes its GEMMs too), calibration.json (per tensor: amax, scale,
method, samples; per expert layer: the tokens each expert saw), the copied tokenizer and generation config, and a
manifest whose `quantization` names the calibration by digest, so later stages (build, runtime, Triton) can tell
FP8 artifacts and their calibration apart.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ..core.errors import CanvasrtError
from ..core.manifest import ArtifactManifest, GraphEntry, Quantization, sha256_file, write_json
from ..core.output import ARTIFACT_OUTPUT, check_output, staged_directory
from ..model.checkpoint import Checkpoint, torch_device
from ..runtime.images import ImageProcessor, with_images
from ..runtime.prompts import prompt_rows, read_prompts_file
from ..validation import tasks
from .qdq import WEIGHT_MODES, quantize_graph, read_graph
from .ranges import METHODS, Ranges, collect_ranges, scale_for

# Used without --prompts/--task: mixed-length text, so prefill, commits and every denoising step see typical input.
BUILTIN_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain how a block diffusion language model refines a canvas of tokens.",
    "List three prime numbers and their squares.",
    "def fibonacci(n):",
    "Translate to French: the weather is nice today.",
    "Once upon a time",
    "Summarize the plot of a heist movie in two sentences.",
    "1, 2, 3, 5, 8, 13,",
]


def calibration_prompts(
    checkpoint: Path,
    prompts_file: Path | None,
    task: str | None,
    samples: int,
    vocab_size: int | None = None,
    images: tuple[Path, ...] = (),
) -> tuple[list[dict[str, Any]], str]:
    """The calibration set: text prompts as {"ids": [...]}, prompts with images as given with their "images" (a
    prompts file's own, or `images` for every prompt); their markers are expanded once the images are encoded."""
    if prompts_file is not None:
        prompts, source = read_prompts_file(prompts_file)[:samples], f"prompts file {prompts_file}"
    elif task is not None:
        if task not in tasks.TASKS:
            raise CanvasrtError(f"unknown task {task!r}; use one of {', '.join(tasks.TASKS)}")
        # The calibration split is disjoint from the held-out prompts that `canvasrt eval` scores.
        prompts = [{"text": e.prompt} for e in tasks.examples(task, "calibration", samples)]
        source = f"task {task} calibration split"
    else:
        builtin = [{"text": text} for text in BUILTIN_PROMPTS]
        prompts, source = (builtin * (samples // len(builtin) + 1))[:samples], "built-in calibration set"
    prompts = with_images(prompts, list(images))
    if images:
        source += f", {len(images)} image(s) with each prompt"
    text = iter(prompt_rows([p for p in prompts if not p.get("images")], checkpoint, vocab_size))
    return [p if p.get("images") else {"ids": next(text)} for p in prompts], source


def calibrate(
    checkpoint: str | Path,
    artifacts: str | Path,
    output: str | Path,
    prompts_file: Path | None = None,
    task: str | None = None,
    samples: int = 64,
    method: str = "max",
    weights: str = "per-channel",
    exclude: tuple[str, ...] = (),
    progress: Any = lambda _: None,
    device: str = "cpu",
    dtype: str = "fp32",
    images: tuple[Path, ...] = (),
    quantize_vision: bool = False,
) -> ArtifactManifest:
    """exclude: regular expressions; matching GEMMs (e.g. the worst groups of `parity --bisect`) stay unquantized.
    images: image files that go with every calibration prompt (a prompts file may name each prompt's own instead);
    their soft tokens flow through the prefill as at runtime. quantize_vision: the vision graph's GEMMs in FP8 too,
    calibrated on those images; without it the vision graph keeps the export dtype."""
    checkpoint = Path(checkpoint)
    torch_device(device)  # before anything runs
    manifest = ArtifactManifest.load(artifacts)
    check_output(output, ARTIFACT_OUTPUT, inputs=[checkpoint, artifacts])  # before the loop runs, not after
    _check_options(manifest, artifacts, method, weights, images, quantize_vision)
    patterns = _exclusion_patterns(exclude)
    opened = Checkpoint.open(checkpoint)
    _check_inputs(manifest, opened, artifacts, samples, prompts_file, task, dtype, device)
    rows, source = calibration_prompts(checkpoint, prompts_file, task, samples, manifest.model.vocab_size, images)
    if not rows or any(not r.get("images") and len(r["ids"]) == 0 for r in rows):
        raise CanvasrtError(f"the calibration set ({source}) is empty or has an empty prompt")
    _check_images(manifest, Path(artifacts), rows, quantize_vision)
    progress(f"running the loop on {len(rows)} calibration prompts ({source})")
    ranges = collect_ranges(checkpoint, rows, method=method, device=device, dtype=dtype, vision=quantize_vision)
    excluded = _exclude(ranges, patterns)
    coverage = [min(counts) for counts in ranges.expert_tokens.values()]
    progress(f"fewest tokens any expert saw: {min(coverage) if coverage else 'n/a'}")
    calibration = _calibration_record(ranges, method, weights, source, len(rows), excluded, quantize_vision)
    with staged_directory(output, ARTIFACT_OUTPUT, inputs=[checkpoint, artifacts]) as staging:
        write_json(staging / "calibration.json", calibration)
        graphs = _write_qdq_graphs(manifest, staging, ranges.amax, weights, progress)
        for extra in manifest.files:
            shutil.copy2(manifest.directory / extra, staging / extra)
        quantization = Quantization(
            method=method,
            weights=weights,
            prompts=source,
            excluded=tuple(excluded),
            samples=len(rows),
            calibration="calibration.json",
            calibration_sha256=sha256_file(staging / "calibration.json"),
            vision=quantize_vision,
        )
        new_manifest = replace(manifest, directory=Path(output), graphs=graphs, quantization=quantization)
        new_manifest.write(staging)
        progress("checking that the inputs did not change while calibrating")
        _check_inputs_unchanged(manifest, opened, Path(artifacts))  # the cause first: a changed input's copies differ
        for problem in replace(new_manifest, directory=staging).problems():  # the copies are the recorded files
            raise CanvasrtError(problem)
    return new_manifest


def _check_options(
    manifest: ArtifactManifest,
    artifacts: str | Path,
    method: str,
    weights: str,
    images: tuple[Path, ...],
    quantize_vision: bool,
) -> None:
    """Refuses, before the checkpoint is opened, a method or weight mode that does not exist, artifacts that are
    quantized already, and images or a vision calibration for artifacts without a vision graph."""
    if method not in METHODS:
        raise CanvasrtError(f"calibration method {method!r} is not implemented; use one of {', '.join(METHODS)}")
    if weights not in WEIGHT_MODES:
        raise CanvasrtError(f"--weights takes one of {', '.join(WEIGHT_MODES)}")
    if manifest.quantization is not None:
        raise CanvasrtError(f"{artifacts} is already quantized; calibrate the fp32/fp16 export instead")
    if manifest.vision is None and (images or quantize_vision):  # before the digests of every weight file
        _no_vision(Path(artifacts), "--quantize-vision" if quantize_vision else "--image")


def _check_inputs(
    manifest: ArtifactManifest,
    checkpoint: Checkpoint,
    artifacts: str | Path,
    samples: int,
    prompts_file: Path | None,
    task: str | None,
    dtype: str,
    device: str,
) -> None:
    """Refuses, before the calibration run (long at the released model's size), a checkpoint that does not fit in
    memory or is not the one the artifacts were exported from, a calibration set named twice or empty, and graphs
    or weights other than the exported ones."""
    checkpoint.check_memory(dtype, device, "calibration's torch backend")  # before the digests read every weight file
    checkpoint.check_source_of(manifest, artifacts)
    if samples < 1:
        raise CanvasrtError(f"--samples must be at least 1 (got {samples})")
    if prompts_file is not None and task is not None:
        raise CanvasrtError("give at most one of --prompts and --task: both name the calibration set")
    for name in manifest.graphs:
        read_graph(manifest.graph_path(name), load_external_data=False)
    manifest.verify()  # the graphs and weights the Q/DQ graphs are written from are the exported ones


def _exclusion_patterns(exclude: tuple[str, ...]) -> list[re.Pattern[str]]:
    """The `--exclude` patterns compiled, before the calibration run: a malformed one is refused at once."""
    try:
        return [re.compile(p) for p in exclude]
    except re.error as exc:
        raise CanvasrtError(f"--exclude pattern {exc.pattern!r} is not a regular expression: {exc}") from None


def _exclude(ranges: Ranges, patterns: list[re.Pattern[str]]) -> list[str]:
    """Drops the ranges of the GEMM inputs that an `--exclude` pattern matches, so that they stay unquantized;
    returns their names, sorted."""
    excluded = sorted(n for n in ranges.amax if any(p.search(n) for p in patterns))
    for name in excluded:
        del ranges.amax[name]
    return excluded


def _calibration_record(
    ranges: Ranges,
    method: str,
    weights: str,
    source: str,
    samples: int,
    excluded: list[str],
    quantize_vision: bool,
) -> dict[str, Any]:
    """calibration.json: how the ranges were collected, per calibrated tensor its amax and FP8 scale, the tensors
    excluded, and per expert layer the tokens each expert saw."""
    return {
        "method": method,
        "format": "fp8-e4m3",
        "weights": weights,
        "prompts": source,
        "samples": samples,
        "tensors": {
            name: {"amax": np.asarray(amax).tolist(), "scale": np.asarray(scale_for(amax)).tolist()}
            for name, amax in sorted(ranges.amax.items())
        },
        "excluded": excluded,
        "expert_tokens": ranges.expert_tokens,
        "vision": quantize_vision,
    }


def _write_qdq_graphs(
    manifest: ArtifactManifest, staging: Path, amax: dict[str, Any], weights: str, progress: Any
) -> dict[str, GraphEntry]:
    """Each of the artifacts' graphs rewritten with Q/DQ at the calibrated ranges into `staging`, and its entry."""
    graphs = {}
    for name, graph in manifest.graphs.items():
        progress(f"writing Q/DQ {graph.file}")
        path = staging / graph.file
        quantized = quantize_graph(manifest.graph_path(name), path, amax, weights)
        graphs[name] = GraphEntry.of_file(path, graph.inputs, graph.outputs, graph.profiles, quantized)
    return graphs


def _check_images(
    manifest: ArtifactManifest, artifacts: Path, prompts: list[dict[str, Any]], quantize_vision: bool
) -> None:
    """Refuses, before the calibration loop, images the artifacts cannot take, a vision calibration without images,
    and image files the image processor cannot read."""
    sets = {tuple(p["images"]) for p in prompts if p.get("images")}
    if (sets or quantize_vision) and manifest.vision is None:
        _no_vision(artifacts, "--quantize-vision" if quantize_vision else "calibration prompts with images")
    if quantize_vision and not sets:
        raise CanvasrtError(
            "--quantize-vision calibrates the vision graph on the calibration prompts' images; pass --image (or a "
            'prompts file whose prompts have "images")'
        )
    processor = ImageProcessor(artifacts) if sets else None
    for paths in sets:
        assert processor is not None
        processor(list(paths))


def _no_vision(artifacts: Path, what: str) -> NoReturn:
    raise CanvasrtError(
        f"{artifacts} was exported without --vision: there is no vision graph for {what}; re-export with --vision, "
        "or drop the images"
    )


def _check_inputs_unchanged(manifest: ArtifactManifest, checkpoint: Checkpoint, artifacts: Path) -> None:
    """The inputs are read twice, the checkpoint by the calibration loop and the graphs by the Q/DQ writer, long
    after the checks at the start: an export into the artifact directory or a rewrite of the checkpoint meanwhile
    would give FP8 graphs of one model under the manifest of another. So, before the output is swapped in, the
    artifact manifest must still be the one read at the start, its files still match their digests, and the
    checkpoint still match the digests the artifacts record."""
    manifest.check_unchanged("calibrate")
    try:
        checkpoint.check_source_of(manifest, artifacts)
    except CanvasrtError:
        raise CanvasrtError(
            f"{checkpoint.path} changed while calibrating (another checkpoint written there?); nothing was written: "
            "run `canvasrt calibrate` again once it stays unchanged"
        ) from None
