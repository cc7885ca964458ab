"""The one entry point that opens any checkpoint: torch `.pth`/`.bin`, safetensors, a sharded index, a folder.

Every reader yields `LazyTensor`s (see `tensors.py`), so nothing is read until a tensor is used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_starflow.errors import ModelNotFound

from . import pth_reader, safetensors_io
from .tensors import LazyTensor, TensorEntry, check_regular_file

__all__ = ["FOLDER_CHECKPOINTS", "LazyTensor", "TensorEntry", "find_checkpoint_file", "open_checkpoint"]

# File names a model folder may hold its weights under, in the order they are preferred.
FOLDER_CHECKPOINTS: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin",
)


def find_checkpoint_file(folder: Path) -> Path:
    """The weights file of a model folder (the first of `FOLDER_CHECKPOINTS` present)."""
    for name in FOLDER_CHECKPOINTS:
        if (folder / name).is_file():
            return folder / name
    raise ModelNotFound(f"no checkpoint in {folder}: expected one of {', '.join(FOLDER_CHECKPOINTS)}; pass the weights file itself")


def open_checkpoint(path: str | Path, wanted: Callable[[str], bool] = lambda name: True) -> dict[str, LazyTensor]:
    """Open a torch `.pth`/`.bin`, a `.safetensors`, a sharded index, or a folder holding one.

    The format is told by the file's content, not its name (an index by its `.index.json` name).
    Nothing is unpickled but tensor records, and no tensor data is read yet. Of a sharded
    checkpoint only the shards holding `wanted` tensors are opened.
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"no checkpoint at {path}; check the path")
    if path.is_dir():
        path = find_checkpoint_file(path)
    check_regular_file(path)
    if path.name.endswith(".index.json"):
        return safetensors_io.open_sharded(path, open_shard=open_checkpoint, wanted=wanted)
    if safetensors_io.looks_like_safetensors(path):
        return safetensors_io.open_safetensors(path)
    return pth_reader.open_pth(path)
