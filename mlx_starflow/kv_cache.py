"""A fixed-size key/value cache written at explicit positions.

The sequence length (text prefix + tokens) and the batch (guidance rows included) are known
before sampling, so each layer's buffers are allocated once. Writing at an explicit position,
instead of appending, lets a Jacobi iteration rewrite its block in place (no roll-back
bookkeeping) and keeps one step graph for every position of an attention bucket, so it
compiles once per bucket (`block_runner.ATTENTION_BUCKET`).
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Per-layer keys and values (B, heads, length, head_dim); keys are stored after RoPE."""

    def __init__(self, keys: list[mx.array], values: list[mx.array]):
        self.keys = keys
        self.values = values

    @classmethod
    def allocate(cls, num_layers: int, batch: int, heads: int, length: int, head_dim: int, dtype: mx.Dtype) -> "KVCache":
        shape = (batch, heads, length, head_dim)
        return cls([mx.zeros(shape, dtype) for _ in range(num_layers)], [mx.zeros(shape, dtype) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def write(self, layer: int, keys: mx.array, values: mx.array, position: mx.array) -> tuple[mx.array, mx.array]:
        """Store a chunk's keys/values at `position` and return the layer's whole buffers."""
        self.keys[layer] = mx.slice_update(self.keys[layer], keys, position, axes=(2,))
        self.values[layer] = mx.slice_update(self.values[layer], values, position, axes=(2,))
        return self.keys[layer], self.values[layer]

    @property
    def state(self) -> list[mx.array]:
        return [*self.keys, *self.values]
