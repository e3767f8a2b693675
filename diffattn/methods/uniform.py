"""Uniform attention maps (UAM): the control and the math of UAM's mask-guided editing.

Mo et al., "Uniform Attention Maps: Boosting Image Fidelity in Reconstruction and Editing"
(WACV 2025, arXiv 2411.19652). Replacing the cross-attention maps with uniform maps makes
DDIM inversion and reconstruction faithful (§3.1), and an adaptive mask built from the
source and target branches keeps the unedited regions from the uniform-map reconstruction
during editing (§3.2, Algorithm 1).

**Cross attention** (UNet ``attn2``, Wan ``attn2``): every selected map becomes the constant
map 1/N over the keys, so for every query

    O = to_out(mean_j V_j)                                   (§3.1; official code: all keys)

the same vector at every spatial position. The official code averages over all 77 CLIP
positions, start, end and padding tokens included (``keys="all"``, the default); a list of
token positions averages over those only. With no other control at the site the keys are
collapsed to one key carrying mean(V) before the kernel (softmax over one key is exactly 1),
so the call costs O(N·D): no QK^T is formed.

**Joint attention** (SD3 / FLUX ``attn``, FLUX single-stream): there is no separate
cross-attention map, and the image keys carry the image itself. The *segment-uniform* mode
keeps each row's total share of the text keys and spreads it uniformly over them, image keys
keeping their weights (``diffattn.controls.UniformKeys``):

    p_T = exp(lse_T - lse_all),   O = (1 - p_T)·softmax(q K_img^T)V_img + p_T·mean(V_T),

computed exactly from the two segments' log-sum-exps by the engine, without the L×L map.

**Strength** u in [0, 1] interpolates the maps, A' = (1 - u)A + u·U, done in output space
(O' = (1 - u)O + u·U V, exact); u = 0 is stock attention.

    uam = da.UniformAttention()                  # every cross (UNet) or joint (MMDiT) site
    with da.attach(pipe, uam):
        ...

The editing math (:func:`quantile_schedule`, :func:`edit_mask`, :func:`blend_x0`) is used by
``diffattn.pipelines.UAMPipeline``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..controls import AttentionCall, Control, StepWindow
from ..errors import ControlError, LayoutError, SelectorError
from ..kernels import attention, uniform_keys_attention
from ..layout import TokenLayout, segments
from .perturbation import soft_blend

UNIFORM_KINDS = ("cross", "joint", "single")  # sites that have text keys to make uniform
MODES = ("auto", "replace", "share")
MASK_CONVENTIONS = ("code", "paper")


# ----------------------------------------------------------------------------- pure math


def uniform_map_output(v: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Output of the uniform map P = 1/|S| over the keys S (UAM §3.1): mean_{j∈S} V_j.

    v: [B, H, Nk, D]; index: LongTensor of key positions (``None``: every key) -> [B, H, 1, D]
    (broadcasts over the queries). Accumulates in fp32 at least.
    """
    if index is not None:
        v = v.index_select(2, index)  # [B, H, |S|, D]
    acc = torch.promote_types(v.dtype, torch.float32)
    return v.to(acc).mean(dim=2, keepdim=True).to(v.dtype)


