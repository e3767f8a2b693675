"""Controls: what a method does to attention, and the call object they edit.

One attention call flows through the active controls of its site in a defined order:

1. ``edit_qkv(call)``      every control, in ascending ``order`` (ties: attach order);
2. ``edit_spec(call)``     every control, same order (head blend, bias, uniform keys, taps);
3. the attention kernel runs once (``diffattn.kernels.attention``), plus the taps;
4. ``edit_output(call, out)``  every control, same order.

A control declares where it acts: ``sites`` (a selector, see ``diffattn.sites.select``),
``heads``, ``steps`` (a ``StepWindow``) and ``branches`` (batch branches: "uncond",
"cond", "perturbed"...). Methods that need an extra forward branch name it in
``extra_branches`` and say how to fold it back in ``guidance_scale``; the engine then
installs the guidance wrapper (``diffattn.guidance``). Methods that act between blocks
return diffusers ``ModelHook``s from ``block_hooks``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import ControlError
from .layout import TokenLayout


@dataclass
class StepState:
    """Where the denoising loop is: step index, model timestep, sigma and step count (when
    the engine knows the pipeline's scheduler)."""

    index: int = 0
    timestep: float | None = None
    sigma: float | None = None
    num_steps: int | None = None


@dataclass(frozen=True)
class StepWindow:
    """Steps a control acts on. Any combination of: step indices [start, stop), a fraction
    of the steps [start_frac, stop_frac), a timestep range and a sigma range (inclusive).
    ``None`` bounds are open."""

    start: int | None = None
    stop: int | None = None
    start_frac: float | None = None
    stop_frac: float | None = None
    timestep_range: tuple[float, float] | None = None
    sigma_range: tuple[float, float] | None = None

    def contains(self, step: StepState) -> bool:
        i = step.index
        if self.start is not None and i < self.start:
            return False
        if self.stop is not None and i >= self.stop:
            return False
        if (self.start_frac is not None or self.stop_frac is not None) and step.num_steps:
            frac = i / step.num_steps
            if self.start_frac is not None and frac < self.start_frac:
                return False
            if self.stop_frac is not None and frac >= self.stop_frac:
                return False
        if self.timestep_range is not None and step.timestep is not None:
            lo, hi = sorted(self.timestep_range)
            if not lo <= step.timestep <= hi:
                return False
        if self.sigma_range is not None and step.sigma is not None:
            lo, hi = sorted(self.sigma_range)
            if not lo <= step.sigma <= hi:
                return False
        return True


@dataclass
class AttentionSpec:
    """What the kernel must do beyond softmax(QK^T)V for this call.

    head_blend:  [B, H] u per (row, head): (1-u)·O + u·V (identity target, SoftPAG).
    bias:        additive float bias or boolean mask (True = may attend) -> [B, H, Nq, Nk].
    uniform_keys: name of a key segment whose share of each row's attention is spread
                 uniformly over its keys (UAM); ``uniform_rows`` ([B] bool) limits the rows.
    return_lse:  keep the row log-sum-exp (set automatically when taps are requested).
    """

    head_blend: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    uniform_keys: str | None = None
    uniform_rows: torch.Tensor | None = None
    return_lse: bool = False


@dataclass
class Tap:
    """Exact attention probabilities of a query segment × key segment (optionally a subset of
    its tokens), computed from the main call's row LSE, never the L×L map.

    ``callback(call, probs)`` receives probs [B', H', Nq_seg, Ns] (fp32) for the rows of
    ``branches`` (default all) and ``heads`` (default all), differentiable when q/k are.
    """

    query: str
    key: str
    callback: Callable
    key_index: torch.Tensor | None = None
    heads: list[int] | None = None
    branches: tuple[str, ...] | None = None


@dataclass
class AttentionCall:
    """One attention call at one site, as controls see it (q, k, v after qk-norm and RoPE)."""

    site: object  # diffattn.sites.Site
    layout: TokenLayout
    q: torch.Tensor  # [B, H, Nq, D]
    k: torch.Tensor  # [B, H, Nk, D]
    v: torch.Tensor  # [B, H, Nk, D]
    step: StepState
    branches: dict[str, slice]  # branch name -> batch rows
    scale: float | None = None
    spec: AttentionSpec = field(default_factory=AttentionSpec)
    taps: list[Tap] = field(default_factory=list)
    lse: torch.Tensor | None = None  # [B, H, Nq] after the kernel, when requested

    def rows(self, names: tuple[str, ...] | None) -> torch.Tensor:
        """Boolean [B] mask of the batch rows of the given branches (all rows for None)."""
        mask = torch.zeros(self.q.shape[0], dtype=torch.bool, device=self.q.device)
        if names is None:
            mask[:] = True
            return mask
        for name in names:
            if name in self.branches:
                mask[self.branches[name]] = True
        return mask

    def head_blend(self) -> torch.Tensor:
        """The spec's [B, H] head blend, created (zeros) on first use."""
        if self.spec.head_blend is None:
            self.spec.head_blend = torch.zeros(self.q.shape[:2], dtype=torch.float32, device=self.q.device)
        return self.spec.head_blend


class Control:
    """Base class of every method that edits attention (see the module docstring).

    Subclasses override the hooks they need; defaults do nothing, so a subclass that sets
    nothing leaves the model's outputs unchanged.
    """

    order: int = 0
    extra_branches: tuple[str, ...] = ()

    def __init__(self, sites="all", heads="all", steps: StepWindow | None = None, branches: tuple[str, ...] | None = None):
        self.sites = sites
        self.heads = heads
        self.steps = steps
        self.branches = branches
        self._attached = False

    # -- where it acts ----------------------------------------------------------
    def is_active(self, call: AttentionCall) -> bool:
        return self.steps is None or self.steps.contains(call.step)

    # -- hooks ------------------------------------------------------------------
    def on_attach(self, engine) -> None:
        if self._attached:
            raise ControlError(
                f"{type(self).__name__} is already attached; detach it first, or create a second instance"
            )
        self._attached = True

    def on_detach(self, engine) -> None:
        self._attached = False

    def edit_qkv(self, call: AttentionCall) -> None:
        pass

    def edit_spec(self, call: AttentionCall) -> None:
        pass

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        return out

    def block_hooks(self, model) -> list:
        """(module name, diffusers ModelHook) pairs to register on ``model``."""
        return []

    def guidance_scale(self, step: StepState) -> float:
        """Scale s of the extra branch: pred = cond + s·(cond - extra) (see diffattn.guidance)."""
        return 0.0
