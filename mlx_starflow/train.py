"""Maximum-likelihood training of a STARFlow model, as the official `train.py` does it, in MLX.

Objective: the flow's loss on Gaussian-noised inputs (noise std = the config's `noise_std`) plus
`latent_norm_regularization · Σ mean(outputs[k]²)` over the noisy input and the shallow blocks'
outputs (the deep block's output excluded); conditions are replaced by the empty condition with
probability `drop_label`, which trains the unconditional branch guidance needs. AdamW (betas
0.9/0.95, weight decay 1e-4, bias-corrected like PyTorch's), warm-up then cosine decay to
`min_lr` with the official `CosineLRSchedule` semantics, and global-norm gradient clipping.

A run folder (`run_folder.py`) holds `model/` (the latest checkpoint: a loadable model folder),
`optimizer/` (the optimizer state and the run's settings, for resuming), both committed together
as one checkpoint, and `samples/` (sample grids). Every random
draw (batch order, noise, condition dropout, VAE posterior samples) is a pure function of the
seed and the step, so a resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map
from PIL import Image

from .config import FlowConfig, LabelConfig
from .dataset import ImageData, batch_indices, heldout_split
from .errors import ConfigError, InputError, TrainingError
from .flow import StarFlow
from .image import decoded_to_uint8, make_grid, save_png, uint8_to_model_input
from .labels import LabelEncoder, UnknownLabel
from .model_folder import Condition, ModelParts
from .model_io import MANIFEST_FILE, load_weights, sha256_file
from .pipeline import StarFlowPipeline, with_guidance
from .run_folder import (
    LATEST, MODEL_FOLDER, OPTIMIZER_FOLDER, SAMPLES_FOLDER, check_new_run, check_resumable, claimed_run, read_run_state,
    restore_optimizer, save_checkpoint, start_run,
)
from .sampling import LOG2_PIXEL_SCALE, bits_per_dim, nll_per_sample
from .vae import VAE

ENCODE_BATCH = 16
SAMPLE_LIMIT = 16
_STEP_STREAM, _EVAL_STREAM = 11, 13


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a run's numbers, plus how often it writes checkpoints and samples.

    `warmup_steps=None` means one epoch of the training images, the official default. A value
    out of range is an `InputError` naming the `starflow train` option that sets it.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int | None = None
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    heldout: float = 0.05
    checkpoint_every: int = 500
    sample_every: int = 500
    sample_guidance: float = 3.6

    RUN_ONLY = ("checkpoint_every", "sample_every", "sample_guidance")
    """Fields that change what is written along the way, not the trained weights."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            _require(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "checkpoint_every", "sample_every"):
            _require(getattr(self, name) >= 0, name, "must be 0 or more", getattr(self, name))
        _require(self.min_lr <= self.lr, "min_lr", f"must not exceed --lr ({self.lr})", self.min_lr)
        _require(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "must be 0 or more", self.warmup_steps)
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, name, "(AdamW) must be in [0, 1)", getattr(self, name))
        _require(0 <= self.seed < 2**32, "seed", "must be in 0 … 2^32-1", self.seed)
        _require(0 <= self.heldout < 1, "heldout", "is the held-out share of the images, in [0, 1)", self.heldout)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def numeric(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.RUN_ONLY}


def _require(ok: bool, field: str, rule: str, value: Any) -> None:
    """Refuse a setting with the option that sets it (`batch_size` is `--batch-size`)."""
    if not ok:
        option = field if field.startswith("beta") else "--" + field.replace("_", "-")
        raise InputError(f"{option} {rule}, got {value}")


@dataclass(frozen=True)
class TrainProgress:
    """One optimizer step done; evaluation and file results are set on the steps that made them."""

    step: int
    steps: int
    loss: float
    bits_per_dim: float
    lr: float
    elapsed: float
    heldout_bits_per_dim: float | None = None
    heldout_before: float | None = None
    checkpoint: Path | None = None
    samples: Path | None = None
    stopped: bool = False


# ---- schedule and objective (pure) ---------------------------------------------------------------


