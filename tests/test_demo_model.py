"""The shipped demo model (weights/demo): it loads like any model and draws the class it is asked for.

The samples come from the path users run, `mlx_starflow.load(...).generate(...)` with its
defaults (guidance 3.6, the backend's default sampler, score-step denoise, the default batch size), and the demo data
set's own deterministic classifier reads colour and shape back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlx_starflow
from mlx_starflow.demo_data import LABELS, classify
from mlx_starflow.image import pil_to_uint8
from mlx_starflow.labels import load_label_encoder

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"
SAMPLES_PER_CLASS = 2
SEED = 0
MIN_ACCURACY = 0.75
"""Colour and shape both right on at least 75% of the 24 samples; chance is 1/12 ≈ 8%."""
MIN_COLOUR_ACCURACY = 0.9
"""Colour right on at least 90%; chance is 1/4."""


@pytest.fixture(scope="module")
def samples() -> tuple[list[str], list[str | None]]:
    pipe = mlx_starflow.load(DEMO)
    asked = [label for label in pipe.condition.labels for _ in range(SAMPLES_PER_CLASS)]
    images = pipe.generate(asked, seed=SEED)
    return asked, [classify(pil_to_uint8(image)) for image in images]


def test_demo_model_is_a_label_model_of_the_demo_classes():
    manifest = json.loads((DEMO / "manifest.json").read_text())
    assert manifest["components"] == ["flow", "labels"]
    assert tuple(load_label_encoder(DEMO / "labels").labels) == LABELS
    record = manifest["training"]
    for key in ("command", "seed", "step", "train_seconds", "hardware", "heldout_bits_per_dim", "heldout_bits_per_dim_8bit"):
        assert record[key] is not None, key
    assert record["step"] == record["settings"]["steps"]


def test_demo_model_draws_the_requested_colour_and_shape(samples):
    asked, seen = samples
    right = np.mean([a == s for a, s in zip(asked, seen)])
    colour = np.mean([s is not None and a.split()[0] == s.split()[0] for a, s in zip(asked, seen)])
    print(f"demo model: {right:.0%} of {len(asked)} samples fully right, colour right on {colour:.0%}")
    assert colour >= MIN_COLOUR_ACCURACY, list(zip(asked, seen))
    assert right >= MIN_ACCURACY, list(zip(asked, seen))
