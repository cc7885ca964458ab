"""Core ML weight compression (`--compress`), restricted to the big linear weights.

Distinct from the MLX `--quantize` of `starflow convert`: this is coremltools'
`ct.optimize.coreml` on the converted model. Only the op types named by the caller are
compressed, and only weights above a size threshold, so the causal masks, RoPE tables, norms
and the small input/output projections stay exact (a global config would quantise the mask
and tables too).
"""

from __future__ import annotations

from .coremltools_api import cto, quiet

COMPRESSIONS = ("int8", "int4")
INT4_BLOCK = 32


def compression_config(kind: str, threshold: int):
    """int8: symmetric per output channel; int4: symmetric per block of 32 input weights (iOS 18)."""
    if kind == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=threshold)
    if kind == "int4":
        return cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=INT4_BLOCK, weight_threshold=threshold
        )
    raise ValueError(f"compression must be one of {COMPRESSIONS}, not {kind!r}")


def compress_model(model, kind: str, op_thresholds: dict[str, int]):
    """`model` with the weights of the given op types (above each type's threshold) compressed."""
    configs = {op_type: compression_config(kind, threshold) for op_type, threshold in op_thresholds.items()}
    with quiet():
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(op_type_configs=configs))


def bytes_per_weight(precision: str, compression: str | None) -> float:
    """Storage per compressed weight: int4 carries one float16 scale per block of 32."""
    if compression == "int8":
        return 1.0
    if compression == "int4":
        return 0.5 + 2.0 / INT4_BLOCK
    return 2.0 if precision == "float16" else 4.0

