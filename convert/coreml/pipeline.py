"""Sampling an export folder through the MLX runtime's own block loop and samplers.

The exported block functions have fixed shapes (rows, chunk), while a sampler calls a block
with whatever rows and chunk it holds. `ExportedRunner` bridges the two as a
`mlx_starflow.block_runner.BlockRunner`, as the contract says the Swift package does: it
zero-pads the rows and the tokens of a call to the exported shape and drops the padded
outputs. The block order, token orders, SOS vectors, text lengths and the token layout come
from the manifest alone. Tests drive it over the MIL evaluator; the Mac check script over Core ML.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from mlx_starflow.errors import InputError
from mlx_starflow.flow import iter_blocks
from mlx_starflow.samplers import Sampler, Sequential
from mlx_starflow.token_layout import TokenLayout


class ExportedBlock(Protocol):
    """One exported flow block's calls (`backends.PackageBlock`): a fresh cache, the text
    prefill and cached steps at absolute cache positions, on exported shapes."""

    def reset(self) -> None: ...

    def prefill(self, text: np.ndarray) -> None: ...

    def step(self, tokens: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]: ...


def _pad(values: np.ndarray, rows: int, length: int) -> np.ndarray:
    """Zeros around `values` up to (rows, length, …): rows never mix in a block and a padded
    token only follows the real ones, so the real outputs are unchanged."""
    if values.shape[0] > rows:
        raise InputError(f"the export runs {rows} rows per call, got {values.shape[0]}; export with a larger --batch-size")
    padded = np.zeros((rows, length, *values.shape[2:]), np.float32)
    padded[: values.shape[0], : values.shape[1]] = values
    return padded


class ExportedRunner:
    """An exported block as a `BlockRunner`; its KV cache is the exported block's own state."""

    def __init__(self, block: ExportedBlock, entry: dict[str, Any], chunk: int):
        if str(chunk) not in entry["functions"]["step"]:
            exported = sorted(entry["functions"]["step"], key=int)
            raise InputError(f"block {entry['index']} has no step function for chunks of {chunk}; this export has {exported}")
        self.block, self.rows, self.chunk = block, entry["rows"], chunk
        self.text_length = entry["text_length"]
        self.flipped, self.has_text = entry["flipped"], entry["has_text"]
        self.sos = mx.array(np.asarray(entry["sos"], np.float32))

    def start(self, rows: int, text: mx.array | None) -> None:
        self.block.reset()
        if text is not None:
            self.block.prefill(_pad(np.array(text, np.float32), self.rows, text.shape[1]))

    def step(self, inputs: mx.array, index: int) -> tuple[mx.array, mx.array]:
        rows, count = inputs.shape[:2]
        a, b = self.block.step(_pad(np.array(inputs), self.rows, self.chunk), self.text_length + index)
        return mx.array(a[:rows, :count]), mx.array(b[:rows, :count])

    @property
    def pending(self) -> list[mx.array]:
        return []


def sample(
    manifest: dict[str, Any],
    blocks: Callable[[int], ExportedBlock],
    noise: np.ndarray,
    y: np.ndarray | None,
    guidance: float = 0.0,
    sampler: Sampler = Sequential(),
) -> tuple[list[np.ndarray], list[list[int]]]:
    """Noise (B, C, H, W) → [noise, after each block…] (NCHW) and each block's Jacobi iteration counts.

    As `StarFlow.sample`, with the same parameters: `y` holds the conditional rows, then with
    guidance the unconditional rows (2B).
    """
    if sampler.attn_temp != 1.0:
        raise InputError(f"exported blocks run the trained attention; sample with attn_temp 1, not {sampler.attn_temp:g}")
    noise = np.asarray(noise, np.float32)
    layout = TokenLayout.of(noise, manifest["latent"]["patch_size"])
    runners = [(entry["index"], ExportedRunner(blocks(entry["index"]), entry, sampler.chunk(entry["tokens"])))
               for entry in sorted(manifest["flow"]["blocks"], key=lambda e: -e["index"])]
    text = None if y is None else mx.array(np.asarray(y, np.float32))
    sequence, counts = [noise], []
    for progress in iter_blocks(runners, layout, mx.array(noise), text, guidance, sampler, manifest["flow"]["use_softplus"]):
        if progress.chunk is not None:
            if progress.chunk.start == 0:
                counts.append([])
            counts[-1].append(progress.chunk.iterations)
        if progress.output is not None:
            sequence.append(np.array(progress.output))
    return sequence, counts
