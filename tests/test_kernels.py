"""diffattn.kernels: the torch reference and the Triton kernels against a float64 ground truth.

Numerics rule (flash-attention's tests): on fresh random inputs, a kernel's max error against
float64 must be at most 2x the error of plain PyTorch math in the same precision, plus a small
floor; for outputs, the log-sum-exp, the taps, and gradients.

How the Triton tests run:
- on a machine with CUDA they run in this process on the GPU (fp32, fp16, bf16);
- otherwise ``test_triton_suite_in_interpreter`` starts a child ``pytest`` on this file with
  ``TRITON_INTERPRET=1`` set from the start (Triton decides interpreter mode when a kernel is
  decorated, i.e. when ``diffattn.kernels.triton_attention`` is first imported, so it cannot
  be switched on inside a process that may already have imported it). The child runs only the
  ``test_triton_*`` tests, on CPU, in fp32 and fp16 (the interpreter has no bf16). Every other
  test file keeps Triton's normal mode;
- running this file with ``TRITON_INTERPRET=1`` already set runs them directly.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffattn.errors import DiffattnError
from diffattn.kernels import KernelError, attention, attention_probs
from diffattn.kernels import reference as ref_mod

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
if INTERPRET:
    TRITON_DEVICE, TRITON_DTYPES = "cpu", (torch.float32, torch.float16)
elif CUDA:
    TRITON_DEVICE, TRITON_DTYPES = "cuda", (torch.float32, torch.float16, torch.bfloat16)
else:
    TRITON_DEVICE, TRITON_DTYPES = None, (torch.float32, torch.float16)
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="no CUDA: run by test_triton_suite_in_interpreter in a TRITON_INTERPRET=1 child"
)
# Floors of the 2x rule, relative to max|reference|.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ----------------------------------------------------------------------------- helpers


def plain_attention(q, k, v, *, scale=None, u=None, bias=None):
    """softmax(q kᵀ·scale + bias)·v (+ identity blend) and the row lse, in the inputs' own dtype.

    The "plain PyTorch" of the 2x rule, and (in float64) the ground truth. Fully masked rows -> 0.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.to(s.dtype)
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Nq]
    o = torch.matmul(torch.softmax(s, dim=-1).nan_to_num(0.0), v)
    if u is not None:
        u4 = u.to(o.dtype).view(1, -1, 1, 1) if u.dim() == 1 else u.to(o.dtype).view(*u.shape, 1, 1)
        o = (1 - u4) * o + u4 * v
    return o, lse


