"""`starflow interpolate`: images along the spherical path between two noises.

The ends are two seeds, or two images inverted under the prompt; every frame is sampled under
the same prompt, and the frames are written side by side as one strip PNG (and one by one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer
from PIL import Image

from mlx_starflow.editing import interpolate as interpolate_noise
from mlx_starflow.errors import InputError
from mlx_starflow.image import make_grid, pil_to_uint8

from ..options import (FIRST_RUN_DTYPE, Denoise, Dtype, Force, Guidance, Height, JacobiFlag, Model, Offline, Quantize, Width,
                       check_batch_size, check_seeds, image_count, make_sampler, utf8_text)
from ..outputs import write_image
from .noise_tools import check_image_path, load_pipeline, note, png_targets


def interpolate(
    seeds: Optional[tuple[int, int]] = typer.Option(None, "--seeds", callback=check_seeds, help="Two seeds: the ends are their noises."),
    images: Optional[tuple[Path, Path]] = typer.Option(None, "--images", help="Two images: the ends are their inverted noises."),
    prompt: str = typer.Option("", "--prompt", "-p", callback=utf8_text, help="The prompt every frame is sampled under (and the images inverted under)."),
    steps: int = typer.Option(8, "--steps", callback=image_count, help="Frames, the two ends included (at least 2)."),
    guidance: Guidance = 0.0,
    output: Path = typer.Option(Path("interpolation.png"), "--output", "-o", help="The strip .png; frames go to <name>-1.png … unless --no-frames."),
    frames: bool = typer.Option(True, "--frames/--no-frames", help="Also write every frame as its own PNG."),
    model: Model = None,
    width: Width = None,
    height: Height = None,
    jacobi: JacobiFlag = None,
    denoise: Denoise = None,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", callback=check_batch_size, help="Frames sampled together (default: what fits in memory)."),
    force: Force = False,
    dtype: Dtype = FIRST_RUN_DTYPE,
    quantize: Quantize = None,
    offline: Offline = False,
) -> None:
    """Interpolate between two seeds or two images: a strip of frames along the path between their noises."""
    if (seeds is None) == (images is None):
        raise InputError("give --seeds A B or --images X Y (exactly one pair)")
    if steps < 2:
        raise InputError(f"--steps must be at least 2 (the two ends), got {steps}")
    for image in images or ():
        check_image_path(image)
    strip = png_targets(output, 1, force)
    frame_targets = png_targets(output, steps, force) if frames else []
    pipeline = load_pipeline(model, dtype, quantize, offline)
    note(pipeline, [prompt])
    results = interpolate_noise(pipeline, prompt, steps, seeds=seeds, images=images, width=width, height=height,
                                guidance=guidance, sampler=make_sampler(jacobi), denoise=denoise, batch_size=batch_size)
    tiles = make_grid([pil_to_uint8(result.image) for result in results], columns=steps)
    between = f"seeds {seeds[0]} and {seeds[1]}" if seeds is not None else f"images {images[0].name} and {images[1].name}"
    metadata = {**results[0].metadata, "interpolate": f"{steps} frames left to right between {between}"}
    typer.echo(f"wrote {write_image(Image.fromarray(np.ascontiguousarray(tiles.transpose(1, 2, 0))), strip[0], metadata, force)}")
    for result, target in zip(results, frame_targets):
        typer.echo(f"wrote {write_image(result.image, target, result.metadata, force)}")
