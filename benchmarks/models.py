"""Benchmark models: the real 3B STARFlow layout scaled down in width only, with seeded weights.

Same blocks (layers 2,2,2,2,2,24), same 32×32×4 latent (1024 tokens), same 128-token text prefix
of width 2048, same head dim 64; only `channels` shrinks, so token counts, cache lengths and
Jacobi behaviour keep their real proportions while a CPU can run them.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_starflow.backend_compute import arrange_for_backend
from mlx_starflow.config import FlowConfig
from mlx_starflow.flow import StarFlow

REAL_LAYERS = (2, 2, 2, 2, 2, 24)


def scaled_config(width: int, latent: int = 32, text_length: int = 128, text_dim: int = 2048) -> FlowConfig:
    return FlowConfig(
        in_channels=4, latent_size=latent, patch_size=1, channels=width, layers_per_block=REAL_LAYERS,
        txt_size=text_length, txt_dim=text_dim, vae_factor=8,
    )


def seeded_weights(config: FlowConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights drawn like the official fixtures': std 1/√fan_in (1.5/√fan_in for qkv), small
    biases, a non-zero output projection so the soft clip and scales are active."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, param in tree_flatten(StarFlow(config).parameters()):
        shape = tuple(param.shape)
        if name.endswith("sos"):
            value = rng.standard_normal(shape)
        elif "norm" in name:
            value = 0.25 * rng.standard_normal(shape) + (1.0 if name.endswith("weight") and "final_norm" not in name else 0.0)
        elif name.endswith("bias"):
            value = 0.1 * rng.standard_normal(shape)
        else:
            gain = 1.5 if ".qkv." in name else 0.2 if "proj_out" in name else 1.0
            value = gain / np.sqrt(shape[1]) * rng.standard_normal(shape)
        weights[name] = value.astype(np.float32)
    return weights


def seeded_flow(config: FlowConfig, seed: int = 0, dtype: mx.Dtype = mx.float32) -> StarFlow:
    """A flow with `seeded_weights`, its linears arranged for the backend as a loaded flow's are."""
    model = StarFlow(config)
    model.update(tree_unflatten([(k, mx.array(v).astype(dtype)) for k, v in seeded_weights(config, seed).items()]))
    mx.eval(model.parameters())
    arrange_for_backend(model)
    return model
