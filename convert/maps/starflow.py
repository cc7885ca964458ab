"""Official STARFlow checkpoint names → mlx-starflow names, applied once at conversion.

Each rule maps an official key pattern (`{b}` = block index, `{l}` = layer index) to ours.
The checkpoint also carries buffers the official model registers but never uses; they are
dropped by name. Keys outside `blocks.` (a learnable self-denoiser, EMA copies, buffers of later
versions) are what the official loader's `strict=False` ignores: they are dropped and reported.
Anything else under `blocks.`, or anything missing, is an error that lists the keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .rules import Matched, Rule, RuleTable

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")

CONVERTED_NAMESPACES = ("blocks.",)
"""Where the flow's weights live; an unknown key under it means the config does not fit."""

TABLE = RuleTable(
    (
        Rule("blocks.{b}.sos_embed", "blocks.{b}.sos"),
        Rule("blocks.{b}.proj_in.{p}", "blocks.{b}.proj_in.{p}"),
        Rule("blocks.{b}.proj_out.{p}", "blocks.{b}.proj_out.{p}"),
        Rule("blocks.{b}.proj_txt.{p}", "blocks.{b}.proj_txt.{p}"),
        Rule("blocks.{b}.attn_blocks.{l}.attention.norm.{p}", "blocks.{b}.layers.{l}.attention.norm.{p}"),
        Rule("blocks.{b}.attn_blocks.{l}.attention.qkv.{p}", "blocks.{b}.layers.{l}.attention.qkv.{p}"),
        Rule("blocks.{b}.attn_blocks.{l}.attention.proj.{p}", "blocks.{b}.layers.{l}.attention.proj.{p}"),
        Rule("blocks.{b}.attn_blocks.{l}.mlp.norm.{p}", "blocks.{b}.layers.{l}.mlp.norm.{p}"),
        Rule("blocks.{b}.attn_blocks.{l}.mlp.main.0.{p}", "blocks.{b}.layers.{l}.mlp.fc1.{p}"),
        Rule("blocks.{b}.attn_blocks.{l}.mlp.main.2.{p}", "blocks.{b}.layers.{l}.mlp.fc2.{p}"),
        Rule("blocks.{b}.final_norm.weight", "blocks.{b}.final_norm.weight"),
    ),
    slots={"b": r"\d+", "l": r"\d+", "p": r"weight|bias"},
)

# Registered by the official model for old checkpoints, never read: the `var` buffer, each
# block's tril `attn_mask` (attention uses is_causal) and the zero RoPE buffers.
DEPRECATED = (r"var", r"blocks\.\d+\.attn_mask", r"feat_rope\.freqs_(cos|sin)", r"feat_rope_gen\.freqs_(cos|sin)")
_DEPRECATED = tuple(re.compile(p + r"\Z") for p in DEPRECATED)


def strip_wrappers(key: str) -> str:
    """Remove DDP/compile/FSDP wrapper prefixes, however nested."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def is_deprecated(key: str) -> bool:
    return any(p.match(key) for p in _DEPRECATED)


def official_name(ours: str) -> str:
    """The official key of one of our names (the same table read backwards), for exporting."""
    return TABLE.source_name(ours)


def map_names(official: Iterable[str], expected: Iterable[str]) -> Matched:
    """Every parameter of the model placed from a whole checkpoint, and the foreign keys dropped.

    Raises `WeightsError` listing unknown keys under `blocks.`, missing and duplicated ones.
    """
    return TABLE.apply(
        ((strip_wrappers(key), key) for key in official),
        expected,
        what="checkpoint does not match the config",
        fix="is --config the YAML this checkpoint was trained with?",
        ignore=is_deprecated,
        namespaces=CONVERTED_NAMESPACES,
    )
