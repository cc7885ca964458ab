"""`starflow rank`: captions ordered by how probable they make an image (zero-shot classification).

Each caption's bits per dimension is the exact likelihood of the image under it; lower is
more likely. The image is encoded once, the captions in text-encoder batches, and each forward
pass scores a batch of captions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mlx_starflow.errors import InputError
from mlx_starflow.ranking import DEFAULT_PAIR_BATCH, rank as rank_captions

from ..inputs import check_text, read_lines
from ..limits import check_pairs
from ..options import FIRST_RUN_DTYPE, Dtype, Height, Model, Offline, Quantize, Width, check_batch_size
from .noise_tools import check_image_path, load_pipeline, note


def read_captions(values: list[str] | None, file: Path | None, what: str = "caption", flag: str = "--caption") -> list[str]:
    """The option's values then the file's non-blank lines, in that order; at least one in all.
    The file is read as `generate` reads prompts: a bounded regular UTF-8 file."""
    found = [check_text(value, flag) for value in values or []]
    if file is not None:
        found += read_lines(file, what)
    if not found:
        raise InputError(f"give {what}s with {flag} TEXT (repeatable) or a file of them")
    return found


def rank(
    image: Path = typer.Argument(..., help="The image to classify (PNG, JPEG, …); centre-cropped and resized to the model's size."),
    captions_file: Optional[Path] = typer.Option(None, "--captions", help="A UTF-8 text file, one caption per line (blank lines skipped)."),
    caption: Optional[list[str]] = typer.Option(None, "--caption", "-c", help="A caption (repeatable); added before the file's."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", callback=check_batch_size, help=f"Captions per forward pass (default {DEFAULT_PAIR_BATCH})."),
    model: Model = None,
    width: Width = None,
    height: Height = None,
    dtype: Dtype = FIRST_RUN_DTYPE,
    quantize: Quantize = None,
    offline: Offline = False,
) -> None:
    """Rank captions for an image by likelihood: the most probable first, in bits per dimension."""
    check_image_path(image)
    captions = read_captions(caption, captions_file)
    check_pairs(len(captions), "captions")
    pipeline = load_pipeline(model, dtype, quantize, offline)
    note(pipeline, captions)
    ranked = rank_captions(pipeline, image, captions, width, height, batch_size or DEFAULT_PAIR_BATCH)
    if as_json:
        rows = [{"rank": i + 1, "caption": r.caption, "bits_per_dim": round(r.bits_per_dim, 6), "behind_best": round(r.behind_best, 6)}
                for i, r in enumerate(ranked)]
        typer.echo(json.dumps({"image": str(image), "model": pipeline.name, "ranking": rows}, ensure_ascii=False, indent=2))
        return
    width_column = max(len(r.caption) for r in ranked)
    for i, r in enumerate(ranked):
        behind = "best" if i == 0 else f"+{r.behind_best:.4f}"
        typer.echo(f"{i + 1:>3}. {r.caption:<{width_column}}  {r.bits_per_dim:.4f} bits/dim  {behind}")
