"""Core ML weight compression (`--compress`), restricted to the big linear weights.

Distinct from the MLX `--quantize` of `starflow convert`: this is Core ML's own weight storage:
int8/int4 linear quantisation, or palettization (`palette4|6|8`: each weight an n-bit index
into a 16/64/256-entry lookup table shared by a group of output channels, the iOS 18 /
macOS 15 per-grouped-channel format the Neural Engine reads natively). Only weights above a
size threshold are compressed, so the causal masks, RoPE tables, norms and the small
input/output projections stay exact (a global config would compress the mask and tables too).

Two routes, same formats. Flow blocks are compressed while their programs are built
(`WeightCompression`): the score step's backward pass multiplies by the same weights as the
forward linears, and coremltools' compressors refuse a constant shared by ops with different
channel axes, so the block emits the decompressing op itself and every function of the package
(steps, prefill, forward, vjp) reads that one compressed copy. Other packages (the text
encoder) are compressed after conversion with coremltools (`compress_model`); palettization
passes coremltools our own NumPy k-means (`palette`), so scikit-learn is never needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mlx_starflow.errors import ConfigError, InputError

from .coremltools_api import Var, cto, mb, np_int4_dtype, palette_index_dtype, quiet

PALETTES = {"palette4": 4, "palette6": 6, "palette8": 8}
COMPRESSIONS = ("int8", "int4", *PALETTES)
INT4_BLOCK = 32
PALETTE_GROUP = 16
"""Output channels sharing one lookup table by default: the group size of Apple's
per-grouped-channel examples for iOS 18; coremltools' own default is 32."""
KMEANS_ITERATIONS = 300


