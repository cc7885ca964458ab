"""`make bench`: speed, memory and precision figures, printed as Markdown tables.

Benchmarks, not tests: nothing here asserts a time. Every report starts with the machine and
MLX backend it was measured on; compare figures only within one report.
"""

from __future__ import annotations

import argparse
import os
import platform

import mlx.core as mx

from . import converter_memory, flow_speed, precision

SECTIONS = ("speed", "memory", "precision")


def machine() -> str:
    device = mx.default_device()
    blas = os.environ.get("LD_PRELOAD", "")
    note = f", BLAS preloaded: {os.path.basename(blas)}" if blas else ""
    return (f"Measured on {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
            f"MLX {mx.__version__} on {device}{note}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=SECTIONS, action="append", help="Run only these sections (repeatable).")
    parser.add_argument("--width", type=int, default=256, help="Flow width for the speed section (real model: 3072).")
    parser.add_argument("--latent", type=int, default=32, help="Latent side for the speed section (real model: 32).")
    parser.add_argument("--checkpoint-width", type=int, default=1152,
                        help="Width of the synthetic checkpoint for the memory section (1152 gives 2.2 GB).")
    args = parser.parse_args()
    sections = args.only or SECTIONS
    print(machine(), end="\n\n", flush=True)
    if "speed" in sections:
        print(flow_speed.run(args.width, args.latent), end="\n\n", flush=True)
    if "memory" in sections:
        print(converter_memory.run(args.checkpoint_width), end="\n\n", flush=True)
    if "precision" in sections:
        print(precision.run(), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
