"""Full-width sampling steps of the real 3B layout, against the machine's read-bandwidth ceiling.

The deep block (width 3072, head dim 64, 128×2048 text prefix, a 1152-position cache, 2
guidance rows) and one shallow block are built layer by layer with random weights, each layer
cast or quantised as soon as it is drawn, so memory holds one variant's layers at a time. A
step's time does not depend on the weights' or the cache's values, so neither is trained nor
prefilled. Slow variants run a stated subset of the layers; their step time is scaled up by
the layer count (every layer does the same work) and the table says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from unittest.mock import patch

import mlx.core as mx
import mlx.nn as nn

from mlx_starflow import backend_compute
from mlx_starflow.backend_compute import arrange_for_backend
from mlx_starflow.block_runner import ATTENTION_BUCKET, MLXBlockRunner
from mlx_starflow.config import FlowConfig
from mlx_starflow.flow_block import FlowBlock
from mlx_starflow.quantization import GROUP_SIZE
from mlx_starflow.rope import rope_tables
from mlx_starflow.token_layout import TokenLayout

from .models import REAL_LAYERS, scaled_config
from .timing import best_seconds

REAL_WIDTH = 3072
GUIDANCE_ROWS = 2
JACOBI_BLOCK = 16


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: mx.Dtype
    bits: int | None = None
    arranged: bool = True
    """Linears arranged for the backend as a loaded model's are (`arrange_for_backend`), and
    attention split by rows as sampling splits it (`backend_compute.attend`)."""
    attention_bucket: int = ATTENTION_BUCKET
    """Cache positions per attention length; 0 attends over the whole cache."""
    before_of: str | None = None
    """The variant this one shows as it ran before the changes measured against it."""


VARIANTS = (
    Variant("float32", mx.float32),
    Variant("float32 before: (out, in) weights, whole cache, one stream", mx.float32, arranged=False,
            attention_bucket=0, before_of="float32"),
    Variant("float16", mx.float16),
    Variant("bfloat16", mx.bfloat16),
    Variant("bfloat16 before: one stream", mx.bfloat16, arranged=False, before_of="bfloat16"),
    Variant("8-bit (float32 rest)", mx.float32, 8),
    Variant("4-bit (float32 rest)", mx.float32, 4),
    Variant("4-bit before: one stream", mx.float32, 4, arranged=False, before_of="4-bit (float32 rest)"),
)
"""Quantised variants keep float32 for the rest (and so compute in float32): on MLX's CPU
backend a quantised layer computing in float16 took ≈ 33 s per token step against ≈ 0.9 s in
float32 (one full-width layer, measured here), too slow for the default bench."""


@dataclass(frozen=True)
class StepTiming:
    """One block variant: ms per step at the block's full layer count (scaled from `layers_run`)."""

    variant: str
    block: str
    layers: int
    layers_run: int
    weight_bytes: int
    step_ms: float
    eager_ms: float
    pass_ms: float
    eager_pass_ms: float

    @property
    def gbps(self) -> float:
        return self.weight_bytes / (self.step_ms / 1e3) / 1e9

    @property
    def pass_per_token_ratio(self) -> float:
        """ms per token of a 16-token Jacobi pass ÷ ms of a one-token step (1/16 would be free)."""
        return self.pass_ms / JACOBI_BLOCK / self.step_ms

    def record(self, ceiling_gbps: float) -> dict:
        return {"ceiling_gbps": ceiling_gbps, "ms": self.step_ms, "eager_ms": self.eager_ms, "pass_ms": self.pass_ms,
                "eager_pass_ms": self.eager_pass_ms, "weight_bytes": self.weight_bytes, "gbps": self.gbps,
                "fraction_of_ceiling": self.gbps / ceiling_gbps, "layers": self.layers, "layers_run": self.layers_run,
                "pass_per_token_ratio": self.pass_per_token_ratio}


def real_config(width: int = REAL_WIDTH) -> FlowConfig:
    return scaled_config(width)


def _parameter_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(module.parameters()))


