"""`starflow vary`: variations of an image, from its inverted noise mixed with fresh noise.

Noise i is sqrt(1 − S²)·z + S·ε_i with z the image's noise and ε_i drawn from seed SEED+i: still
standard Gaussian, so S = 0 gives the image back (guidance 0) and S = 1 an unrelated sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlx_starflow.editing import vary as vary_image
from mlx_starflow.noise_ops import check_strength
from mlx_starflow.pipeline import check_seed

from ..options import (FIRST_RUN_DTYPE, Denoise, Dtype, Force, Guidance, Height, JacobiFlag, Model, Offline, Quantize, Seed, Width,
                       check_batch_size, finite, image_count, make_sampler, utf8_text)
from .noise_tools import check_image_path, load_pipeline, note, png_targets, stderr, write_results


def vary(
    image: Path = typer.Argument(..., help="The image to vary (PNG, JPEG, …); centre-cropped and resized to the model's size."),
    num_images: int = typer.Option(4, "--num-images", "-n", callback=image_count, help="How many variations, from seeds SEED, SEED+1, …"),
    strength: float = typer.Option(0.3, "--strength", "-S", callback=finite, help="0 = the image itself, 1 = unrelated samples; the share of fresh noise."),
    prompt: str = typer.Option("", "--prompt", "-p", callback=utf8_text, help="The prompt to invert and sample under (a class name for a label model); \"\" = unconditional."),
    guidance: Guidance = 0.0,
    seed: Seed = None,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="A .png name; -1, -2, … are added for several (default: IMAGE's name with -vary)."),
    model: Model = None,
    width: Width = None,
    height: Height = None,
    jacobi: JacobiFlag = None,
    denoise: Denoise = None,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", callback=check_batch_size, help="Variations sampled together (default: what fits in memory)."),
    force: Force = False,
    dtype: Dtype = FIRST_RUN_DTYPE,
    quantize: Quantize = None,
    offline: Offline = False,
) -> None:
    """Make variations of an image: its exact noise, partly redrawn."""
    check_image_path(image)
    check_strength(strength)
    targets = png_targets(output or Path(f"{image.stem}-vary.png"), num_images, force)
    first_seed = check_seed(seed, num_images)
    pipeline = load_pipeline(model, dtype, quantize, offline)
    note(pipeline, [prompt])
    stderr.print(f"{num_images} variation(s) of {image} at strength {strength:g}, seeds {first_seed} …", soft_wrap=True)
    results = vary_image(pipeline, image, prompt, num_images, strength, first_seed, width, height,
                         guidance=guidance, sampler=make_sampler(jacobi), denoise=denoise, batch_size=batch_size)
    write_results(results, targets, force, {"source_image": image.name})
