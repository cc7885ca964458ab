"""The STARFlow model: a stack of autoregressive flow blocks over patchified latents.

`forward` is the likelihood direction (latent → noise, blocks 0…K-1), `sample` the generative
direction (noise → latent, deep block first), `denoise` the official score step. Latents, noise
and samples are NCHW; tokens inside are (B, H/p, W/p, C·p²).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import FlowConfig
from .flow_block import FlowBlock
from .inversion import BlockProgress, JacobiChunk, invert_jacobi, invert_sequential
from .kv_cache import KVCache
from .model_io import load_weights, read_manifest
from .quantization import quantize_flow
from .rope import rope_tables
from .sampling import bits_per_dim, guided_gaussian, nll_per_sample, scale_from_logit, whiten


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


def patchify(x: mx.array, patch: int) -> mx.array:
    """(B, C, H, W) → (B, H/p, W/p, p·p·C), packing (p1, p2, c) as the official rearrange."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(B, H // patch, W // patch, patch * patch * C)


def unpatchify(tokens: mx.array, patch: int, channels: int) -> mx.array:
    """The inverse of `patchify`: (B, h, w, p·p·C) → (B, C, h·p, w·p)."""
    B, h, w, _ = tokens.shape
    x = tokens.reshape(B, h, w, patch, patch, channels).transpose(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, h * patch, w * patch)


def _as_float32(x) -> mx.array:
    return x.astype(mx.float32) if isinstance(x, mx.array) else mx.array(np.asarray(x, dtype=np.float32))


