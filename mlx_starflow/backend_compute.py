"""How the flow's linears and cached attention run on the backend that computes them.

A sampling step multiplies one or two rows (a token, with its guidance row) by every weight
matrix and attends over the cache, so its speed is how fast those stream the weights and the
cache. On a GPU, MLX's own layout and kernels are the fast ones and nothing here changes. On
MLX's CPU backend a product runs either in the BLAS (float32) or in MLX's own single-threaded
kernels (half precision, quantised, attention), and three arrangements fix what is slow,
without changing a weight's name, shape or values, or any result's bits but the first's:

- With a multi-threaded BLAS (OpenBLAS, MKL or BLIS preloaded on Linux), float32
  products stream a row-major (in, out) matrix much faster for so few rows than the (out, in)
  one `nn.Linear` keeps. The weight becomes a transposed view of an (in, out) buffer: every
  reader (saving, exporting, the score step) still sees (out, in).
- Products that run on one thread (half precision, quantised, and float32 with the reference
  BLAS the Linux `mlx[cpu]` wheel bundles) are split by output rows into one contiguous slice
  per core, each multiplied on its own CPU stream; a slice of rows is a view, and each output
  column is computed as before, so results are bit-identical.
- A cached step's attention runs each batch row (a guidance row, an image) on its own CPU
  stream; rows never mix in attention, so this too is bit-identical.

`make bench ONLY=deep` measures them against the way they ran before.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

THREADED_BLAS_PREFIXES = ("libopenblas", "libmkl_rt", "libmkl_core", "libblis")
"""Libraries whose presence in the process means MLX's float32 products run multi-threaded."""
MIN_SPLIT_WEIGHTS = 1 << 21
"""Weights (2M: a 1536 × 1536 matrix) below which a product is not split: synchronising the
streams would cost more than the second core gives back."""
MAX_STREAMS = 8
"""Most CPU streams a product or an attention is split across."""
MIN_SPLIT_CACHE = 1 << 20
"""Cached keys per row (heads × positions × head dim: 1M, e.g. 48 heads × 340 positions × 64)
below which attention is not split by rows."""


@lru_cache(maxsize=None)
def threaded_blas() -> bool:
    """Whether MLX's CPU backend multiplies float32 in a multi-threaded BLAS on Linux: a library
    in `THREADED_BLAS_PREFIXES` mapped into this process (the `mlx[cpu]` wheel's own BLAS is the
    single-threaded reference one)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    paths = (line.split()[-1] for line in maps.splitlines() if line.count(" ") >= 5)
    return any(Path(path).name.startswith(THREADED_BLAS_PREFIXES) for path in paths if path.startswith("/"))


def arrangement(linear: nn.Module, device: mx.Device | None = None) -> str | None:
    """How `linear` runs fastest on `device` (default: MLX's default device): "input_major",
    "split", or None to leave it as it is (any GPU; float32 on macOS, whose Accelerate BLAS
    was not measured here)."""
    device = device or mx.default_device()
    if device.type != mx.DeviceType.cpu:
        return None
    float32 = type(linear) is nn.Linear and linear.weight.dtype == mx.float32
    if float32 and platform.system() == "Darwin":
        return None
    if float32 and threaded_blas():
        return "input_major"
    if split_count(device) > 1 and type(linear) in _SPLIT and _weight_count(linear) >= MIN_SPLIT_WEIGHTS:
        return "split"
    return None


def split_count(device: mx.Device | None = None) -> int:
    """Streams a single-threaded product is split across on `device`: one per core on the CPU
    (at most `MAX_STREAMS`), none on a GPU."""
    device = device or mx.default_device()
    return min(os.cpu_count() or 1, MAX_STREAMS) if device.type == mx.DeviceType.cpu else 1


@lru_cache(maxsize=None)
def _cpu_streams(count: int) -> tuple[mx.Stream, ...]:
    return tuple(mx.new_stream(mx.cpu) for _ in range(count))


def _row_slices(rows: int, parts: int) -> list[slice]:
    bounds = [rows * k // parts for k in range(parts + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def attend(q: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array) -> mx.array:
    """Scaled dot-product attention of a cached step, (B, heads, n, head_dim): on the CPU
    backend with several rows and a long enough cache, each row attends on its own CPU stream."""
    rows = q.shape[0]
    streams = min(rows, split_count())
    if streams < 2 or keys[0].size < MIN_SPLIT_CACHE:
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    outputs = []
    for stream, part in zip(_cpu_streams(streams), _row_slices(rows, streams)):
        with mx.stream(stream):
            outputs.append(mx.fast.scaled_dot_product_attention(q[part], keys[part], values[part], scale=scale, mask=mask))
    return mx.concatenate(outputs, axis=0)


def _split_rows(x: mx.array, module: nn.Module, product: Callable[[mx.array, slice], mx.array]) -> mx.array:
    """`product(x, rows)` for each slice of the module's output rows on its own CPU stream,
    joined along the output axis."""
    slices = _row_slices(module.weight.shape[0], module.streams)
    outputs = []
    for stream, rows in zip(_cpu_streams(module.streams), slices):
        with mx.stream(stream):
            outputs.append(product(x, rows))
    return mx.concatenate(outputs, axis=-1)


class SplitLinear(nn.Linear):
    """`nn.Linear` whose product is split by output rows across CPU streams."""

    streams: int = 1

    def __call__(self, x: mx.array) -> mx.array:
        def product(x: mx.array, rows: slice) -> mx.array:
            weight = self["weight"][rows].T
            return mx.addmm(self["bias"][rows], x, weight) if "bias" in self else x @ weight

        return _split_rows(x, self, product)


class SplitQuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose product is split by output rows across CPU streams."""

    streams: int = 1

    def __call__(self, x: mx.array) -> mx.array:
        def product(x: mx.array, rows: slice) -> mx.array:
            biases = self.get("biases")
            out = mx.quantized_matmul(x, self["weight"][rows], scales=self["scales"][rows],
                                      biases=None if biases is None else biases[rows], transpose=True,
                                      group_size=self.group_size, bits=self.bits, mode=self.mode)
            return out + self["bias"][rows] if "bias" in self else out

        return _split_rows(x, self, product)


def arrange_for_backend(module: nn.Module, evaluate: bool = True, device: mx.Device | None = None) -> dict[str, int]:
    """Arrange every linear in `module` for `device` (default: MLX's default device), in place.

    A moved weight is copied one matrix at a time when `evaluate`; otherwise the copy stays
    lazy and happens when the weights are first read. A split linear changes class only (to
    the subclass above), keeping its parameters. Returns how many linears were moved to
    (in, out) storage and how many were split.
    """
    counts = {"input_major": 0, "split": 0}
    for _, child in module.named_modules():
        kind = arrangement(child, device)
        if kind == "input_major":
            child.weight = mx.contiguous(child.weight.T).T
            if evaluate:
                mx.eval(child.weight)
        elif kind == "split":
            child.__class__ = _SPLIT[type(child)]
            child.streams = split_count(device)
        if kind:
            counts[kind] += 1
    return counts


_SPLIT = {nn.Linear: SplitLinear, nn.QuantizedLinear: SplitQuantizedLinear}


def _weight_count(linear: nn.Module) -> int:
    rows, columns = linear.weight.shape
    return rows * columns * (32 // linear.bits if isinstance(linear, nn.QuantizedLinear) else 1)
