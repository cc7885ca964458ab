"""The one reader of model folders: which components a folder holds, and loading them.

A model folder (`starflow convert`, the first run of `generate`, a training checkpoint) holds
one folder per component and a top `manifest.json` that lists them. `read_model_folder`
checks its structure without loading weights (what a cache needs to tell whether a conversion
is current); `load_model_folder` loads the parts and checks that they fit each other. Every
front door (`mlx_starflow.load`, training's `--init`, the hub cache, the Core ML exporter)
goes through here, so a new component kind is added in this file only.

The text encoder can stay on disk until prompts are encoded (`LazyTextEncoder`): it runs once
per prompt, and flan-t5-xl in float32 (4.9 GB) held through sampling would add to the peak.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .config import ComponentConfig, FlowConfig, LabelConfig, T5Config, VAEConfig
from .errors import ConfigError, ModelNotFound
from .flow import StarFlow, load_flow
from .labels import LabelEncoder, load_label_encoder
from .model_io import MODEL_KIND, read_manifest
from .text_encoder import TextEncoder, load_text_encoder
from .vae import VAE, load_vae

COMPONENT_KINDS: dict[str, type[ComponentConfig]] = {
    "flow": FlowConfig, "text_encoder": T5Config, "labels": LabelConfig, "vae": VAEConfig, "decoder": VAEConfig,
}
"""Component folder name → the config (and so the kind) it must hold."""


@dataclass(frozen=True)
class FlowNumerics:
    """How the flow computes beyond its weights' dtype; both off by default (see `load_flow`).

    `bfloat16_rope` rounds RoPE angles to bfloat16 as the official GPU sampler does;
    `float32_compute` runs float16/bfloat16 weights in float32 activations, as the official
    float32 autocast does.
    """

    bfloat16_rope: bool = False
    float32_compute: bool = False

    def metadata(self) -> dict[str, str]:
        """PNG metadata entries for the switches that are on (none by default, so default images
        keep their recorded metadata)."""
        return {name: "on" for name in ("bfloat16_rope", "float32_compute") if getattr(self, name)}


class LazyTextEncoder:
    """A model folder's text encoder whose weights are read when needed and dropped on `release()`.

    It has `TextEncoder`'s `count_tokens` and `encode`; both load the weights (they come with
    the tokenizer), and `encode` evaluates its states, so after `release()` nothing refers to
    the weights and their memory is free. The pipeline releases it after each encoding.
    """

    def __init__(self, folder: Path, config: T5Config):
        self.folder = folder
        self.config = config
        self._encoder: TextEncoder | None = None

    @property
    def held(self) -> bool:
        """Whether the weights are in memory now."""
        return self._encoder is not None

    def get(self) -> TextEncoder:
        """The loaded text encoder, read from the folder unless it is held."""
        if self._encoder is None:
            self._encoder = load_text_encoder(self.folder)
        return self._encoder

    def release(self) -> None:
        """Drop the weights and return their buffers from MLX's cache to the system."""
        if self._encoder is not None:
            self._encoder = None
            mx.clear_cache()

    def count_tokens(self, prompts: str | Sequence[str]) -> list[int]:
        return self.get().count_tokens(prompts)

    def encode(self, prompts: str | Sequence[str], length: int) -> mx.array:
        """`TextEncoder.encode`, evaluated, so the states do not keep the weights alive."""
        states = self.get().encode(prompts, length)
        mx.eval(states)
        return states


Condition = TextEncoder | LazyTextEncoder | LabelEncoder


@dataclass(frozen=True)
class ModelFolder:
    """A model folder whose manifests and component configs have been checked (no weights read)."""

    path: Path
    manifest: dict[str, Any]
    components: dict[str, str]
    """Component name → kind (`starflow.flow`, `starflow.t5_encoder`, …), in manifest order."""

    @property
    def name(self) -> str:
        """The model's name for metadata: the manifest's, else the folder's."""
        return str(self.manifest.get("name") or self.path.name)

    @property
    def source_sha256(self) -> str:
        """sha256 of the checkpoint the folder was converted from ("unknown" for a trained one)."""
        sources = self.manifest.get("sources") or [{}]
        return str(sources[0].get("sha256", "unknown"))

    def has(self, component: str) -> bool:
        return component in self.components


@dataclass(frozen=True)
class ModelParts:
    """A loaded model folder: the flow, its condition encoder, the VAE and fine-tuned decoder (or None)."""

    folder: ModelFolder
    flow: StarFlow
    condition: Condition | None
    vae: VAE | None
    decoder: VAE | None

    @property
    def config(self) -> FlowConfig:
        return self.flow.config

    @property
    def text_encoder(self) -> TextEncoder | LazyTextEncoder | None:
        return self.condition if isinstance(self.condition, (TextEncoder, LazyTextEncoder)) else None

    @property
    def labels(self) -> LabelEncoder | None:
        return self.condition if isinstance(self.condition, LabelEncoder) else None


