"""The SD-VAE (diffusers `AutoencoderKL`) in MLX, with STARFlow's latent scaling around it.

Convolutions run channels-last (NHWC) inside the modules; `VAE.encode` and `VAE.decode` take
and return NCHW like the rest of the project. Parameter names are our own and are fixed once,
at conversion (`convert/maps/vae.py`).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import VAEConfig
from .errors import ConfigError
from .model_io import load_weights, read_manifest

GROUP_NORM_EPS = 1e-6
"""diffusers hard-codes this epsilon for every AutoencoderKL norm; 1e-5 visibly shifts outputs."""

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
"""diffusers clamps the posterior log-variance to this range before taking exp."""


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    """GroupNorm over consecutive channel groups, as PyTorch groups them (not channel % groups)."""
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS, pytorch_compatible=True)


def upsample_nearest(x: mx.array) -> mx.array:
    """Repeat every pixel of an NHWC map into a 2×2 square."""
    b, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


class ResnetBlock(nn.Module):
    """Norm–SiLU–conv twice plus a skip (1×1 conv when the width changes); no time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        skip = self.shortcut(x) if "shortcut" in self else x
        return skip + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels, scaled by 1/sqrt(C), with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(groups, channels)
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, 1, h * w, c)
        q, k, v = self.query(tokens), self.key(tokens), self.value(tokens)
        attended = mx.fast.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
        return x + self.out(attended).reshape(b, h, w, c)


class MidBlock(nn.Module):
    """Resnet, optional attention, resnet: the bottleneck of both encoder and decoder."""

    def __init__(self, channels: int, groups: int, with_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups) for _ in range(2)]
        if with_attention:
            self.attention = SpatialSelfAttention(channels, groups)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attention" in self:
            x = self.attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one row and column at the bottom/right only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(upsample_nearest(x))


class EncoderStage(nn.Module):
    """Resnets at one resolution, then a downsample unless it is the last stage."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = [ResnetBlock(widths[j], out_channels, groups) for j in range(layers)]
        if downsample:
            self.downsample = Downsample(out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsample(x) if "downsample" in self else x


class DecoderStage(nn.Module):
    """Resnets at one resolution, then an upsample unless it is the last stage."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = [ResnetBlock(widths[j], out_channels, groups) for j in range(layers)]
        if upsample:
            self.upsample = Upsample(out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsample(x) if "upsample" in self else x


class Encoder(nn.Module):
    """Image (NHWC) → posterior moments before `quant_conv`: 2·latent_channels maps, 8× smaller."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.stages = [
            EncoderStage(widths[max(i - 1, 0)], widths[i], config.layers_per_block, groups, i < len(widths) - 1)
            for i in range(len(widths))
        ]
        self.mid = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.norm_out = group_norm(groups, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for stage in self.stages:
            x = stage(x)
        x = self.mid(x)
        return self.conv_out(nn.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latent (NHWC, after `post_quant_conv`) → image. Stage 0 runs first, at the latent resolution."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.stages = [
            DecoderStage(widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups, i < len(widths) - 1)
            for i in range(len(widths))
        ]
        self.norm_out = group_norm(groups, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.mid(self.conv_in(x))
        for stage in self.stages:
            x = stage(x)
        return self.conv_out(nn.silu(self.norm_out(x)))


def nchw_to_nhwc(x: mx.array) -> mx.array:
    return x.transpose(0, 2, 3, 1)


def nhwc_to_nchw(x: mx.array) -> mx.array:
    return x.transpose(0, 3, 1, 2)


class VAE(nn.Module):
    """STARFlow's view of the SD-VAE: latents are scaled by `scaling_factor`, there is no shift.

    Images are NCHW in [-1, 1]; latents are NCHW in the flow's scaled space. Weights may be
    float16/bfloat16; inputs are cast to them and results come back float32, and the scaling
    and sampling arithmetic runs in float32.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        if config.has_encoder:
            self.encoder = Encoder(config)
            if config.use_quant_conv:
                self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.decoder = Decoder(config)

    @property
    def weight_dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    def latent_distribution(self, images: mx.array) -> tuple[mx.array, mx.array]:
        """Unscaled posterior mean and clamped log-variance (NCHW, float32) of images in [-1, 1]."""
        if not self.config.has_encoder:
            raise ConfigError("this VAE folder holds only a decoder; load the base vae/ folder to encode images")
        moments = self.encoder(nchw_to_nhwc(images.astype(self.weight_dtype)))
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        moments = nhwc_to_nchw(moments).astype(mx.float32)
        mean, logvar = mx.split(moments, 2, axis=1)
        return mean, mx.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def encode(
        self,
        images: mx.array,
        *,
        sample: bool = False,
        key: mx.array | None = None,
        noise: mx.array | None = None,
    ) -> mx.array:
        """Images → scaled latents: the posterior mean, or with `sample` a draw `mean + std·noise`.

        The official encoder samples; the mean is the deterministic choice for likelihoods and
        tests. The noise is `noise` when given, else drawn from `key` (MLX's global generator
        when `key` is None).
        """
        if not sample and (noise is not None or key is not None):
            raise ValueError("noise and key only apply when sample=True")
        mean, logvar = self.latent_distribution(images)
        if not sample:
            return mean * self.config.scaling_factor
        if noise is None:
            noise = mx.random.normal(mean.shape, key=key)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise has shape {list(noise.shape)}, the latents have {list(mean.shape)}")
        std = mx.exp(0.5 * logvar)
        return (mean + std * noise.astype(mx.float32)) * self.config.scaling_factor

    def decode(self, latents: mx.array) -> mx.array:
        """Scaled latents → raw decoder output (NCHW, float32), unclamped like the official decode."""
        z = (latents.astype(mx.float32) / self.config.scaling_factor).astype(self.weight_dtype)
        z = nchw_to_nhwc(z)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return nhwc_to_nchw(self.decoder(z)).astype(mx.float32)


def load_vae(folder: str | Path) -> VAE:
    """Load a converted VAE folder, full or decoder-only, strictly (every weight, nothing extra)."""
    read_manifest(folder)
    vae = VAE(VAEConfig.load(folder))
    load_weights(vae, folder)
    return vae
