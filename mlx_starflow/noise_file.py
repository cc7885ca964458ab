"""Noise files: inverted (or any) flow noise as safetensors, with what it was made from.

One float32 tensor `noise` (B, C, H/f, W/f) and string metadata: the format tag, the model,
the image size, the VAE choice and the prompt(s), so `generate --noise` can refuse noise made
for another model or size instead of sampling garbage. Written atomically: temp name, rename.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from .config import parse_json
from .errors import InputError, OutputExists

if TYPE_CHECKING:
    from .pipeline import StarFlowPipeline

NOISE_FORMAT = "starflow.noise"
NOISE_KEY = "noise"


@dataclass(frozen=True)
class NoiseFile:
    noise: mx.array
    metadata: dict[str, str]

    @property
    def prompts(self) -> list[str]:
        """The prompts recorded with the noise; damaged metadata (not a list of strings, nested too
        deep) is an `InputError`, since the file came from elsewhere."""
        try:
            prompts = parse_json(self.metadata.get("prompts", "[]").encode())
        except ValueError:
            prompts = None
        if not (isinstance(prompts, list) and all(isinstance(prompt, str) for prompt in prompts)):
            raise InputError("the noise file's recorded prompts are damaged (not a JSON list of strings); make it again with `starflow invert`")
        return prompts


def noise_metadata(pipe: StarFlowPipeline, prompts: Sequence[str], width: int, height: int, **extra: str) -> dict[str, str]:
    """What a noise file records: model, size, VAE choice (posterior mean, or none for pixels), prompts."""
    vae = "none (pixel space)" if pipe.vae is None else f"vae/ posterior mean, factor {pipe.config.vae_factor}"
    return {"format": NOISE_FORMAT, "model": pipe.name, "size": f"{width}x{height}", "vae": vae,
            "prompts": json.dumps(list(prompts), ensure_ascii=False), **extra}


def save_noise(path: str | Path, noise: mx.array, metadata: dict[str, str], overwrite: bool = False) -> Path:
    """Write a noise file atomically; an existing file is refused unless `overwrite`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"{path} must end in .safetensors (the noise is stored as safetensors)")
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} already exists; choose another --out or pass --force")
    # Our temporary naming (`.NAME.tmp-PID-…`), so an error while writing names NAME, not the temporary.
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}.safetensors")
    try:
        mx.save_safetensors(str(temporary), {NOISE_KEY: noise.astype(mx.float32)}, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def load_noise(path: str | Path) -> NoiseFile:
    """Read a noise file; anything but one float32 (B, C, H, W) `noise` tensor is an `InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no noise file at {path}; make one with `starflow invert IMAGE --prompt P --out {path.name}`")
    try:
        tensors, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise InputError(f"cannot read {path} as safetensors ({e}); pass a file written by `starflow invert`") from None
    noise = tensors.get(NOISE_KEY)
    if noise is None or set(tensors) != {NOISE_KEY}:
        raise InputError(f"{path} holds {sorted(tensors)}, not one tensor named {NOISE_KEY!r}; pass a file written by `starflow invert`")
    if noise.dtype != mx.float32:
        raise InputError(f"{path}: the noise is {noise.dtype}, not float32; write it as float32")
    if noise.ndim != 4:
        raise InputError(f"{path}: the noise has shape {list(noise.shape)}; it must be (images, channels, height, width)")
    if not mx.all(mx.isfinite(noise)).item():
        raise InputError(f"{path}: the noise holds NaN or infinite values, which sample blank images; invert the image again")
    return NoiseFile(noise, dict(metadata))


def check_noise(noise_file: NoiseFile, pipe: StarFlowPipeline, width: int | None, height: int | None, source: str) -> tuple[int, int]:
    """The (width, height) the noise samples at, checked against the model and any size asked for."""
    noise, metadata = noise_file.noise, noise_file.metadata
    model = metadata.get("model")
    if model is not None and model != pipe.name:
        raise InputError(f"{source} was made with model {model!r}, not {pipe.name!r}; pass --model with that model or invert again")
    _, channels, h, w = noise.shape
    factor = pipe.config.vae_factor
    if channels != pipe.config.in_channels:
        raise InputError(f"{source} has {channels} channels; {pipe.name} samples {pipe.config.in_channels}")
    size = (w * factor, h * factor)
    if (width is not None and width != size[0]) or (height is not None and height != size[1]):
        raise InputError(f"{source} is noise for {size[0]}x{size[1]} images; drop --width/--height or pass {size[0]}x{size[1]}")
    pipe.check_size(*size)
    return size
