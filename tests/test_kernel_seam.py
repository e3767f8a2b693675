"""The kernel seam: the spec as one object, segment-uniform keys and LSE merges in kernels/,
the block-sparse plan on the reference path, and the backend override.

The Triton custom ops (opcheck, fullgraph compile over a processor) are tested with the other
Triton tests in tests/test_kernels.py (they need the interpreter on CPU); the reference-path
fullgraph compile over a processor is in tests/test_compile.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import diffattn.kernels as K
from diffattn.controls import AttentionCall, UniformKeys
from diffattn.kernels import (
    BlockSparsePlan,
    KernelError,
    KernelSpec,
    SegmentUniform,
    attention,
    merge_lse,
    segment_uniform_attention,
    uniform_keys_attention,
)
from diffattn.layout import sd3_layout
from diffattn.processors import kernel_spec, run_controls, run_kernel


def rand(b, h, nq, nk, d, *, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), g


def dense64(q, k, v, *, bias=None, u=None, scale=None):
    """softmax(q kᵀ·scale + bias) v in float64, fully masked rows -> 0, and the row lse."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s.masked_fill(~bias, -math.inf) if bias.dtype == torch.bool else s + bias.double()
    lse = torch.logsumexp(s, -1)
    o = torch.softmax(s, -1).nan_to_num(0.0) @ v
    if u is not None:
        u4 = u.double().view(1, -1, 1, 1) if u.dim() == 1 else u.double().view(*u.shape, 1, 1)
        o = (1 - u4) * o + u4 * v
    return o, lse


