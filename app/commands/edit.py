"""`starflow edit`: invert an image under one prompt and sample its noise under another.

The inversion is exact; what changes the picture is the new prompt (and guidance) acting on
the same noise, and `--keep`, which keeps only the first tokens of the deep block's noise (the
top rows, in raster order) and redraws the rest from the seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlx_starflow.editing import edit as edit_image
from mlx_starflow.errors import InputError
from mlx_starflow.pipeline import check_seed

from ..options import FIRST_RUN_DTYPE, Denoise, Dtype, Force, Guidance, Height, JacobiFlag, Model, Offline, Quantize, Seed, Width, make_sampler, utf8_text
from .noise_tools import check_image_path, load_pipeline, note, png_targets, stderr, write_results


def parse_keep(keep: str | None) -> int | float | None:
    """A whole number of tokens, or a fraction with a decimal point (0.5 = the first half)."""
    if keep is None:
        return None
    try:
        return float(keep) if any(mark in keep for mark in ".eE") else int(keep)
    except ValueError:
        raise InputError(f"--keep {keep!r} is neither a token count (e.g. 256) nor a fraction (e.g. 0.5)") from None


def edit(
    image: Path = typer.Argument(..., help="The image to edit (PNG, JPEG, …); centre-cropped and resized to the model's size."),
    prompt: str = typer.Option(..., "--prompt", "-p", callback=utf8_text, help="The new prompt (a class name for a label model)."),
    source_prompt: str = typer.Option("", "--source-prompt", callback=utf8_text, help="What the image shows now; the inversion runs under it (default \"\": unconditional)."),
    keep: Optional[str] = typer.Option(None, "--keep", "-k", help="Keep the first K tokens of the deep block's noise (a count, or a fraction such as 0.5) and redraw the rest from --seed (default: keep all)."),
    guidance: Guidance = 0.0,
    seed: Seed = None,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The .png to write (default: IMAGE's name with -edit); never replaced without --force."),
    model: Model = None,
    width: Width = None,
    height: Height = None,
    jacobi: JacobiFlag = None,
    denoise: Denoise = None,
    force: Force = False,
    dtype: Dtype = FIRST_RUN_DTYPE,
    quantize: Quantize = None,
    offline: Offline = False,
) -> None:
    """Edit an image with a new prompt: invert it under --source-prompt, sample under --prompt."""
    check_image_path(image)
    kept = parse_keep(keep)
    targets = png_targets(output or Path(f"{image.stem}-edit.png"), 1, force)
    first_seed = check_seed(seed, 1)
    pipeline = load_pipeline(model, dtype, quantize, offline)
    note(pipeline, [prompt, source_prompt])
    result = edit_image(pipeline, image, prompt, source_prompt, kept, first_seed, width, height,
                        guidance=guidance, sampler=make_sampler(jacobi), denoise=denoise, batch_size=1)
    if kept is not None:
        stderr.print(f"redrawn tokens from seed {first_seed}", soft_wrap=True)
    write_results([result], targets, force, {"source_image": image.name})
