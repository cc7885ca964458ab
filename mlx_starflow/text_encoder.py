"""Prompts -> STARFlow text states: the official `encode_text` (T5 tokenizer + encoder, padding zeroed).

The tokenizer is the model's own `tokenizer.json`, run by the `tokenizers` library, so its
normalisation, pieces and special-token splitting are the reference's, not a re-implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from .config import T5Config
from .errors import ConfigError
from .model_io import load_weights, read_manifest
from .native import call_native
from .t5 import T5Encoder

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"


class TextEncoder:
    """A T5 tokenizer and encoder that turn prompts into fixed-length text states."""

    def __init__(self, tokenizer: Tokenizer, encoder: T5Encoder):
        # `tokenize` truncates and pads itself; settings stored in a tokenizer.json must not do it twice.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.eos_id = _token_id(tokenizer, EOS_TOKEN)
        self.pad_id = _token_id(tokenizer, PAD_TOKEN)
        if tokenizer.get_vocab_size(with_added_tokens=True) > encoder.config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but the encoder "
                f"embeds only {encoder.config.vocab_size}; use the tokenizer that came with the weights"
            )

    def pieces(self, prompts: str | Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt without `</s>`; special-token strings in the text become those tokens."""
        encodings = self.tokenizer.encode_batch(_as_list(prompts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def count_tokens(self, prompts: str | Sequence[str]) -> list[int]:
        """Tokens each prompt needs, `</s>` included; above the text length a prompt is truncated."""
        return [len(ids) + 1 for ids in self.pieces(prompts)]

    def tokenize(self, prompts: str | Sequence[str], length: int) -> tuple[mx.array, mx.array]:
        """(ids, mask), each (B, length) int32: the first `length - 1` pieces, `</s>`, then `<pad>`.

        The mask is 1 on the pieces and `</s>`, 0 on padding. `</s>` is always present, so a
        truncated prompt ends with it too (the reference tokenizer call with truncation).
        """
        if length < 1:
            raise ValueError(f"text length must be at least 1 to hold </s>, got {length}")
        rows = self.pieces(prompts)
        ids = np.full((len(rows), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), length), dtype=np.int32)
        for row, pieces in enumerate(rows):
            kept = [*pieces[: length - 1], self.eos_id]
            ids[row, : len(kept)] = kept
            mask[row, : len(kept)] = 1
        return mx.array(ids), mx.array(mask)

    def encode(self, prompts: str | Sequence[str], length: int) -> mx.array:
        """Text states (B, length, d_model) float32; rows past `</s>` are exactly 0.0.

        The empty prompt "" gives `</s>` alone: the unconditional row for classifier-free guidance.
        """
        ids, mask = self.tokenize(prompts, length)
        states = self.encoder(ids, mask)
        return mx.where(mask[..., None] != 0, states, 0.0)


def load_text_encoder(folder: str | Path) -> TextEncoder:
    """Load a converted text-encoder folder (config, weights, tokenizer files, manifest) strictly."""
    folder = Path(folder)
    read_manifest(folder)
    config = T5Config.load(folder)
    tokenizer_path = folder / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise ConfigError(f"{folder} has no {TOKENIZER_FILE}; convert the text encoder again")
    try:
        tokenizer = call_native(Tokenizer.from_file, str(tokenizer_path))
    except Exception as e:
        raise ConfigError(f"{tokenizer_path} cannot be read as a tokenizer ({e}); convert the text encoder again") from None
    encoder = T5Encoder(config)
    load_weights(encoder, folder)
    return TextEncoder(tokenizer, encoder)


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ConfigError(f"the tokenizer has no {token} token; a T5 tokenizer.json is needed")
    return token_id


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)
