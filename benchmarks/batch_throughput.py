"""Batch throughput: images per second for batch 1, 2, 4, 8 under the 3B layout's cost model.

A bandwidth-bound step reads the weights once whatever the batch, so batching should raise
images per second almost linearly until compute or the cache dominates. Measured at a reduced
width (stated) with float32 weights: one compiled one-token step of the deep block (2 rows per
image) and of a shallow block (1 row per image); an image's sequential sampling time is
1024 tokens × (the deep step + 5 shallow steps), divided by the batch.
"""

from __future__ import annotations

import mlx.core as mx

from .full_width import Variant, build_block, real_config, time_step
from .models import REAL_LAYERS

BATCHES = (1, 2, 4, 8)
WIDTH = 1024


def run(width: int = WIDTH, layers_run: int = 2, repeats: int = 3) -> tuple[str, dict]:
    config = real_config(width)
    tokens = config.latent_size**2
    variant = Variant("float32", mx.float32)
    deep = build_block(config, layers_run, True, variant)
    shallow = build_block(config, REAL_LAYERS[0], False, variant)
    scale = REAL_LAYERS[-1] / layers_run
    shallow_blocks = len(REAL_LAYERS) - 1
    records, lines = {}, [
        f"### Batch throughput (sequential decoding, float32, width {width}; deep block {layers_run} of 24 layers "
        f"run and scaled; 1024 tokens × (deep step + {shallow_blocks} shallow steps) per batch)",
        "",
        "| batch | deep step ms | shallow step ms | s per batch | images/s | vs batch 1 |",
        "|---|---|---|---|---|---|",
    ]
    for batch in BATCHES:
        deep_ms = time_step(deep, config, config.txt_size, 1, True, repeats, rows=2 * batch) * scale * 1e3
        shallow_ms = time_step(shallow, config, 0, 1, True, repeats, rows=batch) * 1e3
        seconds = tokens * (deep_ms + shallow_blocks * shallow_ms) / 1e3
        records[str(batch)] = {"deep_step_ms": deep_ms, "shallow_step_ms": shallow_ms, "batch_seconds": seconds,
                               "images_per_second": batch / seconds}
        speedup = records[str(batch)]["images_per_second"] / records["1"]["images_per_second"]
        lines.append(f"| {batch} | {deep_ms:,.1f} | {shallow_ms:,.1f} | {seconds:,.1f} | "
                     f"{batch / seconds:.4f} | {speedup:.2f}× |")
    return "\n".join(lines), {"batch_throughput": {"width": width, "layers_run": layers_run, "batches": records}}
