"""Prompts in, text out: the tokenizer an artifact or checkpoint directory carries, and the prompt sources of the CLI.

Uses the `tokenizers` library only (tokenizer.json), so it runs wherever the ONNX Runtime path runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CanvasrtError


class TextCodec:
    def __init__(self, directory: Path):
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CanvasrtError(f"{directory} has no tokenizer.json; pass token ids (--prompt-ids) instead of text")
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
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
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise CanvasrtError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def read_prompts_file(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line: {"text": ...} or {"ids": [...]}."""
    if not path.is_file():
        raise CanvasrtError(f"prompts file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise CanvasrtError(f"{path}:{number} is not JSON; each line must be {{\"text\": ...}} or {{\"ids\": [...]}}") from None
        if not isinstance(entry, dict) or not ({"text", "ids"} & entry.keys()):
            raise CanvasrtError(f"{path}:{number} needs a \"text\" or an \"ids\" field")
        prompts.append(entry)
    if not prompts:
        raise CanvasrtError(f"prompts file {path} holds no prompts")
    return prompts


def prompt_rows(prompts: list[dict[str, Any]], codec_dir: Path) -> list[list[int]]:
    codec = None
    rows = []
    for entry in prompts:
        if "ids" in entry:
            ids = entry["ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise CanvasrtError(f"prompt ids must be a list of integers, got {ids!r}")
            rows.append(ids)
        else:
            codec = codec or TextCodec(codec_dir)
            rows.append(codec.encode(entry["text"]))
    return rows
