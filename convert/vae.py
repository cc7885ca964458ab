"""Convert a diffusers AutoencoderKL folder, or STARFlow's fine-tuned decoder, to our VAE folders.

`convert_vae` makes `vae/` (config.json, model.safetensors, manifest.json). The fine-tuned
noisy-latent decoder becomes `decoder/`: the same config with `has_encoder: false` and only the
`post_quant_conv` and `decoder` weights; its encoder is by construction the base one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_starflow.convert.checkpoint import open_checkpoint
from mlx_starflow.convert.maps.rules import Mapped
from mlx_starflow.convert.maps.vae import apply, finetuned_to_diffusers
from mlx_starflow.convert.tensors import LazyTensor, check_weight_dtypes, finite_weight
from mlx_starflow.config import DTYPES, VAEConfig, read_json_object
from mlx_starflow.errors import ConfigError, ModelNotFound, WeightsError
from mlx_starflow.model_io import atomic_folder, save_weights, sha256_file, write_manifest
from mlx_starflow.vae import VAE

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
"""Weight files of a diffusers VAE folder, in order of preference."""

DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}
"""AutoencoderKL's constructor defaults: what diffusers uses for a key the config lacks
(a diffusers-0.4.2 config, like sd-vae-ft-ema's, has no `scaling_factor`)."""

UNUSED_KEYS = frozenset({"sample_size", "force_upcast", "shift_factor", "latents_mean", "latents_std"})
"""Keys STARFlow's VAE wrapper never reads: tiling size, dtype hint, and the shift/statistics
that only its video-VAE branch applies."""


def read_diffusers_config(path: str | Path) -> VAEConfig:
    """Our `VAEConfig` from a diffusers AutoencoderKL `config.json`; anything we cannot run is an error."""
    path = Path(path)
    raw = read_json_object(path, "point at a diffusers AutoencoderKL folder")
    class_name = raw.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ConfigError(f"{path} describes a {class_name}, not an AutoencoderKL; point at an SD-VAE folder such as stabilityai/sd-vae-ft-ema")
    fields = {k: v for k, v in raw.items() if not k.startswith("_") and k not in UNUSED_KEYS}
    unknown = sorted(set(fields) - set(DIFFUSERS_DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: AutoencoderKL options {unknown} are not supported; this converter knows {sorted(DIFFUSERS_DEFAULTS)}")
    cfg = {**DIFFUSERS_DEFAULTS, **fields}
    stages = len(cfg["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(cfg[key]) != [block] * stages:
            raise ConfigError(f"{path}: {key} is {cfg[key]}; only {stages} × {block} (one per block_out_channels entry) is supported")
    if cfg["act_fn"] != "silu":
        raise ConfigError(f"{path}: act_fn {cfg['act_fn']!r} is not supported; the SD-VAE uses 'silu'")
    try:
        return VAEConfig(
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            latent_channels=cfg["latent_channels"],
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg["layers_per_block"],
            norm_num_groups=cfg["norm_num_groups"],
            scaling_factor=float(cfg["scaling_factor"]),
            mid_block_add_attention=bool(cfg["mid_block_add_attention"]),
            use_quant_conv=bool(cfg["use_quant_conv"]),
            use_post_quant_conv=bool(cfg["use_post_quant_conv"]),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None


def find_diffusers_vae(src: str | Path) -> tuple[Path, Path]:
    """The `config.json` and weight file of a diffusers VAE folder."""
    src = Path(src)
    if not src.exists():
        raise ModelNotFound(f"no VAE at {src}; download stabilityai/sd-vae-ft-ema (config.json + diffusion_pytorch_model.safetensors) and pass its folder")
    if not src.is_dir():
        raise ConfigError(f"{src} is a file; pass the diffusers VAE folder that holds config.json and diffusion_pytorch_model.safetensors")
    config = src / "config.json"
    weights = next((src / name for name in WEIGHT_FILES if (src / name).is_file()), None)
    if not config.is_file() or weights is None:
        hint = " (for a pipeline repository, pass its vae/ subfolder)" if (src / "vae").is_dir() else ""
        raise ConfigError(f"{src} is not a diffusers VAE folder: it needs config.json and one of {list(WEIGHT_FILES)}{hint}")
    return config, weights


def convert_vae(src: str | Path, out: str | Path, *, dtype: str = "float32", force: bool = False) -> Path:
    """Convert a diffusers AutoencoderKL folder (safetensors or .bin) into our `vae/` folder."""
    _check_dtype(dtype)
    config_file, weights_file = find_diffusers_vae(src)
    config = dataclasses.replace(read_diffusers_config(config_file), dtype=dtype)
    tensors = open_checkpoint(weights_file)
    return _write(config, {name: name for name in tensors}, tensors, weights_file, out, force, [config_file, weights_file])


def convert_finetuned_decoder(
    src_file: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    """Convert STARFlow's fine-tuned noisy-latent decoder into a decoder-only folder.

    `src_file` is `pytorch_model.bin` (Sequential layout) or a `finetune_decoder.py` `.pth`
    (wrapper layout); both hold a complete AutoencoderKL, of which only `post_quant_conv` and
    `decoder` are kept. `base` gives the architecture: our converted `vae/` folder or the
    diffusers VAE folder the decoder was fine-tuned from.
    """
    _check_dtype(dtype)
    src_file = Path(src_file)
    if not src_file.is_file():
        raise ModelNotFound(f"no fine-tuned decoder file at {src_file}; pass the pytorch_model.bin or .pth file itself")
    base_config, base_config_file = _base_config(Path(base))
    config = dataclasses.replace(base_config, has_encoder=False, dtype=dtype)
    tensors = open_checkpoint(src_file)
    _, renamed = finetuned_to_diffusers(tensors)
    return _write(config, renamed, tensors, src_file, out, force, [src_file, base_config_file], ignore_prefixes=("encoder.", "quant_conv."))


def _base_config(base: Path) -> tuple[VAEConfig, Path]:
    config_file = base / "config.json"
    if not config_file.is_file():
        raise ModelNotFound(f"no VAE config at {config_file}; pass the converted vae/ folder or the diffusers VAE folder the decoder belongs to")
    if "kind" in read_json_object(config_file, "pass the converted vae/ folder or the diffusers VAE folder"):
        return VAEConfig.load(base), config_file
    return read_diffusers_config(config_file), config_file


def _write(
    config: VAEConfig,
    names: Mapping[str, str],
    tensors: Mapping[str, LazyTensor],
    weights_file: Path,
    out: str | Path,
    force: bool,
    sources: list[Path],
    ignore_prefixes: tuple[str, ...] = (),
) -> Path:
    """Map `{diffusers name: checkpoint name}` onto a fresh model, check shapes, and write the folder."""
    model = VAE(config)
    expected = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    mapped = apply(names, expected, ignore_prefixes=ignore_prefixes).mapped
    check_weight_dtypes((tensors[m.key] for m in mapped.values()), weights_file)
    weights = [(target, _materialise(tensors[m.key], m, expected[target], config.dtype, weights_file)) for target, m in mapped.items()]
    model.load_weights(weights, strict=True)
    with atomic_folder(out, force=force, kind=VAEConfig.KIND) as folder:
        config.save(folder)
        save_weights(folder, model)
        write_manifest(folder, kind=VAEConfig.KIND, sources=[{"path": str(p), "sha256": sha256_file(p)} for p in sources])
    return Path(out)


def _materialise(tensor: LazyTensor, mapped: Mapped, shape: tuple[int, ...], dtype: str, source: Path) -> mx.array:
    """One checkpoint tensor in our layout and dtype, read only now."""
    if mapped.target_shape(tuple(tensor.shape)) != shape:
        raise WeightsError(
            f"{mapped.key} has shape {list(tensor.shape)} but the config needs {list(shape)} for {mapped.target}; "
            "is config.json the one that belongs to these weights?"
        )
    value = finite_weight(tensor, source)
    if mapped.permutation is not None and value.ndim == len(mapped.permutation):
        value = value.transpose(mapped.permutation)
    value = value.astype(getattr(mx, dtype))
    mx.eval(value)
    return value


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose one of {list(DTYPES)}")
