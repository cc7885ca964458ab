"""The machine's own read-bandwidth ceiling: the best large-array reduction in MLX and in NumPy.

Token-by-token sampling reads every weight once per step, so the useful figure for a step is
its effective bandwidth as a fraction of what this machine can read at all. Each library
reduces a 1 GiB float32 array two ways, a plain sum and row sums by a matrix-vector product
(the BLAS path, multi-threaded where the BLAS is); the best of all is the ceiling. It is
measured in the same process as the steps, so both see the same load from other processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .timing import best_seconds

ARRAY_BYTES = 1 << 30
"""1 GiB: far larger than any cache, small enough to sit beside the benchmark models."""
ROW = 1024


@dataclass(frozen=True)
class Ceiling:
    readings: dict[str, float]
    """GB/s per (library, reduction), e.g. {"mlx sum": 3.5, "numpy row sums": 13.1}."""

    @property
    def gbps(self) -> float:
        return max(self.readings.values())

    @property
    def best(self) -> str:
        return max(self.readings, key=self.readings.get)


def measure(nbytes: int = ARRAY_BYTES, repeats: int = 5) -> Ceiling:
    """GB/s of reading a float32 array of `nbytes` once, best of `repeats`, per library and reduction."""
    shape = (nbytes // 4 // ROW, ROW)
    readings = {}
    array, ones = mx.ones(shape, dtype=mx.float32), mx.ones((ROW,), dtype=mx.float32)
    mx.eval(array, ones)
    readings["mlx sum"] = nbytes / best_seconds(lambda: mx.eval(mx.sum(array)), repeats) / 1e9
    readings["mlx row sums"] = nbytes / best_seconds(lambda: mx.eval(array @ ones), repeats) / 1e9
    del array
    host, host_ones = np.ones(shape, dtype=np.float32), np.ones(ROW, dtype=np.float32)
    readings["numpy sum"] = nbytes / best_seconds(host.sum, repeats) / 1e9
    readings["numpy row sums"] = nbytes / best_seconds(lambda: host @ host_ones, repeats) / 1e9
    return Ceiling(readings)
