"""Hugging Face T5 checkpoint names -> `mlx_starflow.t5.T5Encoder` parameter names.

Only the encoder is kept. `{i}` stands for a layer index below the config's `num_layers`; the
relative position table exists in layer 0 only and becomes one shared parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from mlx_starflow.errors import WeightsError, listing

T = TypeVar("T")

RULES: tuple[tuple[str, str], ...] = (
    ("shared.weight", "embedding.weight"),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "relative_attention_bias.weight"),
    ("encoder.block.{i}.layer.0.layer_norm.weight", "layers.{i}.attention_norm.weight"),
    ("encoder.block.{i}.layer.0.SelfAttention.q.weight", "layers.{i}.attention.query.weight"),
    ("encoder.block.{i}.layer.0.SelfAttention.k.weight", "layers.{i}.attention.key.weight"),
    ("encoder.block.{i}.layer.0.SelfAttention.v.weight", "layers.{i}.attention.value.weight"),
    ("encoder.block.{i}.layer.0.SelfAttention.o.weight", "layers.{i}.attention.out.weight"),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "layers.{i}.mlp_norm.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", "layers.{i}.mlp.gate.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", "layers.{i}.mlp.up.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "layers.{i}.mlp.down.weight"),
    ("encoder.final_layer_norm.weight", "final_norm.weight"),
)

IGNORED_PREFIXES: tuple[str, ...] = ("decoder.",)
"""The decoder is never used: STARFlow conditions on encoder states only."""

IGNORED_KEYS: tuple[str, ...] = (
    "lm_head.weight",
    "encoder.embed_tokens.weight",
)
"""The language-model head, and the encoder's alias of `shared.weight` that `.bin` files repeat."""


def expand_rules(num_layers: int) -> dict[str, str]:
    """Every official key an encoder with `num_layers` layers must have, with its new name."""
    names: dict[str, str] = {}
    for official, ours in RULES:
        indices = range(num_layers) if "{i}" in official else (None,)
        for i in indices:
            names[official.format(i=i)] = ours.format(i=i)
    return names


def map_t5_weights(checkpoint: Mapping[str, T], num_layers: int) -> dict[str, T]:
    """Rename an official checkpoint's encoder tensors; raise `WeightsError` on unknown or missing keys."""
    names = expand_rules(num_layers)
    ignored = {key for key in checkpoint if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)}
    unknown = sorted(set(checkpoint) - set(names) - ignored)
    missing = sorted(set(names) - set(checkpoint))
    if unknown or missing:
        raise WeightsError(
            f"the checkpoint does not match a {num_layers}-layer T5 encoder: "
            f"unknown keys {listing(unknown)}; missing keys {listing(missing)}; "
            "check that config.json belongs to these weights"
        )
    return {ours: checkpoint[official] for official, ours in names.items()}

