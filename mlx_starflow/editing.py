"""What only an invertible flow can do: map an image to the one noise that gives it back,
then edit, vary or interpolate by changing that noise or the prompt it is sampled under.

Inversion runs the image's latent (VAE posterior mean, or the pixels of a pixel-space model)
forward through every block under a prompt, unguided: the result is exact up to float
rounding. Sampling that noise back with guidance 0 and a sequential sampler returns the same
latent; what is not exact is the VAE round trip (decode(encode(image)) ≠ image), guidance (a
guided sample is not the inverse of the unguided forward) and Jacobi's early stopping.
The noise arithmetic itself is in `noise_ops`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import InputError
from .config import FlowConfig
from .flow import StarFlow
from .image import GeneratedImage, fit_image, pil_to_uint8, read_image, uint8_to_model_input
from .noise_ops import check_strength, interpolation_path, keep_tokens, mix_noise, resolve_keep
from .samplers import Sampler, Sequential
from .sampling import bits_per_dim, nll_per_sample

from .vae import VAE

ImageLike = str | Path | Image.Image | np.ndarray
"""A file path, a PIL image, or uint8 pixels (3, H, W)."""


class Pipeline(Protocol):
    """What inversion and ranking use of a loaded model (`pipeline.StarFlowPipeline`); the
    pipeline calls into this module, so this module names the pipeline only by its shape."""

    flow: StarFlow
    vae: VAE | None

    @property
    def config(self) -> FlowConfig: ...

    def check_size(self, width: int | None, height: int | None) -> tuple[int, int]: ...

    def check_prompts(self, prompts: Sequence[str]) -> list[str]: ...

    def encode_distinct(self, prompts: Sequence[str]) -> tuple[mx.array | None, list[int]]: ...

    def noise(self, seeds: Sequence[int], width: int, height: int) -> mx.array: ...

    def iter_generate(self, prompts: Sequence[str], seed: Any = None, **settings: Any) -> Iterator[Any]: ...


@dataclass(frozen=True)
class Inversion:
    """Images mapped to noise: `noise` gives back `latent` when sampled under `prompts` unguided.

    `latent` is what the flow saw (the scaled VAE posterior mean, or pixels in [-1, 1]);
    `bits_per_dim` the exact likelihood of each, which the forward pass gives for free.
    """

    noise: mx.array
    latent: mx.array
    prompts: tuple[str, ...]
    width: int
    height: int
    bits_per_dim: tuple[float, ...]


def as_pixels(image: ImageLike) -> np.ndarray:
    """uint8 (3, H, W) RGB from a path, a PIL image or a uint8 array."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return pil_to_uint8(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] == 3:
        return image
    raise InputError(f"expected an image path, a PIL image or uint8 pixels (3, H, W), got {type(image).__name__}")


def image_latents(pipe: Pipeline, images: Sequence[ImageLike], width: int, height: int) -> mx.array:
    """Images prepared as the official data pipeline does (centre crop, resize) → the flow's input."""
    pixels = uint8_to_model_input(np.stack([fit_image(as_pixels(image), width, height) for image in images]))
    return pixels if pipe.vae is None else pipe.vae.encode(pixels)


def conditions(pipe: Pipeline, prompts: Sequence[str]) -> mx.array | None:
    """Condition states per prompt, each distinct prompt encoded once."""
    states, rows = pipe.encode_distinct(list(prompts))
    return None if states is None else states[mx.array(rows)]


def invert(
    pipe: Pipeline, images: Sequence[ImageLike], prompts: Sequence[str], width: int | None = None, height: int | None = None
) -> Inversion:
    """Each image → the noise that samples back to it under its prompt (one prompt per image)."""
    if len(images) != len(prompts):
        raise InputError(f"{len(images)} image(s) but {len(prompts)} prompt(s); pass one prompt per image")
    if not images:
        raise InputError("no images to invert; pass at least one")
    width, height = pipe.check_size(width, height)
    pipe.check_prompts(list(prompts))
    latent = image_latents(pipe, images, width, height)
    noise, logdets = pipe.flow.forward(latent, conditions(pipe, prompts))
    bits = bits_per_dim(nll_per_sample(noise, logdets))
    mx.eval(noise, latent, bits)
    return Inversion(noise, latent, tuple(prompts), width, height, tuple(bits.tolist()))


def round_trip_error(pipe: Pipeline, inversion: Inversion, sampler: Sampler | None = None) -> float:
    """Max |sample(noise) − latent| with guidance 0: the flow's own inversion error.

    Sequential sampling gives float rounding (~1e-6 on the fixture model); Jacobi adds its
    stopping error.
    """
    y = conditions(pipe, inversion.prompts)
    back = pipe.flow.sample(inversion.noise, y, 0.0, sampler=sampler or Sequential())
    return mx.max(mx.abs(back - inversion.latent)).item()


