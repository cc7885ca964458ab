"""`starflow train`: maximum-likelihood training of a new label model or fine-tuning of a converted one."""

from __future__ import annotations

import contextlib
import shlex
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mlx_starflow.convert.official_config import flow_config, read_official_config
from mlx_starflow.dataset import CAPTIONS_FILE, ImageData, load_image_folder
from mlx_starflow.errors import ConfigError, InputError
from mlx_starflow.model_io import sha256_file
from mlx_starflow.run_folder import MODEL_FOLDER
from mlx_starflow.sampling import LOG2_PIXEL_SCALE
from mlx_starflow.model_folder import load_model_folder
from mlx_starflow.train import (
    BaseModel, TrainProgress, TrainSettings, fine_tune_base, image_size,
    new_label_model, train as train_model,
)

from ..options import Force, Guidance, Seed, finite

INTERRUPTED = 130
"""Exit status of a run stopped by Ctrl-C (after its checkpoint is written), as shells report SIGINT."""


def train(
    data: Path = typer.Argument(..., help=f"Folder of images with a {CAPTIONS_FILE} (one `file<TAB>caption` line per image; for label models the caption is the class name)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder to create: model/ (latest checkpoint, a model folder), optimizer/ (state for --resume), samples/."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Official-format YAML of a new label model (pixel space; its classes are the data's captions, sorted)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Model folder to fine-tune (converted or trained; text models need text_encoder/, latent models vae/)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Run folder to continue from its last checkpoint; pass the options that run was started with."),
    captions: Optional[Path] = typer.Option(None, "--captions", help=f"Captions file (default: DATA/{CAPTIONS_FILE})."),
    steps: int = typer.Option(1000, "--steps", help="Optimizer steps in all."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per step."),
    lr: float = typer.Option(1e-4, "--lr", callback=finite, help="Peak learning rate (AdamW, betas 0.9/0.95, bias-corrected)."),
    min_lr: float = typer.Option(1e-6, "--min-lr", callback=finite, help="Learning rate of the first step and at the end of the cosine decay."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps (default: one epoch of the training images, as upstream)."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", callback=finite, help="AdamW decoupled weight decay."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", callback=finite, help="Clip the global gradient norm to this (0: no clipping)."),
    seed: Seed = 0,
    heldout: float = typer.Option(0.05, "--heldout", callback=finite, help="Share of the images held out to measure bits/dim."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Write a checkpoint every N steps (0: only at the end; Ctrl-C or SIGTERM also writes one)."),
    sample_every: int = typer.Option(500, "--sample-every", help="Write a sample grid (one image per class or caption) every N steps (0: never)."),
    guidance: Guidance = 3.6,
    force: Force = False,
) -> None:
    """Train with the official objective: noise augmentation (config noise_std), condition dropout
    (config drop_label), latent-norm regularisation, AdamW with warm-up and cosine decay.
    --seed seeds initialisation, held-out split, batch order, noise and condition dropout;
    --guidance is the sample grids'; --force starts over in an existing --out run folder.
    Once training runs, Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint and stops; --resume
    continues it. During setup it stops at once. A second run into a run folder in use is refused."""
    if (config is None) == (init is None):
        raise InputError("pass --config YAML to train a new model or --init MODEL to fine-tune one (exactly one)")
    if (out is None) == (resume is None):
        raise InputError("pass --out RUN to start a run or --resume RUN to continue one (exactly one)")
    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                             weight_decay=weight_decay, grad_clip=grad_clip, seed=seed, heldout=heldout,
                             checkpoint_every=checkpoint_every, sample_every=sample_every, sample_guidance=guidance)
    run = resume or out
    if config is not None:
        images, base = _new_model(config, data, captions, seed)
    else:
        base = fine_tune_base(load_model_folder(init, decoder=False))
        images = load_image_folder(data, image_size(base.flow.config), captions)
    if images.skipped:
        typer.echo(f"skipped {len(images.skipped)} unreadable image(s), e.g. {images.skipped[0]}", err=True)
    command = _command(data, run, config, init, captions, settings)
    with _stop_on_interrupt() as (arm, stop_requested):
        last = _drive(train_model(base, images, run, settings, command=command, resume=resume is not None,
                                  force=force, should_stop=stop_requested, on_start=arm), base.is_pixel_model)
    if last is not None and last.stopped:
        typer.echo(f"stopped at step {last.step}; checkpoint in {last.checkpoint}. Continue with:\n  "
                   + command.replace(f"--out {shlex.quote(str(run))}", f"--resume {shlex.quote(str(run))}"), err=True)
        raise typer.Exit(INTERRUPTED)
    typer.echo(f"wrote {run / MODEL_FOLDER}")


def _new_model(config: Path, data: Path, captions: Optional[Path], seed: int) -> tuple[ImageData, BaseModel]:
    official = read_official_config(config)
    if not official.is_label_model:
        raise ConfigError(f"{config} is text-conditioned (text: {official.text_encoder}); new models are label models "
                          f"(text: NAME.vocab); to train a text model, fine-tune a converted one with --init")
    if official.vae:
        raise ConfigError(f"{config} is a latent model (vae: {official.vae}); new models train in pixel space, "
                          f"so remove vae:, or fine-tune a converted latent model with --init")
    images = load_image_folder(data, int(official.args["img_size"]), captions)
    labels = tuple(sorted(set(images.captions)))
    source = {"config": str(config), "config_sha256": sha256_file(config)}
    return images, new_label_model(flow_config(official, txt_dim=len(labels) + 1), labels, seed, source)


def _command(data: Path, run: Path, config: Optional[Path], init: Optional[Path], captions: Optional[Path],
             settings: TrainSettings) -> str:
    """The full command, every setting explicit, recorded in the manifests."""
    parts = ["starflow", "train", str(data), "--out", str(run)]
    parts += ["--config", str(config)] if config else ["--init", str(init)]
    if captions:
        parts += ["--captions", str(captions)]
    for name, value in settings.to_dict().items():
        if name in ("beta1", "beta2") or value is None:
            continue
        flag = "--guidance" if name == "sample_guidance" else "--" + name.replace("_", "-")
        parts += [flag, str(value)]
    return shlex.join(parts)


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[tuple[Callable[[], None], Callable[[], bool]]]:
    """Yields (arm, stop requested). Until `arm()` (called when the training loop starts) Ctrl-C
    and SIGTERM stop at once, as in every command, so setup (reading a model, data or a run
    folder) never waits for a step that has not begun. Once armed, the first one finishes the
    step, writes a checkpoint and stops; a second one aborts at once (the checkpoints committed
    so far stay resumable)."""
    requested: list[int] = []
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: object) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    def arm() -> None:
        previous.update((signum, signal.signal(signum, handler)) for signum in (signal.SIGINT, signal.SIGTERM))

    try:
        yield arm, lambda: bool(requested)
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def _drive(progress_items: Iterator[TrainProgress], pixel_model: bool) -> TrainProgress | None:
    """Draw the loop's progress (loss, bits/dim, learning rate) and report evaluations and files."""
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[stats]}"))
    last = None
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("training", total=None, stats="")
        for item in progress_items:
            last = item
            bar.update(task, completed=item.step, total=item.steps,
                       stats=f"loss {item.loss:.4f}  bits/dim {item.bits_per_dim:.4f}  lr {item.lr:.2e}")
            if item.heldout_before is not None:
                bar.console.print(f"held-out bits/dim at the start: {_bits(item.heldout_before, pixel_model)}")
            if item.heldout_bits_per_dim is not None:
                bar.console.print(f"step {item.step}: held-out bits/dim {_bits(item.heldout_bits_per_dim, pixel_model)}")
            if item.checkpoint is not None:
                bar.console.print(f"step {item.step}: checkpoint {item.checkpoint}")
            if item.samples is not None:
                bar.console.print(f"step {item.step}: samples {item.samples}")
    return last


def _bits(value: float, pixel_model: bool) -> str:
    """Pixel models also show the usual 8-bit figure; latent models' bits are per latent dimension."""
    return f"{value:.4f} (8-bit: {value + LOG2_PIXEL_SCALE:.4f})" if pixel_model else f"{value:.4f} per latent dimension"
