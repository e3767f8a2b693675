"""Guidance in a limited interval: CFG only at middle noise levels (a diversity baseline).

Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models" (NeurIPS 2024), §3: guidance is applied only for
σ ∈ (σ_lo, σ_hi]; elsewhere the sampler takes the conditional prediction. High-noise guidance
is what collapses a prompt's samples onto few layouts, so leaving it out adds diversity.

As a control it edits the prediction the pipeline receives (stage 5 of ``diffattn.controls``):
outside the interval the uncond rows are replaced by their cond twins, so the pipeline's
ε_u + w(ε_c − ε_u) becomes ε_c exactly, whatever w. σ is the scheduler's own
(:attr:`~diffattn.controls.StepState.sigma`); the default (0.28, 5.42] is SDXL's interval in
EDM σ (ComfyUI ``GuidanceLimiter``'s defaults). Flow-matching schedulers (SD3, FLUX, Wan)
report σ_flow ∈ [0, 1] with σ_EDM = σ_flow / (1 − σ_flow): :func:`flow_sigma` converts an
EDM interval, e.g. (0.28, 5.42] is (0.219, 0.844].
"""
from __future__ import annotations

import math

import torch

from ..controls import Control, no_sites
from ..errors import ControlError


def flow_sigma(edm_sigma: float) -> float:
    """The flow-matching σ ∈ [0, 1] of an EDM noise level: σ / (1 + σ)."""
    return math.inf if edm_sigma == math.inf else edm_sigma / (1.0 + edm_sigma)


def in_interval(sigma: float, lo: float, hi: float) -> bool:
    """Whether guidance applies at ``sigma``: σ ∈ (lo, hi]."""
    return lo < sigma <= hi



class IntervalGuidance(Control):
    """CFG only for σ ∈ (lo, hi] (module docstring); ``interval=(lo, hi)`` in the scheduler's σ."""

    order = 0

    def __init__(self, interval: tuple[float, float] = (0.28, 5.42), *, order: int | None = None):
        try:
            lo, hi = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise ControlError(f"IntervalGuidance interval={interval!r}: a pair (lo, hi) of noise levels") from None
        if not (0 <= lo < hi):
            raise ControlError(f"IntervalGuidance interval={interval!r}: needs 0 <= lo < hi")
        super().__init__(sites=no_sites, order=order)
        self.lo, self.hi = lo, hi

    def edit_prediction(self, ctx, arguments: dict, pred: torch.Tensor) -> torch.Tensor:
        cond, uncond = ctx.branches.get("cond"), ctx.branches.get("uncond")
        if uncond is not None and cond is None:
            raise ControlError("IntervalGuidance edits CFG batched as [uncond, cond] in one forward; this pipeline "
                               "runs the negative prompt as its own forward (Wan, FLUX true_cfg_scale), "
                               "which it does not support yet")
        if uncond is None or cond is None:
            return pred  # no CFG rows in this forward: nothing to limit
        sigma = ctx.step.sigma
        if sigma is None:
            raise ControlError("IntervalGuidance needs the step's noise level, which this pipeline's scheduler does "
                               "not expose (no scheduler.sigmas / alphas_cumprod)")
        if in_interval(sigma, self.lo, self.hi):
            return pred
        if uncond.stop - uncond.start != cond.stop - cond.start:
            raise ControlError("IntervalGuidance needs as many uncond rows as cond rows in the batch")
        out = pred.clone()
        out[uncond] = pred[cond]  # ε_u := ε_c, so the pipeline's CFG returns ε_c
        return out

    def __repr__(self):
        return f"IntervalGuidance(interval=({self.lo:g}, {self.hi:g}))"
