"""The procedural demo data set and its classifier: deterministic, balanced, and read back correctly."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_starflow.app.cli import main
from mlx_starflow.dataset import load_image_folder
from mlx_starflow.demo_data import LABELS, classify, label_of, make_images, render, write_demo_data

CLASSIFIER_MIN_ACCURACY = 0.99
"""On clean generated images the classifier must be right on at least 99% (measured: 100% of 1200)."""


def test_labels_are_sorted_colour_shape_pairs():
    assert LABELS == tuple(sorted(LABELS)) and len(set(LABELS)) == 12
    assert {label.split()[0] for label in LABELS} == {"red", "green", "blue", "yellow"}
    assert {label.split()[1] for label in LABELS} == {"circle", "square", "triangle"}


def test_images_depend_only_on_seed_and_index():
    assert np.array_equal(render(5, 17), render(5, 17))
    assert not np.array_equal(render(5, 17), render(6, 17))
    images, labels = make_images(seed=5, count=4, start=15)
    assert np.array_equal(images[2], render(5, 17)) and labels[2] == label_of(17)
    assert images.dtype == np.uint8 and images.shape == (4, 3, 32, 32)


def test_classes_are_balanced():
    _, labels = make_images(seed=0, count=120, size=16)
    assert all(labels.count(label) == 10 for label in LABELS)


def test_classifier_reads_clean_images():
    images, labels = make_images(seed=2024, count=600)
    accuracy = np.mean([classify(image) == label for image, label in zip(images, labels)])
    assert accuracy >= CLASSIFIER_MIN_ACCURACY, accuracy


def test_classifier_tolerates_the_training_noise():
    """Samples carry noise of about the training noise (std 0.1 in [-1, 1], 12.75 levels)."""
    images, labels = make_images(seed=7, count=240)
    noisy = np.clip(images + np.random.RandomState(0).normal(0, 12.75, images.shape), 0, 255).astype(np.uint8)
    accuracy = np.mean([classify(image) == label for image, label in zip(noisy, labels)])
    assert accuracy >= 0.95, accuracy


def test_classifier_rejects_images_without_a_shape():
    grey = np.full((3, 32, 32), 128, np.uint8)
    assert classify(grey) is None
    noise = np.random.RandomState(0).randint(0, 256, (3, 32, 32)).astype(np.uint8)
    assert classify(noise) is None or classify(noise) in LABELS


def test_written_data_set_reads_back_exactly(tmp_path):
    out = write_demo_data(tmp_path / "data", count=24, seed=3, size=16)
    data = load_image_folder(out, 16)
    images, labels = make_images(seed=3, count=24, size=16)
    assert np.array_equal(data.images, images)
    assert data.captions == tuple(labels)
    assert data.source["images"] == 24 and data.skipped == ()


def test_bad_requests_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        write_demo_data(tmp_path / "none", count=0)
    assert not (tmp_path / "none").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        write_demo_data(tmp_path / "taken", count=2)


def test_cli_writes_the_data_set(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d"), "--count", "12", "--size", "16", "--seed", "1"]) == 0
    assert len(list((tmp_path / "d" / "images").glob("*.png"))) == 12
    assert main(["demo-data", str(tmp_path / "d"), "--count", "12"]) == 1
    assert "--force" in capsys.readouterr().err


def test_force_replaces_a_previous_data_set_only(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["demo-data", str(out), "--count", "12", "--size", "8"]) == 0
    assert main(["demo-data", str(out), "--count", "24", "--size", "8", "--force"]) == 0
    assert len(list((out / "images").glob("*.png"))) == 24
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "captions.tsv").write_text("my own\tcaptions\n")
    assert main(["demo-data", str(mine), "--count", "12", "--size", "8", "--force"]) == 1
    err = capsys.readouterr().err
    assert "--force will not replace it" in err and len(err.strip().splitlines()) == 1
    assert (mine / "captions.tsv").read_text() == "my own\tcaptions\n" and not (mine / "images").exists()


def test_a_folder_that_is_not_ours_is_not_offered_force(tmp_path, capsys):
    """Without --force, a folder --force would not replace either says so, instead of 'pass --force'."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["demo-data", str(mine), "--count", "12", "--size", "8"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pass --force" not in err, err
    assert "is not a folder this program wrote" in err and "remove it yourself or choose another output" in err, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    previous = tmp_path / "previous"
    assert main(["demo-data", str(previous), "--count", "12", "--size", "8"]) == 0
    capsys.readouterr()
    assert main(["demo-data", str(previous), "--count", "12", "--size", "8"]) == 1
    assert "already exists; pass --force to replace it" in capsys.readouterr().err, "our own data set is offered --force"
