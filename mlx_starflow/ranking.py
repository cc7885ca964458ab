"""Likelihood under many prompts: score images × prompts, and rank captions for one image.

The flow gives the exact negative log-likelihood of an image under a prompt, so the captions
of an image can be ordered by how probable they make it: zero-shot classification with no
extra model. The image is encoded once and the prompts once (in text-encoder chunks); each
forward pass then takes a batch of (image, prompt) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from .editing import ImageLike, Pipeline, image_latents
from .errors import InputError

DEFAULT_PAIR_BATCH = 8
"""(image, prompt) pairs per forward pass: a forward keeps no activations for a backward pass,
so this bounds only the live activations of one block."""


@dataclass(frozen=True)
class RankedCaption:
    """One caption's bits per dimension for the image, and how far it is behind the best."""

    caption: str
    bits_per_dim: float
    behind_best: float


def check_prompts_list(prompts: Sequence[str], what: str = "caption") -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise InputError(f"no {what}s given; pass at least one")
    return prompts


def likelihood_matrix(pipe: Pipeline, latents: mx.array, prompts: Sequence[str], batch_size: int = DEFAULT_PAIR_BATCH) -> mx.array:
    """Bits per dimension (I, P) of I latents under P prompts, `batch_size` pairs per forward pass."""
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    states, rows = pipe.encode_distinct(list(prompts))
    count_images, count_prompts = latents.shape[0], len(prompts)
    pairs = [(i, p) for i in range(count_images) for p in range(count_prompts)]
    bits = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        x = latents[mx.array([i for i, _ in chunk])]
        y = None if states is None else states[mx.array([rows[p] for _, p in chunk])]
        bits.append(pipe.flow.bits_per_dim(x, y))
        mx.eval(bits[-1])
    return mx.concatenate(bits).reshape(count_images, count_prompts)


def score(
    pipe: Pipeline,
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    width: int | None = None,
    height: int | None = None,
    batch_size: int = DEFAULT_PAIR_BATCH,
) -> mx.array:
    """Bits per dimension of every image under every prompt, (images, prompts); lower = more likely."""
    prompts = check_prompts_list(prompts, "prompt")
    if not images:
        raise InputError("no images given; pass at least one")
    width, height = pipe.check_size(width, height)
    pipe.check_prompts(prompts)
    return likelihood_matrix(pipe, image_latents(pipe, images, width, height), prompts, batch_size)


def rank(
    pipe: Pipeline,
    image: ImageLike,
    captions: Sequence[str],
    width: int | None = None,
    height: int | None = None,
    batch_size: int = DEFAULT_PAIR_BATCH,
) -> list[RankedCaption]:
    """The captions ordered from most to least likely for the image (ties keep the given order)."""
    captions = check_prompts_list(captions)
    bits = score(pipe, [image], captions, width, height, batch_size)[0].tolist()
    best = min(bits)
    order = sorted(range(len(captions)), key=lambda index: bits[index])
    return [RankedCaption(captions[index], bits[index], bits[index] - best) for index in order]
