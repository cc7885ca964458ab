"""Label conditioning against the official label-model fixture (`y`, `y_cfg` one-hot rows)."""

import mlx.core as mx
import pytest

from mlx_starflow.convert.model import read_vocab
from mlx_starflow.config import LabelConfig
from mlx_starflow.labels import LabelEncoder, UnknownLabel


@pytest.fixture(scope="module")
def encoder(fixtures_dir):
    return LabelEncoder(LabelConfig(labels=read_vocab(fixtures_dir / "starflow" / "label_model" / "labels.vocab")))


def test_one_hot_rows_match_the_official_condition(encoder, fixtures_dir):
    ref = mx.load(str(fixtures_dir / "starflow" / "label_model" / "fixtures.safetensors"))
    assert mx.array_equal(encoder.encode(["cat", "ship"]), ref["y"])
    assert mx.array_equal(encoder.encode(["cat", "ship", "", ""]), ref["y_cfg"])
    assert encoder.ids(["cat", "ship", "", ""]) == ref["label_ids"].tolist()


def test_labels_ignore_case_and_spacing(encoder):
    assert encoder.ids(["  Cat ", "SHIP"]) == [3, 8]


def test_unknown_label_lists_the_known_ones(encoder):
    with pytest.raises(UnknownLabel, match="airplane, automobile"):
        encoder.ids(["dragon"])
