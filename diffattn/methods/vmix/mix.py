"""Value-mixed cross-attention: the math and the :class:`ValueMix` control.

VMix (arXiv 2412.20800, §3.3; ``../shared/reference/vmix_repulsion_decontext.md`` §1.3): every
cross-attention keeps its map and gains an aesthetic value branch,

    x̂ = softmax(Q K_cᵀ/√d) V_c + λ softmax(Q K_cᵀ/√d) V_a = softmax(Q K_cᵀ/√d) (V_c + λ V_a),

with V_a = W_V^a f_a (``adapter.py``). Attention is linear in V, so on a UNet cross-attention
this is *one* attention call with the values V_c + λ V_a (:func:`mix_values`): the map, the row
log-sum-exp and therefore every tap are the base model's exactly, at no extra attention cost.
f_a covers the first C = ``adapter.config.text_length`` text tokens (min(C, N_text) when the call
has fewer; later text tokens, e.g. SD3's T5 block, get no aesthetic value).

**MMDiT port** (not in the paper; SD3 joint attention, FLUX double and single blocks). The text
keys' values gain λ V_a for the *image-query rows only*: text-query rows (which update the text
stream) keep the stock output, so the text stream is not mixed. One joint softmax serves both
kinds of rows, so the image rows need a split (``joint=``):

- ``"split"`` (default): the stock call runs untouched and gives the text rows; a second call
  with the mixed values over the same queries gives the image rows (:func:`joint_rows`). Text
  rows equal VMix-off bit for bit, and a zero adapter reproduces the base bit for bit; the cost
  is a second attention call at the site.
- ``"merge"``: one call that also returns the row LSE, then the image rows gain
  λ·P_img,text V_a with P = exp(s − lse) over the C text keys only (:func:`merged_rows`): exact
  in exact arithmetic and far cheaper (N_img × C extra, C ≪ N); the stock output then comes
  from the LSE kernel path (equal to SDPA up to rounding).

**CFG's unconditional branch** (the paper does not say; ``uncond=``):

- ``"positive"`` (default): the aesthetic input on the conditional rows only, the
  unconditional rows run the base model: CFG then amplifies the aesthetic direction by w;
- ``"both"``: the same aesthetic input on both branches (the guidance difference then carries
  the text alone);
- ``"null"``: the unconditional rows get the all-negative labels (every rare token), the
  paper's "does not have this attribute".

Rows of every other branch (``cond``, a guidance control's ``perturbed``, SD3's ``skip``) get
the chosen aesthetics, so a perturbation branch differs from ``cond`` by its perturbation alone.

λ (``scale=``) is a float, a ``{site selector: float | fn(step)}`` dict (sites it does not
name get λ = 0), or ``fn(site_name, step) -> float``; λ = 0 at a call makes the control
inactive there (stock fast path). λ must be finite and ≥ 0.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ...controls import AttentionCall, Control, StepState
from ...errors import ControlError

UNCOND_POLICIES = ("positive", "both", "null")
JOINT_MODES = ("split", "merge")


# ----------------------------------------------------------------------------- pure math


def mix_values(v: torch.Tensor, va: torch.Tensor, lam: torch.Tensor, text: slice) -> torch.Tensor:
    """V_c + λ V_a on the text keys (§3.3: x̂ = softmax(Q K_cᵀ/√d)(V_c + λ V_a)).

    v: [B, H, Nk, D] the call's values; va: [B | 1, H, C, D]; lam: [B] per-row λ (0: the row as
    it is); text: the text keys' slice. V_a is added to the first min(C, len(text)) text keys.
    Returns [B, H, Nk, D] (a new tensor; ``v`` is not modified)."""
    start, stop = text.start or 0, text.stop if text.stop is not None else v.shape[2]
    c = min(va.shape[2], stop - start)
    add = lam.view(-1, 1, 1, 1).to(v.dtype) * va[:, :, :c].to(v.dtype)  # λ [B] -> [B, 1, 1, 1]; add [B, H, c, D]
    mid = v[:, :, start:start + c] + add
    return torch.cat([v[:, :, :start], mid, v[:, :, start + c:]], dim=2)  # [B, H, Nk, D]


def query_mask(n_query: int, text: slice | None, device) -> torch.Tensor:
    """[Nq] bool: the query rows VMix mixes on joint attention (every row outside ``text``)."""
    mask = torch.ones(n_query, dtype=torch.bool, device=device)
    if text is not None:
        mask[text] = False
    return mask


def joint_rows(out: torch.Tensor, out_mixed: torch.Tensor, rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The split of the MMDiT port: ``out_mixed`` on the mixed (batch row, query) pairs, ``out``
    (stock) elsewhere. out, out_mixed: [B, H, Nq, D]; rows: [B] bool; queries: [Nq] bool."""
    where = rows.view(-1, 1, 1, 1) & queries.view(1, 1, -1, 1)  # [B, 1, Nq, 1]
    return torch.where(where, out_mixed, out)


