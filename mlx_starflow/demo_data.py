"""The procedural demo data set (coloured shapes) and the deterministic classifier that reads it back.

Every image is one saturated shape (circle, square or triangle; red, green, blue or yellow) on a
low-saturation background with a gentle gradient, with jittered position, size and colour. An
image is a pure function of (seed, index), so the data set is rebuilt on demand instead of being
committed. The classifier relies only on what the generator guarantees: shapes are saturated,
backgrounds are not, and a shape is the ideal circle, square or upright triangle of its bounding
box. It judges whether a model draws what it was asked to.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import CAPTIONS_FILE
from .errors import InputError
from .model_io import atomic_folder, write_manifest

IMAGE_SIZE = 32
DEMO_DATA_KIND = "starflow.demo_data"
"""Kind in the data folder's manifest: marks it as ours, so `--force` may replace it."""
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (30, 70, 220),
    "green": (30, 180, 40),
    "red": (220, 30, 30),
    "yellow": (230, 205, 25),
}
LABELS = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
"""Class names, sorted: the order a label model trained on this data lists them in."""

IMAGES_FOLDER = "images"

COLOUR_JITTER = 15
BACKGROUND_MAX_SATURATION = 0.15
BACKGROUND_VALUE_RANGE = (0.12, 0.92)
GRADIENT_MAX = 0.12
SIZE_RANGE = (0.19, 0.34)
"""Half-extent of a shape as a share of the image side."""
SUPERSAMPLE = 4

FOREGROUND_CHROMA = 60
"""max(RGB) − min(RGB) above which a pixel is shape, not background (backgrounds stay below 40,
shapes above 100)."""
MIN_SHAPE_PIXELS = 12
MIN_SHAPE_MATCH = 0.5
"""Least intersection-over-union with the best-fitting ideal shape for a region to count as one."""


@dataclass(frozen=True)
class ShapeSpec:
    label: str
    centre: tuple[float, float]
    half_extent: float
    colour: tuple[int, int, int]


def label_of(index: int) -> str:
    """Classes cycle with the image index, so any prefix of the data set is nearly balanced."""
    return LABELS[index % len(LABELS)]


def _rng(seed: int, index: int) -> np.random.RandomState:
    return np.random.RandomState([seed % 2**32, index % 2**32])


def shape_mask(shape: str, centre: tuple[float, float], half_extent: float, size: int) -> np.ndarray:
    """Coverage (size, size) in [0, 1] of one shape, from SUPERSAMPLE² points per pixel (anti-aliased)."""
    steps = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    y, x = np.meshgrid(steps, steps, indexing="ij")
    cx, cy = centre
    r = half_extent
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":
        inside = (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def _background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """(size, size, 3) float RGB in [0, 255]: a desaturated colour with a linear gradient."""
    hue = rng.uniform(0, 1)
    saturation = rng.uniform(0, BACKGROUND_MAX_SATURATION)
    value = rng.uniform(*BACKGROUND_VALUE_RANGE)
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0, GRADIENT_MAX)
    steps = np.linspace(-0.5, 0.5, size)
    y, x = np.meshgrid(steps, steps, indexing="ij")
    values = np.clip(value + strength * (np.cos(angle) * x + np.sin(angle) * y), 0, 1)
    base = np.array(colorsys.hsv_to_rgb(hue, saturation, 1.0))
    return values[..., None] * base * 255


