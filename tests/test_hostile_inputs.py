"""Hostile inputs across the commands: each is refused with one `error:` line and exit 1, before
any model is loaded where the input can be checked first, and leaves the disk as it was.

The cases are the ones a sweep of every command with bad files and values found wanting: caption
and prompt files that are FIFOs, devices, folders, not UTF-8 or too big; prompts that are not
UTF-8 on the command line; counts that only multiply past a limit (noise rows × prompts, images ×
prompts, captions); noise files holding NaN; seeds out of range; zips that declare millions of
entries; converted weights damaged in place before `export-pth`; a noise file on a read-only disk;
manifests and verification records that are FIFOs, nested too deep or damaged (run in a subprocess
with a timeout where a read could block); a noise file's damaged prompt record.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_starflow.app.commands.edit as edit_command
import mlx_starflow.app.commands.generate as generate_command
import mlx_starflow.app.commands.interpolate as interpolate_command
import mlx_starflow.app.commands.invert as invert_command
import mlx_starflow.app.commands.rank as rank_command
import mlx_starflow.app.commands.score as score_command
import mlx_starflow.app.commands.vary as vary_command
import mlx_starflow.app.inputs as inputs
from mlx_starflow.app.cli import main
from mlx_starflow.app.limits import MAX_IMAGES, MAX_PAIRS
from mlx_starflow.convert.pth_reader import MAX_ZIP_DIRECTORY_BYTES, MAX_ZIP_ENTRIES, open_pth
from mlx_starflow.convert.safetensors_io import safetensors_metadata
from mlx_starflow.errors import InputError, WeightsError
from mlx_starflow.noise_file import NoiseFile, save_noise

from cli_runs import one_error_line, run

NOT_UTF8 = "caf\udce9"
"""What Python makes of the Latin-1 bytes `caf\\xe9` on a UTF-8 command line (surrogateescape)."""


def flip_bit(path: Path, from_end: int, keep_mtime: bool = False) -> None:
    """Damage a file in place, one bit `from_end` bytes before its end; its size stays, and with
    `keep_mtime` its modification time too (what a cheap size/mtime check cannot see)."""
    info = path.stat()
    with path.open("r+b") as f:
        f.seek(info.st_size - from_end)
        byte = f.read(1)
        f.seek(info.st_size - from_end)
        f.write(bytes([byte[0] ^ 0x10]))
    if keep_mtime:
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """Loading or fetching a model fails the test: these inputs must be refused before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(generate_command, "resolve_model", refuse)
    for module in (score_command, rank_command, invert_command, edit_command, vary_command, interpolate_command):
        monkeypatch.setattr(module, "load_pipeline", refuse)


@pytest.fixture
def files(tmp_path):
    """A small image, and text files of every bad kind, in a folder of their own."""
    root = tmp_path / "in"
    root.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "image.png")
    os.mkfifo(root / "fifo")
    (root / "folder").mkdir()
    (root / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (root / "blank.txt").write_text("\n  \n\t\n")
    (root / "big.txt").write_text("a cat\n" * 100)
    return root


# ---- caption and prompt files: the same bounded UTF-8 reader as generate's prompts ----------------


TEXT_FILES = [
    ("fifo", "is not a regular file"),
    ("folder", "is not a regular file"),
    ("/dev/zero", "is not a regular file"),
    ("missing.txt", "is not a regular file"),
    ("latin1.txt", "is not UTF-8 text"),
    ("blank.txt", "holds no"),
    ("big.txt", "is larger than the"),
]


def _file_option(files: Path, name: str) -> Path:
    return Path(name) if name.startswith("/") else files / name


@pytest.mark.parametrize("name,fragment", TEXT_FILES)
@pytest.mark.parametrize("command", ["rank", "score"])
def test_caption_and_prompt_files_are_read_with_bounds(no_model, monkeypatch, capsys, files, command, name, fragment):
    monkeypatch.setattr(inputs, "MAX_PROMPTS_FILE_BYTES", 256)
    before = snapshot(files)
    file = _file_option(files, name)
    args = (["rank", files / "image.png", "--captions", file] if command == "rank"
            else ["score", files / "image.png", "--prompts-file", file])
    code, out, err = run(capsys, *args)
    one_error_line(code, err, str(file), fragment)
    assert out == ""
    assert snapshot(files) == before


@pytest.mark.parametrize("args,flag", [
    (["rank", "{image}", "--caption", NOT_UTF8], "--caption"),
    (["score", "{image}", NOT_UTF8], "the prompt"),
    (["score", "{image}", "--prompt", NOT_UTF8], "--prompt"),
    (["invert", "{image}", "--prompt", NOT_UTF8, "--out", "{out}/noise.safetensors"], "--prompt"),
    (["edit", "{image}", "--prompt", NOT_UTF8, "--output", "{out}/edit.png"], "--prompt"),
    (["edit", "{image}", "--prompt", "a dog", "--source-prompt", NOT_UTF8, "--output", "{out}/edit.png"], "--source-prompt"),
    (["vary", "{image}", "--prompt", NOT_UTF8, "--output", "{out}/vary.png"], "--prompt"),
    (["interpolate", "--seeds", "1", "2", "--prompt", NOT_UTF8, "--output", "{out}/strip.png"], "--prompt"),
])
def test_prompts_that_are_not_utf8_are_refused_before_loading(no_model, capsys, files, tmp_path, args, flag):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, *[a.format(image=files / "image.png", out=out) for a in args])
    one_error_line(code, err, flag, "not valid UTF-8")
    assert list(out.iterdir()) == []


