"""diffusers AutoencoderKL names → our `mlx_starflow.vae` names, as one ordered table of rules.

Accepted sources: current diffusers names (`to_q/to_k/to_v/to_out.0`), the pre-0.14 attention
names (`query/key/value/proj_attn`, as in the sd-vae-ft-ema repository), and the two layouts
STARFlow's fine-tuned decoder is saved in (`FINETUNED_LAYOUTS`), which are renamed to diffusers
names first. Convolution kernels go from PyTorch OIHW to MLX OHWI; linear weights stay [out, in].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mlx_starflow.errors import WeightsError

from .rules import Matched, Rule, RuleTable

OIHW_TO_OHWI = (0, 2, 3, 1)

PARAM = "{p}"
"""Slot for `weight` or `bias`; `{i}`/`{j}` are block and layer indices, `{part}` encoder/decoder."""


def _resnet_rules(source: str, target: str) -> list[Rule]:
    return [
        Rule(f"{source}.norm1.{PARAM}", f"{target}.norm1.{PARAM}"),
        Rule(f"{source}.conv1.{PARAM}", f"{target}.conv1.{PARAM}", OIHW_TO_OHWI),
        Rule(f"{source}.norm2.{PARAM}", f"{target}.norm2.{PARAM}"),
        Rule(f"{source}.conv2.{PARAM}", f"{target}.conv2.{PARAM}", OIHW_TO_OHWI),
        Rule(f"{source}.conv_shortcut.{PARAM}", f"{target}.shortcut.{PARAM}", OIHW_TO_OHWI),
    ]


ATTENTION_NAMES = (
    ("group_norm", "norm"),
    ("to_q", "query"),
    ("to_k", "key"),
    ("to_v", "value"),
    ("to_out.0", "out"),
    ("query", "query"),
    ("key", "key"),
    ("value", "value"),
    ("proj_attn", "out"),
)
"""Mid-block attention: current diffusers names, then the legacy ones for the same tensors."""

RULES: tuple[Rule, ...] = (
    Rule(f"{{part}}.conv_in.{PARAM}", f"{{part}}.conv_in.{PARAM}", OIHW_TO_OHWI),
    *_resnet_rules("encoder.down_blocks.{i}.resnets.{j}", "encoder.stages.{i}.resnets.{j}"),
    Rule(f"encoder.down_blocks.{{i}}.downsamplers.0.conv.{PARAM}", f"encoder.stages.{{i}}.downsample.conv.{PARAM}", OIHW_TO_OHWI),
    *_resnet_rules("{part}.mid_block.resnets.{j}", "{part}.mid.resnets.{j}"),
    *(
        Rule(f"{{part}}.mid_block.attentions.0.{source}.{PARAM}", f"{{part}}.mid.attention.{target}.{PARAM}")
        for source, target in ATTENTION_NAMES
    ),
    *_resnet_rules("decoder.up_blocks.{i}.resnets.{j}", "decoder.stages.{i}.resnets.{j}"),
    Rule(f"decoder.up_blocks.{{i}}.upsamplers.0.conv.{PARAM}", f"decoder.stages.{{i}}.upsample.conv.{PARAM}", OIHW_TO_OHWI),
    Rule(f"{{part}}.conv_norm_out.{PARAM}", f"{{part}}.norm_out.{PARAM}"),
    Rule(f"{{part}}.conv_out.{PARAM}", f"{{part}}.conv_out.{PARAM}", OIHW_TO_OHWI),
    Rule(f"quant_conv.{PARAM}", f"quant_conv.{PARAM}", OIHW_TO_OHWI),
    Rule(f"post_quant_conv.{PARAM}", f"post_quant_conv.{PARAM}", OIHW_TO_OHWI),
)

FINETUNED_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "sequential": (
        ("encoder.0.", "encoder."),
        ("encoder.1.", "quant_conv."),
        ("decoder.0.", "post_quant_conv."),
        ("decoder.1.", "decoder."),
    ),
    "wrapper": (("vae.", ""),),
    "diffusers": (
        ("encoder.", "encoder."),
        ("quant_conv.", "quant_conv."),
        ("post_quant_conv.", "post_quant_conv."),
        ("decoder.", "decoder."),
    ),
}
"""Prefix renames to diffusers names, tried in order; a file must fit one layout entirely.

`sequential`: `pytorch_model.bin` as STARFlow's `setup_vae` loads it (task px82zaheuu), an
AutoencoderKL saved as Sequential(encoder, quant_conv) / Sequential(post_quant_conv, decoder).
`wrapper`: `finetune_decoder.py`'s `torch.save(VAE.state_dict())`, every key under `vae.`.
`diffusers`: a plain AutoencoderKL state dict.
"""

TABLE = RuleTable(
    RULES,
    slots={"part": r"encoder|decoder", "i": r"\d+", "j": r"\d+", "p": r"weight|bias"},
    one_to_one=False,
)
"""Several legacy attention names fill one weight, so missing weights are named as ours."""


def finetuned_to_diffusers(names: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Detect a fine-tuned decoder file's layout and give `{diffusers name: name in the file}`."""
    names = list(names)
    for layout, prefixes in FINETUNED_LAYOUTS.items():
        renamed = {}
        for name in names:
            rename = next(((old, new) for old, new in prefixes if name.startswith(old)), None)
            if rename is None:
                break
            renamed[rename[1] + name[len(rename[0]) :]] = name
        else:
            if names:
                return layout, renamed
    heads = sorted({".".join(name.split(".")[:2]) for name in names})[:8]
    raise WeightsError(
        f"not a STARFlow fine-tuned VAE decoder: keys start with {heads}; expected `encoder.0./encoder.1./decoder.0./decoder.1.` "
        "(pytorch_model.bin) or `vae.` (finetune_decoder.py .pth) prefixes"
    )


def apply(names: Mapping[str, str], expected: Iterable[str], *, ignore_prefixes: tuple[str, ...] = ()) -> Matched:
    """Map `{diffusers name: key in the file}` onto our parameter names, or raise `WeightsError`.

    `expected` is the model's parameter names. A mapped name outside it whose target starts
    with one of `ignore_prefixes` is dropped (the frozen encoder inside a fine-tuned decoder
    file); any other unmatched name, a target named twice, or a parameter nobody fills is an error.
    """
    return TABLE.apply(
        names.items(),
        expected,
        what="VAE checkpoint does not match its config",
        fix="is config.json the one that belongs to these weights?",
        ignore_targets=ignore_prefixes,
    )
