"""Pixels in and out of the VAE: decoder output ↔ uint8 ↔ PIL, with the official rounding.

The official writer clamps to [-1, 1], maps to [0, 1] and stores `floor(v·255 + 0.5)` (round
half up), all in float32; images going in are `(u8/255 − 0.5)/0.5` in float32 (ToTensor then
Normalize). Both are reproduced operation by operation so the uint8 values match exactly.
"""

from __future__ import annotations

import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import InputError, OutputExists


@dataclass(frozen=True)
class GeneratedImage:
    """One result: the picture and the settings that reproduce it (also in `image.info`)."""

    image: Image.Image
    prompt: str
    seed: int
    metadata: dict[str, str]


def decoded_to_uint8(images: mx.array | np.ndarray) -> np.ndarray:
    """Decoder output (B, C, H, W) float → uint8 of the same layout, as the official PNG writer."""
    x = np.asarray(images, dtype=np.float32)
    unit = (np.clip(x, np.float32(-1), np.float32(1)) + np.float32(1)) * np.float32(0.5)
    scaled = unit * np.float32(255) + np.float32(0.5)
    return np.clip(scaled, np.float32(0), np.float32(255)).astype(np.uint8)


def uint8_to_pil(images: np.ndarray) -> list[Image.Image]:
    """uint8 (B, 3, H, W) → one RGB PIL image per batch row."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, 3, H, W), got {images.dtype} {list(images.shape)}")
    return [Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))) for image in images]


def decoded_to_pil(images: mx.array | np.ndarray) -> list[Image.Image]:
    """Decoder output (B, 3, H, W) → RGB PIL images, rounded like the official writer."""
    return uint8_to_pil(decoded_to_uint8(images))


def pil_to_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL image → uint8 (3, H, W) RGB (grey, palette and alpha images are converted)."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()


def uint8_to_model_input(images: np.ndarray) -> mx.array:
    """uint8 (B, 3, H, W) or (3, H, W) → float32 NCHW in [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {images.dtype}")
    batch = images[None] if images.ndim == 3 else images
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W) or (3, H, W), got {list(images.shape)}")
    unit = batch.astype(np.float32) / np.float32(255)
    return mx.array((unit - np.float32(0.5)) / np.float32(0.5))


MAX_IMAGE_PIXELS = 64 * 2**20
"""Largest image read (width × height, 64 Mpx, e.g. 8192²: 192 MB as RGB); larger files are refused
from their header, before decoding, so a small file that claims a huge image (a decompression
bomb) cannot exhaust memory."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 (3, H, W) RGB; a missing, unreadable or oversized file, or a
    mode with no faithful 8-bit reading, is an `InputError` that names the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no image file at {path}; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InputError(f"{path} is {width}×{height} pixels, more than the {MAX_IMAGE_PIXELS // 2**20} Mpx this app reads; "
                                     "resize it first")
                image.load()
                return _to_uint8_rgb(image, path)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{path} claims more than {MAX_IMAGE_PIXELS // 2**20} Mpx (a decompression bomb?); resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"cannot read {path} as an image ({e}); pass a PNG or JPEG file") from None


def _to_uint8_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """8-bit RGB of any mode, scaling (never clipping) 16-bit and float samples to 0 … 255."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.mode == "I" and not (values.size and values.min() >= 0 and values.max() <= 65535):
            raise InputError(f"{path} is a 32-bit integer image (mode I) with values outside 0 … 65535; save it as 8- or 16-bit PNG")
        return _grey_to_rgb(np.round(values / 257.0))
    if image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise InputError(f"{path} is a float image (mode F) with values outside [0, 1]; save it as 8- or 16-bit PNG")
        return _grey_to_rgb(np.round(values * 255.0))
    return pil_to_uint8(image)


def _grey_to_rgb(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[None], 3, axis=0)


def make_grid(images: list[np.ndarray], columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 (3, H, W) images into one (3, H', W') grid with zero padding between tiles,
    like the official sample writer (a single image is returned as it is)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if len(images) == 1:
        return images[0]
    columns = columns or min(len(images), 8)
    rows = -(-len(images) // columns)
    _, height, width = images[0].shape
    grid = np.zeros((3, rows * (height + padding) + padding, columns * (width + padding) + padding), np.uint8)
    for index, image in enumerate(images):
        top = (index // columns) * (height + padding) + padding
        left = (index % columns) * (width + padding) + padding
        grid[:, top : top + height, left : left + width] = image
    return grid


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write a PNG with `metadata` as text chunks, atomically: a failure leaves no file behind.

    An existing file is refused unless `overwrite`, so a run never replaces an image silently.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} already exists; choose another output or pass --force")
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_itxt(key, str(value))
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as f:  # a fresh file, so its permissions follow the umask
            image.save(f, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def fit_image(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (3, H, W) → (3, height, width) as the official data pipeline prepares images: the
    largest centred window of the target's aspect ratio, resized bilinearly (with antialiasing)."""
    image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    if image.width * height > image.height * width:
        crop_width, crop_height = round(image.height * width / height), image.height
    else:
        crop_width, crop_height = image.width, round(image.width * height / width)
    left, top = (image.width - crop_width) // 2, (image.height - crop_height) // 2
    image = image.crop((left, top, left + crop_width, top + crop_height))
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return pil_to_uint8(image)
