"""Hugging Face T5 checkpoint names -> `mlx_starflow.t5.T5Encoder` parameter names.

Only the encoder is kept. `{i}` is a layer index; an index at or above the config's
`num_layers` is an unknown key. The relative position table exists in layer 0 only and becomes
one shared parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from .rules import Rule, RuleTable

T = TypeVar("T")

TABLE = RuleTable(
    (
        Rule("shared.weight", "embedding.weight"),
        Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "relative_attention_bias.weight"),
        Rule("encoder.block.{i}.layer.0.layer_norm.weight", "layers.{i}.attention_norm.weight"),
        Rule("encoder.block.{i}.layer.0.SelfAttention.q.weight", "layers.{i}.attention.query.weight"),
        Rule("encoder.block.{i}.layer.0.SelfAttention.k.weight", "layers.{i}.attention.key.weight"),
        Rule("encoder.block.{i}.layer.0.SelfAttention.v.weight", "layers.{i}.attention.value.weight"),
        Rule("encoder.block.{i}.layer.0.SelfAttention.o.weight", "layers.{i}.attention.out.weight"),
        Rule("encoder.block.{i}.layer.1.layer_norm.weight", "layers.{i}.mlp_norm.weight"),
        Rule("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", "layers.{i}.mlp.gate.weight"),
        Rule("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", "layers.{i}.mlp.up.weight"),
        Rule("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "layers.{i}.mlp.down.weight"),
        Rule("encoder.final_layer_norm.weight", "final_norm.weight"),
    ),
    slots={"i": r"\d+"},
)

IGNORED_PREFIXES: tuple[str, ...] = ("decoder.",)
"""The decoder is never used: STARFlow conditions on encoder states only."""

IGNORED_KEYS: tuple[str, ...] = (
    "lm_head.weight",
    "encoder.embed_tokens.weight",
)
"""The language-model head, and the encoder's alias of `shared.weight` that `.bin` files repeat."""


def is_encoder_key(key: str) -> bool:
    """Whether the encoder needs this checkpoint key (so a shard without any need not be opened)."""
    return key == "shared.weight" or (key.startswith("encoder.") and key not in IGNORED_KEYS)


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def expected_names(num_layers: int) -> list[str]:
    """Our parameter names of an encoder with `num_layers` layers."""
    names = []
    for rule in TABLE.rules:
        indices = range(num_layers) if "{i}" in rule.target else (None,)
        names += [rule.target.format(i=i) for i in indices]
    return names


def map_t5_weights(checkpoint: Mapping[str, T], num_layers: int) -> dict[str, T]:
    """Rename an official checkpoint's encoder tensors; raise `WeightsError` on unknown or missing keys."""
    expected = expected_names(num_layers)
    matched = TABLE.apply(
        ((key, key) for key in checkpoint),
        expected,
        what=f"the checkpoint does not match a {num_layers}-layer T5 encoder",
        fix="check that config.json belongs to these weights",
        ignore=_ignored,
    )
    return {ours: checkpoint[matched.mapped[ours].key] for ours in expected}