def plain_probs(q, k, lse, *, scale=None, bias=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.to(s.dtype)
    return torch.exp(s - lse.to(s.dtype).unsqueeze(-1))


def max_err(x, ref):
    """max |x - ref| over entries where ref is finite; infinities must coincide."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isinf(x) & ~fin, torch.isinf(ref)), "infinities differ from the reference"
    return (x[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def assert_2x(x, pt, ref, dtype, what):
    """The 2x rule: err(kernel) <= 2·err(plain PyTorch, same precision) + floor·max|ref|."""
    err, err_pt = max_err(x, ref), max_err(pt, ref)
    fin = ref[torch.isfinite(ref)]
    scale = max(1.0, fin.abs().max().item()) if fin.numel() else 1.0
    floor = FLOOR[dtype] * scale
    assert err <= 2 * err_pt + floor, f"{what}: error {err:.3g} > 2 x PyTorch's {err_pt:.3g} + {floor:.2g}"


def rand_inputs(b, h, nq, nk, d, *, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64)
    return q.to(device), k.to(device), v.to(device), g


def make_bias(kind, b, h, nq, nk, g, device="cpu"):
    """Biases of every broadcast pattern the processors use."""
    if kind is None:
        return None
    if kind == "float":  # [H, Nq, Nk]: per-head additive bias
        return (torch.randn(h, nq, nk, generator=g, dtype=torch.float64) * 2).to(device)
    if kind == "float2d":  # [Nq, Nk]
        return torch.randn(nq, nk, generator=g, dtype=torch.float64).to(device)
    if kind == "keypad":  # [B, 1, 1, Nk] key padding, every row keeps its first key
        m = torch.rand(b, 1, 1, nk, generator=g) > 0.4
        m[..., 0] = True
        return m.to(device)
    if kind == "mask":  # [B, 1, Nq, Nk] isolation-style mask, every row keeps one key
        m = torch.rand(b, 1, nq, nk, generator=g) > 0.5
        m[..., torch.arange(nq) % nk] = True
        return m.to(device)
    if kind == "dead_rows":  # [B, H, Nq, Nk] with fully masked rows
        m = torch.rand(b, h, nq, nk, generator=g) > 0.5
        m[0, 0, 3] = False
        m[-1, -1, -1] = False
        return m.to(device)
    raise ValueError(kind)


def make_blend(kind, b, h, g, device="cpu"):
    if kind is None:
        return None
    u = torch.rand(h, generator=g, dtype=torch.float64) if kind == "H" else torch.rand(b, h, generator=g, dtype=torch.float64)
    if kind == "H":
        u[0] = 1.0  # a fully perturbed head: out = V exactly
    return u.to(device)


def cast(x, dtype):
    return None if x is None else (x if x.dtype == torch.bool else x.to(dtype))


# ----------------------------------------------------------------------------- reference path

REF_CASES = [  # (B, H, Nq, Nk, D, blend, bias)
    (2, 3, 17, 17, 8, None, None),
    (1, 2, 19, 31, 16, None, "float"),
    (2, 2, 24, 24, 12, "H", "mask"),
    (2, 4, 20, 20, 32, "BH", "keypad"),
    (1, 2, 9, 40, 8, None, "float2d"),
]


@pytest.mark.parametrize("case", REF_CASES)
def test_reference_matches_float64(case):
    b, h, nq, nk, d, blend, bias_kind = case
    q, k, v, g = rand_inputs(b, h, nq, nk, d, seed=REF_CASES.index(case))
    u, bias = make_blend(blend, b, h, g), make_bias(bias_kind, b, h, nq, nk, g)
    o64, lse64 = plain_attention(q, k, v, u=u, bias=bias)
    dt = torch.float32
    args = [x.to(dt) for x in (q, k, v)]
    o_pt, lse_pt = plain_attention(*args, u=cast(u, dt), bias=cast(bias, dt))
    out, lse = attention(*args, head_blend=cast(u, dt), bias=cast(bias, dt), return_lse=True, backend="torch")
    assert out.dtype == dt and lse.dtype == torch.float32 and lse.shape == (b, h, nq)
    assert_2x(out, o_pt, o64, dt, "out")
    assert_2x(lse, lse_pt, lse64, dt, "lse")
    plain = attention(*args, head_blend=cast(u, dt), bias=cast(bias, dt), backend="torch")  # SDPA route
    assert_2x(plain, o_pt, o64, dt, "out (SDPA route)")
    # float64 in, float64 out: the reference is then the ground truth itself
    out64, l64 = attention(q, k, v, head_blend=u, bias=bias, return_lse=True)
    torch.testing.assert_close(out64, o64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l64, lse64, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias_kind", [None, "float", "mask"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_reference_is_stock_sdpa_bit_for_bit(bias_kind, scale):
    """No blend, no lse: exactly the stock processors' SDPA call (attach must change no bit)."""
    q, k, v, g = rand_inputs(2, 3, 21, 21, 40, seed=5)
    q, k, v = (x.float() for x in (q, k, v))
    bias = cast(make_bias(bias_kind, 2, 3, 21, 21, g), torch.float32)
    stock = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False, scale=scale)
    for backend in ("torch", "auto"):
        assert torch.equal(attention(q, k, v, bias=bias, scale=scale, backend=backend), stock)


def test_reference_lse_is_chunked_exactly(monkeypatch):
    """The lse path chunks over queries (memory-lean); chunking changes nothing."""
    q, k, v, g = rand_inputs(1, 2, 23, 30, 8, seed=7)
    bias = make_bias("float", 1, 2, 23, 30, g)
    whole = attention(q, k, v, bias=bias, return_lse=True)
    monkeypatch.setattr(ref_mod, "QUERY_CHUNK", 5)
    chunked = attention(q, k, v, bias=bias, return_lse=True)
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-14)


