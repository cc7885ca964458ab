"""Running one flow block's cached step at a position: the seam between samplers and backends.

A sampler inverts a block by calling its runner: `start` (a fresh cache for so many rows, and
the text prefix), then `step(inputs, index)` for chunks of tokens whose first sits at image
token `index`. The MLX block (`MLXBlockRunner`) and the Core ML packages
(`mlx_starflow.convert.coreml.pipeline`) implement it, so `flow.iter_blocks` is the only
block loop in Python.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx

from .flow_block import FlowBlock
from .kv_cache import KVCache


class BlockRunner(Protocol):
    """One flow block seen from a sampler."""

    flipped: bool
    """Whether the block reads the tokens in reversed raster order."""
    has_text: bool
    """Whether the block reads text states as a prefix (and takes guidance)."""
    sos: mx.array
    """The block's start-of-sequence token (token_channels,), the input that predicts token 0."""

    def start(self, rows: int, text: mx.array | None) -> None:
        """A fresh cache for `rows` rows, filled with the text prefix when the block reads text."""

    def step(self, inputs: mx.array, index: int) -> tuple[mx.array, mx.array]:
        """(scale logit, shift) in float32 for `inputs` (rows, n, C·p²), the block's previous
        tokens ([sos, x_0, …] shifted by one), the first at image token `index`."""

    @property
    def pending(self) -> list[mx.array]:
        """Arrays a step left to evaluate (the cache), evaluated with the sampler's own."""


ATTENTION_BUCKET = 128
"""Cache positions per attention length a step graph is compiled for. A step reads the filled
part of the cache rounded up to this, not the whole cache; at full width the cache is about a
tenth of a step's bytes (`make bench ONLY=overheads`)."""


class MLXBlockRunner:
    """An MLX `FlowBlock` with a fixed-size KV cache and (optionally compiled) step graphs, one
    per chunk size and attention bucket."""

    def __init__(self, block: FlowBlock, cos: mx.array, sin: mx.array, text_length: int, token_count: int,
                 compiled: bool = True, attn_temp: float = 1.0, attention_bucket: int = ATTENTION_BUCKET):
        self.block, self.cos, self.sin, self.attn_temp = block, cos, sin, attn_temp
        self.attention_bucket = attention_bucket
        self.text_length, self.token_count = text_length, token_count
        self.flipped, self.has_text = block.flipped, block.has_text
        self.sos = block.sos.astype(mx.float32).reshape(-1)
        self.cache = KVCache([], [])

        def step(inputs: mx.array, position: mx.array, keys: list, values: list, visible: int):
            cache = KVCache(list(keys), list(values))
            a, b = block.step(inputs, position, cos, sin, cache, attn_temp, visible)
            return a, b, cache.keys, cache.values

        self._step = mx.compile(step) if compiled else step

    def start(self, rows: int, text: mx.array | None) -> None:
        self.cache = self.block.make_cache(rows, self.text_length + self.token_count)
        if text is not None:
            self.block.prefill(text, self.cos, self.sin, self.cache, self.attn_temp)

    def step(self, inputs: mx.array, index: int) -> tuple[mx.array, mx.array]:
        position = mx.array([self.text_length + index], dtype=mx.int32)
        visible = self.visible_length(self.text_length + index + inputs.shape[1])
        a, b, self.cache.keys, self.cache.values = self._step(inputs, position, self.cache.keys, self.cache.values, visible)
        return a, b

    def visible_length(self, end: int) -> int:
        """Cache positions a chunk ending before `end` attends to: `end` rounded up to a whole
        attention bucket, so a block compiles at most length / bucket step graphs."""
        bucket = self.attention_bucket
        return min(-(-end // bucket) * bucket, self.text_length + self.token_count)

    @property
    def pending(self) -> list[mx.array]:
        return self.cache.state
