"""Reduced-width sampling on random weights: Jacobi vs sequential, and the score-step denoise.

The full-width step costs are in `full_width`, Jacobi on trained weights in `jacobi_trained`;
this section keeps the whole-sampler comparison on the width-scaled 3B layout (every block,
guidance 3.6): total transformer passes, wall time, and the max-abs difference of the final
sample from sequential sampling of the same noise.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from mlx_starflow.flow import StarFlow
from mlx_starflow.samplers import Jacobi, Sampler, Sequential

from .models import scaled_config, seeded_flow


def _inputs(flow: StarFlow, guidance: float, seed: int = 1) -> tuple[mx.array, mx.array]:
    c = flow.config
    rng = np.random.RandomState(seed)
    noise = mx.array(rng.standard_normal((1, c.in_channels, c.latent_size, c.latent_size)).astype(np.float32))
    rows = 2 if guidance > 0 else 1
    y = mx.array(rng.standard_normal((rows, c.txt_size, c.txt_dim)).astype(np.float32))
    return noise, y


def _sample(flow: StarFlow, noise, y, guidance, sampler: Sampler = Sequential()) -> tuple[mx.array, int, float]:
    start = time.perf_counter()
    passes, output = {}, None
    for progress in flow.iter_sample(noise, y, guidance=guidance, sampler=sampler):
        passes[progress.block] = progress.passes
        if progress.output is not None:
            output = progress.output
    return output, sum(passes.values()), time.perf_counter() - start


def jacobi_vs_sequential(flow: StarFlow, guidance: float = 3.6, block_size: int = 16,
                         thresholds: tuple[float, ...] = (1e-2, 1e-3, 1e-4)) -> list[dict]:
    noise, y = _inputs(flow, guidance)
    reference, passes, seconds = _sample(flow, noise, y, guidance)
    rows = [{"sampler": "sequential", "passes": passes, "seconds": seconds, "max_diff": 0.0}]
    for threshold in thresholds:
        sampler = Jacobi(block_size, threshold, 32)
        sample, passes, seconds = _sample(flow, noise, y, guidance, sampler)
        rows.append({"sampler": sampler.describe(), "passes": passes, "seconds": seconds,
                     "max_diff": mx.abs(sample - reference).max().item()})
    return rows


def denoise_memory(flow: StarFlow) -> list[dict]:
    """Extra peak memory and time of one score step (one image), with and without recomputing
    each layer's activations in the backward pass (`StarFlow.denoise` recomputes)."""
    noise, y = _inputs(flow, guidance=0.0)
    dims = noise.size
    variants = {
        "keep activations": lambda: noise - 0.09 * mx.grad(lambda x: mx.sum(flow.nll(x, y)) * dims)(noise),
        "recompute per layer (default)": lambda: flow.denoise(noise, y, noise_std=0.3),
    }
    rows = []
    for name, step in variants.items():
        mx.eval(noise, y)
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        start = time.perf_counter()
        mx.eval(step())
        rows.append({"variant": name, "gb": (mx.get_peak_memory() - base) / 1e9, "seconds": time.perf_counter() - start})
    return rows


def run(width: int, latent: int) -> tuple[str, dict]:
    flow = seeded_flow(scaled_config(width, latent))
    lines = [f"### Reduced-width sampling on random weights: 3B layout (layers 2,2,2,2,2,24, text 128×2048), "
             f"width {width}, latent {latent}×{latent}", "",
             "| sampler (guidance 3.6, all 6 blocks) | model passes | wall s | vs sequential | max diff from sequential |",
             "|---|---|---|---|---|"]
    rows = jacobi_vs_sequential(flow)
    base = rows[0]["seconds"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['passes']} | {r['seconds']:.1f} | {base / r['seconds']:.2f}× | {r['max_diff']:.2e} |")
    lines += ["", "| score-step denoise, 1 image | extra peak memory GB | wall s |", "|---|---|---|"]
    denoise = denoise_memory(flow)
    for r in denoise:
        lines.append(f"| {r['variant']} | {r['gb']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines), {"reduced_width_sampling": {"width": width, "samplers": rows, "denoise": denoise}}
