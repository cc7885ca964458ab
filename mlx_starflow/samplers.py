"""Samplers as values: how one flow block is inverted, token by token or by Jacobi iteration.

A sampler is a frozen dataclass that checks its own settings, describes itself (the PNG
metadata and progress text) and owns its inversion loop. The loop drives a `BlockRunner`
(MLX or Core ML alike) and is a generator: it yields after every model pass so a caller can
show progress (and stop), and returns the block's tokens. A new sampler is one new class
with the `Sampler` members; nothing else names its settings.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Generator
from dataclasses import dataclass
from typing import ClassVar, Protocol

import mlx.core as mx

from .block_runner import BlockRunner
from .errors import InputError
from .sampling import colour, guided_gaussian, jacobi_change, scale_from_logit


@dataclass(frozen=True)
class JacobiChunk:
    """One Jacobi chunk: where it starts in the block's token order, its size, and each pass's
    relative change (the official convergence value; per image, the largest among the images
    still iterating)."""

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


Inversion = Generator[BlockProgress, None, mx.array]


class Sampler(Protocol):
    """What the block loop needs from a sampler."""

    attn_temp: float
    """Attention temperature the block runners apply (1 = the trained attention)."""

    def describe(self) -> str:
        """One line for PNG metadata and progress text."""

    def chunk(self, count: int) -> int:
        """Tokens per model pass in a block of `count` tokens (the step shape an exporter needs)."""

    def invert(self, runner: BlockRunner, z: mx.array, guidance: float, use_softplus: bool) -> Inversion:
        """Invert one block on noise rows z (rows, N, C·p²) in the block's order; returns its tokens.

        With guidance > 0, z holds each image's rows twice (conditional rows, then unconditional)."""


def gaussian(a: mx.array, b: mx.array, guidance: float, use_softplus: bool) -> tuple[mx.array, mx.array]:
    """(mu, sigma) of each token from the block's (scale logit, shift), guided when guidance > 0."""
    sigma = scale_from_logit(a, use_softplus)
    if guidance > 0:
        return guided_gaussian(b, sigma, guidance)
    return b, sigma


def _sos_rows(runner: BlockRunner, rows: int) -> mx.array:
    return mx.broadcast_to(runner.sos.astype(mx.float32).reshape(1, 1, -1), (rows, 1, runner.sos.size))


def _positive(value: float, name: str, option: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} ({option}) must be a number above 0, got {value:g}")


@dataclass(frozen=True)
class Sequential:
    """Token-by-token decoding, exact: x_t = z_t·sigma_t + mu_t, each token predicted from the
    tokens before it (official `MetaBlock.reverse`). `attn_temp` divides every attention logit,
    text prefix included, as the official `reverse(attn_temp=…)`."""

    attn_temp: float = 1.0

    def __post_init__(self) -> None:
        _positive(self.attn_temp, "attn_temp", "--attn-temp")

    def describe(self) -> str:
        return "sequential" if self.attn_temp == 1.0 else f"sequential attn_temp={self.attn_temp:g}"

    def chunk(self, count: int) -> int:
        return 1

    def invert(self, runner: BlockRunner, z: mx.array, guidance: float, use_softplus: bool) -> Inversion:
        previous = _sos_rows(runner, z.shape[0])
        tokens = []
        for t in range(z.shape[1]):
            a, b = runner.step(previous, t)
            previous = colour(z[:, t : t + 1], *gaussian(a, b, guidance, use_softplus))
            mx.eval(previous, *runner.pending)
            tokens.append(previous)
            yield BlockProgress(tokens_done=t + 1, passes=t + 1)
        return mx.concatenate(tokens, axis=1)


def _image_changes(new: mx.array, old: mx.array, groups: int) -> mx.array:
    """Each image's relative change mean((new-old)²)/mean(new²), its `groups` rows (the
    conditional and unconditional rows of a guided image) taken together: (images,)."""
    images = new.shape[0] // groups

    def per_image(x: mx.array) -> mx.array:
        return mx.mean(mx.square(x).reshape(groups, images, -1), axis=(0, 2))

    return per_image(new - old) / per_image(new)


