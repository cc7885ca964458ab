"""The shipped demo model (weights/demo): it loads like any model and draws the class it is asked for.

Samples follow the project's conventions (noise of image i from numpy RandomState(seed + i),
conditional rows then empty-class rows for guidance, the score-step denoise), and the demo data
set's own deterministic classifier reads colour and shape back.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_starflow import load_flow
from mlx_starflow.demo_data import LABELS, classify
from mlx_starflow.image import decoded_to_uint8
from mlx_starflow.labels import load_label_encoder

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"
SAMPLES_PER_CLASS = 4
SEED = 0
GUIDANCE = 3.6
"""The guidance `starflow generate` uses by default (the official sampling script's)."""
MIN_ACCURACY = 0.75
"""Colour and shape both right on at least 75% of the samples; chance is 1/12 ≈ 8%."""
MIN_COLOUR_ACCURACY = 0.9


@pytest.fixture(scope="module")
def samples() -> tuple[list[str], list[str | None]]:
    flow = load_flow(DEMO)
    labels = load_label_encoder(DEMO / "labels")
    asked = [label for label in labels.labels for _ in range(SAMPLES_PER_CLASS)]
    c = flow.config
    noise = np.concatenate([np.random.RandomState(SEED + i).standard_normal((1, c.in_channels, c.latent_size, c.latent_size))
                            for i in range(len(asked))]).astype(np.float32)
    y = labels.encode(asked + [""] * len(asked))
    images = flow.sample(mx.array(noise), y, guidance=GUIDANCE)
    images = flow.denoise(images, y[: len(asked)])
    return asked, [classify(image) for image in decoded_to_uint8(images)]


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
