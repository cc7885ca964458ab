"""Synthetic checkpoints in the layouts of the real releases, written with our own writers.

The STARFlow 3B `.pth` carries the official key names, shapes and bfloat16 storages (buffers
included); flan-t5-xl is the real sharded safetensors layout (encoder and decoder keys, index,
config.json, a 32100-token tokenizer.json); sd-vae-ft-ema is the diffusers 0.4.2 layout (legacy
attention names, float32). Weights are uniform noise with the standard deviation an
initialisation would give (1/sqrt(fan-in) for most matrices, small output projections), so
activations stay O(1) through every layer and a sample runs the same code paths as real weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlx_starflow.convert.pth_writer import save_pth
from mlx_starflow.convert.safetensors_io import write_safetensors
from mlx_starflow.convert.tensors import TensorEntry

HEAD_DIM = 64  # the official default; heads = channels / 64
VAE_FACTOR = 8
TOKENIZER_PIECES = 32000  # flan-t5-xl: 32000 sentencepiece pieces, then 100 <extra_id_N>
EXTRA_IDS = 100
POOL = 1 << 26  # values in the noise pool every tensor is a window of (256 MB)


@dataclass(frozen=True)
class FlowShape:
    """What fixes every tensor shape of an official STARFlow text-to-image checkpoint."""

    channels: int
    layers_per_block: tuple[int, ...]
    latent_side: int  # YAML img_size / VAE factor / patch size
    txt_size: int
    txt_dim: int
    in_channels: int = 4

    @property
    def tokens(self) -> int:
        return self.latent_side**2


@dataclass(frozen=True)
class T5Shape:
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    d_kv: int
    vocab_size: int
    buckets: int = 32
    max_distance: int = 128


@dataclass(frozen=True)
class VAEShape:
    block_out_channels: tuple[int, ...]
    norm_num_groups: int
    layers_per_block: int = 2
    latent_channels: int = 4
    sample_size: int = 256


@dataclass(frozen=True)
class Spec:
    """One rehearsal's model sizes: `full()` is the real release, `tiny()` a quick check of the path."""

    flow: FlowShape
    t5: T5Shape
    vae: VAEShape
    t5_shard_bytes: int

    @staticmethod
    def full() -> Spec:
        return Spec(
            FlowShape(channels=3072, layers_per_block=(2, 2, 2, 2, 2, 24), latent_side=32, txt_size=128, txt_dim=2048),
            T5Shape(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, d_kv=64, vocab_size=32128),
            VAEShape(block_out_channels=(128, 256, 512, 512), norm_num_groups=32),
            t5_shard_bytes=9_500_000_000,
        )

    @staticmethod
    def tiny() -> Spec:
        return Spec(
            FlowShape(channels=128, layers_per_block=(1, 1, 1, 1, 1, 2), latent_side=32, txt_size=16, txt_dim=32),
            T5Shape(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=32128),
            VAEShape(block_out_channels=(16, 32, 32, 32), norm_num_groups=8, sample_size=32),
            t5_shard_bytes=4_300_000,
        )

    def key(self) -> str:
        """A short digest of the sizes: synthetic files built for other sizes are rebuilt."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# ---- tensors: name, dtype, shape and how to draw them --------------------------------------------

@dataclass(frozen=True)
class Draw:
    """A tensor drawn uniformly with standard deviation `std` around `mean`, or a fixed `fill`."""

    name: str
    shape: tuple[int, ...]
    std: float = 0.0
    mean: float = 0.0
    fill: str | None = None  # "tril": a lower-triangular mask of ones


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


@functools.lru_cache(maxsize=1)
def _unit_pool() -> np.ndarray:
    """POOL uniform values of unit standard deviation, drawn once."""
    half_width = math.sqrt(3.0)  # uniform on [-a, a] has std a / sqrt(3)
    values = np.random.default_rng(0).random(POOL, dtype=np.float32)
    values *= 2.0 * half_width
    values -= half_width
    return values


def draw_array(draw: Draw) -> np.ndarray:
    """float32 values of one tensor, the same on every run.

    Each tensor is a window of one pool of unit-variance noise, starting where its name's hash
    points, scaled and shifted: drawing 6.7 billion fresh random numbers would cost more CPU
    time than everything else the rehearsal measures, and a window is as good a weight matrix.
    """
    if draw.fill == "tril":
        return np.tril(np.ones(draw.shape, dtype=np.float32))
    if draw.std == 0.0:
        return np.full(draw.shape, draw.mean, dtype=np.float32)
    pool, count = _unit_pool(), math.prod(draw.shape)
    start, pieces = _seed(draw.name) % POOL, []
    while count > 0:
        piece = pool[start : start + count]
        pieces.append(piece)
        count -= len(piece)
        start = 0
    values = np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()
    values *= draw.std
    values += draw.mean
    return values.reshape(draw.shape)


def as_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16, as raw uint16 bits."""
    bits = values.view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def entries(draws: list[Draw], dtype: str) -> list[TensorEntry]:
    """Streaming writer entries: each tensor is drawn only when the writer reaches it."""

    def producer(draw: Draw):
        def produce() -> np.ndarray:
            values = draw_array(draw)
            return as_bfloat16_bits(values) if dtype == "bfloat16" else values

        return produce

    return [TensorEntry(draw.name, dtype, draw.shape, producer(draw)) for draw in draws]


