"""CADS: condition-annealed sampling, a diversity baseline for contextual repulsion.

Sadat et al., "CADS: Unleashing the Diversity of Diffusion Models through Condition-Annealed
Sampling" (ICLR 2024), §3: early in sampling the condition y is replaced by a noisy copy whose
noise anneals away,

    ŷ = √γ(t) · y + s · √(1 − γ(t)) · n,   n ~ N(0, I)                       (Eq. 3)

with γ(t) = 1 for t ≤ τ1, (τ2 − t) / (τ2 − τ1) for τ1 < t < τ2 and 0 for t ≥ τ2, where t ∈ [0, 1]
and t = 1 is pure noise (Eq. 4); optionally rescaled back to the clean condition's statistics
and mixed by ψ (Eq. 5):

    ŷ_r = (ŷ − mean ŷ) / std ŷ · std y + mean y,   ŷ ← ψ · ŷ_r + (1 − ψ) · ŷ.

The functions here are that math, one per equation; statistics are taken per sample over
every other axis (tokens and features), as the community ports do. :class:`CADS` applies it
to a pipeline as a control (stage 0 of ``diffattn.controls``): at every step it replaces the
text condition of the ``cond`` rows (the family's ``condition_arguments``: SD3 / FLUX tokens
and pooled vector, UNet / Wan tokens) by ŷ with fresh noise per row and step, t = 1 − i / n at
step i of n (the community ports' clock, so the anneal follows sampling progress on every
scheduler); the negative prompt's rows stay clean, as the paper noises y only. Defaults: the community's
τ1 = 0.6, τ2 = 0.9, s = 0.25, ψ = 1; the repulsion paper's comparison used τ1 = 0.3, τ2 = 0.8,
ψ = 1, s ∈ [0.1, 0.7] (../shared/reference/vmix_repulsion_decontext.md).
"""
from __future__ import annotations

import math

import torch

from ..controls import Control, StepState, no_sites
from ..errors import ConfigError, ControlError


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


def cads_time(step: StepState) -> float:
    """t of Eq. 4 at a denoising step: 1 − index / num_steps (1 at the first step)."""
    if not step.num_steps:
        raise ControlError("CADS needs the run's step count to anneal the condition; run it inside a pipeline call "
                           "(or a diffattn sampler) that reports num_inference_steps")
    return 1.0 - step.index / step.num_steps



class CADS(Control):
    """Condition-annealed sampling (module docstring) as a control.

    scale:       s, the noise scale of Eq. 3 (0: the clean condition; the repulsion paper
                 sweeps 0.1 … 0.7);
    tau1, tau2:  the anneal of Eq. 4 (t ≤ τ1: clean; t ≥ τ2: pure noise of scale s);
    psi:         ψ of Eq. 5 (0: no rescale);
    seed:        the noise of step i is drawn from ``seed`` and i, so a run is reproducible
                 and the rows of one prompt get different noise;
    branches:    rows whose condition is annealed (default ``("cond",)``).

        with da.attach(pipe, da.CADS(scale=0.25)):
            images = pipe(prompt, num_images_per_prompt=4).images
    """

    order = 0

    def __init__(self, scale: float = 0.25, tau1: float = 0.6, tau2: float = 0.9, psi: float = 1.0, *,
                 seed: int = 0, branches=("cond",), order: int | None = None):
        cads_gamma(0.5, tau1, tau2)  # validates the anneal
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
            raise ControlError(f"CADS scale={scale!r}: a finite noise scale s >= 0")
        if not (isinstance(psi, (int, float)) and 0.0 <= psi <= 1.0):
            raise ControlError(f"CADS psi={psi!r}: a mix weight in [0, 1]")
        if not isinstance(seed, int):
            raise ControlError(f"CADS seed={seed!r}: an int")
        super().__init__(sites=no_sites, branches=branches, order=order)
        self.scale, self.tau1, self.tau2, self.psi, self.seed = float(scale), tau1, tau2, float(psi), seed

    def gamma(self, step: StepState) -> float:
        """γ at ``step`` (1: the condition is left clean)."""
        return cads_gamma(cads_time(step), self.tau1, self.tau2)

    def edit_inputs(self, ctx, arguments: dict) -> dict:
        from ..families import get_family

        gamma = self.gamma(ctx.step)
        rows = ctx.row_sets(self.branches)  # branch slices, or a loop's row groups (IR's "scene")
        if gamma == 1.0 or self.scale == 0.0 or not rows:
            return arguments
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step.index)
        out = dict(arguments)
        for name in get_family(ctx.family).condition_arguments:
            y = arguments.get(name)
            if not torch.is_tensor(y):
                continue
            noisy = y.clone()  # never in place: the pipeline passes the same tensor at every step
            for sl in rows:
                noise = torch.randn(y[sl].shape, generator=generator, dtype=torch.float32).to(y.device, y.dtype)
                noisy[sl] = cads_condition(y[sl], gamma, self.scale, self.psi, noise=noise)
            out[name] = noisy
        return out

    def __repr__(self):
        return (f"CADS(scale={self.scale:g}, tau1={self.tau1:g}, tau2={self.tau2:g}, psi={self.psi:g}, "
                f"seed={self.seed}, branches={self.branches!r})")
