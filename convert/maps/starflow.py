"""Official STARFlow checkpoint names → mlx-starflow names, applied once at conversion.

Each rule maps an official key pattern (`{b}` = block index, `{l}` = layer index) to ours.
The checkpoint also carries buffers the official model registers but never uses; they are
dropped by name. Anything else, or anything missing, is an error that lists the keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mlx_starflow.errors import WeightsError, listing

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")

RULES: tuple[tuple[str, str], ...] = (
    ("blocks.{b}.sos_embed", "blocks.{b}.sos"),
    ("blocks.{b}.proj_in.{p}", "blocks.{b}.proj_in.{p}"),
    ("blocks.{b}.proj_out.{p}", "blocks.{b}.proj_out.{p}"),
    ("blocks.{b}.proj_txt.{p}", "blocks.{b}.proj_txt.{p}"),
    ("blocks.{b}.attn_blocks.{l}.attention.norm.{p}", "blocks.{b}.layers.{l}.attention.norm.{p}"),
    ("blocks.{b}.attn_blocks.{l}.attention.qkv.{p}", "blocks.{b}.layers.{l}.attention.qkv.{p}"),
    ("blocks.{b}.attn_blocks.{l}.attention.proj.{p}", "blocks.{b}.layers.{l}.attention.proj.{p}"),
    ("blocks.{b}.attn_blocks.{l}.mlp.norm.{p}", "blocks.{b}.layers.{l}.mlp.norm.{p}"),
    ("blocks.{b}.attn_blocks.{l}.mlp.main.0.{p}", "blocks.{b}.layers.{l}.mlp.fc1.{p}"),
    ("blocks.{b}.attn_blocks.{l}.mlp.main.2.{p}", "blocks.{b}.layers.{l}.mlp.fc2.{p}"),
    ("blocks.{b}.final_norm.weight", "blocks.{b}.final_norm.weight"),
)

# Registered by the official model for old checkpoints, never read: the `var` buffer, each
# block's tril `attn_mask` (attention uses is_causal) and the zero RoPE buffers.
DEPRECATED = (r"var", r"blocks\.\d+\.attn_mask", r"feat_rope\.freqs_(cos|sin)", r"feat_rope_gen\.freqs_(cos|sin)")

_SLOTS = {"b": r"(?P<b>\d+)", "l": r"(?P<l>\d+)", "p": r"(?P<p>weight|bias)"}


def _compile(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern)
    for slot, regex in _SLOTS.items():
        escaped = escaped.replace(re.escape("{" + slot + "}"), regex)
    return re.compile(escaped + r"\Z")


_COMPILED = tuple((_compile(src), dst) for src, dst in RULES)
_REVERSED = tuple((_compile(dst), src) for src, dst in RULES)
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


def map_name(key: str) -> str | None:
    """Our name for an official key, or None if no rule matches."""
    for pattern, template in _COMPILED:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def official_name(ours: str) -> str:
    """The official key of one of our names (the same table read backwards), for exporting."""
    for pattern, template in _REVERSED:
        match = pattern.match(ours)
        if match:
            return template.format(**match.groupdict())
    raise KeyError(f"{ours} has no official name")


def map_names(official: Iterable[str], expected: Iterable[str]) -> dict[str, str]:
    """{our name: official key} for a whole checkpoint, checked against the model's names.

    Raises `WeightsError` listing unknown keys (no rule, not deprecated) and missing ones.
    """
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for key in official:
        name = strip_wrappers(key)
        if is_deprecated(name):
            continue
        ours = map_name(name)
        if ours is None:
            unknown.append(key)
        else:
            mapping[ours] = key
    expected = set(expected)
    unknown += [mapping.pop(ours) for ours in sorted(set(mapping) - expected)]
    missing = sorted(expected - set(mapping))
    if unknown or missing:
        raise WeightsError(
            f"checkpoint does not match the config: unknown keys {listing(unknown)}; missing keys {listing(missing)}"
        )
    return mapping