def test_blend_endpoints_and_per_row_weights():
    q, k, v, g = rand_inputs(2, 3, 16, 16, 8, seed=11)
    plain = attention(q, k, v)
    assert torch.equal(attention(q, k, v, head_blend=torch.zeros(3, dtype=q.dtype)), plain)
    assert torch.equal(attention(q, k, v, head_blend=torch.ones(3, dtype=q.dtype)), v)
    u = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.25]], dtype=q.dtype)  # [B, H]
    out = attention(q, k, v, head_blend=u)
    assert torch.equal(out[0, 1], v[0, 1]) and torch.equal(out[1, 1], plain[1, 1])
    torch.testing.assert_close(out[1, 2], 0.75 * plain[1, 2] + 0.25 * v[1, 2])


def test_reference_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v, g = rand_inputs(2, 2, 12, 9, 8, seed=3)
    mask = make_bias("dead_rows", 2, 2, 12, 9, g)
    out, lse = attention(q, k, v, bias=mask, return_lse=True)
    assert torch.equal(out[0, 0, 3], torch.zeros(8, dtype=q.dtype)) and lse[0, 0, 3] == -math.inf
    o64, l64 = plain_attention(q, k, v, bias=mask)
    torch.testing.assert_close(out, o64)


def test_reference_gradients_float64():
    """Reference attention (with lse) and taps are differentiable: gradcheck in float64."""
    q, k, v, g = rand_inputs(1, 2, 6, 6, 4, seed=2)
    bias = make_bias("float", 1, 2, 6, 6, g)
    u = torch.tensor([0.3, 0.8], dtype=torch.float64, requires_grad=True)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]

    def fn(q, k, v, u):
        out, lse = attention(q, k, v, head_blend=u, bias=bias, return_lse=True)
        p = attention_probs(q[:, :, 1:4], k[:, :, 2:5], lse[:, :, 1:4], bias_subset=bias[:, 1:4, 2:5])
        return out, lse, p

    assert torch.autograd.gradcheck(fn, (*qkv, u))


def test_taps_reference_equal_softmax_columns():
    q, k, v, g = rand_inputs(2, 2, 10, 14, 8, seed=4)
    bias = make_bias("mask", 2, 2, 10, 14, g)
    _, lse = attention(q, k, v, bias=bias, return_lse=True)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    full = torch.softmax(scores.masked_fill(~bias, -math.inf), -1)  # [B, H, Nq, Nk]
    idx = torch.tensor([1, 5, 6, 13])
    p = attention_probs(q[:, :, 2:7], k[:, :, idx], lse[:, :, 2:7], bias_subset=bias[:, :, 2:7][..., idx])
    torch.testing.assert_close(p, full[:, :, 2:7][..., idx])
    all_p = attention_probs(q, k, lse, bias_subset=bias)
    torch.testing.assert_close(all_p.sum(-1), torch.ones(2, 2, 10, dtype=q.dtype))


# ----------------------------------------------------------------------------- errors


def test_kernel_error_is_typed():
    assert issubclass(KernelError, DiffattnError) and issubclass(KernelError, ValueError)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=(2, 2, 8, 16), k=(2, 2, 8, 8)), "share B, H and D"),
        (dict(k=(1, 2, 8, 16), v=(1, 2, 8, 16)), "share B, H and D"),
        (dict(k=(2, 2, 8, 16), v=(2, 2, 9, 16)), "k and v must share"),
        (dict(q=(2, 8, 16)), r"\[B, H, N, D\]"),
        (dict(q=(2, 2, 5, 16), head_blend=torch.ones(2)), "cross attention"),
        (dict(head_blend=torch.ones(3)), r"head_blend must be \[H\]"),
        (dict(head_blend=torch.ones(2, dtype=torch.long)), "floating"),
        (dict(bias=torch.zeros(7, 8)), "does not broadcast"),
        (dict(bias=torch.zeros(8, 8, dtype=torch.long)), "boolean mask"),
        (dict(dtype=torch.int32), "floating dtype"),
        (dict(backend="cuda"), "unknown backend"),
        (dict(k=(2, 2, 0, 16), v=(2, 2, 0, 16)), "at least one key"),
    ],
)
def test_attention_bad_input_raises_clear_errors(kwargs, match):
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", torch.float32)
    shapes = {n: kwargs.pop(n, (2, 2, 8, 16)) for n in ("q", "k", "v")}
    q, k, v = (torch.ones(s, dtype=dtype) for s in shapes.values())
    with pytest.raises(KernelError, match=match):
        attention(q, k, v, **kwargs)