def _row_mask(done: list[bool], rows: int) -> mx.array:
    """Per-image (or whole-batch) flags as a (rows, 1, 1) mask; rows repeat the images in groups."""
    return mx.array(done * (rows // len(done))).reshape(rows, 1, 1)


JACOBI_INITS = ("noise", "carry")
"""First iterate of a Jacobi chunk: the noise itself (official), or the noise coloured with the
Gaussian of the last token decoded before the chunk (see `Jacobi.init`)."""


@dataclass(frozen=True)
class Jacobi:
    """Block-wise Jacobi iteration (official `MetaBlock.jacobi`).

    Starting from the noise itself, each chunk of `block_size` tokens is updated in parallel
    from the previous iterate until its relative change drops below `threshold`, or for at
    most `max_iter` passes. Convergence is decided per image: an image whose change is below
    the threshold stops changing (its cache keeps the keys of its last pass) while the others
    go on, so an image is the same whatever it is batched with. `coupled` uses the official
    rule instead: one change over the whole chunk and batch, so images depend on each other.

    `deep_threshold` replaces `threshold` in the block that reads text (the deep block, which
    holds most of the weights and decides the content), so the cheap shallow blocks and the
    costly deep one can stop at different precisions. `init="carry"` starts every chunk after
    the first from z·σ + μ, the chunk's noise coloured with the Gaussian predicted for the last
    token before it, instead of the bare noise: tokens next to each other have similar
    Gaussians, so the first iterate starts nearer the fixed point at no extra pass. Neither
    changes what a chunk converges to (the sequential sample, at threshold 0), only how fast.
    """

    block_size: int = 16
    threshold: float = 1e-3
    max_iter: int = 32
    coupled: bool = False
    deep_threshold: float | None = None
    init: str = "noise"
    attn_temp: ClassVar[float] = 1.0
    """The official Jacobi loop runs the trained attention (it takes no temperature)."""

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise InputError(f"Jacobi block_size (--jacobi-block-size) must be a whole number of tokens, at least 1, got {self.block_size}")
        for value, name, option in ((self.threshold, "threshold", "--jacobi-threshold"),
                                    (self.deep_threshold, "deep_threshold", "--jacobi-deep-threshold")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not (math.isfinite(value) and value >= 0)):
                raise InputError(f"Jacobi {name} ({option}) must be a number, 0 or more, got {value}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise InputError(f"Jacobi max_iter (--jacobi-max-iter) must be a whole number, at least 1, got {self.max_iter}")
        if self.init not in JACOBI_INITS:
            raise InputError(f"Jacobi init (--jacobi-init) must be one of {', '.join(JACOBI_INITS)}, got {self.init!r}")

    @classmethod
    def preset(cls, name: str) -> Jacobi:
        """A named setting from `JACOBI_PRESETS` (the CLI's --jacobi-preset)."""
        if name not in JACOBI_PRESETS:
            raise InputError(f"unknown Jacobi preset {name!r} (--jacobi-preset): choose one of {', '.join(JACOBI_PRESETS)}")
        return JACOBI_PRESETS[name]

    def describe(self) -> str:
        text = f"jacobi block={self.block_size} threshold={self.threshold:g} max_iter={self.max_iter}"
        if self.deep_threshold is not None:
            text += f" deep_threshold={self.deep_threshold:g}"
        if self.init != "noise":
            text += f" init={self.init}"
        return text + " coupled" if self.coupled else text

    def chunk(self, count: int) -> int:
        return min(self.block_size, count)

    def block_threshold(self, runner: BlockRunner) -> float:
        """The convergence threshold of this runner's block."""
        return self.deep_threshold if runner.has_text and self.deep_threshold is not None else self.threshold

    def _changes(self, new: mx.array, old: mx.array, groups: int) -> mx.array:
        return jacobi_change(new, old).reshape(1) if self.coupled else _image_changes(new, old, groups)

    def invert(self, runner: BlockRunner, z: mx.array, guidance: float, use_softplus: bool) -> Inversion:
        """One host sync per pass (the change per image). An image that has converged is fed
        the input of its last pass again, so its output, its Gaussians and its cache entries
        stay those of that pass, exactly what the loop leaves when it runs that image alone."""
        rows, count, _ = z.shape
        groups = 2 if guidance > 0 else 1
        threshold = self.block_threshold(runner)
        iterate = mx.concatenate([_sos_rows(runner, rows), z.astype(mx.float32)], axis=1)
        start, passes = 0, 0
        carried: tuple[mx.array, mx.array] | None = None
        while start < count:
            size = min(self.block_size, count - start)
            window = slice(start + 1, start + 1 + size)
            noise = z[:, start : start + size]
            if carried is not None:
                iterate[:, window] = colour(noise, *carried)
            changes: list[float] = []
            done = [False] * (1 if self.coupled else rows // groups)
            result = None
            for _ in range(self.max_iter):
                a, b = runner.step(iterate[:, start : start + size], start)
                mu, sigma = gaussian(a, b, guidance, use_softplus)
                new = colour(noise, mu, sigma)
                old = iterate[:, window]
                change = self._changes(new, old, groups)
                mx.eval(new, change, *runner.pending)
                values = change.tolist()
                passes += 1
                changes.append(max(v for v, d in zip(values, done) if not d))
                result = mx.where(_row_mask(done, rows), result, new) if any(done) else new
                done = [d or v < threshold for d, v in zip(done, values)]
                if all(done):
                    break
                iterate[:, window] = mx.where(_row_mask(done, rows), old, new) if any(done) else new
            iterate[:, window] = result
            if self.init == "carry":
                carried = (mu[:, -1:], sigma[:, -1:])
            start += size
            yield BlockProgress(tokens_done=start, passes=passes, chunk=JacobiChunk(start - size, size, tuple(changes)))
        return iterate[:, 1:]


JACOBI_PRESETS: dict[str, Jacobi] = {
    "official": Jacobi(block_size=16, threshold=1e-3, max_iter=32),
    "fast": Jacobi(block_size=64, threshold=1e-2, max_iter=32, deep_threshold=1e-3, init="carry"),
}
"""Named Jacobi settings: `official` is the official script's; `fast` keeps the official
precision in the deep block, where the content is decided, and loosens the shallow blocks: on
the trained demo model it reads the weights over 4× fewer times than sequential decoding at
unchanged classifier accuracy (README, Benchmarks)."""


def default_sampler(device: mx.Device | None = None) -> Sampler:
    """The sampler used when none is asked for, on `device` (default: MLX's default device).

    Jacobi (official settings) on a GPU, where a pass over a chunk reads the weights once, as a
    one-token step does, so each pass it saves is a step's worth of weight reads. Sequential on
    MLX's CPU backend, where a pass is bound by arithmetic instead: at full width a 16-token
    pass costs 4–6 one-token steps there (`make bench ONLY=deep`), and the official setting
    needs ≈ 13 passes per chunk in the deep block on the trained demo model, so Jacobi would be
    2.4–4.7× slower per image (derived from those figures).
    """
    device = device or mx.default_device()
    return JACOBI_PRESETS["official"] if device.type == mx.DeviceType.gpu else Sequential()