def masked_uniform_output(k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Uniform logits plus an attention bias/mask (a boolean mask averages over the keys it
    allows): softmax(bias)·V. k, v: [B, H, Nk, D], bias broadcastable to [B, H, Nq, Nk] ->
    [B, H, Nq|1, D]; rows with no allowed key give 0."""
    q0 = torch.zeros(k.shape[:2] + (bias.shape[-2] if bias.dim() >= 2 else 1, k.shape[-1]), dtype=k.dtype,
                     device=k.device)  # [B, H, Nq|1, D]: zero queries, zero scores
    return attention(q0, k, v, bias=bias).nan_to_num(0.0)


def quantile_schedule(num_steps: int, quantile: float) -> torch.Tensor:
    """UAM's per-step quantile q_i = linspace(0, q, T)[i] (Algorithm 1; official code
    ``np.linspace(0, quantile, num_steps)``): the threshold λ_i = quantile(|Δ|, q_i) rises
    along the run, so later steps preserve more. -> [T] fp64."""
    return torch.linspace(0.0, float(quantile), int(num_steps), dtype=torch.float64)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation by a (2r+1)×(2r+1) square: max-pool with stride 1 (official code:
    ``maxpool(3, 1, 1)`` for r = 1). mask: [B, C, h, w] in {0, 1} -> same shape."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def edit_mask(x0_source: torch.Tensor, x0_target: torch.Tensor, quantile: float, radius: int = 1,
              convention: str = "code") -> torch.Tensor:
    """UAM's adaptive mask M (1 = edited, take the target; 0 = preserved, take the uniform
    branch), per latent element (per channel, as the official code).

    Δ = x̂0_src - x̂0_tgt, λ = quantile(|Δ|, q) per sample over all its elements, then

    - ``"code"``  (official code, default): the code first soft-thresholds Δ by λ
      (``Δ -= Δ.clamp(-λ, λ)``) and then marks |Δ| > λ, so an element is edited where the
      original |Δ| > 2λ; M = dilate(|Δ| > 2λ): the *edit* mask is dilated, so the preserved
      region shrinks;
    - ``"paper"`` (Algorithm 1): the preserve mask dilate(|Δ| ≤ λ) is dilated, M = 1 - it.

    x0_*: [B, C, h, w] -> M [B, C, h, w] float {0, 1}.
    """
    if convention not in MASK_CONVENTIONS:
        raise ControlError(f"mask convention {convention!r}: use 'code' (dilate the edit mask, official code) or "
                           f"'paper' (dilate the preserve mask, Algorithm 1)")
    delta = (x0_source - x0_target).abs().float()  # [B, C, h, w]
    flat = delta.flatten(1)  # [B, C*h*w]
    lam = torch.quantile(flat, float(quantile), dim=1).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    if convention == "code":
        return dilate((delta > 2 * lam).float(), radius)  # soft threshold by λ, then > λ
    return 1.0 - dilate((delta <= lam).float(), radius)


def blend_x0(x0_keep: torch.Tensor, x0_aux: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x̂0 ← M·x̂0 + (1 - M)·x̂0_u (Algorithm 1): keep ``x0_keep`` where M = 1, the uniform
    branch's prediction elsewhere. All [B, C, h, w]."""
    mask = mask.to(x0_keep.dtype)
    return mask * x0_keep + (1 - mask) * x0_aux.to(x0_keep.dtype)


# ----------------------------------------------------------------------------- the control


def _check_strength(u) -> float:
    u = float(u)
    if not 0.0 <= u <= 1.0:
        raise ControlError(f"UniformAttention strength must lie in [0, 1] (0 = stock attention, 1 = uniform maps); "
                           f"got {u}")
    return u


def _check_keys(keys):
    if isinstance(keys, str):
        if keys not in ("all", "text"):
            raise ControlError(f"keys={keys!r}: use 'all' (every text key, padding included, as the paper), 'text', "
                               f"or a list of text-token positions")
        return keys
    if isinstance(keys, torch.Tensor):
        keys = keys.flatten().tolist()
    try:
        idx = sorted({int(i) for i in keys})
    except (TypeError, ValueError):
        raise ControlError(f"keys={keys!r}: use 'all', 'text', or a list of text-token positions (ints)") from None
    if not idx or idx[0] < 0:
        raise ControlError(f"keys={keys!r}: give at least one non-negative text-token position")
    return tuple(idx)


