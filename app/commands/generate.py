"""`starflow generate`: prompts → PNG files that carry their settings as PNG text metadata.

Everything that can be checked before the model is fetched or loaded is checked first (option
values, the prompts, the output path), so a mistake costs no download and leaves no file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
import typer
from PIL import Image
from rich.console import Console
from rich.progress import Progress, TaskID

from mlx_starflow.aspect_ratio import ASPECT_RATIOS
from mlx_starflow.convert.hub import resolve_model
from mlx_starflow.errors import InputError
from mlx_starflow.image import make_grid, pil_to_uint8
from mlx_starflow.labels import load_label_encoder
from mlx_starflow.pipeline import GeneratedImage, GenerationProgress, StarFlowPipeline, check_sampling, check_seed, load
from mlx_starflow.samplers import JACOBI_INITS, JACOBI_PRESETS

from ..inputs import check_text, read_lines
from ..limits import MAX_BATCH, MAX_IMAGES, check_grid, check_image_count
from ..options import (FIRST_RUN_DTYPE, Bfloat16Rope, Dtype, Float32Compute, Force, Guidance, Height, JacobiFlag, JacobiOverrides,
                       Model, Offline, Quantize, Seed, make_sampler,
                       Width, check_batch_size, finite, image_count)
from ..outputs import plan_outputs, write_image
from ..progress import make_progress
from .noise_tools import check_aspect_ratio, image_size, noise_row_metadata, read_noise_option

stderr = Console(stderr=True, highlight=False)


def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt (a class name for a label model); \"\" for an unconditional image."),
    prompt_option: Optional[str] = typer.Option(None, "--prompt", help="The prompt, as an option (the same as PROMPT)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", "-f", help="A UTF-8 text file with one prompt per line (blank lines are skipped)."),
    model: Model = None,
    num_images: int = typer.Option(1, "--num-images", "-n", callback=image_count, help=f"Images per prompt, from seeds SEED, SEED+1, …; at most {MAX_IMAGES:,} images per run (prompts × -n)."),
    seed: Seed = None,
    guidance: Guidance = 3.6,
    width: Width = None,
    height: Height = None,
    output: Path = typer.Option(Path("outputs"), "--output", "-o", help="A folder, or a .png file name; existing files are never replaced without --force."),
    all_labels: bool = typer.Option(False, "--all-labels", help="One prompt per class of a label model (--model DIR), instead of PROMPT."),
    grid: bool = typer.Option(False, "--grid", help="Write all images as one grid PNG: a row per prompt (or a square grid when -n is 1)."),
    force: Force = False,
    jacobi: JacobiFlag = None,
    jacobi_preset: Optional[str] = typer.Option(None, "--jacobi-preset", help="Named Jacobi settings: " + "; ".join(f"{name}: {preset.describe()}" for name, preset in JACOBI_PRESETS.items()) + ". official (the default) is the official script's; fast reads the weights ~4x fewer times than sequential on the trained demo model. The --jacobi-* flags below replace single settings; any of them implies --jacobi."),
    jacobi_block_size: Optional[int] = typer.Option(None, "--jacobi-block-size", help="Tokens per Jacobi chunk (default: the preset's)."),
    jacobi_threshold: Optional[float] = typer.Option(None, "--jacobi-threshold", callback=finite, help="Relative change below which a Jacobi chunk has converged (default: the preset's)."),
    jacobi_deep_threshold: Optional[float] = typer.Option(None, "--jacobi-deep-threshold", callback=finite, help="Threshold for the deep, text-reading block only, where most weights are (default: the preset's; none: --jacobi-threshold)."),
    jacobi_max_iter: Optional[int] = typer.Option(None, "--jacobi-max-iter", help="Most Jacobi passes per chunk (default: the preset's)."),
    jacobi_init: Optional[str] = typer.Option(None, "--jacobi-init", help=f"First Jacobi iterate of a chunk ({', '.join(JACOBI_INITS)}): noise (official) or carry, the noise coloured by the last decoded token's Gaussian (default: the preset's)."),
    attn_temp: float = typer.Option(1.0, "--attn-temp", callback=finite, help="Attention temperature of --sequential sampling (official attn_temp): every attention logit is divided by it; 1 is the trained attention."),
    jacobi_coupled: bool = typer.Option(False, "--jacobi-coupled", help="Decide Jacobi convergence over the whole batch, as the official sampler (images then depend on what they are batched with); by default each image converges on its own."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", callback=check_batch_size,
                                             help=f"Images sampled together, across prompts, at most {MAX_BATCH} (default: what fits in memory, at most 8)."),
    denoise: Optional[str] = typer.Option(None, "--denoise", help="score (one score step), decoder (the fine-tuned decoder) or none (default: decoder if the model has one, else score)."),
    denoise_lr: float = typer.Option(1.0, "--denoise-lr", callback=finite, help="Step size of the score-step denoise, x + lr·σ²·∇log p(x) (official self_denoising_lr); 1 is the Tweedie step."),
    bfloat16_rope: Bfloat16Rope = False,
    float32_compute: Float32Compute = False,
    dtype: Dtype = FIRST_RUN_DTYPE,
    quantize: Quantize = None,
    offline: Offline = False,
    text_encoder: Optional[Path] = typer.Option(None, "--text-encoder", help="A local Hugging Face T5 folder (google/flan-t5-xl layout) to convert with a checkpoint, instead of the cache."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="A local diffusers VAE folder (stabilityai/sd-vae-ft-ema layout) to convert with a checkpoint, instead of the cache."),
    decoder: Optional[Path] = typer.Option(None, "--decoder", help="STARFlow's fine-tuned noisy-latent decoder file to convert with a checkpoint (used instead of the score step)."),
    noise_file: Optional[Path] = typer.Option(None, "--noise", help="Sample from this noise file (`starflow invert`) instead of seeds: one image per noise row and prompt, at the noise's size."),
    aspect_ratio: Optional[str] = typer.Option(None, "--aspect-ratio", callback=check_aspect_ratio, help=f"The official size presets ({', '.join(ASPECT_RATIOS)}): the training size's area, sides multiples of the VAE factor × patch size; instead of --width/--height."),
) -> None:
    """Generate images from text prompts (or class names) and save them as PNGs.

    Image i of each prompt uses seed SEED+i; without --seed a seed is drawn and printed. All
    prompts are sampled together, --batch-size images at a time.
    """
    prompts = label_prompts(model) if all_labels else read_prompts(one_prompt(prompt, prompt_option), prompts_file)
    check_image_count(len(prompts) * num_images)
    first_seed = check_seed(seed, num_images)
    sampler = make_sampler(jacobi, jacobi_preset, JacobiOverrides(jacobi_block_size, jacobi_threshold, jacobi_max_iter,
                                                                 jacobi_deep_threshold, jacobi_init, jacobi_coupled), attn_temp)
    check_sampling(guidance, denoise, denoise_lr)
    given = read_noise_option(noise_file, num_images, len(prompts), width, height, aspect_ratio)
    seeds = [first_seed + i for i in range(num_images)] if given is None else list(range(given.noise.shape[0]))
    targets = plan_outputs(output, prompts, seeds, grid, force)

    if model is not None and Path(model).is_dir() and (quantize is not None or dtype != FIRST_RUN_DTYPE):
        stderr.print(f"[yellow]note:[/yellow] --dtype and --quantize apply when converting; {model} is used as it was converted", soft_wrap=True)
    with conversion_bar() as progress:
        folder = resolve_model(model, dtype, quantize, offline, notify=lambda message: stderr.print(message, soft_wrap=True),
                               progress=progress, text_encoder=text_encoder, vae=vae, decoder=decoder)
    pipeline = load(folder, bfloat16_rope=bfloat16_rope, float32_compute=float32_compute)
    size = image_size(pipeline, width, height, aspect_ratio, given, noise_file)
    columns = num_images if num_images > 1 else math.ceil(math.sqrt(len(prompts)))
    if grid:
        check_grid(len(prompts) * num_images, columns, *size)
    pipeline.check_denoise(denoise)
    pipeline.check_prompts(prompts)
    stderr.print(f"{pipeline.name} from {folder}: {size[0]}x{size[1]}, {f'seed {first_seed}' if given is None else f'noise {noise_file}'}", soft_wrap=True)

    names = [target for row in targets for target in row]
    timings: dict[str, float] = {}
    results: list[GeneratedImage] = []
    batches: list[list[int]] = []
    count = 0
    with make_progress() as bar:
        bars = GenerationBars(bar, pipeline)
        for item in pipeline.iter_generate(
            [text for text in prompts for _ in seeds], seeds * len(prompts), guidance=guidance, sampler=sampler,
            width=size[0], height=size[1], batch_size=batch_size, denoise=denoise,
            denoise_lr=denoise_lr, noise=None if given is None else mx.concatenate([given.noise] * len(prompts)),
        ):
            bars.draw(item)
            for note in item.notes:
                stderr.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True)
            if item.images:
                batches.append([result.seed for result in item.images])
            for result in item.images:
                if grid:
                    results.append(result)
                else:
                    typer.echo(f"wrote {write_image(result.image, names[count], noise_row_metadata(result.metadata, noise_file), force)}")
                count += 1
            timings.update(item.timings)
    if grid:
        path = write_image(grid_image(results, columns), names[0], grid_metadata(results, batches), force)
        typer.echo(f"wrote {path}")
    typer.echo(summary(timings, count))


def one_prompt(positional: str | None, option: str | None) -> str | None:
    """PROMPT or --prompt (the habit of other image tools); both is a mistake."""
    if positional is not None and option is not None:
        raise InputError("give the prompt once: as PROMPT or as --prompt, not both")
    return option if positional is None else positional


def label_prompts(model: str | None) -> list[str]:
    """Every class name of a local label model, in the model's order."""
    folder = Path(model) if model else None
    if folder is None or not (folder / "labels").is_dir():
        raise InputError("--all-labels needs --model pointing at a label model folder (one with labels/), e.g. weights/demo")
    return list(load_label_encoder(folder / "labels").labels)


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    """The prompt, or the file's non-blank lines; exactly one of the two, as UTF-8 text."""
    if prompt is not None and prompts_file is not None:
        raise InputError("give a prompt or --prompts-file, not both")
    if prompts_file is None:
        if prompt is None:
            raise InputError('give a prompt (use "" for an unconditional image) or --prompts-file FILE')
        return [check_text(prompt, "the prompt")]
    return read_lines(prompts_file, "prompt")


def grid_image(results: list[GeneratedImage], columns: int) -> Image.Image:
    tiles = make_grid([pil_to_uint8(result.image) for result in results], columns)
    return Image.fromarray(np.ascontiguousarray(tiles.transpose(1, 2, 0)))


def grid_metadata(results: list[GeneratedImage], batches: list[list[int]]) -> dict[str, str]:
    """The first image's settings, with every image's prompt and seed, and every batch's seeds
    (with Jacobi an image depends on the batch it was sampled in, so the batches reproduce it)."""
    seeds = [result.seed for result in results]
    prompts = list(dict.fromkeys(result.metadata.get("prompt", "") for result in results))
    return {**results[0].metadata, "prompt": " | ".join(prompts), "seed": ",".join(map(str, seeds)),
            "grid": f"{len(results)} images in reading order, a row per prompt when -n > 1",
            "batch_size": str(max(map(len, batches))),
            "batch_seeds": " | ".join(",".join(map(str, batch)) for batch in batches)}


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
