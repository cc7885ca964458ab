"""What the measured ratios mean on a Mac: a projection, not a measurement.

Sampling one 256² image reads every weight of every block once per token step (1024 steps,
guidance rows batched), so its time is about bytes per image ÷ (memory bandwidth × the fraction
of it a step reaches), divided by the weighted-pass ratio of the sampler. The fraction and the
ratio come from this run; the bandwidths are Apple's published figures.
"""

from __future__ import annotations

from .models import REAL_LAYERS

TOKENS = 1024
WIDTH = 3072
EXPANSION = 4
GROUP = 64
BANDWIDTH_GBPS = {"M4": 120, "M4 Pro": 273, "M2 Max": 400, "M4 Max": 546, "M2 Ultra": 800}
BYTES_PER_PARAMETER = {"float16": 2.0, "8-bit": 1 + 2 * 2 / GROUP, "4-bit": 0.5 + 2 * 2 / GROUP}
"""Quantised: the weights plus a float16 scale and bias per group of 64, as MLX stores them."""


def layer_parameters(width: int = WIDTH) -> int:
    hidden = EXPANSION * width
    return 4 * width * width + 2 * width * hidden + 3 * width + width + hidden + width + 4 * width


def bytes_per_image(weights: str) -> float:
    """Weight bytes read to sample one image token by token (all 34 transformer layers, 1024 steps)."""
    return TOKENS * sum(REAL_LAYERS) * layer_parameters() * BYTES_PER_PARAMETER[weights]


def run(fraction: float, pass_ratio: float, fraction_source: str, ratio_source: str) -> tuple[str, dict]:
    lines = [
        "### Projection for Apple Silicon (not measured): seconds per 256² image, sampling only",
        "",
        f"Fraction of bandwidth reached: {fraction:.0%} ({fraction_source}); weighted-pass ratio of the sampler: "
        f"{pass_ratio:.2f}× ({ratio_source}).",
        "",
        "| chip | bandwidth GB/s | " + " | ".join(f"{w} sequential | {w} Jacobi" for w in BYTES_PER_PARAMETER) + " |",
        "|---|---|" + "---|---|" * len(BYTES_PER_PARAMETER),
    ]
    record = {}
    for chip, gbps in BANDWIDTH_GBPS.items():
        seconds = {w: bytes_per_image(w) / (gbps * 1e9 * fraction) for w in BYTES_PER_PARAMETER}
        record[chip] = {w: {"sequential_s": s, "jacobi_s": s / pass_ratio} for w, s in seconds.items()}
        lines.append(f"| {chip} | {gbps} | " + " | ".join(f"{s:,.0f} | {s / pass_ratio:,.0f}" for s in seconds.values()) + " |")
    return "\n".join(lines), {"mac_projection": {"fraction_of_ceiling": fraction, "weighted_pass_ratio": pass_ratio,
                                                 "seconds": record}}
