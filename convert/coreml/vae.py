"""`VAEDecoder.mlpackage` and the optional `VAEEncoder.mlpackage` (SD-VAE, NCHW).

The decoder takes the *unscaled* latent (the flow's latent divided by `scaling_factor`, which
the manifest gives to the caller) and returns the raw decoder image, unclamped, like
`mlx_starflow.vae.VAE.decode`; clamping and the uint8 mapping are the caller's. The encoder
takes an image in [-1, 1] and returns the scaled posterior mean, the flow's latent.
"""

from __future__ import annotations

import numpy as np

from mlx_starflow.vae import GROUP_NORM_EPS, VAE

from .builder import Ops, build_program, tensor_spec
from .coremltools_api import Program, Var, mb
from .weights import Weights, module_arrays

LATENT, IMAGE = "latent", "image"


class VAEGraph:
    """The SD-VAE modules as MIL, reading our converted parameter names."""

    def __init__(self, ops: Ops, vae: VAE):
        self.ops = ops
        self.groups = vae.config.norm_num_groups
        arrays = module_arrays(vae)
        self.w = Weights(ops, {k: _nchw_kernel(v) if v.ndim == 4 else v for k, v in arrays.items()})

    def conv(self, name: str, x: Var, stride: int = 1, padding: int | None = None) -> Var:
        kernel = self.w[f"{name}.weight"]
        pad = kernel.shape[2] // 2 if padding is None else padding
        return self.ops.conv(x, kernel, self.w.optional(f"{name}.bias"), stride=stride, padding=pad)

    def norm(self, name: str, x: Var) -> Var:
        arrays = self.w.arrays
        return self.ops.group_norm(x, self.groups, arrays[f"{name}.weight"], arrays[f"{name}.bias"], GROUP_NORM_EPS)

    def resnet(self, name: str, x: Var) -> Var:
        h = self.conv(f"{name}.conv1", self.ops.silu(self.norm(f"{name}.norm1", x)))
        h = self.conv(f"{name}.conv2", self.ops.silu(self.norm(f"{name}.norm2", h)))
        skip = self.conv(f"{name}.shortcut", x) if self.w.has(f"{name}.shortcut.weight") else x
        return self.ops.add(skip, h)

    def attention(self, name: str, x: Var) -> Var:
        """Single-head self-attention over all pixels, scaled by 1/√C, with a residual."""
        ops = self.ops
        b, c, h, w = x.shape
        tokens = ops.transpose(ops.reshape(self.norm(f"{name}.norm", x), [b, c, h * w]), [0, 2, 1])

        def project(part: str, value: Var) -> Var:
            return ops.linear(value, self.w[f"{name}.{part}.weight"], self.w.optional(f"{name}.{part}.bias"))

        attended = ops.attention(project("query", tokens), project("key", tokens), project("value", tokens), None)
        out = ops.reshape(ops.transpose(project("out", attended), [0, 2, 1]), [b, c, h, w])
        return ops.add(x, out)

    def mid(self, name: str, x: Var) -> Var:
        x = self.resnet(f"{name}.resnets.0", x)
        if self.w.has(f"{name}.attention.query.weight"):
            x = self.attention(f"{name}.attention", x)
        return self.resnet(f"{name}.resnets.1", x)

    def stage(self, name: str, x: Var) -> Var:
        index = 0
        while self.w.has(f"{name}.resnets.{index}.conv1.weight"):
            x = self.resnet(f"{name}.resnets.{index}", x)
            index += 1
        if self.w.has(f"{name}.upsample.conv.weight"):
            x = self.conv(f"{name}.upsample.conv", self.ops.upsample_nearest(x, 2))
        if self.w.has(f"{name}.downsample.conv.weight"):
            x = self.conv(f"{name}.downsample.conv", self.ops.pad(x, [0, 1, 0, 1]), stride=2, padding=0)
        return x

    def decode(self, z: Var, num_stages: int) -> Var:
        if self.w.has("post_quant_conv.weight"):
            z = self.conv("post_quant_conv", z)
        x = self.mid("decoder.mid", self.conv("decoder.conv_in", z))
        for i in range(num_stages):
            x = self.stage(f"decoder.stages.{i}", x)
        return self.conv("decoder.conv_out", self.ops.silu(self.norm("decoder.norm_out", x)))

    def encode_mean(self, image: Var, num_stages: int, latent_channels: int) -> Var:
        x = self.conv("encoder.conv_in", image)
        for i in range(num_stages):
            x = self.stage(f"encoder.stages.{i}", x)
        x = self.mid("encoder.mid", x)
        moments = self.conv("encoder.conv_out", self.ops.silu(self.norm("encoder.norm_out", x)))
        if self.w.has("quant_conv.weight"):
            moments = self.conv("quant_conv", moments)
        return self.ops.slice(moments, 1, 0, latent_channels)


def _nchw_kernel(kernel: np.ndarray) -> np.ndarray:
    """MLX conv kernels are (out, kh, kw, in); Core ML wants (out, in, kh, kw)."""
    return kernel.transpose(0, 3, 1, 2)


def decoder_program(vae: VAE, latent_height: int, latent_width: int, precision: str) -> Program:
    """`latent` (1, C, h, w), already divided by the scaling factor → raw `image` (1, 3, H, W), float32."""
    config = vae.config
    inputs = {LATENT: tensor_spec((1, config.latent_channels, latent_height, latent_width), "fp32")}

    def body(v: dict[str, Var]) -> list[Var]:
        ops = Ops(precision)
        image = VAEGraph(ops, vae).decode(ops.to_compute(v[LATENT]), len(config.block_out_channels))
        return [ops.identity(ops.cast(image, "fp32"), IMAGE)]

    return build_program(inputs, body)


def encoder_program(vae: VAE, height: int, width: int, precision: str) -> Program:
    """`image` (1, 3, H, W) in [-1, 1] → `latent`, the posterior mean times the scaling factor."""
    config = vae.config
    inputs = {IMAGE: tensor_spec((1, config.in_channels, height, width), "fp32")}

    def body(v: dict[str, Var]) -> list[Var]:
        ops = Ops(precision)
        mean = VAEGraph(ops, vae).encode_mean(ops.to_compute(v[IMAGE]), len(config.block_out_channels), config.latent_channels)
        scaled = mb.mul(x=ops.cast(mean, "fp32"), y=np.float32(config.scaling_factor))
        return [ops.identity(scaled, LATENT)]

    return build_program(inputs, body)
