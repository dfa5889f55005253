"""FP8 simulated in PyTorch with the scales of a calibration.json: the torch backend's view of FP8 artifacts.

Weights are rounded through float8_e4m3fn once at load (per channel or per tensor, as calibrated) and each
quantized GEMM's input on every call, exactly as the Q/DQ graphs do (x / scale, saturate to +-448, round to
nearest even, times scale). Agreement with the ONNX Runtime FP8 graphs shows that the Q/DQ nodes sit where
intended with the intended scales.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..core.errors import ArtifactError
from .modeling import DiffusionGemmaText, Experts, Linear

# GEMMs run in FP8 (by weight name, as the graphs name their initializers without the leading "model.").
QUANTIZED = re.compile(
    r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|self_conditioning\.(gate|up|down)_proj)\.weight$"
    r"|experts\.(gate_up|down)_proj$"
)
# Kept in higher precision: embeddings and LM head (embed_tokens), the router, norms, softmax, the sampler.
# The vision graph's GEMMs (by its initializer names): each encoder layer's attention and MLP, and the projector
# into the text model. Quantized only where `canvasrt calibrate --quantize-vision` asks; the patch embedding, which
# reads the pixels, always stays in the export dtype.
VISION_QUANTIZED = re.compile(
    r"^vision_tower\.encoder\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.linear\.weight$"
    r"|^embed_vision\.embedding_projection\.weight$"
)
E4M3_MAX = 448.0


def scale_for(amax: np.ndarray | float) -> np.ndarray:
    """E4M3 scale amax / 448, nudged up one fp32 step so that amax / scale never exceeds 448."""
    amax = np.maximum(np.asarray(amax, dtype=np.float32), np.float32(1e-12))
    scale = (amax / np.float32(E4M3_MAX)).astype(np.float32)
    return np.nextafter(scale, np.float32(np.inf))


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale broadcasts against x (a scalar, or one value per slice along a leading axis)."""
    q = torch.clamp(x.float() / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def _weight_scale(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """One scale per row (the output channels of a 2-D GEMM weight, the experts of a batched one) or per tensor,
    as the Q/DQ writer scales the graph's initializer of the same layout."""
    magnitude = weight.detach().abs().float()
    if mode == "per-tensor":
        return torch.from_numpy(scale_for(float(magnitude.max())))
    amax = magnitude.reshape(weight.shape[0], -1).amax(dim=1).numpy()
    return torch.from_numpy(scale_for(amax)).reshape(-1, *([1] * (weight.dim() - 1)))


def apply_fake_quantization(
    model: DiffusionGemmaText | torch.nn.Module, calibration: dict[str, Any], pattern: re.Pattern[str] = QUANTIZED
) -> list[str]:
    """Quantizes the calibrated GEMMs of `model` (the text model, or with VISION_QUANTIZED the vision model) in
    place; returns their names."""
    tensors, mode = calibration["tensors"], calibration["weights"]
    done = []
    for name, module in model.named_modules():
        if isinstance(module, Linear) and pattern.search(f"{name}.weight") and f"{name}.weight" in tensors:
            module.weight.data = fake_quantize(module.weight.data, _weight_scale(module.weight.data, mode))
            scale = torch.tensor(np.float32(tensors[f"{name}.weight"]["scale"]))
            module.register_forward_pre_hook(lambda m, args, s=scale: (fake_quantize(args[0], s),))
            done.append(f"{name}.weight")
        if isinstance(module, Experts) and f"{name}.gate_up_proj" in tensors:
            down_scale = np.asarray(tensors[f"{name}.down_proj"]["scale"], np.float32)
            if down_scale.ndim:
                raise ArtifactError(
                    f"{name}.down_proj has an input range per expert: a calibration by a canvasrt older "
                    "than the experts' one-GEMM down-projection; re-run `canvasrt calibrate`"
                )
            for attr in ("gate_up_proj", "down_proj"):
                param = getattr(module, attr)
                param.data = fake_quantize(param.data, _weight_scale(param.data, mode))
            gate_up = torch.tensor(np.float32(tensors[f"{name}.gate_up_proj"]["scale"]))
            module.register_forward_pre_hook(lambda m, args, s=gate_up: (fake_quantize(args[0], s), *args[1:]))
            down = torch.tensor(down_scale)
            module.down_input_hook = lambda act, routed, first, s=down: fake_quantize(act, s)
            done += [f"{name}.gate_up_proj", f"{name}.down_proj"]
    return done
