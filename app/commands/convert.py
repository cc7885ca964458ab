"""`starflow convert`: an official checkpoint + YAML config (+ text encoder, VAE) → a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlx_starflow.config import DTYPES
from mlx_starflow.convert.model import TEXT_ENCODER_DTYPE, convert_model
from mlx_starflow.convert.official_config import read_official_config
from mlx_starflow.errors import InputError

from ..options import Dtype, Force, Quantize
from ..progress import tensor_progress


def _check_text_encoder_dtype(value: str) -> str:
    if value not in DTYPES:
        raise InputError(f"--text-encoder-dtype must be one of {', '.join(DTYPES)}, not {value!r}")
    return value


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
    text_encoder_dtype: str = typer.Option(
        TEXT_ENCODER_DTYPE, "--text-encoder-dtype", callback=_check_text_encoder_dtype,
        help=f"Dtype of the T5 text encoder ({', '.join(DTYPES)}); float32, as the official sampler runs it, whatever --dtype is."),
    force: Force = False,
) -> None:
    """Convert an official STARFlow checkpoint without PyTorch (memory stays near one tensor)."""
    with tensor_progress("converting") as progress:
        folder = convert_model(src, config, out, dtype=dtype, quantize=quantize, force=force, labels=labels,
                               text_encoder=text_encoder, vae=vae, decoder=decoder, text_encoder_dtype=text_encoder_dtype,
                               progress=progress)
    typer.echo(f"wrote {folder}")
    official = read_official_config(config)
    needs_text = bool(official.text_encoder) and not official.is_label_model and text_encoder is None
    if needs_text or (official.vae and vae is None):
        typer.echo("this folder holds the flow only; add --text-encoder DIR and --vae DIR to make it a model `starflow generate` runs")
