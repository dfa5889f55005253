"""`canvasrt parity --bisect`: which quantized layers cost the most accuracy.

Polygraphy's precision bisection toggles layer precisions in a weakly typed network; strongly typed FP8 networks
carry their precision in the graph instead. The torch backend's fake quantization reproduces the FP8 graphs to
float rounding (tests/test_calibration.py), so groups of Q/DQ (one transformer layer, or the self-conditioning
MLP) are enabled one at a time there, and each is ranked by how far it moves the logits from fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import CanvasrtError
from ..core.manifest import ArtifactManifest
from ..model.modeling import soft_embedding
from ..runtime.backends.torch import TorchExecutor
from ..runtime.step import StepBackend


def _group(tensor: str) -> str:
    parts = tensor.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


@torch.inference_mode()
def bisect(
    checkpoint: str | Path, artifacts: str | Path, seed: int = 0, threads: int | None = None
) -> list[dict[str, Any]]:
    manifest = ArtifactManifest.load(artifacts)
    if manifest.quantization is None:
        raise CanvasrtError(f"{artifacts} is not quantized; --bisect ranks the Q/DQ groups of FP8 artifacts")
    calibration = manifest.calibration()
    groups = sorted({_group(name) for name in calibration["tensors"]}, key=lambda g: (len(g), g))
    cap, model = manifest.capacity, manifest.model
    rng = np.random.default_rng(seed)
    prompt = max(4, min(cap.max_context - cap.canvas, model.sliding_window + 4, 64))
    ids = rng.integers(3, model.vocab_size, size=(2, prompt))
    padding = np.ones_like(ids, dtype=bool)
    canvas = torch.from_numpy(rng.integers(0, model.vocab_size, size=(2, cap.canvas)))

    def logits(subset: dict[str, Any] | None, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's logits with `subset` of the calibration fake-quantized, and the embedding matrix."""
        with StepBackend(
            TorchExecutor(
                checkpoint,
                moe=manifest.moe,
                max_batch=2,
                max_context=cap.max_context,
                threads=threads,
                calibration=subset,
            )
        ) as backend:
            backend.start(padding)
            backend.encode(ids, np.arange(prompt), np.zeros(2, np.int64))
            out = backend.executor.model.denoise_logits(
                canvas, soft, backend.state.keys, backend.state.values, torch.full((2,), prompt), backend.state.mask
            )
            return out, backend.executor.model.embed_tokens.weight

    # Score on a self-conditioned step (the soft embedding of an fp32 first step), so that every group, the
    # self-conditioning MLP included, sees typical input.
    first, embedding = logits(None, torch.zeros(2, cap.canvas, model.hidden_size))
    soft = soft_embedding(first / 0.8, embedding)
    reference, _ = logits(None, soft)

    def score(subset_groups: list[str]) -> dict[str, float]:
        tensors = {k: v for k, v in calibration["tensors"].items() if _group(k) in subset_groups}
        out, _ = logits({**calibration, "tensors": tensors}, soft)
        return {
            "nrmse": float((out - reference).norm() / reference.norm()),
            "argmax_agreement": float((out.argmax(-1) == reference.argmax(-1)).float().mean()),
        }

    ranking = [{"group": group, **score([group])} for group in groups]
    ranking.sort(key=lambda r: r["nrmse"], reverse=True)
    ranking.append({"group": "all", **score(groups)})
    return ranking
