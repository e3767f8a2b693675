"""What every diffattn processor shares: build the call, run the controls, one kernel call.

The per-family processors mirror the stock diffusers processors line by line (projections,
q/k-norm, RoPE, masks, output projections). Between the projections and the output
projection they either run the stock attention directly (*fast path*: the site has no
control) or build an :class:`~diffattn.controls.AttentionCall` and hand it to
:func:`run_controls`, which applies the controls in their defined order around one call of
``diffattn.kernels.attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..controls import AttentionCall, StepState, UniformKeys
from ..errors import ControlError
from ..kernels import attention, attention_probs


class DiffattnProcessor:
    """Base of the per-family processors. One instance per site (controls may keep state).

    ``engine`` supplies the per-forward context (step, branches, latent grid, text length);
    ``controls`` are this site's controls in their defined order (ascending ``order``).
    """

    _attention_backend = None
    _parallel_config = None
    family = ""

    def __init__(self, engine, site, controls=()):
        self.engine = engine
        self.site = site
        self.controls = tuple(controls)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout_fn, *, bias=None,
               part: str = "main", parallel_config=None) -> torch.Tensor:
        """Attention of ``[B, H, N, D]`` tensors through this site's active controls -> ``[B, H, Nq, D]``.

        ``layout_fn()`` builds the TokenLayout lazily: calls where no control looks at the
        layout never pay for it. When no control is active the stock attention runs
        (:meth:`plain`).
        """
        ctx = self.engine.context if self.engine is not None else None
        call = AttentionCall(self.site, layout_fn, q, k, v, ctx.step if ctx is not None else StepState(),
                             ctx.branches if ctx is not None else None, part=part, context=ctx)
        call.spec.bias = bias
        active = [c for c in self.controls if c.is_active(call)]
        if not active:
            return self.plain(q, k, v, bias, parallel_config)
        return run_controls(call, active)

    def plain(self, q, k, v, bias=None, parallel_config=None) -> torch.Tensor:
        """The stock attention of this family on ``[B, H, N, D]``: SDPA (UNet, SD3)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)

    def _kernel(self, call: AttentionCall) -> torch.Tensor:
        return run_kernel(call)

    def __repr__(self):
        return f"<{type(self).__name__} {self.site.name if self.site is not None else '?'}: {len(self.controls)} controls>"


# ----------------------------------------------------------------------------- the flow


def run_controls(call: AttentionCall, active) -> torch.Tensor:
    """The defined order (``diffattn.controls``): q/k/v edits, spec edits (ascending order),
    the kernel, taps, output edits (descending order)."""
    shape = call.q.shape
    for c in active:
        c.edit_qkv(call)
    if call.q.shape != shape:
        raise ControlError(
            f"edit_qkv changed q from {tuple(shape)} to {tuple(call.q.shape)} at {call.site.name}; keep the queries' "
            f"shape (extend keys with call.extend_keys)"
        )
    for c in active:
        n = len(call.taps)
        c.edit_spec(call)
        for tap in call.taps[n:]:
            if tap.owner is None:
                tap.owner = c
    out = run_kernel(call)
    if call.taps:
        run_taps(call)
    for c in reversed(active):
        out = c.edit_output(call, out)
    return out


def run_kernel(call: AttentionCall) -> torch.Tensor:
    """``diffattn.kernels.attention`` with the call's spec; sets ``call.lse`` when asked for."""
    spec = call.spec
    need_lse = spec.return_lse or bool(call.taps)
    uk = spec.uniform_keys
    if uk is None:
        if need_lse:
            out, call.lse = attention(call.q, call.k, call.v, scale=call.scale, head_blend=spec.head_blend,
                                      bias=spec.bias, return_lse=True)
        else:
            out = attention(call.q, call.k, call.v, scale=call.scale, head_blend=spec.head_blend, bias=spec.bias)
        return out
    if isinstance(uk, str):
        uk = spec.uniform_keys = UniformKeys(uk)
    return _uniform_call(call, uk, need_lse)


