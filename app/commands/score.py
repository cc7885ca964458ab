"""`starflow score`: the exact likelihood of an image under a prompt, in bits per dimension.

The flow is invertible, so the image's VAE latent (its posterior mean) runs forward through
every block to noise, and the change of variables gives its exact negative log-likelihood.
A pixel model's figure is per continuous pixel value in [-1, 1]; it is also shown in the usual
8-bit convention (values 0 … 255), log2(127.5) bits higher.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import typer
from rich.console import Console

from mlx_starflow.convert.hub import resolve_model
from mlx_starflow.image import fit_image, read_image, uint8_to_model_input
from mlx_starflow.pipeline import load
from mlx_starflow.sampling import LOG2_PIXEL_SCALE

from ..options import FIRST_RUN_DTYPE, Dtype, Height, Model, Offline, Quantize, Width

stderr = Console(stderr=True, highlight=False)


def score(
    image: Path = typer.Argument(..., help="The image file (PNG, JPEG, …)."),
    prompt: str = typer.Argument("", help="The prompt (a class name for a label model); \"\" for the unconditional likelihood."),
    model: Model = None,
    width: Width = None,
    height: Height = None,
    dtype: Dtype = FIRST_RUN_DTYPE,
    quantize: Quantize = None,
    offline: Offline = False,
) -> None:
    """Print the image's bits per dimension under the prompt (lower = more likely), resized to the model's size."""
    pixels = read_image(image)
    folder = resolve_model(model, dtype, quantize, offline, notify=lambda message: stderr.print(message, soft_wrap=True))
    pipeline = load(folder)
    size = pipeline.check_size(width, height)
    for note in pipeline.check_prompts([prompt]):
        stderr.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
    fitted = fit_image(pixels, *size)
    bits = pipeline.score(uint8_to_model_input(fitted), prompt)
    mx.eval(bits)
    typer.echo(f"{bits_text(bits.item(), pipeline.vae is None)}  {image}  {prompt!r}  ({size[0]}x{size[1]}, {pipeline.name})")


def bits_text(bits: float, pixel_model: bool) -> str:
    """A pixel model's bits in [-1, 1] and in the 8-bit convention; a latent model's per latent dimension."""
    if pixel_model:
        return f"{bits:.4f} bits/dim (8-bit: {bits + LOG2_PIXEL_SCALE:.4f})"
    return f"{bits:.4f} bits/dim (per latent dimension)"