def edit_noise(pipe: Pipeline, inversion: Inversion, keep: int | float | None, seed: int) -> mx.array:
    """The inverted noise with all but the first `keep` deep-block tokens redrawn from `seed`."""
    patch = pipe.config.patch_size
    _, _, H, W = inversion.noise.shape
    count = resolve_keep(keep, (H // patch) * (W // patch))
    if count == (H // patch) * (W // patch):
        return inversion.noise
    fresh = pipe.noise([seed] * inversion.noise.shape[0], inversion.width, inversion.height)
    return keep_tokens(inversion.noise, fresh, count, patch, pipe.flow.blocks[-1].flipped)


def sample_noise(
    pipe: Pipeline,
    prompts: Sequence[str],
    noise: mx.array,
    seeds: Sequence[int] | None,
    extras: Sequence[dict[str, str]],
    **settings,
) -> list[GeneratedImage]:
    """Sample, denoise and decode given noise through the pipeline's own generation loop.

    Each result's metadata gains its `extras` entry (what was inverted, how the noise was
    changed); without `seeds` (noise not drawn from a seed) it carries no seed.
    """
    _, _, H, W = noise.shape
    factor = pipe.config.vae_factor
    rows = list(range(len(prompts))) if seeds is None else list(seeds)
    results = []
    for progress in pipe.iter_generate(list(prompts), rows, width=W * factor, height=H * factor, noise=noise, **settings):
        results += list(progress.images)
    finished = []
    for result, extra in zip(results, extras):
        metadata = {key: value for key, value in result.metadata.items() if seeds is not None or key != "seed"}
        metadata.update(extra)
        for key in set(result.image.info) - set(metadata):
            del result.image.info[key]
        result.image.info.update(metadata)
        finished.append(replace(result, metadata=metadata))
    return finished


def edit(
    pipe: Pipeline,
    image: ImageLike,
    prompt: str,
    source_prompt: str = "",
    keep: int | float | None = None,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    **settings,
) -> GeneratedImage:
    """Invert `image` under `source_prompt`, keep the first `keep` tokens of its noise (all by
    default), redraw the rest from `seed`, and sample under `prompt`."""
    width, height = pipe.check_size(width, height)
    step = pipe.config.size_multiple
    resolve_keep(keep, (width // step) * (height // step))  # refused before the inversion runs
    inversion = invert(pipe, [image], [source_prompt], width, height)
    noise = edit_noise(pipe, inversion, keep, seed)
    redrawn = noise is not inversion.noise
    extra = {"edit_source_prompt": source_prompt, "edit_keep": "all" if keep is None else f"{keep:g}"}
    return sample_noise(pipe, [prompt], noise, [seed] if redrawn else None, [extra], **settings)[0]


def vary(
    pipe: Pipeline,
    image: ImageLike,
    prompt: str = "",
    count: int = 4,
    strength: float = 0.3,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    **settings,
) -> list[GeneratedImage]:
    """`count` variations: the inverted noise mixed with fresh noise from seeds seed, seed+1, …"""
    check_strength(strength)
    if count < 1:
        raise InputError(f"the number of variations must be at least 1, got {count}")
    inversion = invert(pipe, [image], [prompt], width, height)
    seeds = [seed + i for i in range(count)]
    fresh = pipe.noise(seeds, inversion.width, inversion.height)
    noise = mix_noise(mx.broadcast_to(inversion.noise, fresh.shape), fresh, strength)
    extras = [{"vary_strength": f"{strength:g}"}] * count
    return sample_noise(pipe, [prompt] * count, noise, seeds, extras, **settings)


def interpolate(
    pipe: Pipeline,
    prompt: str,
    steps: int,
    seeds: tuple[int, int] | None = None,
    images: tuple[ImageLike, ImageLike] | None = None,
    width: int | None = None,
    height: int | None = None,
    **settings,
) -> list[GeneratedImage]:
    """`steps` images along the spherical path between two noises: two seeds, or two images
    inverted under `prompt`; the ends reproduce the seeds' samples (or the images, unguided)."""
    if (seeds is None) == (images is None):
        raise InputError("interpolate between two seeds or two images: give exactly one of the two pairs")
    if steps < 2:
        raise InputError(f"interpolation needs at least 2 steps (the two ends), got {steps}")
    width, height = pipe.check_size(width, height)
    if seeds is not None:
        ends = pipe.noise(list(seeds), width, height)
        between = f"seeds {seeds[0]} and {seeds[1]}"
    else:
        ends = invert(pipe, list(images), [prompt, prompt], width, height).noise
        between = "two inverted images"
    path = interpolation_path(ends[:1], ends[1:], steps)
    extras = [{"interpolate": f"frame {i + 1} of {steps} between {between}"} for i in range(steps)]
    return sample_noise(pipe, [prompt] * steps, path, None, extras, **settings)

