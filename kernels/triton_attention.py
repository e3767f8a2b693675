"""Fused attention in Triton: forward with identity blend, bias/mask and row LSE; backward.

One flash-attention-2 style forward (Dao 2023, Alg. 1; the Triton fused-attention tutorial):
a program owns ``BLOCK_M`` query rows of one (batch, head), keeps them on chip, and streams
the keys and values in tiles of ``BLOCK_N`` with an online softmax in base 2
(``exp2(s·log2 e)``). Everything diffattn's controls ask of the kernel rides on that loop:

- ``bias``: an additive float bias or a boolean mask (True = may attend, as SDPA), any shape
  broadcastable to [B, H, Nq, Nk]: it is expanded to stride-0 views, never materialised;
- ``head_blend`` u ([H] or [B, H]): the epilogue returns ``(1-u)·O + u·V`` (SoftPAG's blend
  toward the identity map, exact in output space; Nq == Nk);
- the row log-sum-exp ``lse`` [B, H, Nq] (fp32, natural log) is always written: it is what
  the backward and the probability taps (:mod:`diffattn.kernels.taps`) need.

Ragged tails (Nq, Nk not multiples of the tile) are masked; head dims up to 256 are padded to
a power of two (at least 16) with masked loads. Rows whose every key is masked give O = 0
and lse = -inf (SDPA would give NaN).

The backward recomputes the probabilities tile by tile from the saved lse (FA2): one kernel
for dK, dV (a program per key tile, looping over queries) and one for dQ (a program per
query tile). A gradient reaching ``lse`` folds into the usual ``delta`` term:
``dS = P ⊙ (dP - (rowsum(dO ⊙ O) - dlse))``. The blend's own gradients (``u·dO`` into dV,
``Σ dO ⊙ (V - O)`` into u) are O(N·D) torch ops. Gradients w.r.t. a float bias are not
computed here (they are an Nq×Nk tensor): ``diffattn.kernels.attention(backend="auto")``
then takes the torch reference.

The launches are ``torch.library`` custom ops, ``diffattn::attention`` (forward: out, lse and,
when a blend needs a gradient, the unblended output) and ``diffattn::attention_backward``, with
fake (meta) implementations and the autograd formula registered on the forward op: torch.compile
traces a call as one graph node (the Triton launch itself cannot be traced) and AOT autograd
differentiates it.

On CPU the kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` must be in the
environment before this module is imported (``@triton.jit`` decides at decoration time).
On CUDA the block sizes are autotuned; under the interpreter one small fixed tile is used.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from diffattn.kernels.errors import KernelError
from diffattn.kernels.reference import default_scale

try:  # where Triton keeps its interpreter (present in Triton >= 3.0)
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover - very old Triton
    _Interpreted = ()

LOG2E = 1.4426950408889634  # log2(e): softmax in base 2, as the tutorial
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

BIAS_NONE, BIAS_FLOAT, BIAS_BOOL = 0, 1, 2


# ----------------------------------------------------------------------------- device code


@triton.jit
def _bias_tile(s, bias_base, offs_m, offs_n, stride_bm, stride_bn, m_valid, n_valid, BIAS_KIND: tl.constexpr):
    """Add the bias tile to base-2 scores ``s`` [BLOCK_M, BLOCK_N] (float: + b·log2 e; bool: -inf where False)."""
    # int64 row offsets: an [L, L] bias passes 2**31 elements at L ~ 46k (video lengths)
    if BIAS_KIND == 1:
        b = tl.load(bias_base + offs_m[:, None].to(tl.int64) * stride_bm + offs_n[None, :] * stride_bn,
                    mask=m_valid[:, None] & n_valid[None, :], other=0.0)
        s = s + b.to(tl.float32) * 1.4426950408889634
    elif BIAS_KIND == 2:
        b = tl.load(bias_base + offs_m[:, None].to(tl.int64) * stride_bm + offs_n[None, :] * stride_bn,
                    mask=m_valid[:, None] & n_valid[None, :], other=1)
        s = tl.where(b != 0, s, float("-inf"))
    return s


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, offs_d, m_valid, d_valid, start_n,
              N_K, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, qk_scale,
              BIAS_KIND: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """One key/value tile of the online softmax (FA2 Alg. 1 lines 8-10, base 2)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N_K
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N] (k transposed)
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BLOCK_N, BLOCK_D]
    if MASK_N:
        k_t = tl.load(k_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
    elif EVEN_D:  # whole tile, head dim a power of two: unmasked loads
        k_t = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k_t = tl.load(k_ptrs, mask=d_valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 units
    s = _bias_tile(s, bias_base, offs_m, offs_n, stride_bm, stride_bn, m_valid, n_valid, BIAS_KIND)
    if MASK_N:
        s = tl.where(n_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: avoid -inf - -inf
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, O, O_RAW, LSE, BIAS, U,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_bb, stride_bh, stride_bm, stride_bn,
              stride_ub, stride_uh,
              H, N_Q, N_K, qk_scale,
              BIAS_KIND: tl.constexpr, BLEND: tl.constexpr, STORE_RAW: tl.constexpr,
              DOT_PRECISION: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B·H). O, O_RAW share strides; LSE is contiguous [B, H, Nq] fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N_Q
    d_valid = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # whole tiles: no key mask
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, offs_d, m_valid, d_valid,
                                  start_n, N_K, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                  qk_scale, BIAS_KIND, False, BLOCK_D == HEAD_DIM, DOT_PRECISION, BLOCK_N)
    if n_full < N_K:  # the ragged tail
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, offs_d, m_valid, d_valid,
                                  n_full, N_K, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                  qk_scale, BIAS_KIND, True, BLOCK_D == HEAD_DIM, DOT_PRECISION, BLOCK_N)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows -> O = 0
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # natural log
    tl.store(LSE + pid_bh * N_Q + offs_m, lse, mask=m_valid)

    o_off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    o_mask = m_valid[:, None] & d_valid[None, :]
    if STORE_RAW:
        tl.store(O_RAW + o_off, o.to(O_RAW.dtype.element_ty), mask=o_mask)
    if BLEND:  # SoftPAG: (1-u)·softmax(s)V + u·V, V taken at the query's own position (Nq == Nk)
        u = tl.load(U + b * stride_ub + h * stride_uh).to(tl.float32)
        v_q = tl.load(v_base + offs_m[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=o_mask, other=0.0)
        o = (1.0 - u) * o + u * v_q.to(tl.float32)  # exact at u=0 and u=1
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE2, DELTA, BIAS, DK, DV,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_ob, stride_oh, stride_om, stride_od,
                   stride_bb, stride_bh, stride_bm, stride_bn,
                   H, N_Q, N_K, qk_scale, sm_scale,
                   BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV of one key tile (FA2 Alg. 2, outer loop over keys). Grid (cdiv(Nk, BLOCK_N), B·H).

    DO has O's strides; LSE2 (base-2 lse, 0 for fully masked rows) and DELTA are contiguous
    [B, H, Nq] fp32; DK, DV are contiguous fp32 [B, H, Nk, D]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < N_K
    d_valid = offs_d < HEAD_DIM
    nd_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_ob + h * stride_oh
    bias_base = BIAS + b * stride_bb + h * stride_bh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < N_Q
        md_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=md_mask, other=0.0)
        lse2 = tl.load(LSE2 + pid_bh * N_Q + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + pid_bh * N_Q + offs_m, mask=m_valid, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = _bias_tile(s, bias_base, offs_m, offs_n, stride_bm, stride_bn, m_valid, n_valid, BIAS_KIND)
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(m_valid[:, None] & n_valid[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    out_off = pid_bh * N_K * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, dk * sm_scale, mask=nd_mask)
    tl.store(DV + out_off, dv, mask=nd_mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE2, DELTA, BIAS, DQ,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_ob, stride_oh, stride_om, stride_od,
                 stride_bb, stride_bh, stride_bm, stride_bn,
                 H, N_Q, N_K, qk_scale, sm_scale,
                 BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of one query tile (FA2 Alg. 2, dQ part). Grid (cdiv(Nq, BLOCK_M), B·H); DQ contiguous fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N_Q
    d_valid = offs_d < HEAD_DIM
    md_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)
    do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 mask=md_mask, other=0.0)
    lse2 = tl.load(LSE2 + pid_bh * N_Q + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + pid_bh * N_Q + offs_m, mask=m_valid, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N_K
        nd_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=nd_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _bias_tile(s, bias_base, offs_m, offs_n, stride_bm, stride_bn, m_valid, n_valid, BIAS_KIND)
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(m_valid[:, None] & n_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + pid_bh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq * sm_scale, mask=md_mask)


# ----------------------------------------------------------------------------- launch configs


_INTERPRETED = isinstance(_attn_fwd, _Interpreted) if _Interpreted else False


def is_interpreted() -> bool:
    """True when these kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU)."""
    return _INTERPRETED


def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# CUDA: autotuned per (lengths, head dim, features, dtypes); the list follows the tutorial's space.
# Candidates were compiled ahead of time for sm_90 (no GPU at hand): all use wgmma and cp.async
# pipelining; the ones that spilled registers at D=128 were dropped. Configs that do not fit
# in shared memory (fp32, D=256) are skipped by the autotuner; the last entry of each list is
# a small one that always fits.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                         (64, 128, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2)])
_DKDV_CONFIGS = _configs([(64, 64, 8, 2), (32, 64, 8, 2), (64, 64, 4, 2), (32, 128, 8, 2), (32, 32, 4, 2)])
_DQ_CONFIGS = _configs([(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 128, 8, 2), (32, 32, 4, 2)])
_KEY = ["N_Q", "N_K", "HEAD_DIM", "BIAS_KIND", "DOT_PRECISION"]

if not is_interpreted():
    _attn_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=_KEY + ["BLEND", "STORE_RAW"])(_attn_fwd)
    _attn_bwd_dkdv_tuned = triton.autotune(configs=_DKDV_CONFIGS, key=_KEY)(_attn_bwd_dkdv)
    _attn_bwd_dq_tuned = triton.autotune(configs=_DQ_CONFIGS, key=_KEY)(_attn_bwd_dq)

INTERPRETER_BLOCK = (32, 32)  # (BLOCK_M, BLOCK_N) under the interpreter


def _launch(kernel, tuned, grid_fn, block, args, consts):
    """Run ``kernel`` with an explicit (BLOCK_M, BLOCK_N) (tests, interpreter) or its autotuned twin."""
    if block is None and not is_interpreted():
        tuned[lambda meta: grid_fn(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts)
        return
    bm, bn = block or INTERPRETER_BLOCK
    kernel[grid_fn(bm, bn)](*args, BLOCK_M=bm, BLOCK_N=bn, **consts)


# ----------------------------------------------------------------------------- host helpers


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (``tl.dot`` needs K >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def unsupported(q, k, v, bias=None) -> str | None:
    """Why the Triton path cannot run these inputs, or None when it can."""
    if q.dtype not in DTYPES:
        return f"the Triton kernel supports {', '.join(str(d) for d in DTYPES)}, not {q.dtype}; use backend='torch'"
    if q.dtype == torch.bfloat16 and is_interpreted():
        return "Triton's CPU interpreter has no bfloat16; use float16/float32 or backend='torch'"
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"the Triton kernel supports head dims 1..{MAX_HEAD_DIM}, got {q.shape[-1]}; use backend='torch'"
    if v.shape[-1] != q.shape[-1]:
        return f"the Triton kernel needs v's head dim ({v.shape[-1]}) to equal q's ({q.shape[-1]}); use backend='torch'"
    if not (q.device == k.device == v.device):
        return f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
    if not q.is_cuda and not is_interpreted():
        return ("the Triton kernel on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 in the "
                "environment before diffattn.kernels.triton_attention is first imported, or use backend='torch'")
    if bias is not None and bias.requires_grad:
        return ("the Triton backward computes no gradient for a float bias (it would be Nq x Nk); "
                "use backend='torch' or detach the bias")
    return None


def bias_view(bias: torch.Tensor | None, shape, device):
    """(tensor, 4 strides, kind) for a bias broadcastable to ``shape`` = [B, H, Nq, Nk]; stride 0 on broadcast dims."""
    if bias is None:
        return torch.empty(1, device=device), (0, 0, 0, 0), BIAS_NONE
    kind = BIAS_BOOL if bias.dtype == torch.bool else BIAS_FLOAT
    if kind == BIAS_BOOL:
        bias = bias.view(torch.uint8)  # same bytes; Triton loads it as integers
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)  # [.., Nq, Nk] -> [1, .., Nq, Nk]
    bias = bias.expand(shape)  # stride 0 on broadcast dims: never materialised
    return bias, tuple(bias.stride()), kind


def blend_view(u: torch.Tensor | None, b: int, h: int, device):
    """(tensor, 2 strides) for head_blend [H] or [B, H] as a [B, H] fp32 view."""
    if u is None:
        return torch.empty(1, device=device), (0, 0)
    u = u.detach().to(device=device, dtype=torch.float32)
    u = u.view(1, h) if u.dim() == 1 else u  # [H] -> [1, H]
    u = u.expand(b, h)
    return u, tuple(u.stride())


def dot_precision(dtype) -> str:
    """Precision of fp32 dots, following torch's matmul setting: full fp32 ("ieee") by default,
    TF32 after ``torch.set_float32_matmul_precision("high")`` (ignored for fp16/bf16)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def forward(q, k, v, *, scale, head_blend=None, bias=None, store_raw=False, out=None, lse=None, out_raw=None,
            block=None):
    """Launch the fused forward. Returns (out [B,H,Nq,D] q.dtype, lse [B,H,Nq] fp32, out_raw or None).

    ``out``/``lse``/``out_raw`` may be preallocated (tests poison them to check every element
    is written); ``block`` = (BLOCK_M, BLOCK_N) pins the tile instead of autotuning.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device) if lse is None else lse
    if store_raw and out_raw is None:
        out_raw = torch.empty_like(out)
    bias_t, sb, kind = bias_view(bias, (B, H, Nq, Nk), q.device)
    u_t, su = blend_view(head_blend, B, H, q.device)
    args = (q, k, v, out, out_raw if store_raw else out, lse, bias_t, u_t,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *sb, *su,
            H, Nq, Nk, scale * LOG2E)
    consts = dict(BIAS_KIND=kind, BLEND=head_blend is not None, STORE_RAW=store_raw,
                  DOT_PRECISION=dot_precision(q.dtype), HEAD_DIM=D, BLOCK_D=block_d(D))
    _launch(_attn_fwd, _attn_fwd_tuned if not is_interpreted() else None,
            lambda bm, bn: (triton.cdiv(Nq, bm), B * H), block, args, consts)
    return out, lse, (out_raw if store_raw else None)


def backward(q, k, v, o_raw, lse, dout_attn, dlse, *, scale, bias=None, block=None):
    """Gradients of softmax attention (no blend) w.r.t. q, k, v (fp32). ``dout_attn`` is dL/dO of the
    unblended output; ``dlse`` is dL/dlse or None. Returns (dq, dk, dv) in fp32, contiguous."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dout_attn = dout_attn.to(q.dtype).contiguous()  # the dots take dO in the inputs' dtype (as FA2)
    o_raw = o_raw.contiguous()
    delta = (dout_attn.float() * o_raw.float()).sum(-1)  # [B, H, Nq]: rowsum(dO ⊙ O)
    if dlse is not None:
        delta = delta - dlse.float()  # a gradient on lse folds into delta
    delta = delta.contiguous()
    lse2 = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse * LOG2E).contiguous()  # fully masked rows -> P = 0
    dq = torch.empty((B, H, Nq, D), dtype=torch.float32, device=q.device)
    dk = torch.empty((B, H, Nk, D), dtype=torch.float32, device=q.device)
    dv = torch.empty((B, H, Nk, D), dtype=torch.float32, device=q.device)
    bias_t, sb, kind = bias_view(bias, (B, H, Nq, Nk), q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout_attn.stride(), *sb)
    tail = (H, Nq, Nk, scale * LOG2E, scale)
    consts = dict(BIAS_KIND=kind, DOT_PRECISION=dot_precision(q.dtype), HEAD_DIM=D, BLOCK_D=block_d(D))
    interp = is_interpreted()
    _launch(_attn_bwd_dkdv, None if interp else _attn_bwd_dkdv_tuned, lambda bm, bn: (triton.cdiv(Nk, bn), B * H),
            block, (q, k, v, dout_attn, lse2, delta, bias_t, dk, dv, *strides, *tail), consts)
    _launch(_attn_bwd_dq, None if interp else _attn_bwd_dq_tuned, lambda bm, bn: (triton.cdiv(Nq, bm), B * H),
            block, (q, k, v, dout_attn, lse2, delta, bias_t, dq, *strides, *tail), consts)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom ops and autograd
#
# The launches sit behind ``torch.library`` custom ops: torch.compile cannot trace a Triton
# launch (nor the interpreter), so the ops are opaque nodes of the graph, shaped by their fake
# (meta) implementations, and their autograd formulas are registered with them. Optional block
# sizes travel as ints (0 = autotune / the interpreter's tile).


def _block_args(block) -> tuple[int, int]:
    return (0, 0) if block is None else (int(block[0]), int(block[1]))


def _block_of(block_m: int, block_n: int):
    return None if block_m <= 0 else (block_m, block_n)


@torch.library.custom_op(
    "diffattn::attention", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? head_blend, Tensor? bias, float scale, bool store_raw, "
           "int block_m, int block_n) -> (Tensor, Tensor, Tensor)")
def attention_op(q, k, v, head_blend, bias, scale, store_raw, block_m, block_n):
    """The fused forward: ``(out [B,H,Nq,D] q.dtype, lse [B,H,Nq] fp32, out_raw)``; ``out_raw`` is the
    unblended output when ``store_raw`` (the backward of a blend needs it), else an empty tensor."""
    out, lse, out_raw = forward(q, k, v, scale=scale, head_blend=head_blend, bias=bias, store_raw=store_raw,
                                block=_block_of(block_m, block_n))
    return out, lse, (out_raw if store_raw else q.new_empty(0))


@attention_op.register_fake
def _attention_fake(q, k, v, head_blend, bias, scale, store_raw, block_m, block_n):
    out = q.new_empty(q.shape)  # contiguous, as the real op
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return out, lse, (q.new_empty(q.shape) if store_raw else q.new_empty(0))


@torch.library.custom_op(
    "diffattn::attention_backward", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor o_raw, Tensor lse, Tensor dout_attn, Tensor? dlse, Tensor? bias, "
           "float scale, int block_m, int block_n) -> (Tensor, Tensor, Tensor)")
def attention_backward_op(q, k, v, o_raw, lse, dout_attn, dlse, bias, scale, block_m, block_n):
    """:func:`backward` as an op: (dq, dk, dv) fp32, contiguous."""
    return backward(q, k, v, o_raw, lse, dout_attn, dlse, scale=scale, bias=bias, block=_block_of(block_m, block_n))


@attention_backward_op.register_fake
def _attention_backward_fake(q, k, v, o_raw, lse, dout_attn, dlse, bias, scale, block_m, block_n):
    f32 = torch.float32
    return q.new_empty(q.shape, dtype=f32), k.new_empty(k.shape, dtype=f32), v.new_empty(v.shape, dtype=f32)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, head_blend, bias, scale, store_raw, block_m, block_n = inputs
    out, lse, out_raw = output
    blend = head_blend is not None
    ctx.save_for_backward(q, k, v, out_raw if blend else out, lse, head_blend, bias)
    ctx.scale, ctx.block = scale, (block_m, block_n)
    ctx.raw_ok = store_raw or not blend


def _attention_backward(ctx, dout, dlse, dout_raw):
    """softmax(q kᵀ·scale + bias) v, blended toward v by u: gradients in q, k, v, u (see the module doc)."""
    q, k, v, o_raw, lse, u, bias = ctx.saved_tensors
    if not ctx.raw_ok:
        raise KernelError("the backward of a head blend needs the unblended output: call diffattn::attention "
                          "with store_raw=True (attention_triton does when a gradient is needed)")
    B, H = q.shape[:2]
    du = None
    dout = dout.float() if dout is not None else torch.zeros(o_raw.shape, device=q.device)
    if u is not None:
        u4 = u.float().view(1, H, 1, 1) if u.dim() == 1 else u.float().view(B, H, 1, 1)  # [B|1, H, 1, 1]
        if ctx.needs_input_grad[3]:
            du = (dout * (v.float() - o_raw.float())).sum((-1, -2))  # [B, H]: d/du of (1-u)O + uV
            du = (du.sum(0) if u.dim() == 1 else du).to(u.dtype)
        dout_attn = dout * (1.0 - u4)
    else:
        dout_attn = dout
    dq, dk, dv = torch.ops.diffattn.attention_backward(q, k, v, o_raw, lse, dout_attn, dlse, bias, ctx.scale,
                                                       *ctx.block)
    if u is not None:
        dv = dv + u4 * dout  # identity part: V at the query's own position (Nq == Nk)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), du, None, None, None, None, None


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention_triton(q, k, v, *, scale=None, head_blend=None, bias=None, return_lse=False, block=None):
    """The Triton path of ``diffattn.kernels.attention`` (inputs already validated by the dispatcher).

    Runs the ``diffattn::attention`` custom op (differentiable in q, k, v, head_blend; traced by
    torch.compile as one node). Raises :class:`KernelError` when the inputs need the torch
    reference (see :func:`unsupported`).
    """
    reason = unsupported(q, k, v, bias)
    if reason is not None:
        raise KernelError(reason)
    scale = default_scale(q, scale)
    if q.numel() == 0:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    if head_blend is not None and head_blend.device != q.device:
        head_blend = head_blend.to(q.device)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, head_blend))
    out, lse, _ = torch.ops.diffattn.attention(q, k, v, head_blend, bias, scale, grad and head_blend is not None,
                                               *_block_args(block))
    return (out, lse) if return_lse else out
