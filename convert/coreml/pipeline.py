"""The manifest's sampling semantics in NumPy, over any backend that runs the exported functions.

This is the Python twin of the Swift `FlowSampler`: block order, SOS, positions, guidance,
sequential and Jacobi inversion (a short last chunk padded to the exported chunk size), the
score step and the decode, all as the contract describes, with the sampler arithmetic in
float32. Tests drive it over the MIL evaluator; the Mac check script over Core ML.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

INV_SOFTPLUS_1 = np.float32(0.541324854612918)


class FlowBlockRunner(Protocol):
    """One exported flow block: a fresh cache per image, the text prefill, and cached steps."""

    def reset(self) -> None: ...

    def prefill(self, text: np.ndarray) -> None: ...

    def step(self, tokens: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Jacobi:
    block_size: int = 16
    threshold: float = 1e-3
    max_iter: int = 32


def patchify(latent: np.ndarray, patch: int) -> np.ndarray:
    """(B, C, H, W) → (B, N, p·p·C) in raster order, packing c (h p1) (w p2) → h w (p1 p2 c)."""
    b, c, height, width = latent.shape
    h, w = height // patch, width // patch
    x = latent.reshape(b, c, h, patch, w, patch).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(b, h * w, patch * patch * c)


def unpatchify(tokens: np.ndarray, channels: int, patch: int, h: int, w: int) -> np.ndarray:
    b = tokens.shape[0]
    x = tokens.reshape(b, h, w, patch, patch, channels).transpose(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h * patch, w * patch)


def gaussian(a: np.ndarray, b: np.ndarray, guidance: float, guided: bool, use_softplus: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of each token; for a guided block (rows = [conditional; unconditional]) the
    clipped product p_c^(1+w)/p_u^w, written to both halves."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    sigma = np.logaddexp(np.float32(0), a + INV_SOFTPLUS_1).astype(np.float32) if use_softplus else np.exp(a)
    if not guided:
        return b, sigma
    w = np.float32(guidance)
    sigma_c, sigma_u = np.split(sigma, 2)
    b_c, b_u = np.split(b, 2)
    s = np.square(np.minimum(sigma_c / sigma_u, np.float32(1)))
    d = np.float32(1) + w - w * s
    sigma_g, mu_g = sigma_c / np.sqrt(d), ((np.float32(1) + w) * b_c - w * s * b_u) / d
    return np.concatenate([mu_g, mu_g]), np.concatenate([sigma_g, sigma_g])


def invert_sequential(block: FlowBlockRunner, sos: np.ndarray, z: np.ndarray, start: int, guidance: float, guided: bool,
                      use_softplus: bool) -> np.ndarray:
    """Token by token: step(previous token) at position start + t; x_t = z_t·sigma + mu."""
    rows, count, channels = z.shape
    previous = np.broadcast_to(sos, (rows, 1, channels)).astype(np.float32)
    out = np.empty_like(z)
    for t in range(count):
        a, b = block.step(previous, start + t)
        mu, sigma = gaussian(a, b, guidance, guided, use_softplus)
        out[:, t : t + 1] = z[:, t : t + 1] * sigma + mu
        previous = out[:, t : t + 1]
    return out


def invert_jacobi(block: FlowBlockRunner, sos: np.ndarray, z: np.ndarray, start: int, guidance: float, guided: bool,
                  use_softplus: bool, jacobi: Jacobi, chunk: int) -> tuple[np.ndarray, list[int]]:
    """Block-wise Jacobi from the noise itself; returns the tokens and each chunk's iteration count.

    Every pass runs the exported `chunk`-token function: a shorter last chunk is padded with
    zeros, whose keys land in spare cache slots, and its padded outputs are dropped.
    """
    rows, count, channels = z.shape
    iterate = np.concatenate([np.broadcast_to(sos, (rows, 1, channels)), z], axis=1).astype(np.float32)
    iterations = []
    first = 0
    while first < count:
        size = min(jacobi.block_size, count - first)
        passes = 0
        for i in range(jacobi.max_iter):
            inputs = np.zeros((rows, chunk, channels), np.float32)
            inputs[:, :size] = iterate[:, first : first + size]
            a, b = block.step(inputs, start + first)
            mu, sigma = gaussian(a[:, :size], b[:, :size], guidance, guided, use_softplus)
            new = z[:, first : first + size] * sigma + mu
            old = iterate[:, first + 1 : first + 1 + size]
            change = np.mean(np.square(new - old)) / np.mean(np.square(new))
            iterate[:, first + 1 : first + 1 + size] = new
            passes += 1
            if change < jacobi.threshold or i == jacobi.max_iter - 1:
                break
        iterations.append(passes)
        first += size
    return iterate[:, 1:], iterations


def sample(manifest: dict[str, Any], blocks: Callable[[int], FlowBlockRunner], noise: np.ndarray, text: np.ndarray | None,
           guidance: float = 0.0, jacobi: Jacobi | None = None) -> tuple[list[np.ndarray], list[list[int]]]:
    """Noise (B, C, H, W) → [noise, after each block…] (NCHW) and the Jacobi iteration counts.

    `text`: the conditional rows then the unconditional rows (2B, T, D) for a conditioned flow.
    """
    latent = manifest["latent"]
    p, channels = latent["patch_size"], latent["channels"]
    h, w = latent["height"] // p, latent["width"] // p
    batch = noise.shape[0]
    tokens = patchify(noise.astype(np.float32), p)
    sequence, counts = [noise.astype(np.float32)], []
    for entry in sorted(manifest["flow"]["blocks"], key=lambda e: -e["index"]):
        block = blocks(entry["index"])
        block.reset()
        z = tokens[:, ::-1] if entry["flipped"] else tokens
        guided = entry["has_text"]
        if guided:
            z = np.concatenate([z, z])
            block.prefill(text)
        if z.shape[0] != entry["rows"]:
            raise ValueError(f"block {entry['index']} was exported for {entry['rows']} rows, got {z.shape[0]}")
        sos = np.asarray(entry["sos"], np.float32)
        start = entry["text_length"]
        use_softplus = manifest["flow"]["use_softplus"]
        if jacobi is None:
            x = invert_sequential(block, sos, z, start, guidance, guided, use_softplus)
        else:
            chunk = min(jacobi.block_size, entry["tokens"])
            if str(chunk) not in entry["functions"]["step"]:
                raise ValueError(f"no step function for Jacobi block size {jacobi.block_size}; this export has {sorted(entry['functions']['step'], key=int)}")
            x, iterations = invert_jacobi(block, sos, z, start, guidance, guided, use_softplus, jacobi, chunk)
            counts.append(iterations)
        x = x[:batch]
        tokens = np.ascontiguousarray(x[:, ::-1] if entry["flipped"] else x)
        sequence.append(unpatchify(tokens, channels, p, h, w))
    return sequence, counts
