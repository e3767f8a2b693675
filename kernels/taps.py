"""Probability taps in Triton: exact attention probabilities of a query segment × a key subset.

``p_ij = exp(q_i·k_j·scale + b_ij - lse_i)`` with ``lse_i`` the row log-sum-exp over *all*
keys, returned by the main attention call. The kernel fuses the score tile, the bias and the
exponential, writing only the [B, H, Nq, Ns] result: memory is O(Nq·|subset|) and the
L×L matrix is never formed.

Backward (torch, O(Nq·Ns) like the output itself), with dS = dP ⊙ P:
``dq = scale·dS k``, ``dk = scale·dSᵀ q``, ``dlse = -Σ_j dS``, ``dbias = dS`` (reduced to the
bias' shape). A-STAR and DeContext differentiate their losses through these taps.

The launch is the ``torch.library`` custom op ``diffattn::attention_probs`` (fake
implementation and that backward registered), so torch.compile traces a tap as one node.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffattn.kernels.errors import KernelError
from diffattn.kernels.reference import default_scale
from diffattn.kernels.triton_attention import (
    LOG2E,
    _bias_tile,
    bias_view,
    block_d,
    dot_precision,
    is_interpreted,
    unsupported,
)


@triton.jit
def _probs_fwd(Q, K, LSE, BIAS, P,
               stride_qb, stride_qh, stride_qm, stride_qd,
               stride_kb, stride_kh, stride_kn, stride_kd,
               stride_lb, stride_lh, stride_lm,
               stride_bb, stride_bh, stride_bm, stride_bn,
               H, N_Q, N_S, qk_scale,
               BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of probabilities. Grid (cdiv(Nq, BM), cdiv(Ns, BN), B·H); P contiguous fp32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N_Q
    n_valid = offs_n < N_S
    d_valid = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_t = tl.load(K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                  mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=m_valid, other=0.0).to(tl.float32)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)  # fully masked rows: P = 0
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    s = _bias_tile(s, BIAS + b * stride_bb + h * stride_bh, offs_m, offs_n, stride_bm, stride_bn,
                   m_valid, n_valid, BIAS_KIND)
    p = tl.math.exp2(s - lse2[:, None])
    tl.store(P + pid_bh.to(tl.int64) * N_Q * N_S + offs_m[:, None].to(tl.int64) * N_S + offs_n[None, :], p,
             mask=m_valid[:, None] & n_valid[None, :])


def _block(nq: int, ns: int, d: int) -> tuple[int, int]:
    """Tile of the taps kernel: 64×64 (32×32 under the interpreter, 32 rows for wide heads)."""
    if is_interpreted():
        return 32, 32
    return (64 if d <= 128 else 32), 64


def probs_forward(q, k_subset, lse, *, scale, bias_subset=None, out=None, block=None):
    """Launch the taps kernel -> P [B, H, Nq, Ns] fp32 (``out`` may be preallocated, contiguous)."""
    B, H, Nq, D = q.shape
    Ns = k_subset.shape[2]
    out = torch.empty((B, H, Nq, Ns), dtype=torch.float32, device=q.device) if out is None else out
    if out.numel() == 0:
        return out
    bias_t, sb, kind = bias_view(bias_subset, (B, H, Nq, Ns), q.device)
    bm, bn = block or _block(Nq, Ns, D)
    grid = (triton.cdiv(Nq, bm), triton.cdiv(Ns, bn), B * H)
    _probs_fwd[grid](q, k_subset, lse, bias_t, out, *q.stride(), *k_subset.stride(), *lse.stride(), *sb,
                     H, Nq, Ns, scale * LOG2E, BIAS_KIND=kind,
                     DOT_PRECISION=dot_precision(q.dtype), HEAD_DIM=D,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(D))
    return out


def _reduce_to(grad: torch.Tensor, shape) -> torch.Tensor:
    """Sum a [B, H, Nq, Ns] gradient down to a broadcast input's ``shape``."""
    lead = grad.dim() - len(shape)
    grad = grad.sum(tuple(range(lead))) if lead > 0 else grad
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


@torch.library.custom_op(
    "diffattn::attention_probs", mutates_args=(),
    schema="(Tensor q, Tensor k_subset, Tensor lse, Tensor? bias_subset, float scale, int block_m, int block_n) -> Tensor")
def attention_probs_op(q, k_subset, lse, bias_subset, scale, block_m, block_n):
    """The taps kernel as an opaque op for torch.compile: P [B, H, Nq, Ns] fp32, contiguous."""
    return probs_forward(q, k_subset, lse, scale=scale, bias_subset=bias_subset,
                         block=None if block_m <= 0 else (block_m, block_n))


@attention_probs_op.register_fake
def _probs_fake(q, k_subset, lse, bias_subset, scale, block_m, block_n):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], k_subset.shape[2]), dtype=torch.float32)


def _probs_setup_context(ctx, inputs, output):
    q, k_subset, lse, bias_subset, scale, block_m, block_n = inputs
    ctx.save_for_backward(q, k_subset, output)
    ctx.scale = scale
    ctx.bias_shape = None if bias_subset is None else bias_subset.shape


def _probs_backward(ctx, dp):
    """Taps' torch backward (see module doc); gradients in q, k_subset, lse and a float bias."""
    q, k, p = ctx.saved_tensors
    ds = dp.float() * p  # [B, H, Nq, Ns]
    dq = dk = dlse = dbias = None
    if ctx.needs_input_grad[0]:
        dq = (torch.matmul(ds, k.float()) * ctx.scale).to(q.dtype)
    if ctx.needs_input_grad[1]:
        dk = (torch.matmul(ds.transpose(-1, -2), q.float()) * ctx.scale).to(k.dtype)
    if ctx.needs_input_grad[2]:
        dlse = -ds.sum(-1)
    if ctx.needs_input_grad[3]:
        dbias = _reduce_to(ds, ctx.bias_shape)
    return dq, dk, dlse, dbias, None, None, None


attention_probs_op.register_autograd(_probs_backward, setup_context=_probs_setup_context)


def attention_probs_triton(q, k_subset, lse, *, scale=None, bias_subset=None, block=None):
    """The Triton path of ``diffattn.kernels.attention_probs`` (inputs already validated): the
    ``diffattn::attention_probs`` custom op, differentiable in q, k_subset, lse and a float bias."""
    reason = unsupported(q, k_subset, k_subset)
    if reason is not None:
        raise KernelError(reason)
    scale = default_scale(q, scale)
    lse = lse.to(device=q.device, dtype=torch.float32)
    if bias_subset is not None and bias_subset.dtype == torch.bool:
        bias_subset = bias_subset.detach()
    bm, bn = (0, 0) if block is None else (int(block[0]), int(block[1]))
    return torch.ops.diffattn.attention_probs(q, k_subset, lse, bias_subset, scale, bm, bn)
