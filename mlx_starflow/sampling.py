"""The flow's per-token arithmetic as pure functions, always in float32 (as the official code).

A block predicts, for every token, a Gaussian N(mu, sigma²) from the tokens before it; the
likelihood direction whitens (x - mu) / sigma and the sampling direction colours z·sigma + mu.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

# softplus(0 + INV_SOFTPLUS_1) == 1: a zero scale logit means unit scale.
INV_SOFTPLUS_1 = 0.541324854612918
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LOG2_PIXEL_SCALE = math.log2(127.5)
"""Bits per dimension from [-1, 1] pixels to the usual 8-bit [0, 255] convention."""


def soft_clip(x: mx.array, bound: float) -> mx.array:
    """bound·tanh(x/bound) on every output channel (scale logit and shift alike); 0 turns it off."""
    return bound * mx.tanh(x / bound) if bound > 0 else x


def scale_from_logit(logit: mx.array, use_softplus: bool = True) -> mx.array:
    """sigma from the predicted scale logit: softplus(a + ln(e-1)), or exp(a)."""
    logit = logit.astype(mx.float32)
    return nn.softplus(logit + INV_SOFTPLUS_1) if use_softplus else mx.exp(logit)


def guided_gaussian(mu: mx.array, sigma: mx.array, guidance: float) -> tuple[mx.array, mx.array]:
    """Classifier-free guidance on a batch of conditional rows then unconditional rows.

    Each element's Gaussian becomes proportional to p_c^(1+w) / p_u^w, with the precision
    ratio clipped so the guided variance never exceeds sigma_c². The guided values are
    returned for both halves, so the unconditional branch sees the guided tokens.
    """
    mu_c, mu_u = mx.split(mu, 2, axis=0)
    sigma_c, sigma_u = mx.split(sigma, 2, axis=0)
    w = guidance
    s = mx.square(mx.minimum(sigma_c / sigma_u, 1.0))
    denom = 1.0 + w - w * s
    sigma_g = sigma_c / mx.sqrt(denom)
    mu_g = ((1.0 + w) * mu_c - (w * s) * mu_u) / denom
    return mx.concatenate([mu_g, mu_g], axis=0), mx.concatenate([sigma_g, sigma_g], axis=0)


def whiten(x: mx.array, mu: mx.array, sigma: mx.array) -> tuple[mx.array, mx.array]:
    """Likelihood direction: z = (x - mu)/sigma and its log-determinant -log sigma."""
    return (x.astype(mx.float32) - mu) / sigma, -mx.log(sigma)


def colour(z: mx.array, mu: mx.array, sigma: mx.array) -> mx.array:
    """Sampling direction: x = z·sigma + mu, the exact inverse of `whiten`."""
    return z.astype(mx.float32) * sigma + mu


def jacobi_change(new: mx.array, old: mx.array) -> mx.array:
    """Relative change of a Jacobi iterate, mean((new-old)²)/mean(new²) over the whole chunk and batch."""
    return mx.mean(mx.square(new - old)) / mx.mean(mx.square(new))


def nll_per_sample(z: mx.array, logdets: list[mx.array]) -> mx.array:
    """The official loss per sample, in nats per dimension without the ½·ln 2π constant."""
    axes = tuple(range(1, z.ndim))
    loss = 0.5 * mx.mean(mx.square(z), axis=axes)
    for logdet in logdets:
        loss = loss - mx.mean(logdet, axis=tuple(range(1, logdet.ndim)))
    return loss


def bits_per_dim(nll: mx.array) -> mx.array:
    """Exact negative log-likelihood per dimension in bits, from `nll_per_sample`."""
    return (nll + HALF_LOG_2PI) / math.log(2.0)