def loop_token_mask(sel, bq, bk, nq, nk):
    """The token mask of a block selection bool [b, h, nQb, nKb], element by element."""
    m = torch.zeros(sel.shape[0], sel.shape[1], nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            m[:, :, i, j] = sel[:, :, i // bq, j // bk]
    return m


# ----------------------------------------------------------------------------- the spec as one object


@pytest.mark.parametrize("case", range(6))
def test_spec_object_equals_field_arguments_bit_for_bit(case):
    b, h, n, d = 2, 3, 19, 8
    q, k, v, g = rand(b, h, n, n, d, seed=case, dtype=torch.float32)
    u = [None, torch.rand(h, generator=g), torch.rand(b, h, generator=g)][case % 3]
    bias = [None, torch.randn(h, n, n, generator=g), torch.rand(b, 1, n, n, generator=g) > 0.3][case % 3 if case < 3 else (case + 1) % 3]
    for lse in (False, True):
        want = attention(q, k, v, scale=0.3, head_blend=u, bias=bias, return_lse=lse)
        got = attention(q, k, v, scale=0.3, spec=KernelSpec(head_blend=u, bias=bias, return_lse=lse))
        if lse:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        else:
            assert torch.equal(got, want)


def test_spec_and_field_arguments_together_raise():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(KernelError, match="not both"):
        attention(q, q, q, head_blend=torch.zeros(2), spec=KernelSpec())
    with pytest.raises(KernelError, match="not both"):
        attention(q, q, q, return_lse=True, spec=KernelSpec())
    with pytest.raises(KernelError, match="KernelSpec"):
        attention(q, q, q, spec={"head_blend": None})
    with pytest.raises(KernelError, match="SegmentUniform"):
        attention(q, q, q, spec=KernelSpec(uniform_keys=UniformKeys("text")))
    with pytest.raises(KernelError, match="1-D integer"):
        attention(q, q, q, spec=KernelSpec(uniform_keys=SegmentUniform(torch.tensor([0.5]))))
    with pytest.raises(KernelError, match=r"rows must be a \[1\] bool"):
        attention(q, q, q, spec=KernelSpec(uniform_keys=SegmentUniform(torch.tensor([0]), rows=torch.tensor([1, 0]))))


def test_run_kernel_passes_the_call_spec_whole():
    """run_kernel on an AttentionCall = attention(spec=kernel_spec(call)), lse set for taps."""
    q, k, v, g = rand(2, 2, 22, 22, 8, seed=3, dtype=torch.float32)
    call = AttentionCall(None, sd3_layout(16, 6, grid=(4, 4)), q, k, v)
    call.spec.head_blend = torch.tensor([0.2, 0.9])
    call.spec.bias = torch.rand(2, 1, 22, 22, generator=g) > 0.2
    call.spec.uniform_keys = UniformKeys("text", rows=torch.tensor([False, True]), heads=[1])
    call.tap("image", "text")
    spec = kernel_spec(call)
    assert isinstance(spec, KernelSpec) and spec.return_lse
    assert torch.equal(spec.uniform_keys.index, torch.arange(16, 22))
    assert torch.equal(spec.uniform_keys.heads, torch.tensor([False, True]))
    out = run_kernel(call)
    want, lse = attention(q, k, v, spec=spec)
    assert torch.equal(out, want) and torch.equal(call.lse, lse)


# ----------------------------------------------------------------------------- composites


def test_merge_lse_of_two_key_sets_is_attention_over_both():
    q, k, v, g = rand(2, 2, 9, 20, 8, seed=1)
    bias = torch.rand(2, 1, 9, 20, generator=g) > 0.4
    bias[0, 0, 4] = False  # a row with no key at all
    bias[1, 0, 2, 7:] = False  # a row with no key in the second set
    a, b_ = slice(0, 7), slice(7, 20)
    oa, la = attention(q, k[:, :, a], v[:, :, a], bias=bias[..., a], return_lse=True)
    ob, lb = attention(q, k[:, :, b_], v[:, :, b_], bias=bias[..., b_], return_lse=True)
    out, lse = merge_lse(oa, la, ob, lb)
    o64, l64 = dense64(q, k, v, bias=bias)
    torch.testing.assert_close(out, o64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, l64, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[0, 0, 4], torch.zeros(8, dtype=out.dtype)) and lse[0, 0, 4] == -math.inf


def _uniform64(q, k, v, index, bias=None, u=None):
    """Segment-uniform attention by its definition: the scores over S replaced by their log-mean-exp
    share spread uniformly (each row keeps p_S, spends it as softmax(bias_S) over S)."""
    o, lse = dense64(q, k, v, bias=bias)
    nk = k.shape[2]
    s_mask = torch.zeros(nk, dtype=torch.bool)
    s_mask[index] = True
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s.masked_fill(~bias, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # [B, H, Nq, Nk]
    p_s = p[..., s_mask].sum(-1, keepdim=True)
    allowed = torch.ones_like(p, dtype=torch.bool) if bias is None else bias.expand_as(p)
    w_s = (allowed & s_mask).double()
    w_s = w_s / w_s.sum(-1, keepdim=True).clamp_min(1)
    p_new = torch.where(s_mask, p_s * w_s, p)
    out = p_new @ v
    if u is not None:
        u4 = u.double().view(1, -1, 1, 1) if u.dim() == 1 else u.double().view(*u.shape, 1, 1)
        out = (1 - u4) * out + u4 * v
    return out, lse


def test_segment_uniform_matches_its_definition_float64():
    q, k, v, g = rand(2, 2, 14, 14, 8, seed=2)
    index = torch.tensor([2, 3, 4, 9])
    bias = torch.rand(2, 1, 14, 14, generator=g) > 0.3
    bias[..., 0] = True
    u = torch.tensor([0.3, 0.0], dtype=torch.float64)
    o64, l64 = _uniform64(q, k, v, index, bias=bias, u=u)
    out, lse = segment_uniform_attention(q, k, v, SegmentUniform(index), head_blend=u, bias=bias, need_lse=True)
    torch.testing.assert_close(out, o64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, l64, rtol=1e-10, atol=1e-10)
    # rows / heads subset: the uniform version only there, plain attention elsewhere
    rows, heads = torch.tensor([False, True]), torch.tensor([True, False])
    out2, lse2 = attention(q, k, v, spec=KernelSpec(bias=bias, uniform_keys=SegmentUniform(index, rows, heads),
                                                   return_lse=True))
    plain, _ = dense64(q, k, v, bias=bias)
    torch.testing.assert_close(out2[0], plain[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out2[1, 1], plain[1, 1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out2[1, 0], _uniform64(q, k, v, index, bias=bias)[0][1, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse2, l64, rtol=1e-10, atol=1e-10)
    # the old entry point is the same function
    assert torch.equal(uniform_keys_attention(q, k, v, index, bias=bias)[0],
                       segment_uniform_attention(q, k, v, SegmentUniform(index), bias=bias)[0])


# ----------------------------------------------------------------------------- block-sparse plan


def _plans(sel):
    """The same selection as a mask plan and as a -1 padded LUT plan (unsorted, one repeat)."""
    b, h, nqb, nkb = sel.shape
    lut = torch.full((b, h, nqb, nkb + 1), -1, dtype=torch.int32)
    for idx in torch.cartesian_prod(torch.arange(b), torch.arange(h), torch.arange(nqb)):
        cols = sel[tuple(idx)].nonzero().flatten().flip(0)
        if cols.numel():
            cols = torch.cat([cols, cols[:1]])
        lut[tuple(idx)][: cols.numel()] = cols.int()
    return dict(mask=sel), dict(lut=lut)


@pytest.mark.parametrize("form", [0, 1], ids=["mask", "lut"])
def test_sparse_every_block_selected_is_dense(form):
    b, h, nq, nk, d, bq, bk = 2, 2, 45, 45, 16, 8, 16  # ragged last blocks
    q, k, v, _ = rand(b, h, nq, nk, d, seed=5, dtype=torch.float32)
    sel = torch.ones(1, h, math.ceil(nq / bq), math.ceil(nk / bk), dtype=torch.bool)
    plan = BlockSparsePlan(bq, bk, **_plans(sel)[form])
    u = torch.tensor([0.25, 0.0])
    for lse_flag in (False, True):
        got = attention(q, k, v, spec=KernelSpec(head_blend=u, sparse=plan, return_lse=lse_flag))
        want = attention(q, k, v, head_blend=u, return_lse=lse_flag)
        for x, y in zip(got if lse_flag else (got,), want if lse_flag else (want,)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", [0, 1], ids=["mask", "lut"])
@pytest.mark.parametrize("bias_kind", [None, "float", "mask"])
def test_sparse_random_plan_matches_float64_masked_reference(form, bias_kind):
    b, h, nq, nk, d, bq, bk = 2, 3, 33, 33, 8, 8, 4  # ragged last blocks (blend needs Nq == Nk)
    q, k, v, g = rand(b, h, nq, nk, d, seed=7)
    nqb, nkb = math.ceil(nq / bq), math.ceil(nk / bk)
    sel = torch.rand(b, h, nqb, nkb, generator=g) > 0.6
    sel[0, 0, 1] = False  # a query block with no key block: its rows give 0 and lse -inf
    sel[1, 2, 2] = True
    bias = None
    if bias_kind == "float":
        bias = torch.randn(h, nq, nk, generator=g, dtype=torch.float64)
    elif bias_kind == "mask":
        bias = torch.rand(b, 1, nq, nk, generator=g) > 0.3
    plan = BlockSparsePlan(bq, bk, **_plans(sel)[form])
    tok = loop_token_mask(sel, bq, bk, nq, nk)
    assert torch.equal(plan.token_mask(nq, nk), tok)
    full = tok if bias is None else (tok & bias if bias.dtype == torch.bool else bias.masked_fill(~tok, -math.inf))
    o64, l64 = dense64(q, k, v, bias=full)
    u = torch.rand(b, h, generator=g, dtype=torch.float64)
    ou64, _ = dense64(q, k, v, bias=full, u=u)
    # float64 in: the reference is the ground truth itself
    out, lse = attention(q, k, v, spec=KernelSpec(bias=bias, sparse=plan, return_lse=True))
    torch.testing.assert_close(out, o64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, l64, rtol=1e-10, atol=1e-10)
    assert torch.equal(out[0, 0, bq:2 * bq], torch.zeros(bq, d, dtype=out.dtype))
    assert bool((lse[0, 0, bq:2 * bq] == -math.inf).all())
    blended = attention(q, k, v, spec=KernelSpec(head_blend=u, bias=bias, sparse=plan))
    torch.testing.assert_close(blended, ou64, rtol=1e-10, atol=1e-10)
    # fp32: within the float64 reference as plain fp32 math would be
    o32 = attention(q.float(), k.float(), v.float(), spec=KernelSpec(
        bias=None if bias is None else (bias if bias.dtype == torch.bool else bias.float()), sparse=plan))
    torch.testing.assert_close(o32.double(), o64, rtol=0, atol=1e-5)


def test_sparse_taps_see_the_plan():
    """Through a call: taps report zero probability outside the selected blocks, rows sum to one."""
    q, k, v, g = rand(1, 2, 22, 22, 8, seed=9, dtype=torch.float32)
    sel = torch.rand(1, 1, 3, 3, generator=g) > 0.4
    sel[..., 0] = True  # every query block keeps its first key block
    call = AttentionCall(None, sd3_layout(16, 6, grid=(4, 4)), q, k, v)
    call.spec.sparse = BlockSparsePlan(8, 8, mask=sel)
    tap = call.tap(None, None, store=[])
    out = run_kernel(call)
    from diffattn.processors import run_taps

    run_taps(call)
    p = tap.store[0]
    tok = loop_token_mask(sel, 8, 8, 22, 22)
    assert bool((p[~tok.expand_as(p)] == 0).all())
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 22), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), dense64(q, k, v, bias=tok)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BlockSparsePlan(0, 8, mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)), "block_q must be a positive int"),
        (lambda: BlockSparsePlan(8, 8.0, mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)), "block_k must be a positive int"),
        (lambda: BlockSparsePlan(8, 8), "exactly one of mask="),
        (lambda: BlockSparsePlan(8, 8, mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), lut=torch.zeros(1, 1, 1, 1)),
         "exactly one of mask="),
        (lambda: BlockSparsePlan(8, 8, mask=torch.ones(1, 1, 1, 1)), "4-D bool"),
        (lambda: BlockSparsePlan(8, 8, mask=torch.ones(2, 2, dtype=torch.bool)), "4-D bool"),
        (lambda: BlockSparsePlan(8, 8, lut=torch.zeros(1, 1, 2, 1)), "4-D integer"),
    ],
)
def test_sparse_plan_construction_errors(make, match):
    with pytest.raises(KernelError, match=match):
        make()


