"""Prompts in, text out: the tokenizer an artifact or checkpoint directory carries, and the prompt sources of the CLI.

Uses the `tokenizers` library only (tokenizer.json), so it runs wherever the ONNX Runtime path runs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CanvasrtError

INT64 = (-(1 << 63), (1 << 63) - 1)  # token ids travel as int64 (numpy, ONNX, Triton): larger ones cannot be ids
_ID = re.compile(r"[+-]?[0-9]+")


class UnreadableTokenizer(CanvasrtError):
    """A tokenizer.json that is there but cannot be read: callers that can do without text (ids given, ids printed)
    tell it apart from a directory without one."""

    def __init__(self, path: Path, reason: str):
        super().__init__(
            f"{path} is not a tokenizers tokenizer.json ({reason}); copy the checkpoint's tokenizer.json "
            "back or pass --prompt-ids"
        )
        self.path, self.reason = path, reason


class TextCodec:
    """A directory's tokenizer.json. With `vocab_size` (the model's), a tokenizer whose ids reach past the model's
    vocabulary is refused: it is another model's, and its ids would index past the embedding or decode the model's
    tokens as other text."""

    def __init__(self, directory: Path, vocab_size: int | None = None):
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CanvasrtError(f"{directory} has no tokenizer.json; pass token ids (--prompt-ids) instead of text")
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises bare Exception for every unreadable file, nothing narrower
            raise UnreadableTokenizer(path, " ".join(str(exc).split()) or type(exc).__name__) from None
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab_size is not None and size > vocab_size:
            raise CanvasrtError(
                f"{path} has {size} tokens, more than the model's vocabulary of {vocab_size}: it is another model's "
                "tokenizer; copy the checkpoint's own tokenizer.json there"
            )

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 arrive from argv as lone surrogates
            raise CanvasrtError(f"prompt text {text!r} is not valid UTF-8; pass UTF-8 text or --prompt-ids") from None
        # The tokenizer's own post-processor decides about special tokens (a <bos>, say), as in training.
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def piece(self, token: int) -> str:
        """One token as shown in a live canvas: word-level vocabularies (no decoder) get their separating space."""
        text = self.decode([token])
        return text + " " if text and self.tokenizer.decoder is None else text


def until_eos(ids: np.ndarray, eos_ids: tuple[int, ...], pad_id: int | None) -> list[int]:
    """Generated ids up to (not including) the first EOS, pads dropped."""
    kept = []
    for token in ids.tolist():
        if token in eos_ids:
            break
        if token != pad_id:
            kept.append(token)
    return kept


def parse_ids(text: str) -> list[int]:
    """'5, 6,7' -> [5, 6, 7]. Spaces may surround an id, never split one: '1 2, 3' is refused, not read as 12, 3."""
    parts = [part.strip() for part in text.split(",")]
    if parts and not parts[-1]:
        parts.pop()  # a trailing comma
    if not parts or not all(_ID.fullmatch(part) for part in parts):
        raise CanvasrtError(f"--prompt-ids must be comma-separated integers like 5,6,7, got {text!r}")
    return [int(part) for part in parts]  # prompt_rows checks their range, as for a prompts file's


def check_ids(ids: Any) -> list[int]:
    """A prompt's ids as given (CLI, prompts file): a list of integers within int64; the vocabulary is checked
    against the model later, with the request."""
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CanvasrtError(f"prompt ids must be a list of integers, got {ids!r}")
    outside = [i for i in ids if not INT64[0] <= i <= INT64[1]]
    if outside:
        raise CanvasrtError(
            f"prompt token id {outside[0]} does not fit in int64, so it is no token id; pass ids of "
            "the model's vocabulary"
        )
    return ids


def read_prompts_file(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line: {"text": ...} or {"ids": [...]}, optionally with "images": [image files] for that
    prompt (paths relative to the prompts file's folder, or to the working directory for `-`). `-` reads standard
    input; any readable file (a pipe, /dev/stdin, /dev/null) is read as it is."""
    if str(path) != "-" and not path.exists():
        raise CanvasrtError(f"prompts file {path} does not exist")
    if path.is_dir():
        raise CanvasrtError(f"prompts file {path} is a directory; pass a JSONL file")
    try:
        text = sys.stdin.buffer.read().decode("utf-8") if str(path) == "-" else path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CanvasrtError(
            f"prompts file {path} is not UTF-8 text (byte {exc.start}); re-encode it as UTF-8"
        ) from None
    except OSError as exc:
        raise CanvasrtError(
            f"cannot read prompts file {path}: {exc.strerror or exc}; pass a readable JSONL file"
        ) from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise CanvasrtError(
                f'{path}:{number} is not JSON; each line must be {{"text": ...}} or {{"ids": [...]}}'
            ) from None
        if not isinstance(entry, dict) or not ({"text", "ids"} & entry.keys()):
            raise CanvasrtError(f'{path}:{number} needs a "text" or an "ids" field')
        if "ids" not in entry and not isinstance(entry["text"], str):
            raise CanvasrtError(f'{path}:{number}: "text" must be a string, got {entry["text"]!r}')
        if "images" in entry:
            images = entry["images"]
            if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
                raise CanvasrtError(
                    f'{path}:{number}: "images" must be a list of image file paths, got {images!r}; leave it out '
                    "for a text prompt"
                )
            folder = Path(".") if str(path) == "-" else path.parent
            entry["images"] = [folder / image for image in images]
        prompts.append(entry)
    if not prompts:
        raise CanvasrtError(f"prompts file {path} holds no prompts")
    return prompts


def prompt_rows(prompts: list[dict[str, Any]], codec_dir: Path, vocab_size: int | None = None) -> list[list[int]]:
    codec = None
    rows = []
    for entry in prompts:
        if "ids" in entry:
            rows.append(check_ids(entry["ids"]))
        else:
            codec = codec or TextCodec(codec_dir, vocab_size)
            rows.append(codec.encode(entry["text"]))
    return rows
