"""The export-friendly model against transformers, directly in PyTorch (no ONNX), on several geometries."""

from __future__ import annotations

import math

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


def _head_inputs(model, seed: int):
    """Canvas hidden states [3, canvas, H] scaled up so the softmaxes are far from uniform, three temperatures and
    entropy bounds, draws including both ends of [0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    batch, canvas = 3, config.canvas_length
    hidden = (torch.randn(batch, canvas, config.hidden_size, generator=generator) * 4).to(model.dtype)
    uniforms = torch.rand(batch, canvas, generator=generator)
    uniforms[0, :2] = torch.tensor([0.0, 1.0 - 2.0**-24])
    renoise = torch.randint(0, config.vocab_size, (batch, canvas), generator=generator)
    return hidden, torch.tensor([1.0, 0.4, 0.1]), torch.tensor([0.5, 3.0, 12.0]), uniforms, renoise


@pytest.mark.parametrize("chunk", [1, 7, 100, 144])
def test_vocabulary_chunks_give_the_whole_vocabulary_results(tiny_checkpoint, chunk):
    """The LM head and sampler in vocabulary chunks (1: every token its own chunk; 7 and 100 leave a shorter last
    chunk of 288; 144 divides it) against the whole vocabulary at once, fp32, the same draws: the same argmax,
    sampled tokens, acceptance and next canvas; entropy and the self-conditioning state within fp32 rounding."""
    model = Checkpoint.open(tiny_checkpoint).load_text_model()
    inputs = _head_inputs(model, seed=chunk)
    whole = model.head(*inputs)
    model.vocab_chunk = chunk
    chunked = model.head(*inputs)
    assert 0 < whole.entropy.min() < 1 and whole.entropy.max() < math.log(288)  # peaked rows and flat ones
    for name in ("argmax", "sampled", "accepted", "next_canvas"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert torch.allclose(chunked.entropy, whole.entropy, rtol=0, atol=5e-6)
    assert torch.allclose(chunked.mean_entropy, whole.mean_entropy, rtol=0, atol=5e-6)
    scale = whole.next_self_cond.abs().max()
    assert (chunked.next_self_cond - whole.next_self_cond).abs().max() <= 1e-5 * scale


def test_vocabulary_chunks_sample_the_token_holding_the_draw(tiny_checkpoint):
    """Inverse-CDF sampling across chunks (100, 100 and 88 tokens) picks the token whose CDF interval holds the
    draw: for each chunk, a draw at the middle of the interval of that chunk's most probable token, per position."""
    model = Checkpoint.open(tiny_checkpoint).load_text_model(vocab_chunk=100)
    hidden, _, bound, _, renoise = _head_inputs(model, seed=3)
    temperature = torch.ones(3)
    probs = torch.softmax(model.logits(hidden).double(), dim=-1)  # [3, C, V]
    cdf = torch.cumsum(probs, dim=-1)
    for start, end in ((0, 100), (100, 200), (200, 288)):
        token = start + probs[..., start:end].argmax(dim=-1)  # [3, C]
        middle = (
            torch.gather(cdf, -1, token[..., None])[..., 0] - 0.5 * torch.gather(probs, -1, token[..., None])[..., 0]
        )
        out = model.head(hidden, temperature, bound, middle.float(), renoise)
        assert torch.equal(out.sampled, token)
