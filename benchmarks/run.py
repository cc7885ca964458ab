"""`make bench`: speed against the machine's own bandwidth ceiling, Jacobi on trained weights,
batch throughput, converter memory and precision, printed as Markdown tables and written to
build/bench.json.

Benchmarks, not tests: nothing here asserts a time. Every report starts with the machine and
MLX backend it was measured on; compare figures only within one report. `--only` runs some
sections and updates only their keys in an existing bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from . import (batch_throughput, ceiling, converter_memory, editing_cost, flow_speed, full_width, jacobi_trained,
               overheads, precision, projection)

SECTIONS = ("deep", "overheads", "jacobi", "batch", "sampling", "editing", "memory", "precision")
"""deep: full-width steps vs the ceiling; overheads: where else a step's time goes; jacobi: the
trained demo model's sweep; batch: images/s per batch size; sampling: reduced-width samplers on
random weights and the denoise memory; editing: invert and rank as ratios to a sampling run;
memory: converter peak RSS; precision: dtypes vs float32."""
DEFAULT_JSON = Path("build") / "bench.json"
OPENBLAS_HINT = "apt-get install libopenblas0-pthread (then make bench BLAS=openblas)"


def backend() -> str:
    """MLX's backend in use: cpu, metal or cuda."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def preloaded_blas() -> str | None:
    """The preloaded BLAS, after checking it exists (the dynamic loader only warns when it does not)."""
    libraries = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    for library in libraries:
        if not Path(library).is_file():
            sys.exit(f"make bench: the preloaded library {library} does not exist; install it with {OPENBLAS_HINT}, "
                     f"or run without BLAS=/BLAS_PRELOAD=")
    return ", ".join(os.path.basename(library) for library in libraries) or None


def machine(blas: str | None) -> str:
    note = f", BLAS preloaded: {blas}" if blas else ""
    return (f"Measured on {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
            f"MLX {mx.__version__} on {mx.default_device()}{note}.")


def write_json(path: Path, record: dict, partial: bool) -> None:
    """Write the run's record; a partial run (`--only`) keeps the other sections' keys of an earlier file."""
    previous = json.loads(path.read_text()) if partial and path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**previous, **record}, indent=1) + "\n")


def project(path: Path) -> None:
    """The Mac projection from the best deep variant's fraction of ceiling and the recommended
    Jacobi setting's weighted-pass ratio, once bench.json holds both (from this run or earlier)."""
    figures = json.loads(path.read_text()) if path.is_file() else {}
    best, jacobi = figures.get("best_deep_variant"), figures.get("jacobi_trained_best")
    if not (best and jacobi):
        return
    fraction = figures["deep_step"][best]["fraction_of_ceiling"]
    ratio = figures["jacobi_trained"][jacobi]["weighted_pass_ratio"]
    table, record = projection.run(fraction, ratio, f"{best} deep step, {figures['backend']} here",
                                   f"{jacobi}, demo model")
    print(table, end="\n\n", flush=True)
    write_json(path, record, partial=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=SECTIONS, action="append", help="Run only these sections (repeatable).")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="Where to write the figures (default: %(default)s).")
    parser.add_argument("--width", type=int, default=full_width.REAL_WIDTH,
                        help="Width of the full-width step sections (real model: %(default)s; smaller for a quick run).")
    parser.add_argument("--layers", type=int, default=2,
                        help="Deep-block layers run per float variant, time scaled to 24 (default: %(default)s).")
    parser.add_argument("--quantized-layers", type=int, default=1,
                        help="Deep-block layers run per quantised variant (slow on CPU; default: %(default)s).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per step, best taken (default: %(default)s).")
    parser.add_argument("--batch-width", type=int, default=batch_throughput.WIDTH,
                        help="Width of the batch-throughput section (default: %(default)s).")
    parser.add_argument("--sampling-width", type=int, default=256,
                        help="Width of the reduced-width sampling section (default: %(default)s).")
    parser.add_argument("--checkpoint-width", type=int, default=1152,
                        help="Width of the synthetic checkpoint for the memory section (1152 gives 2.2 GB).")
    args = parser.parse_args()
    sections = args.only or SECTIONS
    blas = preloaded_blas()
    print(machine(blas), end="\n\n", flush=True)
    record: dict = {"backend": backend(), "device": str(mx.default_device()), "mlx": mx.__version__,
                    "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores", "blas": blas}

    if {"deep", "overheads"} & set(sections):
        limit = ceiling.measure()
        record["ceiling_gbps"] = limit.gbps
        record["ceiling_readings_gbps"] = limit.readings
        print(f"Read-bandwidth ceiling at the start of the run: {limit.gbps:.1f} GB/s ({limit.best}; "
              + ", ".join(f"{name} {value:.1f}" for name, value in limit.readings.items()) + ")", end="\n\n", flush=True)

    runs: dict[str, Callable[[], tuple[str, dict]]] = {
        "deep": lambda: full_width.run(lambda: ceiling.measure().gbps, args.width, args.layers, args.quantized_layers,
                                       args.repeats),
        "overheads": lambda: overheads.run(args.width, lambda: ceiling.measure().gbps, 1, args.repeats,
                                           record.get("deep_step", {}).get("float32", {}).get("ms")),
        "jacobi": jacobi_trained.run,
        "batch": lambda: batch_throughput.run(args.batch_width, 2, args.repeats),
        "sampling": lambda: flow_speed.run(args.sampling_width, 32),
        "editing": lambda: editing_cost.run(args.repeats),
        "memory": lambda: converter_memory.run(args.checkpoint_width),
        "precision": precision.run,
    }
    for section in SECTIONS:
        if section in sections:
            table, figures = runs[section]()
            record.update(figures)
            print(table, end="\n\n", flush=True)
            write_json(args.json, record, partial=args.only is not None)
    project(args.json)
    print(f"Figures written to {args.json}.")


if __name__ == "__main__":
    main()