def build_block(config: FlowConfig, layers: int, text: bool, variant: Variant, seed: int = 0) -> FlowBlock:
    """A block of `layers` layers with random weights of the variant's dtype / quantisation.

    Each layer is drawn, cast and quantised before the next, so the float32 draw of only one
    layer is ever held. Weights are N(0, 1/fan_in), norms unit, biases small.
    """
    block = FlowBlock(config, layers, flipped=False, txt_dim=config.txt_dim if text else 0)
    key = mx.random.key(seed)

    def draw(module: nn.Module) -> None:
        nonlocal key
        params = []
        for name, value in nn.utils.tree_flatten(module.parameters()):
            key, sub = mx.random.split(key)
            if name.endswith("weight") and value.ndim == 2:
                drawn = mx.random.normal(value.shape, key=sub) * value.shape[1] ** -0.5
            elif name.endswith("weight"):
                drawn = mx.ones(value.shape)
            else:
                drawn = 0.01 * mx.random.normal(value.shape, key=sub)
            params.append((name, drawn.astype(variant.dtype)))
        module.update(nn.utils.tree_unflatten(params))
        mx.eval(module.parameters())

    for layer in block.layers:
        draw(layer)
        if variant.bits:
            nn.quantize(layer, group_size=GROUP_SIZE, bits=variant.bits)
            mx.eval(layer.parameters())
        if variant.arranged:
            arrange_for_backend(layer)
    for name in ("proj_in", "proj_txt", "final_norm", "proj_out"):
        if name in block:
            draw(block[name])
            if variant.arranged:
                arrange_for_backend(block[name])
    block.sos = mx.zeros(block.sos.shape, variant.dtype)
    mx.eval(block.sos)
    return block


def layer_bytes(block: FlowBlock) -> int:
    """Bytes of one transformer layer's parameters (what one step reads per layer)."""
    return _parameter_bytes(block.layers[0])


def head_bytes(block: FlowBlock) -> int:
    """Bytes a step reads outside the layers (input/output projections, final norm); the text
    projection runs only in the prefill and is not counted."""
    return sum(_parameter_bytes(block[name]) for name in ("proj_in", "final_norm", "proj_out") if name in block)


def runner(block: FlowBlock, config: FlowConfig, prefix: int, compiled: bool,
           cache_length: int | None = None, attention_bucket: int = ATTENTION_BUCKET) -> MLXBlockRunner:
    """The block's runner as the samplers drive it, over a 32×32 latent (1024 tokens); the cache
    holds `cache_length` positions (default: the whole prefix and image); `attention_bucket` 0
    attends over the whole cache at every step."""
    side = config.latent_size
    layout = TokenLayout(config.token_channels, side, side, 1)
    cos, sin = rope_tables(layout, prefix, config.pt_seq_len, config.head_dim, config.rope_theta, config.txt_size > 0)
    tokens = (cache_length or prefix + side * side) - prefix
    return MLXBlockRunner(block, cos, sin, prefix, tokens, compiled, attention_bucket=attention_bucket or prefix + tokens)


