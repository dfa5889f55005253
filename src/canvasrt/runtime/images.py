"""Image prompts: image files decoded with Pillow, preprocessed by transformers' own Gemma 4 image processor (configured
from the directory's preprocessor_config.json), encoded to soft tokens by a vision encoder (the vision graph on ONNX
Runtime, or the vision model on torch), and laid into a prompt as transformers' Gemma 4 processor lays them.

Prompt layout: each `<|image|>` (the tokenizer's image token) in the prompt text marks one image, in the order the
images are given, and becomes begin-of-image, one image token per soft token of that image, end-of-image
(`Gemma4Processor.replace_image_token`). A prompt without markers gets its images at its start. A prompt of token
ids marks an image with one image token id the same way.

A batch of prompts may carry images per prompt (a prompts file's `"images"`, or `--image` for every prompt:
`with_images`); `place_prompts` lays each prompt's own images into its row.

The soft tokens replace the image tokens' embeddings in the encoder only (`DiffusionGemmaText.place_images`); a chunk
of prefill never splits an image (`image_chunks`), so the tokens of one image can attend to each other where the
model says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..core.config import VisionConfig
from ..core.errors import CanvasrtError

PREPROCESSOR_CONFIG = "preprocessor_config.json"
IMAGE_FORMATS = "PNG, JPEG, WebP, GIF or BMP"
BOS_ID = 2  # DiffusionGemma's <bos>: images without markers go after it


@dataclass
class ImageBatch:
    """The processor's output for the images of one request, in the order given."""

    pixel_values: np.ndarray  # [images, patches, 3 * patch^2] float32 in [0, 1]
    positions: np.ndarray  # [images, patches, 2] int64, (-1, -1) for padding patches
    soft_tokens: list[int]  # soft tokens per image

    @property
    def count(self) -> int:
        return len(self.soft_tokens)