def run_taps(call: AttentionCall) -> None:
    """Compute every requested tap from the call's row LSE and deliver it."""
    layout, q_all, k_all, lse_all = call.layout, call.q, call.k, call.lse
    per_owner: dict[int, tuple[object, list]] = {}
    for tap in call.taps:
        qs = layout.q(tap.query).slice if tap.query is not None else slice(None)
        ks = layout.k(tap.key).slice if tap.key is not None else slice(None)
        rows = None if tap.branches is None else call.rows(tap.branches)
        heads = slice(None) if tap.heads is None else list(tap.heads)

        def pick(x, *, keys=False):
            x = x if rows is None else x[rows]
            x = x[:, heads]
            if x.dim() == 3:  # lse [B, H, Nq]
                return x[:, :, qs]
            return x[:, :, ks] if keys else x[:, :, qs]

        q, k, lse = pick(q_all), pick(k_all, keys=True), pick(lse_all)  # [B', H', Nq_seg, D], [B', H', Ns, D], [B', H', Nq_seg]
        if tap.key_index is not None:
            idx = torch.as_tensor(tap.key_index, dtype=torch.long, device=k.device)
            k = k.index_select(2, idx)
        bias = None
        if call.spec.bias is not None:
            bias = _bias_for(call.spec.bias, call.q.shape[0], rows, heads, qs, ks)
            if tap.key_index is not None and bias.shape[-1] != 1:
                bias = bias.index_select(-1, idx)
        with torch.set_grad_enabled(tap.requires_grad and torch.is_grad_enabled()):
            probs = attention_probs(q, k, lse, scale=call.scale, bias_subset=bias)
        if not tap.requires_grad:
            probs = probs.detach()
        if tap.callback is not None:
            tap.callback(call, probs)
        if tap.store is not None:
            tap.store.append(probs)
        if tap.owner is not None:
            per_owner.setdefault(id(tap.owner), (tap.owner, []))[1].append(probs)
    for owner, probs in per_owner.values():
        owner.on_taps(call, probs)


def _bias_for(bias: torch.Tensor, batch: int, rows, heads, qs: slice, ks: slice) -> torch.Tensor:
    """The part of a bias broadcastable to ``[B, H, Nq, Nk]`` for some rows, heads, queries, keys
    (broadcast dimensions of size 1 stay size 1)."""
    b = bias
    while b.dim() < 4:
        b = b.unsqueeze(0)  # [.., Nq|1, Nk|1] -> [1, 1, Nq|1, Nk|1]
    if rows is not None and b.shape[0] == batch:
        b = b[rows]
    if b.shape[1] != 1:
        b = b[:, heads]
    if b.shape[2] != 1:
        b = b[:, :, qs]
    if b.shape[3] != 1:
        b = b[:, :, :, ks]
    return b


# ----------------------------------------------------------------------------- uniform keys


