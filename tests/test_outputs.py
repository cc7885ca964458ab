"""Generated images are claimed atomically: concurrent runs never both "win" a name, a full or
read-only disk is one error line with nothing half-written, and grids record their batches."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_starflow.app.outputs as outputs
from mlx_starflow.app.outputs import Target, plan_outputs, write_image
from mlx_starflow.errors import OutputError, OutputExists
from cli_runs import DEMO, run

SMALL = ["--model", str(DEMO), "-W", "8", "-H", "8", "--seed", "0"]
"""The demo model at 8x8 pixels: a real generation in a fraction of a second."""


def solid(value: int) -> Image.Image:
    return Image.fromarray(np.full((4, 4, 3), value, np.uint8))


def colour(path: Path) -> int:
    with Image.open(path) as image:
        return int(np.asarray(image.convert("RGB"))[0, 0, 0])


def test_plans_free_names_and_refuses_taken_explicit_names(tmp_path):
    (tmp_path / "cat-0.png").write_bytes(b"mine")
    planned = plan_outputs(tmp_path, ["cat", "Cat!"], [0, 1], grid=False, force=False)
    assert [[t.path.name for t in row] for row in planned] == [["cat-0-2.png", "cat-1.png"], ["cat-0-3.png", "cat-1-2.png"]]
    with pytest.raises(OutputExists, match="--force"):
        plan_outputs(tmp_path / "cat-0.png", ["cat"], [0], grid=False, force=False)
    assert plan_outputs(tmp_path / "cat-0.png", ["cat"], [0], grid=False, force=True)[0][0].numbered is False


def test_staged_files_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    abandoned = tmp_path / f".cat-0.partial-{dead.pid}-0123abcd"
    live = tmp_path / f".cat-0.partial-{os.getpid()}-4567cdef"
    for path in (abandoned, live):
        path.write_bytes(b"\x89PNG half")
    plan_outputs(tmp_path, ["cat"], [0], grid=False, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_a_numbered_name_taken_meanwhile_moves_to_the_next_free_one(tmp_path):
    target = plan_outputs(tmp_path, ["cat"], [0], grid=False, force=False)[0][0]
    (tmp_path / "cat-0.png").write_bytes(b"another run")
    (tmp_path / "cat-0-2.png").write_bytes(b"a third run")
    written = write_image(solid(7), target, {"prompt": "cat"}, force=False)
    assert written == tmp_path / "cat-0-3.png" and colour(written) == 7
    assert (tmp_path / "cat-0.png").read_bytes() == b"another run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-0-2.png", "cat-0-3.png", "cat-0.png"]


def test_an_explicit_name_taken_meanwhile_is_refused_and_kept(tmp_path):
    target = plan_outputs(tmp_path / "mine.png", ["cat"], [0], grid=False, force=False)[0][0]
    (tmp_path / "mine.png").write_bytes(b"another run")
    with pytest.raises(OutputExists, match="another run meanwhile"):
        write_image(solid(7), target, {}, force=False)
    assert (tmp_path / "mine.png").read_bytes() == b"another run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]
    write_image(solid(9), target, {}, force=True)
    assert colour(tmp_path / "mine.png") == 9 and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("hard_links", [True, False])
def test_concurrent_writers_of_one_name_never_both_win(tmp_path, monkeypatch, hard_links):
    if not hard_links:
        def no_link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted", str(src))

        monkeypatch.setattr(outputs.os, "link", no_link)
    writers = 8
    start = threading.Barrier(writers)
    written: dict[int, Path] = {}

    def writer(value: int) -> None:
        target = Target(tmp_path, "cat-0")
        start.wait()
        written[value] = write_image(solid(value), target, {"seed": "0"}, force=False)

    threads = [threading.Thread(target=writer, args=(value,)) for value in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(written.values())) == writers, "two writers claimed the same name"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cat-0.png", *(f"cat-0-{n}.png" for n in range(2, writers + 1))])
    for value, path in written.items():
        assert colour(path) == value, f"{path.name} holds another writer's image"


def test_two_processes_writing_one_name(tmp_path):
    script = ("import sys, numpy as np; from pathlib import Path; from PIL import Image; "
              "from mlx_starflow.app.outputs import Target, write_image; "
              "v = int(sys.argv[1]); print(write_image(Image.fromarray(np.full((4, 4, 3), v, np.uint8)), "
              "Target(Path(sys.argv[2]), 'cat-0'), {}, force=False).name)")
    processes = [subprocess.Popen([sys.executable, "-c", script, str(v), str(tmp_path)], stdout=subprocess.PIPE, text=True)
                 for v in (50, 60)]
    names = {v: p.communicate(timeout=120)[0].strip() for v, p in zip((50, 60), processes)}
    assert sorted(names.values()) == ["cat-0-2.png", "cat-0.png"]
    for value, name in names.items():
        assert colour(tmp_path / name) == value


def test_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    def full_disk(image, path, metadata=None, overwrite=False):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "save_png", full_disk)
    with pytest.raises(OutputError, match=r"cat-0\.png \(No space left on device\); free some disk space"):
        write_image(solid(1), Target(tmp_path, "cat-0"), {}, force=False)
    assert list(tmp_path.iterdir()) == []


def test_generate_on_a_full_disk_is_one_error_line(tmp_path, monkeypatch, capsys):
    real_save = outputs.save_png
    saved = []

    def second_is_full(image, path, metadata=None, overwrite=False):
        if saved:
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        saved.append(path)
        return real_save(image, path, metadata, overwrite)

    monkeypatch.setattr(outputs, "save_png", second_is_full)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "generate", "red circle", *SMALL, "-n", 2, "-o", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 2, err  # the model line, then the error
    assert lines[-1].startswith("error: cannot write") and "red-circle-1.png" in lines[-1] and "No space left" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["red-circle-0.png"], "only the complete first image stays"
    assert "wrote" in stdout and "red-circle-0.png" in stdout


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs, where mounting is allowed (root on Linux); else the test is skipped."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_generate_on_a_real_full_and_read_only_disk(small_tmpfs, capsys):
    filler = small_tmpfs / "filler"
    with filler.open("wb") as f:
        try:
            f.write(b"\0" * (128 * 1024))
        except OSError:
            pass
    out = small_tmpfs / "out"
    code, _, err = run(capsys, "generate", "red circle", *SMALL, "-o", out)
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: cannot write"), err
    assert "No space left on device" in err and "Traceback" not in err, err
    assert not out.exists() or list(out.iterdir()) == [], "nothing half-written"
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    code, _, err = run(capsys, "generate", "red circle", *SMALL, "-o", small_tmpfs / "elsewhere")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Read-only file system" in err, err


def test_grid_records_every_batch_and_the_batch_size(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "red circle", *SMALL, "-n", 5, "-b", 2, "--grid", "-o", tmp_path / "grid.png")
    assert code == 0, err
    with Image.open(tmp_path / "grid.png") as image:
        assert image.text["batch_size"] == "2"
        assert image.text["batch_seeds"] == "0,1 | 2,3 | 4"
        assert image.text["seed"] == "0,1,2,3,4"


@pytest.mark.parametrize("command", ["convert", "demo-data", "export-pth"])
def test_writers_on_a_real_full_disk(small_tmpfs, fixtures_dir, capsys, command):
    """A full disk mid-write: one line naming the output as the user gave it, nothing left behind."""
    starflow = fixtures_dir / "starflow"
    out = small_tmpfs / ("x.pth" if command == "export-pth" else "x")
    args = {"convert": ["convert", starflow / "model.pth", "--config", starflow / "config.yaml", "--out", out],
            "demo-data": ["demo-data", out, "--count", 500],
            "export-pth": ["export-pth", DEMO, "--out", out]}[command]
    code, _, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot use {out}") and "No space left on device" in err and ".tmp-" not in err, err
    assert list(small_tmpfs.iterdir()) == []
