"""`starflow export-coreml`: a converted model folder → Core ML packages for the Swift app (no PyTorch)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..limits import MAX_BATCH, MAX_IMAGE_SIDE
from ..options import check_batch_size, check_side
from ..progress import tensor_progress


def export_coreml(
    model: Path = typer.Argument(..., help="Converted model folder (flow/ with text_encoder/ or labels/, and vae/ for latent models)."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder to create (packages + manifest.json)."),
    dtype: str = typer.Option("float16", "--dtype", help="Weight and compute precision: float16 or float32."),
    compress: Optional[str] = typer.Option(
        None, "--compress",
        help="Core ML weight compression of the big linears: int8, int4, or palette8/palette6/palette4 "
             "(k-means lookup tables per group of output channels; what the Neural Engine prefers)."),
    palette_group_size: int = typer.Option(16, "--palette-group-size",
                                           help="Output channels sharing one lookup table with --compress paletteN (must divide the model width)."),
    attention: str = typer.Option("original", "--attention", help="Attention layout: original (GPU) or split-einsum (Neural Engine)."),
    target: str = typer.Option("macOS15", "--target", help="Deployment target: macOS15 or iOS18 (iOS splits packages under 1 GB)."),
    width: Optional[int] = typer.Option(None, "--width", callback=check_side,
                                        help=f"Image width in pixels, at most {MAX_IMAGE_SIDE} (a memory limit, see the README; default: the training size)."),
    height: Optional[int] = typer.Option(None, "--height", callback=check_side,
                                         help=f"Image height in pixels, at most {MAX_IMAGE_SIDE} (default: the training size)."),
    jacobi_block_size: list[int] = typer.Option([16], "--jacobi-block-size", help="Jacobi chunk size to export a step function for (repeatable)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", callback=check_batch_size, help=f"Images per flow-block call, at most {MAX_BATCH}."),
    score_step: bool = typer.Option(True, "--score-step/--no-score-step",
                                    help="Put the score-step denoise (forward and vjp functions) into each flow block's package."),
    compile: bool = typer.Option(False, "--compile", help="Also write each package compiled (.mlmodelc) for an app to bundle; macOS only."),
    state_fallback: bool = typer.Option(False, "--state-fallback",
                                        help="Also export the sampling functions with the KV cache as inputs/outputs, for devices that refuse a shared state."),
    step_tables: bool = typer.Option(False, "--step-tables",
                                     help="Steps take their RoPE rows and causal mask as inputs (no runtime gather; for the Neural Engine)."),
    vae_encoder: bool = typer.Option(False, "--vae-encoder", help="Also export the VAE encoder (image → latent)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Export a converted model to Core ML without PyTorch (needs coremltools: the coreml extra of mlx-starflow)."""
    from mlx_starflow.convert.coreml.export import export_coreml as export

    with tensor_progress("exporting Core ML packages") as progress:
        folder = export(model, out, dtype=dtype, compress=compress, attention=attention, target=target, width=width,
                        height=height, jacobi_block_sizes=tuple(jacobi_block_size), batch_size=batch_size, score_step=score_step,
                        vae_encoder=vae_encoder, force=force, compile=compile,
                        state_fallback=state_fallback, step_tables=step_tables,
                        palette_group_size=palette_group_size, progress=progress)
    typer.echo(f"wrote {folder}")
