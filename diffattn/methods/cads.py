"""CADS: condition-annealed sampling, a diversity baseline for contextual repulsion.

Sadat et al., "CADS: Unleashing the Diversity of Diffusion Models through Condition-Annealed
Sampling" (ICLR 2024), §3: early in sampling the condition y is replaced by a noisy copy whose
noise anneals away,

    ŷ = √γ(t) · y + s · √(1 − γ(t)) · n,   n ~ N(0, I)                       (Eq. 3)

with γ(t) = 1 for t ≤ τ1, (τ2 − t) / (τ2 − τ1) for τ1 < t < τ2 and 0 for t ≥ τ2, where t ∈ [0, 1]
and t = 1 is pure noise (Eq. 4); optionally rescaled back to the clean condition's statistics
and mixed by ψ (Eq. 5):

    ŷ_r = (ŷ − mean ŷ) / std ŷ · std y + mean y,   ŷ ← ψ · ŷ_r + (1 − ψ) · ŷ.

The functions here are that math alone, one per equation; statistics are taken per sample over
every other axis (tokens and features), as the community ports do. Defaults: the community's
τ1 = 0.6, τ2 = 0.9, s = 0.25, ψ = 1; the repulsion paper's comparison used τ1 = 0.3, τ2 = 0.8,
ψ = 1, s ∈ [0.1, 0.7] (../shared/reference/vmix_repulsion_decontext.md).
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def cads_gamma(t: float, tau1: float = 0.6, tau2: float = 0.9) -> float:
    """γ(t) of Eq. 4: 1 up to τ1, falling linearly to 0 at τ2 (t = 1 is pure noise)."""
    if not (0.0 <= tau1 < tau2 <= 1.0):
        raise ConfigError(f"CADS needs 0 <= tau1 < tau2 <= 1, got tau1={tau1!r}, tau2={tau2!r}")
    if not (isinstance(t, (int, float)) and math.isfinite(t)):
        raise ConfigError(f"CADS time t={t!r}: a finite number in [0, 1] (1 = pure noise)")
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def cads_rescale(noisy: torch.Tensor, clean: torch.Tensor, psi: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 5: ``noisy`` moved to ``clean``'s per-sample mean and std, mixed back by ψ."""
    if not (0.0 <= psi <= 1.0):
        raise ConfigError(f"CADS psi={psi!r}: a mix weight in [0, 1]")
    dims = tuple(range(1, noisy.ndim))  # per sample: every axis but the batch
    mean_n, std_n = noisy.mean(dims, keepdim=True), noisy.std(dims, keepdim=True)
    mean_c, std_c = clean.mean(dims, keepdim=True), clean.std(dims, keepdim=True)
    rescaled = (noisy - mean_n) / (std_n + eps) * std_c + mean_c
    return psi * rescaled + (1.0 - psi) * noisy


def cads_condition(y: torch.Tensor, gamma: float, scale: float = 0.25, psi: float = 1.0,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The annealed condition ŷ of Eq. 3 (rescaled by Eq. 5 when ψ > 0). ``y``: [B, ...] text
    embeddings (or pooled vectors); ``noise``: the N(0, I) draw, else drawn from ``generator``.
    Exact at γ = 1: ``y`` itself, whatever ψ and the noise."""
    if not (0.0 <= gamma <= 1.0):
        raise ConfigError(f"CADS gamma={gamma!r}: in [0, 1] (cads_gamma gives it)")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"CADS scale={scale!r}: a finite noise scale s >= 0")
    if gamma == 1.0:
        return y
    if noise is None:
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    elif noise.shape != y.shape:
        raise ConfigError(f"CADS noise of shape {tuple(noise.shape)} for a condition of shape {tuple(y.shape)}")
    noisy = math.sqrt(gamma) * y + scale * math.sqrt(1.0 - gamma) * noise
    return cads_rescale(noisy, y, psi) if psi > 0 else noisy
