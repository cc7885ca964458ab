"""The T5 encoder stack (flan-t5-xl layout) that turns prompt tokens into STARFlow's text states.

Matches the official `T5Stack` in eval mode: one relative position bias table, taken from the
first layer and shared by all; RMS norms without mean subtraction; attention without the
1/sqrt(d) scale; a gated feed-forward with the tanh GELU; no biases anywhere.

The residual stream is kept in float32 whatever the weight dtype, because flan-T5's activations
outgrow float16's range (the reason the reference implementation clamps them or keeps the
feed-forward output projection in float32).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import T5Config


def relative_position_bucket(relative_position: mx.array, num_buckets: int, max_distance: int) -> mx.array:
    """Bidirectional T5 bucket of each key-minus-query offset.

    Half the buckets hold positive offsets. Within each half, offsets below a quarter of the
    buckets get one bucket each; larger ones share log-spaced buckets up to `max_distance`. The
    log runs in float32 and is truncated, as in the reference, so boundaries land identically.
    """
    half = num_buckets // 2
    exact = half // 2
    distance = mx.abs(relative_position)
    scaled = mx.log(mx.maximum(distance, exact).astype(mx.float32) / exact) / math.log(max_distance / exact)
    far = mx.minimum(exact + (scaled * (half - exact)).astype(mx.int32), half - 1)
    near_or_far = mx.where(distance < exact, distance, far)
    return mx.where(relative_position > 0, half, 0) + near_or_far


class Attention(nn.Module):
    """Multi-head self-attention with T5's unscaled scores and a caller-supplied additive bias."""

    def __init__(self, d_model: int, num_heads: int, d_kv: int):
        super().__init__()
        self.num_heads = num_heads
        self.d_kv = d_kv
        inner = num_heads * d_kv
        self.query = nn.Linear(d_model, inner, bias=False)
        self.key = nn.Linear(d_model, inner, bias=False)
        self.value = nn.Linear(d_model, inner, bias=False)
        self.out = nn.Linear(inner, d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        batch, length, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.num_heads, self.d_kv).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        mixed = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
        return self.out(mixed.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class GatedMLP(nn.Module):
    """T5's gated-GELU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # nn.gelu_approx is the tanh form, T5's `gelu_new`; the exact erf GELU shifts outputs by ~1e-3.
        hidden = nn.gelu_approx(self.gate(x)) * self.up(x)
        if hidden.dtype == mx.float16:  # flan-T5's down projection overflows float16; bfloat16 has the range
            hidden = hidden.astype(mx.float32)
        return self.down(hidden)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention, then pre-norm feed-forward, each added to the float32 residual."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attention = Attention(config.d_model, config.num_heads, config.d_kv)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.mlp = GatedMLP(config.d_model, config.d_ff)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        dtype = self.attention_norm.weight.dtype
        x = x + self.attention(self.attention_norm(x).astype(dtype), bias).astype(mx.float32)
        return x + self.mlp(self.mlp_norm(x).astype(dtype)).astype(mx.float32)


class T5Encoder(nn.Module):
    """Token ids and attention mask -> final-normed hidden states (B, L, d_model), float32.

    Padded positions are masked as keys but still computed as queries; zeroing them is the
    caller's job (`TextEncoder.encode`), as in the official `encode_text`.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.layers = [EncoderLayer(config) for _ in range(config.num_layers)]
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        x = self.embedding(input_ids).astype(mx.float32)
        bias = self.attention_bias(attention_mask)
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x).astype(mx.float32)

    def attention_bias(self, attention_mask: mx.array) -> mx.array:
        """(B, H, L, L): the position bias plus the lowest float32 on padded keys, shared by every layer."""
        positions = mx.arange(attention_mask.shape[1])
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None],
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )
        position_bias = self.relative_attention_bias(buckets).transpose(2, 0, 1)[None].astype(mx.float32)
        padding = mx.where(attention_mask[:, None, None, :] != 0, 0.0, mx.finfo(mx.float32).min)
        return position_bias + padding
