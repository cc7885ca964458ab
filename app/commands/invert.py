"""`starflow invert`: an image → the flow noise that samples back to it, as a safetensors file.

`starflow generate --noise FILE` samples from the file; `edit`, `vary` and `interpolate` invert
on the fly. The round trip printed is the flow's own error (sampling the noise back unguided);
the VAE round trip and guidance, which are not exact, are not part of it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mlx_starflow.editing import invert as invert_images, round_trip_error
from mlx_starflow.errors import InputError, OutputExists
from mlx_starflow.noise_file import noise_metadata, save_noise

from ..options import FIRST_RUN_DTYPE, Dtype, Force, Height, JacobiFlag, Model, Offline, Quantize, Width, make_sampler, utf8_text
from ..outputs import check_writable
from .noise_tools import check_image_path, load_pipeline, note


def invert(
    image: Path = typer.Argument(..., help="The image file (PNG, JPEG, …); centre-cropped and resized to the model's size."),
    prompt: str = typer.Option("", "--prompt", "-p", callback=utf8_text, help="The prompt to invert under (a class name for a label model); \"\" = unconditional."),
    out: Path = typer.Option(..., "--out", "-o", help="The noise file to write (.safetensors); never replaced without --force."),
    model: Model = None,
    width: Width = None,
    height: Height = None,
    check: bool = typer.Option(True, "--check/--no-check", help="Sample the noise back (guidance 0) and print the round-trip error; costs one sampling run."),
    jacobi: JacobiFlag = None,
    force: Force = False,
    dtype: Dtype = FIRST_RUN_DTYPE,
    quantize: Quantize = None,
    offline: Offline = False,
) -> None:
    """Invert an image: the exact noise that gives it back when sampled under the prompt (guidance 0)."""
    check_image_path(image)
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out} must end in .safetensors")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; pass a .safetensors file name")
    if out.exists() and not force:
        raise OutputExists(f"{out} already exists; pass --force to replace it or choose another --out")
    check_writable(out.parent, "--out")
    pipeline = load_pipeline(model, dtype, quantize, offline)
    note(pipeline, [prompt])
    inversion = invert_images(pipeline, [image], [prompt], width, height)
    chosen = make_sampler(jacobi)
    extra = {"source_image": image.name, "bits_per_dim": f"{inversion.bits_per_dim[0]:.4f}"}
    typer.echo(f"inverted {image} under {prompt!r} ({inversion.width}x{inversion.height}, {pipeline.name}): "
               f"{inversion.bits_per_dim[0]:.4f} bits/dim")
    if check:
        error = round_trip_error(pipeline, inversion, chosen)
        extra["round_trip_max_abs"] = f"{error:.3g}"
        typer.echo(f"round trip (sampled back, guidance 0, {chosen.describe()}): max |Δ latent| = {error:.3g}")
    metadata = noise_metadata(pipeline, [prompt], inversion.width, inversion.height, **extra)
    typer.echo(f"wrote {save_noise(out, inversion.noise, metadata, overwrite=force)}")
