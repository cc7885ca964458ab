"""The official YAML model config (`arguments:` list of `key: value`) → our `FlowConfig`.

The official code turns each entry into a `--key value` flag of `train.get_tarflow_parser()`,
so absent keys take that parser's defaults, which are repeated here. What the YAML lacks comes
from the checkpoint: `txt_dim` (the deep block's `proj_txt` input width). YAML `img_size` is in
pixels when a VAE is configured (`sample.py` divides it by the VAE factor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlx_starflow.config import FlowConfig
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


def read_official_config(path: str | Path) -> OfficialConfig:
    """Parse an official YAML config; unknown keys are an error (the official parser rejects them too)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} does not exist; pass the official YAML (e.g. configs/starflow_3B_t2i_256x256.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    entries = data.get("arguments") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{path} is not an official STARFlow config: it needs an 'arguments:' list of 'key: value' entries")
    args = dict(MODEL_DEFAULTS)
    unknown = []
    for entry in entries:
        for key, value in entry.items():
            if key in MODEL_DEFAULTS:
                args[key] = value
            elif key not in NO_MODEL_EFFECT:
                unknown.append(key)
    if unknown:
        raise ConfigError(f"{path}: unknown arguments {sorted(unknown)} (the official parser would reject them too)")
    return OfficialConfig(args, path)


def _layers(args: dict[str, Any]) -> tuple[int, ...]:
    value = args["layers_per_block"]
    counts = [int(v) for v in str(value).split()] if not isinstance(value, list) else [int(v) for v in value]
    if len(counts) == 1:
        counts = counts * int(args["blocks"])
    return tuple(counts)


def flow_config(official: OfficialConfig, txt_dim: int, dtype: str = "float32",
                quantization: dict | None = None) -> FlowConfig:
    """Our FlowConfig from the official arguments plus what only the checkpoint knows."""
    args = official.args
    unsupported = [f"{k}={args[k]!r} (needs {v!r})" for k, v in REQUIRED_VALUES.items() if args[k] != v]
    if args["top_block_channels"] not in (None, args["channels"]):
        unsupported.append(f"top_block_channels={args['top_block_channels']}")
    if args["num_heads"] not in (None, int(args["channels"]) // int(args["head_dim"])):
        unsupported.append(f"num_heads={args['num_heads']}")
    if args["num_kv_heads"] not in (None, args["num_heads"] or int(args["channels"]) // int(args["head_dim"])):
        unsupported.append(f"num_kv_heads={args['num_kv_heads']}")
    if int(args["txt_size"]) > 0 and not args["cond_top_only"]:
        unsupported.append("cond_top_only=0 (text in every block)")
    if unsupported:
        raise ConfigError(f"{official.path}: switches this port does not implement: {', '.join(unsupported)}")
    vae_factor = SD_VAE_FACTOR if args["vae"] else 1
    if int(args["img_size"]) % vae_factor:
        raise ConfigError(f"{official.path}: img_size {args['img_size']} is not a multiple of the VAE factor {vae_factor}")
    latent = int(args["img_size"]) // vae_factor
    if args["pt_seq_len"] not in (None, latent // int(args["patch_size"])):
        raise ConfigError(f"{official.path}: pt_seq_len {args['pt_seq_len']} differs from img_size/patch_size; not supported")
    try:
        return FlowConfig(
            in_channels=int(args["channel_size"]),
            latent_size=latent,
            patch_size=int(args["patch_size"]),
            channels=int(args["channels"]),
            layers_per_block=_layers(args),
            txt_size=int(args["txt_size"]),
            txt_dim=int(txt_dim),
            head_dim=int(args["head_dim"]),
            seq_order=str(args["seq_order"]),
            use_softplus=bool(int(args["use_softplus"])),
            soft_clip=float(args["soft_clip"]),
            use_final_norm=bool(int(args["use_final_norm"])),
            use_bias=bool(int(args["use_bias"])),
            noise_std=float(args["noise_std"]),
            drop_label=float(args["drop_label"]),
            latent_norm_regularization=float(args["latent_norm_regularization"]),
            vae_factor=vae_factor,
            dtype=dtype,
            quantization=quantization,
        )
    except ValueError as e:
        raise ConfigError(f"{official.path}: {e}") from None