def time_step(block: FlowBlock, config: FlowConfig, prefix: int, tokens: int, compiled: bool, repeats: int,
              rows: int = GUIDANCE_ROWS, cache_length: int | None = None,
              attention_bucket: int = ATTENTION_BUCKET) -> float:
    """Best seconds of one cached step of `tokens` tokens in the middle of the image (after one
    warm-up that also compiles); the cache is allocated but not prefilled."""
    run = runner(block, config, prefix, compiled, cache_length, attention_bucket)
    run.start(rows, None)
    mx.eval(run.pending)
    inputs = mx.zeros((rows, tokens, config.token_channels))
    index = min(config.latent_size**2 // 2, run.token_count - tokens)

    def step() -> None:
        a, b = run.step(inputs, index)
        mx.eval(a, b, *run.pending)

    return best_seconds(step, repeats)


def measure(config: FlowConfig, variant: Variant, deep: bool, layers_run: int, repeats: int) -> StepTiming:
    """Compiled and eager ms of a one-token step and a 16-token pass (2 guidance rows for the
    deep block, 1 row for a shallow one), best of `repeats` + 2 for the compiled step (the
    headline figure, on a machine whose timings vary from one step to the next), of 1 less
    than `repeats` for the others."""
    layers = REAL_LAYERS[-1] if deep else REAL_LAYERS[0]
    layers_run = min(layers_run, layers)
    block = build_block(config, layers_run, deep, variant)
    prefix = config.txt_size if deep else 0
    scale = layers / layers_run
    times = {}
    rows = GUIDANCE_ROWS if deep else 1
    # Attention split by rows is part of the arrangement; a "before" variant attends on one stream.
    one_stream = nullcontext() if variant.arranged else patch.object(backend_compute, "MIN_SPLIT_CACHE", sys.maxsize)
    with one_stream:
        for tokens in (1, JACOBI_BLOCK):
            for compiled in (True, False):
                count = repeats + 2 if tokens == 1 and compiled else max(1, repeats - 1)
                seconds = time_step(block, config, prefix, tokens, compiled, count, rows,
                                    attention_bucket=variant.attention_bucket)
                times[tokens, compiled] = seconds * scale * 1e3
    weight_bytes = layers * layer_bytes(block) + head_bytes(block)
    del block
    mx.clear_cache()
    return StepTiming(variant.name, "deep" if deep else "shallow", layers, layers_run, weight_bytes,
                      times[1, True], times[1, False], times[JACOBI_BLOCK, True], times[JACOBI_BLOCK, False])


SHALLOW_VARIANTS = ("float32", "bfloat16")


def run(ceiling: Callable[[], float], width: int = REAL_WIDTH, layers_run: int = 2, quantized_layers_run: int = 1,
        repeats: int = 3) -> tuple[str, dict]:
    """The deep block per variant and the shallow block for `SHALLOW_VARIANTS`: a Markdown table
    and the `deep_step` / `shallow_step` records of bench.json.

    `ceiling()` measures the read-bandwidth ceiling in GB/s; it is measured again just before
    each variant, and each variant's fraction is of that reading: on a shared machine the
    bandwidth drifts over a run (here by half between runs minutes apart), and a ratio is
    only meaningful between figures taken under the same conditions.
    """
    config = real_config(width)
    deep, shallow, ceilings = [], [], {}
    for variant in VARIANTS:
        run_layers = quantized_layers_run if variant.bits else layers_run
        ceilings[variant.name, "deep"] = ceiling()
        deep.append(measure(config, variant, True, run_layers, repeats))
        if variant.name in SHALLOW_VARIANTS:
            ceilings[variant.name, "shallow"] = ceiling()
            shallow.append(measure(config, variant, False, run_layers, repeats))
    befores = {variant.before_of: variant.name for variant in VARIANTS if variant.before_of}
    by_name = {timing.variant: timing for timing in deep}
    fraction = {(t.variant, t.block): t.gbps / ceilings[t.variant, t.block] for t in [*deep, *shallow]}
    best = max((t for t in deep if t.variant not in befores.values()), key=lambda t: fraction[t.variant, "deep"])
    lines = [
        f"### Full-width steps: deep block (24 layers, width {width}, text 128×2048, 1152-position cache, "
        f"2 guidance rows) and a shallow block (2 layers, 1 row)",
        "",
        "Random weights; the layers run are stated and the time is scaled to the block's layers. "
        "The read-bandwidth ceiling is measured again just before each row; a row's fraction is of that reading.",
        "",
        "| block | weights | layers run | MB read per step | compiled ms/step | eager ms/step | GB/s | ceiling GB/s "
        "| of ceiling | ms per 16-token pass (compiled / eager) | pass ms per token ÷ step ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for timing in [*deep, *shallow]:
        key = timing.variant, timing.block
        lines.append(
            f"| {timing.block} | {timing.variant} | {timing.layers_run} of {timing.layers} | {timing.weight_bytes / 1e6:,.0f} "
            f"| {timing.step_ms:,.0f} | {timing.eager_ms:,.0f} | {timing.gbps:.2f} | {ceilings[key]:.1f} "
            f"| {fraction[key]:.0%} | {timing.pass_ms:,.0f} / {timing.eager_pass_ms:,.0f} | {timing.pass_per_token_ratio:.2f} |")
    lines += ["", f"Best deep variant here: **{best.variant}**, {fraction[best.variant, 'deep']:.0%} of the ceiling. "
              "A step is timed at the middle of the image (the cache half filled)."]
    speedups = {after: by_name[before].step_ms / by_name[after].step_ms for after, before in befores.items()}
    gains = "; ".join(f"{after} {ratio:.2f}×" for after, ratio in speedups.items())
    lines += ["", "Deep-step speed-up, as loaded now over as before (linears arranged for the backend, attention "
              f"over the filled cache, split by rows): {gains}."]
    record = {
        "deep_step_speedup": speedups,
        "deep_step": {t.variant: t.record(ceilings[t.variant, "deep"]) for t in deep},
        "shallow_step": {t.variant: t.record(ceilings[t.variant, "shallow"]) for t in shallow},
        "best_deep_variant": best.variant,
        "jacobi_pass_ms_per_token_ratio": best.pass_per_token_ratio,
    }
    return "\n".join(lines), record
