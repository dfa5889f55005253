"""`canvasrt parity --bisect`: which quantized layers cost the most accuracy.

Polygraphy's precision bisection toggles layer precisions in a weakly typed network; strongly typed FP8 networks
carry their precision in the graph instead. The torch backend's fake quantization reproduces the FP8 graphs to
float rounding (tests/test_calibration.py), so groups of Q/DQ (one transformer layer, or the self-conditioning
MLP) are enabled one at a time there, and each is ranked by how far it moves the logits from fp32.

With images (`--image`, artifacts exported with `--vision`) the prompt holds them, their soft tokens placed in the
prefill as at runtime, so every group is scored on an image prompt. Where `calibrate --quantize-vision` quantized
the vision graph, its encoder layers and its projector are groups too, ranked by the same logits error, and each
also by its soft tokens' error against the fp32 vision model's; otherwise the vision graph keeps its export dtype
and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import CanvasrtError
from ..core.manifest import ArtifactManifest
from ..model.modeling import soft_embedding
from ..runtime.backends.torch import TorchExecutor
from ..runtime.images import ImageBatch, ImageProcessor, PromptImages, expand_ids, image_chunks, soft_tokens
from ..runtime.step import StepBackend

VISION_GROUPS = ("vision_tower", "embed_vision")


def _group(tensor: str) -> str:
    """layers.N, vision_tower.encoder.layers.N, or the module (self_conditioning, embed_vision)."""
    parts = tensor.split(".")
    if parts[0] == "layers":
        return ".".join(parts[:2])
    if parts[0] == "vision_tower":
        return ".".join(parts[:4])
    return parts[0]


def _nrmse(actual: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    actual, reference = torch.as_tensor(actual), torch.as_tensor(reference)
    return float((actual - reference).norm() / reference.norm())


@dataclass(frozen=True)
class _Prompt:
    """What every group is scored on: two random prompt rows (around the images, if any) and a random canvas."""

    ids: np.ndarray  # [2, P]
    padding: np.ndarray  # [2, P], all real tokens
    canvas: torch.Tensor  # [2, C]
    images: ImageBatch | None


@torch.inference_mode()
def bisect(
    checkpoint: str | Path,
    artifacts: str | Path,
    seed: int = 0,
    threads: int | None = None,
    images: list[Path] | None = None,
) -> dict[str, Any]:
    """{"bisect": the groups ranked worst first, then "all"; with images also "vision": whether the vision graph is
    quantized, the images' soft tokens and (quantized) the soft tokens' error with every vision group in FP8}."""
    manifest = ArtifactManifest.load(artifacts)
    calibration, groups, vision_groups = _groups(manifest, artifacts, images)
    prompt = _prompt(manifest, images, seed)
    logits = partial(_logits, checkpoint, manifest, threads, prompt)
    # Score on a self-conditioned step (the soft embedding of an fp32 first step), so that every group, the
    # self-conditioning MLP included, sees typical input.
    first, embedding, _ = logits(None, torch.zeros(2, manifest.capacity.canvas, manifest.model.hidden_size))
    soft = soft_embedding(first / 0.8, embedding)
    reference, _, reference_tokens = logits(None, soft)

    def score(subset_groups: list[str]) -> dict[str, float]:
        tensors = {k: v for k, v in calibration["tensors"].items() if _group(k) in subset_groups}
        out, _, tokens = logits({**calibration, "tensors": tensors}, soft)
        figures = {
            "nrmse": _nrmse(out, reference),
            "argmax_agreement": float((out.argmax(-1) == reference.argmax(-1)).float().mean()),
        }
        if any(g in vision_groups for g in subset_groups):
            figures["soft_tokens_nrmse"] = _nrmse(tokens, reference_tokens)
        return figures

    ranking = [{"group": group, **score([group])} for group in groups]
    ranking.sort(key=lambda r: r["nrmse"], reverse=True)
    ranking.append({"group": "all", **score(groups)})
    result: dict[str, Any] = {"bisect": ranking}
    if prompt.images is not None:
        result["vision"] = {
            "quantized": bool(vision_groups),
            "soft_tokens": prompt.images.soft_tokens,
            "prompt_tokens": prompt.ids.shape[1],
            # the text groups leave the soft tokens alone, so "all" gives the vision graph's own FP8 error
            **({"soft_tokens_nrmse": ranking[-1]["soft_tokens_nrmse"]} if vision_groups else {}),
        }
    return result


def _groups(
    manifest: ArtifactManifest, artifacts: str | Path, images: list[Path] | None
) -> tuple[dict[str, Any], list[str], list[str]]:
    """The artifacts' calibration, its Q/DQ groups (shortest name first) and those of the vision graph; refuses
    artifacts that are not quantized, images for artifacts without a vision graph, and an FP8 vision graph without
    images to rank its layers on."""
    if manifest.quantization is None:
        raise CanvasrtError(f"{artifacts} is not quantized; --bisect ranks the Q/DQ groups of FP8 artifacts")
    if images and manifest.vision is None:
        raise CanvasrtError(
            f"{artifacts} was exported without --vision, so it takes no images; bisect it without --image, or "
            "re-export with --vision and calibrate again"
        )
    calibration = manifest.calibration()
    groups = sorted({_group(name) for name in calibration["tensors"]}, key=lambda g: (len(g), g))
    vision_groups = [g for g in groups if g.startswith(VISION_GROUPS)]
    if vision_groups and not images:
        raise CanvasrtError(
            f"{artifacts} has its vision graph in FP8 (calibrate --quantize-vision): its layers are ranked on an "
            "image prompt; pass --image"
        )
    return calibration, groups, vision_groups


def _prompt(manifest: ArtifactManifest, images: list[Path] | None, seed: int) -> _Prompt:
    """Random text of up to 64 tokens (past the sliding window where it fits), the images' markers after its fourth
    token, expanded as the Gemma 4 processor expands them; refused when the images leave no room for text."""
    cap, model, vision = manifest.capacity, manifest.model, manifest.vision
    rng = np.random.default_rng(seed)
    room = cap.max_context - cap.canvas
    batch = ImageProcessor(manifest.directory)(list(images)) if images else None
    image_len = 0 if batch is None else sum(batch.soft_tokens) + 2 * batch.count
    if image_len + 4 > room:
        raise CanvasrtError(
            f"the images' {image_len - 2 * batch.count if batch else 0} soft tokens and a short text do not fit the "
            f"{room} tokens of context before a canvas; pass a smaller image or re-export with a larger --max-context"
        )
    text = max(4, min(room - image_len, model.sliding_window + 4, 64))
    rows = rng.integers(3, model.vocab_size, size=(2, text)).tolist()
    if batch is not None and vision is not None:
        rows = [
            expand_ids(r[:4] + [vision.image_token_id] * batch.count + r[4:], batch.soft_tokens, vision) for r in rows
        ]
    ids = np.asarray(rows, dtype=np.int64)
    padding = np.ones_like(ids, dtype=bool)
    canvas = torch.from_numpy(rng.integers(0, model.vocab_size, size=(2, cap.canvas)))
    return _Prompt(ids, padding, canvas, batch)


def _logits(
    checkpoint: str | Path,
    manifest: ArtifactManifest,
    threads: int | None,
    prompt: _Prompt,
    subset: dict[str, Any] | None,
    soft: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The denoiser's logits on `prompt` with `subset` of the calibration fake-quantized (a fresh torch backend
    each time), the embedding matrix, and the images' soft tokens (None without images)."""
    cap, vision, ids, length = manifest.capacity, manifest.vision, prompt.ids, prompt.ids.shape[1]
    executor = TorchExecutor(
        checkpoint, moe=manifest.moe, max_batch=2, max_context=cap.max_context, threads=threads, calibration=subset
    )
    with StepBackend(executor) as backend:
        backend.start(prompt.padding)
        tokens, placed = None, None
        if prompt.images is not None and vision is not None:
            tokens = soft_tokens(executor.vision_encoder(), prompt.images)
            placed = PromptImages.place(np.concatenate([tokens, tokens]), ids, vision)
        slot = None if placed is None else placed.slot
        for begin, end in image_chunks(slot, length, backend.spec.capacity.max_prefill):
            chunk = None if placed is None else placed.chunk(begin, end)
            backend.encode(ids[:, begin:end], np.arange(begin, end), np.full(2, begin, np.int64), chunk)
        out = executor.model.denoise_logits(
            prompt.canvas, soft, backend.state.keys, backend.state.values, torch.full((2,), length), backend.state.mask
        )
        return out, executor.model.embed_tokens.weight, tokens
