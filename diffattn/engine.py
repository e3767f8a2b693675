"""The engine: install diffattn processors and hooks, track step and branches, restore.

    handle = da.attach(pipe, control_a, control_b)   # or a bare denoiser
    ...
    handle.detach()                                  # original processors and forwards back

``attach`` swaps one processor instance per attention site (``set_attn_processor`` with a
full copy of the model's dict), and registers a diffusers ``ModelHook`` on each denoiser
that records, before every forward, what the processors need: the step (index, timestep,
sigma), the batch branch layout, the latent grid and the text length. When a control asks
for an extra branch the same hook runs the guidance wrapper (``diffattn.guidance``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .controls import Control, StepState
from .errors import ControlError, UnsupportedModelError
from .layout import grid_shape
from .processors import PROCESSORS
from .sites import denoisers, select, sites

HOOK_NAME = "diffattn.engine"


@dataclass
class ForwardContext:
    """What the processors of one denoiser forward need to know."""

    step: StepState
    branches: dict[str, slice]
    latent_hw: tuple[int, int] | None = None  # latent (or packed-token) grid of the image
    text_len: int = 0
    image_grid: tuple[int, ...] | None = None  # FLUX: grid of the target image tokens
    context_len: int = 0  # FLUX Kontext: context-image tokens at the end
    context_grid: tuple[int, ...] | None = None
    video_grid: tuple[int, int, int] | None = None  # Wan: (t, h, w) tokens
    extra: dict = field(default_factory=dict)


class _NoState(BaseState):
    def reset(self, *args, **kwargs):
        pass


class _EngineHook(ModelHook):
    """Per-denoiser hook: bookkeeping before the forward, guidance around it."""

    _is_stateful = True  # so diffusers' cache_context("cond"/"uncond") reaches us

    def __init__(self, engine: "Engine", family: str, model):
        super().__init__()
        self.engine = engine
        self.family = family
        self.cache = StateManager(_NoState)  # receives the pipeline's CacheContext
        self.signature = inspect.signature(model.forward)

    def new_forward(self, module, *args, **kwargs):
        bound = self.signature.bind_partial(*args, **kwargs)
        arguments = dict(bound.arguments)
        self.engine._begin_forward(self.family, arguments, self.cache._context)
        try:
            if self.engine.guidance is not None and self.engine.guidance.wants(self.engine.context):
                return self.engine.guidance.forward(self.fn_ref.original_forward, self.family, arguments, self.engine)
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.engine.context = None

    def reset_state(self, module):
        return module


class Engine:
    """State shared by the processors and hooks of one ``attach``."""

    def __init__(self, target, controls: tuple[Control, ...]):
        self.target = target
        self.pipeline = target if hasattr(target, "components") else None
        self.models = denoisers(target)  # [(name, model)]
        if not self.models:
            raise UnsupportedModelError(
                f"{type(target).__name__} has no denoiser diffattn knows (UNet2DConditionModel, "
                f"SD3Transformer2DModel, FluxTransformer2DModel, WanTransformer3DModel)"
            )
        self.sites = sites(target)
        self.controls = tuple(sorted(controls, key=lambda c: c.order))  # stable: ties keep attach order
        self.context: ForwardContext | None = None
        self._last_timestep: float | None = None
        self._step = 0
        self._saved = {}
        self._hooked = []
        self._block_hooks = []
        self._attached_controls = []
        self.guidance = None

    # ---------------------------------------------------------------- install
    def install(self):
        from .guidance import GuidanceWrapper

        for c in self.controls:
            c.on_attach(self)
            self._attached_controls.append(c)
        per_site = {s.name: [] for s in self.sites}
        for c in self.controls:
            # a callable filter may legitimately match nothing (an empty head set); a selector
            # that names nothing is a user error and raises
            chosen = [s for s in self.sites if c.sites(s)] if callable(c.sites) else select(self.sites, c.sites)
            for s in chosen:
                per_site[s.name].append(c)
        if any(c.extra_branches for c in self.controls):
            self.guidance = GuidanceWrapper([c for c in self.controls if c.extra_branches], self)
        by_model = {}
        for s in self.sites:
            by_model.setdefault(s.denoiser, []).append(s)
        for name, model in self.models:
            registry = HookRegistry.check_if_exists_or_initialize(model)
            if registry.get_hook(HOOK_NAME) is not None:
                raise ControlError(
                    f"diffattn is already attached to this {type(model).__name__}; detach the first handle, "
                    f"or pass all controls to one attach(...)"
                )
        for name, model in self.models:
            original = dict(model.attn_processors)
            self._saved[name] = (model, original)
            new = dict(original)
            family = None
            for s in by_model.get(name, []):
                family = s.family
                new[s.processor_key] = PROCESSORS[s.family](self, s, per_site[s.name])
            model.set_attn_processor(new)  # pops from its argument: `new` is our copy
            registry = HookRegistry.check_if_exists_or_initialize(model)
            registry.register_hook(_EngineHook(self, family, model), HOOK_NAME)
            self._hooked.append(model)
            for c in self.controls:
                for i, (module_name, hook) in enumerate(c.block_hooks(model)):
                    sub = model.get_submodule(module_name)
                    hook_name = f"diffattn.{type(c).__name__}.{id(c)}.{i}"
                    HookRegistry.check_if_exists_or_initialize(sub).register_hook(hook, hook_name)
                    self._block_hooks.append((sub, hook_name))
        return self

    def uninstall(self):
        for sub, hook_name in self._block_hooks:
            HookRegistry.check_if_exists_or_initialize(sub).remove_hook(hook_name, recurse=False)
        for model in self._hooked:
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK_NAME, recurse=False)
        for name, (model, original) in self._saved.items():
            model.set_attn_processor(dict(original))
        for c in self._attached_controls:
            c.on_detach(self)
        self._attached_controls = []
        self._block_hooks, self._hooked, self._saved = [], [], {}

    # ---------------------------------------------------------------- per forward
    def _begin_forward(self, family: str, args: dict, cache_context):
        hidden = args.get("sample", args.get("hidden_states"))
        batch = hidden.shape[0]
        step = self._track_step(args.get("timestep"), cache_context)
        ctx = ForwardContext(step=step, branches=self._branches(batch, cache_context))
        if family in ("unet", "sd3"):
            ctx.latent_hw = tuple(hidden.shape[-2:])
        elif family == "flux":
            ctx.text_len = args["encoder_hidden_states"].shape[1] if args.get("encoder_hidden_states") is not None else 0
            ids = args.get("img_ids")
            if ids is not None:
                ids = ids[0] if ids.dim() == 3 else ids  # [N, 3]
                is_ctx = ids[:, 0] > 0
                ctx.context_len = int(is_ctx.sum())
                ctx.image_grid = _ids_grid(ids[~is_ctx])
                ctx.context_grid = _ids_grid(ids[is_ctx]) if ctx.context_len else None
        elif family == "wan":
            cfg = self._model_config(family)
            pt, ph, pw = cfg.patch_size
            t, h, w = hidden.shape[-3:]
            ctx.video_grid = (t // pt, h // ph, w // pw)
        self.context = ctx

    def _model_config(self, family):
        for _, m in self.models:
            return m.config

    def grid(self, n_tokens: int):
        """(h, w) of an n-token image grid with the current latent's aspect ratio."""
        if self.context is None or self.context.latent_hw is None:
            return None
        return grid_shape(n_tokens, *self.context.latent_hw)

    def _track_step(self, timestep, cache_context) -> StepState:
        t = None
        if timestep is not None:
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        if cache_context is not None and cache_context.step_index is not None:
            self._step = cache_context.step_index
        elif t is not None and self._last_timestep is not None and t != self._last_timestep:
            # timesteps fall within a run; a rise means the pipeline started a new run
            self._step = 0 if t > self._last_timestep else self._step + 1
        self._last_timestep = t
        num_steps, sigma = None, None
        scheduler = getattr(self.pipeline, "scheduler", None) if self.pipeline is not None else None
        if scheduler is not None and getattr(scheduler, "timesteps", None) is not None:
            num_steps = len(scheduler.timesteps)
            sigmas = getattr(scheduler, "sigmas", None)
            if sigmas is not None and self._step < len(sigmas):
                sigma = float(sigmas[self._step])
        if cache_context is not None and cache_context.sigma is not None:
            sigma = float(cache_context.sigma)
        return StepState(index=self._step, timestep=t, sigma=sigma, num_steps=num_steps)

    def cfg_in_batch(self, batch: int, cache_context=None) -> bool:
        """Whether this forward carries [uncond, cond] in one batch (SD, SDXL, SD3)."""
        if cache_context is not None or self.pipeline is None:
            return False
        return bool(getattr(self.pipeline, "do_classifier_free_guidance", False)) and batch % 2 == 0

    def cfg_scale(self) -> float:
        """The pipeline's CFG scale w when it does CFG (1 otherwise)."""
        if self.pipeline is None or not getattr(self.pipeline, "do_classifier_free_guidance", False):
            return 1.0
        return float(getattr(self.pipeline, "guidance_scale", 1.0))

    def _branches(self, batch: int, cache_context) -> dict[str, slice]:
        if cache_context is not None and cache_context.name in ("cond", "uncond"):
            return {cache_context.name: slice(0, batch)}
        if self.cfg_in_batch(batch, cache_context):
            return {"uncond": slice(0, batch // 2), "cond": slice(batch // 2, batch)}
        return {"cond": slice(0, batch)}


def _ids_grid(ids: torch.Tensor) -> tuple[int, int] | None:
    """(h, w) of FLUX position ids [N, 3] (coordinates in columns 1 and 2)."""
    if ids.shape[0] == 0:
        return None
    h = int(ids[:, 1].max() - ids[:, 1].min()) + 1
    w = int(ids[:, 2].max() - ids[:, 2].min()) + 1
    return (h, w) if h * w == ids.shape[0] else None


class Handle:
    """What ``attach`` returns: ``.detach()`` restores the model; also a context manager."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.engine.uninstall()
            self.attached = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()
        return False

    def __repr__(self):
        state = "attached" if self.attached else "detached"
        return f"<diffattn.Handle {state}: {len(self.engine.controls)} controls on {len(self.engine.sites)} sites>"


def attach(target, *controls: Control) -> Handle:
    """Install diffattn on a pipeline or a bare denoiser, with the given controls.

    With no control, or controls at zero strength, outputs equal the stock processors'.
    Raises UnsupportedModelError for models without a known denoiser, SelectorError for a
    control whose sites select nothing, ControlError when diffattn is already attached or a
    control instance is attached twice.
    """
    for c in controls:
        if not isinstance(c, Control):
            raise ControlError(f"attach() takes diffattn controls; got {type(c).__name__}")
    if len(set(map(id, controls))) != len(controls):
        raise ControlError("the same control instance was passed twice; pass it once")
    engine = Engine(target, controls)
    try:
        engine.install()
    except Exception:
        engine.uninstall()
        raise
    return Handle(engine)
