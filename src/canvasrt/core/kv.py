"""Writing chunks into the K/V buffers and building the context mask: written once for every backend.

Full-attention layers hold one slot per absolute position; sliding layers a ring of `slots` entries where position
p lives in slot p mod slots (`KVLayer`). A chunk's K/V land at its positions; of a chunk longer than a ring only the
last `slots` tokens survive, exactly like transformers' sliding cache. The functions index with numpy arrays, which
numpy arrays and torch tensors (host or CUDA) both accept, so the host backends, the torch backend and the TensorRT
backend share them. A call reads only the buffers' leading slots that hold context (`leading_slots`, with the spans of
`core.contract.kv_spans`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .contract import KVLayer

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def slot_index(layer: KVLayer, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a chunk's positions [S] (shared by all rows): which chunk tokens to keep and the slots they go to."""
    keep = np.arange(positions.shape[0])
    if layer.ring:
        keep = keep[-layer.slots :]
        return keep, positions[keep] % layer.slots
    return keep, positions


def write_chunk(
    layout: Sequence[KVLayer],
    key_buffers: Sequence[Any],
    value_buffers: Sequence[Any],
    positions: np.ndarray,
    keys: Sequence[Any],
    values: Sequence[Any],
) -> None:
    """Writes a chunk's per-layer K/V [B, heads, S, d] into the buffers [B, heads, slots, d] at `positions` [S]."""
    for layer, k_buf, v_buf, k, v in zip(layout, key_buffers, value_buffers, keys, values):
        keep, slots = slot_index(layer, positions)
        k_buf[:, :, slots] = k[:, :, keep]
        v_buf[:, :, slots] = v[:, :, keep]


def context_mask(padding: np.ndarray, width: int) -> np.ndarray:
    """[B, width] bool: False only at the prompt's left padding (padding [B, P]: True for real prompt tokens)."""
    mask = np.ones((padding.shape[0], width), dtype=bool)
    mask[:, : padding.shape[1]] = padding
    return mask


def leading_slots(buffers: Sequence[Any], spans: Sequence[int]) -> list[Any]:
    """Each buffer's first spans[i] slots as a dense tensor, which is what the graphs and engines take: the buffer
    itself when the span is all of it, else a copy of those slots only (a cost that follows the live context)."""
    fed = []
    for buffer, span in zip(buffers, spans):
        if span == buffer.shape[2]:
            fed.append(buffer)
        else:
            view = buffer[:, :, :span]
            fed.append(view.contiguous() if hasattr(view, "contiguous") else np.ascontiguousarray(view))
    return fed


def buffer_shapes(layout: Sequence[KVLayer], batch: int) -> list[tuple[int, int, int, int]]:
    return [(batch, layer.num_kv_heads, layer.slots, layer.head_dim) for layer in layout]