def _linear(name: str, out_features: int, in_features: int, gain: float = 1.0, bias: float | None = 0.02) -> list[Draw]:
    draws = [Draw(f"{name}.weight", (out_features, in_features), gain / math.sqrt(in_features))]
    if bias is not None:
        draws.append(Draw(f"{name}.bias", (out_features,), bias))
    return draws


def _layer_norm(name: str, channels: int) -> list[Draw]:
    return [Draw(f"{name}.weight", (channels,), 0.02, mean=1.0), Draw(f"{name}.bias", (channels,), 0.02)]


# ---- STARFlow -------------------------------------------------------------------------------

def starflow_draws(shape: FlowShape) -> list[Draw]:
    """Every tensor of the official `transformer_flow.Model` state dict, in its order.

    The deprecated buffers the released file carries (`var`, each block's `attn_mask`, the
    RoPE tables) are included; the output projection is drawn small, so the scale and shift it
    predicts stay inside the soft clip, as a trained model's do.
    """
    ch, cin = shape.channels, shape.in_channels
    length = shape.tokens + shape.txt_size
    draws = [Draw("var", (shape.tokens, cin), mean=1.0)]
    deep = len(shape.layers_per_block) - 1
    for b, layers in enumerate(shape.layers_per_block):
        p = f"blocks.{b}"
        draws += [Draw(f"{p}.sos_embed", (1, 1, cin), 1.0), Draw(f"{p}.attn_mask", (length, length), fill="tril")]
        draws += _linear(f"{p}.proj_in", ch, cin)
        draws += _linear(f"{p}.proj_out", 2 * cin, ch, gain=0.2)
        if b == deep:
            draws += _linear(f"{p}.proj_txt", ch, shape.txt_dim)
        for layer in range(layers):
            a = f"{p}.attn_blocks.{layer}"
            draws += _layer_norm(f"{a}.attention.norm", ch)
            draws += _linear(f"{a}.attention.qkv", 3 * ch, ch)
            draws += _linear(f"{a}.attention.proj", ch, ch, gain=0.5)
            draws += _layer_norm(f"{a}.mlp.norm", ch)
            draws += _linear(f"{a}.mlp.main.0", 4 * ch, ch)
            draws += _linear(f"{a}.mlp.main.2", ch, 4 * ch, gain=0.5)
        draws.append(Draw(f"{p}.final_norm.weight", (ch,), 0.02))
    draws += [Draw("feat_rope.freqs_cos", (length, HEAD_DIM), mean=1.0), Draw("feat_rope.freqs_sin", (length, HEAD_DIM))]
    return draws


def write_starflow(path: Path, shape: FlowShape) -> None:
    save_pth(path, entries(starflow_draws(shape), "bfloat16"))


def official_yaml(template: str, shape: FlowShape) -> str:
    """The official YAML with this shape's width, depth, text length and image size."""
    values = {
        "channels": str(shape.channels),
        "layers_per_block": " ".join(map(str, shape.layers_per_block)),
        "txt_size": str(shape.txt_size),
        "img_size": str(shape.latent_side * VAE_FACTOR),
    }
    lines = []
    for line in template.splitlines():
        key = line.removeprefix("- ").split(":", 1)[0]
        lines.append(f"- {key}: {values[key]}" if line.startswith("- ") and key in values else line)
    return "\n".join(lines) + "\n"


# ---- flan-t5-xl -----------------------------------------------------------------------------

def _t5_attention(prefix: str, t5: T5Shape, relative: bool) -> list[Draw]:
    inner = t5.num_heads * t5.d_kv
    draws = [
        Draw(f"{prefix}.q.weight", (inner, t5.d_model), 1.0 / math.sqrt(t5.d_model * t5.d_kv)),
        Draw(f"{prefix}.k.weight", (inner, t5.d_model), 1.0 / math.sqrt(t5.d_model)),
        Draw(f"{prefix}.v.weight", (inner, t5.d_model), 1.0 / math.sqrt(t5.d_model)),
        Draw(f"{prefix}.o.weight", (t5.d_model, inner), 0.5 / math.sqrt(inner)),
    ]
    if relative:
        draws.append(Draw(f"{prefix}.relative_attention_bias.weight", (t5.buckets, t5.num_heads), 0.1))
    return draws


