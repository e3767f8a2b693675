"""Guidance without rewriting pipelines: extra branches folded into what the pipeline sees.

A control that needs a perturbed copy of the conditional branch (PAG, SoftPAG, SEG...)
declares ``extra_branches = ("perturbed",)`` and a scale ``guidance_scale(step)``. The engine
then wraps the denoiser's forward: a call holding the ``cond`` rows gets one copy of them per
extra branch appended, runs as ONE batch (or one forward per branch with ``sequential=True``),
and the extra predictions are folded back into what the pipeline receives, with
Δ = Σ_b s_b·(ε_cond - ε_b) (Ahn et al. 2024, PAG Eq. 11):

* pipeline batches [uncond, cond] (SD, SDXL, SD3 with CFG, w ≠ 1): return
  ``[uncond - Δ/(w-1), cond]``; the pipeline's ε_u' + w(ε_c - ε_u') is then
  ε_u + w(ε_c - ε_u) + Δ (:func:`fold_into_uncond`). The conditional prediction reaches the
  pipeline untouched, so what it computes from ε_c alone is exact too: ``guidance_rescale``'s
  std(ε_c) (Lin et al. 2024, Eq. 15-16, as diffusers' PAG pipelines take it) and SD3
  skip-layer guidance's (ε_c - ε_skip). With w = 1 the fold goes into cond
  (``cond + Δ``; :func:`fold_guidance` is the same sum written per branch);
* no CFG (w = 1, guidance-distilled FLUX, a bare denoiser):   return ``cond + Δ``;
* CFG as separate forwards, cond first (Wan, FLUX ``true_cfg_scale``): the cond forward
  returns ``cond + Δ`` and the uncond forward of the same step returns ``uncond + Δ``; CFG's
  weights sum to one, (1-w)(ε_u + Δ) + w(ε_c + Δ) = ε_u + w(ε_c - ε_u) + Δ, so this is exact
  for any w, which these pipelines keep in a local variable (FLUX ``true_cfg_scale``) or switch
  per expert (Wan 2.2 ``guidance_scale_2``) (:func:`shift_guidance`).

w is read from the pipeline at call time (``pipe.guidance_scale``) unless ``attach(...,
cfg_scale=w)`` overrides it. Batch-aligned inputs (every tensor argument whose first dimension
is the batch, inside dicts, lists and tuples too: hidden states, text states, pooled
projections, timesteps, SDXL ``added_cond_kwargs``, FLUX ``guidance`` and masks) are copied;
FLUX's ``img_ids``/``txt_ids`` are shared by every row and are not.
"""
from __future__ import annotations

import dataclasses

import torch

from .errors import ControlError

# Arguments never batched, whatever the family (a family adds its own: Family.not_batched).
NOT_BATCHED = frozenset({"return_dict"})


