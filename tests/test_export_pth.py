"""`starflow export-pth`: our folders back in the official format.

The exported state dict must equal the official fixture checkpoint key for key and value for
value (deprecated buffers included), and its YAML must convert back to the same model.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_starflow.app.cli import main
from mlx_starflow.convert.checkpoint import open_checkpoint


@pytest.fixture(scope="module")
def sf(fixtures_dir):
    return fixtures_dir / "starflow"


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("model", ["", "label_model"])
def test_export_reproduces_the_official_checkpoint(sf, tmp_path, capsys, model):
    source = sf / model
    assert run(capsys, "convert", source / "model.pth", "--config", source / "config.yaml", "--out", tmp_path / "m")[0] == 0
    code, err = run(capsys, "export-pth", tmp_path / "m", "--out", tmp_path / "official.pth")
    assert code == 0, err
    official = open_checkpoint(source / "model.pth")
    exported = open_checkpoint(tmp_path / "official.pth")
    assert set(exported) == set(official)
    for name, tensor in official.items():
        assert exported[name].shape == tensor.shape, name
        assert np.array_equal(exported[name].numpy(), tensor.numpy()), name

    code, err = run(capsys, "convert", tmp_path / "official.pth", "--config", tmp_path / "official.yaml", "--out", tmp_path / "again")
    assert code == 0, err
    first = mx.load(str(tmp_path / "m" / "flow" / "model.safetensors"))
    again = mx.load(str(tmp_path / "again" / "flow" / "model.safetensors"))
    assert set(first) == set(again) and all(mx.array_equal(first[k], again[k]) for k in first)
    assert (tmp_path / "again" / "flow" / "config.json").read_text() == (tmp_path / "m" / "flow" / "config.json").read_text()


def test_quantised_and_existing_outputs_are_refused(sf, tmp_path, capsys):
    assert run(capsys, "convert", sf / "model.pth", "--config", sf / "config.yaml", "--out", tmp_path / "q", "--quantize", "8")[0] == 0
    code, err = run(capsys, "export-pth", tmp_path / "q", "--out", tmp_path / "q.pth")
    assert code == 1 and "quantised" in err and not (tmp_path / "q.pth").exists()
    assert run(capsys, "convert", sf / "model.pth", "--config", sf / "config.yaml", "--out", tmp_path / "m")[0] == 0
    (tmp_path / "taken.yaml").write_text("mine")
    code, err = run(capsys, "export-pth", tmp_path / "m", "--out", tmp_path / "taken.pth")
    assert code == 1 and "--force" in err and (tmp_path / "taken.yaml").read_text() == "mine"
    assert not (tmp_path / "taken.pth").exists()
