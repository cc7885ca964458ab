"""Prompts → images: the loaded model folder and the generation loop around the flow.

`load(folder)` reads a converted model folder (flow, condition encoder, VAE, optional
fine-tuned decoder) strictly. `StarFlowPipeline.iter_generate` encodes each distinct
condition once, then per batch samples the flow (yielding the flow's own progress), denoises
and decodes; it never prints, so any front end can draw the progress it yields. By default the
text encoder's weights are read for each encoding and released before sampling starts.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from . import editing, ranking
from .config import FlowConfig
from .errors import ConfigError, InputError
from .flow import SampleProgress, StarFlow
from .samplers import Sampler, default_sampler
from .image import GeneratedImage, decoded_to_pil
from .labels import LabelEncoder
from .model_folder import Condition, FlowNumerics, LazyTextEncoder, load_model_folder
from .model_io import read_parameters
from .text_encoder import TextEncoder
from .vae import VAE

MAX_SEED = 2**32 - 1
DENOISE_MODES = ("score", "decoder", "none")
ENCODE_CHUNK = 16
"""Distinct prompts per text-encoder call: bounds its activations when a prompt file is long."""
MAX_DEFAULT_BATCH = 8
"""The official sampling script's batch; more gains little once the weights are read per step."""
MEMORY_FRACTION = 0.6
"""Share of the machine's memory the default batch may plan for (the rest: OS, other apps)."""


@dataclass(frozen=True)
class GenerationProgress:
    """Where a generation stands. `phase` is encode, sample, denoise, decode or done.

    `done`/`total` count the phase's work in the current batch (tokens of the block being
    sampled, images denoised, decodes); `sample` is the flow's own progress while sampling;
    `images` the batch's results once decoded; `notes` what the user should know (a truncated
    prompt); `timings` the seconds spent per phase, on the final item.
    """

    phase: str
    batch: int
    num_batches: int
    done: int
    total: int
    elapsed: float
    sample: SampleProgress | None = None
    images: tuple[GeneratedImage, ...] = ()
    notes: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)


def check_seed(seed: int | None, count: int) -> int:
    """The first seed of a request of `count` images; seeds seed … seed+count-1 must lie in 0 … 2³²−1.

    None draws one at random, so the result can always be written down and reproduced.
    """
    if count < 1:
        raise InputError(f"the number of images must be at least 1, got {count}")
    last_first = MAX_SEED - (count - 1)
    if seed is None:
        return secrets.randbelow(last_first + 1)
    if not 0 <= seed <= last_first:
        raise InputError(
            f"seed {seed} is out of range: seeds are 0 … {MAX_SEED} and {count} image(s) use seed … seed+{count - 1}; "
            f"pick a seed from 0 to {last_first}"
        )
    return seed


def check_seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
    """The seed of each of `count` images: a sequence as given (one per image), an int as
    seed, seed+1, …, and None as a random first seed, so every image's seed can be written down.
    """
    if seed is None or not isinstance(seed, Sequence):
        first = check_seed(seed, count)
        return [first + i for i in range(count)]
    seeds = [int(value) for value in seed]
    if len(seeds) != count:
        raise InputError(f"{len(seeds)} seed(s) for {count} prompt(s); pass one seed per prompt, or one int for seeds seed, seed+1, …")
    for value in seeds:
        if not 0 <= value <= MAX_SEED:
            raise InputError(f"seed {value} is out of range: seeds are 0 … {MAX_SEED}")
    return seeds


def check_sampling(guidance: float, denoise_choice: str | None, denoise_lr: float = 1.0) -> None:
    """Refuse sampling settings no model can run, so a front end can check them before it
    fetches or loads one (a sampler checks its own settings when it is made).
    """
    if not (math.isfinite(guidance) and guidance >= 0):
        raise InputError(f"guidance (--guidance) must be 0 or more, got {guidance:g}; 0 turns guidance off")
    if not (math.isfinite(denoise_lr) and denoise_lr > 0):
        raise InputError(f"denoise_lr (--denoise-lr) must be a number above 0, got {denoise_lr:g}; 1 is the official score step")
    check_denoise_mode(denoise_choice)


def check_denoise_mode(denoise: str | None) -> None:
    """None (the model's default) or one of `DENOISE_MODES`."""
    if denoise is not None and denoise not in DENOISE_MODES:
        raise InputError(f"denoise (--denoise) must be one of {', '.join(DENOISE_MODES)}, not {denoise!r}")