# ---- counts that multiply past a limit -----------------------------------------------------------


def test_rank_caps_the_number_of_captions(no_model, capsys, files):
    captions = files / "captions.txt"
    captions.write_text("".join(f"caption {i}\n" for i in range(MAX_PAIRS + 1)))
    code, out, err = run(capsys, "rank", files / "image.png", "--captions", captions)
    one_error_line(code, err, "captions", f"{MAX_PAIRS + 1}", f"{MAX_PAIRS:,}")
    assert out == ""


def test_score_caps_images_times_prompts(no_model, capsys, files):
    prompts = files / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(MAX_PAIRS // 2 + 1)))
    code, out, err = run(capsys, "score", files / "image.png", files / "image.png", "--prompts-file", prompts)
    one_error_line(code, err, "(image, prompt) pairs", f"{MAX_PAIRS:,}")
    assert out == ""


def _noise_file(path: Path, rows: int, value: float = 0.0) -> Path:
    save_noise(path, mx.full((rows, 4, 1, 1), value, dtype=mx.float32), {"format": "starflow.noise"})
    return path


def test_generate_counts_noise_rows_times_prompts(no_model, capsys, files, tmp_path):
    noise = _noise_file(files / "noise.safetensors", MAX_IMAGES // 2 + 1)
    prompts = files / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, "generate", "--prompts-file", prompts, "--noise", noise, "--output", out)
    one_error_line(code, err, "noise rows × prompts", f"{MAX_IMAGES:,}")
    assert not out.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_generate_refuses_noise_with_non_finite_values(no_model, capsys, files, tmp_path, value):
    noise = _noise_file(files / "noise.safetensors", 1, value)
    out = tmp_path / "out"
    code, _, err = run(capsys, "generate", "a cat", "--noise", noise, "--output", out)
    one_error_line(code, err, str(noise), "NaN or infinite")
    assert not out.exists()


@pytest.mark.parametrize("seeds", [("-1", "2"), ("1", str(2**32))])
def test_interpolate_seeds_are_range_checked(no_model, capsys, tmp_path, seeds):
    code, _, err = run(capsys, "interpolate", "--seeds", *seeds, "--output", tmp_path / "strip.png")
    one_error_line(code, err, "--seeds", "out of range")
    assert list(tmp_path.iterdir()) == []


# ---- readers: zip directories and non-regular safetensors ----------------------------------------


def _small_zip(path: Path, entries: int = 3) -> bytes:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("m/data.pkl", b"\x80\x02}q\x00.")
        for i in range(entries - 1):
            archive.writestr(f"m/data/{i}", b"")
    return path.read_bytes()


def _with_directory_fields(data: bytes, entries: int | None = None, directory_bytes: int | None = None) -> bytes:
    """`data` with its end-of-directory record declaring other entry counts or directory size."""
    at = data.rfind(b"PK\x05\x06")
    record = bytearray(data[at:])
    if entries is not None:
        record[8:12] = struct.pack("<HH", entries, entries)
    if directory_bytes is not None:
        record[12:16] = struct.pack("<I", directory_bytes)
    return data[:at] + bytes(record)


@pytest.mark.parametrize("edit,fragment", [
    ({"entries": 0xFFFE}, "65,534 zip entries"),
    ({"directory_bytes": MAX_ZIP_DIRECTORY_BYTES + 1}, f"{MAX_ZIP_DIRECTORY_BYTES + 1:,} bytes of directory"),
])
def test_a_zip_declaring_a_huge_directory_is_refused_before_listing(monkeypatch, tmp_path, edit, fragment):
    monkeypatch.setattr("mlx_starflow.convert.pth_reader.MAX_ZIP_ENTRIES", 1000)
    path = tmp_path / "bomb.pth"
    path.write_bytes(_with_directory_fields(_small_zip(tmp_path / "small.pth"), **edit))
    with pytest.raises(WeightsError, match="damaged or not a checkpoint") as refused:
        open_pth(path)
    assert fragment in str(refused.value)


def test_a_real_zip64_of_too_many_entries_is_refused_in_one_line(monkeypatch, capsys, fixtures_dir, tmp_path):
    """Past 65,535 entries the count lives in the zip64 record, which is read too (the limit is
    lowered to just above that, so the file stays small)."""
    limit = 0x10000
    assert limit <= MAX_ZIP_ENTRIES
    monkeypatch.setattr("mlx_starflow.convert.pth_reader.MAX_ZIP_ENTRIES", limit)
    path = tmp_path / "many.pth"
    _small_zip(path, limit + 1)
    out = tmp_path / "model"
    code, _, err = run(capsys, "convert", path, "--config", fixtures_dir / "starflow" / "config.yaml", "--out", out)
    one_error_line(code, err, f"{limit + 1:,} zip entries")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.pth"]


@pytest.mark.parametrize("kind", ["fifo", "folder", "missing"])
def test_safetensors_metadata_refuses_what_is_not_a_regular_file(files, kind):
    with pytest.raises(WeightsError, match="not a regular file|is a folder|cannot read"):
        safetensors_metadata(files / kind)


# ---- converted folders damaged in place, and writing noise to a read-only disk -------------------


@pytest.fixture(scope="module")
def model(fixtures_dir, tmp_path_factory):
    """The tiny 64×64 text-to-image model of the fixtures (flow, T5, VAE)."""
    out = tmp_path_factory.mktemp("hostile_model") / "model"
    sf = fixtures_dir / "starflow"
    assert main(["convert", str(sf / "model.pth"), "--config", str(sf / "config.yaml"), "--out", str(out),
                 "--text-encoder", str(fixtures_dir / "t5"), "--vae", str(fixtures_dir / "vae")]) == 0
    return out


def test_export_pth_refuses_weights_damaged_in_place(model, capsys, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    flip_bit(damaged / "flow" / "model.safetensors", 64, keep_mtime=True)
    (damaged / "flow" / ".verified.json").unlink(missing_ok=True)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "export-pth", damaged, "--out", out / "model.pth")
    one_error_line(code, err, "model.safetensors", "sha256")
    assert list(out.iterdir()) == []


def test_invert_refuses_a_folder_as_its_noise_file_before_loading(no_model, capsys, files, tmp_path):
    folder = tmp_path / "mine.safetensors"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "invert", files / "image.png", "--out", folder, "--force")
    one_error_line(code, err, f"--out {folder} is a folder")
    assert snapshot(folder) == {"keep.txt": b"mine"}


