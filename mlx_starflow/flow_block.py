"""One autoregressive flow block (official `MetaBlock`).

A block reads its tokens in its own order (raster, or reversed raster when `flipped`),
prepends a learned SOS token, and predicts token t's Gaussian from tokens < t. The deep block
also reads the projected text states as a causal prefix of its attention, with no padding mask.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import FlowConfig
from .kv_cache import KVCache
from .layers import TransformerLayer, UnitOffsetRMSNorm
from .sampling import soft_clip


class FlowBlock(nn.Module):
    def __init__(self, config: FlowConfig, num_layers: int, flipped: bool, txt_dim: int):
        super().__init__()
        tokens = config.token_channels
        self.flipped = flipped
        self.has_text = txt_dim > 0
        self.soft_clip_bound = config.soft_clip
        self.sos = mx.zeros((1, 1, tokens))
        self.proj_in = nn.Linear(tokens, config.channels)
        if self.has_text:
            self.proj_txt = nn.Linear(txt_dim, config.channels)
        self.layers = [
            TransformerLayer(config.channels, config.head_dim, config.expansion, config.use_bias, config.layer_norm_eps)
            for _ in range(num_layers)
        ]
        if config.use_final_norm:
            self.final_norm = UnitOffsetRMSNorm(config.channels, config.rms_norm_eps)
        self.proj_out = nn.Linear(config.channels, 2 * tokens)

    @property
    def compute_dtype(self) -> mx.Dtype:
        """The dtype the transformer runs in (the SOS embedding keeps the source dtype)."""
        return self.sos.dtype

    def shifted_inputs(self, tokens: mx.array) -> mx.array:
        """[sos, u_0, …, u_{N-2}]: the input that predicts each token from the ones before it."""
        sos = mx.broadcast_to(self.sos, (tokens.shape[0], 1, tokens.shape[2])).astype(tokens.dtype)
        return mx.concatenate([sos, tokens[:, :-1]], axis=1)

    def head(self, h: mx.array) -> tuple[mx.array, mx.array]:
        """Hidden states → (scale logit, shift), soft-clipped together.

        The final norm and the output projection run in float32 whatever the weights' dtype,
        as the official float32 autocast around them: the projection sets every scale, and a
        half-precision rounding there moves the whole sample.
        """
        h = h.astype(mx.float32)
        if "final_norm" in self:
            h = self.final_norm(h)
        weight, bias = self.proj_out.weight.astype(mx.float32), self.proj_out.bias.astype(mx.float32)
        out = soft_clip(mx.addmm(bias, h, weight.T), self.soft_clip_bound)
        return mx.split(out, 2, axis=-1)

    def __call__(
        self, tokens: mx.array, text: mx.array | None, cos: mx.array, sin: mx.array, checkpoint: bool = False
    ) -> tuple[mx.array, mx.array]:
        """Likelihood direction on tokens in this block's order: (scale logit, shift) per token.

        cos/sin cover the text prefix (if any) followed by the tokens. With `checkpoint`, each
        layer's activations are recomputed in the backward pass instead of kept (gradients of
        the 3B model then need about one layer's activations, not 34).
        """
        h = self.proj_in(self.shifted_inputs(tokens).astype(self.compute_dtype))
        prefix = 0
        if self.has_text:
            h = mx.concatenate([self.proj_txt(text.astype(self.compute_dtype)), h], axis=1)
            prefix = text.shape[1]
        for layer in self.layers:
            h = (nn.utils.checkpoint(layer) if checkpoint else layer)(h, cos, sin)
        return self.head(h[:, prefix:])

    def make_cache(self, batch: int, length: int) -> KVCache:
        first = self.layers[0].attention
        return KVCache.allocate(len(self.layers), batch, first.heads, length, first.head_dim, self.compute_dtype)

    def _run_cached(
        self, h: mx.array, position: mx.array, cos: mx.array, sin: mx.array, cache: KVCache, attn_temp: float,
        visible: int | None = None,
    ) -> mx.array:
        count = h.shape[1]
        query_positions = position + mx.arange(count)
        rows_cos, rows_sin = mx.take(cos, query_positions, axis=0), mx.take(sin, query_positions, axis=0)
        mask = mx.arange(visible or cache.length)[None, :] <= query_positions[:, None]
        for index, layer in enumerate(self.layers):
            h = layer.step(h, rows_cos, rows_sin, cache, index, position, mask, attn_temp)
        return h

    def prefill(self, text: mx.array, cos: mx.array, sin: mx.array, cache: KVCache, attn_temp: float = 1.0) -> None:
        """Run the text prefix through every layer to fill cache positions 0…T-1."""
        h = self.proj_txt(text.astype(self.compute_dtype))
        self._run_cached(h, mx.array([0]), cos, sin, cache, attn_temp, visible=text.shape[1])

    def step(
        self, inputs: mx.array, position: mx.array, cos: mx.array, sin: mx.array, cache: KVCache, attn_temp: float = 1.0,
        visible: int | None = None,
    ) -> tuple[mx.array, mx.array]:
        """(scale logit, shift) for a chunk of input tokens whose first sits at cache `position`.

        `inputs` are the previous tokens ([sos, x_0, …]) in this block's order; `position` is a
        (1,) int array so that one graph serves every position. `attn_temp` divides the
        attention logits (official `reverse(attn_temp=…)`). `visible` (default: the whole
        cache) is how many cache positions the chunk attends to; it must cover the chunk's
        last position. The positions past the chunk are masked either way, so it changes only
        how much of the cache a step reads.
        """
        h = self.proj_in(inputs.astype(self.compute_dtype))
        return self.head(self._run_cached(h, position, cos, sin, cache, attn_temp, visible))
