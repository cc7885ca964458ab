"""`starflow convert`: an official checkpoint + YAML config (+ text encoder, VAE) → a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlx_starflow.convert.model import convert_model
from mlx_starflow.convert.official_config import read_official_config

from ..options import Dtype, Force, Quantize
from ..progress import tensor_progress


def convert(
    src: Path = typer.Argument(..., help="Official checkpoint: .pth (torch zip) or .safetensors."),
    config: Path = typer.Option(..., "--config", "-c", help="Official YAML config the checkpoint was trained with."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to create."),
    dtype: Dtype = "float32",
    quantize: Quantize = None,
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class vocabulary of a label model (default: the YAML's text: file beside the YAML)."),
    text_encoder: Optional[Path] = typer.Option(None, "--text-encoder", help="Hugging Face T5 folder (google/flan-t5-xl: config.json, tokenizer.json, weights) for a text model."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="diffusers VAE folder (stabilityai/sd-vae-ft-ema: config.json, diffusion_pytorch_model.safetensors)."),
    decoder: Optional[Path] = typer.Option(None, "--decoder", help="STARFlow's fine-tuned noisy-latent decoder (pytorch_model.bin or .pth); used instead of the score step."),
    force: Force = False,
) -> None:
    """Convert an official STARFlow checkpoint without PyTorch (memory stays near one tensor)."""
    with tensor_progress("converting") as progress:
        folder = convert_model(src, config, out, dtype=dtype, quantize=quantize, force=force, labels=labels,
                               text_encoder=text_encoder, vae=vae, decoder=decoder, progress=progress)
    typer.echo(f"wrote {folder}")
    official = read_official_config(config)
    needs_text = bool(official.text_encoder) and not official.is_label_model and text_encoder is None
    if needs_text or (official.vae and vae is None):
        typer.echo("this folder holds the flow only; add --text-encoder DIR and --vae DIR to make it a model `starflow generate` runs")
