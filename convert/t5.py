"""Convert a Hugging Face T5 folder (flan-t5-xl) into our text-encoder folder.

Keeps the encoder only and copies the tokenizer files beside the weights, so the runtime needs
nothing but the converted folder. Works from a single `model.safetensors`, a sharded
`model.safetensors.index.json` or a `pytorch_model.bin`, never through torch.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

from mlx_starflow.convert.checkpoint import open_checkpoint
from mlx_starflow.convert.maps.t5 import is_encoder_key, map_t5_weights
from mlx_starflow.convert.safetensors_io import shard_files, write_safetensors
from mlx_starflow.convert.tensors import LazyTensor, TensorEntry, check_weight_dtypes, finite_weight
from mlx_starflow.config import DTYPES, T5Config, read_json_object
from mlx_starflow.errors import ConfigError, ModelNotFound, WeightsError
from mlx_starflow.model_io import WEIGHTS_FILE, atomic_folder, sha256_file, write_manifest
from mlx_starflow.native import call_native
from mlx_starflow.t5 import T5Encoder
from mlx_starflow.text_encoder import EOS_TOKEN, PAD_TOKEN, TOKENIZER_FILE

logger = logging.getLogger(__name__)

HF_CONFIG_FILE = "config.json"
CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""Looked for in this order: safetensors first, as `from_pretrained` prefers them."""
OPTIONAL_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "spiece.model")
GATED_GELU = "gated-gelu"


def convert_t5(src: str | Path, out: str | Path, *, dtype: str = "float32", force: bool = False) -> Path:
    """Write the encoder of the T5 model in `src` to the text-encoder folder `out`, in `dtype`.

    Everything is checked before the output folder is created, and the folder appears only
    once complete; an existing `out` is replaced only with `force`.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ModelNotFound(f"no T5 model folder at {src}; download google/flan-t5-xl from Hugging Face or give its local folder")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    config = t5_config_from_hf(read_hf_config(src), dtype)
    check_tokenizer(src / TOKENIZER_FILE, config.vocab_size)
    checkpoint_path = find_checkpoint(src)
    weights = map_t5_weights(open_checkpoint(checkpoint_path, wanted=is_encoder_key), config.num_layers)
    check_shapes(weights, config)
    check_weight_dtypes(weights.values(), checkpoint_path)
    sources = [src / HF_CONFIG_FILE, *checkpoint_source_files(checkpoint_path), src / TOKENIZER_FILE]
    with atomic_folder(out, force=force, kind=T5Config.KIND) as folder:
        logger.info("converting %d encoder tensors from %s to %s", len(weights), checkpoint_path, dtype)
        config.save(folder)
        write_safetensors(folder / WEIGHTS_FILE, [_entry(name, tensor, dtype, checkpoint_path) for name, tensor in weights.items()])
        for name in (TOKENIZER_FILE, *OPTIONAL_TOKENIZER_FILES):
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)
        write_manifest(
            folder,
            T5Config.KIND,
            sources=[{"path": path.relative_to(src).as_posix(), "sha256": sha256_file(path)} for path in sources],
            dtype=dtype,
        )
    return out


def read_hf_config(src: Path) -> dict[str, Any]:
    """The Hugging Face `config.json` of `src` as a dict, or a `ConfigError` saying what is wrong with it."""
    path = src / HF_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{src} has no {HF_CONFIG_FILE}; download it with the model's weights")
    return read_json_object(path, "download it again")


def t5_config_from_hf(hf: dict[str, Any], dtype: str) -> T5Config:
    """Our encoder config from a Hugging Face T5 `config.json`; only the flan-t5 (v1.1) layout is accepted.

    The bucket and epsilon keys fall back to the defaults transformers itself uses when a
    config omits them; the shape keys are required.
    """
    model_type = hf.get("model_type", "t5")
    if model_type != "t5":
        raise ConfigError(f"config.json describes a {model_type!r} model; only T5 encoders (google/flan-t5-*) are supported")
    feed_forward = hf.get("feed_forward_proj")
    if feed_forward != GATED_GELU:
        raise ConfigError(
            f"config.json has feed_forward_proj {feed_forward!r}; only {GATED_GELU!r} T5 models "
            "(flan-t5, t5-v1_1) are supported, as STARFlow uses google/flan-t5-xl"
        )
    required = ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers")
    missing = [key for key in required if key not in hf]
    if missing:
        raise ConfigError(f"config.json lacks {missing}; it is not a complete T5 config, download it again")
    try:
        return T5Config(
            **{key: int(hf[key]) for key in required},
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
            dtype=dtype,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json does not describe a usable T5 encoder: {e}") from None


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """Refuse a missing or unusable tokenizer now rather than at generation time."""
    if not path.is_file():
        raise ConfigError(
            f"{path.parent} has no {TOKENIZER_FILE}; download it with the model (google/flan-t5-xl ships one) and convert again"
        )
    try:
        tokenizer = call_native(Tokenizer.from_file, str(path))
    except Exception as e:
        raise ConfigError(f"{path} cannot be read as a tokenizer ({e}); download it again") from None
    absent = [token for token in (EOS_TOKEN, PAD_TOKEN) if tokenizer.token_to_id(token) is None]
    if absent:
        raise ConfigError(f"{path} has no {' or '.join(absent)} token; it is not a T5 tokenizer")
    if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ConfigError(
            f"{path} has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but the model embeds "
            f"{vocab_size}; the tokenizer does not belong to these weights"
        )


def find_checkpoint(src: Path) -> Path:
    """The weights entry point of a Hugging Face T5 folder."""
    for name in CHECKPOINT_FILES:
        if (src / name).is_file():
            return src / name
    raise ModelNotFound(f"{src} holds no T5 weights: expected one of {', '.join(CHECKPOINT_FILES)}; download the model's weight files")


def checkpoint_source_files(checkpoint_path: Path) -> list[Path]:
    """The files the encoder is read from: the checkpoint, or an index and the shards holding encoder weights."""
    if not checkpoint_path.name.endswith(".index.json"):
        return [checkpoint_path]
    return [checkpoint_path, *(checkpoint_path.parent / shard for shard in shard_files(checkpoint_path, is_encoder_key))]


def check_shapes(weights: dict[str, LazyTensor], config: T5Config) -> None:
    """Compare tensor shapes with the config before any data is read."""
    expected = {name: tuple(value.shape) for name, value in tree_flatten(T5Encoder(config).parameters())}
    wrong = [
        f"{name} {list(tensor.shape)} (expected {list(expected[name])})"
        for name, tensor in weights.items()
        if tuple(tensor.shape) != expected[name]
    ]
    if wrong:
        raise WeightsError(
            f"tensor shapes do not match config.json: {'; '.join(wrong[:4])}; check that config.json belongs to these weights"
        )


def _entry(name: str, tensor: LazyTensor, dtype: str, source: Path) -> TensorEntry:
    """Read, check and cast one tensor only when the writer reaches it, so memory stays near one tensor."""

    def produce() -> mx.array:
        return finite_weight(tensor, source).astype(getattr(mx, dtype))

    return TensorEntry(name, dtype, tuple(tensor.shape), produce)
