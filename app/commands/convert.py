"""`starflow convert`: an official checkpoint + YAML config → a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from convert.model import convert_model

from ..progress import tensor_progress


def convert(
    src: Path = typer.Argument(..., help="Official checkpoint: .pth (torch zip) or .safetensors."),
    config: Path = typer.Option(..., "--config", "-c", help="Official YAML config the checkpoint was trained with."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to create."),
    dtype: str = typer.Option("float32", "--dtype", help="Weight dtype: float32, float16 or bfloat16."),
    quantize: Optional[int] = typer.Option(None, "--quantize", "-q", help="Quantise the attention/MLP linears to 4 or 8 bits (MLX affine, group 64)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class vocabulary of a label model (default: the YAML's text: file beside the YAML)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Convert an official STARFlow checkpoint without PyTorch (memory stays near one tensor)."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"--dtype must be float32, float16 or bfloat16, not {dtype!r}")
    if quantize not in (None, 4, 8):
        raise ValueError(f"--quantize must be 4 or 8, not {quantize}")
    with tensor_progress("converting") as progress:
        folder = convert_model(src, config, out, dtype=dtype, quantize=quantize, force=force, labels=labels, progress=progress)
    typer.echo(f"wrote {folder}")