def test_mixed_dtypes_and_taps_shapes_raise():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(KernelError, match="floating dtype"):
        attention(q, q.half(), q)
    with pytest.raises(KernelError, match="taps need"):
        attention_probs(q, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5))
    with pytest.raises(KernelError, match="taps need"):
        attention_probs(q, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4))
    with pytest.raises(KernelError, match="bias_subset"):
        attention_probs(q, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4), bias_subset=torch.zeros(4, 4))


@pytest.mark.skipif(INTERPRET or CUDA, reason="checks the message for CPU tensors without the interpreter")
def test_triton_on_cpu_without_interpreter_says_how():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        attention(q, q, q, backend="triton")
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        attention_probs(q, q, torch.zeros(1, 2, 8), backend="triton")


def test_triton_rejects_what_it_cannot_run():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    with pytest.raises(KernelError, match="float64"):
        attention(q, q, q, backend="triton")
    q = torch.randn(1, 1, 4, 300)
    with pytest.raises(KernelError, match="head dims"):
        attention(q, q, q, backend="triton")


# ----------------------------------------------------------------------------- Triton (interpreter or CUDA)

TRITON_CASES = [  # (B, H, Nq, Nk, D, blend, bias, block) -- tails not divisible by the tile
    (1, 2, 37, 53, 32, None, None, (16, 16)),
    (2, 2, 48, 48, 64, "H", None, (32, 16)),
    (2, 2, 45, 45, 16, "BH", "float", (16, 32)),
    (1, 2, 29, 70, 24, None, "keypad", (16, 16)),
    (1, 1, 33, 33, 128, "H", "float2d", (16, 16)),
    (2, 2, 20, 27, 8, None, "dead_rows", (16, 16)),
    (1, 2, 40, 40, 32, "H", "mask", (32, 32)),
]


def _triton_inputs(case, dtype, seed):
    b, h, nq, nk, d, blend, bias_kind, block = case
    q, k, v, g = rand_inputs(b, h, nq, nk, d, seed=seed)
    u, bias = make_blend(blend, b, h, g), make_bias(bias_kind, b, h, nq, nk, g)
    dev = TRITON_DEVICE
    low = [x.to(dtype).to(dev) for x in (q, k, v)]
    return (q, k, v, u, bias), (low, cast(u, dtype), cast(bias, dtype)), block


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[2]}x{c[3]}d{c[4]}-{c[5]}-{c[6]}")
def test_triton_forward_2x_rule_and_full_writes(case, dtype):
    from diffattn.kernels import triton_attention as ta

    (q, k, v, u, bias), (low, u_lo, bias_lo), block = _triton_inputs(case, dtype, seed=TRITON_CASES.index(case))
    dev = TRITON_DEVICE
    u_dev = None if u_lo is None else u_lo.to(dev)
    bias_dev = None if bias_lo is None else bias_lo.to(dev)
    o64, lse64 = plain_attention(q, k, v, u=u, bias=bias)
    o_pt, lse_pt = plain_attention(*[x.cpu() for x in low], u=u_lo, bias=bias_lo)
    o_raw64, _ = plain_attention(q, k, v, bias=bias)
    # poison every output buffer: each element must be written
    out = torch.full(low[0].shape, float("nan"), dtype=dtype, device=dev)
    out_raw = torch.full_like(out, float("nan"))
    lse = torch.full(low[0].shape[:3], float("nan"), device=dev)
    ta.forward(*low, scale=1.0 / math.sqrt(q.shape[-1]), head_blend=u_dev, bias=bias_dev,
               store_raw=u is not None, out=out, lse=lse, out_raw=out_raw, block=block)
    assert not out.isnan().any() and not lse.isnan().any()
    assert_2x(out, o_pt, o64, dtype, "out")
    assert_2x(lse, lse_pt, lse64, dtype, "lse")
    if u is not None:
        assert not out_raw.isnan().any()
        o_raw_pt, _ = plain_attention(*[x.cpu() for x in low], bias=bias_lo)
        assert_2x(out_raw, o_raw_pt, o_raw64, dtype, "unblended out")
    # the public entry point (autotuned on CUDA) agrees with the pinned-tile launch
    res = attention(*low, head_blend=u_dev, bias=bias_dev, return_lse=True, backend="triton")
    assert_2x(res[0], o_pt, o64, dtype, "out (dispatch)")
    assert_2x(res[1], lse_pt, lse64, dtype, "lse (dispatch)")


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in TRITON_CASES if c[6] != "dead_rows"][:5],
                         ids=lambda c: f"{c[2]}x{c[3]}d{c[4]}-{c[5]}-{c[6]}")
