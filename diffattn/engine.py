"""The engine: install diffattn processors and hooks, track steps and branches, restore.

    handle = da.attach(pipe, control_a, control_b)   # a pipeline or a bare denoiser
    ...
    handle.detach()                                  # original processors and forwards back
    with da.attach(pipe, control): ...               # or as a context manager

``attach`` installs one processor instance per attention site (a full copy of the model's
``attn_processors`` with ours swapped in, through ``set_attn_processor``) and registers a
diffusers ``ModelHook`` on each denoiser (``unet`` / ``transformer`` / ``transformer_2``).
Before every denoiser forward the hook records what the processors need in a
:class:`ForwardContext`: the step (index, timestep, sigma, step count), the batch branch
layout, and the family's own record (``diffattn.families``: latent grid, text length, FLUX
Kontext's context-image split, Wan's video grid). When a
control declares an extra branch, the same hook runs the guidance wrapper
(``diffattn.guidance``) around the forward.

Step index: the number of distinct timesteps seen since the current run began, so the
cond, uncond and perturbed passes of one step share it. A run begins on the first forward
after attach (or ``handle.reset_steps()``), when the pipeline's scheduler has not stepped
yet (``scheduler.step_index is None``, true at the first step of every call of a pipeline
with a k-diffusion/flow-matching scheduler), or, for schedulers without a step index (DDIM,
PNDM), when the timestep rises (timesteps fall within a run). A pipeline passing
``cache_context(..., step_index=i)`` (Wan) sets it directly; the run state's ``step``
(``attach(..., run=RunState)``, or ``handle.set_step(i)``) pins it (custom loops such as
inversion, whose timesteps rise); its ``num_steps`` is the run's length when set.

Branches, decided per denoiser call from what the pipeline passes, in this order:
``handle.branches({...})`` when the caller names the rows (custom loops); the family's
auxiliary forward, recognised from its arguments (SD3's skip-layer guidance forward,
``skip_layers=[...]``: ``{"skip": all rows}``); the name of the pipeline's
``cache_context("cond" | "uncond")`` when it runs CFG as separate forwards (Wan, FLUX true
CFG); for a pipeline, a second unnamed call of one denoiser before its scheduler stepped
(``step_index``, PNDM's ``counter``: schedulers without such a counter are never flagged) is
``{"unidentified": all rows}`` with a one-time warning naming the pipeline (it gets no extra
guidance branch: the engine will not guess); the step's first call is
``{"uncond": first half, "cond": second half}`` when the pipeline's own CFG flag
(``pipe.do_classifier_free_guidance``) is on and the batch is even (SD, SDXL, SD3), else
``{"cond": all rows}``. The guidance wrapper adds its extra branches to calls with ``cond``
rows only. On top of the branches, a loop may name overlapping row sets
(``handle.row_groups``: IR-Diffusion's ``ref0`` … and ``scene``, one row of each CFG branch
each); controls select them by name as they select branches.

Gradient checkpointing: a block that diffusers recomputes in the backward runs after the
denoiser forward has returned, when ``engine.context`` is gone; :func:`gradient_checkpointing`
(or ``handle.gradient_checkpointing()``) installs a checkpoint function that replays the
forward's :class:`ForwardContext` around the recomputation, so controls recompute exactly what
they computed (loops that differentiate through the denoiser: DeContext's protector).
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .controls import Control, StepState
from .errors import ControlError, UnsupportedModelError
from .families import RunState, families, get_family
from .guidance import _sample, _with_sample
from .processors import DiffattnProcessor
from .sites import denoisers, select, sites

HOOK_NAME = "diffattn.engine"
UNIDENTIFIED = "unidentified"  # the branch of a call the engine cannot place (module docstring)


@dataclass
class ForwardContext:
    """What the processors and controls of one denoiser forward may know (module docstring).

    Controls read it as ``call.context`` inside attention and as ``self.context`` (or
    ``handle.context``) in block hooks; it lives for one forward and belongs to one attach.

    step:      the :class:`StepState`; branches: ``{name: rows}`` of the batch;
    family:    the denoiser's family name; denoiser: its pipeline attribute (``"unet"``,
               ``"transformer"``, ``"transformer_2"``) or ``None`` for a bare model;
    batch:     rows of this forward; cache_name: the pipeline's ``cache_context`` name;
    info:      the family's own per-forward record (``diffattn.families.<family>``: latent
               grid, text length, FLUX Kontext's context split, Wan's video grid);
    text:      the forward's ``encoder_hidden_states`` (what :meth:`prompt_groups` compares);
    slots:     a generic slot: controls may keep values for the rest of this forward here,
               keyed by themselves or a name of their own (never on the control).
    cond_text: in a separate ``uncond`` forward (FLUX true CFG, Wan: CFG as two calls), the
               ``text`` of this step's ``cond`` forward of the same rows, so that
               :meth:`prompt_groups` still tells the prompts apart (their negatives are one).
    groups:    named row sets a loop gives on top of the branches (``handle.row_groups``), which
               may overlap them and each other: IR-Diffusion's ``ref0`` … and ``scene`` each
               take one row of every CFG branch. A control's ``branches`` may name them.
    """

    step: StepState
    branches: dict[str, slice]
    family: str = ""
    denoiser: str | None = None  # pipeline attribute of the model ("unet", "transformer", "transformer_2")
    batch: int = 0
    cache_name: str | None = None  # the pipeline's cache_context name, when it set one
    info: object = None  # the family's per-forward record
    text: torch.Tensor | None = field(default=None, repr=False)
    guidance_scales: list[float] | None = None  # s of each guidance control at this step (read on the host)
    in_window: dict[int, bool] = field(default_factory=dict)  # id(control) -> its step window holds
    slots: dict = field(default_factory=dict)
    cond_text: torch.Tensor | None = field(default=None, repr=False)
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def row_sets(self, names) -> list:
        """The rows of each of ``names`` present in this forward, as batch indexers: a branch's
        slice, a row group's index list (``None``: every branch). For controls that edit the
        forward's inputs or outputs by rows (CADS)."""
        names = tuple(self.branches) if names is None else names
        return [self.branches[n] if n in self.branches else list(self.groups[n])
                for n in names if n in self.branches or (n in self.groups and self.groups[n])]

    def image_grid(self, n_tokens: int) -> tuple[int, int] | None:
        """``(h, w)`` of an ``n_tokens`` image at this forward's latent aspect (UNet levels, SD3
        patches), ``None`` where the family records no latent grid."""
        fn = getattr(self.info, "image_grid", None)
        return fn(n_tokens) if callable(fn) else None

    def prompt_groups(self, branch: str = "cond") -> list[list[int]]:
        """Rows of ``branch`` (batch indices) grouped by identical text conditioning, in order
        of first appearance: ``num_images_per_prompt = 4`` of two prompts gives two groups of
        four. Without text every row of the branch is one group. A separate ``uncond``
        forward (``cond_text`` set) groups its rows as their ``cond`` twins of the step (same
        row index), split further where its own conditioning differs: the rows of two prompts
        never share a group because their negative prompts are the same."""
        rows = self.branches.get(branch)
        if rows is None:
            return []
        idx = list(range(rows.start, rows.stop))
        keys = [t[rows].flatten(1) for t in (self.text, self.cond_text)  # each [b, N·C]
                if t is not None and t.shape[0] == self.batch]
        if not keys:
            return [idx] if idx else []
        groups: list[list[int]] = []
        heads: list[int] = []  # first row of each group
        for j, row in enumerate(idx):
            for g, h in zip(groups, heads):
                if all(torch.equal(k[j], k[h - rows.start]) for k in keys):
                    g.append(row)
                    break
            else:
                groups.append([row])
                heads.append(row)
        return groups