def _key_columns(bias: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """Columns ``index`` of a bias broadcastable to ``[B, H, Nq, Nk]``."""
    if bias is None or bias.shape[-1] == 1:
        return bias
    return bias.index_select(-1, index)


def uniform_keys_attention(q, k, v, index: torch.Tensor, *, scale=None, bias=None,
                           need_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention where the key subset ``index`` gets uniform logits, exactly, without L×L.

    With S = ``index`` and R the other keys (UAM; the share of S is kept):
        lse_S, lse_R = log-sum-exp of the scores over S and over R (from the kernel),
        p_S = exp(lse_S - logaddexp(lse_S, lse_R)),
        O = (1 - p_S)·softmax(q K_R^T + b_R)V_R + p_S·softmax(b_S)V_S.
    softmax(b_S)V_S is mean(V_S) without a bias. Returns ``(O [B, H, Nq, D], lse_all [B, H, Nq])``
    where lse_all is the row LSE of the *unedited* scores (what taps use). When every key is
    in S and ``need_lse`` is False no score is computed at all (O(N): mean(V)) and lse is None.
    """
    nk = k.shape[-2]
    in_s = torch.zeros(nk, dtype=torch.bool, device=k.device)
    in_s[index] = True
    idx_s = in_s.nonzero().flatten()
    idx_r = (~in_s).nonzero().flatten()
    k_s, v_s = k.index_select(2, idx_s), v.index_select(2, idx_s)  # [B, H, Ns, D]
    b_s = _key_columns(bias, idx_s)
    if b_s is None:
        uni = v_s.mean(dim=2, keepdim=True)  # [B, H, 1, D]
    else:  # uniform logits plus the bias: zero queries give zero scores
        uni = attention(torch.zeros_like(q), k_s, v_s, bias=b_s).nan_to_num(0.0)  # rows with no allowed key in S
    if idx_r.numel() == 0:
        out = uni.expand(q.shape[:-1] + (v.shape[-1],)).contiguous()  # [B, H, Nq, D]
        lse_s = attention(q, k_s, v_s, scale=scale, bias=b_s, return_lse=True)[1] if need_lse else None
        return out, lse_s
    _, lse_s = attention(q, k_s, v_s, scale=scale, bias=b_s, return_lse=True)  # [B, H, Nq]
    b_r = _key_columns(bias, idx_r)
    out_r, lse_r = attention(q, k.index_select(2, idx_r), v.index_select(2, idx_r), scale=scale, bias=b_r, return_lse=True)
    lse_all = torch.logaddexp(lse_s, lse_r)
    p_s = torch.exp(lse_s - lse_all).nan_to_num(0.0).unsqueeze(-1).to(out_r.dtype)  # [B, H, Nq, 1]
    out = out_r + p_s * (uni - out_r)
    return out, lse_all


def _uniform_call(call: AttentionCall, uk: UniformKeys, need_lse: bool) -> torch.Tensor:
    q, k, v, spec = call.q, call.k, call.v, call.spec
    if isinstance(uk.keys, str):
        seg = call.layout.k(uk.keys)
        index = torch.arange(seg.start, seg.stop, device=k.device)
    else:
        index = torch.as_tensor(uk.keys, dtype=torch.long, device=k.device)
    heads = None
    if uk.heads is not None:
        heads = uk.heads if torch.is_tensor(uk.heads) and uk.heads.dtype == torch.bool else call.head_mask(list(uk.heads))
    if uk.rows is None and heads is None:
        out, lse = uniform_keys_attention(q, k, v, index, scale=call.scale, bias=spec.bias, need_lse=need_lse)
        if spec.head_blend is not None:
            out = _blend(out, v, spec.head_blend)
        call.lse = lse if need_lse else None
        return out
    # only some rows / heads: the plain kernel for everything, the uniform version for those rows
    if need_lse:
        out, call.lse = attention(q, k, v, scale=call.scale, head_blend=spec.head_blend, bias=spec.bias, return_lse=True)
    else:
        out = attention(q, k, v, scale=call.scale, head_blend=spec.head_blend, bias=spec.bias)
    rows = uk.rows if uk.rows is not None else torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    if not bool(rows.any()):
        return out
    bias = spec.bias
    if bias is not None and bias.dim() == 4 and bias.shape[0] == q.shape[0]:
        bias = bias[rows]
    out_u, _ = uniform_keys_attention(q[rows], k[rows], v[rows], index, scale=call.scale, bias=bias, need_lse=False)
    if spec.head_blend is not None:
        hb = spec.head_blend if spec.head_blend.dim() == 1 else spec.head_blend[rows]
        out_u = _blend(out_u, v[rows], hb)
    if heads is not None:
        out_u = torch.where(heads.view(1, -1, 1, 1), out_u, out[rows])  # [b, H, Nq, D]
    out = out.clone()
    out[rows] = out_u
    return out


def _blend(out: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(1 - u)·out + u·v per head: u ``[H]`` or ``[B, H]``."""
    u = u.to(out.dtype)
    u = u.view(1, -1, 1, 1) if u.dim() == 1 else u.view(u.shape[0], u.shape[1], 1, 1)  # [B|1, H, 1, 1]
    return torch.lerp(out, v, u)  # exact at u = 0 and u = 1