def _t5_dense(prefix: str, t5: T5Shape) -> list[Draw]:
    return [
        Draw(f"{prefix}.wi_0.weight", (t5.d_ff, t5.d_model), 1.0 / math.sqrt(t5.d_model)),
        Draw(f"{prefix}.wi_1.weight", (t5.d_ff, t5.d_model), 1.0 / math.sqrt(t5.d_model)),
        Draw(f"{prefix}.wo.weight", (t5.d_model, t5.d_ff), 0.5 / math.sqrt(t5.d_ff)),
    ]


def t5_draws(t5: T5Shape) -> list[Draw]:
    """`T5ForConditionalGeneration` as transformers saves flan-t5-xl: the tied embeddings stored
    once as `shared.weight`, an untied `lm_head`, encoder then decoder."""
    norm = lambda name: Draw(name, (t5.d_model,), 0.02, mean=1.0)  # noqa: E731
    draws = [Draw("shared.weight", (t5.vocab_size, t5.d_model), 1.0)]
    for i in range(t5.num_layers):
        p = f"encoder.block.{i}.layer"
        draws += _t5_attention(f"{p}.0.SelfAttention", t5, relative=i == 0) + [norm(f"{p}.0.layer_norm.weight")]
        draws += _t5_dense(f"{p}.1.DenseReluDense", t5) + [norm(f"{p}.1.layer_norm.weight")]
    draws.append(norm("encoder.final_layer_norm.weight"))
    for i in range(t5.num_layers):
        p = f"decoder.block.{i}.layer"
        draws += _t5_attention(f"{p}.0.SelfAttention", t5, relative=i == 0) + [norm(f"{p}.0.layer_norm.weight")]
        draws += _t5_attention(f"{p}.1.EncDecAttention", t5, relative=False) + [norm(f"{p}.1.layer_norm.weight")]
        draws += _t5_dense(f"{p}.2.DenseReluDense", t5) + [norm(f"{p}.2.layer_norm.weight")]
    draws.append(norm("decoder.final_layer_norm.weight"))
    draws.append(Draw("lm_head.weight", (t5.vocab_size, t5.d_model), 1.0 / math.sqrt(t5.d_model)))
    return draws