def test_triton_backward_2x_rule(case, dtype):
    """Gradients w.r.t. q, k, v, head_blend and through the returned lse."""
    (q, k, v, u, bias), (low, u_lo, bias_lo), block = _triton_inputs(case, dtype, seed=100 + TRITON_CASES.index(case))
    from diffattn.kernels.triton_attention import attention_triton

    g = torch.Generator().manual_seed(1)
    go = torch.randn(q.shape, generator=g, dtype=torch.float64)
    gl = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)

    def grads(q, k, v, u, bias, fn):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        uu = None if u is None else u.detach().clone().requires_grad_()
        o, lse = fn(*leaves, uu, bias)
        loss = (o.double() * go.to(o.device)).sum() + (lse.double() * gl.to(o.device)).sum()
        loss.backward()
        return [x.grad for x in leaves] + ([] if uu is None else [uu.grad])

    ref = grads(q, k, v, u, bias, lambda q, k, v, u, b: plain_attention(q, k, v, u=u, bias=b))
    pt = grads(*[x.cpu() for x in low], u_lo, bias_lo, lambda q, k, v, u, b: plain_attention(q, k, v, u=u, bias=b))
    dev = TRITON_DEVICE
    tri = grads(*low, None if u_lo is None else u_lo.to(dev), None if bias_lo is None else bias_lo.to(dev),
                lambda q, k, v, u, b: attention_triton(q, k, v, head_blend=u, bias=b, return_lse=True, block=block))
    for name, x, p, r in zip(("dq", "dk", "dv", "du"), tri, pt, ref):
        assert x.dtype == p.dtype and not x.isnan().any(), name
        assert_2x(x, p, r, dtype, name)


@needs_triton
def test_triton_fully_masked_rows_have_zero_gradients():
    case = next(c for c in TRITON_CASES if c[6] == "dead_rows")
    (q, k, v, u, bias), (low, _, bias_lo), block = _triton_inputs(case, torch.float32, seed=9)
    from diffattn.kernels.triton_attention import attention_triton

    leaves = [x.detach().clone().requires_grad_() for x in low]
    out, lse = attention_triton(*leaves, bias=bias_lo.to(TRITON_DEVICE), return_lse=True, block=block)
    assert torch.equal(out[0, 0, 3].cpu(), torch.zeros(q.shape[-1])) and lse[0, 0, 3].item() == -math.inf
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    assert torch.equal(leaves[0].grad[0, 0, 3].cpu(), torch.zeros(q.shape[-1]))


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("bias_kind", [None, "float", "mask"])
def test_triton_taps_2x_rule_poisoned_and_gradients(dtype, bias_kind):
    from diffattn.kernels.taps import attention_probs_triton, probs_forward

    b, h, nq, nk, d = 2, 2, 37, 45, 32
    q, k, v, g = rand_inputs(b, h, nq, nk, d, seed=21)
    bias = make_bias(bias_kind, b, h, nq, nk, g)
    _, lse64 = plain_attention(q, k, v, bias=bias)
    idx = torch.tensor([0, 3, 4, 9, 17, 18, 19, 30, 44])  # a key subset, not contiguous
    qs, ks, ls = q[:, :, 5:30], k[:, :, idx], lse64[:, :, 5:30]  # a query segment
    bs = None if bias is None else bias[..., 5:30, :][..., idx]
    p64 = plain_probs(qs, ks, ls, bias=bs)
    lo = [x.to(dtype) for x in (qs, ks)]
    p_pt = plain_probs(*lo, ls.float(), bias=cast(bs, dtype))
    dev = TRITON_DEVICE
    bs_dev = None if bs is None else cast(bs, dtype).to(dev)
    out = torch.full(p64.shape, float("nan"), device=dev)
    probs_forward(*[x.to(dev) for x in lo], ls.float().to(dev), scale=1 / math.sqrt(d), bias_subset=bs_dev,
                  out=out, block=(16, 16))
    assert not out.isnan().any()
    assert_2x(out, p_pt, p64, dtype, "probs")
    # gradients w.r.t. q, k_subset and lse
    gp = torch.randn(p64.shape, generator=g, dtype=torch.float64)

    def grads(fn, *xs):
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        (fn(*leaves).double() * gp.to(leaves[0].device)).sum().backward()
        return [x.grad for x in leaves]

    ref = grads(lambda q, k, l: plain_probs(q, k, l, bias=bs), qs, ks, ls)
    pt = grads(lambda q, k, l: plain_probs(q, k, l, bias=cast(bs, dtype)), *lo, ls.float())
    tri = grads(lambda q, k, l: attention_probs_triton(q, k, l, bias_subset=bs_dev, block=(16, 16)),
                *[x.to(dev) for x in lo], ls.float().to(dev))
    for name, x, p, r in zip(("dq", "dk", "dlse"), tri, pt, ref):
        assert_2x(x, p, r, dtype, name)


