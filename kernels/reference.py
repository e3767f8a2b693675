"""Torch reference attention: the path every processor takes on CPU, and the ground truth
the Triton kernels are tested against.

With no extras the reference *is* ``F.scaled_dot_product_attention``, called exactly as the
stock diffusers processors call it, so attaching the engine changes no output bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Queries per chunk when the log-sum-exp is needed: bounds the score matrix to
# [B, H, QUERY_CHUNK, Nk] instead of [B, H, Nq, Nk].
QUERY_CHUNK = 1024


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale: ``scale`` or 1/sqrt(D), computed as SDPA does (not ``D ** -0.5``, which can differ by an ulp)."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _as_additive(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean mask (True = may attend) -> additive 0 / -inf bias; float bias unchanged."""
    if bias is None or bias.dtype != torch.bool:
        return bias
    return torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(~bias, float("-inf"))


def _bias_rows(bias: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Rows [start, stop) of a bias broadcastable to [B, H, Nq, Nk]."""
    if bias is None or bias.dim() < 2 or bias.shape[-2] == 1:
        return bias
    return bias[..., start:stop, :]


def attention_with_lse(q, k, v, *, scale: float, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias) v and the row log-sum-exp, chunked over queries.

    q: [B, H, Nq, D], k, v: [B, H, Nk, D] -> out [B, H, Nq, D] (q's dtype), lse [B, H, Nq] (fp32, or fp64 for fp64 inputs).
    Rows whose every key is masked get out = 0 and lse = -inf.
    """
    acc = torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 at least (fp64 stays fp64)
    bias = _as_additive(bias, acc)
    outs, lses = [], []
    for start in range(0, q.shape[-2], QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, q.shape[-2])
        scores = torch.matmul(q[..., start:stop, :].to(acc), k.to(acc).transpose(-1, -2)) * scale  # [B,H,c,Nk]
        b = _bias_rows(bias, start, stop)
        if b is not None:
            scores = scores + b.to(acc)
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, c]
        probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # fully masked rows -> 0
        outs.append(torch.matmul(probs, v.to(acc)).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _sdpa(q, k, v, bias, scale):
    """``F.scaled_dot_product_attention``; a bias that needs a gradient runs the math backend on
    CUDA, because the memory-efficient backward there fails on small broadcast masks
    ("LSE is not correctly aligned (strideH)", torch 2.11 on an H100)."""
    if bias is not None and bias.requires_grad and bias.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def attention_reference(q, k, v, *, scale=None, head_blend=None, bias=None, return_lse=False):
    """The reference path of ``diffattn.kernels.attention`` (arguments already validated)."""
    if return_lse:
        out, lse = attention_with_lse(q, k, v, scale=default_scale(q, scale), bias=bias)
    else:
        # exactly the stock processors' call (scale=None stays None: SDPA computes 1/sqrt(D) itself)
        out, lse = _sdpa(q, k, v, bias, scale), None
    if head_blend is not None:
        # SoftPAG in output space: (1-u)·A·V + u·I·V, per head (and per batch row for [B, H])
        u = head_blend if head_blend.dtype == out.dtype else head_blend.to(out.dtype)  # a no-op .to costs µs per call
        u = u.view(1, -1, 1, 1) if u.dim() == 1 else u.view(u.shape[0], u.shape[1], 1, 1)  # [B|1, H, 1, 1]
        # one fused pass (a GPU step is memory-bound here); torch.lerp switches to
        # v - (v - out)·(1 - u) for u >= 0.5, so it is exact at both ends: u=0 -> out, u=1 -> v
        out = torch.lerp(out, v, u)
    return (out, lse) if return_lse else out


def attention_probs_reference(q, k_subset, lse, *, scale=None, bias_subset=None) -> torch.Tensor:
    """Exact attention probabilities of queries × a key subset, from the full-row LSE.

    p_ij = exp(q_i·k_j·scale + b_ij - lse_i). q: [B, H, Nq, D], k_subset: [B, H, Ns, D],
    lse: [B, H, Nq] (over *all* keys of the original call) -> [B, H, Nq, Ns] fp32.
    Differentiable in q and k_subset (and lse) through plain torch ops.
    """
    scale = default_scale(q, scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k_subset.to(acc).transpose(-1, -2)) * scale  # [B, H, Nq, Ns]
    if bias_subset is not None:
        scores = scores + _as_additive(bias_subset, acc).to(acc)
    return torch.exp(scores - lse.to(acc).unsqueeze(-1))
