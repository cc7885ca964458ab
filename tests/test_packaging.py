"""The wheel installs `convert/` and `app/` inside our namespace, never as top-level packages
that would collide with another project's `convert` or `app` in site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_has_one_top_level_package(tmp_path):
    source = tmp_path / "source"  # built from a copy: setuptools writes build/ beside the sources
    skip = shutil.ignore_patterns(".build", "__pycache__", "generated", "*.egg-info", "swift")
    for folder in ("mlx_starflow", "convert", "app"):
        shutil.copytree(REPO / folder, source / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("mlx_starflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"mlx_starflow"}
    for module in ("mlx_starflow/convert/hub.py", "mlx_starflow/app/cli.py", "mlx_starflow/convert/configs/starflow_3B_t2i_256x256.yaml"):
        assert module in names
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "starflow = mlx_starflow.app.cli:run" in zipfile.ZipFile(wheel).read(entry_points).decode()
