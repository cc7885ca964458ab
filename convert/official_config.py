"""The official YAML model config (`arguments:` list of `key: value`) → our `FlowConfig`.

The official code turns each entry into a `--key value` flag of `train.get_tarflow_parser()`,
so absent keys take that parser's defaults, which are repeated here. What the YAML lacks comes
from the checkpoint: `txt_dim` (the deep block's `proj_txt` input width). YAML `img_size` is in
pixels when a VAE is configured (`sample.py` divides it by the VAE factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlx_starflow.config import MAX_LAYERS, MAX_TOKENS, MAX_WIDTH, FlowConfig
from mlx_starflow.errors import ConfigError

# Parser defaults of the official `train.get_tarflow_parser()` for the keys that shape the model.
MODEL_DEFAULTS: dict[str, Any] = {
    "img_size": 32, "channel_size": 3, "txt_size": 0, "sos": 0, "seq_order": "R2L", "patch_size": 4,
    "channels": 512, "top_block_channels": None, "blocks": 4, "layers_per_block": 8, "rope": 0,
    "pt_seq_len": None, "head_dim": 64, "num_heads": None, "num_kv_heads": None, "use_softplus": 0,
    "cond_top_only": 0, "use_swiglu": 0, "use_qk_norm": 0, "use_post_norm": 0, "use_final_norm": 0,
    "use_bias": 1, "norm_type": "layer_norm", "use_pretrained_lm": None, "use_mm_attn": 0, "soft_clip": 0.0,
    "learnable_self_denoiser": 0, "conditional_denoiser": 0, "noise_embed_denoiser": 0, "temporal_causal": 0,
    "shallow_block_local": 0, "denoiser_window": None, "local_attn_window": None, "noise_std": 0.3,
    "noise_type": "gaussian", "cond_noise_level": 0, "drop_label": 0.0, "latent_norm_regularization": 0.0,
    "vae": None, "text": None, "vid_size": None, "fps_cond": 0, "mix_aspect": 0,
}

# Parser flags that do not change the model's math (training, data, infrastructure, sampling).
NO_MODEL_EFFECT = frozenset({
    "model_config_path", "train_seed", "data", "logdir", "dataset", "wds", "no_flip", "caption_column",
    "secondary_dataset", "secondary_img_size", "secondary_vid_size", "vae_decoder_factor", "finetuned_vae",
    "adaln", "nvp", "batch_size", "secondary_batch_size", "secondary_ratio", "acc", "fp8", "use_8bit_adam",
    "epochs", "epoch_length", "lr", "min_lr", "drop_image", "last_frame_cond", "video_to_video", "resume_path",
    "resume_epoch", "warmup_steps", "fsdp", "fsdp_text_encoder", "gradient_checkpoint", "gradient_checkpoint_mlp",
    "compile", "loss_scaling", "grad_clip", "grad_skip", "dry_run", "wandb_name", "save_every", "sample_freq",
    "cfg", "num_samples", "sample_batch_size",
})

# Switches of the official Model this port does not implement, with the value it requires.
REQUIRED_VALUES: dict[str, Any] = {
    "rope": 1, "sos": 1, "use_swiglu": 0, "use_qk_norm": 0, "use_post_norm": 0, "norm_type": "layer_norm",
    "use_pretrained_lm": None, "use_mm_attn": 0, "learnable_self_denoiser": 0, "temporal_causal": 0,
    "shallow_block_local": 0, "local_attn_window": None, "vid_size": None, "fps_cond": 0, "cond_noise_level": 0,
    "mix_aspect": 0, "noise_type": "gaussian",
}

SD_VAE_FACTOR = 8


@dataclass(frozen=True)
class OfficialConfig:
    """The parsed YAML: every model-shaping argument, defaults filled in."""

    args: dict[str, Any]
    path: Path

    @property
    def is_label_model(self) -> bool:
        return str(self.args.get("text") or "").endswith(".vocab")

    @property
    def text_encoder(self) -> str | None:
        return self.args.get("text")

    @property
    def vae(self) -> str | None:
        return self.args.get("vae")


MAX_YAML_BYTES = 1 << 20
"""The official configs are about 1 KB."""
_SCALARS = (str, int, float, bool, type(None))


def _is_plain(value: Any) -> bool:
    """A scalar, or a short list of scalars (`layers_per_block`): nothing whose str() could explode."""
    return isinstance(value, _SCALARS) or (isinstance(value, list) and len(value) <= MAX_LAYERS and all(isinstance(v, _SCALARS) for v in value))


def read_official_config(path: str | Path) -> OfficialConfig:
    """Parse an official YAML config; unknown keys are an error (the official parser rejects them too)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config {path} does not exist; pass the official YAML (e.g. configs/starflow_3B_t2i_256x256.yaml)")
    if not path.is_file():
        raise ConfigError(f"config {path} is not a regular file; pass the official YAML file itself")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"config {path} has {path.stat().st_size} bytes, more than the {MAX_YAML_BYTES >> 10} KB an official config may hold")
    try:
        data = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path} nests too deeply to be an official config (an `arguments:` list of `key: value`)") from None
    entries = data.get("arguments") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{path} is not an official STARFlow config: it needs an 'arguments:' list of 'key: value' entries")
    args = dict(MODEL_DEFAULTS)
    unknown = []
    for entry in entries:
        for key, value in entry.items():
            if key in MODEL_DEFAULTS:
                if not _is_plain(value):
                    raise ConfigError(f"{path}: {key} must be a number, a string or a list of numbers, not {type(value).__name__}")
                args[key] = value
            elif key not in NO_MODEL_EFFECT:
                unknown.append(key)
    if unknown:
        raise ConfigError(f"{path}: unknown arguments {sorted(map(str, unknown))} (the official parser would reject them too)")
    return OfficialConfig(args, path)