def draw_spec(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[ShapeSpec, np.random.RandomState]:
    """The shape of image `index` (class, jittered centre, size and colour) and the image's
    generator, which goes on to draw the background."""
    rng = _rng(seed, index)
    label = label_of(index)
    colour_name = label.split()[0]
    half = rng.uniform(*SIZE_RANGE) * size
    centre = (rng.uniform(half + 1, size - half - 1), rng.uniform(half + 1, size - half - 1))
    jitter = rng.randint(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    colour = tuple(int(v) for v in np.clip(np.array(COLOURS[colour_name]) + jitter, 0, 255))
    return ShapeSpec(label, centre, half, colour), rng


def render(seed: int, index: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Image `index` of the data set `seed`: uint8 (3, size, size)."""
    spec, rng = draw_spec(seed, index, size)
    background = _background(rng, size)
    coverage = shape_mask(spec.label.split()[1], spec.centre, spec.half_extent, size)[..., None]
    pixels = background * (1 - coverage) + np.array(spec.colour, dtype=np.float64) * coverage
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def make_images(seed: int, count: int, size: int = IMAGE_SIZE, start: int = 0) -> tuple[np.ndarray, list[str]]:
    """Images start … start+count-1 as uint8 (count, 3, size, size) and their labels."""
    indices = range(start, start + count)
    return np.stack([render(seed, i, size) for i in indices]), [label_of(i) for i in indices]


def write_demo_data(out: str | Path, count: int, seed: int = 0, size: int = IMAGE_SIZE, force: bool = False) -> Path:
    """Write `count` PNGs under `out/images/` and `out/captions.tsv` (`file<TAB>label` per line), atomically."""
    if count < 1:
        raise InputError(f"the data set needs at least one image, got count {count}")
    with atomic_folder(out, force=force, kind=DEMO_DATA_KIND) as tmp:
        (tmp / IMAGES_FOLDER).mkdir()
        lines = []
        for index in range(count):
            name = f"{IMAGES_FOLDER}/{index:06d}.png"
            Image.fromarray(render(seed, index, size).transpose(1, 2, 0)).save(tmp / name)
            lines.append(f"{name}\t{label_of(index)}\n")
        (tmp / CAPTIONS_FILE).write_text("".join(lines))
        write_manifest(tmp, DEMO_DATA_KIND, sources=[{"generator": "starflow demo-data", "seed": seed, "count": count, "size": size}])
    return Path(out)


# ---- the classifier ---------------------------------------------------------------------------

_REFERENCE_HUES = {name: colorsys.rgb_to_hsv(*(np.array(rgb) / 255))[0] for name, rgb in COLOURS.items()}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (grown by repeated dilation inside it)."""
    remaining = mask.copy()
    best = np.zeros_like(mask)
    while remaining.any():
        region = np.zeros_like(mask)
        region[np.unravel_index(np.argmax(remaining), mask.shape)] = True
        while True:
            grown = region.copy()
            grown[1:] |= region[:-1]
            grown[:-1] |= region[1:]
            grown[:, 1:] |= region[:, :-1]
            grown[:, :-1] |= region[:, 1:]
            grown &= mask
            if (grown == region).all():
                break
            region = grown
        remaining &= ~region
        if region.sum() > best.sum():
            best = region
    return best


def _nearest_colour(rgb: np.ndarray) -> str:
    hue = colorsys.rgb_to_hsv(*(rgb / 255))[0]
    return min(_REFERENCE_HUES, key=lambda name: min(abs(hue - _REFERENCE_HUES[name]), 1 - abs(hue - _REFERENCE_HUES[name])))


def ideal_shapes(height: int, width: int) -> dict[str, np.ndarray]:
    """Boolean masks of each shape filling a height×width box, sampled at pixel centres."""
    y, x = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    return {
        "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(x - 0.5) <= y / 2,
    }


def shape_scores(region: np.ndarray) -> dict[str, float]:
    """Intersection-over-union of a region with each ideal shape fitted to its bounding box."""
    rows, cols = np.nonzero(region)
    crop = region[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    return {name: float((crop & ideal).sum() / (crop | ideal).sum()) for name, ideal in ideal_shapes(*crop.shape).items()}


def classify(image: np.ndarray) -> str | None:
    """The label an image (uint8 (3, H, W)) shows, or None when it shows no clear shape.

    Foreground = the largest connected region of saturated pixels; its colour is the reference
    hue nearest to its mean colour, its shape the ideal shape of its bounding box it overlaps most
    (at least MIN_SHAPE_MATCH).
    """
    pixels = image.astype(np.int32)
    chroma = pixels.max(axis=0) - pixels.min(axis=0)
    region = _largest_component(chroma > FOREGROUND_CHROMA)
    if region.sum() < MIN_SHAPE_PIXELS:
        return None
    scores = shape_scores(region)
    shape = max(scores, key=scores.get)
    if scores[shape] < MIN_SHAPE_MATCH:
        return None
    return f"{_nearest_colour(pixels[:, region].mean(axis=1))} {shape}"