def seeded_noise(seeds: Sequence[int], channels: int, height: int, width: int) -> mx.array:
    """(B, C, H, W) float32 noise, row i from NumPy's legacy generator seeded with seeds[i].

    The Swift package reproduces this generator, so a seed gives the same image everywhere.
    """
    rows = [np.random.RandomState(seed).standard_normal((1, channels, height, width)).astype(np.float32) for seed in seeds]
    return mx.array(np.concatenate(rows, axis=0))


def available_memory() -> int:
    """Bytes of memory generation may use: the GPU's recommended working set, else physical RAM."""
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_bytes(config: FlowConfig, tokens: int, rows: int, itemsize: int) -> int:
    """Bytes of the largest block's key/value cache for one image (`rows` = 2 with guidance)."""
    deepest = max(config.layers_per_block)
    length = config.txt_size + tokens
    return deepest * 2 * rows * length * config.channels * itemsize


def default_batch_size(config: FlowConfig, tokens: int, guidance: float, weight_bytes: int, memory: int) -> int:
    """Images per batch: what fits in 60 % of memory after the weights, from 1 to 8.

    Blocks run one after another and each frees its cache, so one image costs the largest
    block's KV cache (layers × K and V × rows × (text + image tokens) × width) plus, as margin,
    the same again for the step's activations and the latents.
    """
    itemsize = 4 if config.dtype == "float32" else 2
    per_image = 2 * kv_cache_bytes(config, tokens, 2 if guidance > 0 else 1, itemsize)
    budget = MEMORY_FRACTION * memory - weight_bytes
    return int(min(MAX_DEFAULT_BATCH, max(1, budget // per_image)))


def with_guidance(conditions: mx.array | None, empty: mx.array | None, guidance: float) -> mx.array | None:
    """The flow's condition rows: with guidance, the conditional rows then as many copies of
    the empty condition (1, T, D) for the unconditional branch; else the conditions as they are."""
    if conditions is None or guidance <= 0:
        return conditions
    return mx.concatenate([conditions, mx.broadcast_to(empty, conditions.shape)], axis=0)


def parameter_bytes(*modules) -> int:
    return sum(value.nbytes for module in modules if module is not None for _, value in tree_flatten(module.parameters()))


class StarFlowPipeline:
    """A loaded model folder: the flow, its condition encoder, and the VAE (or none, in pixel space).

    A `LazyTextEncoder` condition is released after every encoding (`encode`, `encode_distinct`),
    so sampling, denoising and decoding never hold its weights; `numerics` are the flow's
    switches, recorded in the images' metadata when on.
    """

    def __init__(self, flow: StarFlow, condition: Condition | None, vae: VAE | None, decoder: VAE | None, name: str,
                 numerics: FlowNumerics = FlowNumerics()):
        self.flow = flow
        self.condition = condition
        self.vae = vae
        self.decoder = decoder
        self.name = name
        self.numerics = numerics

    # ---- what the model accepts ------------------------------------------------------------

    @property
    def config(self) -> FlowConfig:
        return self.flow.config

    @property
    def is_conditional(self) -> bool:
        return self.flow.blocks[-1].has_text

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at."""
        return self.config.image_side, self.config.image_side

    @property
    def default_denoise(self) -> str:
        """The fine-tuned decoder when the folder has one (no score step), else the score step."""
        return "decoder" if self.decoder is not None else "score"

    def check_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        default_width, default_height = self.default_size
        width = default_width if width is None else width
        height = default_height if height is None else height
        step = self.config.size_multiple
        for name, value in (("width", width), ("height", height)):
            if value < step or value % step:
                nearest = f"{value // step * step} or {(value // step + 1) * step}" if value > step else str(step)
                raise InputError(
                    f"{name} {value} is not a positive multiple of {step} (VAE factor {self.config.vae_factor} × "
                    f"patch size {self.config.patch_size}); use {nearest}"
                )
        return width, height

    def check_denoise(self, denoise: str | None) -> str:
        """The denoise mode to use: the default for None, refused when this folder cannot do it."""
        check_denoise_mode(denoise)
        denoise = self.default_denoise if denoise is None else denoise
        if denoise == "decoder" and self.decoder is None:
            raise ConfigError(f"{self.name} has no fine-tuned decoder; use denoise 'score' or 'none', or convert with --decoder FILE")
        return denoise

    def check_prompts(self, prompts: Sequence[str]) -> list[str]:
        """Refuse prompts the model cannot take (an unknown class); return notes on the others."""
        if isinstance(self.condition, LabelEncoder):
            self.condition.ids(list(prompts))
            return []
        if isinstance(self.condition, (TextEncoder, LazyTextEncoder)):
            limit = self.config.txt_size
            notes = []
            unique = list(dict.fromkeys(prompts))
            for prompt, count in zip(unique, self.condition.count_tokens(unique)):
                if count > limit:
                    notes.append(f"prompt {_preview(prompt)!r} has {count} tokens; only the first {limit - 1} and </s> are used")
            return notes
        if any(prompt.strip() for prompt in prompts):
            return ["this model is unconditional: the prompt is ignored"]
        return []

    def suggested_batch_size(self, width: int, height: int, guidance: float) -> int:
        step = self.config.size_multiple
        tokens = (height // step) * (width // step)
        held_text = self.condition.encoder if isinstance(self.condition, TextEncoder) else None
        weights = parameter_bytes(self.flow, held_text, self.vae, self.decoder)
        return default_batch_size(self.config, tokens, guidance, weights, available_memory())

    # ---- stages ---------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str]) -> mx.array | None:
        """Condition states (B, T, D) float32, or None for an unconditional model; a lazy text
        encoder is released afterwards."""
        with self.text_encoder_released():
            return self._encode(prompts)

    def _encode(self, prompts: Sequence[str]) -> mx.array | None:
        if self.condition is None:
            return None
        if isinstance(self.condition, (TextEncoder, LazyTextEncoder)):
            return self.condition.encode(list(prompts), self.config.txt_size)
        return self.condition.encode(list(prompts))

    @contextlib.contextmanager
    def text_encoder_released(self) -> Iterator[None]:
        """Encode within the block; a lazy text encoder's weights are released at its end (also
        on an error), so what follows (sampling) never holds them. The flow's weights, left
        unread at load in that case, are read then, in place: the two never share memory."""
        try:
            yield
        finally:
            if isinstance(self.condition, LazyTextEncoder):
                self.condition.release()
                read_parameters(self.flow)

    def noise(self, seeds: Sequence[int], width: int, height: int) -> mx.array:
        factor = self.config.vae_factor
        return seeded_noise(seeds, self.config.in_channels, height // factor, width // factor)

    def denoised(self, samples: mx.array, conditions: mx.array | None, lr: float = 1.0) -> Iterator[mx.array]:
        """Each sample (1, C, H, W) after the flow's score step (scaled by `lr`), evaluated, under
        its own condition row.

        One image at a time: the score step's backward pass holds every layer's activations.
        """
        for i in range(samples.shape[0]):
            image = self.flow.denoise(samples[i : i + 1], None if conditions is None else conditions[i : i + 1], lr=lr)
            mx.eval(image)
            yield image

    def decode_pixels(self, samples: mx.array, fine_tuned: bool = False) -> mx.array:
        """Flow samples → pixels (B, 3, H, W), about [-1, 1], evaluated: through the VAE (or the
        fine-tuned decoder), or as they are for a pixel-space model."""
        decoder = self.decoder if fine_tuned else self.vae
        pixels = samples if decoder is None else decoder.decode(samples)
        mx.eval(pixels)
        return pixels

    def decode(self, samples: mx.array, fine_tuned: bool = False) -> list[Image.Image]:
        """Flow samples → RGB images."""
        return decoded_to_pil(self.decode_pixels(samples, fine_tuned))

    def score(self, images: mx.array, prompt: str | Sequence[str]) -> mx.array:
        """Bits per dimension of images (B, 3, H, W) in [-1, 1] under `prompt`: (B,) for one
        prompt, (B, P) for a list of P prompts (batched: `ranking.likelihood_matrix`)."""
        x = images if self.vae is None else self.vae.encode(images)
        if not isinstance(prompt, str):
            return ranking.likelihood_matrix(self, x, prompt)
        y = self.encode([prompt] * images.shape[0])
        return self.flow.bits_per_dim(x, y)

    # ---- generation -----------------------------------------------------------------------

    def encode_distinct(self, prompts: Sequence[str]) -> tuple[mx.array | None, list[int]]:
        """Each distinct prompt encoded once: the states (N, T, D) float32 (None for an
        unconditional model) and the row of each prompt in them."""
        distinct = list(dict.fromkeys(prompts))
        row = {prompt: index for index, prompt in enumerate(distinct)}
        rows = [row[prompt] for prompt in prompts]
        if self.condition is None:
            return None, rows
        chunks = []
        with self.text_encoder_released():
            for start in range(0, len(distinct), ENCODE_CHUNK):
                chunks.append(self._encode(distinct[start : start + ENCODE_CHUNK]))
                mx.eval(chunks[-1])
        return (chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=0)), rows

    def iter_generate(
        self,
        prompts: str | Sequence[str],
        seed: int | Sequence[int] | None = None,
        guidance: float = 3.6,
        sampler: Sampler | None = None,
        width: int | None = None,
        height: int | None = None,
        batch_size: int | None = None,
        denoise: str | None = None,
        noise: mx.array | None = None,
        denoise_lr: float = 1.0,
    ) -> Generator[GenerationProgress, None, None]:
        """One image per prompt, sampled `batch_size` at a time; yields progress, and the
        results with phase decode.

        `seed`: one per prompt (a sequence), or an int giving image i the seed seed + i, or
        None for a random first seed. `sampler`: `samplers.Jacobi()` (the official settings) or
        `samplers.Sequential()`; None picks `samplers.default_sampler()` for the backend (Jacobi
        on a GPU, sequential on the CPU); an image depends on its prompt, seed and settings only, unless
        `Jacobi(coupled=True)` couples the convergence of a batch as the official sampler does.
        `noise` (one row per prompt, at the size asked for) replaces the seeded noise; the seeds
        then only label the images. `denoise_lr` scales the score step (official
        `--self_denoising_lr`; 1, the default, is the Tweedie step).
        """
        check_sampling(guidance, denoise, denoise_lr)
        sampler = sampler or default_sampler()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = check_seeds(seed, len(prompts))
        width, height = self.check_size(width, height)
        denoise = self.check_denoise(denoise)
        notes = self.check_prompts(prompts)
        if noise is not None:
            self.check_noise_shape(noise, len(prompts), width, height)
        if not self.is_conditional:
            guidance = 0.0
        if batch_size is None:
            batch_size = self.suggested_batch_size(width, height, guidance)
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        num_batches = math.ceil(len(prompts) / batch_size)
        timings = {"encode": 0.0, "sample": 0.0, "denoise": 0.0, "decode": 0.0}
        started = time.perf_counter()

        def report(phase: str, batch: int, done: int, total: int, **extra) -> GenerationProgress:
            return GenerationProgress(phase, batch, num_batches, done, total, time.perf_counter() - started, **extra)

        mark = time.perf_counter()
        states, rows = self.encode_distinct([*prompts, ""] if guidance > 0 else prompts)
        timings["encode"] += time.perf_counter() - mark
        yield report("encode", 0, 1, 1, notes=tuple(notes))

        for batch in range(num_batches):
            lo, hi = batch * batch_size, min(len(prompts), (batch + 1) * batch_size)
            batch_seeds = seeds[lo:hi]
            conditions = None if states is None else states[mx.array(rows[lo:hi])]
            y = with_guidance(conditions, None if states is None else states[rows[-1] : rows[-1] + 1], guidance)

            mark = time.perf_counter()
            batch_noise = self.noise(batch_seeds, width, height) if noise is None else noise[lo:hi]
            for progress in self.flow.iter_sample(batch_noise, y, guidance, sampler):
                if progress.output is not None:
                    samples = progress.output
                yield report("sample", batch, progress.tokens_done, progress.tokens_total, sample=progress)
            timings["sample"] += time.perf_counter() - mark

            if denoise == "score":
                denoised = []
                mark = time.perf_counter()
                for image in self.denoised(samples, conditions, denoise_lr):
                    denoised.append(image)
                    timings["denoise"] += time.perf_counter() - mark
                    yield report("denoise", batch, len(denoised), hi - lo)
                    mark = time.perf_counter()
                samples = mx.concatenate(denoised, axis=0)

            yield report("decode", batch, 0, 1)
            mark = time.perf_counter()
            pictures = self.decode(samples, fine_tuned=denoise == "decoder")
            timings["decode"] += time.perf_counter() - mark
            settings = {
                "guidance": f"{guidance:g}",
                "sampler": sampler.describe(),
                "denoise": denoise,
                "size": f"{width}x{height}",
                "batch_seeds": ",".join(map(str, batch_seeds)),
                "model": self.name,
                "dtype": self.config.dtype + (f" q{self.config.quantization['bits']}" if self.config.quantization else ""),
                "software": _software(),
                **({"noise": "given"} if noise is not None else {}),
                **({"denoise_lr": f"{denoise_lr:g}"} if denoise == "score" and denoise_lr != 1.0 else {}),
                **self.numerics.metadata(),
            }
            results = []
            for offset, picture in enumerate(pictures):
                metadata = {"prompt": prompts[lo + offset], "seed": str(batch_seeds[offset]), **settings}
                picture.info.update(metadata)
                results.append(GeneratedImage(picture, prompts[lo + offset], batch_seeds[offset], metadata))
            yield report("decode", batch, 1, 1, images=tuple(results))

        yield report("done", num_batches - 1, 1, 1, timings=timings)

    def generate(self, prompts: str | Sequence[str], seed: int | Sequence[int] | None = None, **settings: Any) -> list[Image.Image]:
        """One image per prompt; seeds and the other settings (keywords) as in `iter_generate`.

        The images carry their settings in `image.info`. Defaults are the official script's:
        guidance 3.6, Jacobi (block 16, threshold 1e-3, 32 iterations; sequential decoding on
        MLX's CPU backend, where it is faster: `samplers.default_sampler`), the training size,
        score-step denoising unless the folder has a fine-tuned decoder, and a batch size
        chosen to fit memory (`default_batch_size`).
        """
        images = []
        for progress in self.iter_generate(prompts, seed, **settings):
            images += [result.image for result in progress.images]
        return images

    # ---- inversion and likelihood (mlx_starflow.editing, mlx_starflow.ranking) ---------------

    def check_noise_shape(self, noise: mx.array, count: int, width: int, height: int) -> None:
        """Given noise must have one row per prompt and the latent shape of the size asked for."""
        factor = self.config.vae_factor
        expected = (count, self.config.in_channels, height // factor, width // factor)
        if tuple(noise.shape) != expected:
            raise InputError(f"noise of shape {list(noise.shape)} does not fit {count} image(s) of {width}x{height}; "
                             f"it must be {list(expected)}")

    def invert(self, images: Sequence[editing.ImageLike], prompts: Sequence[str], width: int | None = None,
               height: int | None = None) -> editing.Inversion:
        """Images → the noise that samples back to each under its prompt (unguided)."""
        return editing.invert(self, images, prompts, width, height)

    def edit(self, image: editing.ImageLike, prompt: str, source_prompt: str = "", **options: Any) -> GeneratedImage:
        """Invert under `source_prompt`, re-sample under `prompt` (options: `editing.edit`)."""
        return editing.edit(self, image, prompt, source_prompt, **options)

    def vary(self, image: editing.ImageLike, prompt: str = "", count: int = 4, strength: float = 0.3,
             **options: Any) -> list[GeneratedImage]:
        """Variations: the inverted noise mixed with fresh noise (options: `editing.vary`)."""
        return editing.vary(self, image, prompt, count, strength, **options)

    def interpolate(self, prompt: str, steps: int, **options: Any) -> list[GeneratedImage]:
        """Images along the path between two seeds or two images (options: `editing.interpolate`)."""
        return editing.interpolate(self, prompt, steps, **options)

    def rank(self, image: editing.ImageLike, captions: Sequence[str], **options: Any) -> list[ranking.RankedCaption]:
        """Captions ordered by the image's likelihood under each (options: `ranking.rank`)."""
        return ranking.rank(self, image, captions, **options)


def _software() -> str:
    try:
        return f"mlx-starflow {version('mlx-starflow')}"
    except PackageNotFoundError:
        return "mlx-starflow"


def _preview(prompt: str, limit: int = 40) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"


def load(path: str | Path, keep_text_encoder: bool = False, bfloat16_rope: bool = False,
         float32_compute: bool = False) -> StarFlowPipeline:
    """Load a converted model folder (`starflow convert`, or the first run of `starflow generate`).

    The top manifest and every component's are checked first, so a half-written, stale or
    incompatible folder is an error naming the fix, never a model with missing parts.

    `keep_text_encoder=False` (the default, and the CLI's) reads the text encoder's weights for
    each encoding and releases them before sampling, so they never add to the peak (flan-t5-xl
    in float32 is 4.9 GB); every `generate` call then reads them again. `True` loads them now
    and keeps them, for repeated calls when memory allows. `bfloat16_rope` and
    `float32_compute`: see `load_flow`; both off by default, recorded in the metadata when on.
    """
    numerics = FlowNumerics(bfloat16_rope, float32_compute)
    parts = load_model_folder(path, lazy_text_encoder=not keep_text_encoder, numerics=numerics)
    return StarFlowPipeline(parts.flow, parts.condition, parts.vae, parts.decoder, parts.folder.name, numerics)