YAML_RANGES: dict[str, tuple[int, int]] = {
    "img_size": (1, 16384), "txt_size": (0, MAX_TOKENS), "channel_size": (1, 1024), "patch_size": (1, 64),
    "channels": (1, MAX_WIDTH), "blocks": (1, MAX_LAYERS), "head_dim": (4, 1024),
}
"""Allowed ranges of the integer arguments that shape the model (in the YAML's own units)."""


def _int(official: OfficialConfig, key: str, low: int, high: int) -> int:
    """An integer argument within [low, high]; YAML may write it as a number or a numeric string."""
    value = official.args[key]
    try:
        number = int(str(value).strip()) if not isinstance(value, (bool, float)) else None
    except ValueError:
        number = None
    if number is None and isinstance(value, float) and value.is_integer():
        number = int(value)
    if number is None:
        raise ConfigError(f"{official.path}: {key} must be an integer in {low} … {high}, not {value!r}")
    if not low <= number <= high:
        raise ConfigError(f"{official.path}: {key} {number} is out of range: allowed {low} … {high}")
    return number


def _float(official: OfficialConfig, key: str, low: float, high: float) -> float:
    """A finite number argument within [low, high]."""
    value = official.args[key]
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and low <= number <= high):
        raise ConfigError(f"{official.path}: {key} is {value!r}; allowed: a finite number in [{low}, {high}]")
    return number


def _switch(official: OfficialConfig, key: str) -> bool:
    value = official.args[key]
    if value not in (0, 1):  # True/False compare equal to 1/0
        raise ConfigError(f"{official.path}: {key} is {value!r}; allowed: 0 or 1")
    return bool(value)


def _layers(official: OfficialConfig, blocks: int) -> tuple[int, ...]:
    """Per-block layer counts: one count repeated `blocks` times, or one per block (then, as in the
    official `model_setup`, the list's length is the number of blocks and `blocks` is not used)."""
    value = official.args["layers_per_block"]
    parts = value if isinstance(value, list) else str(value).split()
    try:
        counts = [int(v) for v in parts if not isinstance(v, (bool, float))]
    except ValueError:
        counts = []
    if not counts or len(counts) != len(parts):
        raise ConfigError(f"{official.path}: layers_per_block {value!r} must be whole numbers, one per block or one for all")
    if len(counts) == 1:
        counts = counts * blocks
    if len(counts) > MAX_LAYERS:
        raise ConfigError(f"{official.path}: layers_per_block lists {len(counts)} blocks; allowed 1 … {MAX_LAYERS}")
    if 0 in counts:
        raise ConfigError(f"{official.path}: layers_per_block has a 0 (an identity block), which this port does not implement; "
                          f"allowed counts 1 … {MAX_LAYERS}")
    bad = [n for n in counts if not 1 <= n <= MAX_LAYERS]
    if bad:
        raise ConfigError(f"{official.path}: layers_per_block count {bad[0]} is out of range: allowed 1 … {MAX_LAYERS}")
    return tuple(counts)


