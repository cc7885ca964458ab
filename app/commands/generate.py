"""`starflow generate`: prompts → PNG files that carry their settings as PNG text metadata.

Everything that can be checked before the model is fetched or loaded is checked first (option
values, the prompts, the output path), so a mistake costs no download and leaves no file.
"""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
import typer
from PIL import Image
from rich.console import Console
from rich.progress import Progress, TaskID

from mlx_starflow.convert.hub import resolve_model
from mlx_starflow.errors import InputError, StarFlowError
from mlx_starflow.image import make_grid, pil_to_uint8, save_png
from mlx_starflow.labels import load_label_encoder
from mlx_starflow.pipeline import GeneratedImage, GenerationProgress, StarFlowPipeline, check_sampling, check_seed, load

from ..options import FIRST_RUN_DTYPE, Dtype, Force, Guidance, Height, Model, Offline, Quantize, Seed, Width
from ..progress import make_progress

SLUG_LENGTH = 48

stderr = Console(stderr=True, highlight=False)


class OutputError(StarFlowError):
    """The output path cannot be written."""


def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt (a class name for a label model); \"\" for an unconditional image."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", "-f", help="A text file with one prompt per line (blank lines are skipped)."),
    model: Model = None,
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt, from seeds SEED, SEED+1, …"),
    seed: Seed = None,
    guidance: Guidance = 3.6,
    width: Width = None,
    height: Height = None,
    output: Path = typer.Option(Path("outputs"), "--output", "-o", help="A folder, or a .png file name; existing files are never replaced without --force."),
    all_labels: bool = typer.Option(False, "--all-labels", help="One prompt per class of a label model (--model DIR), instead of PROMPT."),
    grid: bool = typer.Option(False, "--grid", help="Write all images as one grid PNG: a row per prompt (or a square grid when -n is 1)."),
    force: Force = False,
    jacobi: bool = typer.Option(True, "--jacobi/--sequential", help="Block-wise Jacobi iteration (fast) or token-by-token decoding (exact)."),
    jacobi_block_size: int = typer.Option(16, "--jacobi-block-size", help="Tokens per Jacobi block."),
    jacobi_threshold: float = typer.Option(1e-3, "--jacobi-threshold", help="Relative change below which a Jacobi block has converged."),
    jacobi_max_iter: int = typer.Option(32, "--jacobi-max-iter", help="Most Jacobi passes per block."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images sampled together, across prompts (default: what fits in memory, at most 8)."),
    denoise: Optional[str] = typer.Option(None, "--denoise", help="score (one score step), decoder (the fine-tuned decoder) or none (default: decoder if the model has one, else score)."),
    dtype: Dtype = FIRST_RUN_DTYPE,
    quantize: Quantize = None,
    offline: Offline = False,
) -> None:
    """Generate images from text prompts (or class names) and save them as PNGs.

    Image i of each prompt uses seed SEED+i; without --seed a seed is drawn and printed. All
    prompts are sampled together, --batch-size images at a time.
    """
    prompts = label_prompts(model) if all_labels else read_prompts(prompt, prompts_file)
    first_seed = check_seed(seed, num_images)
    check_sampling(guidance, jacobi, jacobi_block_size, jacobi_threshold, jacobi_max_iter, denoise)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {batch_size}")
    seeds = [first_seed + i for i in range(num_images)]
    targets = plan_outputs(output, prompts, seeds, grid, force)

    if model is not None and Path(model).is_dir() and (quantize is not None or dtype != FIRST_RUN_DTYPE):
        stderr.print(f"[yellow]note:[/yellow] --dtype and --quantize apply when converting; {model} is used as it was converted", soft_wrap=True)
    with conversion_bar() as progress:
        folder = resolve_model(model, dtype, quantize, offline, notify=lambda message: stderr.print(message, soft_wrap=True), progress=progress)
    pipeline = load(folder)
    size = pipeline.check_size(width, height)
    pipeline.check_denoise(denoise)
    pipeline.check_prompts(prompts)
    stderr.print(f"{pipeline.name} from {folder}: {size[0]}x{size[1]}, seed {first_seed}", soft_wrap=True)

    paths = [path for row in targets for path in row]
    timings: dict[str, float] = {}
    results: list[GeneratedImage] = []
    with make_progress() as bar:
        bars = GenerationBars(bar, pipeline)
        for item in pipeline.iter_generate(
            [text for text in prompts for _ in seeds], seeds * len(prompts), guidance=guidance, jacobi=jacobi,
            jacobi_block_size=jacobi_block_size, jacobi_threshold=jacobi_threshold, jacobi_max_iter=jacobi_max_iter,
            width=size[0], height=size[1], batch_size=batch_size, denoise=denoise,
        ):
            bars.draw(item)
            for note in item.notes:
                stderr.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
            for result in item.images:
                if not grid:
                    write(result.image, paths[len(results)], result.metadata, force)
                    typer.echo(f"wrote {paths[len(results)]}")
                results.append(result)
            timings.update(item.timings)
    if grid:
        columns = num_images if num_images > 1 else math.ceil(math.sqrt(len(results)))
        write(grid_image(results, columns), paths[0], grid_metadata(results), force)
        typer.echo(f"wrote {paths[0]}")
    typer.echo(summary(timings, len(results)))