class VisionEncoder(Protocol):
    """Runs the vision graph (tower + projector): soft tokens [images, tokens, text hidden] as host float32 and the
    mask of real ones [images, tokens]."""

    def encode(self, pixel_values: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def decode_image(source: Path | bytes, name: str | None = None) -> Any:
    """An image file (a path, or its encoded bytes as a server receives them) as an RGB Pillow image, fully decoded;
    one line naming the problem otherwise. name: how the error names an image given as bytes."""
    import io

    from PIL import Image, UnidentifiedImageError

    path = source if isinstance(source, Path) else name or "image"
    if isinstance(source, Path) and not source.exists():
        raise CanvasrtError(f"image {path} does not exist; pass an image file")
    if isinstance(source, Path) and source.is_dir():
        raise CanvasrtError(f"image {path} is a directory; pass an image file ({IMAGE_FORMATS})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
            with opened as image:
                image.load()
                width, height = image.size
                if width < 1 or height < 1:
                    raise CanvasrtError(f"image {path} is empty ({width}x{height} pixels); pass an image with pixels")
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CanvasrtError(
            f"image {path} has more than {Image.MAX_IMAGE_PIXELS} pixels, beyond what is decoded; downscale it"
        ) from None
    except UnidentifiedImageError:
        raise CanvasrtError(f"{path} is not an image Pillow can read; pass a {IMAGE_FORMATS} file") from None
    except OSError as exc:  # truncated or corrupt data, unreadable file
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CanvasrtError(f"image {path} cannot be decoded ({reason}); pass an intact image file") from None


class ImageProcessor:
    """transformers' Gemma 4 image processor (the Pillow backend), from `directory`'s preprocessor_config.json."""

    def __init__(self, directory: Path):
        path = directory / PREPROCESSOR_CONFIG
        if not path.is_file():
            raise CanvasrtError(
                f"{directory} has no {PREPROCESSOR_CONFIG}, the image processor's settings; export with --vision "
                "from a checkpoint that has one"
            )
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        try:
            self.processor = Gemma4ImageProcessorPil.from_pretrained(str(directory))
        except (ValueError, TypeError, OSError) as exc:
            raise CanvasrtError(f"{path} is not a Gemma 4 image processor config ({exc}); fix or re-copy it") from None

    @property
    def max_soft_tokens(self) -> int:
        return int(self.processor.max_soft_tokens)

    def __call__(self, paths: list[Path] | list[bytes]) -> ImageBatch:
        """Images given as files, or as their encoded bytes (named image 0, image 1, ... in errors)."""
        images = [decode_image(path, f"image {i}") for i, path in enumerate(paths)]
        try:
            batch = self.processor(images, return_tensors="np")
        except ValueError as exc:  # an aspect ratio no whole number of patches fits, say
            names = ", ".join(str(p) if isinstance(p, Path) else f"image {i}" for i, p in enumerate(paths))
            reason = " ".join(str(exc).split())
            raise CanvasrtError(
                f"the image processor refuses {names} ({reason}); pass images closer to a square"
            ) from None
        return ImageBatch(
            np.asarray(batch["pixel_values"], np.float32),
            np.asarray(batch["image_position_ids"], np.int64),
            [int(n) for n in np.asarray(batch["num_soft_tokens_per_image"]).reshape(-1)],
        )


def soft_tokens(encoder: VisionEncoder, batch: ImageBatch) -> np.ndarray:
    """The soft tokens of every image, in order, padding stripped: [sum of soft tokens, text hidden] float32."""
    features, real = encoder.encode(batch.pixel_values, batch.positions)
    counts = real.sum(axis=1).tolist()
    if counts != batch.soft_tokens:
        raise CanvasrtError(
            f"the vision graph gives {counts} soft tokens per image where the image processor counts "
            f"{batch.soft_tokens}: its preprocessor_config.json does not belong to this vision tower; copy the "
            "checkpoint's own"
        )
    return np.ascontiguousarray(features[real], dtype=np.float32)


def expand_text(text: str, soft: list[int], markers: tuple[str, str, str]) -> str:
    """The prompt text with each image marker replaced by begin-of-image, the image's soft tokens and end-of-image
    (markers: the tokenizer's begin-of-image, image and end-of-image tokens); images go first when it has none."""
    boi, image, eoi = markers
    found = text.count(image)
    if found == 0:
        text = image * len(soft) + text
    elif found != len(soft):
        raise CanvasrtError(
            f"the prompt marks {found} image(s) with {image} but {len(soft)} image(s) were given; mark each image "
            "once, or leave the markers out to put the images at the prompt's start"
        )
    parts = text.split(image)
    return parts[0] + "".join(boi + image * n + eoi + rest for n, rest in zip(soft, parts[1:]))


def expand_ids(ids: list[int], soft: list[int], vision: VisionConfig) -> list[int]:
    """`expand_text` for a prompt of token ids: each image token id marks one image (images first, after a leading
    BOS, when none does)."""
    found = ids.count(vision.image_token_id)
    if found == 0:
        start = 1 if ids and ids[0] == BOS_ID else 0
        ids = ids[:start] + [vision.image_token_id] * len(soft) + ids[start:]
    elif found != len(soft):
        raise CanvasrtError(
            f"the prompt ids mark {found} image(s) with image token {vision.image_token_id} but {len(soft)} "
            "image(s) were given; mark each image once, or leave the markers out to put the images first"
        )
    expanded: list[int] = []
    images = iter(soft)
    for token in ids:
        if token == vision.image_token_id:
            expanded += [vision.boi_token_id, *[vision.image_token_id] * next(images), vision.eoi_token_id]
        else:
            expanded.append(token)
    return expanded


@dataclass
class PromptImages:
    """The soft tokens of a request's images and where they go: row i of `tokens` replaces the embedding of the
    encoder token at `slot == i` (slot [B, P] over the left-padded prompt, -1 for text tokens)."""

    tokens: np.ndarray  # [n, text hidden] float32
    slot: np.ndarray  # [B, P] int64

    @classmethod
    def place(cls, tokens: np.ndarray, ids: np.ndarray, vision: VisionConfig) -> PromptImages:
        """Soft tokens assigned to the image tokens of `ids` [B, P] in row-major order."""
        is_image = ids == vision.image_token_id
        if int(is_image.sum()) != tokens.shape[0]:
            raise CanvasrtError(
                f"the prompt holds {int(is_image.sum())} image tokens but its images give {tokens.shape[0]} soft "
                "tokens; let canvasrt expand the image markers (one per image)"
            )
        slot = np.full(ids.shape, -1, np.int64)
        slot[is_image] = np.arange(tokens.shape[0])
        return cls(tokens, slot)

    def chunk(self, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The soft tokens of prompt columns [begin, end) and their slots renumbered to index them."""
        slot = self.slot[:, begin:end]
        taken = slot >= 0
        local = np.full(slot.shape, -1, np.int64)
        local[taken] = np.arange(int(taken.sum()))
        return np.ascontiguousarray(self.tokens[slot[taken]]), local


def image_chunks(slot: np.ndarray | None, length: int, limit: int) -> list[tuple[int, int]]:
    """Prefill chunks [begin, end) of at most `limit` columns, none ending inside an image (a run of image tokens in
    any row); an image longer than `limit` is refused."""
    if slot is None:
        return [(begin, min(begin + limit, length)) for begin in range(0, length, limit)]
    inside = (slot >= 0).any(axis=0)
    # Column c continues an image when it and the column before it both hold image tokens of one run
    continues = np.zeros(length, bool)
    continues[1:] = inside[1:] & inside[:-1]
    chunks, begin = [], 0
    while begin < length:
        end = min(begin + limit, length)
        while end < length and continues[end] and end > begin:
            end -= 1
        if end == begin:
            run = begin
            while run < length and (run == begin or continues[run]):
                run += 1
            raise CanvasrtError(
                f"an image of {run - begin} soft tokens does not fit one prefill chunk of {limit} tokens; re-export "
                "with a larger --max-prefill, or use a smaller image"
            )
        chunks.append((begin, end))
        begin = end
    return chunks


def image_prompt_row(
    prompt: dict[str, Any], batch: ImageBatch, vision: VisionConfig, codec_dir: Path, vocab_size: int
) -> list[int]:
    """The token ids of one prompt ({"text": ...} or {"ids": [...]}) with its images' markers expanded."""
    from .prompts import TextCodec, check_ids

    if "ids" in prompt:
        return expand_ids(check_ids(prompt["ids"]), batch.soft_tokens, vision)
    codec = TextCodec(codec_dir, vocab_size)
    ids = (vision.boi_token_id, vision.image_token_id, vision.eoi_token_id)
    markers = tuple(codec.tokenizer.id_to_token(i) for i in ids)
    if any(marker is None for marker in markers):
        raise CanvasrtError(
            f"{codec_dir}/tokenizer.json has no image tokens (ids {', '.join(map(str, ids))}); copy the checkpoint's "
            "own tokenizer there, or pass --prompt-ids"
        )
    return codec.encode(expand_text(prompt["text"], batch.soft_tokens, markers))  # type: ignore[arg-type]


def encode_images(backend: Any, directory: Path, paths: list[Path]) -> tuple[ImageBatch, np.ndarray]:
    """The images of a request preprocessed and run through `backend`'s vision encoder: the processor's batch and
    the soft tokens [sum of soft tokens, text hidden] float32. Refused first where the backend takes no images."""
    encoder = backend.executor.vision_encoder()
    batch = ImageProcessor(directory)(paths)
    return batch, soft_tokens(encoder, batch)


def with_images(prompts: list[dict[str, Any]], paths: list[Path]) -> list[dict[str, Any]]:
    """The prompts with `paths` (`--image`) as the images of each; prompts that name images of their own (a prompts
    file's "images") take no `--image` besides."""
    if not paths:
        return prompts
    if any("images" in prompt for prompt in prompts):
        raise CanvasrtError(
            'the prompts file names images of its own ("images"); give the images there or with --image, not both'
        )
    return [{**prompt, "images": list(paths)} for prompt in prompts]


def place_prompts(
    backend: Any,
    directory: Path,
    prompts: list[dict[str, Any]],
    pad_id: int,
    encoded: dict[tuple[Path, ...], tuple[ImageBatch, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray, PromptImages | None]:
    """The left-padded ids of prompts ({"text": ...} or {"ids": [...]}, each with optional "images": [paths]) and
    their padding mask, with every prompt's images encoded by `backend`'s vision encoder and placed in its row (None
    when no prompt has images). directory: the tokenizer's and the image processor's. encoded: images already
    encoded, by their paths, filled as it goes (a set of images that many prompts share is encoded once)."""
    from .loop import left_pad
    from .prompts import prompt_rows

    vocab = backend.spec.model.vocab_size
    rows, tokens = [], []
    for prompt in prompts:
        paths = tuple(prompt.get("images") or ())
        if not paths:
            rows += prompt_rows([prompt], directory, vocab)
            continue
        done = encoded.get(paths) if encoded is not None else None
        if done is None:
            done = encode_images(backend, directory, list(paths))
            if encoded is not None:
                encoded[paths] = done
        batch, soft = done
        rows.append(image_prompt_row(prompt, batch, backend.executor.vision, directory, vocab))
        tokens.append(soft)
    ids, padding = left_pad(rows, pad_id)
    if not tokens:
        return ids, padding, None
    return ids, padding, PromptImages.place(np.concatenate(tokens), ids, backend.executor.vision)
