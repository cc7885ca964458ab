"""What `invert`, `edit`, `vary`, `interpolate`, `rank` and `score` share: loading the model,
the sampler the flag picks, output names planned before anything runs, and writing the results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from mlx_starflow.aspect_ratio import ASPECT_RATIOS, aspect_ratio_size
from mlx_starflow.convert.hub import resolve_model
from mlx_starflow.errors import InputError
from mlx_starflow.noise_file import NoiseFile, check_noise, load_noise
from mlx_starflow.pipeline import GeneratedImage, StarFlowPipeline, load

from ..limits import check_image_count
from ..outputs import Target, check_writable, explicit, write_image

stderr = Console(stderr=True, highlight=False)


def load_pipeline(model: str | None, dtype: str, quantize: int | None, offline: bool) -> StarFlowPipeline:
    folder = resolve_model(model, dtype, quantize, offline, notify=lambda message: stderr.print(message, soft_wrap=True))
    return load(folder)


def note(pipeline: StarFlowPipeline, prompts: Sequence[str]) -> None:
    """Refuse prompts the model cannot take; print the notes on the others (a truncated prompt)."""
    for text in pipeline.check_prompts(list(prompts)):
        stderr.print(f"[yellow]note:[/yellow] {text}", soft_wrap=True)


def png_targets(output: Path, count: int, force: bool) -> list[Target]:
    """`output` for one image, `<stem>-1.png` … `<stem>-N.png` for several; refused now if taken."""
    if output.suffix.lower() != ".png":
        raise InputError(f"--output {output} must be a .png file name; PNG keeps the settings as metadata")
    check_writable(output.parent)
    if count == 1:
        return [explicit(output.parent, output.stem, force)]
    return [explicit(output.parent, f"{output.stem}-{index + 1}", force) for index in range(count)]


def write_results(results: Sequence[GeneratedImage], targets: Sequence[Target], force: bool, extra: dict[str, str]) -> None:
    """Write each result under its planned name (all sampling is done: a failure leaves no half run)."""
    for result, target in zip(results, targets):
        metadata = {**result.metadata, **extra}
        typer.echo(f"wrote {write_image(result.image, target, metadata, force)}")


def check_image_path(image: Path) -> Path:
    if not image.is_file():
        raise InputError(f"no image file at {image}; check the path")
    return image


# ---- generate --noise and --aspect-ratio ---------------------------------------------------------


def check_aspect_ratio(value: Optional[str]) -> Optional[str]:
    """Typer callback: one of the official presets, refused as the command line is parsed."""
    if value is not None and value not in ASPECT_RATIOS:
        raise InputError(f"--aspect-ratio {value!r} is not an official preset; choose one of {', '.join(ASPECT_RATIOS)}")
    return value


def read_noise_option(noise_file: Path | None, num_images: int, prompts: int, width: int | None, height: int | None,
                      aspect_ratio: str | None) -> NoiseFile | None:
    """The --noise file, read before any model is loaded; its rows are the images, so -n and a
    size preset do not apply, and rows × prompts count against the images per run."""
    if noise_file is None:
        return None
    if num_images != 1:
        raise InputError("--noise gives one image per noise row and prompt; drop -n/--num-images")
    if aspect_ratio is not None:
        raise InputError("--noise fixes the image size; drop --aspect-ratio")
    given = load_noise(noise_file)
    check_image_count(prompts * given.noise.shape[0], "noise rows × prompts")
    return given


def image_size(pipeline: StarFlowPipeline, width: int | None, height: int | None, aspect_ratio: str | None,
               given: NoiseFile | None, noise_file: Path | None) -> tuple[int, int]:
    """(width, height): the noise's, an aspect-ratio preset's, or --width/--height (default: training size)."""
    if given is not None:
        return check_noise(given, pipeline, width, height, str(noise_file))
    if aspect_ratio is not None:
        if width is not None or height is not None:
            raise InputError("--aspect-ratio picks the width and height; drop --width/--height or --aspect-ratio")
        return pipeline.check_size(*aspect_ratio_size(aspect_ratio, pipeline.config.image_side, pipeline.config.size_multiple))
    return pipeline.check_size(width, height)


def noise_row_metadata(metadata: dict[str, str], noise_file: Path | None) -> dict[str, str]:
    """An image sampled from a noise file records the file and row instead of a seed."""
    if noise_file is None:
        return metadata
    kept = {key: value for key, value in metadata.items() if key not in ("seed", "batch_seeds")}
    return {**kept, "noise": f"{noise_file.name} row {metadata['seed']}"}
