"""Latent particle guidance: a diversity baseline for contextual repulsion.

Corso et al., "Particle Guidance: non-I.I.D. Diverse Sampling with Diffusion Models" (ICLR
2024), §4 and the official SD code (``gcorso/particle-guidance``, the non-SVGD branch of
``pipeline_stable_diffusion_particle.py``): the samples of one prompt are particles that repel
each other in latent space. Per step, with x_i the flattened latents of one group of B,

    d_ij = ‖x_i − x_j‖ (j ≠ i),   h_i = median_j(d_ij)² / log(B − 1),   w_ij = exp(−d_ij² / h_i)
    φ_i = σ_t · coeff · Σ_{j≠i} 2 w_ij (x_i − x_j) / h_i

and φ is subtracted from the guided prediction, ε̂ ← ε̂_cfg − φ (the RBF kernel's gradient,
median-heuristic bandwidth per particle). The official code acts only while σ_t ≥ 1
(σ_t = √((1 − ᾱ)/ᾱ)); ``sigma_min`` is that threshold in the scheduler's own σ (flow-matching
σ ∈ [0, 1]: σ_DDPM = 1 is σ_flow = 0.5). With B = 2 the official bandwidth is infinite
(log 1 = 0) and the repulsion vanishes: groups of 3 or more are needed.

**CFG without rewriting the pipeline.** The control edits the prediction the pipeline
receives (stage 5 of ``diffattn.controls``): φ is subtracted from the cond rows *and* their
uncond twins, so the pipeline's (1 − w)(ε_u − φ) + w(ε_c − φ) = ε̂_cfg − φ for any w. On a
velocity (flow) or v-prediction model subtracting φ also moves the predicted x̂_0 by +σφ-like
amounts, i.e. pushes the particles apart; the step size differs from the ε case by the
parameterisation's scale, which the swept ``coeff`` absorbs.
"""
from __future__ import annotations

import math
import warnings

import torch

from ..controls import Control, no_sites
from ..errors import ControlError


def pg_bandwidth(distances: torch.Tensor) -> torch.Tensor:
    """h_i = median_j(d_ij)² / log(B − 1) from the [B, B − 1] off-diagonal distances; [B, 1]."""
    b = distances.shape[0]
    return distances.median(dim=1, keepdim=True).values ** 2 / math.log(b - 1) if b > 2 else \
        torch.full((b, 1), math.inf, dtype=distances.dtype, device=distances.device)


def particle_repulsion(x: torch.Tensor, sigma: float, coeff: float) -> torch.Tensor:
    """φ of one group of particles ``x`` [B, ...] (module docstring), same shape and dtype;
    zero for B < 3."""
    b = x.shape[0]
    if b < 3 or coeff == 0:
        return torch.zeros_like(x)
    v = x.reshape(b, -1).to(torch.promote_types(x.dtype, torch.float32))  # [B, d]
    diff = v[:, None, :] - v[None, :, :]  # [B, B, d]: x_i - x_j
    off = ~torch.eye(b, dtype=torch.bool, device=x.device)
    diff = diff[off].reshape(b, b - 1, -1)  # [B, B - 1, d]: the self-pair dropped
    dist = diff.norm(dim=-1)  # [B, B - 1]
    h = pg_bandwidth(dist)  # [B, 1]
    w = torch.exp(-dist ** 2 / h)  # [B, B - 1]
    phi = (2 * w[..., None] * diff / h[..., None]).sum(dim=1) * (sigma * coeff)  # [B, d]
    return phi.reshape(x.shape).to(x.dtype)



class LatentParticleGuidance(Control):
    """Particle guidance on the latents (module docstring).

    coeff:      the PG scale (0: i.i.d. samples, bit-exact stock);
    sigma_min:  act only while the scheduler's σ ≥ this (official: 1 on DDPM σ; None: every step);
    steps:      an optional step window on top of it.

        with da.attach(pipe, da.LatentParticleGuidance(coeff=2.0)):
            images = pipe(prompt, num_images_per_prompt=4).images
    """

    order = 0

    def __init__(self, coeff: float = 1.0, *, sigma_min: float | None = None, steps=None, order: int | None = None):
        if not (isinstance(coeff, (int, float)) and math.isfinite(coeff) and coeff >= 0):
            raise ControlError(f"LatentParticleGuidance coeff={coeff!r}: a finite scale >= 0")
        if sigma_min is not None and not (isinstance(sigma_min, (int, float)) and sigma_min >= 0):
            raise ControlError(f"LatentParticleGuidance sigma_min={sigma_min!r}: None or a noise level >= 0")
        super().__init__(sites=no_sites, steps=steps, branches=("cond",), order=order)
        self.coeff, self.sigma_min = float(coeff), sigma_min
        self._warned = False

    def edit_prediction(self, ctx, arguments: dict, pred: torch.Tensor) -> torch.Tensor:
        cond, uncond = ctx.branches.get("cond"), ctx.branches.get("uncond")
        if self.coeff == 0 or cond is None:
            return pred
        sigma = ctx.step.sigma
        if sigma is None:
            raise ControlError("LatentParticleGuidance scales its repulsion by the step's noise level, which this "
                               "pipeline's scheduler does not expose (no scheduler.sigmas / alphas_cumprod)")
        if self.sigma_min is not None and sigma < self.sigma_min:
            return pred
        x = arguments.get("sample", arguments.get("hidden_states"))  # [B, ...] the latents of this step
        groups = [g for g in ctx.prompt_groups("cond") if len(g) > 1]
        if not groups or all(len(g) < 3 for g in groups):
            self._warn()
            return pred
        out = pred.clone()
        twin = uncond is not None and uncond.stop - uncond.start == cond.stop - cond.start
        for rows in groups:
            index = torch.tensor(rows, device=pred.device)
            phi = particle_repulsion(x[index], sigma, self.coeff).to(pred.dtype)
            out[index] = pred[index] - phi
            if twin:  # the uncond twin of each cond row: CFG's weights sum to one, so ε̂_cfg − φ for any w
                out[index - cond.start + uncond.start] = pred[index - cond.start + uncond.start] - phi
        return out

    def _warn(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn("LatentParticleGuidance needs groups of 3 or more samples of one prompt "
                          "(num_images_per_prompt >= 3; the median bandwidth is infinite at 2): it does nothing here",
                          stacklevel=3)

    def __repr__(self):
        return f"LatentParticleGuidance(coeff={self.coeff:g}, sigma_min={self.sigma_min!r}, steps={self.steps!r})"
