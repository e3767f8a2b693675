"""SoftPAG: head-level perturbed-attention guidance with a continuous strength.

Ahn et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (arXiv
2506.10978): selected heads (l, h) of a perturbed copy of the conditional branch use
A' = (1 - u) A + u P (Eq. 7), and guidance adds s·(ε_c - ε_pert):

    ε = ε_u + w(ε_c - ε_u) + s·(ε_c - ε_pert)        (without CFG: ε_c + s(ε_c - ε_pert))

u = 1 on all heads of a layer is layer-level PAG (Ahn et al. 2024). The perturbation is
applied in output space (``methods.perturbation``): exact, and the L×L map is never built.

    pag = da.SoftPAG(heads={"transformer_blocks.2.attn": [0, 3]}, strength=0.5, scale=3.0)
    with da.attach(pipe, pag):
        image = pipe(prompt).images[0]
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping

import torch

from ..controls import AttentionCall, Control, StepState, StepWindow
from ..errors import ControlError, SelectorError
from ..kernels import attention
from ..sites import select_heads
from .perturbation import (
    check_target,
    image_self_target,
    meanquery_target,
    soft_blend,
    uniform_target,
)

PERTURBABLE_KINDS = ("self", "joint", "single")  # identity needs Nq == Nk: no cross attention


class SoftPAG(Control):
    """Head-level (soft) perturbed-attention guidance.

    heads:     "all" (every head of every self/joint/single-stream site); a mapping
               {site name: head list | "all" | {head: u}}; a list of (site, head) or
               (site, head, u) tuples; or a preset dict / JSON path from HeadHunter.
    strength:  default u in [0, 1] for heads given without their own u (default 1); given
               with a preset, it replaces the preset's u of every head.
    scale:     guidance scale s of the perturbed branch (default: the preset's, else 3).
    target:    "identity" (PAG), "uniform" or "meanquery" (SEG with sigma -> inf).
    semantics: joint-attention semantics, "joint" (paper code), "image" or "image-self"
               (diffusers' SD3 PAG); see ``methods.perturbation``.
    steps:     a StepWindow limiting where guidance applies; ``schedule(step) -> factor``
               multiplies s per step.
    sequential: run the perturbed branch as a separate forward (less memory).
    """

    order = 50
    extra_branches = ("perturbed",)

    def __init__(
        self,
        heads="all",
        strength: float | None = None,
        scale: float | None = None,
        *,
        target: str = "identity",
        semantics: str = "joint",
        steps: StepWindow | None = None,
        schedule: Callable[[StepState], float] | None = None,
        sequential: bool = False,
    ):
        check_target(target, semantics)
        if strength is not None:
            _check_u(strength, "strength")
        if isinstance(heads, str) and heads != "all" and heads.endswith(".json"):
            heads = load_preset(heads)
        if is_preset(heads):
            self.preset = dict(heads)
            if scale is None:
                scale = heads.get("scale", 3.0)
            # the caller's strength replaces the preset's per-head u
            heads = [tuple(h) if strength is None else tuple(h[:2]) for h in heads["heads"]]
        else:
            self.preset = None
        _check_heads_spec(heads)
        strength = 1.0 if strength is None else strength
        scale = 3.0 if scale is None else scale
        if not math.isfinite(float(scale)) or float(scale) < 0:
            raise ControlError(f"scale={scale}: the guidance scale s is a finite number >= 0 (0 = no guidance)")
        super().__init__(sites=self._site_filter, steps=steps, branches=("perturbed",))
        self.head_spec = heads
        self.strength = float(strength)
        self.scale = float(scale)
        self.target = target
        self.semantics = semantics
        self.schedule = schedule
        self.sequential = sequential
        self.u: dict[str, torch.Tensor] = {}
        self._u_on_device: dict[tuple, torch.Tensor] = {}

    def __repr__(self):
        parts = [f"heads={_show_heads(self.head_spec)}", f"strength={self.strength:g}", f"scale={self.scale:g}"]
        if self.target != "identity":
            parts.append(f"target={self.target!r}")
        if self.semantics != "joint":
            parts.append(f"semantics={self.semantics!r}")
        if self.steps is not None:
            parts.append(f"steps={self.steps!r}")
        if self.schedule is not None:
            parts.append(f"schedule={getattr(self.schedule, '__qualname__', type(self.schedule).__name__)}")
        if self.sequential:
            parts.append("sequential=True")
        if self.preset is not None:
            parts.append(f"preset={self.preset.get('model')!r}")
        return f"SoftPAG({', '.join(parts)})"

    # ------------------------------------------------------------------ resolve
    def _site_filter(self, site) -> bool:
        return site.name in self.u

    def on_attach(self, engine) -> None:
        super().on_attach(engine)
        if self.preset is not None and self.preset.get("model") not in (None, _model_id(engine)):
            super().on_detach(engine)  # before the heads: another model's sites would not resolve either
            raise ControlError(
                f"this preset was made for {self.preset['model']!r}, not {_model_id(engine)!r}; "
                f"run HeadHunter on this model or pick a preset made for it"
            )
        try:
            self.u = resolve_heads(engine.sites, self.head_spec, self.strength)
        except Exception:
            super().on_detach(engine)
            raise
        if not self.u:
            self.u = {}

    def guidance_scale(self, step: StepState) -> float:
        if not any(bool((u > 0).any()) for u in self.u.values()):
            return 0.0  # nothing perturbed: no extra branch, output exactly unguided
        if self.steps is not None and not self.steps.contains(step):
            return 0.0
        return self.scale * (self.schedule(step) if self.schedule is not None else 1.0)

    # ------------------------------------------------------------------ per call
    def _rows(self, call: AttentionCall) -> torch.Tensor:
        return call.rows(("perturbed",))

    def _u_at(self, call: AttentionCall, like: torch.Tensor) -> torch.Tensor:
        """The site's per-head u [H] on ``like``'s device and dtype, copied there once."""
        src = self.u[call.site.name]
        if torch.compiler.is_compiling():  # in the graph: a cast, no host-side cache to guard on
            return src.to(like.device, like.dtype)
        key = (call.site.name, id(src), src._version, like.device, like.dtype)  # an edited u is re-copied
        u = self._u_on_device.get(key)
        if u is None:
            u = self._u_on_device[key] = src.to(like.device, like.dtype)
        return u

    def _blend_at(self, call: AttentionCall) -> torch.Tensor:
        """The [B, H] head blend of this call's batch layout (u on the perturbed rows, 0
        elsewhere), in q's dtype, built once per (site, layout, device, dtype)."""
        if torch.compiler.is_compiling():
            return self._rows(call).unsqueeze(1) * self._u_at(call, call.q)  # [B, 1] * [H] -> [B, H]
        n = call.q.shape[0]
        layout = tuple((b, range(n)[sl]) for b, sl in call.branches.items())
        src = self.u[call.site.name]
        key = (call.site.name, id(src), src._version, n, layout, call.q.device, call.q.dtype)
        blend = self._u_on_device.get(key)
        if blend is None:
            rows = self._rows(call).unsqueeze(1)  # [B, 1]
            blend = self._u_on_device[key] = rows * self._u_at(call, call.q)  # [B, H]
        return blend

    def edit_spec(self, call: AttentionCall) -> None:
        # No host syncs and no kernel launches on a GPU: the row test reads the branch slices
        # and the blend is cached per batch layout (the step is launch-bound at SD3 sizes).
        if self.target == "identity" and (self.semantics == "joint" or not _has_text(call)):
            if call.any_rows(("perturbed",)):
                call.spec.share_head_blend(self._blend_at(call))

    def on_detach(self, engine) -> None:
        self._u_on_device.clear()
        super().on_detach(engine)

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        if self.target == "identity" and (self.semantics == "joint" or not _has_text(call)):
            return out  # done by the kernel call through the head blend
        if not call.any_rows(("perturbed",)):
            return out
        rows = self._rows(call)
        u = self._u_at(call, out).view(1, -1, 1, 1)  # [1, H, 1, 1]
        q, k, v = call.q[rows], call.k[rows], call.v[rows]  # [b, H, N, D]
        scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
        if self.semantics == "joint" or not _has_text(call):
            qrows = slice(None)
        else:
            qrows = _image_rows(call)
        if self.semantics == "image-self" and _has_text(call):
            txt = call.layout.k("text").slice
            target = image_self_target(q[:, :, qrows], k[:, :, qrows], v[:, :, qrows], k[:, :, txt], v[:, :, txt], scale, attention)
        elif self.target == "identity":
            target = v[:, :, qrows]
        elif self.target == "uniform":
            target = uniform_target(v, q[:, :, qrows].shape[2])
        else:
            target = meanquery_target(q[:, :, qrows], k, v, scale, attention)
        out = out.clone()
        sub = out[rows]
        sub[:, :, qrows] = soft_blend(sub[:, :, qrows], target.to(sub.dtype), u)
        out[rows] = sub
        return out


def _has_text(call: AttentionCall) -> bool:
    return call.layout.has_k("text") and call.layout.has_q("text")


def _image_rows(call: AttentionCall) -> slice:
    """The query rows of the image-like segments (image, context image, video): all but text."""
    segs = [s for s in call.layout.query if s.name != "text"]
    return slice(min(s.start for s in segs), max(s.stop for s in segs))


def _show_heads(spec) -> str:
    """A short repr of a ``heads`` argument (a long preset list is cut)."""
    if isinstance(spec, (list, tuple)) and len(spec) > 4:
        return f"[{', '.join(map(repr, spec[:3]))}, ... ({len(spec)} heads)]"
    return repr(spec)


_HEADS_FORMS = ("heads are 'all', a mapping {site name: head list | 'all' | {head: u}}, a list of (site, head) or "
                "(site, head, u), or a HeadHunter preset (dict or .json path)")


def _check_heads_spec(spec) -> None:
    """The form of a ``heads`` argument, at construction (sites are resolved at attach): an empty
    or unreadable spec would perturb nothing and guide nothing, silently."""
    if spec is None:
        raise ControlError(f"heads=None selects no head; {_HEADS_FORMS}")
    if isinstance(spec, str):
        if spec != "all":
            raise ControlError(f"heads={spec!r}: {_HEADS_FORMS} (site selectors: pick sites with da.select and pass "
                               f"{{site.name: 'all'}})")
        return
    if isinstance(spec, Mapping):
        if not spec:
            raise ControlError(f"heads={{}} selects no head; {_HEADS_FORMS}")
        for name, heads in spec.items():
            if not isinstance(name, str):
                raise ControlError(f"heads: the key {name!r} is not a site name (a string); {_HEADS_FORMS}")
            if heads is None or (not isinstance(heads, (str, int)) and hasattr(heads, "__len__") and len(heads) == 0):
                raise ControlError(f"heads: site {name!r} is given no head ({heads!r}); list its heads or 'all'")
        return
    try:
        items = list(spec)
    except TypeError:
        raise ControlError(f"heads={spec!r}: {_HEADS_FORMS}") from None
    if not items:
        raise ControlError(f"heads={spec!r} selects no head; {_HEADS_FORMS}")
    for item in items:
        if isinstance(item, str) or not hasattr(item, "__len__") or len(item) not in (2, 3) \
                or not isinstance(item[0], str):
            raise ControlError(f"head entries are (site, head) or (site, head, u); got {item!r}")
        if isinstance(item[1], bool) or not hasattr(item[1], "__index__") and not (isinstance(item[1], str) and item[1].isdigit()):
            raise ControlError(f"head entry {item!r}: the head index must be an integer")
        if len(item) == 3:
            try:
                _check_u(item[2], f"u of {item[0]} head {item[1]}")
            except (TypeError, ValueError) as e:
                if isinstance(e, ControlError):
                    raise
                raise ControlError(f"head entry {item!r}: u must be a number in [0, 1]") from None


def _check_u(u: float, what: str) -> None:
    if isinstance(u, bool) or not isinstance(u, (int, float)) and not hasattr(u, "__float__"):
        raise ControlError(f"{what} u must be a number in [0, 1]; got {u!r}")
    if not 0.0 <= float(u) <= 1.0:
        raise ControlError(f"{what} u must lie in [0, 1] (0 = no perturbation, 1 = PAG); got {u}")


def resolve_heads(all_sites, spec, default_u: float) -> dict[str, torch.Tensor]:
    """{site name: u per head [H]} from any accepted ``heads`` form (validated)."""
    eligible = {s.name: s for s in all_sites if s.kind in PERTURBABLE_KINDS}
    known = {s.name: s for s in all_sites}
    u: dict[str, torch.Tensor] = {}

    def site(name):
        if name not in known:
            raise SelectorError(
                f"no attention site named {name!r}; sites that can be perturbed: {sorted(eligible)[:12]}"
                + (" ..." if len(eligible) > 12 else "")
            )
        if name not in eligible:
            raise SelectorError(f"site {name!r} is {known[name].kind} attention; SoftPAG perturbs self, joint or single-stream attention")
        return eligible[name]

    def put(name, heads, value):
        s = site(name)
        _check_u(value, f"u of {name}")
        vec = u.setdefault(name, torch.zeros(s.heads))
        for h in select_heads(s, heads):
            vec[h] = float(value)

    if isinstance(spec, str):
        if spec != "all":
            raise ControlError(f"heads must be 'all', a mapping, or a list of (site, head[, u]); got {spec!r}")
        for name in eligible:
            put(name, "all", default_u)
    elif isinstance(spec, Mapping):
        for name, heads in spec.items():
            if isinstance(heads, Mapping):
                for h, value in heads.items():
                    put(name, [int(h)], value)
            else:
                put(name, heads, default_u)
    else:
        for item in spec:
            if len(item) == 2:
                put(item[0], [int(item[1])], default_u)
            elif len(item) == 3:
                put(item[0], [int(item[1])], float(item[2]))
            else:
                raise ControlError(f"head entries are (site, head) or (site, head, u); got {item!r}")
    return u


def middle_layer(target) -> dict[str, str]:
    """All heads of the middle perturbable layer: the usual single-layer PAG choice (the
    UNet mid block on SD1.5/SDXL, the middle joint block on MMDiTs)."""
    from ..sites import sites

    candidates = [s for s in sites(target) if s.kind in PERTURBABLE_KINDS]
    mids = [s for s in candidates if s.alias is not None and s.alias.startswith("m")]
    site = mids[0] if mids else candidates[len(candidates) // 2]
    return {site.name: "all"}


def model_id(model) -> str:
    """A name for the denoiser that presets record: its hub id, or for a local folder the
    folder's name (``tiny-sd3``), so presets travel between machines."""
    import os

    name = getattr(model.config, "_name_or_path", None) or ""
    hub = [p for p in os.path.normpath(name).split(os.sep) if p.startswith("models--")]
    if hub:  # a Hub cache folder: .../models--org--name/snapshots/<revision>/<subfolder>
        return hub[-1][len("models--"):].replace("--", "/")
    if os.path.isabs(name):
        parts = os.path.normpath(name).split(os.sep)
        name = parts[-2] if parts[-1] in ("transformer", "unet", "transformer_2") and len(parts) > 1 else parts[-1]
    return name or type(model).__name__


def _model_id(engine) -> str:
    return model_id(engine.models[0][1])


def is_preset(heads) -> bool:
    """Whether a ``heads`` argument is a HeadHunter preset (a dict with its model and heads)."""
    return isinstance(heads, Mapping) and "heads" in heads and "model" in heads


def load_preset(path: str) -> dict:
    """A HeadHunter preset (JSON): {"model", "heads": [[site, head, u], ...], "scale"}.

    A file that is missing, not JSON, not a preset, or selects no head is a :class:`ControlError`
    saying which."""
    try:
        with open(path) as f:
            preset = json.load(f)
    except FileNotFoundError:
        raise ControlError(f"preset {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ControlError(f"preset {path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise ControlError(f"preset {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                           f"write it with `diffattn headhunt --out` or HeadHunter's save_preset") from None
    if not isinstance(preset, dict) or "heads" not in preset:
        raise ControlError(f"{path} is not a SoftPAG preset (expected keys 'model', 'heads', 'scale')")
    if not isinstance(preset["heads"], list) or not preset["heads"]:
        raise ControlError(f"preset {path} selects no head (\"heads\": {preset['heads']!r}); run the search again "
                           f"with --top-k >= 1")
    scale = preset.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale < 0):
        raise ControlError(f"preset {path}: scale {scale!r} is not a finite number >= 0")
    try:
        _check_heads_spec([tuple(h) if isinstance(h, list) else h for h in preset["heads"]])
    except ControlError as e:
        raise ControlError(f"preset {path}: {e}") from None
    return preset
