"""The score-step denoise through the flow blocks' own packages: x − σ²·∇ₓ[D·nll(x)].

The flow was trained on latents with Gaussian noise of std σ (config `noise_std`), so samples
are denoised before decoding with one Tweedie step (official `self_denoise`, MLX
`StarFlow.denoise`). D·nll per image is ½·Σz² + Σ_blocks Σ log σ. Each block's package holds a
`forward` function (tokens → z) and a `vjp` function (cotangent of z → cotangent of its
tokens, its own Σ log σ included), sharing the block's weights with the sampling steps, so the
score step costs no extra weights and is compressed with them. This module is the driver the
Swift package mirrors (`BlockScoreStep`): patchify, every block forward in order, then the vjps
in reverse from the cotangent z, then unpatchify. One image per call, conditional text rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Run = Callable[[str, str, dict[str, np.ndarray]], dict[str, np.ndarray]]
"""(package, function, inputs) → outputs of one call."""


def patchify(latent: np.ndarray, patch: int) -> np.ndarray:
    """(1, C, H, W) → (1, N, p·p·C) tokens in raster order, packing (p1, p2, c) like `StarFlow.patchify`."""
    _, c, height, width = latent.shape
    h, w = height // patch, width // patch
    grid = latent.reshape(c, h, patch, w, patch).transpose(1, 3, 2, 4, 0)
    return grid.reshape(1, h * w, patch * patch * c)


def unpatchify(tokens: np.ndarray, channels: int, height: int, width: int, patch: int) -> np.ndarray:
    """The inverse of `patchify`."""
    h, w = height // patch, width // patch
    grid = tokens.reshape(h, w, patch, patch, channels).transpose(4, 0, 2, 1, 3)
    return grid.reshape(1, channels, height, width)


def denoise(manifest: dict[str, Any], run: Run, latent: np.ndarray, text: np.ndarray | None) -> np.ndarray:
    """One image's denoised latent (1, C, H, W) under its conditional text states (1, T, D)."""
    entry = manifest["score_step"]
    names, outputs = entry["inputs"], entry["outputs"]
    layout = manifest["latent"]
    patch = layout["patch_size"]
    tokens = patchify(latent.astype(np.float32), patch)
    saved = []
    for block in manifest["flow"]["blocks"]:
        x = tokens[:, ::-1] if block["flipped"] else tokens
        first = {names["tokens"]: np.ascontiguousarray(x)}
        if block["has_text"]:
            first[names["text"]] = text.astype(np.float32)
        hiddens = []
        values = first
        for package in block["packages"]:
            inputs = {**values, **({names["tokens"]: first[names["tokens"]]} if package == block["packages"][-1] else {})}
            hiddens.append(inputs)
            out = run(package, block["functions"]["forward"], inputs)
            values = {names["hidden"]: out[outputs["next_hidden"]]} if outputs["next_hidden"] in out else out
        z = values[outputs["z"]]
        saved.append((block, hiddens))
        tokens = z[:, ::-1] if block["flipped"] else z
    cotangent = tokens
    for block, hiddens in reversed(saved):
        incoming = np.ascontiguousarray(cotangent[:, ::-1] if block["flipped"] else cotangent)
        total = np.zeros_like(incoming)
        for package, inputs in reversed(list(zip(block["packages"], hiddens))):
            out = run(package, block["functions"]["vjp"], {**inputs, names["cotangent"]: incoming})
            if outputs["tokens_cotangent"] in out:
                total = total + out[outputs["tokens_cotangent"]]
            if outputs["hidden_cotangent"] in out:
                incoming = out[outputs["hidden_cotangent"]]
        cotangent = total[:, ::-1] if block["flipped"] else total
    gradient = unpatchify(np.ascontiguousarray(cotangent), layout["channels"], layout["height"], layout["width"], patch)
    return (latent - np.float32(entry["noise_std"] ** 2) * gradient).astype(np.float32)
