"""`starflow demo-data`: write the procedural demo data set (coloured shapes) to a folder."""

from __future__ import annotations

from pathlib import Path

import typer

from mlx_starflow.demo_data import IMAGE_SIZE, write_demo_data
from mlx_starflow.errors import InputError

from ..limits import MAX_DATA_BYTES, MAX_DEMO_COUNT, MAX_DEMO_SIZE, check_demo_data
from ..options import Force, Seed


def demo_data(
    out: Path = typer.Argument(..., help="Folder to create: images/*.png and captions.tsv (`file<TAB>label` per line)."),
    count: int = typer.Option(12000, "--count", "-n", help=f"Number of images (classes cycle, so the set stays balanced), at most {MAX_DEMO_COUNT:,}."),
    seed: Seed = 0,
    size: int = typer.Option(IMAGE_SIZE, "--size", help=f"Image side in pixels, 8 … {MAX_DEMO_SIZE}; count × 3 × size² bytes (what `train` loads into memory) "
                                                        f"must stay under {MAX_DATA_BYTES // 2**30} GiB."),
    force: Force = False,
) -> None:
    """Write the demo data set: 4 colours × 3 shapes = 12 classes, on varied backgrounds, rebuilt from its seed
    (image i depends only on the seed and i)."""
    if size < 8:
        raise InputError(f"--size must be at least 8 pixels, got {size}")
    check_demo_data(count, size)
    typer.echo(f"wrote {write_demo_data(out, count, seed=seed, size=size, force=force)} ({count} images)")