def learning_rate(update: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer update `update` (0-based), as the official CosineLRSchedule sets it.

    The schedule starts at `min_lr` and is stepped after each update; a value outside
    [min_lr, lr] is not applied. So update 0 runs at `min_lr`, warm-up rises linearly from
    min(min_lr, 1e-6) to `lr` at update `warmup`, then a cosine falls to `min_lr` at `total`.
    """
    if update == 0:
        return min_lr
    if update <= warmup:
        start = min(min_lr, 1e-6)
        return max(min_lr, start + update / warmup * (lr - start))
    t = (update - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (lr - min_lr)


def objective(model: StarFlow, x: mx.array, y: mx.array | None) -> tuple[mx.array, mx.array]:
    """(training loss, flow loss) on a noisy batch: the official `train.py` objective.

    The regulariser keeps the intermediate latents near unit scale; the deep block's output is
    already pulled there by the Gaussian prior, so it is left out, as upstream.
    """
    z, logdets, outputs = model.forward(x, y, return_sequence=True)
    nll = mx.mean(nll_per_sample(z, logdets))
    norms = sum(mx.mean(mx.square(out)) for out in outputs[:-1])
    return nll + model.config.latent_norm_regularization * norms, nll


def initialise(model: StarFlow, seed: int) -> None:
    """The official initialisation, seeded: PyTorch-default linears (weight and bias uniform in
    ±1/√fan_in), unit LayerNorms, zero RMSNorm offsets, SOS ~ N(0, 1) and a zero output
    projection weight, so every block starts close to the identity."""
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    keys = mx.random.split(mx.random.key(seed), 2 * len(linears) + len(model.blocks))
    for i, linear in enumerate(linears):
        bound = linear.weight.shape[1] ** -0.5
        linear.weight = mx.random.uniform(-bound, bound, linear.weight.shape, key=keys[2 * i])
        linear.bias = mx.random.uniform(-bound, bound, linear.bias.shape, key=keys[2 * i + 1])
    for i, block in enumerate(model.blocks):
        block.sos = mx.random.normal(block.sos.shape, key=keys[2 * len(linears) + i])
        block.proj_out.weight = mx.zeros_like(block.proj_out.weight)
    mx.eval(model.parameters())


# ---- what training starts from ---------------------------------------------------------------------


@dataclass
class BaseModel:
    """The flow to train with its condition encoder (labels or T5) and, for latent models, its VAE.

    `folder` is the parent model folder whose frozen components each checkpoint carries;
    `source` is its provenance for the manifests.
    """

    flow: StarFlow
    condition: Condition
    vae: VAE | None
    folder: Path | None
    source: dict[str, Any]

    @property
    def labels(self) -> LabelEncoder | None:
        return self.condition if isinstance(self.condition, LabelEncoder) else None

    @property
    def is_pixel_model(self) -> bool:
        return self.vae is None

    def pipeline(self) -> StarFlowPipeline:
        """The model being trained as a pipeline, for its sampling stages."""
        return StarFlowPipeline(self.flow, self.condition, self.vae, None, "training")


def new_label_model(config: FlowConfig, labels: tuple[str, ...], seed: int, source: dict[str, Any]) -> BaseModel:
    """A freshly initialised pixel-space label model for `labels` (condition width = classes + 1)."""
    if config.txt_dim != len(labels) + 1 or config.txt_size != 1:
        raise ConfigError(
            f"a label model over {len(labels)} classes needs txt_size 1 and txt_dim {len(labels) + 1}, "
            f"the config has {config.txt_size} and {config.txt_dim}"
        )
    if config.vae_factor != 1:
        raise ConfigError("a new model from a config trains in pixel space; remove the config's vae: entry, or fine-tune a converted latent model with --init")
    flow = StarFlow(config)
    initialise(flow, seed)
    return BaseModel(flow, LabelEncoder(LabelConfig(labels=labels)), None, None, source)


def fine_tune_base(parts: ModelParts) -> BaseModel:
    """A loaded model folder (`load_model_folder`) made ready to fine-tune in float32.

    It needs its condition encoder (labels or T5); quantised flows are refused: their weights
    cannot be trained.
    """
    flow, path = parts.flow, parts.folder.path
    config = flow.config
    if config.quantization:
        raise ConfigError(f"{path} is quantised ({config.quantization['bits']}-bit); fine-tune a float32/float16 conversion instead")
    if parts.condition is None:
        raise ConfigError(f"{path} has neither labels/ nor text_encoder/: training needs the condition encoder the model was made with")
    if config.dtype != "float32":
        flow.update(tree_map(lambda p: p.astype(mx.float32), flow.parameters()))
        flow.config = dataclasses.replace(config, dtype="float32")
    # absolute, not resolved: a run's RUN/model links to a checkpoint that later ones replace
    source = {"parent": str(path.absolute()), "parent_manifest_sha256": sha256_file(path / MANIFEST_FILE),
              "parent_sources": parts.folder.manifest.get("sources", [])}
    return BaseModel(flow, parts.condition, parts.vae, path, source)


# ---- data in model space (precomputed once per run) -------------------------------------------------


@dataclass
class ModelSpaceData:
    """Images as the flow sees them and their conditions.

    `means` (N, C, H, W): pixels in [-1, 1] or scaled VAE posterior means; `stds`: scaled
    posterior standard deviations (None in pixel space). `table` (U+1, T, D) holds one
    condition per distinct caption and, last, the empty condition; `ids` picks each image's row.
    """

    means: mx.array
    stds: mx.array | None
    ids: np.ndarray
    table: mx.array
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def empty_id(self) -> int:
        return self.table.shape[0] - 1


def image_size(config: FlowConfig) -> int:
    """Pixel side the flow trains on: its latent size times the VAE factor."""
    return config.latent_size * config.vae_factor


def encode_conditions(base: BaseModel, captions: tuple[str, ...]) -> tuple[np.ndarray, mx.array, tuple[str, ...]]:
    """(row per image, condition table with the empty condition last, the table's captions)."""
    if base.labels is not None:
        try:
            ids = np.array(base.labels.ids(list(captions)), dtype=np.int64)
        except UnknownLabel as e:
            raise InputError(f"a caption of the data is not a class of this model: {e}") from None
        if (ids == base.labels.empty_id).any():
            raise InputError("a caption of the data is empty; every image of a label model needs its class name")
        return ids, base.labels.encode([*base.labels.labels, ""]), base.labels.labels
    names = tuple(dict.fromkeys(captions))
    row = {name: i for i, name in enumerate(names)}
    prompts = [*names, ""]
    length = base.flow.config.txt_size
    table = mx.concatenate([base.condition.encode(prompts[i : i + ENCODE_BATCH], length)
                            for i in range(0, len(prompts), ENCODE_BATCH)], axis=0)
    if table.shape[2] != base.flow.config.txt_dim:
        raise ConfigError(f"the text encoder gives {table.shape[2]}-wide states but the flow reads {base.flow.config.txt_dim}; use the model's own text_encoder/")
    mx.eval(table)
    return np.array([row[c] for c in captions], dtype=np.int64), table, names


def to_model_space(base: BaseModel, data: ImageData, conditions: tuple[np.ndarray, mx.array, tuple[str, ...]]) -> ModelSpaceData:
    """Pixels → flow inputs (VAE-encoded for latent models) with each image's condition row."""
    ids, table, names = conditions
    if base.vae is None:
        return ModelSpaceData(uint8_to_model_input(data.images), None, ids, table, names)
    means, stds = [], []
    scale = base.vae.config.scaling_factor
    for i in range(0, len(data), ENCODE_BATCH):
        mean, logvar = base.vae.latent_distribution(uint8_to_model_input(data.images[i : i + ENCODE_BATCH]))
        means.append(mean * scale)
        stds.append(mx.exp(0.5 * logvar) * scale)
        mx.eval(means[-1], stds[-1])
    return ModelSpaceData(mx.concatenate(means), mx.concatenate(stds), ids, table, names)


def training_batch(data: ModelSpaceData, config: FlowConfig, settings: TrainSettings, step: int) -> tuple[mx.array, mx.array]:
    """(noisy inputs, conditions) of optimizer step `step`: a pure function of the seed and step."""
    rows = batch_indices(len(data), settings.batch_size, settings.seed, step)
    rng = np.random.RandomState([settings.seed, _STEP_STREAM, step])
    shape = (len(rows), *data.means.shape[1:])
    take = mx.array(rows)
    x = data.means[take]
    if data.stds is not None:
        x = x + data.stds[take] * mx.array(rng.standard_normal(shape).astype(np.float32))
    x = x + config.noise_std * mx.array(rng.standard_normal(shape).astype(np.float32))
    dropped = rng.random_sample(len(rows)) < config.drop_label
    ids = np.where(dropped, data.empty_id, data.ids[rows])
    return x, data.table[mx.array(ids)]


def heldout_bits_per_dim(model: StarFlow, data: ModelSpaceData, noise_std: float, seed: int, batch_size: int) -> float:
    """Mean bits/dim of held-out images (posterior means for latent models) with the training
    noise added from a fixed seed, under their own conditions: the continuous figure."""
    total = 0.0
    for start in range(0, len(data), batch_size):
        rows = np.arange(start, min(start + batch_size, len(data)))
        noise = np.random.RandomState([seed, _EVAL_STREAM, start]).standard_normal((len(rows), *data.means.shape[1:]))
        x = data.means[mx.array(rows)] + noise_std * mx.array(noise.astype(np.float32))
        bpd = model.bits_per_dim(x, data.table[mx.array(data.ids[rows])])
        total += mx.sum(bpd).item()
    return total / len(data)


# ---- sample grids ------------------------------------------------------------------------------------


def sample_images(pipeline: StarFlowPipeline, conditions: mx.array, empty: mx.array, seed: int, guidance: float) -> np.ndarray:
    """uint8 (B, 3, H, W) samples for condition rows (B, T, D) through the pipeline's stages
    (guidance, sample, score-step denoise, decode); noise of image i is RandomState(seed + i)."""
    side = image_size(pipeline.config)
    noise = pipeline.noise([seed + i for i in range(conditions.shape[0])], side, side)
    samples = pipeline.flow.sample(noise, with_guidance(conditions, empty, guidance), guidance=guidance)
    denoised = mx.concatenate(list(pipeline.denoised(samples, conditions)), axis=0)
    return decoded_to_uint8(pipeline.decode_pixels(denoised))


# ---- provenance ---------------------------------------------------------------------------------------


def hardware() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, MLX {mx.__version__} on {mx.default_device()}"


# ---- the loop ---------------------------------------------------------------------------------------


def make_optimizer(model: StarFlow, settings: TrainSettings) -> optim.AdamW:
    optimizer = optim.AdamW(learning_rate=settings.min_lr, betas=[settings.beta1, settings.beta2],
                            weight_decay=settings.weight_decay, bias_correction=True)
    optimizer.init(model.trainable_parameters())
    return optimizer


def make_train_step(model: StarFlow, optimizer: optim.Optimizer, grad_clip: float) -> Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]:
    """One compiled AdamW step on a batch: returns (training loss, flow loss) before the update."""
    loss_and_grad = nn.value_and_grad(model, objective)
    state = [model.state, optimizer.state]

    def step(x: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
        (loss, nll), grads = loss_and_grad(model, x, y)
        if grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return loss, nll

    return mx.compile(step, inputs=state, outputs=state)


def train(
    base: BaseModel,
    data: ImageData,
    out: str | Path,
    settings: TrainSettings,
    *,
    command: str | None = None,
    resume: bool = False,
    force: bool = False,
    should_stop: Callable[[], bool] | None = None,
    on_start: Callable[[], None] | None = None,
) -> Generator[TrainProgress, None, None]:
    """Train `base.flow` on `data`, yielding after every step; checkpoints go to the run folder `out`.

    Everything is checked before anything is written: a new run refuses an existing `out`
    unless `force`; `resume` continues `out` from its last checkpoint and refuses a run made with
    another config, classes, data or settings. The run holds `out` alone (`claimed_run`): a
    second run into it is refused, and a new folder whose setup fails is removed again.
    `on_start()` is called once setup is done, just before the first step (the app arms its
    finish-the-step interrupt handler there); when `should_stop()` then turns true a checkpoint
    is written and the last item has `stopped` set. The final checkpoint is always written.
    """
    out = Path(out)
    model, config = base.flow, base.flow.config
    train_rows, heldout_rows = heldout_split(len(data), settings.heldout, settings.seed)
    if settings.batch_size > len(train_rows):
        raise InputError(f"--batch-size {settings.batch_size} is larger than the {len(train_rows)} training images; lower it")
    expected = {"flow_config": config.to_dict(), "labels": list(base.labels.labels) if base.labels else None,
                "data_fingerprint": data.fingerprint(), "settings": settings.numeric()}

    def check() -> dict[str, Any] | None:
        if not resume:
            check_new_run(out, force)
            return None
        state = read_run_state(out)
        check_resumable(out, state, expected)
        if state["step"] >= settings.steps:
            raise TrainingError(f"{out} already finished its {settings.steps} steps; start a new run to train more")
        return state

    with claimed_run(out, check) as state:
        start, seconds, wall_before = (state["step"], state["train_seconds"], state["wall_seconds"]) if state else (0, 0.0, 0.0)
        conditions = encode_conditions(base, data.captions)
        space = to_model_space(base, data, conditions)
        train_space = _subset(space, train_rows)
        heldout_space = _subset(space, heldout_rows) if len(heldout_rows) else None
        if resume:
            load_weights(model, out / LATEST / MODEL_FOLDER / "flow")
        else:
            start_run(out)
        optimizer = make_optimizer(model, settings)
        if resume:
            restore_optimizer(optimizer, model, out / LATEST / OPTIMIZER_FOLDER)
        step_fn = make_train_step(model, optimizer, settings.grad_clip)
        warmup = settings.warmup_steps if settings.warmup_steps is not None else len(train_rows) // settings.batch_size

        prompts = _sample_prompts(space)
        pipeline = base.pipeline()
        training = {
            "command": command, "parent": base.source, "data": data.source, "seed": settings.seed,
            "settings": settings.to_dict(), "warmup_steps_used": warmup, "training_images": len(train_rows),
            "heldout_images": len(heldout_rows), "skipped_images": len(data.skipped), "hardware": hardware(),
        }

        def evaluate() -> float | None:
            if heldout_space is None:
                return None
            return heldout_bits_per_dim(model, heldout_space, config.noise_std, settings.seed, settings.batch_size)

        def checkpoint(step: int, heldout: float | None) -> Path:
            wall = wall_before + time.perf_counter() - started
            state = {**expected, "step": step, "train_seconds": seconds, "wall_seconds": wall}
            record = {**training, "step": step, "train_seconds": round(seconds, 1), "wall_seconds": round(wall, 1),
                      **_bits_record(heldout, base.is_pixel_model)}
            return save_checkpoint(out, model, optimizer, state, record, base.source, base.labels, base.folder)

        def samples(step: int) -> Path:
            path = out / SAMPLES_FOLDER / f"step-{step:06d}.png"
            tiles = sample_images(pipeline, prompts, space.table[-1:], settings.seed, settings.sample_guidance)
            path.parent.mkdir(parents=True, exist_ok=True)
            grid = make_grid(list(tiles), columns=min(len(tiles), 8))
            save_png(Image.fromarray(grid.transpose(1, 2, 0)), path, {"step": str(step)}, overwrite=True)
            return path

        started = time.perf_counter()
        initial = evaluate()
        training["heldout_bits_per_dim_at_start"] = None if initial is None else round(initial, 4)
        if on_start is not None:
            on_start()
        for step in range(start, settings.steps):
            lr = learning_rate(step, settings.lr, settings.min_lr, warmup, settings.steps)
            optimizer.learning_rate = lr
            x, y = training_batch(train_space, config, settings, step)
            tick = time.perf_counter()
            loss, nll = step_fn(x, y)
            mx.eval(loss, nll, model.state, optimizer.state)
            seconds += time.perf_counter() - tick
            if not math.isfinite(loss.item()):
                raise TrainingError(f"the loss became {loss.item()} at step {step + 1}; lower the learning rate or the gradient clip")
            done = step + 1
            stop = should_stop() if should_stop else False
            last = done == settings.steps or stop
            heldout = None
            saved = sample_path = None
            if last or (settings.checkpoint_every and done % settings.checkpoint_every == 0):
                heldout = evaluate()
                saved = checkpoint(done, heldout)
            if settings.sample_every and (done % settings.sample_every == 0 or (last and not stop)):
                sample_path = samples(done)
            yield TrainProgress(done, settings.steps, loss.item(), bits_per_dim(nll).item(), lr, time.perf_counter() - started,
                                heldout, initial if step == start else None, saved, sample_path, stop)
            if stop:
                return


def _subset(space: ModelSpaceData, rows: np.ndarray) -> ModelSpaceData:
    take = mx.array(rows)
    stds = space.stds[take] if space.stds is not None else None
    return ModelSpaceData(space.means[take], stds, space.ids[rows], space.table, space.names)


def _sample_prompts(space: ModelSpaceData) -> mx.array:
    """Condition rows of the sample grid: every class or distinct caption, at most SAMPLE_LIMIT."""
    count = min(len(space.names), SAMPLE_LIMIT)
    return space.table[:count]


def _bits_record(heldout: float | None, pixel: bool) -> dict[str, Any]:
    if heldout is None:
        return {"heldout_bits_per_dim": None}
    record: dict[str, Any] = {"heldout_bits_per_dim": round(heldout, 4)}
    if pixel:
        record["heldout_bits_per_dim_8bit"] = round(heldout + LOG2_PIXEL_SCALE, 4)
        record["bits_per_dim_convention"] = ("continuous density of [-1, 1] pixels with the training noise added; "
                                             "the 8-bit figure adds log2(127.5) per dimension")
    else:
        record["bits_per_dim_convention"] = "continuous density of the scaled VAE latents (posterior means) with the training noise added"
    return record