def merged_rows(out: torch.Tensor, probs: torch.Tensor, va: torch.Tensor, lam: torch.Tensor,
                queries: torch.Tensor) -> torch.Tensor:
    """The one-call form of the MMDiT port: out + λ·P V_a on the mixed query rows, where
    P = exp(s − lse) are the joint softmax's probabilities of the C text keys (linearity in V).
    out: [B, H, Nq, D]; probs: [B, H, Nq, C]; va: [B | 1, H, C, D]; lam: [B]; queries: [Nq]."""
    extra = torch.matmul(probs, va.to(probs.dtype))  # [B, H, Nq, D]
    extra = extra * (lam.view(-1, 1, 1, 1).to(probs.dtype) * queries.view(1, 1, -1, 1).to(probs.dtype))  # [B, 1, Nq, 1] weights
    return out + extra.to(out.dtype)


def check_lambda(value, where: str = "ValueMix scale") -> float:
    """λ as a float; :class:`ControlError` unless it is a finite number ≥ 0."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ControlError(f"{where} λ={value!r}: a finite number >= 0 (0: off; the paper sweeps 1 to 2)")
    return float(value)


# ----------------------------------------------------------------------------- the control


class ValueMix(Control):
    """VMix's value-mixed cross-attention (module docstring) as a control.

        adapter = load_adapter("assets/vmix/tiny-sd.safetensors")
        with da.attach(pipe, da.ValueMix(adapter, aesthetics=["shadow", "outline"], scale=1.5)):
            image = pipe("a red circle").images[0]

    adapter:    a :class:`~diffattn.methods.vmix.adapter.VMixAdapter` (checked against the model
                at attach: architecture fingerprint, sites, shapes);
    aesthetics: the dimensions asked for (names, or a comma-separated string); ``None``: all of
                them (the paper's default: every positive label); the others get their negative
                label. A bool tensor [N] or [B, N] gives the labels per batch row (training).
    scale:      λ: a float, ``{site selector: float | fn(step)}``, or ``fn(site_name, step)``;
    uncond:     what CFG's unconditional rows get: ``"positive"`` | ``"both"`` | ``"null"``;
    joint:      the MMDiT split, ``"split"`` | ``"merge"``;
    sites:      a subset of the adapter's sites (selector); default all of them;
    steps:      a step window (``diffattn.controls.StepWindow``).
    """

    order = 0

    def __init__(self, adapter, aesthetics=None, scale=1.0, *, uncond: str = "positive", joint: str = "split",
                 sites=None, steps=None, order: int | None = None):
        from .adapter import VMixAdapter

        if not isinstance(adapter, VMixAdapter):
            raise ControlError(f"ValueMix takes a VMixAdapter (diffattn.methods.vmix.load_adapter(path)); got "
                               f"{type(adapter).__name__}")
        if uncond not in UNCOND_POLICIES:
            raise ControlError(f"uncond={uncond!r}: choose one of {UNCOND_POLICIES}")
        if joint not in JOINT_MODES:
            raise ControlError(f"joint={joint!r}: choose one of {JOINT_MODES}")
        super().__init__(sites=self._on_adapter_site, steps=steps, order=order)
        self.adapter = adapter
        self.uncond, self.joint = uncond, joint
        self._selector = sites
        self._names: frozenset[str] = frozenset(adapter.config.sites)
        self.aesthetics = aesthetics
        self.scale = scale

    # ------------------------------------------------------------------ configuration
    @property
    def aesthetics(self) -> torch.Tensor:
        """The label mask: [N] (every row) or [B, N] (per batch row), bool."""
        return self._mask

    @aesthetics.setter
    def aesthetics(self, value) -> None:
        if value is None:
            mask = torch.ones(len(self.adapter.labels), dtype=torch.bool)
        elif isinstance(value, torch.Tensor):
            n = len(self.adapter.labels)
            if value.dtype != torch.bool or value.dim() not in (1, 2) or value.shape[-1] != n:
                raise ControlError(f"aesthetics as a tensor: bool [N] or [B, N] with N = {n} ({self.adapter.labels}); "
                                   f"got {value.dtype} {tuple(value.shape)}")
            mask = value.detach()
        else:
            names = [a.strip() for a in value.split(",") if a.strip()] if isinstance(value, str) else list(value)
            mask = self.adapter.label_mask(names)
        self._mask = mask

    @property
    def aesthetic_names(self) -> list[str]:
        """The dimensions asked for (every row; per-row masks: those of any row)."""
        m = self._mask if self._mask.dim() == 1 else self._mask.any(0)
        return [label for label, on in zip(self.adapter.labels, m.tolist()) if on]

    @property
    def scale(self):
        return self._scale

    @scale.setter
    def scale(self, value) -> None:
        if callable(value):
            self._scale = value
        elif isinstance(value, Mapping):
            self._scale = {k: (v if callable(v) else check_lambda(v, f"ValueMix scale[{k!r}]")) for k, v in value.items()}
        else:
            self._scale = check_lambda(value)
        self._site_scale = None  # a mapping is resolved to site names at attach

    def lam(self, site, step: StepState) -> float:
        """λ at ``site`` and ``step`` (checked: finite, ≥ 0)."""
        s = self._scale
        if callable(s):
            return check_lambda(s(site.name, step), f"ValueMix scale({site.name!r}, step {step.index})")
        if isinstance(s, Mapping):
            if self._site_scale is None:
                raise ControlError("a ValueMix scale given per site is resolved at attach; attach the control first")
            v = self._site_scale.get(site.name, 0.0)
            return check_lambda(v(step), f"ValueMix scale at {site.name}") if callable(v) else v
        return s

    # ------------------------------------------------------------------ attach
    def _on_adapter_site(self, site) -> bool:
        return site.name in self._names

    def on_attach(self, engine) -> None:
        from ...sites import select
        from .adapter import model_fingerprint

        models = [m for _, m in engine.models]
        want = {k: self.adapter.config.base.get(k) for k in ("class", "config_sha256")}
        model = next((m for m in models if model_fingerprint(m) == want), models[0])
        self.adapter.check_model(model, engine.sites)  # ControlError: another model, other sites
        names = frozenset(self.adapter.config.sites)
        if self._selector is not None:
            chosen = {s.name for s in select(engine.sites, self._selector)}
            outside = sorted(chosen - names)
            if outside:
                raise ControlError(f"sites {outside[:3]} are not sites of this VMix adapter; it has "
                                   f"{len(names)} sites: {sorted(names)[:3]}...")
            names = frozenset(chosen)
        self._names = names
        if isinstance(self._scale, Mapping):
            resolved: dict[str, object] = {}
            for key, value in self._scale.items():
                for s in select(engine.sites, key):
                    resolved[s.name] = value
            self._site_scale = resolved
        device = next(model.parameters()).device
        self.adapter.to(device)

    def on_detach(self, engine) -> None:
        self._names = frozenset(self.adapter.config.sites)

    # ------------------------------------------------------------------ rows
    def row_inputs(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-row label masks [B, N] and row weights [B] (1: mixed, 0: stock) of a call's
        batch under the ``uncond`` policy."""
        b, n = call.q.shape[0], len(self.adapter.labels)
        mask = self._mask
        if mask.dim() == 1:
            mask = mask.expand(b, n)
        elif mask.shape[0] != b:
            raise ControlError(f"per-row aesthetics for {mask.shape[0]} rows, but this forward has {b} batch rows; "
                               f"give one label row per batch row")
        mask = mask.to(call.q.device).clone()
        weight = torch.ones(b, dtype=torch.float64, device=call.q.device)  # λ·weight is cast to v's dtype at use
        rows = call.branches.get("uncond")
        if rows is not None:
            if self.uncond == "positive":
                weight[rows] = 0.0
            elif self.uncond == "null":
                mask[rows] = False
        return mask, weight

    def _mixes_rows(self, call: AttentionCall) -> bool:
        return self.uncond != "positive" or any(name != "uncond" for name in call.branches)

    def is_active(self, call: AttentionCall) -> bool:
        return super().is_active(call) and self._mixes_rows(call) and self.lam(call.site, call.step) > 0

    def _aesthetic_input(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """f_a [B, C, d_in] and the row weights [B], computed once per denoiser forward."""
        slots = call.context.slots if call.context is not None else None
        key = ("vmix", id(self))
        if slots is not None and key in slots:
            return slots[key]
        mask, weight = self.row_inputs(call)
        got = (self.adapter(mask), weight)
        if slots is not None:
            slots[key] = got
        return got

    # ------------------------------------------------------------------ hooks
    def edit_qkv(self, call: AttentionCall) -> None:
        f_a, weight = self._aesthetic_input(call)
        va = self.adapter.site_values(call.site.name, f_a, call.q.shape[1])  # [B, H, C, D]
        lam = weight * self.lam(call.site, call.step)  # [B]
        text = call.layout.k("text").slice
        if call.site.kind == "cross":  # every query is an image query: one call, mixed values
            call.v = mix_values(call.v, va, lam, text)
            return
        mixed = mix_values(call.v, va, lam, text) if self.joint == "split" else None
        layout = call.layout
        q_text = layout.q("text").slice if layout.has_q("text") else None
        call.scratch[id(self)] = (mixed, va, lam, text, query_mask(call.q.shape[2], q_text, call.q.device))

    def edit_spec(self, call: AttentionCall) -> None:
        if call.site.kind != "cross" and self.joint == "merge":
            call.spec.return_lse = True

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        state = call.scratch.pop(id(self), None)
        if state is None:
            return out
        mixed, va, lam, text, queries = state
        rows = lam > 0
        spec = call.spec
        if spec.uniform_keys is not None or spec.sparse is not None:
            raise ControlError(f"ValueMix on joint attention ({call.site.name}) does not compose with uniform keys or "
                               f"a sparse plan in the same call; drop one of the controls at this site")
        if self.joint == "merge":
            from ...kernels import attention_probs

            if spec.bias is not None:
                raise ControlError(f"ValueMix joint='merge' at {call.site.name} cannot take an attention mask; "
                                   f"use joint='split'")
            c = min(va.shape[2], text.stop - text.start)
            k_text = call.k[:, :, text.start:text.start + c]  # [B, H, c, D]
            probs = attention_probs(call.q, k_text, call.lse, scale=call.scale)  # [B, H, Nq, c]
            return merged_rows(out, probs, va[:, :, :c], lam, queries)
        from ...kernels import attention

        need_lse = spec.return_lse or bool(call.taps)  # the main call's kernel route, for bit-equal rows
        got = attention(call.q, call.k, mixed, scale=call.scale, head_blend=spec.head_blend, bias=spec.bias,
                        return_lse=need_lse)
        out_mixed = got[0] if need_lse else got
        return joint_rows(out, out_mixed, rows, queries)

    def __repr__(self):
        return (f"ValueMix(aesthetics={self.aesthetic_names}, scale={self._scale!r}, uncond={self.uncond!r}, "
                f"joint={self.joint!r}, sites={len(self._names)})")
