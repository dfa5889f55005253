"""Train the tiny DiffusionGemma demo checkpoint on a synthetic task.

The model is transformers' own `DiffusionGemmaForBlockDiffusion`, so the output
directory is a real checkpoint (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json) that every
canvasrt component can load like the released model.  Because the task answers
are exactly checkable (`canvasrt.validation.tasks`), it doubles as the accuracy
yardstick for quantized engines.

Usage:
    python scripts/train_tiny.py --task sort --out tests/fixtures/sort-tiny

The same seed on the same software gives the same checkpoint.  At the end the
saved checkpoint is reloaded and evaluated with transformers' `generate`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaGenerationConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from canvasrt.runtime import tasks

VOCAB_SIZE = 32
CANVAS_LENGTH = 16
MAX_DENOISING_STEPS = 16
T_MIN, T_MAX = 0.4, 0.8
# One thread: CPU float reductions may depend on the thread count (reproducibility),
# the ops are too small to gain from more, and on a busy machine extra OpenMP threads
# made training several times slower.
NUM_THREADS = 1

# Every architectural feature of the released model at toy size: sliding and full
# layers (last one full), GQA with different head dims and K=V on full layers, a
# sliding window shorter than every prompt, and MoE next to the dense MLP.
TEXT_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
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
    sliding_window=6,
    max_position_embeddings=128,
    use_bidirectional_attention="vision",
)
# The architecture always carries a vision tower; keep it minimal (None builds 167M
# params) and size its position table for the 4x4 patch grid of a 20x20 image.
VISION_CONFIG = dict(
    image_size=20,
    patch_size=5,
    num_channels=3,
    hidden_size=16,
    num_key_value_heads=1,
    num_hidden_layers=1,
    num_attention_heads=4,
    head_dim=8,
    intermediate_size=37,
    position_embedding_size=16,
    pooling_kernel_size=2,
)


def build_config() -> DiffusionGemmaConfig:
    special = {tok: i for i, tok in enumerate(tasks.SPECIAL_TOKENS)}
    config = DiffusionGemmaConfig(
        text_config=TEXT_CONFIG,
        vision_config=VISION_CONFIG,
        canvas_length=CANVAS_LENGTH,
        image_token_id=special[tasks.IMAGE],
        boi_token_id=special[tasks.BOI],
        eoi_token_id=special[tasks.EOI],
    )
    config._attn_implementation = "eager"
    return config


def build_generation_config() -> DiffusionGemmaGenerationConfig:
    return DiffusionGemmaGenerationConfig(
        max_new_tokens=CANVAS_LENGTH,
        max_denoising_steps=MAX_DENOISING_STEPS,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=T_MIN,
        t_max=T_MAX,
        stability_threshold=1,
        confidence_threshold=0.005,
        bos_token_id=tasks.SPECIAL_TOKENS.index(tasks.BOS),
        eos_token_id=tasks.SPECIAL_TOKENS.index(tasks.EOS),
        pad_token_id=tasks.SPECIAL_TOKENS.index(tasks.PAD),
    )


def build_tokenizer(task: str) -> Tokenizer:
    """Word-level tokenizer over the task alphabet that prepends `<bos>` like Gemma's."""
    vocab = {token: i for i, token in enumerate(tasks.vocabulary(task, VOCAB_SIZE))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=tasks.UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tasks.BOS} $A", special_tokens=[(tasks.BOS, vocab[tasks.BOS])]
    )
    tokenizer.add_special_tokens(list(tasks.SPECIAL_TOKENS))
    return tokenizer


