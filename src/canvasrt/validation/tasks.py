"""Synthetic, exactly checkable tasks for the demo DiffusionGemma model.

The tiny checkpoint in ``tests/fixtures`` is trained on one of these tasks, so the
runtime can measure end-to-end accuracy (for example before and after FP8
quantization) without a reference model: every prompt carries its own answer.

A task maps a list of single digits to another list of digits:

    sort 3 1 2 =      ->  1 2 3
    reverse 3 1 2 =   ->  2 1 3

Prompts and answers are whitespace-separated words drawn from the task's
alphabet, so a word-level tokenizer (one id per word) covers them exactly.

Examples come in three disjoint splits.  Each prompt belongs to exactly one split,
decided by a stable hash of its text, and a split's generator rejects prompts of
the other splits; the splits therefore stay disjoint for every seed, and no
held-out or calibration prompt can ever leak into training.

This module imports only the standard library and numpy so that a server without
torch can use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

PAD = "<pad>"
EOS = "<eos>"
BOS = "<bos>"
UNK = "<unk>"
IMAGE = "<image>"
BOI = "<boi>"
EOI = "<eoi>"
# Ids follow Gemma (pad 0, eos 1, bos 2, unk 3); the image markers are only
# reserved so that the model config's image/boi/eoi ids point inside the vocab.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK, IMAGE, BOI, EOI)

SPLITS: tuple[str, ...] = ("train", "heldout", "calibration")
# Out of 100 hash buckets: 10 held out, 5 for calibration, the rest train.
_SPLIT_BUCKETS: dict[str, range] = {
    "heldout": range(10),
    "calibration": range(10, 15),
    "train": range(15, 100),
}
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class Example:
    """One prompt and its reference answer (both whitespace-separated words)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A digit-list transformation, named by the first word of its prompts."""

    name: str
    transform: Callable[[list[str]], list[str]]
    min_items: int = 3
    max_items: int = 8

    @property
    def alphabet(self) -> tuple[str, ...]:
        """Every word that can appear in a prompt or an answer, in a fixed order."""
        return (self.name, "=", *DIGITS)

    @property
    def max_answer_words(self) -> int:
        """Longest answer, in words (= tokens); the answer plus EOS must fit one canvas."""
        return self.max_items

    def make_example(self, rng: np.random.Generator) -> Example:
        """Draws one random example (of any split)."""
        n_items = int(rng.integers(self.min_items, self.max_items + 1))
        items = [DIGITS[d] for d in rng.integers(0, 10, size=n_items)]
        return Example(prompt=" ".join([self.name, *items, "="]), answer=" ".join(self.transform(items)))

    def solve(self, prompt: str) -> str:
        """The reference answer of a prompt of this task; raises ValueError on a malformed prompt."""
        words = prompt.split()
        if len(words) < 2 or words[0] != self.name or words[-1] != "=":
            raise ValueError(f"not a {self.name!r} prompt: {prompt!r}")
        items = words[1:-1]
        if not all(item in DIGITS for item in items):
            raise ValueError(f"{self.name!r} prompts hold single digits only: {prompt!r}")
        return " ".join(self.transform(items))

    def score(self, prompt: str, generated_text: str) -> bool:
        """Exact match of a generation (see `clean_generation`) against the reference answer."""
        return clean_generation(generated_text) == self.solve(prompt)


TASKS: dict[str, Task] = {
    # Items are single digits, so string order is numeric order.
    "sort": Task("sort", sorted),
    "reverse": Task("reverse", lambda items: items[::-1]),
}


def get_task(name: str) -> Task:
    """Looks a task up by name; raises KeyError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a hash that is stable across processes and platforms."""
    normalised = " ".join(prompt.split())
    bucket = int.from_bytes(hashlib.blake2b(normalised.encode(), digest_size=8).digest(), "big") % 100
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def iter_examples(task: str, split: str, seed: int = 0) -> Iterator[Example]:
    """Endless deterministic stream of examples of one split (repeats are possible)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    spec = get_task(task)
    # The split index is part of the seed so that equal seeds still give unrelated streams per split.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    while True:
        example = spec.make_example(rng)
        if split_of(example.prompt) == split:
            yield example


def examples(task: str, split: str, n: int, seed: int = 0, unique: bool = True) -> list[Example]:
    """The first `n` examples of `iter_examples`, without repeated prompts when `unique`."""
    out: list[Example] = []
    seen: set[str] = set()
    for example in iter_examples(task, split, seed):
        if len(out) == n:
            break
        if unique and example.prompt in seen:
            continue
        seen.add(example.prompt)
        out.append(example)
    return out


def vocabulary(task: str, size: int) -> list[str]:
    """Token strings indexed by id: specials, the task alphabet, then `<unusedN>` filler up to `size`."""
    words = [*SPECIAL_TOKENS, *get_task(task).alphabet]
    if size < len(words):
        raise ValueError(f"vocab size {size} is below the {len(words)} tokens task {task!r} needs")
    return words + [f"<unused{i}>" for i in range(size - len(words))]


def clean_generation(text: str) -> str:
    """Drops everything from the first EOS or pad marker on and normalises whitespace.

    Accepts text decoded with or without special tokens, so callers need not agree on
    `skip_special_tokens`.
    """
    for marker in (EOS, PAD):
        text = text.split(marker, 1)[0]
    return " ".join(text.split())
