"""`starflow score`: the exact likelihood of images under prompts, in bits per dimension.

The flow is invertible, so each image's VAE latent (its posterior mean) runs forward through
every block to noise, and the change of variables gives its exact negative log-likelihood.
A pixel model's figure is per continuous pixel value in [-1, 1]; it is also shown in the usual
8-bit convention (values 0 … 255), log2(127.5) bits higher. Every image is scored under every
prompt, several (image, prompt) pairs per forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mlx_starflow.image import read_image
from mlx_starflow.ranking import DEFAULT_PAIR_BATCH, score as score_pairs
from mlx_starflow.sampling import LOG2_PIXEL_SCALE

from ..inputs import check_text
from ..limits import check_pairs
from ..options import FIRST_RUN_DTYPE, Dtype, Height, Model, Offline, Quantize, Width, check_batch_size
from .noise_tools import load_pipeline, note
from .rank import read_captions

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def split_arguments(arguments: list[str], prompts: list[str] | None, prompts_file: Path | None) -> tuple[list[Path], list[str]]:
    """Images and prompts. Without --prompt/--prompts-file, a last argument that is neither a
    file nor an image name is the prompt (`score IMAGE PROMPT`); no prompt at all means ""."""
    if prompts or prompts_file is not None:
        return [Path(a) for a in arguments], read_captions(prompts, prompts_file, "prompt", "--prompt")
    last = Path(arguments[-1])
    if len(arguments) > 1 and not last.exists() and last.suffix.lower() not in IMAGE_SUFFIXES:
        return [Path(a) for a in arguments[:-1]], [check_text(arguments[-1], "the prompt")]
    return [Path(a) for a in arguments], [""]


def score(
    arguments: list[str] = typer.Argument(..., metavar="IMAGE [PROMPT]", help="Image files (PNG, JPEG, …); with no --prompt, a last argument that is not a file is the prompt."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable; a class name for a label model); \"\" = unconditional."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", "-f", help="A UTF-8 text file, one prompt per line."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: one entry per (image, prompt)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", callback=check_batch_size, help=f"(image, prompt) pairs per forward pass (default {DEFAULT_PAIR_BATCH})."),
    model: Model = None,
    width: Width = None,
    height: Height = None,
    dtype: Dtype = FIRST_RUN_DTYPE,
    quantize: Quantize = None,
    offline: Offline = False,
) -> None:
    """Print each image's bits per dimension under each prompt (lower = more likely), resized to the model's size."""
    images, prompts = split_arguments(arguments, prompt, prompts_file)
    check_pairs(len(images) * len(prompts), "(image, prompt) pairs")
    pixels = [read_image(image) for image in images]
    pipeline = load_pipeline(model, dtype, quantize, offline)
    size = pipeline.check_size(width, height)
    note(pipeline, prompts)
    bits = score_pairs(pipeline, pixels, prompts, *size, batch_size or DEFAULT_PAIR_BATCH).tolist()
    pixel_model = pipeline.vae is None
    if as_json:
        rows = []
        for image, row in zip(images, bits):
            for text, value in zip(prompts, row):
                entry = {"image": str(image), "prompt": text, "bits_per_dim": round(value, 6)}
                if pixel_model:
                    entry["bits_per_dim_8bit"] = round(value + LOG2_PIXEL_SCALE, 6)
                rows.append(entry)
        unit = "continuous [-1, 1] pixel value" if pixel_model else "latent dimension"
        typer.echo(json.dumps({"model": pipeline.name, "size": f"{size[0]}x{size[1]}", "per": unit, "scores": rows}, ensure_ascii=False, indent=2))
        return
    for image, row in zip(images, bits):
        for text, value in zip(prompts, row):
            typer.echo(f"{bits_text(value, pixel_model)}  {image}  {text!r}  ({size[0]}x{size[1]}, {pipeline.name})")


def bits_text(bits: float, pixel_model: bool) -> str:
    """A pixel model's bits in [-1, 1] and in the 8-bit convention; a latent model's per latent dimension."""
    if pixel_model:
        return f"{bits:.4f} bits/dim (8-bit: {bits + LOG2_PIXEL_SCALE:.4f})"
    return f"{bits:.4f} bits/dim (per latent dimension)"
