"""Image sizes for an aspect ratio, as the official sampler picks them.

The official `aspect_ratio_to_image_size` keeps the area of the training size's square and
rounds each side to the nearest multiple of VAE factor × patch size. The official sampler uses
it only for models trained with mixed aspect ratios (`mix_aspect`, which also appends the
ratio to the prompt); the released 256² model was trained square, so other ratios extrapolate.
"""

from __future__ import annotations

import math

from .errors import InputError

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21")
"""The official sampler's choices (sample.py, `--aspect_ratio`)."""


def _nearest_multiple(value: float, base: int) -> int:
    # Python's round: half to even, as the official code's round().
    return int(round(value / base)) * base


def aspect_ratio_size(ratio: str, side: int, multiple: int) -> tuple[int, int]:
    """(width, height) with the area of side × side, each a multiple of `multiple`."""
    if ratio not in ASPECT_RATIOS:
        raise InputError(f"unknown aspect ratio {ratio!r}; choose one of {', '.join(ASPECT_RATIOS)}")
    across, down = map(int, ratio.split(":"))
    area = side * side
    height = _nearest_multiple(math.sqrt(area / (across / down)), multiple)
    width = _nearest_multiple(math.sqrt(area * (across / down)), multiple)
    return width, height
