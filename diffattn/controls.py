"""Controls: what a method does to attention, and the call object they edit.

A :class:`Control` says *where* it acts (``sites`` selector, ``heads``, ``steps`` window,
``branches``) and *what* it does through hooks that the engine calls on every attention call
of its sites. One denoiser forward, and each attention call inside it, flows through the
active controls in this defined order:

0. ``edit_inputs(ctx, arguments)`` once per forward, every active control that defines it, in
                            ascending ``order``: may replace the forward's arguments (CADS
                            noises the text conditioning); runs before the guidance wrapper
                            copies the cond rows into extra branches;
1. ``edit_qkv(call)``       every active control in ascending ``order`` (ties: attach order);
                            may replace ``call.q/k/v`` (same shapes, or more keys through
                            :meth:`AttentionCall.extend_keys`);
2. ``edit_spec(call)``      same order: fill the :class:`AttentionSpec` (head blend, bias,
                            uniform keys, LSE) and request :class:`Tap` s;
3. the kernel               ``diffattn.kernels.attention`` once (a second and third call only
                            for ``uniform_keys``), then the taps are computed from its row LSE
                            and handed to their callbacks / stores / ``on_taps(call, probs)``;
4. ``edit_output(call, out)`` in *descending* order (reverse): controls nest like
                            middleware, so the control that saw the inputs first sees the
                            output last (lowest ``order`` = outermost);
5. ``edit_prediction(ctx, arguments, pred)`` once per forward, descending, on the prediction
                            the pipeline receives (after the guidance fold): interval guidance
                            and particle guidance edit it.

A control that is not active for a call (wrong step, no batch rows of its branches) is
skipped entirely; when no control is active at a site, the stock attention runs (fast path).
Methods that need an extra forward branch name it in ``extra_branches`` and give its scale
through ``guidance_scale(step)``; the engine then installs the guidance wrapper
(``diffattn.guidance``). Methods that act between blocks return diffusers ``ModelHook`` s from
``block_hooks(model)``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import ControlError
from .layout import TokenLayout

if TYPE_CHECKING:
    from .kernels import BlockSparsePlan

# ----------------------------------------------------------------------------- steps


@dataclass
class StepState:
    """Where the denoising loop is.

    index:     denoising step, counted from 0 at the start of each pipeline call (distinct
               timesteps seen; cond/uncond/perturbed passes of one step share it).
    timestep:  the timestep the denoiser received (model units: UNet/SD3/Wan 0..1000,
               FLUX 0..1).
    sigma:     noise level of the step when the engine knows the scheduler
               (``scheduler.sigmas``; for DDPM-type schedulers sqrt((1 - ᾱ_t) / ᾱ_t)).
    num_steps: number of denoising steps of the run when known.
    """

    index: int = 0
    timestep: float | None = None
    sigma: float | None = None
    num_steps: int | None = None

    @property
    def fraction(self) -> float | None:
        """``index / num_steps`` (0 at the first step), ``None`` when the step count is unknown."""
        return self.index / self.num_steps if self.num_steps else None


@dataclass(frozen=True)
class StepWindow:
    """Steps a control acts on; every condition given must hold (``None`` = open).

    start, stop:        step indices ``[start, stop)``;
    indices:            an explicit set of step indices;
    start_frac, stop_frac: a fraction of the run ``[start_frac, stop_frac)`` (index / num_steps;
                        ignored while the step count is unknown);
    timestep_range:     inclusive ``(lo, hi)`` of the model timestep;
    sigma_range:        inclusive ``(lo, hi)`` of sigma (ignored while sigma is unknown).
    """

    start: int | None = None
    stop: int | None = None
    indices: frozenset[int] | None = None
    start_frac: float | None = None
    stop_frac: float | None = None
    timestep_range: tuple[float, float] | None = None
    sigma_range: tuple[float, float] | None = None

    def __post_init__(self):
        if self.indices is not None:
            object.__setattr__(self, "indices", frozenset(int(i) for i in self.indices))
        for lo, hi, what in ((self.start, self.stop, "start/stop"), (self.start_frac, self.stop_frac, "start_frac/stop_frac")):
            if lo is not None and hi is not None and hi < lo:
                raise ControlError(f"StepWindow {what} = {lo}/{hi} is empty: stop must not be below start")

    @classmethod
    def of(cls, value) -> "StepWindow | None":
        """Normalise a ``steps=`` argument: ``None``; a StepWindow; ``(start, stop)`` ints
        (step indices) or floats in [0, 1] (fractions); a set/list of step indices."""
        if value is None or isinstance(value, StepWindow):
            return value
        if isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, (int, float, type(None))) for x in value):
            a, b = value
            if any(isinstance(x, float) for x in value):
                return cls(start_frac=a, stop_frac=b)
            return cls(start=a, stop=b)
        if isinstance(value, (set, frozenset, list, range)):
            return cls(indices=frozenset(value))
        raise ControlError(
            f"steps={value!r}: use a StepWindow, (start, stop) step indices, (0.0, 0.5) fractions, or a set of steps"
        )

    def contains(self, step: StepState) -> bool:
        i = step.index
        if self.start is not None and i < self.start:
            return False
        if self.stop is not None and i >= self.stop:
            return False
        if self.indices is not None and i not in self.indices:
            return False
        frac = step.fraction
        if frac is not None:
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


# ----------------------------------------------------------------------------- spec and taps


@dataclass
class UniformKeys:
    """Uniform attention over a key subset, exact and without the L×L map (UAM, Mo et al. 2025).

    Each query row keeps the *share* of attention it gives the subset S,
    p_S = exp(lse_S - lse_all), but spreads it uniformly over S:

        O = (1 - p_S)·softmax(q K_rest^T)V_rest + p_S·mean(V_S)

    When S is every key this is ``mean(V)`` (UAM's uniform 1/N map). With a bias, "uniform"
    means uniform logits plus the bias (a boolean mask averages over the allowed keys only).

    keys:  a key segment name (``"text"``) or a LongTensor of key positions;
    rows:  ``[B]`` bool batch rows it applies to (``None``: all);
    heads: head indices or an ``[H]`` bool mask (``None``: all).
    """

    keys: str | torch.Tensor
    rows: torch.Tensor | None = None
    heads: Sequence[int] | torch.Tensor | None = None


@dataclass
class AttentionSpec:
    """What the kernel must do beyond softmax(QK^T)V for this call.

    head_blend:   ``[B, H]`` (or ``[H]``) u: out = (1-u)·softmax(QK^T)V + u·V (SoftPAG toward
                  identity, exact in output space; needs Nq == Nk).
    bias:         additive float bias or boolean mask (True = may attend) broadcastable to
                  ``[B, H, Nq, Nk]``; compose several with :meth:`add_bias`.
    uniform_keys: a :class:`UniformKeys` (or a key segment name).
    sparse:       a :class:`diffattn.kernels.BlockSparsePlan` (reserved for block-sparse
                  attention): only the selected key blocks of each query block are attended
                  to, exactly (the plan's token mask ANDed into ``bias``; taps see it too).
                  Validated against the call's shapes by the kernel.
    return_lse:   keep the row log-sum-exp in ``call.lse`` (set automatically for taps).

    The processor hands it to the kernel as one :class:`diffattn.kernels.KernelSpec`
    (:func:`diffattn.processors.base.kernel_spec`: segment names resolved to key positions).
    """

    head_blend: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    uniform_keys: UniformKeys | None = None
    return_lse: bool = False
    sparse: BlockSparsePlan | None = None
    # head_blend is a control's cached tensor (set with share_head_blend): copy before editing
    head_blend_shared: bool = False

    def share_head_blend(self, blend: torch.Tensor) -> None:
        """Use ``blend`` [B, H] as the head blend without copying it when nothing else set one
        (a control's per-layout cache: no kernel launch per call); otherwise take the
        elementwise maximum with the current one."""
        if self.head_blend is None:
            self.head_blend, self.head_blend_shared = blend, True
        else:
            current = self.head_blend
            if current.dim() == 1:
                current = current.expand_as(blend)
            self.head_blend, self.head_blend_shared = torch.maximum(current, blend.to(current.dtype)), False

    def add_bias(self, bias: torch.Tensor) -> None:
        """Combine ``bias`` with the current one: masks AND, float biases add, a mask and a
        float bias give a float bias with -inf where the mask forbids."""
        if self.bias is None:
            self.bias = bias
        elif self.bias.dtype == torch.bool and bias.dtype == torch.bool:
            self.bias = self.bias & bias
        else:
            dtype = self.bias.dtype if self.bias.dtype != torch.bool else bias.dtype
            self.bias = _additive(self.bias, dtype) + _additive(bias, dtype)


def _additive(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = may attend) -> 0 / -inf float bias; float bias unchanged."""
    if bias.dtype != torch.bool:
        return bias
    return torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(~bias, float("-inf"))


@dataclass(eq=False)
class Tap:
    """Exact attention probabilities of a query segment × a key segment (or some of its tokens).

    ``p = exp(q·k·scale + bias - lse)`` with the row log-sum-exp over *all* keys from the main
    kernel call, so the L×L map is never built. The result is ``[B', H', Nq_seg, Ns]`` fp32 for
    the batch rows of ``branches`` (default all) and the ``heads`` (default all), and is handed
    to ``callback(call, probs)``, appended to ``store`` (a list), and passed to the requesting
    control's ``on_taps(call, probs_list)``. Taps report the unedited map softmax(QK^T + bias)
    of the call's (possibly edited) q/k, before head blend or uniform keys.

    query:     query segment name, ``None`` = all queries;
    key:       key segment name, ``None`` = all keys;
    key_index: token positions *within* the key segment (e.g. the subject's text tokens);
    requires_grad: keep the graph (A-STAR's losses); otherwise probabilities are detached.
    """

    query: str | None
    key: str | None
    _: KW_ONLY
    key_index: torch.Tensor | Sequence[int] | None = None
    heads: Sequence[int] | None = None
    branches: tuple[str, ...] | None = None
    callback: Callable | None = None
    store: list | None = None
    requires_grad: bool = False
    owner: object = field(default=None, repr=False)  # the control that requested it (set by the engine)


# ----------------------------------------------------------------------------- the call


class AttentionCall:
    """One attention call at one site, as controls see it.

    site:     the :class:`~diffattn.sites.Site`;
    q, k, v:  ``[B, H, N, D]`` after q/k-norm and RoPE, exactly what the stock kernel gets;
    layout:   the :class:`~diffattn.layout.TokenLayout` (built on first access);
    step:     :class:`StepState`;
    branches: ``{branch name: slice of batch rows}`` (``uncond``, ``cond``, ``perturbed``...);
              the forward's row groups (:attr:`groups`) are selected by name the same way;
    scale:    softmax scale (``None`` = 1/sqrt(D), as stock);
    spec:     the mutable :class:`AttentionSpec`; taps: the requested :class:`Tap` s;
    lse:      ``[B, H, Nq]`` row log-sum-exp after the kernel, when requested;
    part:     ``"main"``, or ``"image"`` for the second softmax of Wan I2V cross attention;
    context:  the engine's per-forward context (``None`` outside an engine forward);
    rope:     the family's rotary embedding of this call's tokens when its attention applies one
              (FLUX: :class:`diffattn.families.flux.FluxRope`), with ``relocate(x, seg, source)``
              moving rotated tokens to new positions; ``None`` for families without RoPE.
    """

    __slots__ = ("site", "_layout", "_layout_fn", "q", "k", "v", "step", "branches", "scale", "spec", "taps",
                 "lse", "part", "context", "scratch", "_rows_cache", "rope")

    def __init__(self, site, layout, q, k, v, step: StepState | None = None, branches: dict | None = None, *,
                 scale: float | None = None, spec: AttentionSpec | None = None, part: str = "main", context=None,
                 rope=None):
        self.site = site
        self.rope = rope
        if isinstance(layout, TokenLayout) or layout is None:
            self._layout, self._layout_fn = layout, None
        else:
            self._layout, self._layout_fn = None, layout
        self.q, self.k, self.v = q, k, v
        self.step = step if step is not None else StepState()
        self.branches = branches if branches is not None else {"cond": slice(0, q.shape[0])}
        self.scale = scale
        self.spec = spec if spec is not None else AttentionSpec()
        self.taps: list[Tap] = []
        self.lse: torch.Tensor | None = None
        self.part = part
        self.context = context
        self.scratch: dict = {}  # values a control keeps between its hooks of this call, keyed by id(control)
        self._rows_cache: dict = {}

    # ------------------------------------------------------------------ layout
    @property
    def layout(self) -> TokenLayout:
        if self._layout is None and self._layout_fn is not None:
            self._layout = self._layout_fn()
        return self._layout

    @layout.setter
    def layout(self, value: TokenLayout) -> None:
        self._layout, self._layout_fn = value, None

    # ------------------------------------------------------------------ rows and heads
    @property
    def groups(self) -> dict[str, tuple[int, ...]]:
        """The forward's named row groups (``ForwardContext.groups``; ``{}`` without a context)."""
        return getattr(self.context, "groups", None) or {}

    def has_branch(self, names: Sequence[str] | None) -> bool:
        """Whether the batch holds rows of any of ``names`` (branches or row groups; ``None``:
        any rows at all)."""
        groups = self.groups
        return names is None or any(n in self.branches or n in groups for n in names)

    def any_rows(self, names: Sequence[str] | None) -> bool:
        """Whether :meth:`rows` would select any row, decided on the host from the branch
        slices (``rows(...).any()`` on a GPU mask would wait for the device)."""
        if names is None:
            return self.q.shape[0] > 0
        n, groups = self.q.shape[0], self.groups
        return (any(len(range(n)[self.branches[b]]) > 0 for b in names if b in self.branches)
                or any(len(groups[g]) > 0 for g in names if g in groups))

    def rows(self, names: Sequence[str] | None) -> torch.Tensor:
        """Boolean ``[B]`` mask of the batch rows of ``names``, branches or the forward's row
        groups (:attr:`groups`), their union (``None``: all rows)."""
        key = None if names is None else tuple(names)
        mask = self._rows_cache.get(key)
        if mask is None:
            mask = torch.zeros(self.q.shape[0], dtype=torch.bool, device=self.q.device)
            if names is None:
                mask[:] = True
            else:
                groups = self.groups
                for name in names:
                    if name in self.branches:
                        mask[self.branches[name]] = True
                    elif name in groups and groups[name]:
                        mask[list(groups[name])] = True
            self._rows_cache[key] = mask
        return mask

    def head_mask(self, heads: Sequence[int] | None) -> torch.Tensor:
        """Boolean ``[H]`` mask of ``heads`` (``None``: all heads)."""
        mask = torch.zeros(self.q.shape[1], dtype=torch.bool, device=self.q.device)
        if heads is None:
            mask[:] = True
        else:
            mask[list(heads)] = True
        return mask

    # ------------------------------------------------------------------ spec helpers
    def head_blend(self) -> torch.Tensor:
        """The spec's ``[B, H]`` head blend u (zeros, fp32, created on first use); edit it in place."""
        if self.spec.head_blend is None:
            self.spec.head_blend = torch.zeros(self.q.shape[:2], dtype=torch.float32, device=self.q.device)
        elif self.spec.head_blend.dim() == 1:
            self.spec.head_blend = self.spec.head_blend.expand(self.q.shape[0], -1).clone()
        elif self.spec.head_blend_shared:
            self.spec.head_blend = self.spec.head_blend.clone()
        self.spec.head_blend_shared = False
        return self.spec.head_blend

    def uniform(self, keys, rows: torch.Tensor | None = None, heads=None) -> None:
        """Request uniform attention over ``keys`` (see :class:`UniformKeys`)."""
        if self.spec.uniform_keys is not None:
            raise ControlError(
                f"two controls ask for uniform keys at {self.site.name}; one uniform_keys per call is supported"
            )
        self.spec.uniform_keys = UniformKeys(keys, rows, heads)

    def tap(self, query: str | None, key: str | None, **kw) -> Tap:
        """Request a :class:`Tap` (keywords as Tap) and return it."""
        t = Tap(query, key, **kw)
        self.taps.append(t)
        return t

    def extend_keys(self, name: str, k: torch.Tensor, v: torch.Tensor, shape: tuple[int, ...] | None = None,
                    bias_fill: float | bool | None = None) -> None:
        """Append keys/values ``[B, H, Ne, D]`` as a new key segment ``name`` (extended
        attention: IR-Diffusion, ConsiStory). An existing bias is widened with ``bias_fill``
        (default: may attend / 0)."""
        if k.shape[:2] != self.k.shape[:2] or k.shape[-1] != self.k.shape[-1] or v.shape[:3] != k.shape[:3]:
            raise ControlError(
                f"extend_keys needs k, v of shape [B, H, Ne, D] = [{self.k.shape[0]}, {self.k.shape[1]}, Ne, "
                f"{self.k.shape[-1]}]; got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        self.layout = self.layout.with_key_segment(name, k.shape[2], shape)
        self.k = torch.cat([self.k, k], dim=2)  # [B, H, Nk + Ne, D]
        self.v = torch.cat([self.v, v], dim=2)
        b = self.spec.bias
        if b is not None and b.shape[-1] != 1:
            fill = (True if b.dtype == torch.bool else 0.0) if bias_fill is None else bias_fill
            pad = torch.full(b.shape[:-1] + (k.shape[2],), fill, dtype=b.dtype, device=b.device)
            self.spec.bias = torch.cat([b, pad], dim=-1)


# ----------------------------------------------------------------------------- controls


def no_sites(site) -> bool:
    """The ``sites`` filter of a control that edits no attention call (block hooks, forward
    edits only): every processor keeps its stock fast path."""
    return False



class Control:
    """Base class of every method that edits attention (see the module docstring).

    sites:    selector of the sites it acts on (``diffattn.sites.select`` grammar, a callable
              ``Site -> bool``, default ``"all"``); resolved once at attach.
    heads:    heads it acts on: ``"all"``, ints, ``"0-3"``, or ``{site name: heads}``; read it
              per site with :meth:`heads_at` / :meth:`head_mask`.
    steps:    a :class:`StepWindow` (or ``(start, stop)``, fractions, a set of steps).
    branches: batch branches it acts on (``("cond",)``, ``("perturbed",)``...), or row groups
              a loop names (``handle.row_groups``: IR-Diffusion's ``"scene"``); ``None``: all.
    order:    composition order (see the module docstring); class default 0.

    Subclasses override the hooks they need; the defaults do nothing, so a subclass that sets
    nothing leaves the model's outputs unchanged. A control at zero strength must equal stock.
    Edits should stay inside :meth:`rows` (its branches) and :meth:`head_mask` (its heads).
    """

    order: int = 0
    extra_branches: tuple[str, ...] = ()
    sequential: bool = False  # guidance controls: run the extra branch as its own forward

    def __init__(self, sites="all", heads="all", steps=None, branches: Sequence[str] | str | None = None,
                 order: int | None = None):
        self.sites = sites
        self.heads = heads
        self.steps = StepWindow.of(steps)
        self.branches = (branches,) if isinstance(branches, str) else (tuple(branches) if branches is not None else None)
        if order is not None:
            self.order = order
        self._heads_cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ where it acts
    def is_active(self, call: AttentionCall) -> bool:
        """Whether the control acts on this call: its step window holds and the batch has rows
        of its branches (sites were resolved at attach). Override to add conditions."""
        if not self.in_window(call):
            return False
        return call.has_branch(self.branches)

    def in_window(self, call: AttentionCall) -> bool:
        """Whether ``call``'s step lies in the control's step window. Inside an engine forward
        this reads the flag the engine set on the host before the forward, so a compiled
        denoiser guards on one bool, not on the step index (no recompile per step)."""
        windows = getattr(call.context, "in_window", None)
        if windows is not None and id(self) in windows:
            return windows[id(self)]
        return self.window_holds(call.step)

    def window_holds(self, step: StepState) -> bool:
        """Whether ``step`` lies in the control's step window (always, without one)."""
        return self.steps is None or self.steps.contains(step)

    def rows(self, call: AttentionCall) -> torch.Tensor:
        """Boolean ``[B]`` mask of the call's batch rows of this control's branches (all rows
        when ``branches`` is None). A control acts on a call that *holds* such rows; it must
        restrict its edits to them."""
        return call.rows(self.branches)

    def heads_at(self, site) -> list[int]:
        """Head indices this control acts on at ``site`` (validated, cached)."""
        got = self._heads_cache.get(site.name)
        if got is None:
            from .sites import select_heads

            spec = self.heads
            if isinstance(spec, Mapping):
                spec = spec.get(site.name, [])
                got = select_heads(site, spec) if (spec == "all" or spec) else []
            else:
                got = select_heads(site, spec)
            self._heads_cache[site.name] = got
        return got

    def head_mask(self, call: AttentionCall) -> torch.Tensor:
        """Boolean ``[H]`` mask of :meth:`heads_at` for the call's site."""
        return call.head_mask(self.heads_at(call.site))

    # ------------------------------------------------------------------ hooks
    def on_attach(self, engine) -> None:
        """Called once by ``attach`` before sites are resolved (``engine.sites`` is available)."""

    def on_detach(self, engine) -> None:
        """Called once by ``Handle.detach``."""

    def edit_qkv(self, call: AttentionCall) -> None:
        """Edit ``call.q``, ``call.k``, ``call.v`` (replace the tensors; keep ``[B, H, N, D]``)."""

    def edit_spec(self, call: AttentionCall) -> None:
        """Fill ``call.spec`` (head blend, bias, uniform keys, return_lse) and request taps."""

    def on_taps(self, call: AttentionCall, probs: list[torch.Tensor]) -> None:
        """Receive the probabilities of the taps this control requested in this call, in order."""

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """Edit the attention output ``[B, H, Nq, D]`` (before the out projection); return it."""
        return out

    def edit_inputs(self, ctx, arguments: dict) -> dict:
        """Stage 0: the denoiser forward's arguments by name (``hidden_states`` / ``sample``,
        ``encoder_hidden_states``, ``timestep``...), returned edited or as they are. Never edit
        the tensors in place: the pipeline reuses them at the next step."""
        return arguments

    def edit_prediction(self, ctx, arguments: dict, pred: torch.Tensor) -> torch.Tensor:
        """Stage 5: the forward's prediction ``[B, ...]`` as the pipeline will receive it (the
        arguments are those the forward ran with); return it, edited or not."""
        return pred

    @property
    def edits_forward(self) -> bool:
        """Whether this control defines a stage-0 or stage-5 edit (the engine calls only those)."""
        cls = type(self)
        return cls.edit_inputs is not Control.edit_inputs or cls.edit_prediction is not Control.edit_prediction

    def block_hooks(self, model) -> list:
        """``(module name, diffusers ModelHook)`` pairs to register on ``model`` (between-block
        methods); the engine removes them on detach. A hook reads the current forward's step,
        branches and prompt groups through :attr:`context`."""
        return []

    @property
    def context(self):
        """The :class:`~diffattn.engine.ForwardContext` of the denoiser forward running now on
        the model this control is attached to (``None`` when detached or between forwards).
        Block hooks read it; inside attention use ``call.context``."""
        engine = getattr(self, "_diffattn_engine", None)
        return engine.context if engine is not None else None

    @property
    def engine(self):
        """The engine of the attach this control belongs to (``None`` when detached)."""
        return getattr(self, "_diffattn_engine", None)

    def guidance_scale(self, step: StepState) -> float:
        """Scale s of this control's extra branch at ``step``: the pipeline's prediction gains
        s·(ε_cond - ε_extra) (see ``diffattn.guidance``). 0 turns the extra branch off."""
        return 0.0

    def __repr__(self):
        def show(value):  # a callable selector by name: a bound method of self would recurse into this repr
            if callable(value) and not isinstance(value, type):
                if getattr(value, "__self__", None) is self:
                    return f"<self.{getattr(value, '__name__', '?')}>"
                name = getattr(value, "__qualname__", None) or type(value).__name__
                return name if name.startswith("<") else f"<{name}>"
            return repr(value)

        return (f"{type(self).__name__}(sites={show(self.sites)}, heads={show(self.heads)}, steps={self.steps!r}, "
                f"branches={self.branches!r})")
