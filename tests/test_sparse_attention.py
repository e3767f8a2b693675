"""Rectified SpaAttn: block-sparse kernels, the rectification math, and the control on tiny Wan / FLUX.

- exactness: every block selected equals dense attention; the gathered CPU path and the Triton
  LUT kernel equal the masked reference (the oracle) at drop 0.5 / 0.75 / 0.9;
- the rectified output equals a float64 computation of R and the compensation written from the
  paper's formulas (note §1.2 steps 2-9), independently of diffattn.kernels.sparse;
- per-row key masks (prompts of different lengths in one batch): every block selected equals
  masked dense attention on every path; R and the compensation equal the float64 formulas over
  each row's live keys only; row 0 of a 2-row batch equals row 0 computed alone;
- the control on tiny Wan and FLUX pipelines: runs, dense warm-up steps and layers are bit-equal
  to no control, detach restores exactly, ablation modes run; bad input raises typed errors.

The Triton tests (``test_triton_*``) run on CUDA directly, else in a child pytest under
``TRITON_INTERPRET=1`` (as tests/test_kernels.py: the interpreter is chosen when the kernels are
first decorated), in fp32 and fp16.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import diffattn as da
from diffattn.errors import ConfigError, ControlError, KernelError, LayoutError
from diffattn.kernels import BlockSparsePlan, KernelSpec, SegmentUniform, attention
from diffattn.kernels.sparse import (
    block_sparse_plan,
    block_stats,
    gathered_attention,
    key_mask_of,
    lut_from_mask,
    topk_blocks,
)
from diffattn.layout import Segment, TokenLayout
from diffattn.methods.spaattn import default_tile, neighbour_blocks, row_key_mask, static_layout, tiled_order
from diffattn.tiny import output_of

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cpu" if INTERPRET else ("cuda" if CUDA else None)
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="no CUDA: run by test_triton_suite_in_interpreter")
DROPS = (0.5, 0.75, 0.9)


def rand(*shape, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def qkv(b, h, nq, nk, d, seed=0, dtype=torch.float64, device="cpu"):
    return (rand(b, h, nq, d, seed=seed, dtype=dtype, device=device),
            rand(b, h, nk, d, seed=seed + 1, dtype=dtype, device=device),
            rand(b, h, nk, d, seed=seed + 2, dtype=dtype, device=device))


def smooth_qkv(b, h, n, d, seed=0, noise=0.3):
    """Tokens along a smooth random walk plus noise: pooled blocks are informative, so GAPR's
    gain-versus-error test passes for some blocks (on i.i.d. tokens it almost never does)."""
    base = rand(1, 1, n, d, seed=seed).cumsum(2) / 8
    return tuple(base + noise * rand(b, h, n, d, seed=seed + s) for s in (1, 2, 3))


def random_selection(shape, drop, seed=0):
    """A bool block selection keeping about 1 - drop of the key blocks (each row keeps one at least)."""
    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(shape, generator=g) >= drop
    sel[..., 0] |= ~sel.any(-1)
    return sel


def reference(q, k, v, plan):
    """The masked reference: the oracle every sparse kernel must equal."""
    return attention(q, k, v, spec=KernelSpec(sparse=plan, return_lse=True), backend="torch")


# ----------------------------------------------------------------------------- exactness (CPU path)


@pytest.mark.parametrize("form", ["mask", "lut", "rectified"])
def test_every_block_selected_equals_dense(form):
    b, h, n, d, bs = 2, 3, 77, 16, 16  # ragged last block
    q, k, v = qkv(b, h, n, n, d, seed=1, dtype=torch.float32)
    nb = math.ceil(n / bs)
    if form == "mask":
        plan = BlockSparsePlan(bs, bs, mask=torch.ones(1, 1, nb, nb, dtype=torch.bool))
    elif form == "lut":
        plan = BlockSparsePlan(bs, bs, lut=torch.arange(nb, dtype=torch.int32).expand(1, h, nb, nb))
    else:  # the method's plan at drop 0: all blocks, R = 1, comp = 0
        plan = block_sparse_plan(q, k, v, block_q=bs, top_k=nb)
        assert bool((plan.rescale == 1).all()) and bool((plan.comp == 0).all())
    out, lse = attention(q, k, v, spec=KernelSpec(sparse=plan, return_lse=True))  # the CPU gathered path
    want, want_lse = attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)


@pytest.mark.parametrize("drop", DROPS)
@pytest.mark.parametrize("shape", [(2, 2, 96, 96, 16, 16, 16), (1, 3, 70, 45, 8, 16, 8)], ids=["self", "ragged-cross"])
def test_gathered_path_equals_masked_reference(drop, shape):
    b, h, nq, nk, d, bq, bk = shape
    nqb, nkb = math.ceil(nq / bq), math.ceil(nk / bk)
    sel = random_selection((b, h, nqb, nkb), drop, seed=int(drop * 100))
    sel[0, 0, 1] = False  # a query block with no key block: out 0, lse -inf
    for form in (dict(mask=sel), dict(lut=lut_from_mask(sel)[0])):
        plan = BlockSparsePlan(bq, bk, **form)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            q, k, v = qkv(b, h, nq, nk, d, seed=3, dtype=dtype)
            want, want_lse = reference(q, k, v, plan)
            out, lse = attention(q, k, v, spec=KernelSpec(sparse=plan, return_lse=True))
            torch.testing.assert_close(out, want, rtol=0, atol=tol)
            torch.testing.assert_close(lse, want_lse, rtol=0, atol=tol)
            assert bool((lse[0, 0, bq:2 * bq] == -math.inf).all()) and not bool(out[0, 0, bq:2 * bq].any())


@pytest.mark.parametrize("drop", DROPS)
def test_rectified_plan_on_gathered_path_equals_reference(drop):
    b, h, n, d, bs = 1, 2, 130, 16, 16
    q, k, v = qkv(b, h, n, n, d, seed=5, dtype=torch.float32)
    nb = math.ceil(n / bs)
    plan = block_sparse_plan(q, k, v, block_q=bs, top_k=int((1 - drop) * nb))
    counts = (plan.lut >= 0).sum(-1)
    assert bool((counts >= int((1 - drop) * nb)).all())  # the top_k floor
    # the budget: top_k, or the blocks holding p_remain = 0.3 of the (here nearly flat) pooled mass
    assert float(counts.float().mean()) / nb <= max(1 - drop, 0.3) + 2 / nb
    out = attention(q, k, v, spec=KernelSpec(sparse=plan))
    want = plan.rectify(reference(q, k, v, BlockSparsePlan(bs, bs, lut=plan.lut))[0])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, reference(q, k, v, plan)[0], rtol=0, atol=1e-5)


def test_gathered_path_chunks_do_not_change_the_result():
    q, k, v = qkv(1, 2, 64, 64, 16, seed=2, dtype=torch.float32)
    sel = random_selection((1, 2, 4, 4), 0.5, seed=4)
    lut, counts = lut_from_mask(sel)
    one, l1 = gathered_attention(q, k, v, lut, counts, 16, 16, chunk_bytes=1)  # one query block per chunk
    all_, l2 = gathered_attention(q, k, v, lut, counts, 16, 16, chunk_bytes=1 << 30)
    torch.testing.assert_close(one, all_, rtol=0, atol=1e-6)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the paper's formulas, float64


def paper_rectified(q, k, v, sel, bs, text=None, live=None):
    """Rectified SpaAttn written from the note's §1.2, in float64, block by block with loops.

    sel: bool [B, H, NQ, NK] the selected key blocks; text: bool [N] isolated (text) keys;
    live: bool [B, N] the keys each batch row may attend to (``None``: all): a row's masked keys
    are in none of its sums (pooled means, cluster sizes, text columns, the exact attention).
    Returns (O, R [B, H, NQ], comp [B, H, NQ, D]).
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, D = q.shape
    nb = math.ceil(N / bs)
    text = torch.zeros(N, dtype=torch.bool) if text is None else text
    live = torch.ones(B, N, dtype=torch.bool) if live is None else live
    scale = D ** -0.5
    out = torch.zeros_like(q)
    R = torch.zeros(B, H, nb, dtype=torch.float64)
    comp = torch.zeros(B, H, nb, D, dtype=torch.float64)
    for bb in range(B):
        alive = [j for j in range(nb) if live[bb, j * bs:(j + 1) * bs].any()]  # blocks with a live key of the row
        for hh in range(H):
            kbar, dk, vbar, cnt = [], [], [], []
            for j in range(nb):  # step 2: pooled keys (text and masked keys excluded), deviations, pooled values
                idx = [t for t in range(j * bs, min(N, (j + 1) * bs)) if not text[t] and live[bb, t]]
                cnt.append(len(idx))
                kj = k[bb, hh, idx] if idx else torch.zeros(1, D, dtype=torch.float64)
                kbar.append(kj.mean(0))
                dk.append((kj - kj.mean(0)).abs().mean(0))
                vbar.append(v[bb, hh, idx].mean(0) if idx else torch.zeros(D, dtype=torch.float64))
            k_text = k[bb, hh, text & live[bb]]
            for i in range(nb):
                rows = slice(i * bs, min(N, (i + 1) * bs))
                qi = q[bb, hh, rows]
                qbar, dq = qi.mean(0), (qi - qi.mean(0)).abs().mean(0)
                # step 3: softmax over pooled columns (non-empty blocks) and the isolated text keys
                cols = [j for j in range(nb) if cnt[j] > 0]
                s = torch.stack([qbar @ kbar[j] for j in cols] + [qbar @ kt for kt in k_text]) * scale
                p = torch.softmax(s, 0)
                pv, pt = p[:len(cols)], p[len(cols):]
                # step 4 (IPAR): a pooled column stands for c_j tokens, a text column for one
                Z = sum(cnt[j] * pv[n] for n, j in enumerate(cols)) + pt.sum()
                phat = {j: cnt[j] * pv[n] / Z for n, j in enumerate(cols)}
                # step 6 (GAPR): rectify only where the gain beats the first-order pooling error
                keep = {j: bool(sel[bb, hh, i, j]) or not (
                    abs(qbar @ kbar[j]) > abs(dq @ kbar[j]) + abs(qbar @ dk[j])) for j in cols}
                # step 7: R over C' = selected ∪ untrusted ∪ text; comp over the rest with pooled V
                if all(bool(sel[bb, hh, i, j]) for j in alive):
                    r, c = torch.tensor(1.0, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
                else:
                    r = sum(phat[j] for j in cols if keep[j]) + pt.sum() / Z
                    c = sum((phat[j] * vbar[j] for j in cols if not keep[j]), torch.zeros(D, dtype=torch.float64))
                R[bb, hh, i], comp[bb, hh, i] = r, c
                # steps 8-9: softmax over the selected blocks' live tokens, then O = R·O_sparse + comp
                keys = [t for j in range(nb) if sel[bb, hh, i, j] for t in range(j * bs, min(N, (j + 1) * bs))
                        if live[bb, t]]
                logits = qi @ k[bb, hh, keys].T * scale
                out[bb, hh, rows] = r * (torch.softmax(logits, -1) @ v[bb, hh, keys]) + c
    return out, R, comp


@pytest.mark.parametrize("with_text", [False, True], ids=["video", "video+text"])
def test_rectified_output_equals_float64_paper_formula(with_text):
    b, h, n, d, bs = 1, 2, 88, 8, 16  # ragged last block
    q, k, v = smooth_qkv(b, h, n, d, seed=11)
    nb = math.ceil(n / bs)
    text = None
    forced = None
    if with_text:  # text last (as the control orders it): tokens 72.. are isolated keys, their blocks forced
        text = torch.zeros(n, dtype=torch.bool)
        text[72:] = True
        forced = torch.zeros(nb, dtype=torch.bool)
        forced[72 // bs:] = True
    plan = block_sparse_plan(q, k, v, block_q=bs, top_k=2, pooled_keys=None if text is None else ~text,
                             forced_keys=forced, dense_queries=forced)
    sel = plan.block_mask(n)
    assert not bool(sel.all()) and bool((plan.rescale < 1).any())
    want, r64, c64 = paper_rectified(q, k, v, sel.expand(b, h, nb, nb), bs, text)
    torch.testing.assert_close(plan.rescale, r64, rtol=0, atol=1e-12)
    torch.testing.assert_close(plan.comp, c64, rtol=0, atol=1e-12)
    out = attention(q, k, v, spec=KernelSpec(sparse=plan))  # float64 on the gathered path
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    ref = attention(q, k, v, spec=KernelSpec(sparse=plan), backend="torch")
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-10)
    # fp32 inputs: within plain fp32 error of the float64 formula
    p32 = block_sparse_plan(q.float(), k.float(), v.float(), block_q=bs, top_k=2,
                            pooled_keys=None if text is None else ~text, forced_keys=forced, dense_queries=forced)
    assert torch.equal(p32.block_mask(n), sel)
    out32 = attention(q.float(), k.float(), v.float(), spec=KernelSpec(sparse=p32))
    torch.testing.assert_close(out32.double(), want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- per-row key masks


def row_masks(b, n, seed=0):
    """bool [B, N] per-row live keys, as a batch of prompts of different lengths gives them plus
    holes: row 0 masks the whole key block 16..32, part of block 48..64 and its text tail 76..;
    row 1 masks its text tail 84.. only (N = 88, blocks of 16)."""
    live = torch.ones(b, n, dtype=torch.bool)
    live[0, 16:32] = False
    live[0, 50:55] = False
    live[0, 76:] = False
    if b > 1:
        live[1, 84:] = False
    return live


def masked_dense(q, k, v, live):
    """Dense attention with the per-row key mask (SDPA through the reference)."""
    return attention(q, k, v, bias=live.view(live.shape[0], 1, 1, -1))


@pytest.mark.parametrize("mode", ["rectified", "vanilla", "random"])
def test_every_block_selected_with_a_row_key_mask_equals_masked_dense(mode):
    b, h, n, d, bs = 2, 2, 88, 16, 16  # ragged last block
    q, k, v = qkv(b, h, n, n, d, seed=21, dtype=torch.float32)
    live = row_masks(b, n)
    km = live.view(b, 1, n)  # [B, 1, Nk]
    nb = math.ceil(n / bs)
    plan = block_sparse_plan(q, k, v, block_q=bs, top_k=nb, mode=mode, key_mask=km,
                             generator=torch.Generator().manual_seed(0))
    sel = plan.block_mask(n)
    assert not bool(sel[0, :, :, 1].any()) and bool(sel[1, :, :, 1].all())  # row 0's dead block: never selected
    if mode == "rectified":
        assert bool((plan.rescale == 1).all()) and bool((plan.comp == 0).all())  # every live block: exactly dense
    want = masked_dense(q, k, v, live)
    spec = KernelSpec(sparse=plan, bias=km.unsqueeze(-2), return_lse=True)
    for backend in ("auto", "torch"):  # the gathered CPU path, the masked reference
        out, lse = attention(q, k, v, spec=spec, backend=backend)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    lut, counts = plan.compact_lut(n)
    out, _ = gathered_attention(q, k, v, lut, counts, bs, bs, key_mask=km)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_a_key_mask_bias_takes_the_sparse_kernels_and_other_biases_the_reference():
    from diffattn.kernels import _route

    q, k, v = qkv(2, 2, 32, 32, 8, dtype=torch.float32)
    plan = BlockSparsePlan(16, 16, mask=torch.ones(1, 1, 2, 2, dtype=torch.bool))
    km = torch.ones(2, 1, 1, 32, dtype=torch.bool)
    assert _route("auto", q, k, v, km, sparse=plan) == "sparse_cpu"
    assert _route("auto", q, k, v, km[0, 0, 0], sparse=plan) == "sparse_cpu"  # [Nk]: broadcast over everything
    assert _route("auto", q, k, v, km.expand(2, 1, 32, 32), sparse=plan) == "reference"  # per query: masked
    assert _route("auto", q, k, v, torch.zeros(2, 1, 1, 32), sparse=plan) == "reference"  # float bias
    assert key_mask_of(km, 32).shape == (2, 1, 32) and key_mask_of(km, 31) is None
    assert key_mask_of(None, 32) is None and key_mask_of(km.float(), 32) is None


@pytest.mark.parametrize("with_text", [False, True], ids=["video", "video+text"])
def test_rectified_output_with_a_row_key_mask_equals_float64_formula(with_text):
    b, h, n, d, bs = 2, 2, 88, 8, 16
    q, k, v = smooth_qkv(b, h, n, d, seed=13)
    live = row_masks(b, n)
    nb = math.ceil(n / bs)
    text = forced = None
    if with_text:  # text last: tokens 72.. isolated keys, their blocks forced and dense rows (HunyuanVideo)
        text = torch.zeros(n, dtype=torch.bool)
        text[72:] = True
        forced = torch.zeros(nb, dtype=torch.bool)
        forced[72 // bs:] = True
    kw = dict(block_q=bs, top_k=2, pooled_keys=None if text is None else ~text, forced_keys=forced,
              dense_queries=forced, key_mask=live.view(b, 1, n))
    plan = block_sparse_plan(q, k, v, **kw)
    sel = plan.block_mask(n).expand(b, h, nb, nb)
    assert not bool(sel[0, :, :, 1].any())  # a block row 0 masks entirely: never selected, even in dense rows
    assert bool((plan.rescale < 1).any()) and bool((plan.comp != 0).any())
    want, r64, c64 = paper_rectified(q, k, v, sel, bs, text, live)
    torch.testing.assert_close(plan.rescale, r64, rtol=0, atol=1e-12)
    torch.testing.assert_close(plan.comp, c64, rtol=0, atol=1e-12)
    spec = KernelSpec(sparse=plan, bias=live.view(b, 1, 1, n))
    for backend in ("auto", "torch"):  # float64: the gathered path, the masked reference
        torch.testing.assert_close(attention(q, k, v, spec=spec, backend=backend), want, rtol=0, atol=1e-10)
    # fp32 inputs: the same selection, within plain fp32 error of the float64 formula
    q32, k32, v32 = q.float(), k.float(), v.float()
    p32 = block_sparse_plan(q32, k32, v32, **kw)
    assert torch.equal(p32.block_mask(n).expand(b, h, nb, nb), sel)
    out32 = attention(q32, k32, v32, spec=KernelSpec(sparse=p32, bias=live.view(b, 1, 1, n)))
    torch.testing.assert_close(out32.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["rectified", "vanilla"])
def test_batch_rows_are_independent_under_a_row_key_mask(mode):
    """Row 0 of a 2-row batch (rows with different key masks) equals row 0 computed alone with
    its own mask, and alone with its masked tail cut off (what the control does for one prompt)."""
    b, h, n, d, bs = 2, 2, 88, 8, 16
    q, k, v = smooth_qkv(b, h, n, d, seed=17)
    q, k, v = q.float(), k.float(), v.float()
    live = row_masks(b, n)
    text = torch.zeros(n, dtype=torch.bool)
    text[72:] = True
    nb = math.ceil(n / bs)
    forced = torch.zeros(nb, dtype=torch.bool)
    forced[72 // bs:] = True

    def run(q, k, v, live):
        m = live.view(live.shape[0], 1, -1)  # [B, 1, Nk]
        nkb = math.ceil(k.shape[2] / bs)
        plan = block_sparse_plan(q, k, v, block_q=bs, top_k=2, mode=mode, pooled_keys=~text[:k.shape[2]],
                                 forced_keys=forced[:nkb], dense_queries=forced, key_mask=m)
        return plan, attention(q, k, v, spec=KernelSpec(sparse=plan, bias=m.unsqueeze(-2)))

    plan, out = run(q, k, v, live)
    assert not torch.allclose(out[1], run(q[1:], k[1:], v[1:], live[:1])[1][0], atol=1e-3)  # the masks matter
    alone, out0 = run(q[:1], k[:1], v[:1], live[:1])
    n0 = 76  # row 0's live prefix ends at its text tail: cut, as live_keys does for a single prompt
    cut, out_cut = run(q[:1], k[:1, :, :n0], v[:1, :, :n0], live[:1, :n0])
    for other, o in ((alone, out0), (cut, out_cut)):
        got = other.block_mask(k.shape[2] if other is alone else n0)
        assert torch.equal(got, plan.block_mask(n)[:1, ..., :got.shape[-1]])
        if mode == "rectified":
            torch.testing.assert_close(other.rescale, plan.rescale[:1], rtol=0, atol=1e-6)
            torch.testing.assert_close(other.comp, plan.comp[:1], rtol=0, atol=1e-6)
        torch.testing.assert_close(o, out[:1], rtol=0, atol=1e-5)


def test_row_key_mask_splits_key_masks_from_other_biases():
    m = torch.tensor([[True] * 5 + [False] * 3, [True] * 8]).view(2, 1, 1, 8)
    rest, km = row_key_mask(m, 8)
    assert rest is None and torch.equal(km, m[:, :, 0])
    rest, km = row_key_mask(torch.zeros(2, 1, 1, 8).masked_fill(~m, float("-inf")), 8)  # 0 / -inf: a key mask
    assert rest is None and torch.equal(km, m[:, :, 0])
    soft = torch.zeros(2, 1, 1, 8).masked_fill(~m, float("-inf")) + 0.5  # a float bias: kept for the reference
    rest, km = row_key_mask(soft, 8)
    assert rest is soft and torch.equal(km, m[:, :, 0])
    per_query = m.expand(2, 1, 4, 8).clone()
    per_query[0, 0, 0, 0] = False  # differs between queries: kept; key 0 still seen by other queries
    rest, km = row_key_mask(per_query, 8)
    assert rest is per_query and torch.equal(km, m[:, :, 0])


def test_rectification_is_closer_to_dense_than_vanilla_on_average():
    """The point of R and comp: on smooth (correlated) tokens the rectified output is nearer dense."""
    b, h, n, d, bs = 1, 4, 256, 16, 16
    q, k, v = smooth_qkv(b, h, n, d, seed=3)
    dense = attention(q, k, v)
    errs = {}
    for mode in ("rectified", "vanilla"):
        plan = block_sparse_plan(q, k, v, block_q=bs, top_k=4, mode=mode)
        errs[mode] = (attention(q, k, v, spec=KernelSpec(sparse=plan)) - dense).norm()
    assert errs["rectified"] < errs["vanilla"], errs


def test_selection_rule_and_lut():
    mass = torch.tensor([[[[0.5, 0.1, 0.25, 0.15], [0.05, 0.05, 0.05, 0.85]]]])
    sel = topk_blocks(mass, top_k=1, p_remain=0.3)
    # row 0: cumsum 0.5 > 0.3 -> 0 + 1 = 1 block; row 1: 0.85 -> 1 block
    assert sel.tolist() == [[[[True, False, False, False], [False, False, False, True]]]]
    sel = topk_blocks(mass, top_k=3, p_remain=0.3, candidates=torch.tensor([True, True, False, True]))
    assert sel.tolist() == [[[[True, True, False, True], [True, True, False, True]]]]
    lut, counts = lut_from_mask(sel)
    assert lut.dtype == torch.int32 and lut.tolist() == [[[[0, 1, 3], [0, 1, 3]]]] and counts.tolist() == [[[3, 3]]]
    lut, counts = lut_from_mask(torch.tensor([[True, False, True], [False, False, False]]))
    assert lut.tolist() == [[0, 2], [-1, -1]] and counts.tolist() == [2, 0]
    # a LUT with repeats and gaps is normalised before a kernel uses it
    plan = BlockSparsePlan(4, 4, lut=torch.tensor([[[[2, -1, 2, 0]]]]))
    assert plan.compact_lut(12)[0].tolist() == [[[[0, 2]]]]


def test_block_stats_are_padding_and_text_aware():
    q, k, v = qkv(1, 1, 20, 20, 4, seed=9)
    pooled = torch.ones(20, dtype=torch.bool)
    pooled[18:] = False
    st = block_stats(q, k, v, 8, 8, pooled_keys=pooled)
    assert st.count.tolist() == [8, 8, 2]
    torch.testing.assert_close(st.kbar[0, 0, 2], k[0, 0, 16:18].mean(0))
    torch.testing.assert_close(st.qbar[0, 0, 2], q[0, 0, 16:20].mean(0))
    torch.testing.assert_close(st.dq[0, 0, 2], (q[0, 0, 16:20] - q[0, 0, 16:20].mean(0)).abs().mean(0))


# ----------------------------------------------------------------------------- layout math


def test_tiled_order_and_neighbours():
    perm = tiled_order((3, 4, 8), (1, 4, 4))
    assert sorted(perm.tolist()) == list(range(96))
    grid = torch.arange(96).view(3, 4, 8)
    assert set(perm[:16].tolist()) == set(grid[0, :, :4].reshape(-1).tolist())  # the first tile is one block
    assert default_tile(128, 3) == (2, 8, 8) and default_tile(16, 3) == (1, 4, 4) and default_tile(128, 2) == (8, 16)
    block_of = torch.empty(96, dtype=torch.long)
    block_of[perm] = torch.arange(96) // 16
    m = neighbour_blocks(block_of.view(3, 4, 8), 6)
    assert torch.equal(m, m.T) and bool(m.diagonal().all())
    assert bool(m[0, 1]) and bool(m[0, 2]) and not bool(m[0, 5])  # frame 0 left tile: not frame 2 right tile


def test_static_layout_puts_text_last_and_forces_it():
    text, img = Segment("text", 0, 10), Segment("image", 10, 74, (8, 8))
    st = static_layout(TokenLayout((text, img), (text, img)), 16, None)
    assert st.perm[64:].tolist() == list(range(10)) and sorted(st.perm[:64].tolist()) == list(range(10, 74))
    assert st.pooled[:64].all() and not st.pooled[64:].any()
    assert st.forced.tolist() == [False] * 4 + [True] and st.n_video_blocks == 4
    with pytest.raises(LayoutError, match="token grid"):
        static_layout(TokenLayout((Segment("image", 0, 64),), (Segment("image", 0, 64),)), 16, None)


# ----------------------------------------------------------------------------- the control on tiny pipelines


def _wan_kwargs(tiny_inputs, **kw):
    return tiny_inputs("wan", size=64, num_frames=9, **kw)  # 3 x 4 x 4 = 48 video tokens: 3 blocks of 16


def test_control_on_tiny_wan(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("wan", head_dim=16)
    base = output_of(pipe(**_wan_kwargs(tiny_inputs)))
    # warm-up: the defaults keep layers 0-1 (all of this model) and steps 0-4 dense: bit-equal
    with da.attach(pipe, da.RectifiedSparseAttention(block_size=16)):
        assert torch.equal(output_of(pipe(**_wan_kwargs(tiny_inputs))), base)
    outs = {}
    for mode in ("rectified", "vanilla", "random"):
        ctrl = da.RectifiedSparseAttention(drop=0.5, mode=mode, block_size=16, dense_layers=0, dense_steps=0,
                                           neighbours=False, first_frame=False)
        with da.attach(pipe, ctrl):
            outs[mode] = output_of(pipe(**_wan_kwargs(tiny_inputs)))
        assert bool(torch.isfinite(outs[mode]).all()) and not torch.equal(outs[mode], base)
    assert not torch.equal(outs["rectified"], outs["vanilla"])
    assert torch.equal(output_of(pipe(**_wan_kwargs(tiny_inputs))), base)  # detach restores exactly
    with da.attach(pipe, da.RectifiedSparseAttention(drop=0.0, block_size=16, dense_layers=0, dense_steps=0)):
        torch.testing.assert_close(output_of(pipe(**_wan_kwargs(tiny_inputs))), base, rtol=0, atol=1e-5)


def test_wan_warm_up_step_is_bit_equal_then_sparse(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("wan", head_dim=16)

    def latents(ctrl=None):
        seen = []

        def grab(p, i, t, kw):
            seen.append(kw["latents"].clone())
            return kw

        kwargs = _wan_kwargs(tiny_inputs, callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])
        if ctrl is None:
            pipe(**kwargs)
        else:
            with da.attach(pipe, ctrl):
                pipe(**kwargs)
        return seen

    base = latents()
    got = latents(da.RectifiedSparseAttention(drop=0.5, block_size=16, dense_layers=1, dense_steps=1,
                                              neighbours=False, first_frame=False))
    assert torch.equal(got[0], base[0]) and not torch.equal(got[1], base[1])


def test_control_on_tiny_flux(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("flux")  # 64 px: 16 x 16 = 256 image tokens + 16 text tokens
    base = output_of(pipe(**tiny_inputs("flux", size=64)))
    ctrl = da.RectifiedSparseAttention(drop=0.75, block_size=16)
    with da.attach(pipe, ctrl):
        assert ctrl.settings("single_transformer_blocks.0.attn") == dict(layer=2, drop=0.75, dense=False,
                                                                          first_frame=False)
        out = output_of(pipe(**tiny_inputs("flux", size=64)))
    assert bool(torch.isfinite(out).all()) and not torch.equal(out, base)
    assert torch.equal(output_of(pipe(**tiny_inputs("flux", size=64))), base)
    with da.attach(pipe, da.RectifiedSparseAttention(drop=0.75, block_size=16, dense_layers=4)):  # all dense
        assert torch.equal(output_of(pipe(**tiny_inputs("flux", size=64))), base)
    with da.attach(pipe, da.RectifiedSparseAttention(drop=0.0, block_size=16)):
        torch.testing.assert_close(output_of(pipe(**tiny_inputs("flux", size=64))), base, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,match", [
    (dict(drop=1.0), r"must lie in \[0, 1\)"),
    (dict(drop=-0.1), r"must lie in \[0, 1\)"),
    (dict(drop="0.5"), r"must lie in \[0, 1\)"),
    (dict(block_size=24), "multiple of 16"),
    (dict(block_size=8), "multiple of 16"),
    (dict(block_size=128, tile=(2, 8, 4)), "product is block_size"),
    (dict(block_size=48), None),  # accepted with a tile; the default tile needs a power of two (at the call)
    (dict(mode="dense"), "choose one of"),
    (dict(dense_layers=-1), "must not be negative"),
    (dict(dense_steps=-2), "leading denoising steps"),
])
def test_bad_control_arguments_raise_config_errors(kw, match):
    if match is None:
        da.RectifiedSparseAttention(**kw)
        with pytest.raises(ConfigError, match="power of two"):
            default_tile(48, 3)
        return
    with pytest.raises(ConfigError, match=match):
        da.RectifiedSparseAttention(**kw)


def test_family_without_a_video_or_image_layout_raises(tiny_pipe):
    with pytest.raises(ControlError, match="wan, flux"):
        da.attach(tiny_pipe("sd3"), da.RectifiedSparseAttention())


def test_sites_that_are_not_video_self_attention_are_refused(tiny_pipe):
    pipe = tiny_pipe("wan", head_dim=16)
    cross = [s.name for s in da.sites(pipe) if s.kind == "cross"]
    with pytest.raises(ControlError, match="are not such sites"):
        da.attach(pipe, da.RectifiedSparseAttention(sites=cross[:1]))
    from diffattn.engine import is_attached

    assert not is_attached(pipe)


def test_wan_i2v_takes_its_own_defaults(tiny_pipe):
    """Wan image-to-video (the official I2V script): drop 0.75, the first two layers dense, no
    dense warm-up steps (T2V keeps five)."""
    i2v, t2v = da.RectifiedSparseAttention(block_size=16), da.RectifiedSparseAttention(block_size=16)
    with da.attach(tiny_pipe("wan_i2v"), i2v):
        names = sorted(i2v._plan_sites, key=lambda n: i2v._plan_sites[n][0])
        assert [i2v.settings(n)["dense"] for n in names] == [True, True] + [False] * (len(names) - 2)
        assert {i2v.settings(n)["drop"] for n in names} == {0.75} and i2v.steps is None
    with da.attach(tiny_pipe("wan", head_dim=16), t2v):
        assert t2v.steps is not None and t2v.steps.start == 5


def test_bad_plans_raise_kernel_errors():
    q, k, v = qkv(1, 2, 32, 32, 8, dtype=torch.float32)
    sel = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(KernelError, match="rescale must be a floating tensor"):
        BlockSparsePlan(16, 16, mask=sel, rescale=torch.ones(1, 1, 2, dtype=torch.int64))
    with pytest.raises(KernelError, match=r"rescale of shape \(1, 1, 3\) does not fit"):
        attention(q, k, v, spec=KernelSpec(sparse=BlockSparsePlan(16, 16, mask=sel, rescale=torch.ones(1, 1, 3))))
    with pytest.raises(KernelError, match=r"comp of shape"):
        attention(q, k, v, spec=KernelSpec(sparse=BlockSparsePlan(16, 16, mask=sel, comp=torch.ones(1, 1, 2, 4))))
    plan = BlockSparsePlan(16, 16, mask=sel, rescale=torch.ones(1, 1, 2))
    with pytest.raises(KernelError, match="uniform_keys"):
        attention(q, k, v, spec=KernelSpec(sparse=plan, uniform_keys=SegmentUniform(torch.arange(4))))
    with pytest.raises(KernelError, match="choose one of"):
        block_sparse_plan(q, k, v, block_q=16, top_k=1, mode="dense")


def test_rectified_plan_with_head_blend_takes_the_reference():
    q, k, v = qkv(1, 2, 48, 48, 8, seed=4)
    plan = block_sparse_plan(q, k, v, block_q=16, top_k=1)
    u = torch.tensor([0.3, 0.0], dtype=torch.float64)
    got = attention(q, k, v, spec=KernelSpec(sparse=plan, head_blend=u))
    o = attention(q, k, v, spec=KernelSpec(sparse=plan))
    torch.testing.assert_close(got, (1 - u.view(1, 2, 1, 1)) * o + u.view(1, 2, 1, 1) * v, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- the Triton LUT kernel


def _triton_cases():
    return [(0.5, (1, 2, 96, 96, 16, 32, 32)), (0.75, (2, 1, 77, 77, 16, 16, 32)), (0.9, (1, 2, 160, 130, 24, 16, 16))]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", range(3), ids=[f"drop{d}" for d, _ in _triton_cases()])
def test_triton_lut_kernel_equals_reference(dtype, case):
    from diffattn.kernels.triton_sparse import sparse_attention_triton

    drop, (b, h, nq, nk, d, bq, bk) = _triton_cases()[case]
    nqb, nkb = math.ceil(nq / bq), math.ceil(nk / bk)
    sel = random_selection((b, 1, nqb, nkb), drop, seed=case)  # broadcast over heads
    sel[0, 0, 0] = False  # an empty query block
    q, k, v = qkv(b, h, nq, nk, d, seed=case, dtype=dtype, device=TRITON_DEVICE)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    plans = [BlockSparsePlan(bq, bk, mask=sel.to(TRITON_DEVICE))]
    if nq == nk and bq == bk:  # a rectified plan from the method's own selection
        plans.append(block_sparse_plan(q, k, v, block_q=bq, top_k=max(1, int((1 - drop) * nkb))))
    for plan in plans:
        want, want_lse = reference(q.double(), k.double(), v.double(), plan)
        out, lse = sparse_attention_triton(q, k, v, plan)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=tol)
        torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=tol)
        got = attention(q, k, v, spec=KernelSpec(sparse=plan), backend="triton")  # through the dispatcher
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


@needs_triton
@pytest.mark.parametrize("tile", [(16, 16), (16, 32), (32, 16)], ids=["16x16", "16x32", "32x16"])
def test_triton_tiles_smaller_than_the_blocks_equal_reference(tile):
    """Tiles smaller than the blocks, as CUDA's tuned configs pick at blocks of 128: several
    programs per query block (BLOCK_M < BQ) and several tiles per key block (BLOCK_N < BK), on a
    ragged length, for rectified plans of the method's own selection at every drop rate."""
    from diffattn.kernels.triton_sparse import sparse_attention_triton

    b, h, n, d, bs = 1, 2, 100, 16, 32
    q, k, v = qkv(b, h, n, n, d, seed=31, dtype=torch.float32, device=TRITON_DEVICE)
    nb = math.ceil(n / bs)
    for drop in (0.5, 0.75, 0.9):
        plan = block_sparse_plan(q, k, v, block_q=bs, top_k=max(1, int((1 - drop) * nb)))
        want, want_lse = reference(q.double(), k.double(), v.double(), plan)
        out, lse = sparse_attention_triton(q, k, v, plan, block=tile)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_row_key_mask_equals_reference(dtype):
    """A per-row key mask inside the selected blocks of the LUT kernel: every block selected gives
    masked dense attention; a rectified plan over live keys equals the float64 masked reference;
    a query block whose selected blocks are all masked for a row gives out = comp, lse = -inf."""
    from diffattn.kernels.triton_sparse import sparse_attention_triton

    b, h, n, d, bs = 2, 2, 88, 16, 16
    dev = TRITON_DEVICE
    q, k, v = qkv(b, h, n, n, d, seed=23, dtype=dtype, device=dev)
    live = row_masks(b, n).to(dev)
    km = live.view(b, 1, n)  # [B, 1, Nk]
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    q64, k64, v64 = q.double(), k.double(), v.double()
    nb = math.ceil(n / bs)
    every = BlockSparsePlan(bs, bs, lut=torch.arange(nb, dtype=torch.int32, device=dev).expand(1, 1, nb, nb))
    out, lse = sparse_attention_triton(q, k, v, every, key_mask=km)
    want, want_lse = attention(q64, k64, v64, bias=km.unsqueeze(-2), return_lse=True)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=tol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=tol)
    rect = block_sparse_plan(q, k, v, block_q=bs, top_k=2, key_mask=km)
    only_dead = torch.zeros(b, 1, nb, nb, dtype=torch.bool, device=dev)
    only_dead[0, 0, 2, 1] = only_dead[1, 0, 2, 1] = True  # query block 2 of row 0: block 1 only (dead in row 0)
    only_dead[:, :, [0, 1, 3, 4, 5], 0] = True
    hole = BlockSparsePlan(bs, bs, mask=only_dead, comp=torch.full((1, 1, nb, d), 0.5, device=dev))
    for plan in (rect, hole):
        want, want_lse = attention(q64, k64, v64, spec=KernelSpec(sparse=plan, bias=km.unsqueeze(-2),
                                                                 return_lse=True), backend="torch")
        out, lse = sparse_attention_triton(q, k, v, plan, key_mask=km)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=tol)
        torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=tol)
        got = attention(q, k, v, spec=KernelSpec(sparse=plan, bias=km.unsqueeze(-2)), backend="triton")
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)  # through the dispatcher
    assert bool((lse[0, :, 2 * bs:3 * bs] == -math.inf).all()) and bool((out[0, :, 2 * bs:3 * bs] == 0.5).all())


@needs_triton
def test_triton_every_block_selected_equals_dense():
    from diffattn.kernels.triton_sparse import sparse_attention_triton

    q, k, v = qkv(1, 2, 80, 80, 32, seed=8, dtype=torch.float32, device=TRITON_DEVICE)
    plan = BlockSparsePlan(32, 16, lut=torch.arange(5, dtype=torch.int32, device=TRITON_DEVICE).expand(1, 1, 3, 5))
    out, lse = sparse_attention_triton(q, k, v, plan)
    want, want_lse = attention(q.double(), k.double(), v.double(), return_lse=True)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-5)


@pytest.mark.skipif(INTERPRET or CUDA, reason="the Triton tests run directly in this process")
def test_triton_suite_in_interpreter():
    """Run the test_triton_* tests above on CPU under TRITON_INTERPRET=1 in a child pytest."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x", "-p", "no:cacheprovider",
           "-k", "test_triton_ and not test_triton_suite_in_interpreter"]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, f"interpreter suite failed ({summary}):\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
