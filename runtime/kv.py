"""K/V buffer layout of a set of artifacts, and the host-memory buffers the CPU backends write in place.

Full-attention layers hold one slot per absolute position; sliding layers a ring of `slots` entries where position
p lives in slot p mod slots (manifest `kv_layout`). A chunk's K/V land at its positions; of a chunk longer than a
ring only the last `slots` tokens survive, exactly like transformers' sliding cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class LayerBuffer:
    num_kv_heads: int
    head_dim: int
    slots: int
    ring: bool


def layout_from_manifest(manifest: dict[str, Any]) -> list[LayerBuffer]:
    return [
        LayerBuffer(
            num_kv_heads=entry["num_kv_heads"],
            head_dim=entry["head_dim"],
            slots=entry["slots"],
            ring=entry["slots"] < manifest["capacity"]["max_context"],
        )
        for entry in manifest["kv_layout"]
    ]


def slot_index(layer: LayerBuffer, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a chunk's positions [S] (shared by all rows): which chunk tokens to keep and the slots they go to."""
    keep = np.arange(positions.shape[0])
    if layer.ring:
        keep = keep[-layer.slots :]
        return keep, positions[keep] % layer.slots
    return keep, positions


class HostKVBuffers:
    """Per-layer K and V arrays [B, heads, slots, head_dim] in host memory, allocated once per batch size."""

    def __init__(self, layout: list[LayerBuffer], dtype: Any):
        self.layout = layout
        self.dtype = dtype
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.batch = 0

    def reset(self, batch: int) -> None:
        if batch != self.batch:
            shapes = [(batch, layer.num_kv_heads, layer.slots, layer.head_dim) for layer in self.layout]
            self.keys = [np.zeros(shape, self.dtype) for shape in shapes]
            self.values = [np.zeros(shape, self.dtype) for shape in shapes]
            self.batch = batch
        else:
            for array in (*self.keys, *self.values):
                array.fill(0)

    def write(self, positions: np.ndarray, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        """positions [S]: the chunk's absolute positions (the same for every row, as in transformers' generate)."""
        for layer, k_buf, v_buf, k, v in zip(self.layout, self.keys, self.values, new_keys, new_values):
            keep, slots = slot_index(layer, positions)
            k_buf[:, :, slots] = k[:, :, keep]
            v_buf[:, :, slots] = v[:, :, keep]


def context_mask(padding: np.ndarray, capacity: int) -> np.ndarray:
    """[B, capacity] bool: False only at the prompt's left padding."""
    mask = np.ones((padding.shape[0], capacity), dtype=bool)
    mask[:, : padding.shape[1]] = padding
    return mask
