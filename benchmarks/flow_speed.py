"""Sampling speed: one deep-block step (eager vs compiled), and Jacobi vs sequential sampling.

Figures are wall time on whatever backend MLX runs on here (the report header names it).
Jacobi is compared with sequential sampling of the same noise: total transformer passes over
all blocks, wall time, and the max-abs difference of the final sample.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from mlx_starflow.flow import StarFlow

from .models import scaled_config, seeded_flow


def _inputs(flow: StarFlow, guidance: float, seed: int = 1) -> tuple[mx.array, mx.array]:
    c = flow.config
    rng = np.random.RandomState(seed)
    noise = mx.array(rng.standard_normal((1, c.in_channels, c.latent_size, c.latent_size)).astype(np.float32))
    rows = 2 if guidance > 0 else 1
    y = mx.array(rng.standard_normal((rows, c.txt_size, c.txt_dim)).astype(np.float32))
    return noise, y


def step_latency(flow: StarFlow, rows: int = 2, steps: int = 64) -> dict[str, float]:
    """Mean seconds per one-token step of the deep block (CFG rows), eager and compiled."""
    block = flow.blocks[-1]
    c = flow.config
    tokens = c.latent_size**2
    cos, sin = flow._rope(c.latent_size, c.latent_size, c.txt_size)
    text = mx.zeros((rows, c.txt_size, c.txt_dim))
    warm = 4
    steps = min(steps, tokens - warm)
    result = {}
    for compiled in (False, True):
        cache = block.make_cache(rows, c.txt_size + tokens)
        block.prefill(text, cos, sin, cache)
        step = flow._make_step(block, cos, sin, compiled)
        x = mx.zeros((rows, 1, c.token_channels))
        for t in range(steps + warm):
            if t == warm:
                mx.synchronize()
                start = time.perf_counter()
            a, b, cache.keys, cache.values = step(x, mx.array([c.txt_size + t], dtype=mx.int32), cache.keys, cache.values)
            mx.eval(a, b, cache.state)
        result["compiled" if compiled else "eager"] = (time.perf_counter() - start) / steps
    return result


def _sample(flow: StarFlow, noise, y, guidance, **jacobi) -> tuple[mx.array, int, float]:
    start = time.perf_counter()
    passes, output = {}, None
    for progress in flow.iter_sample(noise, y, guidance=guidance, **jacobi):
        passes[progress.block] = progress.passes
        if progress.output is not None:
            output = progress.output
    return output, sum(passes.values()), time.perf_counter() - start


def jacobi_vs_sequential(flow: StarFlow, guidance: float = 3.6, block_size: int = 16,
                         thresholds: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 0.0)) -> list[dict]:
    noise, y = _inputs(flow, guidance)
    reference, passes, seconds = _sample(flow, noise, y, guidance)
    rows = [{"sampler": "sequential", "passes": passes, "seconds": seconds, "max_diff": 0.0}]
    for threshold in thresholds:
        sample, passes, seconds = _sample(flow, noise, y, guidance, jacobi=True, jacobi_block_size=block_size,
                                          jacobi_threshold=threshold, jacobi_max_iter=32)
        rows.append({"sampler": f"jacobi bs{block_size} th {threshold:g}", "passes": passes, "seconds": seconds,
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


def run(width: int, latent: int) -> str:
    flow = seeded_flow(scaled_config(width, latent))
    lines = [f"### Flow sampling: 3B layout (layers 2,2,2,2,2,24, text 128×2048), width {width}, latent {latent}×{latent}", ""]
    latency = step_latency(flow)
    lines += [
        "| deep-block step, 1 token, 2 CFG rows | ms/token |", "|---|---|",
        f"| eager | {latency['eager'] * 1e3:.2f} |",
        f"| mx.compile | {latency['compiled'] * 1e3:.2f} |",
        f"| compiled speed-up | {latency['eager'] / latency['compiled']:.2f}× |", "",
        "| sampler (guidance 3.6, all 6 blocks) | model passes | wall s | vs sequential | max diff from sequential |",
        "|---|---|---|---|---|",
    ]
    rows = jacobi_vs_sequential(flow)
    base = rows[0]["seconds"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['passes']} | {r['seconds']:.1f} | {base / r['seconds']:.2f}× | {r['max_diff']:.2e} |")
    lines += ["", "| score-step denoise, 1 image | extra peak memory GB | wall s |", "|---|---|---|"]
    for r in denoise_memory(flow):
        lines.append(f"| {r['variant']} | {r['gb']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)