def label_prompts(model: str | None) -> list[str]:
    """Every class name of a local label model, in the model's order."""
    folder = Path(model) if model else None
    if folder is None or not (folder / "labels").is_dir():
        raise ValueError("--all-labels needs --model pointing at a label model folder (one with labels/), e.g. weights/demo")
    return list(load_label_encoder(folder / "labels").labels)


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    """The prompt, or the file's non-blank lines; exactly one of the two."""
    if prompt is not None and prompts_file is not None:
        raise ValueError("give a prompt or --prompts-file, not both")
    if prompts_file is None:
        if prompt is None:
            raise ValueError('give a prompt (use "" for an unconditional image) or --prompts-file FILE')
        return [prompt]
    try:
        lines = prompts_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts from {prompts_file} ({e.__class__.__name__}); pass a UTF-8 text file with one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"{prompts_file} holds no prompts; write one prompt per line")
    return prompts


def slug(prompt: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:SLUG_LENGTH].rstrip("-") or "unconditional"


def plan_outputs(output: Path, prompts: list[str], seeds: list[int], grid: bool, force: bool) -> list[list[Path]]:
    """Every file the run will write, per prompt, decided and checked before anything runs.

    A folder gets `<prompt>-<seed>.png` (a free `-2`, `-3` … suffix instead of replacing a file,
    unless --force); a .png name is used as it is for a single output, else numbered. A grid is
    one file for the whole run.
    """
    file_mode = output.suffix.lower() == ".png" and not output.is_dir()
    if output.suffix and not file_mode and not output.is_dir():
        raise ValueError(f"--output {output} is neither a folder nor a .png file name; PNG keeps the settings as metadata")
    folder = output.parent if file_mode else output
    check_writable(folder)
    if grid:
        if file_mode:
            if output.exists() and not force:
                raise FileExistsError(f"{output} already exists; pass --force to replace it or choose another --output")
            return [[output]]
        name = slug(prompts[0]) if len(prompts) == 1 else f"{len(prompts)}-prompts"
        return [[free_name(folder, f"{name}-{seeds[0]}-grid", set(), force)]]
    planned: list[list[Path]] = []
    taken: set[Path] = set()
    for index, prompt in enumerate(prompts):
        if file_mode:
            stem = output.stem if len(prompts) == 1 else f"{output.stem}-{index + 1}"
            names = [stem] if len(seeds) == 1 else [f"{stem}-{seed}" for seed in seeds]
            paths = [folder / f"{name}.png" for name in names]
            existing = [path for path in paths if path.exists()]
            if existing and not force:
                raise FileExistsError(f"{existing[0]} already exists; pass --force to replace it or choose another --output")
        else:
            bases = [f"{slug(prompt)}-{seed}" for seed in seeds]
            paths = [free_name(folder, base, taken, force) for base in bases]
        taken.update(paths)
        planned.append(paths)
    return planned


def free_name(folder: Path, base: str, taken: set[Path], force: bool) -> Path:
    path, number = folder / f"{base}.png", 1
    while path in taken or (path.exists() and not force):
        number += 1
        path = folder / f"{base}-{number}.png"
    return path


def check_writable(folder: Path) -> None:
    """Fail now if `folder` cannot be created or written, without creating anything."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write to {folder}: {existing} is a file, not a folder; choose another --output")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {folder} ({e.strerror or e}); choose another --output") from None


def write(image: Image.Image, path: Path, metadata: dict[str, str], force: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path, metadata, overwrite=force)
    except FileExistsError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror or e}); choose another --output") from None


def grid_image(results: list[GeneratedImage], columns: int) -> Image.Image:
    tiles = make_grid([pil_to_uint8(result.image) for result in results], columns)
    return Image.fromarray(np.ascontiguousarray(tiles.transpose(1, 2, 0)))


def grid_metadata(results: list[GeneratedImage]) -> dict[str, str]:
    seeds = [result.seed for result in results]
    prompts = list(dict.fromkeys(result.metadata.get("prompt", "") for result in results))
    return {**results[0].metadata, "prompt": " | ".join(prompts), "seed": ",".join(map(str, seeds)),
            "grid": f"{len(results)} images in reading order, a row per prompt when -n > 1"}


class GenerationBars:
    """One bar per flow block and per denoise/decode step of each batch; a finished bar is removed."""

    def __init__(self, bar: Progress, pipeline: StarFlowPipeline):
        self.bar = bar
        self.pipeline = pipeline
        self.tasks: dict[tuple, TaskID] = {}

    def draw(self, item: GenerationProgress) -> None:
        batch = f"batch {item.batch + 1}/{item.num_batches} · " if item.num_batches > 1 else ""
        if item.phase == "sample":
            block = item.sample.block
            kind = "deep" if self.pipeline.flow.blocks[block].has_text else "shallow"
            key: tuple = (item.batch, block)
            description = f"{batch}block {block} ({kind})"
        elif item.phase in ("denoise", "decode"):
            key = (item.batch, item.phase)
            description = f"{batch}{'score-step denoise' if item.phase == 'denoise' else 'decode'}"
        else:
            return
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(description, total=item.total)
        self.bar.update(self.tasks[key], completed=item.done, total=item.total)
        if item.done >= item.total:
            self.bar.remove_task(self.tasks.pop(key))


@contextlib.contextmanager
def conversion_bar() -> Iterator[Callable[[int, int], None]]:
    """A progress callback whose bar appears only if a conversion actually runs."""
    bar = make_progress()
    task: list[int] = []

    def update(done: int, total: int) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task("converting the flow", total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        yield update
    finally:
        if task:
            bar.stop()


def summary(timings: dict[str, float], count: int) -> str:
    total = sum(timings.values())
    parts = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in timings.items() if seconds > 0)
    peak = mx.get_peak_memory() / 1e9
    return f"{count} image(s) in {total:.1f} s ({parts}; {total / max(count, 1):.1f} s per image), peak memory {peak:.2f} GB"
