"""Block-sparse attention forward in Triton: a loop over the LUT only, rectification in the epilogue.

The flash-attention-2 forward of :mod:`diffattn.kernels.triton_attention` (one program owns
``BLOCK_M`` query rows of one (batch, head), online softmax in base 2), restricted to the key
blocks a :class:`~diffattn.kernels.BlockSparsePlan` selects for the query block those rows lie
in. The key loop runs ``for i in range(counts[b, h, qb])`` over the compact LUT: it loads a
key-block index and streams that block's tiles (``block_k / BLOCK_N`` of them) through the
same tile function as the dense kernel (:func:`diffattn.kernels.triton_attention._fwd_tile`).
Unselected blocks cost nothing: no mask is read and no branch is taken per block, unlike a
scan over every block with an ``if`` (Rectified SpaAttn's kernel, note §1.5), so the K/V
loads pipeline as in the dense kernel and the trip count is the number of selected blocks.

The epilogue fuses Rectified SpaAttn's rectification (Liu et al. 2025, §1.2 step 9):
``out = R_b · acc / l + comp_b`` with R_b (``plan.rescale``) and comp_b (``plan.comp``, a
[D] vector) of the program's query block, so O is written once (no extra read/write of O,
no [B, H, S, D] ``repeat_interleave``). The row log-sum-exp of the selected keys (natural log,
fp32) is always written; rows with no selected key give out = comp, lse = -inf.

A per-row key mask (``key_mask`` bool [B|1, H|1, Nk], e.g. HunyuanVideo's padded text when a
batch's prompts differ in length) rides on the dense kernel's boolean-bias tile
(:func:`diffattn.kernels.triton_attention._bias_tile`) with a zero query stride: the tile's
masked keys get -inf before the online softmax, inside the selected blocks only.

Tiles: ``BLOCK_M`` divides ``block_q`` and ``BLOCK_N`` divides ``block_k`` (powers of two,
at least 16: ``tl.dot``'s minimum), so a program never straddles two query blocks and a tile
never straddles two key blocks; :func:`unsupported` says when a plan's block sizes do not
allow that. On CUDA the tile is autotuned per block sizes; under ``TRITON_INTERPRET=1`` (CPU)
one small tile runs (fp16 / fp32; the interpreter has no bf16).

The launch is a ``torch.library`` custom op (``diffattn::block_sparse_attention``) with a fake
implementation, so torch.compile traces it as one node. Forward only: ``diffattn.kernels.
attention`` sends calls that need a gradient to the masked reference.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from diffattn.kernels.reference import default_scale
from diffattn.kernels.sparse import MIN_TILE
from diffattn.kernels.triton_attention import (
    BIAS_BOOL,
    BIAS_NONE,
    DTYPES,
    LOG2E,
    MAX_HEAD_DIM,
    _configs,
    _fwd_tile,
    block_d,
    dot_precision,
    is_interpreted,
)

MAX_TILE = 128
INTERPRETER_TILE = 32


@triton.jit
def _sparse_fwd(Q, K, V, O, LSE, LUT, CNT, RS, CP, KM,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_om, stride_od,
                stride_lb, stride_lh, stride_lq, stride_ls,
                stride_cb, stride_ch, stride_cq,
                stride_rb, stride_rh, stride_rq,
                stride_pb, stride_ph, stride_pq, stride_pd,
                stride_mb, stride_mh, stride_mn,
                H, N_Q, N_K, qk_scale,
                BQ: tl.constexpr, BK: tl.constexpr, RESCALE: tl.constexpr, COMP: tl.constexpr,
                KEY_MASK: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B·H). LUT [B, H, NQ, W] int32 (compact), CNT [B, H, NQ] int32,
    RS [B, H, NQ] and CP [B, H, NQ, D] fp32, KM [B, H, Nk] uint8 (the key mask's bytes; stride 0
    on broadcast dims); LSE contiguous [B, H, Nq]. KEY_MASK: 0 none, 2 (BIAS_BOOL) a key mask."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qb = (pid_m * BLOCK_M) // BQ  # the query block of every row of this program (BLOCK_M divides BQ)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N_Q
    d_valid = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    km_base = KM + b * stride_mb + h * stride_mh  # the bias tile with a zero query stride: one row per (b, h)
    lut_base = LUT + b * stride_lb + h * stride_lh + qb * stride_lq
    n_sel = tl.load(CNT + b * stride_cb + h * stride_ch + qb * stride_cq)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i in range(0, n_sel):  # the selected key blocks only
        kb = tl.load(lut_base + i * stride_ls)
        for j in tl.static_range(BK // BLOCK_N):  # the tiles of that block
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, km_base, offs_m, offs_d, m_valid, d_valid,
                                      kb * BK + j * BLOCK_N, N_K, stride_kn, stride_kd, stride_vn, stride_vd, 0,
                                      stride_mn, qk_scale, KEY_MASK, MASK_N, BLOCK_D == HEAD_DIM, DOT_PRECISION,
                                      BLOCK_N)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows with no selected key -> acc / l = 0
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # natural log
    tl.store(LSE + pid_bh * N_Q + offs_m, lse, mask=m_valid)
    if RESCALE:  # Rectified SpaAttn: out = R_b · acc / l + comp_b
        r = tl.load(RS + b * stride_rb + h * stride_rh + qb * stride_rq)
        o = o * r
    if COMP:
        c = tl.load(CP + b * stride_pb + h * stride_ph + qb * stride_pq + offs_d * stride_pd, mask=d_valid, other=0.0)
        o = o + c[None, :]
    o_mask = m_valid[:, None] & d_valid[None, :]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=o_mask)


# ----------------------------------------------------------------------------- host side


def _tile(block: int, cap: int) -> int:
    """The largest power of two <= ``cap`` dividing ``block`` (0 when below :data:`MIN_TILE`)."""
    t = cap
    while t >= MIN_TILE:
        if block % t == 0:
            return t
        t //= 2
    return 0


def unsupported(q, k, v, plan) -> str | None:
    """Why the Triton block-sparse kernel cannot run this call, or None when it can."""
    if q.dtype not in DTYPES:
        return f"the Triton sparse kernel supports {', '.join(str(d) for d in DTYPES)}, not {q.dtype}"
    if q.dtype == torch.bfloat16 and is_interpreted():
        return "Triton's CPU interpreter has no bfloat16; use float16/float32"
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM or v.shape[-1] != q.shape[-1]:
        return f"the Triton sparse kernel supports head dims 1..{MAX_HEAD_DIM} (v's equal to q's)"
    if not q.is_cuda and not is_interpreted():
        return ("the Triton sparse kernel on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                "diffattn.kernels is first imported")
    for name in ("block_q", "block_k"):
        if not _tile(getattr(plan, name), MAX_TILE):
            return (f"the Triton sparse kernel tiles blocks by powers of two >= {MIN_TILE}: "
                    f"BlockSparsePlan.{name}={getattr(plan, name)} must be a multiple of {MIN_TILE}")
    return None


def _view(t, shape, device, dtype=None):
    """``t`` expanded to ``shape`` (stride 0 on broadcast dims) and its strides; a dummy when None."""
    if t is None:
        return torch.empty(1, device=device, dtype=dtype or torch.float32), (0,) * len(shape)
    t = t.to(device=device, dtype=dtype or t.dtype).expand(shape)
    return t, tuple(t.stride())


def _tile_configs(bq: int, bk: int):
    """Autotune candidates whose tiles divide the plan's blocks (CUDA)."""
    pairs = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 2),
             (32, 32, 4, 2), (16, 16, 4, 2)]
    ok = [p for p in pairs if bq % p[0] == 0 and bk % p[1] == 0]
    return _configs(ok or [(_tile(bq, 64), _tile(bk, 64), 4, 2)])