def guidance_delta(cond: torch.Tensor, extras: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
    """Δ = Σ_b s_b·(cond - extra_b): what perturbation guidance adds to the final prediction."""
    delta = torch.zeros_like(cond)
    for extra, s in zip(extras, scales):
        if s != 0.0:
            delta = delta + s * (cond - extra)
    return delta


def fold_guidance(cond: torch.Tensor, extras: list[torch.Tensor], scales: list[float], cfg_scale: float = 1.0) -> torch.Tensor:
    """``cond + (1/w)·Σ s_b·(cond - extra_b)``: the cond prediction to hand back when the
    pipeline then applies CFG with scale w in one batch.

    The pipeline's ε_u + w(ε_c' - ε_u) becomes ε_u + w(ε_c - ε_u) + Σ s_b(ε_c - ε_b); with
    w = 1 (no CFG) this is ε_c + Σ s_b(ε_c - ε_b).
    """
    if cfg_scale == 0:
        raise ControlError("CFG scale w = 0 leaves no cond prediction to fold guidance into; use w != 0")
    out = cond
    for extra, s in zip(extras, scales):
        if s != 0.0:
            out = out + (s / cfg_scale) * (cond - extra)
    return out


def fold_into_uncond(uncond: torch.Tensor, delta: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """``ε_u - Δ/(w - 1)``: the uncond prediction to hand back, with ε_c untouched, when the
    pipeline applies CFG with scale w ≠ 1 in one batch:
    ε_u' + w(ε_c - ε_u') = ε_u + w(ε_c - ε_u) - (1 - w)·Δ/(w - 1) = ε_u + w(ε_c - ε_u) + Δ."""
    if cfg_scale == 1.0:
        raise ControlError("CFG scale w = 1 leaves the uncond prediction without weight; fold into cond instead")
    return uncond - delta / (cfg_scale - 1.0)


def shift_guidance(pred: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``pred + Δ`` for every branch a CFG combination mixes: since u + w(c - u) has weights
    (1 - w) + w = 1, shifting both u and c by Δ shifts the result by exactly Δ, for any w."""
    return pred + delta


# ----------------------------------------------------------------------------- batching


def expand_batch(value, batch: int, rows: slice, copies: int):
    """Append ``copies`` copies of ``value[rows]`` along dim 0 to batch-aligned tensors
    (recursing into dicts, lists and tuples); other values pass through."""
    if torch.is_tensor(value):
        if value.dim() > 0 and value.shape[0] == batch and copies:
            return torch.cat([value] + [value[rows]] * copies, dim=0)  # [batch + copies*n, ...]
        return value
    if isinstance(value, dict):
        return {k: expand_batch(v, batch, rows, copies) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(expand_batch(v, batch, rows, copies) for v in value)
    return value


def take_batch(value, batch: int, rows: slice):
    """``value[rows]`` for batch-aligned tensors (recursing like :func:`expand_batch`)."""
    if torch.is_tensor(value):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: take_batch(v, batch, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(take_batch(v, batch, rows) for v in value)
    return value


def _sample(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _with_sample(out, sample: torch.Tensor):
    if isinstance(out, tuple):
        return (sample,) + tuple(out[1:])
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, sample=sample)
    return type(out)(sample=sample)


class GuidanceWrapper:
    """Runs the extra branches of the guidance controls and folds them back (module docstring).

    controls:   the controls with ``extra_branches`` (each names one branch);
    cfg_scale:  None (read ``pipe.guidance_scale``), a float, or ``StepState -> float``;
    sequential: run each extra branch as its own forward on the cond rows (less memory).
    """

    def __init__(self, controls, engine, *, cfg_scale=None, sequential: bool = False):
        self.controls = list(controls)
        self.engine = engine
        self.cfg_scale = cfg_scale
        self.sequential = bool(sequential)
        self._pending = None  # (denoiser, step index, Δ) from a cond-only forward, for its uncond twin

    def scales(self, step) -> list[float]:
        return [float(c.guidance_scale(step)) for c in self.controls]

    def w(self, ctx) -> float:
        """The CFG scale the pipeline applies to a batched [uncond, cond] forward."""
        if self.cfg_scale is not None:
            return float(self.cfg_scale(ctx.step) if callable(self.cfg_scale) else self.cfg_scale)
        if self.engine.pipeline is None:
            raise ControlError(
                "this forward batches [uncond, cond] but diffattn was attached to a bare denoiser and cannot read the CFG "
                "scale: pass attach(..., cfg_scale=w)"
            )
        return self.engine.pipeline_cfg_scale(ctx.denoiser)

    def __call__(self, forward, not_batched: frozenset, arguments: dict, ctx):
        scales = ctx.guidance_scales if ctx.guidance_scales is not None else self.scales(ctx.step)
        active = [(c, s) for c, s in zip(self.controls, scales) if s != 0.0]
        cond = ctx.branches.get("cond")
        if not active or cond is None:
            out = forward(**arguments)
            return self._apply_pending(out, ctx)
        skip = NOT_BATCHED | not_batched
        hidden_key = "sample" if "sample" in arguments else "hidden_states"
        batch = arguments[hidden_key].shape[0]
        n = cond.stop - cond.start
        names = [c.extra_branches[0] for c, _ in active]
        saved, saved_groups = ctx.branches, getattr(ctx, "groups", {})
        try:
            if self.sequential:
                out = forward(**arguments)
                base = _sample(out)
                sub = {k: (v if k in skip else take_batch(v, batch, cond)) for k, v in arguments.items()}
                extras = []
                ctx.groups = {}  # a forward of copies of the cond rows: the loop's row groups name other rows
                for name in names:
                    ctx.branches = {name: slice(0, n)}
                    extras.append(_sample(forward(**sub)))
            else:
                big = {k: (v if k in skip else expand_batch(v, batch, cond, len(names))) for k, v in arguments.items()}
                ctx.branches = dict(saved)
                for i, name in enumerate(names):
                    ctx.branches[name] = slice(batch + i * n, batch + (i + 1) * n)
                out = forward(**big)
                full = _sample(out)
                base = full[:batch]
                extras = [full[batch + i * n: batch + (i + 1) * n] for i in range(len(names))]
        finally:
            ctx.branches = saved
            if hasattr(ctx, "groups"):
                ctx.groups = saved_groups
        s = [s for _, s in active]
        c_pred = base[cond]
        uncond = saved.get("uncond")
        delta = guidance_delta(c_pred, extras, s)
        w = self.w(ctx) if uncond is not None else 1.0
        if uncond is not None and w != 1.0:  # [uncond, cond] in this batch: Δ rides on uncond
            pred = base.clone()
            pred[uncond] = fold_into_uncond(base[uncond], delta, w)
            return _with_sample(out, pred)
        folded = shift_guidance(c_pred, delta)  # no CFG rows, or w = 1: ε_u + (ε_c + Δ - ε_u) = ε_c + Δ
        if uncond is None and ctx.cache_name == "cond":  # its uncond twin may follow: shift it by the same Δ
            self._pending = (ctx.denoiser, ctx.step.index, delta)
        pred = torch.cat([base[: cond.start], folded, base[cond.stop:]], dim=0)
        return _with_sample(out, pred)

    def _apply_pending(self, out, ctx):
        """An uncond-only forward after a guided cond-only forward of the same step: + Δ."""
        pending, self._pending = self._pending, None
        if pending is None or ctx.cache_name != "uncond" or "uncond" not in ctx.branches:
            return out
        denoiser, index, delta = pending
        if denoiser != ctx.denoiser or index != ctx.step.index:
            return out
        pred = _sample(out)
        rows = ctx.branches["uncond"]
        if delta.shape[0] != rows.stop - rows.start:
            return out
        pred = torch.cat([pred[: rows.start], shift_guidance(pred[rows], delta), pred[rows.stop:]], dim=0)
        return _with_sample(out, pred)
