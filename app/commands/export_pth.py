"""`starflow export-pth`: a converted or trained flow → the official `.pth` + YAML format."""

from __future__ import annotations

from pathlib import Path

import typer

from mlx_starflow.convert.official_export import export_official


def export_pth(
    model: Path = typer.Argument(..., help="Model folder (or its flow/ folder), converted or trained; not quantised."),
    out: Path = typer.Option(..., "--out", "-o", help="The .pth file to write; the YAML config (and a label model's .vocab) go beside it."),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
) -> None:
    """Write a flow in the official format (torch state dict + YAML), without PyTorch, for the official code."""
    path = export_official(model, out, force=force)
    typer.echo(f"wrote {path} and {path.with_suffix('.yaml')}")