class StarFlow(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        last = config.num_blocks - 1
        self.blocks = [
            FlowBlock(config, layers, config.block_is_flipped(i), config.txt_dim if i == last else 0)
            for i, layers in enumerate(config.layers_per_block)
        ]

    # ---- layout ---------------------------------------------------------------------------

    def patchify(self, x: mx.array) -> mx.array:
        return patchify(x, self.config.patch_size)

    def unpatchify(self, tokens: mx.array) -> mx.array:
        return unpatchify(tokens, self.config.patch_size, self.config.in_channels)

    def _check_latent(self, x: mx.array, name: str) -> None:
        p, C = self.config.patch_size, self.config.in_channels
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"{name} must be (B, {C}, H, W) with H and W multiples of {p}, got {tuple(x.shape)}")

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

    def _rope(self, h: int, w: int, text_length: int) -> tuple[mx.array, mx.array]:
        c = self.config
        return rope_tables(h, w, text_length, c.pt_seq_len, c.head_dim, c.rope_theta, c.txt_size > 0)

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
        self._check_latent(x, "x")
        if guidance > 0:
            if y is None or y.shape[0] % 2:
                raise ValueError("guidance needs y with conditional rows then unconditional rows (2B rows)")
            if x.shape[0] * 2 == y.shape[0]:
                x = mx.concatenate([x, x], axis=0)
        y = self._check_text(y, x.shape[0])
        tokens = self.patchify(x)
        B, h, w, channels = tokens.shape
        outputs, logdets = [tokens], []
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            text = y if block.has_text else None
            cos, sin = self._rope(h, w, text.shape[1] if text is not None else 0)
            rows = block.order(tokens.reshape(B, h * w, channels))
            a, mu = block(rows, text, cos, sin, checkpoint)
            sigma = scale_from_logit(a, self.config.use_softplus)
            if index == last and guidance > 0:
                mu, sigma = guided_gaussian(mu, sigma, guidance)
            z_rows, logdet = whiten(rows, mu, sigma)
            tokens = block.order(z_rows).reshape(B, h, w, channels)
            outputs.append(tokens)
            logdets.append(logdet)
        z = self.unpatchify(tokens)
        return (z, logdets, outputs) if return_sequence else (z, logdets)

    def nll(self, x, y=None, checkpoint: bool = False) -> mx.array:
        """The official loss per sample (nats per dimension, without ½·ln 2π), on x as given."""
        z, logdets = self.forward(x, y, checkpoint=checkpoint)
        return nll_per_sample(z, logdets)

    def bits_per_dim(self, x, y=None) -> mx.array:
        """Exact negative log-likelihood of x per latent dimension, in bits, per sample (B,)."""
        return bits_per_dim(self.nll(x, y))

    def denoise(self, x, y=None, noise_std: float | None = None) -> mx.array:
        """One score step x + σ²·∇ log p(x) (official `self_denoise`), with the conditional rows of y.

        The flow was trained on latents with Gaussian noise of std σ (the config's noise_std);
        this Tweedie step removes it before decoding.
        """
        sigma = self.config.noise_std if noise_std is None else noise_std
        x = _as_float32(x)
        if y is not None and y.shape[0] == 2 * x.shape[0]:
            y = y[: x.shape[0]]
        dims = math.prod(x.shape[1:])

        def total_nll(latent: mx.array) -> mx.array:
            return mx.sum(self.nll(latent, y, checkpoint=True)) * dims

        return x - sigma**2 * mx.grad(total_nll)(x)

    # ---- sampling direction ---------------------------------------------------------------

    def _make_step(self, block: FlowBlock, cos: mx.array, sin: mx.array, compiled: bool):
        def step(inputs: mx.array, position: mx.array, keys: list, values: list):
            cache = KVCache(list(keys), list(values))
            a, b = block.step(inputs, position, cos, sin, cache)
            return a, b, cache.keys, cache.values

        return mx.compile(step) if compiled else step

    def iter_sample(
        self,
        noise,
        y=None,
        guidance: float = 0.0,
        jacobi: bool = False,
        jacobi_block_size: int = 16,
        jacobi_threshold: float = 1e-3,
        jacobi_max_iter: int = 32,
        compiled: bool = True,
    ) -> Generator[SampleProgress, None, None]:
        """Sample block by block, deep block first, yielding after every model pass.

        Guidance applies to the deep block only; y then holds conditional rows followed by
        unconditional rows (2B rows for B noise rows). Each block's result arrives as the
        `output` of its last progress item.
        """
        noise = _as_float32(noise)
        self._check_latent(noise, "noise")
        if jacobi and (jacobi_block_size < 1 or jacobi_max_iter < 1):
            raise ValueError("jacobi_block_size and jacobi_max_iter must be at least 1")
        B = noise.shape[0]
        y = self._check_text(y, 2 * B if guidance > 0 else B)
        tokens = self.patchify(noise)
        _, h, w, channels = tokens.shape
        count = h * w
        started = time.perf_counter()
        stages = list(reversed(range(len(self.blocks))))
        for stage, index in enumerate(stages):
            block = self.blocks[index]
            text = y if block.has_text else None
            weight = guidance if text is not None else 0.0
            prefix = text.shape[1] if text is not None else 0
            z = block.order(tokens.reshape(B, count, channels))
            if weight > 0:
                z = mx.concatenate([z, z], axis=0)
            cos, sin = self._rope(h, w, prefix)
            cache = block.make_cache(z.shape[0], prefix + count)
            if text is not None:
                block.prefill(text, cos, sin, cache)
            step = self._make_step(block, cos, sin, compiled)
            if jacobi:
                loop = invert_jacobi(
                    block.sos, z, step, cache, prefix, weight, self.config.use_softplus,
                    jacobi_block_size, jacobi_threshold, jacobi_max_iter,
                )
            else:
                loop = invert_sequential(block.sos, z, step, cache, prefix, weight, self.config.use_softplus)
            while True:
                try:
                    progress: BlockProgress = next(loop)
                except StopIteration as finished:
                    x_rows = finished.value
                    break
                yield SampleProgress(index, stage, len(stages), progress.tokens_done, count, progress.passes,
                                     time.perf_counter() - started, progress.chunk)
            tokens = block.order(x_rows[:B]).reshape(B, h, w, channels)
            mx.eval(tokens)
            yield SampleProgress(index, stage, len(stages), count, count, progress.passes,
                                 time.perf_counter() - started, None, self.unpatchify(tokens))

    def sample(self, noise, y=None, guidance: float = 0.0, jacobi: bool = False, jacobi_block_size: int = 16,
               jacobi_threshold: float = 1e-3, jacobi_max_iter: int = 32, return_sequence: bool = False,
               compiled: bool = True):
        """Noise (B,C,H,W) → sample; with return_sequence, [noise, after each block…] as the official."""
        sequence = [_as_float32(noise)]
        for progress in self.iter_sample(noise, y, guidance, jacobi, jacobi_block_size, jacobi_threshold,
                                         jacobi_max_iter, compiled):
            if progress.output is not None:
                sequence.append(progress.output)
        return sequence if return_sequence else sequence[-1]


def load_flow(path: str | Path) -> StarFlow:
    """Load a converted flow folder, or the `flow/` component of a model folder."""
    folder = Path(path)
    if (folder / "flow").is_dir():
        folder = folder / "flow"
    read_manifest(folder)
    config = FlowConfig.load(folder)
    model = StarFlow(config)
    if config.quantization:
        quantize_flow(model, **config.quantization)
    load_weights(model, folder)
    model.eval()
    return model