@functools.lru_cache(maxsize=None)
def _tuned(bq: int, bk: int):
    return triton.autotune(configs=_tile_configs(bq, bk), key=["N_Q", "N_K", "HEAD_DIM", "RESCALE", "COMP",
                                                                "KEY_MASK", "DOT_PRECISION"])(_sparse_fwd)


def _key_mask_view(key_mask, b: int, h: int, nk: int, device):
    """(tensor, 3 strides, kind) of a key mask bool [B|1, H|1, Nk] as uint8 bytes expanded to
    [B, H, Nk] (stride 0 on broadcast dims, never materialised); a dummy when None."""
    if key_mask is None:
        return torch.empty(1, device=device, dtype=torch.uint8), (0, 0, 0), BIAS_NONE
    km = key_mask.to(device).view(torch.uint8).expand(b, h, nk)  # same bytes; Triton loads integers
    return km, tuple(km.stride()), BIAS_BOOL


def forward(q, k, v, lut, counts, block_q: int, block_k: int, *, scale: float, rescale=None, comp=None,
            key_mask=None, block=None):
    """Launch the kernel. lut int32 [B|1, H|1, NQ, W] compact, counts int32 [B|1, H|1, NQ];
    rescale [B|1, H|1, NQ], comp [B|1, H|1, NQ, D]; key_mask bool [B|1, H|1, Nk] (True = the
    row may attend to the key). Returns (out [B, H, Nq, D] q.dtype, lse [B, H, Nq] fp32).
    ``block`` = (BLOCK_M, BLOCK_N) pins the tile (tests)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    nqb = -(-Nq // block_q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse.fill_(float("-inf"))
    lut_t, sl = _view(lut, (B, H, nqb, lut.shape[-1]), q.device, torch.int32)
    cnt_t, sc = _view(counts, (B, H, nqb), q.device, torch.int32)
    rs_t, sr = _view(rescale, (B, H, nqb), q.device, torch.float32)
    cp_t, sp = _view(comp, (B, H, nqb, D), q.device, torch.float32)
    km_t, sm, km_kind = _key_mask_view(key_mask, B, H, Nk, q.device)
    args = (q, k, v, out, lse, lut_t, cnt_t, rs_t, cp_t, km_t, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *sl, *sc, *sr, *sp, *sm, H, Nq, Nk, scale * LOG2E)
    consts = dict(BQ=block_q, BK=block_k, RESCALE=rescale is not None, COMP=comp is not None, KEY_MASK=km_kind,
                  DOT_PRECISION=dot_precision(q.dtype), HEAD_DIM=D, BLOCK_D=block_d(D))
    if block is None and is_interpreted():
        block = (_tile(block_q, INTERPRETER_TILE), _tile(block_k, INTERPRETER_TILE))
    if block is None:
        _tuned(block_q, block_k)[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)](
            *args, MASK_N=Nk % block_k != 0, **consts)
    else:
        bm, bn = block
        if block_q % bm or block_k % bn:
            raise ValueError(f"tile {block} must divide the blocks ({block_q}, {block_k})")
        _sparse_fwd[(triton.cdiv(Nq, bm), B * H)](*args, MASK_N=Nk % bn != 0, BLOCK_M=bm, BLOCK_N=bn, **consts)
    return out, lse


@torch.library.custom_op(
    "diffattn::block_sparse_attention", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor lut, Tensor counts, Tensor? rescale, Tensor? comp, "
           "Tensor? key_mask, int block_q, int block_k, float scale, int block_m, int block_n) -> (Tensor, Tensor)")
def block_sparse_op(q, k, v, lut, counts, rescale, comp, key_mask, block_q, block_k, scale, block_m, block_n):
    """:func:`forward` as an op: ``(out [B, H, Nq, D] q.dtype, lse [B, H, Nq] fp32)``."""
    return forward(q, k, v, lut, counts, block_q, block_k, scale=scale, rescale=rescale, comp=comp,
                   key_mask=key_mask, block=None if block_m <= 0 else (block_m, block_n))


@block_sparse_op.register_fake
def _block_sparse_fake(q, k, v, lut, counts, rescale, comp, key_mask, block_q, block_k, scale, block_m, block_n):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def sparse_attention_triton(q, k, v, plan, *, scale=None, block=None, key_mask=None):
    """The Triton path of a block-sparse ``diffattn.kernels.attention`` call (inputs validated).

    ``key_mask`` bool [B|1, H|1, Nk]: the keys each row may attend to (a boolean key-only
    bias, :func:`diffattn.kernels.sparse.key_mask_of`). Returns (out [B, H, Nq, D], lse
    [B, H, Nq] fp32) with the plan's rectification applied.
    """
    lut, counts = plan.compact_lut(k.shape[2])
    bm, bn = (0, 0) if block is None else block
    return torch.ops.diffattn.block_sparse_attention(q, k, v, lut.contiguous(), counts.contiguous(), plan.rescale,
                                                     plan.comp, key_mask, plan.block_q, plan.block_k,
                                                     default_scale(q, scale), bm, bn)
