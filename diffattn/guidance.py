"""Guidance without rewriting pipelines: extra branches folded into what the pipeline sees.

When a control needs a perturbed copy of the conditional branch (PAG, SoftPAG, ...), the
denoiser's forward is wrapped: a call carrying [uncond, cond] (or cond alone, as Wan and
FLUX call it) gets a copy of the cond rows appended per extra branch, runs as ONE batch
(or one forward per branch with ``sequential``), and returns

    cond' = cond + (1/w)·Σ_b s_b·(cond - extra_b)

in place of cond, so the pipeline's own CFG yields ε_u + w(ε_c - ε_u) + Σ s_b(ε_c - ε_b)
(Ahn et al. 2024, PAG Eq. 11, in diffusers' convention). Without CFG (w = 1, or a
guidance-distilled model) this is ε_c + Σ s_b(ε_c - ε_b). Works with any diffusers
pipeline that calls its denoiser with keyword or positional tensors.
"""
from __future__ import annotations

import torch

NOT_BATCHED = {"img_ids", "txt_ids", "return_dict"}


def fold_guidance(cond: torch.Tensor, extras: list[torch.Tensor], scales: list[float], cfg_scale: float = 1.0) -> torch.Tensor:
    """cond + (1/w)·Σ s_b·(cond - extra_b): the prediction to hand back for the cond rows.

    With the pipeline then applying CFG with scale w, the final prediction is
    ε_u + w(ε_c - ε_u) + Σ s_b(ε_c - ε_b); with w = 1 it is ε_c + Σ s_b(ε_c - ε_b).
    """
    out = cond
    for extra, s in zip(extras, scales):
        if s != 0.0:
            out = out + (s / cfg_scale) * (cond - extra)
    return out


def _expand(value, batch: int, rows: slice, copies: int):
    """Append ``copies`` copies of ``value[rows]`` along dim 0 for batch-aligned tensors
    (recursing into dicts); other values pass through."""
    if torch.is_tensor(value):
        if value.dim() > 0 and value.shape[0] == batch:
            return torch.cat([value] + [value[rows]] * copies, dim=0)
        return value
    if isinstance(value, dict):
        return {k: _expand(v, batch, rows, copies) for k, v in value.items()}
    return value


def _take(value, batch: int, rows: slice):
    if torch.is_tensor(value):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _take(v, batch, rows) for k, v in value.items()}
    return value


def _sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _with_sample(out, sample):
    if isinstance(out, tuple):
        return (sample,) + tuple(out[1:])
    return type(out)(sample=sample)


class GuidanceWrapper:
    """Adds each guidance control's extra branch (a copy of cond) and folds it back."""

    def __init__(self, controls, engine):
        self.controls = list(controls)
        self.engine = engine
        self.sequential = any(getattr(c, "sequential", False) for c in controls)

    def scales(self, step) -> list[float]:
        return [float(c.guidance_scale(step)) for c in self.controls]

    def wants(self, ctx) -> bool:
        return ctx is not None and "cond" in ctx.branches and any(s != 0.0 for s in self.scales(ctx.step))

    def forward(self, original_forward, family: str, arguments: dict, engine):
        ctx = engine.context
        hidden_key = "sample" if "sample" in arguments else "hidden_states"
        batch = arguments[hidden_key].shape[0]
        cond = ctx.branches["cond"]
        n_cond = cond.stop - cond.start
        names = [c.extra_branches[0] for c in self.controls]
        scales = self.scales(ctx.step)
        kept = {k: v for k, v in arguments.items() if k in NOT_BATCHED}
        if self.sequential:
            base = _sample(out_base := original_forward(**arguments))
            extras = []
            for name in names:
                engine.context.branches = {name: slice(0, n_cond)}
                args = {k: (v if k in NOT_BATCHED else _take(v, batch, cond)) for k, v in arguments.items()}
                extras.append(_sample(original_forward(**args)))
            engine.context.branches = ctx.branches
            out = out_base
        else:
            args = {k: _expand(v, batch, cond, len(names)) for k, v in arguments.items() if k not in NOT_BATCHED}
            args.update(kept)
            branches = dict(ctx.branches)
            for i, name in enumerate(names):
                branches[name] = slice(batch + i * n_cond, batch + (i + 1) * n_cond)
            ctx.branches = branches
            out = original_forward(**args)
            full = _sample(out)
            base = full[:batch]
            extras = [full[batch + i * n_cond : batch + (i + 1) * n_cond] for i in range(len(names))]
        cfg = engine.cfg_scale()
        folded = fold_guidance(base[cond], extras, scales, cfg)
        base = torch.cat([base[: cond.start], folded, base[cond.stop :]], dim=0)
        return _with_sample(out, base)