class _NoState(BaseState):
    def reset(self, *args, **kwargs):
        pass


_MISSING = object()


class _EngineHook(ModelHook):
    """Per-denoiser hook: bookkeeping before the forward, guidance around it."""

    _is_stateful = True  # so diffusers' cache_context("cond"/"uncond") reaches our StateManager

    def __init__(self, engine: "Engine", family, denoiser: str | None, model):
        super().__init__()
        self.engine = engine
        self.family = family  # the diffattn.families.Family of the model
        self.denoiser = denoiser
        self.config = model.config
        self.cache = StateManager(_NoState)  # receives the pipeline's CacheContext
        self.signature = inspect.signature(model.forward)
        self.family_cache: dict = {}  # the family's per-attach cache (e.g. FLUX's img_ids analysis)
        self.var_kw = next((p.name for p in self.signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def arguments(self, args, kwargs) -> dict:
        """The forward's arguments by name (``**kwargs`` flattened)."""
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        if self.var_kw is not None and self.var_kw in bound:
            bound = dict(bound)
            bound.update(bound.pop(self.var_kw))
        return bound

    @torch.compiler.disable
    def enter(self, args, kwargs) -> tuple[dict, ForwardContext]:
        """Host-side bookkeeping of one forward (the step reads the timestep's value), kept
        out of ``torch.compile`` graphs: the compiled forward sees the context as Python state."""
        arguments = self.arguments(args, kwargs)
        return arguments, self.engine.begin_forward(self, arguments, self.cache._context)

    def new_forward(self, module, *args, **kwargs):
        engine = self.engine
        arguments, ctx = self.enter(args, kwargs)
        previous, engine.context = engine.context, ctx
        try:
            wrapping = [c for c in engine.forward_controls if ctx.in_window.get(id(c), True)]
            if not wrapping:  # the common case: the forward as the pipeline called it
                if engine.guidance is not None:
                    return engine.guidance(self.fn_ref.original_forward, self.family.not_batched, arguments, ctx)
                return self.fn_ref.original_forward(*args, **kwargs)
            for c in wrapping:  # ascending order: the first control edits the inputs first
                arguments = c.edit_inputs(ctx, arguments)
            if engine.guidance is not None:
                out = engine.guidance(self.fn_ref.original_forward, self.family.not_batched, arguments, ctx)
            else:
                out = self.fn_ref.original_forward(**arguments)
            for c in reversed(wrapping):  # descending: nested like edit_output
                out = _with_sample(out, c.edit_prediction(ctx, arguments, _sample(out)))
            return out
        finally:
            engine.context = previous

    def reset_state(self, module):
        return module


class Engine:
    """State shared by the processors and hooks of one ``attach`` (``handle.engine``).

    sites:    every site of the target; ``per_site``: {site name: controls there, in order};
    controls: the attached controls in their defined order; ``context``: the current
    :class:`ForwardContext` (``None`` outside a denoiser forward); ``pipeline``: the pipeline
    when one was attached.
    """

    def __init__(self, target, controls: tuple[Control, ...] = (), *, cfg_scale=None, sequential: bool | None = None,
                 run: RunState | None = None):
        self.target = target
        self.models = denoisers(target)  # [(attribute or None, model)]
        self.pipeline = None if self.models[0][0] is None else target
        self.sites = sites(target)
        # stable sort: equal orders keep attach order
        self.controls: tuple[Control, ...] = tuple(sorted(controls, key=lambda c: c.order))
        self.per_site: dict[str, tuple[Control, ...]] = {}
        self.context: ForwardContext | None = None
        self.guidance = None
        self.forward_controls: tuple[Control, ...] = ()  # controls with edit_inputs / edit_prediction
        self.cfg_scale_override = cfg_scale
        self.sequential = sequential
        self._index = 0
        self._last_t: float | None = None
        self.run = run if run is not None else RunState()  # the pipeline call's state (pinned step, step count)
        self._branch_override = None
        self._row_groups = None  # handle.row_groups: {name: rows} or batch -> {name: rows}
        self._last_main: tuple | None = None  # (denoiser, step) of the last guided forward
        self._cond_text: dict = {}  # denoiser -> (step, text) of its last separate cond forward (ForwardContext.cond_text)
        self._warned_unidentified = False
        self._saved: list = []  # (model, original processors dict)
        self._hooked: list = []  # models carrying our hook
        self._block_hooks: list = []  # (module, hook name, model)
        self._attached: list[Control] = []

    # ------------------------------------------------------------------ install / uninstall
    def install(self) -> "Engine":
        from .guidance import GuidanceWrapper

        for _, model in self.models:
            registry = HookRegistry.check_if_exists_or_initialize(model)
            if registry.get_hook(HOOK_NAME) is not None or any(
                isinstance(p, DiffattnProcessor) for p in model.attn_processors.values()
            ):
                raise ControlError(
                    f"diffattn is already attached to this {type(model).__name__}: call .detach() on the first handle "
                    f"(or leave its `with` block) first, or pass all controls to one attach(...)"
                )
        foreign = []
        current = {denoiser: model.attn_processors for denoiser, model in self.models}
        for s in self.sites:
            proc = current[s.denoiser][s.processor_key]
            if type(proc).__name__ not in get_family(s.family).mirrored:
                foreign.append(f"{s.name} ({type(proc).__name__})")
        if foreign:
            raise UnsupportedModelError(
                f"{len(foreign)} attention site(s) run processors diffattn does not reproduce, e.g. {foreign[:3]}; "
                f"swapping them would silently drop what they do (IP-Adapter, custom attention). diffattn mirrors "
                f"{sorted({n for fam in families() for n in fam.mirrored})}: restore those first "
                f"(e.g. model.set_default_attn_processor() / unload the adapter)"
            )
        for c in self.controls:
            if getattr(c, "_diffattn_engine", None) is not None:
                raise ControlError(
                    f"this {type(c).__name__} instance is already attached to a model: detach it first, or create "
                    f"a second instance"
                )
        for c in self.controls:
            c._diffattn_engine = self
            self._attached.append(c)
            c.on_attach(self)

        per_site: dict[str, list[Control]] = {s.name: [] for s in self.sites}
        for c in self.controls:
            # a callable filter may legitimately match nothing (an empty head set); a selector
            # that names nothing is a user error and raises SelectorError from select()
            if callable(c.sites):
                chosen = [s for s in self.sites if c.sites(s)]
            else:
                chosen = select(self.sites, c.sites)
            for s in chosen:
                per_site[s.name].append(c)
        self.per_site = {name: tuple(cs) for name, cs in per_site.items()}

        # controls that edit the whole forward's inputs or prediction (CADS, interval guidance,
        # particle guidance): the engine hook calls them around the forward (controls.py, stages 0 and 5)
        self.forward_controls = tuple(c for c in self.controls if c.edits_forward)
        guided = [c for c in self.controls if c.extra_branches]
        if guided:
            names = [c.extra_branches[0] for c in guided]
            clash = sorted({n for n in names if names.count(n) > 1 or n in ("cond", "uncond")})
            if clash:
                raise ControlError(
                    f"controls {[type(c).__name__ for c in guided]} declare the extra branch(es) {clash} more than once "
                    f"(or reuse 'cond'/'uncond'); give each guidance control its own branch name"
                )
            sequential = self.sequential if self.sequential is not None else any(c.sequential for c in guided)
            self.guidance = GuidanceWrapper(guided, self, cfg_scale=self.cfg_scale_override, sequential=sequential)

        by_model: dict[str | None, list] = {}
        for s in self.sites:
            by_model.setdefault(s.denoiser, []).append(s)
        for denoiser, model in self.models:
            original = dict(model.attn_processors)
            new = dict(original)
            family = None
            for s in by_model.get(denoiser, []):
                family = get_family(s.family)
                proc = family.processor(self, s, self.per_site[s.name])
                old = original[s.processor_key]
                proc._attention_backend = getattr(old, "_attention_backend", None)
                proc._parallel_config = getattr(old, "_parallel_config", None)
                new[s.processor_key] = proc
            model.set_attn_processor(new)  # pops from its argument: `new` is our own copy
            self._saved.append((model, original))
            registry = HookRegistry.check_if_exists_or_initialize(model)
            registry.register_hook(_EngineHook(self, family, denoiser, model), HOOK_NAME)
            self._hooked.append(model)
            for c in self.controls:
                for i, (module_name, hook) in enumerate(c.block_hooks(model)):
                    sub = model.get_submodule(module_name) if module_name else model
                    hook_name = f"diffattn.{type(c).__name__}.{id(c)}.{i}"
                    HookRegistry.check_if_exists_or_initialize(sub).register_hook(hook, hook_name)
                    self._block_hooks.append((sub, hook_name, model))
            _invalidate(model)
        return self

    def uninstall(self) -> None:
        """Remove every hook, restore the exact original processor objects, detach the controls."""
        errors = []
        for sub, hook_name, model in reversed(self._block_hooks):
            HookRegistry.check_if_exists_or_initialize(sub).remove_hook(hook_name, recurse=False)
        for model in self._hooked:
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK_NAME, recurse=False)
            _invalidate(model)
        for model, original in self._saved:
            model.set_attn_processor(dict(original))
        for c in reversed(self._attached):
            try:
                c.on_detach(self)
            except Exception as e:  # restore the model whatever a control does
                errors.append(e)
            finally:
                c._diffattn_engine = None
        self._attached, self._block_hooks, self._hooked, self._saved = [], [], [], []
        self.context = None
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ per forward
    def begin_forward(self, hook: _EngineHook, args: dict, cache_context) -> ForwardContext:
        """Build the :class:`ForwardContext` of one denoiser forward from its arguments."""
        family = hook.family
        hidden = args.get("sample", args.get("hidden_states"))
        if hidden is None:
            raise UnsupportedModelError(f"diffattn could not find the latent input of this {family.name} forward")
        batch = hidden.shape[0]
        step = self._track_step(args.get("timestep"), cache_context)
        name = getattr(cache_context, "name", None)
        branches = self._branches(batch, name, family.auxiliary_branch(args), hook.denoiser, self._scheduler_position())
        text = args.get("encoder_hidden_states")
        cond_text = None
        if branches == {"cond": slice(0, batch)} and name == "cond":  # CFG as separate forwards: keep for uncond
            self._cond_text[hook.denoiser] = (step.index, text)
        elif branches == {"uncond": slice(0, batch)}:
            index, kept = self._cond_text.get(hook.denoiser, (None, None))
            if index == step.index and kept is not None and kept.shape[0] == batch:
                cond_text = kept
        return ForwardContext(step=step, branches=branches, family=family.name, groups=self._groups(batch, branches),
                              denoiser=hook.denoiser, batch=batch, cache_name=name,
                              info=family.forward_info(hook.config, args, hook.family_cache),
                              text=text, cond_text=cond_text,
                              in_window={id(c): c.window_holds(step) for c in self.controls},
                              guidance_scales=self.guidance.scales(step) if self.guidance is not None else None)

    # ------------------------------------------------------------------ steps
    def _scheduler(self):
        return getattr(self.pipeline, "scheduler", None) if self.pipeline is not None else None

    def _track_step(self, timestep, cache_context) -> StepState:
        t = None
        if timestep is not None:
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        scheduler = self._scheduler()
        sched_index = getattr(scheduler, "step_index", _MISSING) if scheduler is not None else _MISSING
        if cache_context is not None and getattr(cache_context, "step_index", None) is not None:
            self._index = int(cache_context.step_index)
        elif self.run.step is not None:
            self._index = self.run.step
        elif self._last_t is None or sched_index is None:
            self._index = 0  # first forward of a run
            self._last_main = None
        elif t is not None and t != self._last_t:
            rose = t > self._last_t and sched_index is _MISSING
            self._index = 0 if rose else self._index + 1
            if rose:
                self._last_main = None
        self._last_t = t
        num_steps = self.run.num_steps
        if num_steps is None and cache_context is not None:
            num_steps = getattr(cache_context, "num_inference_steps", None)
        if num_steps is None and self.pipeline is not None:
            num_steps = getattr(self.pipeline, "_num_timesteps", None)
            if num_steps is None and scheduler is not None and getattr(scheduler, "timesteps", None) is not None:
                num_steps = len(scheduler.timesteps)
        sigma = getattr(cache_context, "sigma", None) if cache_context is not None else None
        if sigma is None and scheduler is not None:
            sigma = _scheduler_sigma(scheduler, sched_index, t)
        return StepState(index=self._index, timestep=t, sigma=None if sigma is None else float(sigma),
                         num_steps=int(num_steps) if num_steps else None)

    def reset_steps(self) -> None:
        """Start counting steps from 0 at the next forward."""
        self._last_t = None
        self._index = 0
        self._last_main = None
        self._cond_text = {}

    # ------------------------------------------------------------------ branches
    def cfg_in_batch(self, batch: int) -> bool:
        """Whether a forward of ``batch`` rows carries [uncond, cond] (SD, SDXL, SD3 with CFG)."""
        if self.pipeline is None or batch % 2:
            return False
        return bool(getattr(self.pipeline, "do_classifier_free_guidance", False))

    def _scheduler_position(self):
        """Where the pipeline's scheduler is in its run, from a counter it advances in every
        ``step()`` (``step_index``; PNDM's ``counter``), or ``None`` when it keeps none (DDIM)
        or has not stepped yet: the one sure sign that two calls belong to one step (a
        repeated timestep is not: PNDM repeats one across two steps)."""
        scheduler = self._scheduler()
        if scheduler is None:
            return None
        position = getattr(scheduler, "step_index", None)
        return position if position is not None else getattr(scheduler, "counter", None)

    def _branches(self, batch: int, cache_name: str | None, auxiliary: str | None = None,
                  denoiser: str | None = None, position=None) -> dict[str, slice]:
        """What the rows of a denoiser call are (the rule in the module docstring)."""
        if self._branch_override is not None:
            got = self._branch_override(batch) if callable(self._branch_override) else self._branch_override
            return dict(got)
        if auxiliary is not None:  # a forward beside the guided one (SD3 skip-layer guidance)
            return {auxiliary: slice(0, batch)}
        if cache_name in ("cond", "uncond"):
            return {cache_name: slice(0, batch)}
        if self.pipeline is not None and position is not None:
            key = (denoiser, position)
            if self._last_main == key:  # a second unnamed forward before the scheduler stepped
                self._warn_unidentified()
                return {UNIDENTIFIED: slice(0, batch)}
            self._last_main = key
        if self.cfg_in_batch(batch):
            return {"uncond": slice(0, batch // 2), "cond": slice(batch // 2, batch)}
        return {"cond": slice(0, batch)}

    def _groups(self, batch: int, branches: dict[str, slice]) -> dict[str, tuple[int, ...]]:
        """The row groups of a forward of ``batch`` rows (``handle.row_groups``), checked: rows
        inside the batch, names apart from the branch names."""
        if self._row_groups is None:
            return {}
        got = self._row_groups(batch) if callable(self._row_groups) else self._row_groups
        try:
            groups = {str(k): tuple(int(r) for r in v) for k, v in dict(got).items()}
        except (TypeError, ValueError):
            raise ControlError(f"handle.row_groups gave {got!r}: a dict {{name: [row, ...]}} (or a function of the "
                               f"batch size returning one)") from None
        extra = {c.extra_branches[0] for c in self.controls if c.extra_branches}
        for name, rows in groups.items():
            if name in extra:
                raise ControlError(f"row group {name!r} has the name of a guidance branch ({sorted(extra)}); give the "
                                   f"group another name")
            if name in branches:
                raise ControlError(f"row group {name!r} has the name of a branch of this forward ({sorted(branches)}); "
                                   f"give the group another name")
            if any(not 0 <= r < batch for r in rows):
                raise ControlError(f"row group {name!r} names rows {list(rows)} of a forward of {batch} rows")
        return groups

    def _warn_unidentified(self) -> None:
        if not self._warned_unidentified:
            self._warned_unidentified = True
            warnings.warn(
                f"{type(self.pipeline).__name__} called its denoiser more than once in one step without naming the "
                f"calls (cache_context('cond' | 'uncond')) or a form diffattn recognises; the later calls are branch "
                f"{UNIDENTIFIED!r}: they get no extra guidance branch and controls limited to 'cond' skip them. Name "
                f"the rows yourself with handle.branches(...) if that is not what you want",
                stacklevel=3,
            )

    def pipeline_cfg_scale(self, denoiser: str | None = None) -> float:
        """The CFG scale w the pipeline applies to the cond prediction (1 without CFG)."""
        if self.pipeline is None or not getattr(self.pipeline, "do_classifier_free_guidance", False):
            return 1.0
        if denoiser == "transformer_2" and getattr(self.pipeline, "_guidance_scale_2", None) is not None:
            return float(self.pipeline._guidance_scale_2)
        w = getattr(self.pipeline, "guidance_scale", None)
        if w is None:
            w = getattr(self.pipeline, "_guidance_scale", 1.0)
        return float(w)


def _invalidate(model) -> None:
    """Drop diffusers' cached child-registry list so cache contexts reach new block hooks."""
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()
    elif hasattr(registry, "_child_registries_cache"):
        registry._child_registries_cache = None


def _scheduler_sigma(scheduler, sched_index, t) -> float | None:
    """Noise level of the current step: ``scheduler.sigmas`` at its step index, or for
    DDPM-type schedulers sqrt((1 - ᾱ_t) / ᾱ_t) (the k-diffusion sigma of timestep t)."""
    try:
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is not None and sched_index is not _MISSING:
            i = sched_index if sched_index is not None else (getattr(scheduler, "begin_index", None) or 0)
            if i < len(sigmas):
                return float(sigmas[i])
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is not None and t is not None and 0 <= int(t) < len(alphas):
            a = float(alphas[int(t)])
            return ((1 - a) / a) ** 0.5
    except (TypeError, ValueError, IndexError):
        return None
    return None


class Handle:
    """What :func:`attach` returns. ``.detach()`` restores the model (also as a context manager);
    ``.engine`` is the :class:`Engine` for inspection."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.attached = True

    def detach(self) -> None:
        """Restore the original processor objects and remove every hook (idempotent)."""
        if self.attached:
            self.attached = False
            self.engine.uninstall()

    def reset_steps(self) -> None:
        """Count steps from 0 again at the next forward (custom denoising loops)."""
        self.engine.reset_steps()

    def set_step(self, index: int | None) -> None:
        """Pin the step index (``None`` unpins): for loops the engine cannot follow (inversion)."""
        self.engine.run.step = index

    @contextlib.contextmanager
    def branches(self, layout: dict[str, slice] | Callable[[int], dict[str, slice]]):
        """Name the batch rows yourself inside the block: ``{"ref": slice(0, 2), "cond":
        slice(2, 3)}``, or a function ``batch -> dict`` (custom pipelines, bare denoisers)."""
        previous, self.engine._branch_override = self.engine._branch_override, layout
        try:
            yield self
        finally:
            self.engine._branch_override = previous

    @contextlib.contextmanager
    def row_groups(self, groups: dict[str, Sequence[int]] | Callable[[int], dict[str, Sequence[int]]]):
        """Name sets of batch rows inside the block, on top of the branches and overlapping them:
        ``{"scene": [2, 5], "ref0": [0, 3]}`` in a ``[ref0, ref1, scene] × (uncond, cond)`` batch,
        or a function ``batch -> dict``. Controls select them by name like branches
        (``branches="scene"``); a name is the union of its rows, as a branch's. The rows are of
        the forward the pipeline makes: rows a guidance control appends (its extra branch) are in
        no group, and its separate forward (``sequential``) sees no groups."""
        previous, self.engine._row_groups = self.engine._row_groups, groups
        try:
            yield self
        finally:
            self.engine._row_groups = previous

    @property
    def controls(self) -> tuple[Control, ...]:
        return self.engine.controls

    @property
    def context(self) -> ForwardContext | None:
        """The current denoiser forward's :class:`ForwardContext` (``None`` outside one)."""
        return self.engine.context

    @property
    def run(self) -> RunState:
        """The :class:`~diffattn.families.RunState` this attach serves."""
        return self.engine.run

    def gradient_checkpointing(self, target=None, *, enabled: bool = True):
        """Context manager: gradient checkpointing of the attached denoisers' blocks (or of
        ``target``'s) that replays this attach's per-forward context in the recomputation; see
        the module function :func:`gradient_checkpointing`."""
        return gradient_checkpointing(self.engine.target if target is None else target, self, enabled=enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()
        return False

    def __repr__(self):
        state = "attached" if self.attached else "detached"
        return f"<diffattn.Handle {state}: {len(self.engine.controls)} controls on {len(self.engine.sites)} sites>"


def attach(target, *controls: Control, cfg_scale: float | Callable | None = None, sequential: bool | None = None,
           run: RunState | None = None) -> Handle:
    """Install diffattn on a pipeline or a bare denoiser, with the given controls.

    target:     a diffusers pipeline (its ``unet`` / ``transformer``, and ``transformer_2``) or
                a denoiser model. Supported: {supported}.
    controls:   :class:`~diffattn.controls.Control` instances (each attached once).
    cfg_scale:  the CFG scale w the guidance wrapper divides by when the pipeline batches
                [uncond, cond] (default: read ``pipe.guidance_scale`` at call time); a float or
                a function ``StepState -> float``.
    sequential: run extra guidance branches as separate forwards (less memory) instead of
                one batch (default: a control's ``sequential`` attribute).
    run:        the :class:`~diffattn.families.RunState` of the pipeline call this attach
                serves (diffattn's own loops pass theirs: its ``step`` pins the step index,
                its ``num_steps`` is the run's length); default: a fresh one.

    One attach serves one pipeline at a time. To serve concurrent requests (a web app), give
    each request its own copy of the pipeline (or a lock around the call): the processors and
    hooks installed here belong to the pipeline's modules, and attaching to a model that is
    already attached is a ``ControlError``.

    With no control, or controls at zero strength, outputs equal the stock processors'.
    Raises UnsupportedModelError for other models, SelectorError for a control whose sites
    select nothing, ControlError when diffattn is already attached to the model or a control
    instance is attached twice.
    """
    for c in controls:
        if not isinstance(c, Control):
            raise ControlError(f"attach() takes diffattn controls (diffattn.Control subclasses); got {type(c).__name__}")
    if len(set(map(id, controls))) != len(controls):
        raise ControlError("the same control instance was passed twice; pass it once")
    engine = Engine(target, controls, cfg_scale=cfg_scale, sequential=sequential, run=run)
    try:
        engine.install()
    except BaseException:
        _safe_uninstall(engine)
        raise
    return Handle(engine)


attach.__doc__ = attach.__doc__.replace("{supported}", "every registered family (diffattn.families)")


def is_attached(target) -> bool:
    """Whether diffattn is attached to ``target`` (a pipeline or a denoiser) right now."""
    return any(HookRegistry.check_if_exists_or_initialize(model).get_hook(HOOK_NAME) is not None
               for _, model in denoisers(target))


def refuse_if_attached(target, loop: str) -> None:
    """``ControlError`` when controls are attached to ``target`` while a diffattn loop that
    runs its own guidance (``loop``) is about to attach its own: their extra branches would be
    folded with the loop's CFG, which the engine cannot read from the pipeline."""
    if is_attached(target):
        raise ControlError(
            f"{loop} runs its own sampling loop and its own guidance; controls attached to this pipeline with "
            f"da.attach would act inside it with a CFG scale the engine cannot know. Detach them (leave the `with "
            f"da.attach(...)` block) before calling {loop}"
        )


def _safe_uninstall(engine: Engine) -> None:
    with contextlib.suppress(Exception):
        engine.uninstall()


# ----------------------------------------------------------------------------- gradient checkpointing


def checkpoint_function(engine: Engine | None = None) -> Callable:
    """A diffusers ``gradient_checkpointing_func`` (``model.enable_gradient_checkpointing(fn)``)
    that replays ``engine``'s per-forward context when a block is recomputed.

    Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost")
    keeps a block's inputs only and runs its forward again in the backward. By then the denoiser
    forward has returned and ``engine.context`` is ``None`` (or another forward's): diffattn's
    processors and block hooks would recompute with the default step, no branches and no token
    layout, so a control keyed on any of them would silently give other activations, hence
    wrong gradients. ``fn(block, *args)`` captures ``engine.context`` when the block first runs
    and sets it again around the recomputation (non-reentrant ``torch.utils.checkpoint``, RNG
    state preserved), so the backward recomputes exactly the forward's operations. The restored
    context is the forward's own object: its ``slots`` hold what the whole forward left there
    (a control that caches in them must recompute the same either way). ``engine=None``: plain
    non-reentrant checkpointing (nothing attached)."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    def checkpoint(module, *args):
        ctx = engine.context if engine is not None else None

        def run(*a):
            if engine is None:
                return module(*a)
            previous, engine.context = engine.context, ctx
            try:
                return module(*a)
            finally:
                engine.context = previous

        return torch_checkpoint(run, *args, use_reentrant=False)

    return checkpoint


_UNSET = object()


@contextlib.contextmanager
def gradient_checkpointing(target, attached: "Handle | Engine | None" = None, *, enabled: bool = True):
    """Within the block, the blocks of ``target``'s denoisers (a pipeline or a denoiser) are
    gradient-checkpointed with :func:`checkpoint_function` of ``attached`` (the handle of
    ``attach``, its engine, or ``None`` when nothing is attached); afterwards each block's
    checkpointing flag and function are restored as they were. ``enabled=False`` does nothing
    (so a loop can pass its setting through).

        with da.attach(model, control) as h, h.gradient_checkpointing():
            loss(model(...)).backward()     # the same gradients as without, less activation memory

    ``UnsupportedModelError`` for a denoiser that does not support gradient checkpointing."""
    if not enabled:
        yield
        return
    engine = attached.engine if isinstance(attached, Handle) else attached
    models = [model for _, model in denoisers(target)]
    for model in models:
        if not getattr(model, "_supports_gradient_checkpointing", False) or not hasattr(
                model, "enable_gradient_checkpointing"):
            raise UnsupportedModelError(
                f"{type(model).__name__} does not support gradient checkpointing (diffusers' "
                f"_supports_gradient_checkpointing is off); run without it (gradient_checkpointing=False)")
    saved = [(m, m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", _UNSET))
             for model in models for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    fn = checkpoint_function(engine)
    try:
        for model in models:
            model.enable_gradient_checkpointing(fn)
        yield
    finally:
        for m, on, previous in saved:
            m.gradient_checkpointing = on
            if previous is _UNSET:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = previous
