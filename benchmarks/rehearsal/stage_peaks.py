"""Peak memory of a converted model's first stages in one process: load, encode (the text encoder
read, used and released; the flow's weights read after it), and the first deep-block token with
the text prefix. Quicker than the whole rehearsal (minutes, not an hour) when only the order in
which weights are held is in question:

    python -m benchmarks.rehearsal.stage_peaks build/rehearsal/starflow-home/models/<converted model>
"""

from __future__ import annotations

import argparse
import resource
import time

import mlx.core as mx

from mlx_starflow import load
from mlx_starflow.samplers import Sequential

PROMPTS = ["a film still of a cat playing piano", ""]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def report(stage: str, started: float) -> None:
    print(f"{stage}: {time.perf_counter() - started:.1f} s, peak RSS {peak_rss_gb():.2f} GB, "
          f"MLX active {mx.get_active_memory() / 1e9:.2f} GB, MLX peak {mx.get_peak_memory() / 1e9:.2f} GB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a converted text-to-image model folder")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    args = parser.parse_args()
    started = time.perf_counter()
    pipe = load(args.model)
    report("load", started)
    started = time.perf_counter()
    y = pipe.encode(PROMPTS)
    mx.eval(y)
    report("encode (then the flow's weights read)", started)
    mx.reset_peak_memory()
    started = time.perf_counter()
    next(pipe.flow.iter_sample(pipe.noise([0], args.size, args.size), y, 3.6, sampler=Sequential()))
    report("first deep-block token", started)


if __name__ == "__main__":
    main()
