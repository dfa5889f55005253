"""`canvasrt random-checkpoint`: random DiffusionGemma checkpoints in exactly the released on-disk format.

The model is built and saved by transformers itself (`DiffusionGemmaForBlockDiffusion.save_pretrained`), so the
files are what a user's real checkpoint looks like; a byte-level tokenizer (built with `tokenizers`) and a
generation_config.json make text prompts and `generate` work. Presets:

- tiny: seconds on CPU, and every feature on: sliding and full layers, full layers with K=V and partial
  (proportional) RoPE, GQA on both kinds, MoE with top-k > 1, non-unit norms and layer scalars, and a sliding window
  (8) shorter than a typical prompt.
- small / bench: timing-sized (vocabulary 32k, canvas 256, 16 experts).
- released: the released 26B-A4B's exact layer shapes (hidden 2816, 128 experts top-8, vocabulary 262144, window
  1024, canvas 256) and its layer pattern, in bf16 like the released checkpoint; with `layers` a few of them, for
  measuring every stage at the real width (two layers: 4.8 GB).

`layers` sets the number of layers of any preset: its layer pattern repeated, the last layer full attention (as
transformers forces it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CanvasrtError
from ..core.manifest import write_json
from ..core.output import OutputKind, staged_directory

# Written next to the checkpoint's own files: it tells a checkpoint canvasrt made, which a later run may replace,
# from a user's real checkpoint, which no command replaces.
MARKER = "canvasrt_checkpoint.json"
MARKER_FORMAT = "canvasrt-checkpoint"


def _written_by_canvasrt(directory: Path) -> bool:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT


CHECKPOINT_OUTPUT = OutputKind("a checkpoint written by canvasrt", "`canvasrt random-checkpoint`", _written_by_canvasrt)

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2: DiffusionGemma's pad / eos / bos ids
# Gemma's chat format (turns opened by `<|turn>ROLE`, closed by `<turn|>`, the assistant's role named model), for
# transformers' apply_chat_template; the byte-level tokenizer spells the turn markers byte by byte.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
# The image markers of Gemma 4's tokenizer (begin of image, soft-token placeholder, end of image) and their ids:
# the released ids where the vocabulary holds them, else the first ids after the byte symbols.
IMAGE_TOKENS = ("<|image>", "<|image|>", "<image|>")
RELEASED_IMAGE_IDS = (255999, 258880, 258882)
# Soft tokens per image the random checkpoints' image processor allows at most (the smallest it accepts)
MAX_SOFT_TOKENS = 70
_TINY_VISION = dict(
    image_size=20,
    patch_size=5,
    num_channels=3,
    hidden_size=16,
    num_key_value_heads=1,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=37,
)

# The released vision tower (convert_diffusion_gemma_weights.py): 0.57B parameters, 280 soft tokens per image
_RELEASED_VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=72,
    patch_size=16,
    pooling_kernel_size=3,
    standardize=True,
    use_clipped_linears=False,
)
VISION_PRESETS: dict[str, tuple[dict[str, Any], int]] = {  # vision config, the processor's max_soft_tokens
    "tiny": (_TINY_VISION, MAX_SOFT_TOKENS),
    "released": (_RELEASED_VISION, 280),
}

_RELEASED_PATTERN = ["sliding_attention"] * 5 + ["full_attention"]

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text=dict(
            vocab_size=288,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=32,
            sliding_window=8,
            max_position_embeddings=4096,
            initializer_range=0.2,
        ),
        canvas_length=16,
        generation=dict(max_new_tokens=32, max_denoising_steps=16),
    ),
    "small": dict(
        text=dict(
            vocab_size=32768,
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=8,
            layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            global_head_dim=128,
            num_global_key_value_heads=2,
            num_experts=16,
            top_k_experts=2,
            moe_intermediate_size=256,
            sliding_window=128,
            max_position_embeddings=8192,
            initializer_range=0.05,
        ),
        canvas_length=256,
        generation=dict(max_new_tokens=256, max_denoising_steps=48),
    ),
    "bench": dict(
        text=dict(
            vocab_size=32768,
            hidden_size=768,
            intermediate_size=1536,
            num_hidden_layers=8,
            layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=96,
            global_head_dim=192,
            num_global_key_value_heads=2,
            num_experts=16,
            top_k_experts=2,
            moe_intermediate_size=384,
            sliding_window=512,
            max_position_embeddings=8192,
            initializer_range=0.04,
        ),
        canvas_length=256,
        generation=dict(max_new_tokens=256, max_denoising_steps=48),
    ),
    "released": dict(
        text=dict(
            vocab_size=262144,
            hidden_size=2816,
            intermediate_size=2112,
            num_hidden_layers=30,
            layer_types=_RELEASED_PATTERN * 5,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            global_head_dim=512,
            num_global_key_value_heads=2,
            num_experts=128,
            top_k_experts=8,
            moe_intermediate_size=704,
            sliding_window=1024,
            max_position_embeddings=262144,
            use_bidirectional_attention="vision",
            initializer_range=0.02,
        ),
        canvas_length=256,
        generation=dict(max_new_tokens=256, max_denoising_steps=48),
        dtype=torch.bfloat16,
        vision="released",
    ),
}


def write_random_checkpoint(
    output: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    layers: int | None = None,
    device: str = "cpu",
    max_positions: int | None = None,
    vision: str | None = None,
) -> Path:
    """device: where the model is built before it is saved (cuda builds the released width in seconds).
    max_positions: the config's max_position_embeddings instead of the preset's (the longest context it allows).
    vision: the vision tower's preset (VISION_PRESETS) instead of the preset's own (tiny, except for released)."""
    spec = PRESETS.get(preset)
    if spec is None:
        raise CanvasrtError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    vision = vision or spec.get("vision", "tiny")
    if vision not in VISION_PRESETS:
        raise CanvasrtError(f"unknown vision preset {vision!r}; use one of {', '.join(VISION_PRESETS)}")
    vision_config, max_soft = VISION_PRESETS[vision]
    text = preset_text(preset, layers)
    if max_positions is not None:
        if max_positions <= spec["canvas_length"]:
            raise CanvasrtError(
                f"--max-positions {max_positions} leaves no room for a prompt before a canvas of "
                f"{spec['canvas_length']} tokens; use at least {spec['canvas_length'] + 1}"
            )
        text["max_position_embeddings"] = max_positions
    with staged_directory(output, CHECKPOINT_OUTPUT) as staging:
        write_json(
            staging / MARKER,
            {
                "format": MARKER_FORMAT,
                "written_by": "canvasrt random-checkpoint",
                "preset": preset,
                "seed": seed,
                "layers": text["num_hidden_layers"],
                "vision": vision,
            },
        )
        dtype = spec.get("dtype", torch.float32)
        model = build_random_model(text, spec["canvas_length"], seed, dtype, device, vision_config)
        model.save_pretrained(str(staging))
        del model
        generation_config(**spec["generation"]).save_pretrained(str(staging))
        save_tokenizer(byte_level_tokenizer(text["vocab_size"]), staging)
        save_image_processor(staging, vision_config, max_soft)
    return Path(output)


def preset_text(preset: str, layers: int | None = None) -> dict[str, Any]:
    """The text config of a preset, with `layers` layers: its layer pattern repeated, the last one full attention."""
    text = dict(PRESETS[preset]["text"])
    if layers is None:
        return text
    if layers < 1:
        raise CanvasrtError(f"--layers must be at least 1 (got {layers})")
    pattern = text["layer_types"]
    types = [pattern[i % len(pattern)] for i in range(layers)]
    types[-1] = "full_attention"  # transformers forces the last layer to full attention
    return {**text, "num_hidden_layers": layers, "layer_types": types}


def preset_config(text: dict[str, Any], canvas_length: int, vision: dict[str, Any] | None = None) -> Any:
    """The DiffusionGemmaConfig a random checkpoint of this text config is built from (with the tiny vision tower
    unless `vision` is given)."""
    from transformers import DiffusionGemmaConfig

    boi, image, eoi = image_token_ids(text["vocab_size"])
    return DiffusionGemmaConfig(
        text_config=dict(text),
        vision_config=dict(vision or _TINY_VISION),
        canvas_length=canvas_length,
        image_token_id=image,
        boi_token_id=boi,
        eoi_token_id=eoi,
    )


def image_token_ids(vocab_size: int) -> tuple[int, int, int]:
    """(begin of image, image soft token, end of image) ids of a random checkpoint's vocabulary."""
    if vocab_size > max(RELEASED_IMAGE_IDS):
        return RELEASED_IMAGE_IDS
    first = len(SPECIAL_TOKENS) + 256
    return first, first + 1, first + 2