@needs_triton
def test_triton_dispatch_noncontiguous_and_taps_from_kernel_lse():
    """Processor layout ([B, N, H, D] transposed), lse from the kernel feeding the taps."""
    g = torch.Generator().manual_seed(5)
    b, n, h, d = 2, 35, 2, 16
    x = [torch.randn(b, n, h, d, generator=g).to(TRITON_DEVICE).transpose(1, 2) for _ in range(3)]  # [B, H, N, D] views
    assert not x[0].is_contiguous()
    out, lse = attention(*x, head_blend=torch.tensor([0.2, 0.7], device=TRITON_DEVICE), return_lse=True,
                         backend="triton")
    ref_out, ref_lse = attention(*[t.cpu().double() for t in x], head_blend=torch.tensor([0.2, 0.7]).double(),
                                 return_lse=True, backend="torch")
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-5, atol=1e-5)
    p = attention_probs(x[0], x[1], lse, backend="triton")  # all keys: rows sum to one
    torch.testing.assert_close(p.sum(-1).cpu(), torch.ones(b, h, n), rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_refuses_bias_gradients_and_interpreter_bf16():
    q = torch.randn(1, 2, 8, 16, device=TRITON_DEVICE)
    bias = torch.zeros(8, 8, device=TRITON_DEVICE, requires_grad=True)
    with pytest.raises(KernelError, match="float bias"):
        attention(q, q, q, bias=bias, backend="triton")
    if TRITON_DEVICE == "cuda":  # auto then falls back to the differentiable reference
        attention(q, q, q, bias=bias).sum().backward()
        assert bias.grad is not None
    if INTERPRET:
        with pytest.raises(KernelError, match="bfloat16"):
            attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), backend="triton")


# ----------------------------------------------------------------------------- custom ops and torch.compile


@needs_triton
def test_triton_custom_ops_opcheck():
    """diffattn::attention, ::attention_backward and ::attention_probs: schema, fake (meta)
    shapes and strides, autograd registration and AOT dispatch (torch.library.opcheck)."""
    from torch.library import opcheck

    import diffattn.kernels.taps  # noqa: F401  (registers diffattn::attention_probs)
    import diffattn.kernels.triton_attention  # noqa: F401

    ops = torch.ops.diffattn
    dev = TRITON_DEVICE
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 20, 16, generator=g).to(dev) for _ in range(3))
    u = torch.tensor([0.3, 0.8], device=dev)
    mask = (torch.rand(2, 1, 20, 20, generator=g) > 0.3).to(dev)
    mask[..., 0] = True
    fbias = torch.randn(20, 20, generator=g).to(dev)
    cases = [(q, k, v, None, None, 0.25, False, 16, 16), (q, k, v, u, mask, 0.25, True, 16, 16),
             (q, k.transpose(1, 2).contiguous().transpose(1, 2), v, u, fbias, 0.3, False, 16, 16)]
    for args in cases:
        opcheck(ops.attention.default, args)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, u)]
    opcheck(ops.attention.default, (*leaves, mask, 0.25, True, 16, 16))
    out, lse, raw = ops.attention(q, k, v, u, mask, 0.25, True, 16, 16)
    opcheck(ops.attention_backward.default, (q, k, v, raw, lse, torch.randn_like(out), torch.randn_like(lse), mask,
                                             0.25, 16, 16))
    idx = torch.tensor([0, 3, 4, 9, 17], device=dev)
    for bias in (None, mask[..., idx], fbias[:, idx]):
        opcheck(ops.attention_probs.default, (q, k[:, :, idx], lse, bias, 0.25, 16, 16))
    opcheck(ops.attention_probs.default, (leaves[0], leaves[1][:, :, idx].detach().requires_grad_(),
                                          lse.clone().requires_grad_(), None, 0.25, 16, 16))


