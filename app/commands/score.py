"""`starflow score`: the exact likelihood of an image under a prompt, in bits per dimension.

The flow is invertible, so the image's VAE latent (its posterior mean) runs forward through
every block to noise, and the change of variables gives its exact negative log-likelihood.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import typer

from convert.hub import resolve_model
from mlx_starflow.image import fit_image, read_image, uint8_to_model_input
from mlx_starflow.pipeline import load

from .generate import DTYPES, FIRST_RUN_DTYPE, stderr


def score(
    image: Path = typer.Argument(..., help="The image file (PNG, JPEG, …)."),
    prompt: str = typer.Argument("", help="The prompt (a class name for a label model); \"\" for the unconditional likelihood."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A converted model folder, an official checkpoint file, or a Hugging Face repo id (default: apple/starflow)."),
    width: Optional[int] = typer.Option(None, "--width", "-W", help="Score at this width (default: the training size)."),
    height: Optional[int] = typer.Option(None, "--height", "-H", help="Score at this height (default: the training size)."),
    dtype: str = typer.Option(FIRST_RUN_DTYPE, "--dtype", help="Weight dtype when converting on first use."),
    quantize: Optional[int] = typer.Option(None, "--quantize", "-q", help="Quantise the flow to 4 or 8 bits when converting on first use."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network."),
) -> None:
    """Print the image's bits per dimension under the prompt (lower = more likely)."""
    pixels = read_image(image)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be float32, float16 or bfloat16, not {dtype!r}")
    if quantize not in (None, 4, 8):
        raise ValueError(f"--quantize must be 4 or 8, not {quantize}")
    folder = resolve_model(model, dtype, quantize, offline, notify=lambda message: stderr.print(message, soft_wrap=True))
    pipeline = load(folder)
    size = pipeline.check_size(width, height)
    pipeline.check_prompts([prompt])
    fitted = fit_image(pixels, *size)
    bits = pipeline.score(uint8_to_model_input(fitted), prompt)
    mx.eval(bits)
    typer.echo(f"{bits.item():.4f} bits/dim  {image}  {prompt!r}  ({size[0]}x{size[1]}, {pipeline.name})")
