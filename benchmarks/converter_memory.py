"""Converter peak memory on a synthetic official checkpoint of at least 2 GB.

The checkpoint has the official key names and layout (3B layout scaled in width) and is written
tensor by tensor; `starflow convert` then runs in a child process whose peak RSS is read from
the OS. A child that only imports the converter gives the fixed baseline.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

from mlx_starflow.convert.checkpoint import TensorEntry
from mlx_starflow.convert.maps.starflow import official_name
from mlx_starflow.convert.pth_writer import save_pth
from mlx_starflow.flow import StarFlow

from .models import REAL_LAYERS, scaled_config

YAML = """arguments:
- img_size: 256
- txt_size: 128
- channel_size: 4
- patch_size: 1
- channels: {width}
- layers_per_block: {layers}
- noise_std: 0.3
- rope: 1
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- vae: stabilityai/sd-vae-ft-ema
- text: google/flan-t5-xl
- soft_clip: 4
"""


def write_checkpoint(path: Path, width: int) -> tuple[int, int]:
    """Stream a float32 checkpoint with official names; returns (file bytes, largest tensor bytes)."""
    config = scaled_config(width)
    entries = []
    for name, param in tree_flatten(StarFlow(config).parameters()):
        shape = tuple(param.shape)
        entries.append(TensorEntry(official_name(name), "float32", shape,
                                   lambda shape=shape: np.full(shape, 0.01, np.float32)))
    entries.append(TensorEntry("var", "float32", (config.latent_size**2, 4), lambda: np.ones((1024, 4), np.float32)))
    save_pth(path, entries)
    largest = max(int(np.prod(e.shape)) * 4 for e in entries)
    return path.stat().st_size, largest


def _peak_rss_of(command: list[str]) -> tuple[int, float]:
    """Run a child and return (its peak RSS in bytes, wall seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("the child's peak RSS did not exceed an earlier child's; run this benchmark in a fresh process")
    return peak * (1 if sys.platform == "darwin" else 1024), seconds


def run(width: int = 1152) -> str:
    with tempfile.TemporaryDirectory(prefix="starflow-bench-") as tmp:
        folder = Path(tmp)
        checkpoint = folder / "synthetic.pth"
        (folder / "config.yaml").write_text(YAML.format(width=width, layers=" ".join(map(str, REAL_LAYERS))))
        size, largest = write_checkpoint(checkpoint, width)
        baseline, _ = _peak_rss_of([sys.executable, "-c", "import mlx_starflow.app.cli, mlx_starflow.convert.model, mlx.core"])
        peak, seconds = _peak_rss_of([sys.executable, "-m", "mlx_starflow.app.cli", "convert", str(checkpoint),
                                      "--config", str(folder / "config.yaml"), "--out", str(folder / "out")])
    gb = 1e9
    return "\n".join([
        f"### Converter memory: synthetic official checkpoint (3B layout, width {width}, float32)", "",
        "| checkpoint | largest tensor | peak RSS of `starflow convert` | of which import baseline | conversion wall s |",
        "|---|---|---|---|---|",
        f"| {size / gb:.2f} GB | {largest / 1e6:.1f} MB | {peak / 1e6:.0f} MB ({peak / size:.3f}× the checkpoint) | "
        f"{baseline / 1e6:.0f} MB | {seconds:.1f} |",
    ])
