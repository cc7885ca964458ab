"""Operations on flow noise, pure functions: mixing, spherical interpolation, keeping tokens.

Noise is standard Gaussian (B, C, H, W), the flow's input when sampling. Each operation keeps
it Gaussian-looking (unit variance, on the sphere where such noise lives), so the flow samples
from it as from fresh noise.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .errors import InputError


def check_strength(strength: float) -> float:
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise InputError(f"strength must be in [0, 1] (0 = the image itself, 1 = a fresh sample), got {strength:g}")
    return float(strength)


def mix_noise(noise: mx.array, fresh: mx.array, strength: float) -> mx.array:
    """sqrt(1 − S²)·noise + S·fresh: still unit-variance Gaussian when both are, so S moves
    smoothly from the inverted image (0) to an independent sample (1)."""
    strength = check_strength(strength)
    return math.sqrt(1.0 - strength * strength) * noise + strength * fresh


def slerp(a: mx.array, b: mx.array, t: float) -> mx.array:
    """Spherical interpolation per row between noises a and b (same shape, (B, …)).

    Gaussian noise lives near a sphere; a straight line between two draws passes through
    low-norm noise the flow never saw, so the angle is interpolated instead. Nearly parallel
    rows fall back to the straight line.
    """
    flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    cosine = mx.sum(flat_a * flat_b, axis=1) / (mx.linalg.norm(flat_a, axis=1) * mx.linalg.norm(flat_b, axis=1))
    theta = mx.arccos(mx.clip(cosine, -1.0, 1.0))
    sin_theta = mx.sin(theta)
    parallel = sin_theta < 1e-6
    safe = mx.where(parallel, 1.0, sin_theta)
    wa = mx.where(parallel, 1.0 - t, mx.sin((1.0 - t) * theta) / safe)
    wb = mx.where(parallel, t, mx.sin(t * theta) / safe)
    shape = (a.shape[0],) + (1,) * (a.ndim - 1)
    return wa.reshape(shape) * a + wb.reshape(shape) * b


def interpolation_path(a: mx.array, b: mx.array, steps: int) -> mx.array:
    """`steps` noises from a (1, …) to b (1, …) inclusive, evenly spaced in angle: (steps, …)."""
    if steps < 2:
        raise InputError(f"interpolation needs at least 2 steps (the two ends), got {steps}")
    return mx.concatenate([slerp(a, b, i / (steps - 1)) for i in range(steps)], axis=0)


def resolve_keep(keep: int | float | None, total: int) -> int:
    """Tokens to keep: None = all, an int = that many, a float = that fraction (in [0, 1])."""
    if keep is None:
        return total
    if isinstance(keep, float):
        if not (math.isfinite(keep) and 0.0 <= keep <= 1.0):
            raise InputError(f"keep as a fraction must be in [0, 1], got {keep:g}; pass a token count as a whole number")
        return round(keep * total)
    count = int(keep)
    if not 0 <= count <= total:
        raise InputError(f"keep {count} is beyond the {total} tokens of this image size; pass 0 … {total} or a fraction such as 0.5")
    return count


def keep_tokens(noise: mx.array, fresh: mx.array, keep: int, patch: int, flipped: bool) -> mx.array:
    """`noise` on the first `keep` tokens of the deep block's order, `fresh` on the rest.

    The deep block samples first and token by token in its order (raster order unless
    `flipped`), so its first tokens depend only on the kept noise: the top rows keep their
    content there. The shallow blocks that follow mix every token, so the final image changes
    a little everywhere.
    """
    B, C, H, W = noise.shape
    count = (H // patch) * (W // patch)
    positions = mx.arange(count)
    if flipped:
        positions = count - 1 - positions
    kept = (positions < keep).reshape(1, H // patch, 1, W // patch, 1)
    mask = mx.broadcast_to(kept, (1, H // patch, patch, W // patch, patch)).reshape(1, 1, H, W)
    return mx.where(mask, noise, fresh)