def shard(draws: list[Draw], max_bytes: int, itemsize: int = 4) -> list[list[Draw]]:
    """Consecutive tensors into shards of at most `max_bytes` (a larger tensor gets its own), as
    transformers' `save_pretrained(max_shard_size=…)` splits them."""
    shards: list[list[Draw]] = [[]]
    size = 0
    for draw in draws:
        nbytes = math.prod(draw.shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(draw)
        size += nbytes
    return shards


def t5_config(t5: T5Shape) -> dict:
    """flan-t5-xl's config.json with this shape's sizes."""
    return {
        "architectures": ["T5ForConditionalGeneration"], "d_ff": t5.d_ff, "d_kv": t5.d_kv, "d_model": t5.d_model,
        "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
        "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512, "num_decoder_layers": t5.num_layers,
        "num_heads": t5.num_heads, "num_layers": t5.num_layers, "output_past": True, "pad_token_id": 0,
        "relative_attention_max_distance": t5.max_distance, "relative_attention_num_buckets": t5.buckets,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.23.1", "use_cache": True,
        "vocab_size": t5.vocab_size,
    }


def write_t5(folder: Path, t5: T5Shape, tokenizer_template: Path, shard_bytes: int) -> None:
    """config.json, tokenizer.json, `model-0000k-of-0000n.safetensors` and their index."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = shard(t5_draws(t5), shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, draws in zip(names, shards):
        write_safetensors(folder / name, entries(draws, "float32"), metadata={"format": "pt"})
        weight_map.update((draw.name, name) for draw in draws)
    total = sum(math.prod(draw.shape) * 4 for draws in shards for draw in draws)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(t5_config(t5), indent=2) + "\n")
    (folder / "tokenizer.json").write_text(json.dumps(full_vocabulary_tokenizer(json.loads(tokenizer_template.read_text()))))


def full_vocabulary_tokenizer(template: dict) -> dict:
    """A T5 Unigram tokenizer.json with flan-t5-xl's 32100 ids, grown from a small one.

    The template's pieces keep their ids; filler pieces (never produced for ordinary text, very
    low score) take ids up to 32000, and the template's `<extra_id_N>` tokens move to the last
    100 ids, N = 99 - (id - 32000) as in T5.
    """
    vocab = [entry for entry in template["model"]["vocab"] if not entry[0].startswith("<extra_id_")]
    filler = [[f"\u2581rehearsal{index}", -99.0] for index in range(TOKENIZER_PIECES - len(vocab))]
    extra = [[f"<extra_id_{EXTRA_IDS - 1 - k}>", 0.0] for k in range(EXTRA_IDS)]
    ids = {piece: index for index, (piece, _) in enumerate(vocab + filler + extra)}
    added = [{**token, "id": ids[token["content"]]} for token in template["added_tokens"]]
    return {**template, "added_tokens": added, "model": {**template["model"], "vocab": vocab + filler + extra}}


# ---- sd-vae-ft-ema --------------------------------------------------------------------------

def _conv(name: str, out_channels: int, in_channels: int, kernel: int, gain: float = 1.0) -> list[Draw]:
    fan_in = in_channels * kernel * kernel
    return [Draw(f"{name}.weight", (out_channels, in_channels, kernel, kernel), gain / math.sqrt(fan_in)),
            Draw(f"{name}.bias", (out_channels,), 0.02)]


def _group_norm(name: str, channels: int) -> list[Draw]:
    return [Draw(f"{name}.weight", (channels,), 0.02, mean=1.0), Draw(f"{name}.bias", (channels,), 0.02)]


def _resnet(name: str, in_channels: int, out_channels: int) -> list[Draw]:
    draws = _group_norm(f"{name}.norm1", in_channels) + _conv(f"{name}.conv1", out_channels, in_channels, 3)
    draws += _group_norm(f"{name}.norm2", out_channels) + _conv(f"{name}.conv2", out_channels, out_channels, 3, gain=0.5)
    if in_channels != out_channels:
        draws += _conv(f"{name}.conv_shortcut", out_channels, in_channels, 1)
    return draws


def _mid_block(name: str, channels: int) -> list[Draw]:
    draws = _resnet(f"{name}.resnets.0", channels, channels)
    a = f"{name}.attentions.0"
    draws += _group_norm(f"{a}.group_norm", channels)
    for part in ("query", "key", "value"):
        draws += _linear(f"{a}.{part}", channels, channels)
    draws += _linear(f"{a}.proj_attn", channels, channels, gain=0.5)
    return draws + _resnet(f"{name}.resnets.1", channels, channels)


def vae_draws(vae: VAEShape) -> list[Draw]:
    """An `AutoencoderKL` state dict with the pre-0.14 diffusers attention names
    (query/key/value/proj_attn), as sd-vae-ft-ema was saved by diffusers 0.4.2."""
    channels, latent = vae.block_out_channels, vae.latent_channels
    draws = _conv("encoder.conv_in", channels[0], 3, 3)
    previous = channels[0]
    for i, width in enumerate(channels):
        for j in range(vae.layers_per_block):
            draws += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", previous if j == 0 else width, width)
        if i < len(channels) - 1:
            draws += _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", width, width, 3)
        previous = width
    draws += _mid_block("encoder.mid_block", channels[-1])
    draws += _group_norm("encoder.conv_norm_out", channels[-1]) + _conv("encoder.conv_out", 2 * latent, channels[-1], 3)
    draws += _conv("quant_conv", 2 * latent, 2 * latent, 1) + _conv("post_quant_conv", latent, latent, 1)
    draws += _conv("decoder.conv_in", channels[-1], latent, 3)
    draws += _mid_block("decoder.mid_block", channels[-1])
    previous = channels[-1]
    for i, width in enumerate(reversed(channels)):
        for j in range(vae.layers_per_block + 1):
            draws += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", previous if j == 0 else width, width)
        if i < len(channels) - 1:
            draws += _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", width, width, 3)
        previous = width
    draws += _group_norm("decoder.conv_norm_out", channels[0]) + _conv("decoder.conv_out", 3, channels[0], 3)
    return draws


def vae_config(vae: VAEShape) -> dict:
    """sd-vae-ft-ema's config.json (diffusers 0.4.2: no scaling_factor, 0.18215 by default)."""
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
        "block_out_channels": list(vae.block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * len(vae.block_out_channels),
        "in_channels": 3, "latent_channels": vae.latent_channels, "layers_per_block": vae.layers_per_block,
        "norm_num_groups": vae.norm_num_groups, "out_channels": 3, "sample_size": vae.sample_size,
        "up_block_types": ["UpDecoderBlock2D"] * len(vae.block_out_channels),
    }


def write_vae(folder: Path, vae: VAEShape) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", entries(vae_draws(vae), "float32"))
    (folder / "config.json").write_text(json.dumps(vae_config(vae), indent=2) + "\n")


def sizes(folder: Path) -> Iterator[tuple[str, int]]:
    """(relative path, bytes) of every file under `folder`."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield str(path.relative_to(folder)), path.stat().st_size