def encode_prompts(tokenizer: Tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, the layout `generate` expects for batches."""
    rows = [tokenizer.encode(p).ids for p in prompts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def encode_canvases(tokenizer: Tokenizer, answers: list[str]) -> torch.Tensor:
    """Clean canvases: answer, EOS, then pad, exactly what `generate` returns for a finished row."""
    eos, pad = tasks.SPECIAL_TOKENS.index(tasks.EOS), tasks.SPECIAL_TOKENS.index(tasks.PAD)
    canvas = torch.full((len(answers), CANVAS_LENGTH), pad, dtype=torch.long)
    for i, answer in enumerate(answers):
        row = tokenizer.encode(answer, add_special_tokens=False).ids + [eos]
        if len(row) > CANVAS_LENGTH:
            raise ValueError(f"answer {answer!r} plus EOS does not fit a {CANVAS_LENGTH}-token canvas")
        canvas[i, : len(row)] = torch.tensor(row)
    return canvas


def diffusion_loss(
    model: DiffusionGemmaForBlockDiffusion,
    ids: torch.Tensor,
    mask: torch.Tensor,
    clean: torch.Tensor,
    self_condition: bool,
) -> torch.Tensor:
    """Uniform-state diffusion loss: denoise a canvas whose tokens were resampled uniformly with prob. t ~ U[0, 1]."""
    batch = clean.shape[0]
    noise_level = torch.rand(batch, 1)
    resample = torch.rand(clean.shape) < noise_level
    noisy = torch.where(resample, torch.randint_like(clean, VOCAB_SIZE), clean)
    inputs = dict(
        input_ids=ids,
        attention_mask=mask,
        decoder_input_ids=noisy,
        decoder_attention_mask=F.pad(mask, (0, CANVAS_LENGTH), value=1),
    )
    self_conditioning_logits = None
    if self_condition:
        # generate() feeds back the previous step's logits divided by that step's temperature.
        with torch.no_grad():
            logits = model(**inputs).logits
        temperature = T_MIN + (T_MAX - T_MIN) * torch.rand(batch, 1, 1)
        self_conditioning_logits = logits / temperature
    logits = model(**inputs, self_conditioning_logits=self_conditioning_logits).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), clean.reshape(-1))


@torch.no_grad()
def one_shot_accuracy(model: DiffusionGemmaForBlockDiffusion, tokenizer: Tokenizer, task: str, n: int) -> float:
    """Cheap progress signal: exact match of the argmax of a single denoising pass from pure noise."""
    spec = tasks.get_task(task)
    examples = tasks.examples(task, "heldout", n)
    ids, mask = encode_prompts(tokenizer, [e.prompt for e in examples])
    canvas = torch.randint(VOCAB_SIZE, (n, CANVAS_LENGTH))
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        decoder_input_ids=canvas,
        decoder_attention_mask=F.pad(mask, (0, CANVAS_LENGTH), value=1),
    ).logits
    texts = [tokenizer.decode(row, skip_special_tokens=False) for row in logits.argmax(-1).tolist()]
    return sum(spec.score(e.prompt, t) for e, t in zip(examples, texts)) / n


def train(task: str, steps: int, batch_size: int, lr: float, seed: int) -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(build_config())
    tokenizer = build_tokenizer(task)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    stream = tasks.iter_examples(task, "train", seed)
    sc_coin = np.random.default_rng(seed)
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    for step in range(1, steps + 1):
        batch = [next(stream) for _ in range(batch_size)]
        ids, mask = encode_prompts(tokenizer, [e.prompt for e in batch])
        clean = encode_canvases(tokenizer, [e.answer for e in batch])
        loss = diffusion_loss(model, ids, mask, clean, self_condition=bool(sc_coin.random() < 0.5))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == steps:
            model.eval()
            acc = one_shot_accuracy(model, tokenizer, task, 200)
            model.train()
            print(
                f"step {step:5d}  loss {np.mean(losses):.4f}  one-shot held-out acc {acc:.3f}  "
                f"lr {schedule.get_last_lr()[0]:.2e}  {time.perf_counter() - started:.0f}s",
                flush=True,
            )
            losses.clear()
    return model.eval()


def save_checkpoint(model: DiffusionGemmaForBlockDiffusion, task: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = build_generation_config()
    model.save_pretrained(out)
    special = dict(bos_token=tasks.BOS, eos_token=tasks.EOS, pad_token=tasks.PAD, unk_token=tasks.UNK)
    PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(task),
        padding_side="left",
        model_max_length=TEXT_CONFIG["max_position_embeddings"],
        **special,
    ).save_pretrained(out)


@torch.no_grad()
def evaluate(checkpoint: Path, task: str, n: int, seed: int, batch_size: int = 50) -> tuple[float, float]:
    """Held-out exact match and mean denoising steps per block, through transformers' `generate`.

    Steps per row come from `tokens_per_forward` (non-pad new tokens / decoder passes
    of that row), i.e. what the row would have cost alone.
    """
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).eval()
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    spec = tasks.get_task(task)
    pad = model.generation_config.pad_token_id
    examples = tasks.examples(task, "heldout", n)
    torch.manual_seed(seed)
    correct, steps = 0, []
    for start in range(0, n, batch_size):
        chunk = examples[start : start + batch_size]
        ids, mask = encode_prompts(tokenizer, [e.prompt for e in chunk])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=CANVAS_LENGTH)
        new_tokens = out.sequences[:, ids.shape[1] :]
        for example, row, tpf in zip(chunk, new_tokens.tolist(), out.tokens_per_forward.tolist()):
            correct += spec.score(example.prompt, tokenizer.decode(row, skip_special_tokens=False))
            steps.append(sum(t != pad for t in row) / tpf)
    return correct / n, float(np.mean(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sort", choices=sorted(tasks.TASKS))
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-prompts", type=int, default=200)
    args = parser.parse_args()

    torch.set_num_threads(NUM_THREADS)
    started = time.perf_counter()
    model = train(args.task, args.steps, args.batch_size, args.lr, args.seed)
    print(f"training took {time.perf_counter() - started:.0f}s")
    save_checkpoint(model, args.task, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB)")

    accuracy, mean_steps = evaluate(args.out, args.task, args.eval_prompts, args.seed)
    print(
        f"held-out exact match {accuracy:.3f} on {args.eval_prompts} prompts; "
        f"mean denoising steps per block {mean_steps:.2f} (max {MAX_DENOISING_STEPS})"
    )


if __name__ == "__main__":
    main()
