"""The transformer layer of a flow block: pre-norm attention and exact-GELU MLP, with biases.

Attention runs in one of two ways: over a whole sequence with a causal mask (likelihood
direction, training), or over a chunk of tokens at an explicit position against a `KVCache`
(sampling: one token, a Jacobi block, or the text prefix).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .backend_compute import attend
from .kv_cache import KVCache
from .rope import apply_rope


class UnitOffsetRMSNorm(nn.Module):
    """RMSNorm scaled by (1 + w), computed in float32 (official `RMSNorm(add_unit_offset=True)`)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, channels: int, head_dim: int, bias: bool, norm_eps: float):
        super().__init__()
        self.heads = channels // head_dim
        self.head_dim = head_dim
        self.norm = nn.LayerNorm(channels, eps=norm_eps)
        self.qkv = nn.Linear(channels, 3 * channels, bias=bias)
        self.proj = nn.Linear(channels, channels, bias=bias)

    def _heads(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        B, L, _ = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, L, 3, self.heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _merge(self, x: mx.array) -> mx.array:
        B, _, L, _ = x.shape
        return self.proj(x.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """Causal attention over the whole sequence; cos/sin cover every position of x."""
        q, k, v = self._heads(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask="causal")
        return self._merge(out)

    def step(
        self, x: mx.array, cos: mx.array, sin: mx.array, cache: KVCache, layer: int, position: mx.array, mask: mx.array,
        temperature: float = 1.0,
    ) -> mx.array:
        """Attention of a chunk at `position` against the cache; cos/sin are the chunk's rows.

        The chunk attends to the cache's first `mask.shape[-1]` positions (the filled part,
        rounded up), under `mask`. `temperature` divides the softmax scale (official
        `apply_attention`: scale = d^-½ / temp).
        """
        q, k, v = self._heads(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.write(layer, k, v, position)
        visible = mask.shape[-1]
        if visible < keys.shape[2]:
            keys, values = keys[:, :, :visible], values[:, :, :visible]
        out = attend(q, keys, values, self.head_dim**-0.5 / temperature, mask)
        return self._merge(out)


class MLP(nn.Module):
    def __init__(self, channels: int, expansion: float, bias: bool, norm_eps: float):
        super().__init__()
        hidden = int(channels * expansion)
        self.norm = nn.LayerNorm(channels, eps=norm_eps)
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(self.norm(x))))


class TransformerLayer(nn.Module):
    def __init__(self, channels: int, head_dim: int, expansion: float, bias: bool, norm_eps: float):
        super().__init__()
        self.attention = Attention(channels, head_dim, bias, norm_eps)
        self.mlp = MLP(channels, expansion, bias, norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x = x + self.attention(x, cos, sin)
        return x + self.mlp(x)

    def step(
        self, x: mx.array, cos: mx.array, sin: mx.array, cache: KVCache, layer: int, position: mx.array, mask: mx.array,
        temperature: float = 1.0,
    ) -> mx.array:
        x = x + self.attention.step(x, cos, sin, cache, layer, position, mask, temperature)
        return x + self.mlp(x)