@pytest.mark.parametrize(
    "plan, match",
    [
        (BlockSparsePlan(8, 8, mask=torch.ones(1, 2, 2, 3, dtype=torch.bool)), r"must be \[2\|1, 2\|1, 3, 3\]"),
        (BlockSparsePlan(8, 8, mask=torch.ones(3, 2, 3, 3, dtype=torch.bool)), "does not fit"),
        (BlockSparsePlan(8, 8, lut=torch.zeros(1, 1, 3, 2, dtype=torch.long) + 3), r"must lie in \[0, 2\]"),
        (BlockSparsePlan(8, 8, lut=torch.zeros(1, 1, 3, 2, dtype=torch.long) - 2), "with -1 as padding"),
        ("not a plan", "BlockSparsePlan"),
    ],
)
def test_sparse_plan_that_does_not_fit_the_call_raises(plan, match):
    q = torch.randn(2, 2, 20, 8)  # 3 query blocks and 3 key blocks of 8
    with pytest.raises(KernelError, match=match):
        attention(q, q, q, spec=KernelSpec(sparse=plan))


def test_sparse_through_controls_with_uniform_keys():
    """The plan composes with segment-uniform keys exactly: it is part of the call's mask."""
    q, k, v, g = rand(1, 2, 22, 22, 8, seed=4)
    sel = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    sel[0, 0, 2, 1] = False
    plan = BlockSparsePlan(8, 8, mask=sel)
    tok = loop_token_mask(sel, 8, 8, 22, 22)
    index = torch.arange(16, 22)
    out = attention(q, k, v, spec=KernelSpec(uniform_keys=SegmentUniform(index), sparse=plan))
    torch.testing.assert_close(out, _uniform64(q, k, v, index, bias=tok)[0], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- backend override


def test_use_backend_overrides_auto_only():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    with K.use_backend("torch"):
        assert torch.equal(attention(q, q, q), attention(q, q, q, backend="torch"))
    with pytest.raises(KernelError, match="unknown backend"):
        with K.use_backend("cuda"):
            pass
    with pytest.raises(KernelError, match="float64"):  # forced Triton refuses what it cannot run
        with K.use_backend("triton"):
            attention(q, q, q, return_lse=True)
    assert K._AUTO_BACKEND == "auto"


def test_run_controls_unchanged_without_spec_edits():
    """A call with no spec edit is the plain kernel call, bit for bit (processor-swap equivalence)."""
    q, k, v, _ = rand(2, 2, 10, 10, 8, seed=6, dtype=torch.float32)
    call = AttentionCall(None, None, q, k, v)

    class Nothing:
        def edit_qkv(self, call):
            pass

        def edit_spec(self, call):
            pass

        def edit_output(self, call, out):
            return out

    assert torch.equal(run_controls(call, [Nothing()]), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_sparse_cross_attention_plan_broadcast_over_batch_and_heads():
    """Nq != Nk, a [1, 1, nQb, nKb] plan shared by every row and head, fp32 against float64."""
    b, h, nq, nk, d, bq, bk = 3, 2, 21, 50, 16, 4, 16
    q, k, v, g = rand(b, h, nq, nk, d, seed=11)
    sel = torch.rand(1, 1, math.ceil(nq / bq), math.ceil(nk / bk), generator=g) > 0.5
    sel[..., -1] = True  # the short last key block
    plan = BlockSparsePlan(bq, bk, mask=sel)
    o64, l64 = dense64(q, k, v, bias=loop_token_mask(sel, bq, bk, nq, nk))
    out, lse = attention(q.float(), k.float(), v.float(), spec=KernelSpec(sparse=plan, return_lse=True))
    torch.testing.assert_close(out.double(), o64, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), l64, rtol=0, atol=1e-5)


def test_attention_spec_reserves_a_sparse_field():
    from diffattn.controls import AttentionSpec

    spec = AttentionSpec()
    assert spec.sparse is None and spec.head_blend is None and spec.bias is None and not spec.return_lse
