"""Where a step's time goes besides reading weights: attention over the cache, KV-cache writes,
host overhead per pass, and the guidance/sampling arithmetic.

Each figure is measured on its own and set beside the full-width float32 deep step, so the
table says what share of a step each part could at most account for.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_starflow.backend_compute import arrange_for_backend
from mlx_starflow.block_runner import ATTENTION_BUCKET
from mlx_starflow.samplers import gaussian

from .full_width import GUIDANCE_ROWS, JACOBI_BLOCK, Variant, build_block, real_config, runner, time_step
from .models import REAL_LAYERS, scaled_config
from .timing import best_seconds

TINY_WIDTH = 64


def attention_cache(width: int, layers_run: int, repeats: int) -> dict:
    """Compiled float32 deep step in the middle of the image, attending over the whole
    1152-position cache vs over its filled part (text + half the tokens, rounded up to the
    attention bucket, as sampling does), scaled to 24 layers."""
    config = real_config(width)
    prefix = config.txt_size
    middle = prefix + config.latent_size**2 // 2 + 1
    filled = -(-middle // ATTENTION_BUCKET) * ATTENTION_BUCKET
    block = build_block(config, layers_run, True, Variant("float32", mx.float32))
    scale = REAL_LAYERS[-1] / layers_run
    # Alternated, best of each: a saving of a few percent is smaller than the machine's drift.
    full, part = float("inf"), float("inf")
    for _ in range(repeats):
        full = min(full, time_step(block, config, prefix, 1, True, 2, attention_bucket=0) * scale * 1e3)
        part = min(part, time_step(block, config, prefix, 1, True, 2) * scale * 1e3)
    heads = config.channels // config.head_dim
    cache_bytes = 2 * REAL_LAYERS[-1] * GUIDANCE_ROWS * heads * config.head_dim * 4
    return {"full_cache_ms": full, "filled_cache_ms": part, "full_cache_positions": prefix + config.latent_size**2,
            "filled_cache_positions": filled, "full_cache_mb": cache_bytes * (prefix + config.latent_size**2) / 1e6,
            "filled_cache_mb": cache_bytes * filled / 1e6}


def kv_writes(width: int, repeats: int) -> dict:
    """ms to write one token's keys and values into every layer's float32 cache (24 layers, 2 rows)."""
    config = real_config(width)
    heads, length = config.channels // config.head_dim, config.txt_size + config.latent_size**2
    layers = REAL_LAYERS[-1]
    buffers = [mx.zeros((GUIDANCE_ROWS, heads, length, config.head_dim)) for _ in range(2 * layers)]
    new = mx.ones((GUIDANCE_ROWS, heads, 1, config.head_dim))
    position = mx.array([config.txt_size + 7], dtype=mx.int32)
    mx.eval(buffers, new)

    def write() -> None:
        for index in range(len(buffers)):
            buffers[index] = mx.slice_update(buffers[index], new, position, axes=(2,))
        mx.eval(buffers)

    return {"kv_write_ms": best_seconds(write, repeats) * 1e3}


def host_per_pass(repeats: int) -> dict:
    """ms of one compiled pass on a tiny block (width 64, 1 layer, 16 tokens, 2 rows), with the
    sampler's host sync (`tolist`): nearly all of it is per-pass overhead, not arithmetic."""
    config = scaled_config(TINY_WIDTH)
    block = build_block(config, 1, False, Variant("float32", mx.float32))

    run = runner(block, config, 0, True)
    run.start(GUIDANCE_ROWS, None)
    inputs = mx.zeros((GUIDANCE_ROWS, JACOBI_BLOCK, config.token_channels))

    def one_pass() -> None:
        a, b = run.step(inputs, 100)
        change = mx.mean(mx.square(b), axis=(1, 2))
        mx.eval(a, change, *run.pending)
        change.tolist()

    def one_token() -> None:
        a, b = run.step(inputs[:, :1], 100)
        mx.eval(a, b, *run.pending)

    return {"tiny_pass_ms": best_seconds(one_pass, repeats * 10) * 1e3,
            "tiny_token_step_ms": best_seconds(one_token, repeats * 10) * 1e3}