def flow_config(official: OfficialConfig, txt_dim: int, dtype: str = "float32",
                quantization: dict | None = None) -> FlowConfig:
    """Our FlowConfig from the official arguments plus what only the checkpoint knows.

    Every shaping argument is range-checked here, with the allowed range in the message.
    """
    args = official.args
    sizes = {key: _int(official, key, low, high) for key, (low, high) in YAML_RANGES.items()}
    unsupported = [f"{k}={args[k]!r} (needs {v!r})" for k, v in REQUIRED_VALUES.items() if args[k] != v]
    if args["top_block_channels"] not in (None, sizes["channels"]):
        unsupported.append(f"top_block_channels={args['top_block_channels']}")
    if args["num_heads"] not in (None, sizes["channels"] // sizes["head_dim"]):
        unsupported.append(f"num_heads={args['num_heads']}")
    if args["num_kv_heads"] not in (None, args["num_heads"] or sizes["channels"] // sizes["head_dim"]):
        unsupported.append(f"num_kv_heads={args['num_kv_heads']}")
    if sizes["txt_size"] > 0 and not args["cond_top_only"]:
        unsupported.append("cond_top_only=0 (text in every block)")
    if unsupported:
        raise ConfigError(f"{official.path}: switches this port does not implement: {', '.join(unsupported)}")
    if official.text_encoder and sizes["txt_size"] == 0:
        raise ConfigError(f"{official.path}: txt_size is 0 but the config names a condition (text: {official.text_encoder}); "
                          f"allowed: 1 … {MAX_TOKENS} tokens")
    vae_factor = SD_VAE_FACTOR if args["vae"] else 1
    if sizes["img_size"] % vae_factor:
        raise ConfigError(f"{official.path}: img_size {sizes['img_size']} is not a multiple of the VAE factor {vae_factor}")
    latent = sizes["img_size"] // vae_factor
    if latent % sizes["patch_size"]:
        raise ConfigError(f"{official.path}: img_size {sizes['img_size']} is not a multiple of patch_size {sizes['patch_size']}"
                          f"{f' × the VAE factor {vae_factor}' if vae_factor > 1 else ''}")
    if args["pt_seq_len"] not in (None, latent // sizes["patch_size"]):
        raise ConfigError(f"{official.path}: pt_seq_len {args['pt_seq_len']} differs from img_size/patch_size; not supported")
    try:
        return FlowConfig(
            in_channels=sizes["channel_size"],
            latent_size=latent,
            patch_size=sizes["patch_size"],
            channels=sizes["channels"],
            layers_per_block=_layers(official, sizes["blocks"]),
            txt_size=sizes["txt_size"],
            txt_dim=int(txt_dim),
            head_dim=sizes["head_dim"],
            seq_order=str(args["seq_order"]),
            use_softplus=_switch(official, "use_softplus"),
            soft_clip=_float(official, "soft_clip", 0.0, 1e4),
            use_final_norm=_switch(official, "use_final_norm"),
            use_bias=_switch(official, "use_bias"),
            noise_std=_float(official, "noise_std", 0.0, 100.0),
            drop_label=_float(official, "drop_label", 0.0, 1.0),
            latent_norm_regularization=_float(official, "latent_norm_regularization", 0.0, 1e6),
            vae_factor=vae_factor,
            dtype=dtype,
            quantization=quantization,
        )
    except ValueError as e:
        raise ConfigError(f"{official.path}: {e}") from None
