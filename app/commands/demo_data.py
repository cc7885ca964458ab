"""`starflow demo-data`: write the procedural demo data set (coloured shapes) to a folder."""

from __future__ import annotations

from pathlib import Path

import typer

from mlx_starflow.demo_data import IMAGE_SIZE, write_demo_data

from ..options import Force, Seed


def demo_data(
    out: Path = typer.Argument(..., help="Folder to create: images/*.png and captions.tsv (`file<TAB>label` per line)."),
    count: int = typer.Option(12000, "--count", "-n", help="Number of images (classes cycle, so the set stays balanced)."),
    seed: Seed = 0,
    size: int = typer.Option(IMAGE_SIZE, "--size", help="Image side in pixels."),
    force: Force = False,
) -> None:
    """Write the demo data set: 4 colours × 3 shapes = 12 classes, on varied backgrounds, rebuilt from its seed
    (image i depends only on the seed and i)."""
    if size < 8:
        raise ValueError(f"--size must be at least 8 pixels, got {size}")
    typer.echo(f"wrote {write_demo_data(out, count, seed=seed, size=size, force=force)} ({count} images)")
