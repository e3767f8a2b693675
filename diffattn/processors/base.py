"""What every diffattn processor shares: build the call, run the controls, one kernel call."""
from __future__ import annotations

import torch

from ..controls import AttentionCall, StepState
from ..kernels import attention, attention_probs
from ..layout import TokenLayout


class DiffattnProcessor:
    """Base of the per-family processors. One instance per site (controls carry state).

    ``engine`` supplies the forward context (step, branches, latent size, text length);
    ``controls`` are this site's controls in their defined order.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, engine, site, controls):
        self.engine = engine
        self.site = site
        self.controls = list(controls)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout_fn, bias=None) -> torch.Tensor:
        """Attention of [B, H, N, D] tensors through the active controls -> [B, H, Nq, D].

        ``layout_fn()`` builds the TokenLayout lazily: the stock fast path (no active
        control) never pays for it.
        """
        ctx = self.engine.context
        step = ctx.step if ctx is not None else StepState()
        active = self.controls
        if active:
            probe = _StepOnly(step)
            active = [c for c in active if c.is_active(probe)]
        if not active:
            return attention(q, k, v, bias=bias)

        layout: TokenLayout = layout_fn()
        branches = ctx.branches if ctx is not None else {"cond": slice(0, q.shape[0])}
        call = AttentionCall(site=self.site, layout=layout, q=q, k=k, v=v, step=step, branches=branches)
        call.spec.bias = bias
        for c in active:
            c.edit_qkv(call)
        for c in active:
            c.edit_spec(call)
        out = self._kernel(call)
        for tap in call.taps:
            self._run_tap(call, tap)
        for c in active:
            out = c.edit_output(call, out)
        return out

    def _kernel(self, call: AttentionCall) -> torch.Tensor:
        spec = call.spec
        need_lse = spec.return_lse or bool(call.taps)
        if spec.uniform_keys is not None:
            out, lse = _segment_uniform(call)
        elif need_lse:
            out, lse = attention(call.q, call.k, call.v, scale=call.scale, head_blend=spec.head_blend, bias=spec.bias, return_lse=True)
        else:
            out, lse = attention(call.q, call.k, call.v, scale=call.scale, head_blend=spec.head_blend, bias=spec.bias), None
        call.lse = lse
        return out

    @staticmethod
    def _run_tap(call: AttentionCall, tap) -> None:
        qs, ks = call.layout.q(tap.query), call.layout.k(tap.key)
        rows = call.rows(tap.branches)
        heads = slice(None) if tap.heads is None else tap.heads
        q = call.q[rows][:, heads, qs.slice]  # [B', H', Nq_seg, D]
        k = call.k[rows][:, heads, ks.slice]  # [B', H', Ns, D]
        if tap.key_index is not None:
            k = k[:, :, tap.key_index]
        lse = call.lse[rows][:, heads, qs.slice]  # [B', H', Nq_seg]
        bias = None
        if call.spec.bias is not None:
            full = call.spec.bias.expand(call.q.shape[0], call.q.shape[1], call.q.shape[2], call.k.shape[2])
            bias = full[rows][:, heads, qs.slice, ks.slice]
            if tap.key_index is not None:
                bias = bias[..., tap.key_index]
        tap.callback(call, attention_probs(q, k, lse, scale=call.scale, bias_subset=bias))


class _StepOnly:
    """The part of a call ``Control.is_active`` may look at before the call is built."""

    __slots__ = ("step",)

    def __init__(self, step):
        self.step = step


def _segment_uniform(call: AttentionCall):
    """Attention where one key segment's share of each row is spread uniformly over it (UAM).

    Exact, from log-sum-exps, without the L×L map: with L_s over the segment's keys and
    L_r over the rest, the segment's share is p_s = σ(L_s - L_r), and
        out = (1 - p_s)·attention(q, K_rest, V_rest) + p_s·mean(V_seg).
    When the segment is every key, out = mean(V) and no scores are computed at all.
    Only rows in ``spec.uniform_rows`` (default all) are changed.
    """
    spec = call.spec
    seg = call.layout.k(spec.uniform_keys)
    q, k, v = call.q, call.k, call.v
    nk = k.shape[-2]
    mean_v = v[:, :, seg.slice].mean(-2, keepdim=True)  # [B, H, 1, D]
    if len(seg) == nk and spec.uniform_rows is None and spec.head_blend is None and spec.bias is None:
        return mean_v.expand(q.shape[:-1] + (v.shape[-1],)).contiguous(), None
    out_full, lse_full = attention(q, k, v, scale=call.scale, head_blend=spec.head_blend, bias=spec.bias, return_lse=True)
    rest = torch.ones(nk, dtype=torch.bool, device=k.device)
    rest[seg.slice] = False
    scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
    seg_scores = torch.matmul(q.float(), k[:, :, seg.slice].float().transpose(-1, -2)) * scale  # [B,H,Nq,Ns]
    if spec.bias is not None:
        full = spec.bias.expand(q.shape[0], q.shape[1], q.shape[2], nk)
        b = full[..., seg.slice]
        seg_scores = seg_scores + (torch.where(b, 0.0, float("-inf")) if b.dtype == torch.bool else b.float())
    lse_seg = torch.logsumexp(seg_scores, dim=-1)  # [B, H, Nq]
    if rest.any():
        b_rest = None if spec.bias is None else spec.bias.expand(q.shape[0], q.shape[1], q.shape[2], nk)[..., rest]
        out_rest, lse_rest = attention(q, k[:, :, rest], v[:, :, rest], scale=call.scale, bias=b_rest, return_lse=True)
        p_seg = torch.sigmoid(lse_seg - lse_rest).unsqueeze(-1).to(q.dtype)  # [B, H, Nq, 1]
        out_u = (1 - p_seg) * out_rest + p_seg * mean_v
    else:
        out_u = mean_v.expand_as(out_full)
    if spec.head_blend is not None:
        u = spec.head_blend.to(out_u.dtype).view(*spec.head_blend.shape[:2], 1, 1)
        out_u = out_u + u * (v - out_u)
    if spec.uniform_rows is not None:
        rows = spec.uniform_rows.view(-1, 1, 1, 1)
        out_u = torch.where(rows, out_u, out_full)
    return out_u, lse_full
