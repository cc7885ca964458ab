"""`manifest.json` of an export folder: the one contract the Swift package and the checks read.

It names every package, function, input and output, and the shapes they were exported for,
so no reader guesses a file name or a shape. Written last, so a folder without it is not a
finished export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_starflow.config import read_json_object
from mlx_starflow.errors import ConfigError, ModelNotFound

MANIFEST_FILE = "manifest.json"
FORMAT = "mlx-starflow-coreml"
FORMAT_VERSION = 2
"""2: the score step moved from a `ScoreStep` package into the flow blocks (`forward`/`vjp`)."""
LICENSE = (
    "Derived from Apple's STARFlow weights (research-use licence of apple/starflow on Hugging Face, "
    "plus the licences of flan-t5-xl and sd-vae-ft-ema); not for redistribution."
)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}, indent=2) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished export, with every package it names present."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ModelNotFound(f"no Core ML export at {folder}; make one with `starflow export-coreml MODEL --out {folder}`")
    if not path.is_file():
        raise ConfigError(f"{folder} has no {MANIFEST_FILE}: the export did not finish; export again")
    manifest = read_json_object(path, "export again")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path} is not a format-{FORMAT_VERSION} {FORMAT} manifest; export again with this version")
    missing = [name for name in package_names(manifest) if not (folder / name).is_dir()]
    if missing:
        raise ConfigError(f"{folder} is incomplete: {', '.join(missing)} missing; export again")
    return manifest


def package_names(manifest: dict[str, Any]) -> list[str]:
    """Every package a manifest names, in pipeline order."""
    names = []
    if manifest.get("text_encoder"):
        names += manifest["text_encoder"]["packages"]
    for block in reversed(manifest["flow"]["blocks"]):
        names += block["packages"]
    if manifest.get("vae"):
        names.append(manifest["vae"]["package"])
        if manifest["vae"].get("encoder_package"):
            names.append(manifest["vae"]["encoder_package"])
    return names
