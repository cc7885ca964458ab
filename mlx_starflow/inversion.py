"""Inverting one flow block: token by token, or block-wise Jacobi iteration.

Both loops are generators: they yield after every model pass so a caller can show progress
(and stop), and return the block's tokens. `step` is the block's cached step, eager or
compiled: (inputs, position, keys, values) -> (scale logit, shift, keys, values).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import mlx.core as mx

from .kv_cache import KVCache
from .sampling import colour, guided_gaussian, jacobi_change, scale_from_logit

Step = Callable[[mx.array, mx.array, list, list], tuple[mx.array, mx.array, list, list]]


@dataclass(frozen=True)
class JacobiChunk:
    """One Jacobi chunk: where it starts in the block's token order, its size, and each
    iteration's relative change (the official convergence value)."""

    start: int
    size: int
    changes: tuple[float, ...]

    @property
    def iterations(self) -> int:
        return len(self.changes)


@dataclass(frozen=True)
class BlockProgress:
    tokens_done: int
    passes: int
    chunk: JacobiChunk | None = None


def _gaussian(a: mx.array, b: mx.array, guidance: float, use_softplus: bool) -> tuple[mx.array, mx.array]:
    sigma = scale_from_logit(a, use_softplus)
    if guidance > 0:
        return guided_gaussian(b, sigma, guidance)
    return b, sigma


def _position(index: int) -> mx.array:
    return mx.array([index], dtype=mx.int32)


def invert_sequential(
    sos: mx.array, z: mx.array, step: Step, cache: KVCache, prefix: int, guidance: float, use_softplus: bool
) -> Generator[BlockProgress, None, mx.array]:
    """x_t = z_t·sigma_t + mu_t, one token per pass, each predicted from the tokens before it."""
    previous = mx.broadcast_to(sos.astype(mx.float32), (z.shape[0], 1, z.shape[2]))
    tokens = []
    for t in range(z.shape[1]):
        a, b, cache.keys, cache.values = step(previous, _position(prefix + t), cache.keys, cache.values)
        mu, sigma = _gaussian(a, b, guidance, use_softplus)
        previous = colour(z[:, t : t + 1], mu, sigma)
        mx.eval(previous, cache.state)
        tokens.append(previous)
        yield BlockProgress(tokens_done=t + 1, passes=t + 1)
    return mx.concatenate(tokens, axis=1)


def invert_jacobi(
    sos: mx.array,
    z: mx.array,
    step: Step,
    cache: KVCache,
    prefix: int,
    guidance: float,
    use_softplus: bool,
    block_size: int,
    threshold: float,
    max_iter: int,
) -> Generator[BlockProgress, None, mx.array]:
    """Block-wise Jacobi iteration (official `MetaBlock.jacobi`).

    Starting from the noise itself, each chunk of `block_size` tokens is updated in parallel
    from the previous iterate until the relative change (over the whole chunk and batch) drops
    below `threshold`, or for at most `max_iter` passes. The cache keeps the keys/values of the
    last pass, computed from the previous iterate, exactly as the official loop leaves it.
    """
    batch, count, channels = z.shape
    sos_rows = mx.broadcast_to(sos.astype(mx.float32), (batch, 1, channels))
    iterate = mx.concatenate([sos_rows, z.astype(mx.float32)], axis=1)
    start, passes = 0, 0
    while start < count:
        size = min(block_size, count - start)
        changes: list[float] = []
        for _ in range(max_iter):
            a, b, cache.keys, cache.values = step(iterate[:, start : start + size], _position(prefix + start), cache.keys, cache.values)
            mu, sigma = _gaussian(a, b, guidance, use_softplus)
            new = colour(z[:, start : start + size], mu, sigma)
            change = jacobi_change(new, iterate[:, start + 1 : start + 1 + size])
            iterate[:, start + 1 : start + 1 + size] = new
            mx.eval(iterate, change, cache.state)
            passes += 1
            changes.append(change.item())
            if changes[-1] < threshold:
                break
        start += size
        yield BlockProgress(tokens_done=start, passes=passes, chunk=JacobiChunk(start - size, size, tuple(changes)))
    return iterate[:, 1:]
