"""The 3-axis rotary position embedding of STARFlow (official `misc/pe.py`), as pure functions.

Each token has a position (row, column, text): image tokens at sequence index k = i·w + j get
(i·pt/√(hw), j·pt/√(hw), 0), so any latent size maps onto the training grid of side `pt`;
text token i gets (0, 0, i·pt/T). RoPE follows the *sequence index*, not the spatial token, so
flipped blocks rotate the token at sequence index k by the angles of raster index k.
Head dims are rotated in interleaved pairs (x_2m, x_2m+1).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import mlx.core as mx
import numpy as np

TEXT_AXIS_DIMS = 8


class PositionedLayout(Protocol):
    """What the tables need of a token layout (`token_layout.TokenLayout`): hashable, with a RoPE
    position per sequence index."""

    def __hash__(self) -> int: ...

    def positions(self, text_length: int, pt_seq_len: int) -> np.ndarray: ...


def token_positions(height: int, width: int, text_length: int, pt_seq_len: int) -> np.ndarray:
    """Positions (text_length + height·width, 3), text tokens first, image tokens in raster order."""
    scale = np.float32(np.sqrt(height * width))
    rows = np.arange(height, dtype=np.float32) / scale * np.float32(pt_seq_len)
    cols = np.arange(width, dtype=np.float32) / scale * np.float32(pt_seq_len)
    grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")
    image = np.stack([grid_r.ravel(), grid_c.ravel(), np.zeros(height * width, np.float32)], axis=-1)
    text_pos = np.arange(text_length, dtype=np.float32) / np.float32(max(text_length, 1)) * np.float32(pt_seq_len)
    text = np.stack([np.zeros_like(text_pos), np.zeros_like(text_pos), text_pos], axis=-1)
    return np.concatenate([text, image], axis=0)


def rope_angles(positions: np.ndarray, head_dim: int, theta: float, text_axis: bool) -> np.ndarray:
    """Angles (S, head_dim/2): per spatial axis `half-8` dims (or `half` without a text axis),
    plus 8 dims for the text axis, as the official `VisionRotaryEmbeddingFast`."""
    half = head_dim // 2
    spatial = half - TEXT_AXIS_DIMS if text_axis else half
    theta32 = np.float32(theta)
    freqs = 1.0 / theta32 ** (np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial))
    parts = [positions[:, :1] * freqs, positions[:, 1:2] * freqs]
    if text_axis:
        text_freqs = 1.0 / theta32 ** (np.arange(TEXT_AXIS_DIMS, dtype=np.float32) / np.float32(TEXT_AXIS_DIMS))
        parts.append(positions[:, 2:3] * text_freqs)
    return np.concatenate(parts, axis=-1).astype(np.float32)


@lru_cache(maxsize=32)
def rope_tables(
    layout: PositionedLayout, text_length: int, pt_seq_len: int, head_dim: int, theta: float, text_axis: bool,
    bfloat16_angles: bool = False,
) -> tuple[mx.array, mx.array]:
    """cos and sin tables (S, head_dim/2) for one block's token sequence, memoised by layout.

    `bfloat16_angles` rounds the angles to bfloat16 before cos/sin, as the official GPU sampler
    does (FSDP mixed precision casts its RoPE frequencies), off by default: exact angles.
    """
    angles = rope_angles(layout.positions(text_length, pt_seq_len), head_dim, theta, text_axis)
    if bfloat16_angles:
        angles = np.array(mx.array(angles).astype(mx.bfloat16).astype(mx.float32))
    return mx.array(np.cos(angles)), mx.array(np.sin(angles))


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs of the last axis: x (..., S, D), cos/sin (S, D/2)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    rotated = mx.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x.shape)