def test_a_noise_file_that_cannot_be_written_names_the_users_file(monkeypatch, tmp_path):
    """Writing fails on the hidden temporary; the error the user sees names the file they asked for."""
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(mx, "save_safetensors", read_only)
    from mlx_starflow.errors import environment_error

    target = tmp_path / "noise.safetensors"
    with pytest.raises(OSError) as failed:
        save_noise(target, mx.zeros((1, 4, 1, 1)), {})
    message = str(environment_error(failed.value))
    assert f"cannot use {target}:" in message and "Read-only" in message, message
    assert list(tmp_path.iterdir()) == []


def test_invert_on_a_real_read_only_disk_fails_before_loading(no_model, files, tmp_path, capsys):
    """A read-only tmpfs where mounting is allowed (root on Linux); else skipped."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        code, _, err = run(capsys, "invert", files / "image.png", "--out", mount_point / "noise.safetensors")
        one_error_line(code, err, f"cannot write to {mount_point}", "Read-only", "--out")
        assert list(mount_point.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


# ---- concurrent writers of one output folder --------------------------------------------------


def test_the_loser_of_a_concurrent_folder_write_gets_one_readable_line(monkeypatch, capsys, tmp_path):
    """Another run writes the same `demo-data` folder while this one runs: this one refuses with
    a message (not `[Errno None]`), the other run's folder stays, no temporary is left."""
    out = tmp_path / "data"
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp_then_lose_the_race(*args, **kwargs):
        folder = real_mkdtemp(*args, **kwargs)
        out.mkdir()
        (out / "theirs.txt").write_text("the other run's")
        return folder

    monkeypatch.setattr("mlx_starflow.model_io.tempfile.mkdtemp", mkdtemp_then_lose_the_race)
    code, _, err = run(capsys, "demo-data", out, "--count", 12, "--size", 8)
    one_error_line(code, err, f"{out} was written by another run meanwhile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert snapshot(out) == {"theirs.txt": b"the other run's"}


# ---- manifests and verification records that are FIFOs, nested too deep, or damaged --------------

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"
DEEP_JSON = "[" * 200_000 + "]" * 200_000
"""Nested far past Python's recursion limit: the plain `json` module dies on it."""


def run_in_subprocess(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, so a read that blocks (a FIFO) fails the test instead of hanging it."""
    script = "import sys; from mlx_starflow.app.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _convert_args(fixtures_dir: Path, out: Path) -> list:
    sf = fixtures_dir / "starflow"
    return ["convert", sf / "model.pth", "--config", sf / "config.yaml", "--out", out, "--force"]


def test_a_fifo_manifest_is_refused_without_waiting(fixtures_dir, tmp_path):
    folder = tmp_path / "M"
    folder.mkdir()
    os.mkfifo(folder / "manifest.json")
    for args in (["info", folder], _convert_args(fixtures_dir, folder)):
        done = run_in_subprocess(*args)
        one_error_line(done.returncode, done.stderr, str(folder))
        assert "not a regular file" in done.stderr or "--force will not replace it" in done.stderr, done.stderr
    assert [p.name for p in folder.iterdir()] == ["manifest.json"] and stat.S_ISFIFO((folder / "manifest.json").lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M"], "no temporary left beside it"


def test_a_manifest_nested_too_deep_is_one_error_line(fixtures_dir, capsys, tmp_path):
    folder = tmp_path / "D"
    folder.mkdir()
    (folder / "manifest.json").write_text(DEEP_JSON)
    before = snapshot(folder)
    code, _, err = run(capsys, "info", folder)
    one_error_line(code, err, "manifest.json", "nested deeper than")
    code, _, err = run(capsys, *_convert_args(fixtures_dir, folder))
    one_error_line(code, err, "--force will not replace it")
    assert snapshot(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["D"]


@pytest.mark.parametrize("record", ["deep", "fifo", "garbage", "folder"])
def test_a_damaged_verification_record_means_hash_again(capsys, tmp_path, record):
    """`.verified.json` only saves hashing: damaged, it is ignored, the files are hashed again and the
    record is rewritten; generation goes on as normal."""
    model = tmp_path / "model"
    shutil.copytree(DEMO, model, ignore=shutil.ignore_patterns(".verified.json"))
    path = model / "flow" / ".verified.json"
    if record == "deep":
        path.write_text(DEEP_JSON)
    elif record == "fifo":
        os.mkfifo(path)
    elif record == "garbage":
        path.write_bytes(b"\xff\xfe not json")
    else:
        path.mkdir()
    out = tmp_path / "out.png"
    done = run_in_subprocess("generate", "red circle", "--model", model, "-W", 8, "-H", 8, "--seed", 0, "-o", out)
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    if record != "folder":  # a folder in the way keeps the record from being written: hashing again each time is still right
        rewritten = json.loads(path.read_text())
        assert set(rewritten) == {"config.json", "model.safetensors"}


def test_a_damaged_record_does_not_hide_damaged_weights(capsys, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(DEMO, model, ignore=shutil.ignore_patterns(".verified.json"))
    flip_bit(model / "flow" / "model.safetensors", 8)
    (model / "flow" / ".verified.json").write_text(DEEP_JSON)
    code, _, err = run(capsys, "generate", "red circle", "--model", model, "-W", 8, "-H", 8, "-o", tmp_path / "out.png")
    one_error_line(code, err, "model.safetensors", "sha256")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("recorded", ["[" * 100_000, "5", '["a", 1]', "not json"])
def test_a_noise_files_damaged_prompts_are_an_input_error(recorded):
    with pytest.raises(InputError, match="recorded prompts are damaged"):
        NoiseFile(mx.zeros((1, 4, 1, 1)), {"prompts": recorded}).prompts


@pytest.mark.parametrize("field,value", [("components", 5), ("components", ["flow", 3]), ("components", {"flow": 1}),
                                         ("sources", ["a path"]), ("sources", 7)])
def test_info_refuses_a_malformed_manifest_in_one_line(capsys, tmp_path, field, value):
    model = tmp_path / "model"
    shutil.copytree(DEMO, model, ignore=shutil.ignore_patterns(".verified.json"))
    manifest = json.loads((model / "manifest.json").read_text())
    manifest[field] = value
    (model / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run(capsys, "info", model)
    one_error_line(code, err, "manifest.json is malformed", field)
