"""One frozen dataclass per model component, and the versioned `config.json` schema.

A converted component folder carries `config.json` = `{"kind": ..., "version": ..., <fields>}`.
Reading is strict: an unknown key, a missing key, another kind or another version is a
`ConfigError`, never a silent default, because a wrong switch gives plausible-looking but
wrong numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

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


MAX_JSON_BYTES = 16 << 20
"""A config, manifest or index file is kilobytes; anything this large is not one of ours."""
MAX_JSON_DEPTH = 64
"""Our JSON files nest a few levels; a deeper document is refused before it is parsed."""
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON whose nesting is checked first, so no document can exhaust the parser's stack.

    Raises `ValueError` (a `json.JSONDecodeError` or `UnicodeDecodeError` too) naming the problem.
    """
    brackets = np.frombuffer(_JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS), np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    if steps.size and int(np.cumsum(steps).max()) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return json.loads(data.decode("utf-8"))


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a `ConfigError` ending with `fix`.

    Only a regular file of at most `MAX_JSON_BYTES` is read: a FIFO or device never blocks us.
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path} is not a regular file; {fix}")
        if info.st_size > MAX_JSON_BYTES:
            raise ConfigError(f"{path} has {info.st_size} bytes, more than the {MAX_JSON_BYTES >> 20} MB a JSON file of ours may hold; {fix}")
        data = parse_json(path.read_bytes())
    except (OSError, ValueError) as e:
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

QUANTIZATION_BITS = (2, 3, 4, 6, 8)
QUANTIZATION_GROUPS = (32, 64, 128)
"""What MLX's affine quantisation accepts."""
MAX_WIDTH = 1 << 16
"""Generous ceilings: far above any released model, low enough that a typo cannot allocate terabytes."""
MAX_LAYERS = 1024
MAX_SIDE = 1 << 14
MAX_TOKENS = 1 << 14


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """An integer field within [low, high]; the message names the allowed range."""
    if type(value) is not int:
        raise ValueError(f"{name} must be an integer in {low} … {high}, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is out of range: allowed {low} … {high}")


def check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    """A finite number within [low, high] (or (low, high] with `low_open`); NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in {'(' if low_open else '['}{low}, {high}], not {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise ValueError(f"{name} {value} is out of range: allowed {'(' if low_open else '['}{low}, {high}]")


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
        check_int("in_channels", self.in_channels, 1, 1024)
        check_int("latent_size", self.latent_size, 1, MAX_SIDE)
        check_int("patch_size", self.patch_size, 1, self.latent_size)
        check_int("channels", self.channels, 1, MAX_WIDTH)
        check_int("txt_size", self.txt_size, 0, MAX_TOKENS)
        check_int("txt_dim", self.txt_dim, 0, MAX_WIDTH)
        check_int("head_dim", self.head_dim, 4, MAX_WIDTH)
        check_int("vae_factor", self.vae_factor, 1, 64)
        if not 1 <= len(self.layers_per_block) <= MAX_LAYERS:
            raise ValueError(f"layers_per_block must list 1 … {MAX_LAYERS} blocks, got {len(self.layers_per_block)}")
        for count in self.layers_per_block:
            check_int("each layers_per_block count", count, 1, MAX_LAYERS)
        check_float("expansion", self.expansion, 0.0, 64.0, low_open=True)
        check_float("soft_clip", self.soft_clip, 0.0, 1e4)
        check_float("layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, low_open=True)
        check_float("rms_norm_eps", self.rms_norm_eps, 0.0, 1.0, low_open=True)
        check_float("rope_theta", self.rope_theta, 0.0, 1e12, low_open=True)
        check_float("noise_std", self.noise_std, 0.0, 100.0)
        check_float("drop_label", self.drop_label, 0.0, 1.0)
        check_float("latent_norm_regularization", self.latent_norm_regularization, 0.0, 1e6)
        if self.seq_order not in ("L2R", "R2L"):
            raise ValueError(f"seq_order must be 'L2R' or 'R2L', not {self.seq_order!r}")
        if self.channels % self.head_dim:
            raise ValueError(f"channels {self.channels} is not a multiple of head_dim {self.head_dim}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for the 3-axis RoPE")
        if self.latent_size % self.patch_size:
            raise ValueError(f"latent_size {self.latent_size} is not a multiple of patch_size {self.patch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        if self.quantization is not None:
            if not isinstance(self.quantization, dict) or set(self.quantization) != {"bits", "group_size"}:
                raise ValueError(f"quantization must hold exactly 'bits' and 'group_size', got {self.quantization}")
            if self.quantization["bits"] not in QUANTIZATION_BITS or self.quantization["group_size"] not in QUANTIZATION_GROUPS:
                raise ValueError(f"quantization bits must be one of {QUANTIZATION_BITS} and group_size one of {QUANTIZATION_GROUPS}, "
                                 f"got {self.quantization}")

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
        check_int("vocab_size", self.vocab_size, 1, 1 << 22)
        for name in ("d_model", "d_kv", "d_ff"):
            check_int(name, getattr(self, name), 1, MAX_WIDTH)
        check_int("num_heads", self.num_heads, 1, 1024)
        check_int("num_layers", self.num_layers, 1, MAX_LAYERS)
        check_int("relative_attention_num_buckets", self.relative_attention_num_buckets, 1, 4096)
        check_int("relative_attention_max_distance", self.relative_attention_max_distance, 1, 1 << 20)
        check_float("layer_norm_epsilon", self.layer_norm_epsilon, 0.0, 1.0, low_open=True)
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
        for name in ("in_channels", "out_channels", "latent_channels"):
            check_int(name, getattr(self, name), 1, 1024)
        if not 1 <= len(self.block_out_channels) <= 8:
            raise ValueError(f"block_out_channels must list 1 … 8 widths, got {list(self.block_out_channels)}")
        for width in self.block_out_channels:
            check_int("each block_out_channels width", width, 1, MAX_WIDTH)
        check_int("norm_num_groups", self.norm_num_groups, 1, MAX_WIDTH)
        check_int("layers_per_block", self.layers_per_block, 1, 64)
        check_float("scaling_factor", self.scaling_factor, 0.0, 1e3, low_open=True)
        uneven = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if uneven:
            raise ValueError(f"block_out_channels {uneven} are not multiples of norm_num_groups {self.norm_num_groups}")
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

    def __post_init__(self) -> None:
        if not all(isinstance(label, str) and label.strip() for label in self.labels):
            raise ValueError(f"labels must be non-empty class names (text), got {list(self.labels)[:10]}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)
