"""The rules engine behind the three name maps: placement, reverse lookup and one report of every problem."""

from __future__ import annotations

import pytest

from mlx_starflow.convert.maps import starflow, t5, vae
from mlx_starflow.convert.maps.rules import Rule, RuleTable
from mlx_starflow.errors import WeightsError

TABLE = RuleTable(
    (
        Rule("net.{b}.w_in.{p}", "blocks.{b}.proj.{p}"),
        Rule("net.{b}.conv.weight", "blocks.{b}.conv.weight", (0, 2, 3, 1)),
    ),
    slots={"b": r"\d+", "p": r"weight|bias"},
)
EXPECTED = ["blocks.0.proj.weight", "blocks.0.proj.bias", "blocks.0.conv.weight"]


def pairs(*keys: str) -> list[tuple[str, str]]:
    return [(key, key) for key in keys]


def test_slots_fill_the_target_and_the_permutation_reshapes():
    placed = TABLE.map_name("net.0.conv.weight")
    assert (placed.target, placed.permutation) == ("blocks.0.conv.weight", (0, 2, 3, 1))
    assert placed.target_shape((8, 3, 5, 7)) == (8, 5, 7, 3)
    assert placed.target_shape((8,)) == (8,)
    assert TABLE.map_name("net.x.conv.weight") is None
    assert TABLE.map_name("net.0.w_in.weightx") is None


def test_the_table_reads_backwards():
    assert TABLE.source_name("blocks.12.proj.bias") == "net.12.w_in.bias"
    with pytest.raises(KeyError):
        TABLE.source_name("blocks.0.other")


def test_unknown_missing_and_duplicate_keys_are_reported_together():
    names = [("net.0.w_in.weight", "module.net.0.w_in.weight"), ("net.0.w_in.weight", "net.0.w_in.weight"),
             *pairs("net.0.conv.weight", "net.0.extra", "net.1.w_in.bias")]
    with pytest.raises(WeightsError) as caught:
        TABLE.apply(names, EXPECTED, what="toy checkpoint does not fit", fix="pass the right config")
    message = str(caught.value)
    assert message.startswith("toy checkpoint does not fit: ")
    assert "unknown keys [net.0.extra, net.1.w_in.bias]" in message
    assert "missing keys [net.0.w_in.bias]" in message
    assert "given twice: [module.net.0.w_in.weight and net.0.w_in.weight]" in message
    assert message.endswith("; pass the right config") and "\n" not in message


def test_foreign_namespaces_are_dropped_and_ignored_names_skipped():
    names = pairs("net.0.w_in.weight", "net.0.w_in.bias", "net.0.conv.weight", "ema.net.0.w_in.weight", "denoiser.x", "var")
    matched = TABLE.apply(names, EXPECTED, what="w", fix="f", ignore=lambda name: name == "var", namespaces=("net.",))
    assert matched.dropped == ("ema.net.0.w_in.weight", "denoiser.x")
    assert matched.keys() == {"blocks.0.proj.weight": "net.0.w_in.weight", "blocks.0.proj.bias": "net.0.w_in.bias",
                              "blocks.0.conv.weight": "net.0.conv.weight"}
    with pytest.raises(WeightsError, match=r"unknown keys \[net\.0\.surprise\]"):
        TABLE.apply([*names, ("net.0.surprise", "net.0.surprise")], EXPECTED, what="w", fix="f", namespaces=("net.",))


def test_targets_under_ignored_prefixes_are_skipped():
    names = pairs("net.0.w_in.weight", "net.0.w_in.bias", "net.0.conv.weight", "net.7.w_in.weight")
    matched = TABLE.apply(names, EXPECTED, what="w", fix="f", ignore_targets=("blocks.7.",))
    assert set(matched.mapped) == set(EXPECTED) and matched.dropped == ()


def test_flow_map_round_trips_and_tolerates_foreign_keys():
    ours = "blocks.5.layers.23.mlp.fc2.bias"
    assert starflow.official_name(ours) == "blocks.5.attn_blocks.23.mlp.main.2.bias"
    matched = starflow.map_names(["_orig_mod.blocks.5.attn_blocks.23.mlp.main.2.bias", "blocks.0.attn_mask", "denoiser.w"], [ours])
    assert matched.keys() == {ours: "_orig_mod.blocks.5.attn_blocks.23.mlp.main.2.bias"}
    assert matched.dropped == ("denoiser.w",)


def test_t5_map_lists_missing_weights_by_their_checkpoint_names():
    keys = {key: key for key in ("shared.weight", "decoder.block.0.layer.0.SelfAttention.q.weight", "lm_head.weight")}
    with pytest.raises(WeightsError, match=r"missing keys \[encoder\.block\.0\.layer\.0\.SelfAttention\.k\.weight"):
        t5.map_t5_weights(keys, num_layers=1)
    assert t5.is_encoder_key("shared.weight") and not t5.is_encoder_key("decoder.final_layer_norm.weight")
    assert not t5.is_encoder_key("encoder.embed_tokens.weight")


def test_vae_map_accepts_legacy_attention_names_but_not_both():
    expected = ["decoder.mid.attention.query.weight"]
    legacy = vae.apply({"decoder.mid_block.attentions.0.query.weight": "q"}, expected)
    assert legacy.keys() == {"decoder.mid.attention.query.weight": "q"}
    both = {"decoder.mid_block.attentions.0.query.weight": "q", "decoder.mid_block.attentions.0.to_q.weight": "to_q"}
    with pytest.raises(WeightsError, match=r"the same weight given twice: \[q and to_q\]"):
        vae.apply(both, expected)
