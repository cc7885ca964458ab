"""One STARFlow flow block as MIL, in either attention layout, written once against `Ops`.

`original` keeps hidden states as (B, S, C) and runs the fused attention op over (B, H, S, Dh)
heads: the natural layout for the GPU. `split-einsum` is ml-stable-diffusion's Neural Engine
layout: hidden states (B, C, 1, S), linears as 1×1 convolutions, and attention as one small
matmul pair per head, with no large transposes. Both compute the same function as
`mlx_starflow.flow_block.FlowBlock`; the tests hold them to the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mlx_starflow.config import FlowConfig
from mlx_starflow.flow import StarFlow
from mlx_starflow.rope import rope_angles, token_positions

from .builder import Ops, causal_mask_constant
from .coremltools_api import Var, mb
from .weights import Weights, module_arrays

ATTENTION_LAYOUTS = ("original", "split-einsum")


def block_arrays(flow: StarFlow, index: int) -> dict[str, np.ndarray]:
    """A block's parameters as float32 arrays (MLX-quantised linears dequantised)."""
    return module_arrays(flow.blocks[index], flow.config.quantization)


def rope_table(config: FlowConfig, height: int, width: int, text_length: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (rows, head_dim) for cache positions: text prefix, then tokens in sequence order.

    Each angle is repeated for its interleaved pair; rows past the sequence (spare slots of a
    padded Jacobi chunk) get angle 0.
    """
    positions = token_positions(height, width, text_length, config.pt_seq_len)
    angles = rope_angles(positions, config.head_dim, config.rope_theta, config.txt_size > 0)
    full = np.zeros((rows, config.head_dim), np.float32)
    full[: len(angles)] = np.repeat(angles, 2, axis=1)
    return np.cos(full), np.sin(full)


@dataclass(frozen=True)
class BlockShape:
    """The sizes and constants a block's graph needs from the flow config."""

    channels: int
    head_dim: int
    token_channels: int
    layer_norm_eps: float
    rms_norm_eps: float
    soft_clip: float

    @classmethod
    def of(cls, config: FlowConfig) -> "BlockShape":
        return cls(config.channels, config.head_dim, config.token_channels, config.layer_norm_eps,
                   config.rms_norm_eps, config.soft_clip)

    @property
    def heads(self) -> int:
        return self.channels // self.head_dim


class SequenceLayout:
    """(B, S, C) hidden states; keys/values cached as (B, H, L, Dh)."""

    cache_axis = 2

    def __init__(self, shape: BlockShape):
        self.shape = shape

    def enter(self, ops: Ops, x: Var) -> Var:
        return x

    def leave(self, ops: Ops, x: Var) -> Var:
        return x

    def linear(self, ops: Ops, w: Weights, name: str, x: Var) -> Var:
        return ops.linear(x, w[f"{name}.weight"], w.optional(f"{name}.bias"))

    def layer_norm(self, ops: Ops, w: Weights, name: str, x: Var) -> Var:
        return ops.layer_norm(x, w.optional(f"{name}.weight"), w.optional(f"{name}.bias"), self.shape.layer_norm_eps)

    def rms_norm(self, ops: Ops, scale: np.ndarray, x: Var) -> Var:
        return ops.rms_norm(x, scale, self.shape.rms_norm_eps)

    def channels(self, ops: Ops, x: Var, start: int, stop: int) -> Var:
        return ops.slice(x, -1, start, stop)

    def sequence(self, ops: Ops, x: Var, start: int, stop: int) -> Var:
        return ops.slice(x, 1, start, stop)

    def rope(self, ops: Ops, x: Var, cos: Var, sin: Var) -> Var:
        """cos/sin: (S, C), the per-head table tiled over heads."""
        return ops.add(ops.mul(x, cos), ops.mul(ops.swap_pairs(x, -1), sin))

    def rope_rows(self, ops: Ops, table: Var) -> Var:
        return ops.tile(table, [1, self.shape.heads])

    def cache_form(self, ops: Ops, x: Var) -> Var:
        b, s, _ = x.shape
        return ops.transpose(ops.reshape(x, [b, s, self.shape.heads, self.shape.head_dim]), [0, 2, 1, 3])

    def cache_shape(self, rows: int, length: int) -> tuple[int, ...]:
        return (rows, self.shape.heads, length, self.shape.head_dim)

    def mask(self, ops: Ops, key_count: int, query_positions: Var) -> Var:
        return ops.causal_mask(key_count, query_positions, keys_axis_last=True)

    def mask_input(self, ops: Ops, mask: Var) -> Var:
        """A (queries, keys) additive mask given as an input, in this layout's orientation."""
        return mask

    def full_mask(self, ops: Ops, length: int) -> Var:
        return ops.weight(causal_mask_constant(length, ops.np_dtype))

    def attend(self, ops: Ops, q: Var, keys: Var, values: Var, mask: Var) -> Var:
        heads = ops.attention(self.cache_form(ops, q), keys, values, mask)
        b, _, s, _ = heads.shape
        return ops.reshape(ops.transpose(heads, [0, 2, 1, 3]), [b, s, self.shape.channels])


class ChannelsFirstLayout(SequenceLayout):
    """(B, C, 1, S) hidden states, 1×1 convolutions and per-head matmuls; keys/values cached as (B, C, 1, L)."""

    cache_axis = 3

    def enter(self, ops: Ops, x: Var) -> Var:
        b, s, c = x.shape
        return ops.reshape(ops.transpose(x, [0, 2, 1]), [b, c, 1, s])

    def leave(self, ops: Ops, x: Var) -> Var:
        b, c, _, s = x.shape
        return ops.transpose(ops.reshape(x, [b, c, s]), [0, 2, 1])

    def linear(self, ops: Ops, w: Weights, name: str, x: Var) -> Var:
        kernel = w.derived(f"{name}.kernel", f"{name}.weight", lambda weight: weight[:, :, None, None])
        return ops.conv(x, kernel, w.optional(f"{name}.bias"))

    def layer_norm(self, ops: Ops, w: Weights, name: str, x: Var) -> Var:
        return ops.layer_norm(x, w.optional(f"{name}.weight"), w.optional(f"{name}.bias"), self.shape.layer_norm_eps, axis=1)

    def rms_norm(self, ops: Ops, scale: np.ndarray, x: Var) -> Var:
        return ops.rms_norm(x, scale, self.shape.rms_norm_eps, axis=1)

    def channels(self, ops: Ops, x: Var, start: int, stop: int) -> Var:
        return ops.slice(x, 1, start, stop)

    def sequence(self, ops: Ops, x: Var, start: int, stop: int) -> Var:
        return ops.slice(x, 3, start, stop)

    def rope(self, ops: Ops, x: Var, cos: Var, sin: Var) -> Var:
        """cos/sin: (C, 1, S)."""
        return ops.add(ops.mul(x, cos), ops.mul(ops.swap_pairs(x, 1), sin))

    def rope_rows(self, ops: Ops, table: Var) -> Var:
        tiled = ops.tile(table, [1, self.shape.heads])
        s, c = tiled.shape
        return ops.reshape(ops.transpose(tiled, [1, 0]), [c, 1, s])

    def cache_form(self, ops: Ops, x: Var) -> Var:
        return x

    def cache_shape(self, rows: int, length: int) -> tuple[int, ...]:
        return (rows, self.shape.channels, 1, length)

    def mask(self, ops: Ops, key_count: int, query_positions: Var) -> Var:
        return ops.causal_mask(key_count, query_positions, keys_axis_last=False)

    def mask_input(self, ops: Ops, mask: Var) -> Var:
        return ops.transpose(mask, [1, 0])

    def full_mask(self, ops: Ops, length: int) -> Var:
        return ops.weight(causal_mask_constant(length, ops.np_dtype).T)

    def attend(self, ops: Ops, q: Var, keys: Var, values: Var, mask: Var) -> Var:
        """Per head: scores (B, Sk, Sq) = kᵀ·q, softmax over keys, out (B, Dh, Sq) = v·p."""
        b, c, _, sq = q.shape
        sk = keys.shape[3]
        dh = self.shape.head_dim
        q = ops.mul(q, dh**-0.5)
        outputs = []
        for h in range(self.shape.heads):
            q_h = ops.reshape(ops.slice(q, 1, h * dh, (h + 1) * dh), [b, dh, sq])
            k_h = ops.reshape(ops.slice(keys, 1, h * dh, (h + 1) * dh), [b, dh, sk])
            v_h = ops.reshape(ops.slice(values, 1, h * dh, (h + 1) * dh), [b, dh, sk])
            scores = ops.add(ops.matmul(k_h, q_h, transpose_x=True), mask)
            outputs.append(ops.reshape(ops.matmul(v_h, ops.softmax(scores, axis=1)), [b, dh, 1, sq]))
        return ops.concat(outputs, axis=1)


def make_layout(name: str, shape: BlockShape) -> SequenceLayout:
    if name == "original":
        return SequenceLayout(shape)
    if name == "split-einsum":
        return ChannelsFirstLayout(shape)
    raise ValueError(f"attention layout must be one of {ATTENTION_LAYOUTS}, not {name!r}")


Attend = Callable[[int, Var, Var, Var], Var]
"""(layer index, q, k, v) → attention output, in the layout's hidden form."""


def transformer_layer(ops: Ops, layout: SequenceLayout, w: Weights, index: int, x: Var, cos: Var, sin: Var, attend: Attend) -> Var:
    """Pre-norm attention (fused qkv, interleaved RoPE) then pre-norm exact-GELU MLP, both residual."""
    c = layout.shape.channels
    prefix = f"layers.{index}"
    qkv = layout.linear(ops, w, f"{prefix}.attention.qkv", layout.layer_norm(ops, w, f"{prefix}.attention.norm", x))
    q, k, v = (layout.channels(ops, qkv, i * c, (i + 1) * c) for i in range(3))
    q, k = layout.rope(ops, q, cos, sin), layout.rope(ops, k, cos, sin)
    x = ops.add(x, layout.linear(ops, w, f"{prefix}.attention.proj", attend(index, q, k, v)))
    h = layout.layer_norm(ops, w, f"{prefix}.mlp.norm", x)
    h = layout.linear(ops, w, f"{prefix}.mlp.fc2", ops.gelu(layout.linear(ops, w, f"{prefix}.mlp.fc1", h)))
    return ops.add(x, h)


def embed_tokens(ops: Ops, layout: SequenceLayout, w: Weights, tokens: Var) -> Var:
    """(B, n, Cp) float32 tokens → hidden states in the layout."""
    return layout.linear(ops, w, "proj_in", layout.enter(ops, ops.to_compute(tokens)))


def embed_text(ops: Ops, layout: SequenceLayout, w: Weights, text: Var) -> Var:
    return layout.linear(ops, w, "proj_txt", layout.enter(ops, ops.to_compute(text)))


def output_head(ops: Ops, layout: SequenceLayout, w: Weights, h: Var) -> tuple[Var, Var]:
    """Final (1+w) RMSNorm, proj_out, then float32 soft clip: (scale logit, shift), each (B, n, Cp)."""
    if w.has("final_norm.weight"):
        h = layout.rms_norm(ops, 1.0 + w.arrays["final_norm.weight"], h)
    out = ops.cast(layout.leave(ops, layout.linear(ops, w, "proj_out", h)), "fp32")
    out = ops.soft_clip(out, layout.shape.soft_clip)
    cp = layout.shape.token_channels
    return ops.slice(out, -1, 0, cp), ops.slice(out, -1, cp, 2 * cp)


def likelihood_inputs(ops: Ops, layout: SequenceLayout, w: Weights, tokens: Var, text: Var | None) -> Var:
    """Hidden states of [text; sos, x_0 … x_{N-2}] for tokens (B, N, Cp) in the block's order."""
    b, n, cp = tokens.shape
    sos = mb.const(val=np.broadcast_to(w.arrays["sos"].reshape(1, 1, cp), (b, 1, cp)).astype(np.float32))
    h = embed_tokens(ops, layout, w, ops.concat([sos, ops.slice(tokens, 1, 0, n - 1)], axis=1))
    return h if text is None else ops.concat([embed_text(ops, layout, w, text), h], axis=1)


def likelihood_layers(ops: Ops, layout: SequenceLayout, w: Weights, layers: Sequence[int], h: Var, cos: np.ndarray,
                      sin: np.ndarray) -> Var:
    """`layers` over the whole sequence at once, causal; cos/sin cover at least its length."""
    length = h.shape[1]
    cos_c = layout.rope_rows(ops, ops.weight(cos[:length]))
    sin_c = layout.rope_rows(ops, ops.weight(sin[:length]))
    mask = layout.full_mask(ops, length)

    def attend(index: int, q: Var, k: Var, v: Var) -> Var:
        return layout.attend(ops, q, layout.cache_form(ops, k), layout.cache_form(ops, v), mask)

    for index in layers:
        h = transformer_layer(ops, layout, w, index, h, cos_c, sin_c, attend)
    return h


def gather_rope(ops: Ops, layout: SequenceLayout, table: np.ndarray, query_positions: Var) -> Var:
    """The chunk's rows of a (L, head_dim) table, tiled over heads in the layout."""
    return layout.rope_rows(ops, ops.gather(ops.weight(table), query_positions, axis=0))


def query_positions(position: Var, count: int) -> Var:
    """position + [0, 1, …, count-1] as int32."""
    return mb.add(x=position, y=np.arange(count, dtype=np.int32))
