"""Exact composites built from :func:`diffattn.kernels.attention` calls and their row LSEs.

- :func:`merge_lse`: two partial attentions over disjoint key sets -> the attention over their
  union (the log-sum-exp merge of flash-decoding / ring attention).
- :func:`uniform_keys_attention`: uniform logits over a key subset S, keeping each row's share
  of S (UAM), from two kernel calls and a mean: no L×L map.
- :func:`segment_uniform_attention`: the same for some batch rows and heads only (what a
  :class:`~diffattn.kernels.spec.SegmentUniform` asks for), with the head blend on top.
- :func:`blend_heads`: ``(1-u)·out + u·v`` per head (SoftPAG's output-space blend).
"""
from __future__ import annotations

import torch

from diffattn.kernels import attention
from diffattn.kernels.spec import SegmentUniform

__all__ = ["blend_heads", "merge_lse", "segment_uniform_attention", "uniform_keys_attention"]


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attentions over two disjoint key sets A and B into the attention over A ∪ B.

    out_*: [B, H, Nq, D] (softmax-normalised over its own keys), lse_*: [B, H, Nq] ->
    ``(out, lse)`` with lse = logaddexp(lse_a, lse_b) and
    out = out_a + exp(lse_b - lse)·(out_b - out_a) (= the two outputs weighted by their shares).
    A row with no key in B (lse_b = -inf) keeps out_a; a row with no key in either gets weight 0.
    out is in out_a's dtype.
    """
    lse = torch.logaddexp(lse_b, lse_a)
    w_b = torch.exp(lse_b - lse).nan_to_num(0.0).unsqueeze(-1).to(out_a.dtype)  # [B, H, Nq, 1]
    return out_a + w_b * (out_b - out_a), lse


def blend_heads(out: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(1 - u)·out + u·v per head: u ``[H]`` or ``[B, H]``; exact at u = 0 and u = 1."""
    u = u.to(out.dtype)
    u = u.view(1, -1, 1, 1) if u.dim() == 1 else u.view(u.shape[0], u.shape[1], 1, 1)  # [B|1, H, 1, 1]
    return torch.lerp(out, v, u)


def _key_columns(bias: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """Columns ``index`` of a bias broadcastable to ``[B, H, Nq, Nk]``."""
    if bias is None or bias.shape[-1] == 1:
        return bias
    return bias.index_select(-1, index)


def uniform_keys_attention(q, k, v, index: torch.Tensor, *, scale=None, bias=None, need_lse: bool = True,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
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
        uni = attention(torch.zeros_like(q), k_s, v_s, bias=b_s, backend=backend).nan_to_num(0.0)  # rows with no allowed key in S
    if idx_r.numel() == 0:
        out = uni.expand(q.shape[:-1] + (v.shape[-1],)).contiguous()  # [B, H, Nq, D]
        lse_s = attention(q, k_s, v_s, scale=scale, bias=b_s, return_lse=True, backend=backend)[1] if need_lse else None
        return out, lse_s
    _, lse_s = attention(q, k_s, v_s, scale=scale, bias=b_s, return_lse=True, backend=backend)  # [B, H, Nq]
    b_r = _key_columns(bias, idx_r)
    out_r, lse_r = attention(q, k.index_select(2, idx_r), v.index_select(2, idx_r), scale=scale, bias=b_r,
                             return_lse=True, backend=backend)
    # the uniform part over S carries S's original share: an LSE merge of (R, lse_R) and (uni, lse_S)
    return merge_lse(out_r, lse_r, uni, lse_s)


def segment_uniform_attention(q, k, v, uniform: SegmentUniform, *, scale=None, head_blend=None, bias=None,
                              need_lse: bool = False,
                              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Segment-uniform attention for ``uniform.rows`` × ``uniform.heads`` (plain attention elsewhere),
    then the head blend. Returns ``(out [B, H, Nq, D], lse [B, H, Nq] or None)``; lse (when
    ``need_lse``) is the row LSE of the unedited scores, as the plain kernel gives it.

    With neither rows nor heads the whole batch takes :func:`uniform_keys_attention`; otherwise
    the plain kernel runs for everything and the uniform version for the chosen rows, kept on
    the chosen heads.
    """
    index, rows, heads = uniform.index, uniform.rows, uniform.heads
    if rows is None and heads is None:
        out, lse = uniform_keys_attention(q, k, v, index, scale=scale, bias=bias, need_lse=need_lse, backend=backend)
        if head_blend is not None:
            out = blend_heads(out, v, head_blend)
        return out, (lse if need_lse else None)
    # only some rows / heads: the plain kernel for everything, the uniform version for those rows
    lse = None
    if need_lse:
        out, lse = attention(q, k, v, scale=scale, head_blend=head_blend, bias=bias, return_lse=True, backend=backend)
    else:
        out = attention(q, k, v, scale=scale, head_blend=head_blend, bias=bias, backend=backend)
    rows = rows if rows is not None else torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    if not bool(rows.any()):
        return out, lse
    if bias is not None and bias.dim() == 4 and bias.shape[0] == q.shape[0]:
        bias = bias[rows]
    out_u, _ = uniform_keys_attention(q[rows], k[rows], v[rows], index, scale=scale, bias=bias, need_lse=False,
                                      backend=backend)
    if head_blend is not None:
        hb = head_blend if head_blend.dim() == 1 else head_blend[rows]
        out_u = blend_heads(out_u, v[rows], hb)
    if heads is not None:
        out_u = torch.where(heads.view(1, -1, 1, 1), out_u, out[rows])  # [b, H, Nq, D]
    out = out.clone()
    out[rows] = out_u
    return out, lse
