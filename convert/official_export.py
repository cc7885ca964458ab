"""A flow we converted or trained, back in the official format: a `.pth` state dict and its YAML.

Researchers who fine-tune on a Mac can then run the official code on the result. The name map
is the converter's table read backwards; the buffers the official model registers but never
reads (`var`, each block's `attn_mask`, the zero RoPE tables) are written with the values the
official code builds, so the file loads even with `strict=True`. Nothing is half-written: both
files appear only when complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlx_starflow.config import FlowConfig, LabelConfig
from mlx_starflow.errors import ConfigError, InputError, OutputExists
from mlx_starflow.model_io import WEIGHTS_FILE, read_manifest, verify_changed

from .checkpoint import open_checkpoint
from .maps.starflow import official_name
from .official_config import SD_VAE_FACTOR
from .pth_writer import save_pth
from .tensors import TensorEntry, atomic_file

SD_VAE = "stabilityai/sd-vae-ft-ema"
T5_XL = "google/flan-t5-xl"


def deprecated_buffers(config: FlowConfig) -> list[TensorEntry]:
    """The official model's unused buffers at the training size, as it registers them."""
    grid = config.pt_seq_len**2
    sequence = grid + config.txt_size
    half_head = config.head_dim // 2

    def tril() -> np.ndarray:
        return np.tril(np.ones((sequence, sequence), np.float32))

    entries = [TensorEntry("var", "float32", (grid, config.token_channels),
                           lambda: np.ones((grid, config.token_channels), np.float32))]
    entries += [TensorEntry(f"blocks.{i}.attn_mask", "float32", (sequence, sequence), tril) for i in range(config.num_blocks)]
    for name in ("feat_rope.freqs_cos", "feat_rope.freqs_sin"):
        entries.append(TensorEntry(name, "float32", (sequence, 2 * half_head), lambda: np.zeros((sequence, 2 * half_head), np.float32)))
    return entries


def official_yaml(config: FlowConfig, text: str) -> str:
    """The official `arguments:` config for this flow (`img_size` in pixels when a VAE is used)."""
    if config.vae_factor not in (1, SD_VAE_FACTOR):
        raise ConfigError(f"a VAE factor of {config.vae_factor} has no official counterpart (1 or {SD_VAE_FACTOR})")
    arguments = {
        "img_size": config.image_side, "txt_size": config.txt_size, "channel_size": config.in_channels,
        "patch_size": config.patch_size, "channels": config.channels,
        "layers_per_block": " ".join(map(str, config.layers_per_block)), "head_dim": config.head_dim,
        "noise_std": config.noise_std, "rope": 1, "sos": 1, "seq_order": config.seq_order,
        "use_softplus": int(config.use_softplus), "cond_top_only": 1, "use_final_norm": int(config.use_final_norm),
        "use_bias": int(config.use_bias), "soft_clip": config.soft_clip, "drop_label": config.drop_label,
        "latent_norm_regularization": config.latent_norm_regularization, "text": text,
    }
    if config.vae_factor == SD_VAE_FACTOR:
        arguments["vae"] = SD_VAE
    return "arguments:\n" + "".join(f"- {key}: {value}\n" for key, value in arguments.items())


def export_official(model: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write `out` (.pth) and `out` with suffix .yaml (plus a .vocab for a label model)."""
    model, out = Path(model), Path(out)
    if out.suffix != ".pth":
        raise InputError(f"--out {out} must end in .pth")
    flow_folder = model / "flow" if (model / "flow").is_dir() else model
    # the weights are read straight from the file, so they are checked as loading checks them
    verify_changed(flow_folder, read_manifest(flow_folder))
    config = FlowConfig.load(flow_folder)
    if config.quantization:
        raise ConfigError(f"{model} is quantised; the official format holds full-precision weights: export the model it was converted from")
    targets = [out, out.with_suffix(".yaml")]
    labels = LabelConfig.load(model / "labels") if (model / "labels").is_dir() else None
    if labels is not None:
        targets.append(out.with_suffix(".vocab"))
    existing = [path for path in targets if path.exists()]
    if existing and not force:
        raise OutputExists(f"{existing[0]} already exists; pass --force to replace it")
    if config.image_side % config.size_multiple:
        raise ConfigError(f"{model}: the training size is not a multiple of the patch grid")

    weights = open_checkpoint(flow_folder / WEIGHTS_FILE)
    entries = [TensorEntry(official_name(name), tensor.dtype, tensor.shape, tensor.mlx) for name, tensor in weights.items()]
    save_pth(out, entries + deprecated_buffers(config))
    text = out.with_suffix(".vocab").name if labels is not None else T5_XL
    with atomic_file(out.with_suffix(".yaml")) as f:
        f.write(official_yaml(config, text).encode())
    if labels is not None:
        with atomic_file(out.with_suffix(".vocab")) as f:
            f.write("".join(f"{name}\t{i}\n" for i, name in enumerate(labels.labels)).encode())
    return out
