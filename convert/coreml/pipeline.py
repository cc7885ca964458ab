"""Sampling an export folder with the MLX runtime's own inversion loops.

The exported block functions have fixed shapes (rows, chunk) while the loops in
`mlx_starflow.inversion` call a block's step with whatever rows and chunk they hold. `ExportedStep`
bridges the two, as the contract says the Swift package does: it zero-pads the rows and the
tokens of a call to the exported shape and drops the padded outputs. The block order, token
orders, SOS vectors, text lengths and the token layout come from the manifest alone. Tests drive
it over the MIL evaluator; the Mac check script over Core ML.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from mlx_starflow.flow import patchify, unpatchify
from mlx_starflow.inversion import BlockProgress, invert_jacobi, invert_sequential
from mlx_starflow.kv_cache import KVCache


class FlowBlockRunner(Protocol):
    """One exported flow block: a fresh cache per image, the text prefill, and cached steps."""

    def reset(self) -> None: ...

    def prefill(self, text: np.ndarray) -> None: ...

    def step(self, tokens: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]: ...


def _pad(values: np.ndarray, rows: int, length: int) -> np.ndarray:
    """Zeros around `values` up to (rows, length, …): rows never mix in a block and a padded
    token only follows the real ones, so the real outputs are unchanged."""
    if values.shape[0] > rows:
        raise ValueError(f"the export runs {rows} rows per call, got {values.shape[0]}; export with a larger --batch-size")
    padded = np.zeros((rows, length, *values.shape[2:]), np.float32)
    padded[: values.shape[0], : values.shape[1]] = values
    return padded


class ExportedStep:
    """An exported block as the MLX loops' `step`; the KV cache is the runner's state, so the
    loops get an empty `KVCache([], [])` and the keys and values pass through untouched."""

    def __init__(self, runner: FlowBlockRunner, entry: dict[str, Any], chunk: int):
        if str(chunk) not in entry["functions"]["step"]:
            exported = sorted(entry["functions"]["step"], key=int)
            raise ValueError(f"block {entry['index']} has no step function for chunks of {chunk}; this export has {exported}")
        self.runner, self.rows, self.chunk = runner, entry["rows"], chunk

    def prefill(self, text: np.ndarray) -> None:
        self.runner.prefill(_pad(np.asarray(text, np.float32), self.rows, text.shape[1]))

    def __call__(self, inputs: mx.array, position: mx.array, keys: list, values: list) -> tuple[mx.array, mx.array, list, list]:
        rows, count = inputs.shape[:2]
        a, b = self.runner.step(_pad(np.array(inputs), self.rows, self.chunk), int(position.item()))
        return mx.array(a[:rows, :count]), mx.array(b[:rows, :count]), keys, values


def _drain(loop: Generator[BlockProgress, None, mx.array]) -> tuple[mx.array, list[int]]:
    """Run an inversion loop to its end: the block's tokens and each Jacobi chunk's iterations."""
    iterations = []
    while True:
        try:
            progress = next(loop)
        except StopIteration as finished:
            return finished.value, iterations
        if progress.chunk is not None:
            iterations.append(progress.chunk.iterations)


def sample(
    manifest: dict[str, Any],
    blocks: Callable[[int], FlowBlockRunner],
    noise: np.ndarray,
    y: np.ndarray | None,
    guidance: float = 0.0,
    jacobi: bool = False,
    jacobi_block_size: int = 16,
    jacobi_threshold: float = 1e-3,
    jacobi_max_iter: int = 32,
) -> tuple[list[np.ndarray], list[list[int]]]:
    """Noise (B, C, H, W) → [noise, after each block…] (NCHW) and each block's Jacobi iteration counts.

    As `StarFlow.sample`, with the same parameters: `y` holds the conditional rows, then with
    guidance the unconditional rows (2B).
    """
    noise = np.asarray(noise, np.float32)
    batch = noise.shape[0]
    patch = manifest["latent"]["patch_size"]
    patched = patchify(mx.array(noise), patch)
    _, h, w, channels = patched.shape
    tokens = patched.reshape(batch, h * w, channels)
    sequence, counts = [noise], []
    for entry in sorted(manifest["flow"]["blocks"], key=lambda e: -e["index"]):
        runner = blocks(entry["index"])
        runner.reset()
        step = ExportedStep(runner, entry, min(jacobi_block_size, entry["tokens"]) if jacobi else 1)
        weight = guidance if entry["has_text"] else 0.0
        z = tokens[:, ::-1] if entry["flipped"] else tokens
        if weight > 0:
            z = mx.concatenate([z, z], axis=0)
        if entry["has_text"]:
            step.prefill(y)
        sos = mx.array(np.asarray(entry["sos"], np.float32))
        cache, prefix, use_softplus = KVCache([], []), entry["text_length"], manifest["flow"]["use_softplus"]
        if jacobi:
            loop = invert_jacobi(sos, z, step, cache, prefix, weight, use_softplus, jacobi_block_size, jacobi_threshold, jacobi_max_iter)
        else:
            loop = invert_sequential(sos, z, step, cache, prefix, weight, use_softplus)
        x, iterations = _drain(loop)
        if jacobi:
            counts.append(iterations)
        tokens = x[:batch, ::-1] if entry["flipped"] else x[:batch]
        sequence.append(np.array(unpatchify(tokens.reshape(batch, h, w, channels), patch, noise.shape[1])))
    return sequence, counts