def read_model_folder(path: str | Path) -> ModelFolder:
    """Check a model folder's top manifest and each component's manifest and config.

    A half-written, stale or incompatible folder is an error naming the fix, never a model
    with missing parts.
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelNotFound(f"no model at {folder}; pass a converted model folder (made by `starflow convert` or `starflow generate`)")
    if not folder.is_dir():
        raise ConfigError(f"{folder} is a file; pass a converted model folder (convert a checkpoint with `starflow convert`)")
    manifest = read_manifest(folder)
    kind = manifest.get("kind")
    if kind != MODEL_KIND:
        raise ConfigError(f"{folder} holds a {kind!r} component, not a model; pass the model folder that contains it")
    listed = manifest.get("components", [])
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise ConfigError(f"{folder / 'manifest.json'} is malformed (its components list); convert the model again")
    unknown = [name for name in listed if name not in COMPONENT_KINDS]
    if unknown:
        raise ConfigError(f"{folder} lists components this version does not know ({', '.join(unknown)}); convert the model again with this version")
    if "flow" not in listed:
        raise ConfigError(f"{folder} has no flow component; convert the model again")
    if "decoder" in listed and "vae" not in listed:
        raise ConfigError(f"{folder} has a fine-tuned decoder but no vae/; convert the model again with --vae DIR")
    for name in listed:
        read_manifest(folder / name)
        COMPONENT_KINDS[name].load(folder / name)
    return ModelFolder(folder, manifest, {name: COMPONENT_KINDS[name].KIND for name in listed})


def load_model_folder(path: str | Path, decoder: bool = True, lazy_text_encoder: bool = False,
                      numerics: FlowNumerics = FlowNumerics()) -> ModelParts:
    """Load a model folder's parts strictly and check that they fit the flow.

    `decoder=False` leaves a fine-tuned decoder on disk (training carries it over unread).
    `lazy_text_encoder=True` checks the text encoder's config but leaves its weights on disk
    until prompts are encoded (`LazyTextEncoder`). `numerics` sets how the flow computes.
    """
    folder = read_model_folder(path)
    # With a lazy text encoder the flow's weights are read at their first use, after the prompts
    # are encoded and the encoder released: the two never share memory.
    flow = load_flow(folder.path / "flow", numerics.bfloat16_rope, numerics.float32_compute, evaluate=not lazy_text_encoder)
    condition = _load_condition(folder, flow.config, lazy_text_encoder)
    vae = _load_vae(folder, flow.config)
    if folder.has("decoder") and vae is None:
        raise ConfigError(f"{folder.path} has a fine-tuned decoder but its flow is a pixel-space model; convert the model again without --decoder")
    fine_tuned = load_vae(folder.path / "decoder") if decoder and folder.has("decoder") else None
    return ModelParts(folder, flow, condition, vae, fine_tuned)


def _load_condition(folder: ModelFolder, config: FlowConfig, lazy_text_encoder: bool) -> Condition | None:
    if folder.has("text_encoder"):
        text_config = T5Config.load(folder.path / "text_encoder")
        if text_config.d_model != config.txt_dim:
            raise ConfigError(
                f"{folder.path}: the text encoder's width {text_config.d_model} differs from the flow's text width "
                f"{config.txt_dim}; convert the model again with the text encoder it was trained with"
            )
        lazy = LazyTextEncoder(folder.path / "text_encoder", text_config)
        return lazy if lazy_text_encoder else lazy.get()
    if folder.has("labels"):
        labels = load_label_encoder(folder.path / "labels")
        if labels.dim != config.txt_dim:
            raise ConfigError(f"{folder.path}: {labels.dim - 1} labels do not fit the flow's condition width {config.txt_dim}; convert the model again")
        return labels
    if config.txt_dim > 0:
        raise ConfigError(
            f"{folder.path} has no text_encoder/ or labels/ but its flow is conditioned; "
            "convert it again with `starflow convert ... --text-encoder DIR` (a google/flan-t5-xl folder)"
        )
    return None


def _load_vae(folder: ModelFolder, config: FlowConfig) -> VAE | None:
    if config.vae_factor == 1:
        return None
    if not folder.has("vae"):
        raise ConfigError(
            f"{folder.path} has no vae/ but its flow works in a VAE latent space; "
            "convert it again with `starflow convert ... --vae DIR` (a stabilityai/sd-vae-ft-ema folder)"
        )
    vae = load_vae(folder.path / "vae")
    if vae.config.downsample_factor != config.vae_factor or vae.config.latent_channels != config.in_channels:
        raise ConfigError(
            f"{folder.path}: the VAE ({vae.config.latent_channels} channels, factor {vae.config.downsample_factor}) does not fit "
            f"the flow ({config.in_channels} channels, factor {config.vae_factor}); convert the model again with its own VAE"
        )
    return vae
