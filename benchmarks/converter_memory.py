"""Converter peak memory on a synthetic official checkpoint of at least 2 GB.

The checkpoint has the official key names and layout (3B layout scaled in width) and is written
tensor by tensor; `starflow convert` then runs in a child process whose peak RSS is read from
the OS. A child that only imports the converter gives the fixed baseline.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

from mlx_starflow.convert.tensors import TensorEntry
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


PEAK_REPORTER = """
import atexit, resource, sys

def _report(path=sys.argv[1]):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except OSError:
        pass
    with open(path, "w") as out:
        out.write(str(peak))

atexit.register(_report)
"""
"""Prefixed to a child's code: at exit it writes its own peak RSS in bytes (Linux: VmHWM of the
process's own address space; macOS: ru_maxrss, already in bytes there)."""


def _peak_rss_of(code: str) -> tuple[int, float]:
    """Run `code` in a fresh Python child and return (the child's own peak RSS in bytes, wall seconds).

    Not `ru_maxrss` of the child seen from here: on Linux it starts at the parent's resident
    size when the child is forked, so after this process has held large arrays every child
    reads as the parent.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as report:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", PEAK_REPORTER + code, report.name], check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        return int(Path(report.name).read_text()), seconds


def run(width: int = 1152) -> tuple[str, dict]:
    with tempfile.TemporaryDirectory(prefix="starflow-bench-") as tmp:
        folder = Path(tmp)
        checkpoint = folder / "synthetic.pth"
        (folder / "config.yaml").write_text(YAML.format(width=width, layers=" ".join(map(str, REAL_LAYERS))))
        size, largest = write_checkpoint(checkpoint, width)
        baseline, _ = _peak_rss_of("import mlx_starflow.app.cli, mlx_starflow.convert.model, mlx.core")
        arguments = ["starflow", "convert", str(checkpoint), "--config", str(folder / "config.yaml"), "--out", str(folder / "out")]
        peak, seconds = _peak_rss_of(f"import runpy; sys.argv = {arguments!r}; "
                                     "runpy.run_module('mlx_starflow.app.cli', run_name='__main__')")
    gb = 1e9
    record = {"checkpoint_bytes": size, "largest_tensor_bytes": largest, "peak_rss_bytes": peak,
              "import_baseline_rss_bytes": baseline, "seconds": seconds}
    return "\n".join([
        f"### Converter memory: synthetic official checkpoint (3B layout, width {width}, float32)", "",
        "| checkpoint | largest tensor | peak RSS of `starflow convert` | of which import baseline | conversion wall s |",
        "|---|---|---|---|---|",
        f"| {size / gb:.2f} GB | {largest / 1e6:.1f} MB | {peak / 1e6:.0f} MB ({peak / size:.3f}× the checkpoint) | "
        f"{baseline / 1e6:.0f} MB | {seconds:.1f} |",
    ]), {"converter_memory": record}
