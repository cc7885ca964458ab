"""Bad input to `starflow export-coreml`: one line on stderr, exit code 1, no partial output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("coremltools", reason="the Core ML export needs the coreml extra: pip install -e '.[coreml]'")

from mlx_starflow.app.cli import main
from mlx_starflow.convert.coreml.export import ExportOptions, export_coreml, image_size
from mlx_starflow.convert.model import convert_model
from mlx_starflow.config import FlowConfig
from mlx_starflow.errors import ConfigError


@pytest.fixture(scope="module")
def label_model(fixtures_dir: Path, tmp_path_factory) -> Path:
    """The pixel-space label model (3 blocks, patch 2): the quickest real export."""
    sf = fixtures_dir / "starflow" / "label_model"
    out = tmp_path_factory.mktemp("label") / "model"
    convert_model(sf / "model.pth", sf / "config.yaml", out)
    return out


def refused(capsys, args: list[str], message: str, out: Path) -> None:
    """The CLI exits 1 with `message` on one line, and leaves nothing beside `out`."""
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after == before, "no partial output"


def test_a_folder_that_is_not_a_converted_model(fixtures_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    refused(capsys, ["export-coreml", str(fixtures_dir / "starflow"), "--out", str(out)], "this is not a converted folder", out)
    refused(capsys, ["export-coreml", str(tmp_path / "nothing"), "--out", str(out)], "no model at", out)


def test_an_image_size_off_the_patch_grid(label_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    refused(capsys, ["export-coreml", str(label_model), "--out", str(out), "--width", "15"], "not divisible by 2", out)


def test_the_text_model_grid_is_the_vae_factor_times_the_patch(fixtures_dir: Path, tmp_path: Path) -> None:
    convert_model(fixtures_dir / "starflow" / "model.pth", fixtures_dir / "starflow" / "config.yaml", tmp_path / "model")
    config = FlowConfig.load(tmp_path / "model" / "flow")
    assert image_size(config, ExportOptions()) == (64, 64)
    assert image_size(config, ExportOptions(height=32, width=96)) == (32, 96)
    with pytest.raises(ConfigError, match=r"60x64 is not divisible by 8 \(VAE factor 8 × patch size 1\)"):
        image_size(config, ExportOptions(width=60))


def test_a_text_model_without_its_text_encoder(fixtures_dir: Path, tmp_path: Path, capsys) -> None:
    convert_model(fixtures_dir / "starflow" / "model.pth", fixtures_dir / "starflow" / "config.yaml", tmp_path / "model")
    out = tmp_path / "out" / "export"
    refused(capsys, ["export-coreml", str(tmp_path / "model"), "--out", str(out)], "has no text_encoder/ or labels/", out)


@pytest.mark.parametrize("option,value,message", [
    ("--compress", "int3", "--compress must be one of int8, int4"),
    ("--dtype", "bfloat16", "--dtype must be one of float16, float32"),
    ("--attention", "flash", "--attention must be one of original, split-einsum"),
    ("--target", "iOS17", "--target must be one of macOS15, iOS18"),
    ("--batch-size", "0", "--batch-size must be at least 1, not 0"),
    ("--palette-group-size", "0", "--palette-group-size must be at least 1, not 0"),
])
def test_an_unsupported_option(label_model: Path, tmp_path: Path, capsys, option: str, value: str, message: str) -> None:
    out = tmp_path / "export"
    refused(capsys, ["export-coreml", str(label_model), "--out", str(out), option, value], message, out)


def test_a_palette_group_that_does_not_divide_the_width(label_model: Path, tmp_path: Path, capsys) -> None:
    """Refused before anything is built: coremltools would skip such kernels without a word."""
    out = tmp_path / "export"
    refused(capsys, ["export-coreml", str(label_model), "--out", str(out), "--compress", "palette4", "--palette-group-size", "48"],
            "--palette-group-size 48 does not divide the flow width (128)", out)


def test_split_einsum_needs_an_explicit_no_score_step(label_model: Path, tmp_path: Path, capsys) -> None:
    """Its 1×1-convolution layout has no vjp rules: never a silent drop of the denoise."""
    out = tmp_path / "export"
    refused(capsys, ["export-coreml", str(label_model), "--out", str(out), "--attention", "split-einsum"],
            "--attention split-einsum cannot carry the score-step gradient", out)


@pytest.mark.skipif(sys.platform == "darwin", reason="the Core ML compiler exists on macOS")
def test_compile_says_it_needs_macos(label_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    refused(capsys, ["export-coreml", str(label_model), "--out", str(out), "--compile"], "--compile needs the Core ML compiler, which only macOS has", out)


def test_an_existing_output_is_refused_unless_forced(label_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(capsys, ["export-coreml", str(label_model), "--out", str(out)], "already exists and is not a folder this program wrote", out)
    assert (out / "keep.txt").read_text() == "mine"
    refused(capsys, ["export-coreml", str(label_model), "--out", str(out), "--force", "--no-score-step"], "--force will not replace it", out)
    assert (out / "keep.txt").read_text() == "mine", "--force replaces only an export of ours"
    (out / "keep.txt").unlink()
    assert main(["export-coreml", str(label_model), "--out", str(out), "--force", "--no-score-step"]) == 0
    assert main(["export-coreml", str(label_model), "--out", str(out), "--force", "--no-score-step"]) == 0
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_failure_midway_leaves_nothing(label_model: Path, tmp_path: Path, monkeypatch) -> None:
    """An error after a package is written removes the temporary folder and keeps the old output."""
    from mlx_starflow.convert.coreml import export

    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "manifest.json").write_text('{"format": "mlx-starflow-coreml"}')  # an earlier export of ours
    written = []

    def save_then_fail(programs, path, *args, **kwargs):
        if written:
            raise RuntimeError("disk full")
        export_package(programs, path, *args, **kwargs)
        written.append(path)

    export_package = export.save_package
    monkeypatch.setattr(export, "save_package", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_coreml(label_model, out, score_step=False, force=True)
    assert written and not written[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (out / "keep.txt").read_text() == "mine"
