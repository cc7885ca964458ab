"""One frozen dataclass per model component, and the versioned `config.json` schema.

A converted component folder carries `config.json` = `{"kind": ..., "version": ..., <fields>}`.
Reading is strict: an unknown key, a missing key, another kind or another version is a
`ConfigError`, never a silent default, because a wrong switch gives plausible-looking but
wrong numbers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

SCHEMA_VERSION = 1

C = TypeVar("C", bound="ComponentConfig")


@dataclass(frozen=True)
class ComponentConfig:
    """Base of every component config: strict (de)serialisation with `kind` and `version`."""

    KIND: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"kind": self.KIND, "version": SCHEMA_VERSION, **body}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
        data = dict(data)
        kind, version = data.pop("kind", None), data.pop("version", None)
        if kind != cls.KIND:
            raise ConfigError(f"{source}: kind is {kind!r}, expected {cls.KIND!r}; point at a folder converted for this component")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{source}: schema version {version!r} is not supported (this mlx-starflow reads version "
                f"{SCHEMA_VERSION}); convert the model again with `starflow convert`"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; was it written by a newer mlx-starflow?")
        required = [n for n, f in fields.items() if _is_required(f) and n not in data]
        if required:
            raise ConfigError(f"{source}: missing keys {required}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, folder: str | Path) -> None:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls: type[C], folder: str | Path) -> C:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{folder} has no config.json: it is not a converted {cls.KIND} folder; convert one with `starflow convert`")
        return cls.from_dict(read_json_object(path, "convert the model again"), source=str(path))


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a `ConfigError` ending with `fix`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path} as JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object; {fix}")
    return data


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class FlowConfig(ComponentConfig):
    """The STARFlow transformer autoregressive flow (official `transformer_flow.Model`).

    `latent_size` is the side of the latent the model was trained on (the official `Model`
    img_size: YAML `img_size` divided by the VAE factor); any height/width runs, RoPE positions
    are rescaled to it. Blocks are listed in forward (likelihood) order; the last is the deep one.
    """

    KIND: ClassVar[str] = "starflow.flow"

    in_channels: int
    latent_size: int
    patch_size: int
    channels: int
    layers_per_block: tuple[int, ...]
    txt_size: int
    txt_dim: int
    head_dim: int = 64
    expansion: float = 4.0
    seq_order: str = "L2R"
    use_softplus: bool = True
    soft_clip: float = 4.0
    use_final_norm: bool = True
    use_bias: bool = True
    layer_norm_eps: float = 1e-5
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    noise_std: float = 0.3
    drop_label: float = 0.1
    latent_norm_regularization: float = 1e-4
    vae_factor: int = 1
    dtype: str = "float32"
    quantization: dict | None = None

    def __post_init__(self) -> None:
        if self.seq_order not in ("L2R", "R2L"):
            raise ValueError(f"seq_order must be 'L2R' or 'R2L', not {self.seq_order!r}")
        if self.channels % self.head_dim:
            raise ValueError(f"channels {self.channels} is not a multiple of head_dim {self.head_dim}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for the 3-axis RoPE")
        if not self.layers_per_block or min(self.layers_per_block) < 1:
            raise ValueError(f"layers_per_block must list one positive count per block, got {list(self.layers_per_block)}")
        if self.latent_size % self.patch_size:
            raise ValueError(f"latent_size {self.latent_size} is not a multiple of patch_size {self.patch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        if self.quantization is not None and set(self.quantization) != {"bits", "group_size"}:
            raise ValueError(f"quantization must hold exactly 'bits' and 'group_size', got {self.quantization}")

    @property
    def num_blocks(self) -> int:
        return len(self.layers_per_block)

    @property
    def num_heads(self) -> int:
        return self.channels // self.head_dim

    @property
    def token_channels(self) -> int:
        """Channels of one token: C·p² (patchify packs each p×p patch into one token)."""
        return self.in_channels * self.patch_size**2

    @property
    def image_side(self) -> int:
        """Pixel side of the training size: the latent side times the VAE factor."""
        return self.latent_size * self.vae_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor × patch size."""
        return self.vae_factor * self.patch_size

    @property
    def pt_seq_len(self) -> int:
        """Token grid side at the training size; RoPE positions are scaled to it."""
        return self.latent_size // self.patch_size

    def block_is_flipped(self, index: int) -> bool:
        """Token order of `blocks[index]`: reversed raster order (Flip) or raster order.

        Official rule: with L2R, blocks[i] uses permutations[(i+1) % 2], the deep block
        included (0 = identity, 1 = flip); R2L uses permutations[i % 2].
        """
        shift = 1 if self.seq_order == "L2R" else 0
        return (index + shift) % 2 == 1


@dataclass(frozen=True)
class T5Config(ComponentConfig):
    """The T5 encoder stack (flan-t5-xl layout: gated-GELU feed-forward, relative position buckets)."""

    KIND: ClassVar[str] = "starflow.t5_encoder"

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.d_model, self.d_kv, self.num_heads, self.d_ff, self.num_layers) < 1:
            raise ValueError("vocab_size, d_model, d_kv, num_heads, d_ff and num_layers must all be positive")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(
                f"relative attention needs at least 4 buckets and a max distance above a quarter of them, got "
                f"{self.relative_attention_num_buckets} buckets and max distance {self.relative_attention_max_distance}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")


@dataclass(frozen=True)
class VAEConfig(ComponentConfig):
    """The SD-VAE (diffusers `AutoencoderKL` with DownEncoderBlock2D/UpDecoderBlock2D blocks).

    `has_encoder` is False for a decoder-only folder (the fine-tuned noisy-latent decoder): it
    holds `post_quant_conv` and `decoder` weights only, and the encoder comes from `vae/`.
    """

    KIND: ClassVar[str] = "starflow.vae"

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    has_encoder: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"block_out_channels must list positive widths, got {list(self.block_out_channels)}")
        if self.norm_num_groups < 1:
            raise ValueError(f"norm_num_groups must be at least 1, got {self.norm_num_groups}")
        uneven = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if uneven:
            raise ValueError(f"block_out_channels {uneven} are not multiples of norm_num_groups {self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be at least 1, got {self.layers_per_block}")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class LabelConfig(ComponentConfig):
    """Class-label conditioning: the condition is the one-hot of the class id over K+1 rows.

    The extra id K is the empty class: the unconditional row for guidance and the empty prompt.
    """

    KIND: ClassVar[str] = "starflow.labels"

    labels: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.labels)
