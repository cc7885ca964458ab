"""The one model-folder reader: components and their kinds, refusals, and what the front doors share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_starflow import load, model_io
from mlx_starflow.app.cli import main
from mlx_starflow.convert.hub import is_current
from mlx_starflow.convert.model import convert_model
from mlx_starflow.demo_data import write_demo_data
from mlx_starflow.errors import ConfigError, ModelNotFound, WeightsError
from mlx_starflow.labels import LabelEncoder
from mlx_starflow.model_folder import load_model_folder, read_model_folder
from mlx_starflow.model_io import MODEL_KIND, VERIFIED_FILE, verify_folder, write_manifest
from mlx_starflow.text_encoder import TextEncoder


@pytest.fixture(scope="module")
def text_model(fixtures_dir, tmp_path_factory) -> Path:
    sf, vae = fixtures_dir / "starflow", fixtures_dir / "vae"
    return convert_model(sf / "model.pth", sf / "config.yaml", tmp_path_factory.mktemp("m") / "text",
                         text_encoder=fixtures_dir / "t5", vae=vae, decoder=vae / "finetuned" / "pytorch_model.bin")


@pytest.fixture(scope="module")
def label_model(fixtures_dir, tmp_path_factory) -> Path:
    sf = fixtures_dir / "starflow" / "label_model"
    return convert_model(sf / "model.pth", sf / "config.yaml", tmp_path_factory.mktemp("m") / "label")


def test_components_are_read_with_their_kinds(text_model, label_model):
    folder = read_model_folder(text_model)
    assert folder.components == {"flow": "starflow.flow", "text_encoder": "starflow.t5_encoder",
                                 "vae": "starflow.vae", "decoder": "starflow.vae"}
    assert folder.source_sha256 == json.loads((text_model / "manifest.json").read_text())["sources"][0]["sha256"]
    assert read_model_folder(label_model).components == {"flow": "starflow.flow", "labels": "starflow.labels"}


def test_parts_load_and_the_decoder_can_stay_on_disk(text_model, label_model):
    parts = load_model_folder(text_model)
    assert isinstance(parts.condition, TextEncoder) and parts.text_encoder is parts.condition and parts.labels is None
    assert parts.vae is not None and parts.decoder is not None
    assert load_model_folder(text_model, decoder=False).decoder is None
    labels = load_model_folder(label_model)
    assert isinstance(labels.labels, LabelEncoder) and labels.vae is None and labels.decoder is None
    assert load(label_model).name == "model"


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage,message", [
    ("unknown component", "components this version does not know (upscaler)"),
    ("no flow", "has no flow component"),
    ("decoder without vae", "fine-tuned decoder but no vae/"),
    ("component of another kind", "expected 'starflow.t5_encoder'"),
    ("component manifest missing", "vae/manifest.json is missing"),
    ("component file missing", "is incomplete"),
])
def test_damaged_folders_are_refused_by_every_front_door(text_model, tmp_path, damage, message):
    folder = tmp_path / "model"
    shutil.copytree(text_model, folder)
    if damage == "unknown component":
        edit_manifest(folder, components=["flow", "text_encoder", "vae", "upscaler"])
    elif damage == "no flow":
        edit_manifest(folder, components=["text_encoder", "vae"])
    elif damage == "decoder without vae":
        edit_manifest(folder, components=["flow", "text_encoder", "decoder"])
    elif damage == "component of another kind":
        shutil.rmtree(folder / "text_encoder")
        shutil.copytree(folder / "vae", folder / "text_encoder")
        write_manifest(folder, MODEL_KIND, components=["flow", "text_encoder", "vae", "decoder"])
    elif damage == "component manifest missing":
        (folder / "vae" / "manifest.json").unlink()
    elif damage == "component file missing":
        (folder / "text_encoder" / "tokenizer.json").unlink()
    with pytest.raises(ConfigError) as refused:
        read_model_folder(folder)
    assert message in str(refused.value)
    with pytest.raises(ConfigError):
        load(folder)
    edit_manifest(folder, origin={"checkpoint_sha256": "x"})
    assert not is_current(folder, None), "the hub's cache check reads folders the same way"


def test_a_component_folder_or_a_missing_path_is_not_a_model(text_model, tmp_path):
    with pytest.raises(ConfigError, match="holds a 'starflow.flow' component, not a model"):
        read_model_folder(text_model / "flow")
    with pytest.raises(ModelNotFound, match="no model at"):
        read_model_folder(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        read_model_folder(tmp_path / "file")


# ---- the manifest's sha256 values, checked on load and on demand ----------------------------------


def hashed(monkeypatch) -> list[str]:
    """Names of the files model_io hashes from now on."""
    calls: list[str] = []
    real = model_io.sha256_file
    monkeypatch.setattr(model_io, "sha256_file", lambda path, *a: calls.append(Path(path).name) or real(path, *a))
    return calls


def flip_byte(path: Path, offset: int = -5, keep_mtime: bool = False) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_weights_are_hashed_on_first_load_and_again_only_when_changed(label_model, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(label_model, folder)
    for record in folder.rglob(VERIFIED_FILE):
        record.unlink()  # as a fresh conversion: never loaded
    calls = hashed(monkeypatch)
    load(folder)
    assert "model.safetensors" in calls, "the first load after conversion checks the hashes"
    calls.clear()
    load(folder)
    assert calls == [], "an unchanged folder costs a stat per file, no hashing"
    weights = folder / "flow" / "model.safetensors"
    os.utime(weights)
    load(folder)
    assert calls == ["model.safetensors"], "only the file whose mtime changed is hashed again"
    flip_byte(weights)
    with pytest.raises(WeightsError, match=r"flow is damaged: model.safetensors does not match its sha256"):
        load(folder)


def test_verify_folder_hashes_everything_whatever_the_record_says(label_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(label_model, folder)
    assert verify_folder(folder) == len(json.loads((folder / "manifest.json").read_text())["files"]) + \
        sum(len(json.loads((folder / c / "manifest.json").read_text())["files"]) for c in ("flow", "labels"))
    load(folder)
    flip_byte(folder / "flow" / "model.safetensors", keep_mtime=True)
    load(folder)  # same size and mtime: the cheap check cannot tell, by design
    with pytest.raises(WeightsError, match="model.safetensors does not match its sha256"):
        verify_folder(folder)


def test_a_folder_that_keeps_no_record_still_loads_and_is_checked_every_time(label_model, tmp_path, monkeypatch):
    """A read-only folder (simulated: this suite may run as root, which writes anywhere)."""
    folder = tmp_path / "model"
    shutil.copytree(label_model, folder)
    for record in folder.rglob(VERIFIED_FILE):
        record.unlink()
    real_replace = os.replace

    def read_only(src, dst, *args, **kwargs):
        if Path(dst).name == VERIFIED_FILE:
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(model_io.os, "replace", read_only)
    calls = hashed(monkeypatch)
    load(folder)
    load(folder)
    assert calls.count("model.safetensors") == 2, "without a record every load hashes"
    assert not list(folder.rglob(VERIFIED_FILE)) and not list(folder.rglob("*.tmp")), "nothing is left behind"


# ---- --force replaces only our own outputs -----------------------------------------------------------


def test_force_replaces_a_model_folder_but_never_the_users_files(fixtures_dir, label_model, tmp_path, capsys):
    sf = fixtures_dir / "starflow" / "label_model"
    args = ["convert", str(sf / "model.pth"), "--config", str(sf / "config.yaml"), "--force", "--out"]
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    assert main([*args, str(mine)]) == 1
    err = capsys.readouterr().err
    assert "not a folder this program wrote" in err and len(err.strip().splitlines()) == 1
    assert (mine / "holiday.jpg").read_bytes() == b"precious" and sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]
    other = tmp_path / "data"
    write_demo_data(other, count=2, size=8)
    assert main([*args, str(other)]) == 1
    assert "a folder of another kind" in capsys.readouterr().err and (other / "captions.tsv").is_file()
    again = tmp_path / "model"
    shutil.copytree(label_model, again)
    assert main([*args, str(again)]) == 0
    assert read_model_folder(again).components == {"flow": "starflow.flow", "labels": "starflow.labels"}


def test_leftovers_of_a_killed_conversion_are_removed_by_the_next(fixtures_dir, tmp_path):
    sf = fixtures_dir / "starflow" / "label_model"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".model.tmp-{dead.pid}-abcdefgh"
    (leftover / "flow").mkdir(parents=True)
    live = tmp_path / f".model.tmp-{os.getpid()}-running"
    live.mkdir()
    unrelated = tmp_path / ".model.tmp-notes"
    unrelated.mkdir()
    convert_model(sf / "model.pth", sf / "config.yaml", tmp_path / "model")
    assert not leftover.exists() and live.exists() and unrelated.exists()
