"""The export-friendly model against transformers, directly in PyTorch (no ONNX), on several geometries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from canvasrt.model.checkpoint import Checkpoint
from canvasrt.runtime.backends.torch import TorchExecutor
from canvasrt.runtime.step import Draws, StepBackend
from canvasrt.validation.reference import Reference


def _prefill_and_logits(checkpoint, moe: str):
    """Runs the same prefill + one self-conditioned step through transformers and through canvasrt's model."""
    reference = Reference(checkpoint)
    backend = StepBackend(TorchExecutor(checkpoint, moe=moe, max_context=64))
    with backend:
        return _logits_both_ways(reference, backend)


def _logits_both_ways(reference, backend):
    config = backend.executor.checkpoint.config
    rng = np.random.default_rng(1)
    batch, prompt, canvas = 2, 13, config.canvas_length
    ids = rng.integers(3, config.vocab_size, size=(batch, prompt))
    padding = np.ones((batch, prompt), bool)
    padding[1, :4] = False
    state = reference.encode(None, ids, padding)
    backend.start(padding)
    backend.encode(ids, np.arange(prompt), np.zeros(batch, np.int64))
    canvas_ids = rng.integers(0, config.vocab_size, size=(batch, canvas))
    sc = torch.randn(batch, canvas, config.vocab_size)
    expected = reference.logits(state, canvas_ids, sc)
    soft = torch.softmax(sc, -1) @ reference.embedding * torch.tensor(config.hidden_size**0.5)
    actual = backend.executor.model.denoise_logits(
        torch.from_numpy(canvas_ids),
        soft,
        backend.state.keys,
        backend.state.values,
        torch.full((batch,), prompt),
        backend.state.mask,
    )
    return actual, expected


@pytest.mark.parametrize("moe", ["dense", "sparse", "grouped"])
def test_logits_match_transformers(tiny_checkpoint, moe):
    actual, expected = _prefill_and_logits(tiny_checkpoint, moe)
    rel = (actual - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-5
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_logits_match_transformers_on_variant_geometry(variant_checkpoint):
    actual, expected = _prefill_and_logits(variant_checkpoint, "dense")
    rel = (actual - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-5
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_tiny_preset_exercises_every_feature(tiny_checkpoint):
    config = Checkpoint.open(tiny_checkpoint).config
    kinds = {layer.kind for layer in config.layers}
    full = [layer for layer in config.layers if layer.kind == "full_attention"]
    assert kinds == {"sliding_attention", "full_attention"}
    assert all(layer.value_from_key and layer.rotary_pairs < layer.head_dim // 2 for layer in full)
    assert all(config.num_heads > layer.num_kv_heads for layer in config.layers)  # GQA everywhere
    assert config.top_k_experts > 1 and config.sliding_window < 12
    model = Checkpoint.open(tiny_checkpoint).load_text_model()
    assert not torch.allclose(model.layers[0].input_layernorm.weight, torch.ones(1))
    assert not torch.allclose(model.layers[0].layer_scalar, torch.ones(1))


def test_sampler_math_matches_transformers_sampler():
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSampler,
        EntropyBoundSamplerConfig,
    )

    from canvasrt.model.modeling import categorical_entropy, entropy_bound_accept

    torch.manual_seed(0)
    z = torch.randn(3, 256, 1000) * 4
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.1), 256, 1000, 48)
    sampler.accept_canvas(torch.zeros(3, 256, dtype=torch.long), torch.ones(3, 256, dtype=torch.long), z, 1)
    entropy = categorical_entropy(z)
    assert torch.equal(entropy, torch.distributions.Categorical(logits=z).entropy())
    assert torch.equal(entropy_bound_accept(entropy, torch.full((3,), 0.1)), sampler.accepted_token_mask)


def test_exponential_draws_reproduce_multinomial(tiny_checkpoint):
    """hf mode's premise: argmax(p / q) with q ~ Exp(1) is torch.multinomial, draw for draw."""
    probs = torch.softmax(torch.randn(32, 288), -1)
    torch.manual_seed(5)
    expected = torch.multinomial(probs, 1).squeeze(-1)
    torch.manual_seed(5)
    q = torch.empty(32, 288).exponential_(1)
    assert torch.equal(torch.argmax(probs / q, -1), expected)
    assert isinstance(Draws(renoise_ids=np.zeros(1), exponentials=q).exponentials, torch.Tensor)
