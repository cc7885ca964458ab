"""The score-step denoise as its own program: x − σ²·∇ₓ[D·nll(x)], gradient built by `autodiff`.

The flow was trained on latents with Gaussian noise of std σ (config `noise_std`), so samples
are denoised before decoding with one Tweedie step (official `self_denoise`, MLX
`StarFlow.denoise`). D·nll per image is ½·Σz² + Σ_blocks Σ log sigma, so the backward pass is
seeded with z for the final tokens and 1/sigma for every block's scales. One image per call,
conditional text rows only, as the contract says.

It is never weight-compressed: each weight feeds the forward linear and the backward matmul,
and coremltools' quantiser refuses a constant shared by products with different channel axes.
Separate compressed copies would not pay (int8: the size of the shared float16 weights; int4:
0.61× of it, with a gradient error of 0.37 on the tiny model against 2e-3 at float16).
"""

from __future__ import annotations

import numpy as np

from mlx_starflow.flow import StarFlow
from mlx_starflow.sampling import INV_SOFTPLUS_1

from .autodiff import Tape
from .builder import build_program, tensor_spec
from .coremltools_api import Program, Var, mb
from .flow_graph import BlockShape, Weights, block_arrays, likelihood_block, rope_table

LATENT, TEXT, DENOISED = "latent", "text", "denoised"


def patchify(ops: Tape, latent: Var, patch: int) -> Var:
    """(1, C, H, W) → (1, N, p·p·C) tokens in raster order, packing (p1, p2, c) like `StarFlow.patchify`."""
    _, c, height, width = latent.shape
    h, w = height // patch, width // patch
    if patch == 1:
        return ops.transpose(ops.reshape(latent, [1, c, h * w]), [0, 2, 1])
    grid = ops.reshape(latent, [c, h, patch, w, patch])
    return ops.reshape(ops.transpose(grid, [1, 3, 2, 4, 0]), [1, h * w, patch * patch * c])


def score_program(flow: StarFlow, height: int, width: int, text_length: int, precision: str) -> Program:
    """Inputs `latent` (1, C, H, W) and, for a conditioned flow, `text` (1, T, D); output `denoised`."""
    config = flow.config
    shape = BlockShape.of(config)
    h, w = height // config.patch_size, width // config.patch_size
    has_text = flow.blocks[-1].has_text
    inputs = {LATENT: tensor_spec((1, config.in_channels, height, width), "fp32")}
    if has_text:
        inputs[TEXT] = tensor_spec((1, text_length, config.txt_dim), "fp32")
    arrays = [block_arrays(flow, i) for i in range(config.num_blocks)]

    def body(v: dict[str, Var]) -> list[Var]:
        tape = Tape(precision)
        latent = v[LATENT]
        tape.watch(latent)
        tokens = patchify(tape, latent, config.patch_size)
        seeds = []
        for index, block in enumerate(flow.blocks):
            prefix = text_length if block.has_text else 0
            cos, sin = rope_table(config, h, w, prefix, prefix + h * w)
            sequence = tape.reverse(tokens, 1) if block.flipped else tokens
            a, b = likelihood_block(tape, Weights(tape, arrays[index]), shape, sequence, v[TEXT] if block.has_text else None, cos, sin)
            sigma = tape.softplus(tape.add(a, INV_SOFTPLUS_1)) if config.use_softplus else tape.exp(a)
            seeds.append((sigma, mb.real_div(x=np.float32(1.0), y=sigma)))
            z = tape.div(tape.sub(sequence, b), sigma)
            tokens = tape.reverse(z, 1) if block.flipped else z
        seeds.append((tokens, tokens))
        gradient = tape.backward(seeds, latent)
        step = mb.mul(x=gradient, y=np.float32(config.noise_std**2))
        return [mb.sub(x=latent, y=step, name=DENOISED)]

    return build_program(inputs, body)
