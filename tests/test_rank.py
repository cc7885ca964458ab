"""Ranking captions by likelihood (mlx_starflow.ranking) on the shipped demo model and the fixtures.

Zero-shot classification: the demo model (weights/demo: 12 shape-and-colour classes, a label
model in pixel space) generates one image per class, and `rank` must put the true class first
for at least 9 of the 12 (75 %; chance is 1/12 ≈ 8 %). Measured: 12/12 with these seeds, and
22/24 over two images per class from seed 100 (Linux CPU).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_starflow import load
from mlx_starflow.errors import InputError
from mlx_starflow.image import pil_to_uint8, uint8_to_model_input
from mlx_starflow.ranking import likelihood_matrix, rank, score

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"
TOP1_THRESHOLD = 9


@pytest.fixture(scope="module")
def demo():
    return load(DEMO)


@pytest.fixture(scope="module")
def class_images(demo):
    labels = list(demo.condition.labels)
    images = demo.generate(labels, seed=2024, denoise="none", batch_size=len(labels))
    return labels, images


def test_rank_puts_the_true_class_first_well_above_chance(demo, class_images):
    labels, images = class_images
    bits = np.asarray(score(demo, images, labels, batch_size=16))
    assert bits.shape == (12, 12)
    correct = int((bits.argmin(axis=1) == np.arange(12)).sum())
    assert correct >= TOP1_THRESHOLD, f"true class first for {correct}/12 images"
    # rank orders one image's row of the same matrix, best first, with the gaps to the best
    ranked = rank(demo, images[0], labels[::-1], batch_size=5)
    assert [r.caption for r in ranked] == [labels[i] for i in np.argsort(bits[0], kind="stable")]
    assert np.allclose([r.bits_per_dim for r in ranked], np.sort(bits[0]), atol=1e-5)
    assert ranked[0].behind_best == 0 and all(b.behind_best >= a.behind_best for a, b in zip(ranked, ranked[1:]))


def test_batched_pairs_equal_one_pair_at_a_time(demo, class_images):
    labels, images = class_images
    x = uint8_to_model_input(np.stack([pil_to_uint8(image) for image in images[:3]]))
    batched = likelihood_matrix(demo, x, labels[:4], batch_size=5)
    single = [[demo.score(x[i : i + 1], label).item() for label in labels[:4]] for i in range(3)]
    assert np.allclose(np.asarray(batched), single, atol=1e-5)
    assert np.allclose(np.asarray(demo.score(x, labels[:4])), single, atol=1e-5)  # the pipeline's list form


def test_rank_and_score_refuse_empty_lists(demo, class_images):
    _, images = class_images
    with pytest.raises(InputError, match="no captions"):
        rank(demo, images[0], [])
    with pytest.raises(InputError, match="no images"):
        score(demo, [], ["red circle"])
    with pytest.raises(InputError, match="batch size"):
        likelihood_matrix(demo, mx.zeros((1, 3, 32, 32)), ["red circle"], batch_size=0)
