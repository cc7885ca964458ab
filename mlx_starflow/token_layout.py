"""How a latent becomes the token sequences the flow blocks read, in one small type.

Mirrors the Swift package's `TokenLayout`: latents (B, C, H, W) ↔ tokens (B, N, C·p²) with
N = (H/p)(W/p) in raster order, each p×p patch packed as `c (h p1) (w p2) -> h w (p1 p2 c)`
(the official patchify); a flipped block reads the tokens reversed; and every sequence index
has a RoPE position. A (frames, height, width) video layout is another type with the same
calls, so the samplers and the block loop never look inside a latent.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .rope import token_positions


@dataclass(frozen=True)
class TokenLayout:
    """An image latent of `channels`×`height`×`width` cut into `patch_size`² patches."""

    channels: int
    height: int
    width: int
    patch_size: int

    def __post_init__(self) -> None:
        p = self.patch_size
        if min(self.channels, self.height, self.width, p) < 1 or self.height % p or self.width % p:
            raise ValueError(f"a {self.channels}×{self.height}×{self.width} latent cannot be cut into {p}×{p} patches")

    @classmethod
    def of(cls, latent: mx.array, patch_size: int) -> "TokenLayout":
        """The layout of a (B, C, H, W) latent."""
        _, channels, height, width = latent.shape
        return cls(channels, height, width, patch_size)

    @property
    def grid_height(self) -> int:
        return self.height // self.patch_size

    @property
    def grid_width(self) -> int:
        return self.width // self.patch_size

    @property
    def token_count(self) -> int:
        return self.grid_height * self.grid_width

    @property
    def token_channels(self) -> int:
        return self.channels * self.patch_size**2

    def grid(self, latent: mx.array) -> mx.array:
        """(B, C, H, W) → (B, H/p, W/p, C·p²): the official patchify (and the per-block outputs' layout)."""
        B, p = latent.shape[0], self.patch_size
        x = latent.reshape(B, self.channels, self.grid_height, p, self.grid_width, p).transpose(0, 2, 4, 3, 5, 1)
        return x.reshape(B, self.grid_height, self.grid_width, self.token_channels)

    def tokens(self, latent: mx.array) -> mx.array:
        """(B, C, H, W) → (B, N, C·p²) in raster order."""
        return self.grid(latent).reshape(latent.shape[0], self.token_count, self.token_channels)

    def latent(self, tokens: mx.array) -> mx.array:
        """(B, N, C·p²) raster-order tokens, or the (B, H/p, W/p, C·p²) grid → (B, C, H, W)."""
        B, p = tokens.shape[0], self.patch_size
        x = tokens.reshape(B, self.grid_height, self.grid_width, p, p, self.channels).transpose(0, 5, 1, 3, 2, 4)
        return x.reshape(B, self.channels, self.height, self.width)

    def ordered(self, tokens: mx.array, flipped: bool) -> mx.array:
        """Raster order ↔ a block's order on (B, N, …) tokens (reversing is its own inverse)."""
        return tokens[:, ::-1] if flipped else tokens

    def positions(self, text_length: int, pt_seq_len: int) -> np.ndarray:
        """RoPE positions (text_length + N, 3): the text prefix first, then the image tokens by
        sequence index (a flipped block rotates its k-th token by raster index k's angles)."""
        return token_positions(self.grid_height, self.grid_width, text_length, pt_seq_len)