def save_image_processor(directory: Path, vision: dict[str, Any], max_soft_tokens: int = MAX_SOFT_TOKENS) -> None:
    """preprocessor_config.json: transformers' Gemma 4 image processor sized to the vision tower's patches and
    pooling kernel."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    Gemma4ImageProcessorPil(
        patch_size=vision["patch_size"],
        pooling_kernel_size=vision.get("pooling_kernel_size", 3),
        max_soft_tokens=max_soft_tokens,
    ).save_pretrained(str(directory))


def build_random_model(
    text: dict[str, Any],
    canvas_length: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    vision: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """A randomly initialised DiffusionGemmaForBlockDiffusion whose norms, scales and layer scalars are not 1,
    built on `device` (its random draws then come from that device's generator); the vision tower's
    standardisation, where it has one, is not the identity either."""
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    config = preset_config(text, canvas_length, vision)
    # Built directly in the checkpoint's dtype: a bf16 model at the released width needs half the memory of fp32.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DiffusionGemmaForBlockDiffusion(config).eval()
    finally:
        torch.set_default_dtype(default)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.model.decoder.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                param.copy_(1.0 + 0.25 * torch.randn(param.shape, generator=generator))
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Gemma 4 attends with scaling 1.0: trained q/k norms carry the 1/sqrt(head_dim). Without it random
                # attention is near one-hot, and any change in summation order is amplified layer after layer.
                param.mul_(param.shape[0] ** -0.25)
        tower = model.model.encoder.vision_tower
        if getattr(tower.config, "standardize", False):
            tower.std_bias.copy_(0.1 * torch.randn(tower.std_bias.shape, generator=generator))
            tower.std_scale.copy_(1.0 + 0.25 * torch.randn(tower.std_scale.shape, generator=generator))
        decoder_layers = model.model.decoder.layers
        encoder_layers = model.model.encoder.language_model.layers
        for dec, enc in zip(decoder_layers, encoder_layers):
            scalar = 0.6 + 0.8 * torch.rand(1, generator=generator)
            dec.layer_scalar.copy_(scalar)
            enc.layer_scalar.copy_(scalar)  # the converter clones the same values into the encoder
    return model


def generation_config(max_new_tokens: int, max_denoising_steps: int) -> Any:
    from transformers import DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig

    return DiffusionGemmaGenerationConfig(
        max_new_tokens=max_new_tokens,
        max_denoising_steps=max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        eos_token_id=[1],
        pad_token_id=0,
        bos_token_id=2,
    )


def save_tokenizer(tokenizer: Any, directory: Path, chat_template: str | None = CHAT_TEMPLATE) -> None:
    """tokenizer.json, and through transformers its tokenizer_config.json and chat template (where given), as a
    released checkpoint ships them."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    wrapped.chat_template = chat_template
    wrapped.save_pretrained(str(directory))


def byte_level_tokenizer(vocab_size: int) -> Any:
    """Specials at 0..2, the 256 byte symbols next, unused filler up to vocab_size, the image markers at
    `image_token_ids` (where the vocabulary has room): any UTF-8 text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    names = [*SPECIAL_TOKENS, *alphabet]
    if vocab_size < len(names):
        raise CanvasrtError(f"vocab_size {vocab_size} cannot hold a byte-level tokenizer ({len(names)} tokens)")
    names += [f"<unused{i}>" for i in range(vocab_size - len(names))]
    markers = []
    if vocab_size >= len(SPECIAL_TOKENS) + 256 + len(IMAGE_TOKENS):
        for token, index in zip(IMAGE_TOKENS, image_token_ids(vocab_size)):
            names[index] = token
            markers.append(token)
    tokenizer = Tokenizer(models.BPE(vocab={name: i for i, name in enumerate(names)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([*SPECIAL_TOKENS, *markers])
    return tokenizer
