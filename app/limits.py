"""The largest sizes and counts the commands accept, each derived from the memory it would take.

They are checked as the command line is parsed, before any model is loaded or array allocated,
so `-W 100000` fails in one line instead of after minutes of loading or in the middle of a run.
The README's "Limits" table states the same derivations.
"""

from __future__ import annotations

import math

from mlx_starflow.errors import InputError

MAX_IMAGE_SIDE = 4096
"""Pixels per image side (generate, score, export-coreml). At 4096² an image is 262,144 latent
tokens: the official model's deep-block key/value cache with guidance then takes
24 layers × (K, V) × 2 rows × 262,144 × 3072 × 2 B = 155 GB in float16, and each full-resolution
activation of the SD-VAE decoder 128 × 4096² × 4 B = 8.6 GB; larger sides fit no Mac."""

MAX_BATCH = 64
"""Images sampled together (generate, export-coreml). The deep block's cache with guidance is
24 × 2 × 2 × (1024 + 128 text) tokens × 3072 × 2 B = 0.68 GB per 256² image in float16, so 64
images take 43 GB."""

MAX_IMAGES = 10_000
"""Images per generate run (prompts × -n). Every output name and seed is planned before
sampling; 10,000 PNGs at 256² are about 2 GB of disk."""

MAX_PAIRS = 10_000
"""(image, prompt) pairs per `score` run and captions per `rank` run: each is one forward pass
of the flow (about 3.8 B multiply-adds per latent token with the official model), so 10,000 is
already hours of work; a 16 MiB caption file of short lines would otherwise ask for millions."""

MAX_GRID_PIXELS = 89_478_485
"""Pixels of one grid PNG: Pillow's decompression-bomb threshold (Image.MAX_IMAGE_PIXELS), so
any Pillow-based viewer or our own `score` opens it; its RGB array is then 268 MB."""

MAX_PROMPTS_FILE_BYTES = 16 * 2**20
"""A prompts file is read whole: 16 MiB is far more than MAX_IMAGES prompts of T5's 128 tokens."""

MAX_DEMO_SIZE = 1024
"""Demo image side: each image is drawn in float64 from full-size planes; drawing one peaks at
0.56 GB at 1024 (measured with tracemalloc), growing with the side squared."""

MAX_DEMO_COUNT = 1_000_000
"""Demo images: the captions list is held in memory (about 40 B per image)."""

MAX_DATA_BYTES = 16 * 2**30
"""Pixels of a whole demo data set (count × 3 × size² bytes): `train` loads the set into memory
as uint8, so 16 GiB keeps the largest set trainable on a 32 GB machine."""


def check_at_most(option: str, value: int, limit: int, why: str) -> int:
    """`value` if within 1 … `limit`, else one line naming the option, the limit and its reason."""
    if value < 1:
        raise InputError(f"{option} must be at least 1, not {value}")
    if value > limit:
        raise InputError(f"{option} {value} is above the limit of {limit:,} ({why}); pass a smaller value")
    return value


def check_finite(option: str, value: float) -> float:
    """Refuse NaN and ±infinity, which no setting means and which would poison every number after."""
    if not math.isfinite(value):
        raise InputError(f"{option} must be a finite number, not {value}")
    return value


def check_image_side(option: str, value: int) -> int:
    return check_at_most(option, value, MAX_IMAGE_SIDE, "memory: the KV cache and VAE activations grow with the side squared")


def check_batch(option: str, value: int) -> int:
    return check_at_most(option, value, MAX_BATCH, "memory: each image in a batch holds its own KV cache")


def check_image_count(images: int, counted: str = "prompts × -n") -> int:
    return check_at_most(f"the number of images ({counted})", images, MAX_IMAGES, "images planned per run")


def check_pairs(pairs: int, counted: str) -> int:
    return check_at_most(f"the number of {counted}", pairs, MAX_PAIRS, "forward passes of the flow per run")


def check_grid(images: int, columns: int, width: int, height: int) -> None:
    """The grid of `images` tiles, `columns` wide, must stay under MAX_GRID_PIXELS."""
    pixels = math.ceil(images / columns) * columns * width * height
    if pixels > MAX_GRID_PIXELS:
        raise InputError(f"a grid of {images} images of {width}x{height} has {pixels:,} pixels, above the limit of "
                         f"{MAX_GRID_PIXELS:,} that image viewers open; drop --grid or make fewer or smaller images")


def check_demo_data(count: int, size: int) -> None:
    check_at_most("--count", count, MAX_DEMO_COUNT, "captions held in memory")
    check_at_most("--size", size, MAX_DEMO_SIZE, "memory: each image is drawn in float64")
    data = count * 3 * size * size
    if data > MAX_DATA_BYTES:
        raise InputError(f"--count {count} images of {size}x{size} make {data / 2**30:.1f} GiB of pixels, above the limit of "
                         f"{MAX_DATA_BYTES / 2**30:.0f} GiB that `train` can load into memory; pass a smaller --count or --size")