def palette(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """(lookup table of 2**nbits sorted centroids, index of each value's nearest centroid): Lloyd's
    k-means in one dimension, on sorted values with prefix sums, so each iteration costs
    O(2**nbits · log n) after one sort. It starts from the high-resolution optimum (centroid
    density ∝ value density^(1/3), Panter-Dite), which spends more entries on the tails than
    quantiles do: on heavy-tailed (Student-t) groups of 16×3072 it reached a 1.3× (6 bits) to
    4× (8 bits) lower squared error than a quantile start, in fewer iterations."""
    flat = np.asarray(values, np.float64).reshape(-1)
    ordered = np.sort(flat)
    sums = np.concatenate([[0.0], np.cumsum(ordered)])
    k = 1 << nbits
    counts, edges = np.histogram(ordered, bins=8 * k)
    density = np.concatenate([[0.0], np.cumsum(counts ** (1 / 3))])
    centers = np.interp((np.arange(k) + 0.5) / k, density / density[-1], edges)
    for _ in range(KMEANS_ITERATIONS):
        bounds = np.concatenate([[0], np.searchsorted(ordered, (centers[1:] + centers[:-1]) / 2), [ordered.size]])
        counts = np.diff(bounds)
        means = (sums[bounds[1:]] - sums[bounds[:-1]]) / np.maximum(counts, 1)
        updated = np.sort(np.where(counts > 0, means, centers))
        if np.array_equal(updated, centers):
            break
        centers = updated
    indices = np.searchsorted((centers[1:] + centers[:-1]) / 2, flat)
    return centers.astype(np.float32), indices.astype(np.uint8)


def palette_function(nbits: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`palette` in the shape coremltools' custom palettizer mode expects (LUT in the weight's dtype)."""

    def lut_function(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lut, indices = palette(values, nbits)
        return lut.astype(values.dtype), indices

    return lut_function


def compression_config(kind: str, threshold: int, group_size: int = PALETTE_GROUP):
    """int8: symmetric per output channel; int4: symmetric per block of 32 input weights (iOS 18);
    paletteN: an N-bit k-means table per group of `group_size` output channels (iOS 18)."""
    if kind == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=threshold)
    if kind == "int4":
        return cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=INT4_BLOCK, weight_threshold=threshold
        )
    if kind in PALETTES:
        return cto.OpPalettizerConfig(mode="custom", lut_function=palette_function(PALETTES[kind]), granularity="per_grouped_channel",
                                      group_size=group_size, channel_axis=0, weight_threshold=threshold)
    raise ValueError(f"compression must be one of {COMPRESSIONS}, not {kind!r}")


def compress_model(model, kind: str, op_thresholds: dict[str, int], group_size: int = PALETTE_GROUP):
    """`model` with the weights of the given op types (above each type's threshold) compressed."""
    configs = {op_type: compression_config(kind, threshold, group_size) for op_type, threshold in op_thresholds.items()}
    compress = cto.palettize_weights if kind in PALETTES else cto.linear_quantize_weights
    with quiet():
        return compress(model, cto.OptimizationConfig(op_type_configs=configs))


@dataclass(frozen=True)
class WeightCompression:
    """Compression applied as a program is built, for kernels (out, in, …) with more than
    `threshold` elements: int8 symmetric per output channel, int4 symmetric per block of 32
    input weights, or an N-bit palette per `group_size` output channels. The same formats as
    `compression_config`."""

    kind: str
    threshold: int
    group_size: int = PALETTE_GROUP

    def __post_init__(self) -> None:
        if self.kind not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, not {self.kind!r}")

    def applies(self, array: np.ndarray) -> bool:
        return array.ndim >= 2 and array.size > self.threshold

    def constant(self, array: np.ndarray, dtype: type) -> Var:
        """A constexpr op that decompresses to `array` (rounded) in `dtype`."""
        if self.kind in PALETTES:
            return self._palettized(np.asarray(array, np.float32), dtype)
        weight = np.asarray(array, np.float32)
        if self.kind == "int8":
            levels, blocks = 127, weight.reshape(weight.shape[0], 1, -1)
        else:
            if weight.shape[1] % INT4_BLOCK:
                raise InputError(f"int4 compression needs input widths divisible by {INT4_BLOCK}, not {weight.shape[1]}")
            levels, blocks = 7, weight.reshape(weight.shape[0], weight.shape[1] // INT4_BLOCK, -1)
        scale = np.abs(blocks).max(axis=-1, keepdims=True) / levels
        scale[scale == 0] = 1.0
        scale = scale.astype(dtype)
        data = np.clip(np.round(blocks / scale.astype(np.float32)), -levels - 1, levels).reshape(weight.shape)
        scale_shape = [weight.shape[0], blocks.shape[1]] + [1] * (weight.ndim - 2)
        data = data.astype(np.int8) if self.kind == "int8" else data.astype(np.int8).astype(np_int4_dtype)
        return mb.constexpr_blockwise_shift_scale(data=data, scale=scale.reshape(scale_shape))

    def _palettized(self, weight: np.ndarray, dtype: type) -> Var:
        """A `constexpr_lut_to_dense`: one table per group of output channels, indices in the
        kernel's own shape. The table is rounded to `dtype` before the nearest entries are picked."""
        nbits, out = PALETTES[self.kind], weight.shape[0]
        if out % self.group_size:
            raise ConfigError(f"--palette-group-size {self.group_size} does not divide a kernel's {out} output channels; "
                              "pick a group size that divides the model width (16 or 32 for the released models)")
        groups = weight.reshape(out // self.group_size, -1)
        luts, indices = np.empty((groups.shape[0], 1 << nbits), dtype), np.empty(groups.shape, np.uint8)
        for g, values in enumerate(groups):
            lut = np.sort(palette(values, nbits)[0].astype(dtype))
            luts[g] = lut
            edges = (lut[1:].astype(np.float64) + lut[:-1].astype(np.float64)) / 2
            indices[g] = np.searchsorted(edges, values.astype(np.float64))
        lut_shape = [groups.shape[0]] + [1] * (weight.ndim - 1) + [1 << nbits, 1]
        return mb.constexpr_lut_to_dense(indices=indices.reshape(weight.shape).astype(palette_index_dtype(nbits)),
                                          lut=luts.reshape(lut_shape))


def bytes_per_weight(precision: str, compression: str | None) -> float:
    """Storage per compressed weight: int4 carries one float16 scale per block of 32; a palette's
    tables (2**N float16 entries per group of channels) add at most about 1% to its
    indices at the released widths (16 channels × 3072 inputs) and are left out."""
    if compression == "int8":
        return 1.0
    if compression == "int4":
        return 0.5 + 2.0 / INT4_BLOCK
    if compression in PALETTES:
        return PALETTES[compression] / 8
    return 2.0 if precision == "float16" else 4.0
