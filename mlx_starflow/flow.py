"""The STARFlow model: a stack of autoregressive flow blocks over patchified latents.

`forward` is the likelihood direction (latent → noise, blocks 0…K-1), `sample` the generative
direction (noise → latent, deep block first), `denoise` the official score step. Latents, noise
and samples are NCHW; tokens inside are (B, H/p, W/p, C·p²).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .block_runner import BlockRunner, MLXBlockRunner
from .config import FlowConfig
from .flow_block import FlowBlock
from .model_io import load_weights, read_manifest
from .quantization import quantize_flow
from .rope import rope_tables
from .samplers import BlockProgress, JacobiChunk, Sampler, Sequential
from .sampling import bits_per_dim, guided_gaussian, nll_per_sample, scale_from_logit, whiten
from .token_layout import TokenLayout
from .backend_compute import arrange_for_backend


@dataclass(frozen=True)
class SampleProgress:
    """Where sampling stands; `output` is set once a block is done (its result, NCHW)."""

    block: int
    stage: int
    num_stages: int
    tokens_done: int
    tokens_total: int
    passes: int
    elapsed: float
    chunk: JacobiChunk | None = None
    output: mx.array | None = None


def _as_float32(x) -> mx.array:
    return x.astype(mx.float32) if isinstance(x, mx.array) else mx.array(np.asarray(x, dtype=np.float32))


def iter_blocks(
    runners: Sequence[tuple[int, BlockRunner]],
    layout: TokenLayout,
    noise: mx.array,
    y: mx.array | None,
    guidance: float,
    sampler: Sampler,
    use_softplus: bool,
) -> Generator[SampleProgress, None, None]:
    """The block loop: invert each (index, runner) in the order given, yielding after every pass.

    Guidance applies to the blocks that read text; y then holds conditional rows followed by
    unconditional rows (2B rows for B noise rows), and such a block runs every noise row
    twice. Each block's result arrives as the `output` (NCHW) of its last progress item.
    """
    B, count = noise.shape[0], layout.token_count
    tokens = layout.tokens(noise)
    started = time.perf_counter()
    for stage, (index, runner) in enumerate(runners):
        weight = guidance if runner.has_text else 0.0
        z = layout.ordered(tokens, runner.flipped)
        if weight > 0:
            z = mx.concatenate([z, z], axis=0)
        runner.start(z.shape[0], y if runner.has_text else None)
        loop = sampler.invert(runner, z, weight, use_softplus)
        while True:
            try:
                progress: BlockProgress = next(loop)
            except StopIteration as finished:
                x_rows = finished.value
                break
            yield SampleProgress(index, stage, len(runners), progress.tokens_done, count, progress.passes,
                                 time.perf_counter() - started, progress.chunk)
        tokens = layout.ordered(x_rows[:B], runner.flipped)
        mx.eval(tokens)
        yield SampleProgress(index, stage, len(runners), count, count, progress.passes,
                             time.perf_counter() - started, None, layout.latent(tokens))


class StarFlow(nn.Module):
    def __init__(self, config: FlowConfig, bfloat16_rope: bool = False):
        """`bfloat16_rope` rounds RoPE angles to bfloat16 in both directions, as the official
        GPU sampler does (off: exact angles, as the official float32 code)."""
        super().__init__()
        self.config = config
        self.bfloat16_rope = bfloat16_rope
        last = config.num_blocks - 1
        self.blocks = [
            FlowBlock(config, layers, config.block_is_flipped(i), config.txt_dim if i == last else 0)
            for i, layers in enumerate(config.layers_per_block)
        ]

    # ---- layout ---------------------------------------------------------------------------

    def layout(self, x: mx.array, name: str = "latent") -> TokenLayout:
        """The token layout of a (B, C, H, W) latent, checked against the model."""
        p, C = self.config.patch_size, self.config.in_channels
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"{name} must be (B, {C}, H, W) with H and W multiples of {p}, got {tuple(x.shape)}")
        return TokenLayout.of(x, p)

    def _check_text(self, y, rows: int) -> mx.array | None:
        if not self.blocks[-1].has_text:
            return None
        if y is None:
            raise ValueError("this model is conditioned: pass y, the (B, T, D) condition states")
        y = _as_float32(y)
        D = self.config.txt_dim
        if y.ndim != 3 or y.shape[0] != rows or y.shape[2] != D:
            raise ValueError(f"y must be ({rows}, T, {D}), got {tuple(y.shape)}")
        return y

    def rope(self, layout: TokenLayout, text_length: int) -> tuple[mx.array, mx.array]:
        """cos/sin tables for one block's sequence: `text_length` prefix tokens, then the image."""
        c = self.config
        return rope_tables(layout, text_length, c.pt_seq_len, c.head_dim, c.rope_theta, c.txt_size > 0, self.bfloat16_rope)

    def _rope(self, h: int, w: int, text_length: int) -> tuple[mx.array, mx.array]:
        """The tables for an h×w token grid (patch 1 layout), as the graph tests build them."""
        return self.rope(TokenLayout(self.config.token_channels, h, w, 1), text_length)

    # ---- likelihood direction -------------------------------------------------------------

    def forward(self, x, y=None, guidance: float = 0.0, return_sequence: bool = False, checkpoint: bool = False):
        """Latent x (B,C,H,W) → (z, logdets[, outputs]).

        logdets: one (B, N, C·p²) array per block, in that block's token order. outputs: the
        patchified input and every block's output, (B, H/p, W/p, C·p²). With guidance > 0, y has
        conditional rows then unconditional rows and x as many rows (or half, then duplicated);
        the deep block's Gaussians are guided, as the official guided forward. `checkpoint`
        recomputes activations in the backward pass, for gradients with less memory.
        """
        x = _as_float32(x)
        layout = self.layout(x, "x")
        if guidance > 0:
            if y is None or y.shape[0] % 2:
                raise ValueError("guidance needs y with conditional rows then unconditional rows (2B rows)")
            if x.shape[0] * 2 == y.shape[0]:
                x = mx.concatenate([x, x], axis=0)
        y = self._check_text(y, x.shape[0])
        tokens = layout.tokens(x)
        outputs, logdets = [layout.grid(x)], []
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            text = y if block.has_text else None
            cos, sin = self.rope(layout, text.shape[1] if text is not None else 0)
            rows = layout.ordered(tokens, block.flipped)
            a, mu = block(rows, text, cos, sin, checkpoint)
            sigma = scale_from_logit(a, self.config.use_softplus)
            if index == last and guidance > 0:
                mu, sigma = guided_gaussian(mu, sigma, guidance)
            z_rows, logdet = whiten(rows, mu, sigma)
            tokens = layout.ordered(z_rows, block.flipped)
            outputs.append(tokens.reshape(x.shape[0], layout.grid_height, layout.grid_width, layout.token_channels))
            logdets.append(logdet)
        z = layout.latent(tokens)
        return (z, logdets, outputs) if return_sequence else (z, logdets)

    def nll(self, x, y=None, checkpoint: bool = False) -> mx.array:
        """The official loss per sample (nats per dimension, without ½·ln 2π), on x as given."""
        z, logdets = self.forward(x, y, checkpoint=checkpoint)
        return nll_per_sample(z, logdets)

    def bits_per_dim(self, x, y=None) -> mx.array:
        """Exact negative log-likelihood of x per latent dimension, in bits, per sample (B,)."""
        return bits_per_dim(self.nll(x, y))

    def denoise(self, x, y=None, noise_std: float | None = None, lr: float = 1.0) -> mx.array:
        """One score step x + lr·σ²·∇ log p(x) (official `self_denoise`), with the conditional rows of y.

        The flow was trained on latents with Gaussian noise of std σ (the config's noise_std);
        this Tweedie step removes it before decoding. `lr` scales the step (official
        `--self_denoising_lr`, default 1: the Tweedie step itself).
        """
        sigma = self.config.noise_std if noise_std is None else noise_std
        x = _as_float32(x)
        if y is not None and y.shape[0] == 2 * x.shape[0]:
            y = y[: x.shape[0]]
        dims = math.prod(x.shape[1:])

        def total_nll(latent: mx.array) -> mx.array:
            return mx.sum(self.nll(latent, y, checkpoint=True)) * dims

        return x - lr * sigma**2 * mx.grad(total_nll)(x)

    # ---- sampling direction ---------------------------------------------------------------

    def runners(
        self, layout: TokenLayout, text_length: int, compiled: bool = True, attn_temp: float = 1.0
    ) -> list[tuple[int, MLXBlockRunner]]:
        """Every block's runner, in sampling order (deep block first); the deep block reads
        `text_length` text states."""
        runners = []
        for index in reversed(range(len(self.blocks))):
            block = self.blocks[index]
            prefix = text_length if block.has_text else 0
            cos, sin = self.rope(layout, prefix)
            runners.append((index, MLXBlockRunner(block, cos, sin, prefix, layout.token_count, compiled, attn_temp)))
        return runners

    def iter_sample(
        self, noise, y=None, guidance: float = 0.0, sampler: Sampler = Sequential(), compiled: bool = True
    ) -> Generator[SampleProgress, None, None]:
        """Sample block by block, deep block first, yielding after every model pass.

        Guidance applies to the deep block only; y then holds conditional rows followed by
        unconditional rows (2B rows for B noise rows). Each block's result arrives as the
        `output` of its last progress item. `sampler` is a `samplers.Sequential` or `Jacobi`.
        """
        noise = _as_float32(noise)
        layout = self.layout(noise, "noise")
        y = self._check_text(y, 2 * noise.shape[0] if guidance > 0 else noise.shape[0])
        runners = self.runners(layout, 0 if y is None else y.shape[1], compiled, sampler.attn_temp)
        yield from iter_blocks(runners, layout, noise, y, guidance, sampler, self.config.use_softplus)

    def sample(self, noise, y=None, guidance: float = 0.0, sampler: Sampler = Sequential(),
               return_sequence: bool = False, compiled: bool = True):
        """Noise (B,C,H,W) → sample; with return_sequence, [noise, after each block…] as the official."""
        sequence = [_as_float32(noise)]
        for progress in self.iter_sample(noise, y, guidance, sampler, compiled):
            if progress.output is not None:
                sequence.append(progress.output)
        return sequence if return_sequence else sequence[-1]


def load_flow(path: str | Path, bfloat16_rope: bool = False, float32_compute: bool = False, evaluate: bool = True) -> StarFlow:
    """Load a converted flow folder, or the `flow/` component of a model folder.

    `bfloat16_rope`: see `StarFlow`. `float32_compute` runs a float16/bfloat16 model in float32
    (its weights keep their rounded values, in twice the memory): on the fixtures' bfloat16
    checkpoint this halves the distance to the float32 samples, as the official sampler's
    float32 autocast computes. `evaluate=False` leaves the weights unread until first use;
    read them with `model_io.read_parameters`, one at a time, since a weight moved to another
    layout (`backend_compute`, which arranges the linears for the backend) holds its read and
    its copy until evaluated.
    """
    folder = Path(path)
    if (folder / "flow").is_dir():
        folder = folder / "flow"
    read_manifest(folder)
    config = FlowConfig.load(folder)
    model = StarFlow(config, bfloat16_rope)
    if config.quantization:
        quantize_flow(model, **config.quantization)
    load_weights(model, folder, evaluate)
    if float32_compute:
        model.set_dtype(mx.float32)
    arrange_for_backend(model, evaluate)
    model.eval()
    return model