@needs_triton
def test_triton_compiled_kernels_and_gradients_match_eager():
    """torch.compile(fullgraph=True, aot_eager) of attention (blend, lse) + taps with a backward:
    the ops' fake implementations and registered autograd, against the eager result."""
    from diffattn.kernels import use_backend

    dev = TRITON_DEVICE
    g = torch.Generator().manual_seed(4)
    x = [torch.randn(2, 2, 24, 16, generator=g).to(dev) for _ in range(3)]
    u = torch.tensor([0.2, 0.6], device=dev)

    def fn(q, k, v, u):
        out, lse = attention(q, k, v, head_blend=u, return_lse=True)
        p = attention_probs(q[:, :, :10], k[:, :, 5:12], lse[:, :, :10])
        return out.sum() + (p * p).sum() + lse.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads = []
    with use_backend("triton"):
        for f in (fn, compiled):
            leaves = [t.clone().requires_grad_() for t in (*x, u)]
            loss = f(*leaves)
            loss.backward()
            grads.append([loss] + [t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_processor_compiles_fullgraph_through_custom_ops():
    """``torch.compile(fullgraph=True)`` over the SD3 blocks with a control that sets a head blend
    and taps image × text: with ``use_backend("triton")`` (on CPU under the interpreter, the
    choice recorded here; on CUDA the GPU) the processor's kernel and taps calls trace as the
    ``diffattn::attention`` / ``diffattn::attention_probs`` custom ops, no graph break, and
    give the eager result (and the torch reference's within fp32 kernel error)."""
    import diffattn as da
    from diffattn.kernels import use_backend

    class BlendAndTap(da.Control):
        def __init__(self, u):
            super().__init__("all")
            self.u, self.maps = u, []

        def edit_spec(self, call):
            call.spec.head_blend = self.u
            call.tap("image", "text")

        def on_taps(self, call, probs):
            self.maps.append(probs[0])

    from diffattn.tiny import tiny_sd3_transformer_and_inputs

    model, inputs = tiny_sd3_transformer_and_inputs()
    model, inputs = model.to(TRITON_DEVICE), {n: t.to(TRITON_DEVICE) for n, t in inputs.items()}
    ctrl = BlendAndTap(torch.tensor([0.25, 0.75], device=TRITON_DEVICE))
    targets = []

    def recorder(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad(), da.attach(model, ctrl):
            reference = model(**inputs).sample
            ctrl.maps = []
            with use_backend("triton"):
                eager = model(**inputs).sample
                eager_maps, ctrl.maps = ctrl.maps, []
                for block in model.transformer_blocks:
                    block.compile(fullgraph=True, backend=recorder)
                compiled = model(**inputs).sample
    finally:
        torch._dynamo.reset()
    assert "diffattn.attention" in targets and "diffattn.attention_probs" in targets, sorted(set(targets))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-4)
    assert len(ctrl.maps) == len(eager_maps) == 2
    for got, want in zip(ctrl.maps, eager_maps):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- interpreter child


@pytest.mark.skipif(INTERPRET or CUDA, reason="the Triton tests run directly in this process")
def test_triton_suite_in_interpreter():
    """Run the test_triton_* tests above on CPU under TRITON_INTERPRET=1 in a child pytest."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x", "-p", "no:cacheprovider",
           "-k", "test_triton_ and not test_triton_suite_in_interpreter and not without_interpreter"]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, f"interpreter suite failed ({summary}):\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