class UniformAttention(Control):
    """Uniform attention maps on cross-attention sites, segment-uniform on joint sites (UAM).

    sites:    ``"auto"`` (every cross-attention site; on MMDiTs, which have none, every joint and
              single-stream site) or a ``diffattn.sites`` selector naming cross / joint /
              single-stream sites; other kinds raise :class:`~diffattn.errors.SelectorError`.
    strength: u in [0, 1]: A' = (1 - u)A + u·U (0 = stock, 1 = the paper).
    keys:     ``"all"`` (the paper: every text key, start/end/padding included), ``"text"``
              (the text segment: the same on cross and joint sites), or text-token positions
              (e.g. the prompt's own tokens; positions within the text segment).
    mode:     ``"replace"``: the map becomes uniform over ``keys`` (cross attention);
              ``"share"``: keep each row's share of ``keys``, spread it uniformly over them
              (segment-uniform); ``"auto"``: replace on cross sites, share on joint sites.
              ``"replace"`` on a joint site raises: its image keys carry the image itself.
    heads, steps, branches: as every control (``steps`` and ``branches`` limit where it acts).
    """

    order = 80  # late in the q/k/v chain: the key collapse of the fast path sees the final keys

    def __init__(self, sites="auto", strength: float = 1.0, *, keys="all", mode: str = "auto", heads="all",
                 steps: StepWindow | None = None, branches: Sequence[str] | str | None = None):
        if mode not in MODES:
            raise ControlError(f"mode={mode!r}: use 'auto', 'replace' (uniform map over the keys) or 'share' "
                               f"(segment-uniform: keep the keys' share)")
        if sites is None or (isinstance(sites, (list, tuple, set, dict, str)) and not sites):
            raise ControlError(f"sites={sites!r} selects no site, so the control would do nothing; use 'auto' or a "
                               f"selector naming cross / joint / single-stream sites")
        super().__init__(sites=self._site_filter, heads=heads, steps=steps, branches=branches)
        self.site_spec = sites
        self.strength = _check_strength(strength)
        self.keys = _check_keys(keys)
        self.mode = mode
        self._modes: dict[str, str] = {}  # site name -> "replace" | "share"

    # ------------------------------------------------------------------ resolve
    def _site_filter(self, site) -> bool:
        return site.name in self._modes

    def on_attach(self, engine) -> None:
        super().on_attach(engine)
        self._modes = resolve_sites(engine.sites, self.site_spec, self.mode)

    def on_detach(self, engine) -> None:
        super().on_detach(engine)
        self._modes = {}

    def is_active(self, call: AttentionCall) -> bool:
        return self.strength > 0 and call.part == "main" and super().is_active(call)

    # ------------------------------------------------------------------ per call
    def key_index(self, call: AttentionCall) -> torch.Tensor | None:
        """Key positions S of this call (``None``: every key of a cross-attention call)."""
        if self._modes[call.site.name] == "replace" and self.keys in ("all", "text"):
            return None  # cross attention: its keys are the text
        seg = call.layout.k("text")
        if isinstance(self.keys, str):
            return torch.arange(seg.start, seg.stop, device=call.k.device)
        if self.keys[-1] >= len(seg):
            raise LayoutError(f"UniformAttention keys={list(self.keys)} at {call.site.name}: the text segment has "
                              f"{len(seg)} tokens (positions 0..{len(seg) - 1}); pick positions inside it")
        return torch.tensor(self.keys, dtype=torch.long, device=call.k.device) + seg.start

    def _all_rows_heads(self, call: AttentionCall) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows mask or None for all, heads mask or None for all)."""
        rows = None if self.branches is None else self.rows(call)
        if rows is not None and bool(rows.all()):
            rows = None
        heads = self.head_mask(call)
        return rows, (None if bool(heads.all()) else heads)

    def _fast(self, call: AttentionCall) -> bool:
        """Collapse the keys to the mean of the chosen ones (every key, or a token list): full
        uniform map, all rows and heads, no bias, and no other control active at this call
        (the call's keys stay intact for them otherwise)."""
        if self.strength != 1.0 or self._modes[call.site.name] != "replace" or call.spec.bias is not None:
            return False
        rows, heads = self._all_rows_heads(call)
        if rows is not None or heads is not None:
            return False
        others = self.engine.per_site.get(call.site.name, ()) if self.engine is not None else ()
        return not any(c is not self and c.is_active(call) for c in others)

    def edit_qkv(self, call: AttentionCall) -> None:
        if not self._fast(call):
            return
        call.scratch[id(self)] = "collapsed"  # edit_output of this call then has nothing to do
        k, v, index = call.k, call.v, self.key_index(call)  # index read from the layout before it changes
        call.layout = TokenLayout(call.layout.query, segments(("text", 1, None)))
        call.k = torch.zeros(k.shape[:2] + (1, k.shape[-1]), dtype=k.dtype, device=k.device)  # [B, H, 1, D]
        call.v = uniform_map_output(v, index)  # [B, H, 1, D]: softmax over one key is 1, so out = mean(V_S)

    def edit_spec(self, call: AttentionCall) -> None:
        if self.strength != 1.0 or self._modes[call.site.name] != "share":
            return
        rows, heads = self._all_rows_heads(call)
        call.uniform(self.key_index(call), rows=rows, heads=heads)

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        if call.scratch.get(id(self)) == "collapsed":
            return out  # the kernel already returned mean(V)
        mode = self._modes[call.site.name]
        if mode == "share" and self.strength == 1.0:
            return out  # done in the kernel (UniformKeys)
        rows, heads = self._all_rows_heads(call)
        r = slice(None) if rows is None else rows
        index = self.key_index(call)
        q, k, v = call.q[r], call.k[r], call.v[r]  # [b, H, N, D]
        bias = call.spec.bias
        if bias is not None and rows is not None and bias.dim() == 4 and bias.shape[0] == call.q.shape[0]:
            bias = bias[rows]
        if mode == "replace":
            if bias is None:
                target = uniform_map_output(v, index)  # [b, H, 1, D]
            else:
                ks, vs = (k, v) if index is None else (k.index_select(2, index), v.index_select(2, index))
                bs = bias if (index is None or bias.shape[-1] == 1) else bias.index_select(-1, index)
                target = masked_uniform_output(ks, vs, bs)
        else:
            target, _ = uniform_keys_attention(q, k, v, index, scale=call.scale, bias=bias, need_lse=False)  # [b, H, Nq, D]
        u = torch.full((1, out.shape[1], 1, 1), self.strength, dtype=out.dtype, device=out.device)  # [1, H, 1, 1]
        if heads is not None:
            u = u * heads.view(1, -1, 1, 1).to(out.dtype)
        sub = soft_blend(out[r], target.to(out.dtype), u)
        if rows is None:
            return sub
        out = out.clone()
        out[rows] = sub
        return out

    def __repr__(self):
        return (f"UniformAttention(sites={self.site_spec!r}, strength={self.strength}, keys={self.keys!r}, "
                f"mode={self.mode!r}, steps={self.steps!r}, branches={self.branches!r})")


def resolve_sites(all_sites, spec, mode: str = "auto") -> dict[str, str]:
    """{site name: "replace" | "share"} for a ``sites`` spec of :class:`UniformAttention`.

    ``"auto"``: every cross-attention site, or every joint / single-stream site when the model
    has no cross attention. A selector must name only cross / joint / single-stream sites.
    """
    from ..sites import select

    if isinstance(spec, str) and spec == "auto":
        chosen = [s for s in all_sites if s.kind == "cross"] or [s for s in all_sites if s.kind in ("joint", "single")]
        if not chosen:
            raise SelectorError("this model has no cross or joint attention: uniform attention maps need text keys")
    elif callable(spec) and not isinstance(spec, str):
        chosen = [s for s in all_sites if spec(s)]
    else:
        chosen = select(all_sites, spec)
    bad = [s for s in chosen if s.kind not in UNIFORM_KINDS]
    if bad:
        raise SelectorError(
            f"UniformAttention acts on cross-attention (or joint / single-stream) sites, whose keys hold the text; "
            f"{bad[0].name!r} is {bad[0].kind} attention ({len(bad)} such site(s) selected). Select cross sites "
            f"(sites='cross'), joint sites (sites='joint') or leave sites='auto'"
        )
    out = {}
    for s in chosen:
        m = mode if mode != "auto" else ("replace" if s.kind == "cross" else "share")
        if m == "replace" and s.kind != "cross":
            raise ControlError(
                f"mode='replace' at {s.name} ({s.kind} attention): its keys hold the image tokens too, and a uniform "
                f"map over them erases the image; use mode='share' (segment-uniform over the text keys) or 'auto'"
            )
        out[s.name] = m
    return out