def product_alone(width: int, repeats: int) -> dict:
    """The largest product of a deep step on its own (2 guidance rows × an MLP's first linear,
    width → 4·width, float32, arranged as a loaded model's): the bandwidth the step's matrix
    products reach here before attention or any other work, the bound on the whole step."""
    layer = nn.Linear(width, 4 * width)
    layer.update({"weight": mx.random.normal((4 * width, width)) * width**-0.5})
    mx.eval(layer.parameters())
    arrange_for_backend(layer)
    rows = mx.random.normal((GUIDANCE_ROWS, 1, width))
    mx.eval(rows)
    seconds = best_seconds(lambda: mx.eval(layer(rows)), repeats * 3)
    nbytes = sum(value.nbytes for _, value in tree_flatten(layer.parameters()))
    return {"product_alone_ms": seconds * 1e3, "product_alone_gbps": nbytes / seconds / 1e9}


def sampling_arithmetic(repeats: int, guidance: float = 3.6) -> dict:
    """ms of the per-pass guidance and colouring (eager, 16 tokens, 2 guidance rows, 4 channels)."""
    shape = (GUIDANCE_ROWS, JACOBI_BLOCK, 4)
    a, b, z = mx.random.normal(shape), mx.random.normal(shape), mx.random.normal(shape)
    mx.eval(a, b, z)

    def arithmetic() -> None:
        mu, sigma = gaussian(a, b, guidance, True)
        mx.eval(z * sigma + mu)

    return {"guidance_colour_ms": best_seconds(arithmetic, repeats * 10) * 1e3}


def run(width: int, ceiling: Callable[[], float], layers_run: int = 1, repeats: int = 3,
        step_ms: float | None = None) -> tuple[str, dict]:
    """The table and the `overheads` record; `ceiling()` measures the read-bandwidth ceiling
    (GB/s), just before the product it is compared with."""
    record = {**attention_cache(width, layers_run, repeats), **kv_writes(width, repeats),
              **host_per_pass(repeats), **sampling_arithmetic(repeats)}
    ceiling_gbps = ceiling()
    record.update(product_alone(width, repeats), product_alone_ceiling_gbps=ceiling_gbps)
    record["product_alone_fraction_of_ceiling"] = record["product_alone_gbps"] / ceiling_gbps
    step = step_ms or record["full_cache_ms"]
    saved = record["full_cache_ms"] - record["filled_cache_ms"]
    lines = [
        f"### Where a float32 deep step's time goes besides the weights (width {width}; {layers_run} of 24 layers run, scaled)",
        "",
        "| part | ms | share of a compiled deep step |",
        "|---|---|---|",
        f"| attention over the whole cache ({record['full_cache_positions']} positions, {record['full_cache_mb']:,.0f} MB) "
        f"vs the filled part sampling reads ({record['filled_cache_positions']}, {record['filled_cache_mb']:,.0f} MB): saved "
        f"| {saved:,.0f} | {saved / step:.1%} |",
        f"| KV-cache writes, 24 layers | {record['kv_write_ms']:.2f} | {record['kv_write_ms'] / step:.2%} |",
        f"| host overhead per Jacobi pass (tiny block, with the host sync) | {record['tiny_pass_ms']:.2f} "
        f"| {record['tiny_pass_ms'] / step:.2%} |",
        f"| host overhead per one-token step (tiny block) | {record['tiny_token_step_ms']:.2f} "
        f"| {record['tiny_token_step_ms'] / step:.2%} |",
        f"| guidance and sampling arithmetic per pass (eager) | {record['guidance_colour_ms']:.2f} "
        f"| {record['guidance_colour_ms'] / step:.2%} |",
        "",
        f"The largest weight product alone (2 rows × {width} → {4 * width}, float32, arranged as loaded): "
        f"{record['product_alone_ms']:.1f} ms, {record['product_alone_gbps']:.1f} GB/s = "
        f"{record['product_alone_fraction_of_ceiling']:.0%} of the ceiling ({ceiling_gbps:.1f} GB/s), the most a "
        "step made of such products reaches with this BLAS.",
    ]
    return "\n".join(lines), {"overheads": record}
