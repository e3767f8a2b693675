"""IR-Diffusion's mask and attention math (diffattn.methods.ir) against references written
cell by cell from the paper's definitions (../shared/reference/astar_ir_uam.md §2)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffattn.errors import ControlError
from diffattn.methods.ir import (box_of, isolation_bias, mask_dropout, otsu_threshold, postprocess_masks,
                                 reposition, resize_mask)


def _otsu_reference(values, bins=256):
    """Exhaustive Otsu over the same histogram: every cut, the between-class variance."""
    v = values.double().flatten().numpy()
    lo, hi = v.min(), v.max()
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist / hist.sum()
    c = (edges[:-1] + edges[1:]) / 2
    var = {}
    for k in range(bins - 1):
        w0, w1 = p[:k + 1].sum(), p[k + 1:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0, m1 = (p[:k + 1] * c[:k + 1]).sum() / w0, (p[k + 1:] * c[k + 1:]).sum() / w1
        var[edges[k + 1]] = w0 * w1 * (m0 - m1) ** 2
    best = max(var.values())
    return [cut for cut, v in var.items() if v >= best * (1 - 1e-9)]  # cuts across empty bins tie


def test_otsu_matches_an_exhaustive_search_and_splits_two_modes():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(500) * 0.1, torch.randn(300) * 0.1 + 1.0])
    t = otsu_threshold(x)
    assert any(abs(t - cut) < 1e-9 for cut in _otsu_reference(x))
    assert 0.3 < t < 0.7
    assert otsu_threshold(torch.full((5,), 2.0)) == 2.0


def test_resize_mask_and_box():
    m = torch.zeros(16, 16)
    m[4:8, 2:10] = 1.0
    r = resize_mask(m, (8, 8))
    assert r.dtype == torch.bool and box_of(r) == (2, 4, 1, 5)
    assert box_of(torch.zeros(3, 3, dtype=torch.bool)) is None


def _reposition_reference(hidden, h, w, rm, tm):
    """Cell by cell: scene cell (y, x) in T's box takes reference cell (y0 + ⌊(y - ty0)·hr/th⌋, ...)."""
    c = hidden.shape[-1]
    canvas = torch.zeros(h, w, c, dtype=hidden.dtype)
    moved = torch.zeros(h, w, dtype=torch.bool)
    ry0, ry1, rx0, rx1 = box_of(rm)
    ty0, ty1, tx0, tx1 = box_of(tm)
    hr, wr, th, tw = ry1 - ry0, rx1 - rx0, ty1 - ty0, tx1 - tx0
    g = hidden.reshape(h, w, c)
    for y in range(ty0, ty1):
        for x in range(tx0, tx1):
            sy = ry0 + (y - ty0) * hr // th
            sx = rx0 + (x - tx0) * wr // tw
            if rm[sy, sx]:
                canvas[y, x] = g[sy, sx]
                moved[y, x] = True
    return canvas.reshape(h * w, c), moved


@pytest.mark.parametrize("boxes", [((1, 4, 1, 3), (3, 9, 4, 8)), ((0, 6, 0, 6), (5, 8, 6, 9)), ((2, 5, 2, 5), (2, 5, 2, 5))])
def test_reposition_moves_the_masked_crop_by_nearest(boxes):
    h, w = 10, 10
    torch.manual_seed(1)
    hidden = torch.randn(h * w, 3, dtype=torch.float64)
    (a, b, c, d), (e, f, g, k) = boxes
    rm = torch.zeros(h, w, dtype=torch.bool)
    rm[a:b, c:d] = True
    rm[a, c] = False  # a ragged subject: masked-out cells of the box stay zero
    tm = torch.zeros(h, w, dtype=torch.bool)
    tm[e:f, g:k] = True
    got, moved = reposition(hidden, (h, w), rm, tm)
    want, want_moved = _reposition_reference(hidden, h, w, rm, tm)
    assert torch.equal(moved, want_moved) and torch.equal(got, want)
    assert not got.reshape(h, w, 3)[~tm].any()  # nothing outside the scene subject's box
    empty, none = reposition(hidden, (h, w), torch.zeros_like(rm), tm)
    assert not empty.any() and not none.any()
    with pytest.raises(ControlError, match="grid"):
        reposition(hidden[:5], (h, w), rm, tm)


def test_isolation_bias_is_minus_inf_between_different_subjects_only():
    torch.manual_seed(2)
    s, n = 3, 12
    masks = torch.rand(s, n) > 0.6
    masks[:, 0] = False  # a background cell
    masks[0, 1] = masks[1, 1] = True  # a cell shared by two subjects
    bias = isolation_bias(masks)
    for p in range(n):
        for j in range(n):
            cross = any(masks[i, p] and masks[k, j] for i in range(s) for k in range(s) if i != k)
            assert (bias[p, j] == float("-inf")) == cross and (cross or bias[p, j] == 0)
    assert (bias[0] == 0).all() and (bias[:, 0] == 0).all()  # background rows and columns untouched


def test_mask_dropout_keeps_a_fresh_share():
    m = torch.ones(64, 64, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    a, b = mask_dropout(m, 0.5, g), mask_dropout(m, 0.5, g)
    assert 0.45 < a.float().mean() < 0.55 and not torch.equal(a, b)  # fresh per draw
    assert not (mask_dropout(~m, 0.5, g)).any() and torch.equal(mask_dropout(m, 0.0), m)
    with pytest.raises(ControlError, match="dropout"):
        mask_dropout(m, 1.0)


def test_postprocess_closes_grows_and_separates():
    h = w = 48
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, 5:25, 5:25] = True
    masks[0, 14:16, 5:25] = False  # a crack the closing fills
    masks[1, 30:32, 30:32] = True  # a speck grown to a 16-cell box (256/768 of 48)
    masks[2, 20:30, 20:30] = True  # overlaps subject 0
    out = postprocess_masks(masks)
    assert out[0, 14, 10] and box_of(out[0]) == (5, 25, 5, 25)  # closed, clipped to its box
    assert box_of(out[1]) == (23, 39, 23, 39)
    assert not (out.sum(0) > 1).any()  # disjoint
    assert not out[0, 22, 22] and not out[2, 22, 22]  # the shared cells belong to neither


# ----------------------------------------------------------------------------- IsolationAttention


def test_isolation_mask_covers_the_image_block_only():
    from diffattn.families.sd3 import sd3_layout
    from diffattn.methods.ir import isolation_mask

    masks = torch.zeros(2, 8, 8)
    masks[0, :, :4] = 1  # left half, right half: resized to the 4 x 4 grid of this call
    masks[1, :, 4:] = 1
    layout = sd3_layout(16, 5, grid=(4, 4))
    allowed = isolation_mask(layout, masks)
    assert allowed.shape == (21, 21)
    assert allowed[:, 16:].all() and allowed[16:, :].all()  # text rows and keys untouched
    left = torch.tensor([x < 2 for y in range(4) for x in range(4)])
    for p in range(16):
        for j in range(16):
            assert allowed[p, j] == (left[p] == left[j])
    one = isolation_mask(layout, masks[:1])
    assert one is None  # one subject: nothing to forbid


def test_isolation_attention_on_pipelines():
    import diffattn as da
    from diffattn.tiny import output_of, tiny_call_kwargs, tiny_pipeline

    for family in ("sd", "sd3"):
        pipe = tiny_pipeline(family)
        kw = lambda: tiny_call_kwargs(family, steps=2, size=32)  # noqa: E731  (a fresh generator per call)
        base = output_of(pipe(**kw()))
        masks = torch.zeros(2, 32, 32)
        masks[0, :, :16] = 1
        masks[1, :, 16:] = 1
        with da.attach(pipe, da.IsolationAttention(masks[:1])):
            assert torch.equal(output_of(pipe(**kw())), base)  # one subject: exact
        with da.attach(pipe, da.IsolationAttention(masks)):
            got = output_of(pipe(**kw()))
        assert torch.isfinite(got).all() and not torch.allclose(got, base, atol=1e-6)
    with pytest.raises(ControlError, match=r"\[S, H, W\]"):
        da.IsolationAttention(torch.zeros(4, 4))


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_isolation_refuses_video_models_and_leaves_them_untouched(family):
    """On a video DiT the image masks cannot describe moving subjects: attaching is an error
    (it used to find no image grid and change nothing), and the model is left as it was."""
    import diffattn as da
    from diffattn.tiny import output_of, tiny_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline(family)
    base = output_of(pipe(**tiny_call_kwargs(family)))
    with pytest.raises(ControlError, match=f"family {family} attends over a video"):
        da.attach(pipe, da.IsolationAttention(torch.ones(2, 16, 16)))
    assert torch.equal(output_of(pipe(**tiny_call_kwargs(family))), base)


# ----------------------------------------------------------------------------- RepositionAttention


def test_reposition_attention_matches_a_float64_reference():
    import diffattn as da
    from diffattn.families.unet import unet_layout
    from diffattn.controls import AttentionCall
    from diffattn.processors.base import run_controls

    torch.manual_seed(3)
    h = w = 4
    n, heads, d = h * w, 2, 8
    q, k, v = (torch.randn(2, heads, n, d, dtype=torch.float64) for _ in range(3))  # rows: [ref, scene]
    ref = torch.zeros(1, h, w)
    ref[0, 0:2, 0:2] = 1
    scene = torch.zeros(1, h, w)
    scene[0, 2:4, 2:4] = 1
    ctrl = da.RepositionAttention(ref, scene, dropout=0.0)
    call = AttentionCall(None, unet_layout(n, n, cross=False, grid=(h, w)), q, k, v, branches={"cond": slice(0, 2)})
    got = run_controls(call, [ctrl])  # [B, H, N, D]

    def attend(qq, kk, vv):
        p = torch.softmax(qq @ kk.T / math.sqrt(d), dim=-1)
        return p @ vv

    ref_cells = [y * w + x for y in range(2) for x in range(2)]
    scene_cells = {(y + 2) * w + (x + 2) for y in range(2) for x in range(2)}
    want = torch.empty_like(got)
    for hd in range(heads):
        want[0, hd] = attend(q[0, hd], k[0, hd], v[0, hd])  # the reference row: stock
        for p in range(n):
            keys, vals = k[1, hd], v[1, hd]
            if p in scene_cells:  # a subject query: its own keys and the reference subject's
                keys = torch.cat([keys, k[0, hd, ref_cells]])
                vals = torch.cat([vals, v[0, hd, ref_cells]])
            want[1, hd, p] = attend(q[1, hd, p:p + 1], keys, vals)[0]
    assert torch.allclose(got, want, atol=1e-10)


def test_reposition_attention_checks_its_batch_and_family():
    import diffattn as da
    from diffattn.tiny import output_of, tiny_call_kwargs, tiny_pipeline

    m = torch.zeros(1, 8, 8)
    m[0, 2:6, 2:6] = 1
    ctrl = da.RepositionAttention(m, m)
    pipe = tiny_pipeline("sd")
    with da.attach(pipe, ctrl), pytest.raises(ControlError, match="reference rows then the scene row"):
        pipe(**tiny_call_kwargs("sd", steps=1, size=32, num_images_per_prompt=3))
    with da.attach(pipe, da.RepositionAttention(m, m)):  # [ref, scene] x CFG
        out = output_of(pipe(**tiny_call_kwargs("sd", steps=2, size=32, num_images_per_prompt=2)))
    assert torch.isfinite(out).all()
    flux = tiny_pipeline("flux")  # RoPE inside attention: the moved keys are re-rotated
    with da.attach(flux, da.RepositionAttention(m, m)):
        assert torch.isfinite(output_of(flux(**tiny_call_kwargs("flux", steps=1, num_images_per_prompt=2)))).all()
    wan = tiny_pipeline("wan")  # RoPE inside attention and no relocation: refused
    with da.attach(wan, da.RepositionAttention(m, m)), pytest.raises(ControlError, match="RoPE"):
        wan(**tiny_call_kwargs("wan", steps=1, num_videos_per_prompt=2))
    with pytest.raises(ControlError, match="one reference region"):
        da.RepositionAttention(m, torch.zeros(2, 8, 8))


def test_extended_kv_ablation_keeps_reference_tokens_in_place():
    import diffattn as da
    from diffattn.families.unet import unet_layout
    from diffattn.controls import AttentionCall
    from diffattn.processors.base import run_controls

    torch.manual_seed(4)
    h = w = 4
    n, d = h * w, 4
    q, k, v = (torch.randn(2, 1, n, d, dtype=torch.float64) for _ in range(3))
    ref = torch.zeros(1, h, w)
    ref[0, 0:2, 0:2] = 1
    scene = torch.zeros(1, h, w)
    scene[0, 2:4, 2:4] = 1
    call = AttentionCall(None, unet_layout(n, n, cross=False, grid=(h, w)), q, k, v, branches={"cond": slice(0, 2)})
    got = run_controls(call, [da.RepositionAttention(ref, scene, dropout=0.0, move=False)])
    cells = [y * w + x for y in range(2) for x in range(2)]
    p = 2 * w + 2  # a scene-subject query: its own keys and the reference subject's, unmoved
    keys, vals = torch.cat([k[1, 0], k[0, 0, cells]]), torch.cat([v[1, 0], v[0, 0, cells]])
    want = torch.softmax(q[1, 0, p] @ keys.T / math.sqrt(d), -1) @ vals
    assert torch.allclose(got[1, 0, p], want, atol=1e-10)


def test_consistent_self_attention_shares_a_random_share_of_the_other_rows():
    import diffattn as da
    from diffattn.families.unet import unet_layout
    from diffattn.controls import AttentionCall
    from diffattn.processors.base import run_controls

    torch.manual_seed(5)
    n, d = 16, 4
    q, k, v = (torch.randn(3, 1, n, d, dtype=torch.float64) for _ in range(3))
    lay = unet_layout(n, n, cross=False, grid=(4, 4))
    call = AttentionCall(None, lay, q, k, v, branches={"cond": slice(0, 3)})
    got = run_controls(call, [da.ConsistentSelfAttention(rate=0.5, seed=1)])
    keep = torch.rand(3, n, generator=torch.Generator().manual_seed(1 * 1_000_003 + 0)) < 0.5
    for r in range(3):
        keys = [k[r, 0]] + [k[o, 0][keep[o]] for o in range(3) if o != r]
        vals = [v[r, 0]] + [v[o, 0][keep[o]] for o in range(3) if o != r]
        want = torch.softmax(q[r, 0] @ torch.cat(keys).T / math.sqrt(d), -1) @ torch.cat(vals)
        assert torch.allclose(got[r, 0], want, atol=1e-10)
    stock = AttentionCall(None, lay, q, k, v, branches={"cond": slice(0, 3)})
    assert torch.equal(run_controls(stock, [da.ConsistentSelfAttention(rate=0.0)]), run_controls(
        AttentionCall(None, lay, q, k, v, branches={"cond": slice(0, 3)}), []))


def test_isolation_with_references_touches_only_the_scene_rows():
    import diffattn as da
    from diffattn.families.unet import unet_layout
    from diffattn.controls import AttentionCall
    from diffattn.processors.base import run_controls

    torch.manual_seed(6)
    n = 16
    q, k, v = (torch.randn(4, 1, n, 4, dtype=torch.float64) for _ in range(3))  # [uncond: ref, scene | cond: ref, scene]
    masks = torch.zeros(2, 4, 4)
    masks[0, :, :2] = 1
    masks[1, :, 2:] = 1
    lay = unet_layout(n, n, cross=False, grid=(4, 4))
    branches = {"uncond": slice(0, 2), "cond": slice(2, 4)}
    got = run_controls(AttentionCall(None, lay, q, k, v, branches=branches), [da.IsolationAttention(masks, references=1)])
    stock = run_controls(AttentionCall(None, lay, q, k, v, branches=branches), [])
    alone = run_controls(AttentionCall(None, lay, q, k, v, branches=branches), [da.IsolationAttention(masks)])
    assert torch.equal(got[[0, 2]], stock[[0, 2]])  # the reference rows attend as stock
    assert torch.allclose(got[[1, 3]], alone[[1, 3]], atol=1e-12) and not torch.allclose(got[1], stock[1])
    with pytest.raises(ControlError, match="reference rows then the scene row"):
        run_controls(AttentionCall(None, lay, q, k, v, branches=branches), [da.IsolationAttention(masks, references=2)])


# ----------------------------------------------------------------------------- scene attention (no Nq x Nk mask)


def _masked_softmax_attention(q, k, v, allowed):
    """float64 oracle: softmax over the allowed keys of each query (all-forbidden rows -> 0)."""
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("joint", [False, True])
def test_scene_attention_isolation_equals_the_masked_oracle(joint):
    """Grouped-query isolation equals dense attention under the paper's T_i T_kᵀ mask, with
    overlapping subject masks and (joint) text tokens that stay untouched."""
    from diffattn.families.sd3 import sd3_layout
    from diffattn.families.unet import unet_layout
    from diffattn.methods.ir import isolation_mask, scene_attention

    torch.manual_seed(7)
    h = w = 4
    n_img, n_txt = h * w, 5 if joint else 0
    lay = sd3_layout(n_img, n_txt, grid=(h, w)) if joint else unet_layout(n_img, n_img, cross=False, grid=(h, w))
    n = n_img + n_txt
    q, k, v = (torch.randn(3, n, 6, dtype=torch.float64) for _ in range(3))
    masks = torch.zeros(3, h, w)
    masks[0, :, :2] = 1
    masks[1, :, 2:] = 1
    masks[2, 1:3, 1:3] = 1  # overlaps both
    allowed = isolation_mask(lay, masks)
    member = torch.stack([resize_mask(m, (h, w)).reshape(-1) for m in masks])
    got = scene_attention(q, k, v, scale=1 / math.sqrt(6), q_image=lay.q("image").slice,
                          k_image=lay.k("image").slice, member=member)
    assert torch.allclose(got, _masked_softmax_attention(q, k, v, allowed), atol=1e-12)


def _two_subject_call(seed=8):
    from diffattn.controls import AttentionCall
    from diffattn.families.unet import unet_layout

    torch.manual_seed(seed)
    h = w = 4
    n = h * w
    q, k, v = (torch.randn(6, 2, n, 4, dtype=torch.float64) for _ in range(3))  # [uncond: r1 r2 scene | cond: r1 r2 scene]
    lay = unet_layout(n, n, cross=False, grid=(h, w))
    scene = torch.zeros(2, h, w)
    scene[0, :, :2] = 1
    scene[1, :, 2:] = 1
    scene[:, 0] = 0  # the top row is background
    ref = torch.zeros(2, h, w)
    ref[:, 1:3, 1:3] = 1
    make = lambda q, k, v: AttentionCall(None, lay, q, k, v, branches={"uncond": slice(0, 3), "cond": slice(3, 6)})  # noqa: E731
    return make, (q, k, v), ref, scene


def test_isolation_invariance_other_subjects_tokens_do_not_reach_a_subject():
    """With isolation, changing subject k's scene tokens leaves subject i's outputs unchanged."""
    import diffattn as da
    from diffattn.processors.base import run_controls

    make, (q, k, v), ref, scene = _two_subject_call()
    ctrls = lambda: [da.IsolationAttention(scene, references=2), da.RepositionAttention(ref, scene, dropout=0.0)]  # noqa: E731
    base = run_controls(make(q, k, v), ctrls())
    right = scene[1].reshape(-1).bool()
    k2, v2 = k.clone(), v.clone()
    k2[2, :, right] += 3.0
    v2[5, :, right] -= 2.0
    k2[5, :, right] += 1.5
    v2[2, :, right] += 4.0
    got = run_controls(make(q, k2, v2), ctrls())
    left = scene[0].reshape(-1).bool()
    assert torch.allclose(got[[2, 5]][:, :, left], base[[2, 5]][:, :, left], atol=1e-12)
    assert not torch.allclose(got[[2, 5]][:, :, right], base[[2, 5]][:, :, right])


def test_background_queries_do_not_depend_on_the_references():
    import diffattn as da
    from diffattn.processors.base import run_controls

    make, (q, k, v), ref, scene = _two_subject_call(9)
    ctrl = lambda: [da.RepositionAttention(ref, scene, dropout=0.0)]  # noqa: E731
    base = run_controls(make(q, k, v), ctrl())
    k2, v2 = k.clone(), v.clone()
    for r in (0, 1, 3, 4):  # every reference row
        k2[r] = torch.randn_like(k2[r])
        v2[r] = torch.randn_like(v2[r])
    got = run_controls(make(q, k2, v2), ctrl())
    bg = ~scene.reshape(2, -1).bool().any(0)
    assert torch.equal(got[[2, 5]][:, :, bg], base[[2, 5]][:, :, bg])
    assert not torch.allclose(got[[2, 5]][:, :, ~bg], base[[2, 5]][:, :, ~bg])


def test_reposition_with_identical_boxes_is_the_in_place_block():
    import diffattn as da
    from diffattn.processors.base import run_controls

    make, (q, k, v), _, scene = _two_subject_call(10)
    moved = run_controls(make(q, k, v), [da.RepositionAttention(scene, scene, dropout=0.0)])
    kept = run_controls(make(q, k, v), [da.RepositionAttention(scene, scene, dropout=0.0, move=False)])
    assert torch.equal(moved, kept)


def test_a_translated_box_attends_to_translated_reference_features():
    """Reference subject at the top-left, scene subject at the bottom-right, same size: the
    scene query at offset (dy, dx) of its box sees exactly the reference key at (dy, dx) of its box."""
    h = w = 6
    hidden = torch.randn(h * w, 3, dtype=torch.float64)
    ref = torch.zeros(h, w, dtype=torch.bool)
    ref[0:2, 0:3] = True
    scene = torch.zeros(h, w, dtype=torch.bool)
    scene[3:5, 2:5] = True
    canvas, m = reposition(hidden, (h, w), ref, scene)
    grid = canvas.reshape(h, w, 3)
    assert torch.equal(m, scene)
    for dy in range(2):
        for dx in range(3):
            assert torch.equal(grid[3 + dy, 2 + dx], hidden.reshape(h, w, 3)[dy, dx])
    assert grid[~scene].abs().sum() == 0


def test_mutual_cross_attention_matches_a_float64_reference():
    import diffattn as da
    from diffattn.controls import AttentionCall
    from diffattn.families.unet import unet_layout
    from diffattn.processors.base import run_controls

    torch.manual_seed(11)
    h = w = 4
    n, t = h * w, 5
    q = torch.randn(2, 1, n, 4, dtype=torch.float64)  # rows [ref, scene]
    k, v = torch.randn(2, 1, t, 4, dtype=torch.float64), torch.randn(2, 1, t, 4, dtype=torch.float64)
    lay = unet_layout(n, t, cross=True, grid=(h, w))
    scene = torch.zeros(1, h, w)
    scene[0, :2] = 1
    got = run_controls(AttentionCall(None, lay, q, k, v, branches={"cond": slice(0, 2)}),
                       [da.MutualCrossAttention(scene, weight=0.9)])
    attend = lambda qq, kk, vv: torch.softmax(qq @ kk.T / 2.0, -1) @ vv  # noqa: E731  (d = 4)
    vanilla = attend(q[1, 0], k[1, 0], v[1, 0])
    mutual = attend(q[1, 0], torch.cat([k[1, 0], k[0, 0]]), torch.cat([v[1, 0], v[0, 0]]))
    inside = scene.reshape(-1).bool()
    want = torch.where(inside[:, None], 0.1 * vanilla + 0.9 * mutual, vanilla)
    assert torch.allclose(got[1, 0], want, atol=1e-12)
    assert torch.allclose(got[0, 0], attend(q[0, 0], k[0, 0], v[0, 0]), atol=1e-12)  # the reference row: stock


def test_reposition_on_flux_equals_keys_rotated_at_their_new_places():
    """FLUX applies RoPE inside attention: a reference subject's key moved onto the scene
    subject's box must carry the rotation of its new position. The scene row's attention equals a
    float64 reference built from the unrotated keys, each moved key rotated at its target cell
    (values carry no rotation); the reference row stays stock; text and background queries see
    the scene's own keys only."""
    import diffattn as da
    from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb

    from diffattn.controls import AttentionCall
    from diffattn.families.flux import FluxRope, flux_layout
    from diffattn.processors.base import run_controls

    torch.manual_seed(5)
    h = w = 4
    n_text, n = 3, h * w
    heads, d = 2, 8
    grid_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                          indexing="ij"), -1).reshape(-1, 3)
    ids = torch.cat([torch.zeros(n_text, 3), grid_ids]).double()  # [text | image] position ids
    cos, sin = (t.double() for t in FluxPosEmbed(theta=10000, axes_dim=[2, 4, 2])(ids))  # [19, 8] each

    def rot(x, rows=slice(None)):  # x [B, H, L, D] rotated at positions `rows` of the joint sequence
        return apply_rotary_emb(x, (cos[rows], sin[rows]), sequence_dim=2)

    q0, k0, v = (torch.randn(2, heads, n_text + n, d, dtype=torch.float64) for _ in range(3))  # rows [ref, scene]
    q, k = rot(q0), rot(k0)
    ref = torch.zeros(1, h, w)
    ref[0, 0:2, 0:2] = 1
    scene = torch.zeros(1, h, w)
    scene[0, 2:4, 2:4] = 1
    call = AttentionCall(None, flux_layout(n_text, n_text + n, image_grid=(h, w)), q, k, v,
                         branches={"cond": slice(0, 2)}, rope=FluxRope(cos, sin))
    got = run_controls(call, [da.RepositionAttention(ref, scene, dropout=0.0)])  # [2, H, 19, D]

    def attend(qq, kk, vv):
        return torch.softmax(qq @ kk.T / math.sqrt(d), dim=-1) @ vv

    cells = [(y, x) for y in range(2) for x in range(2)]
    source = [n_text + y * w + x for y, x in cells]  # the reference subject's tokens
    target = [n_text + (y + 2) * w + (x + 2) for y, x in cells]  # where they land in the scene
    moved_k = torch.stack([torch.cat([rot(k0[0:1, hd:hd + 1, s:s + 1], slice(t, t + 1))[0, 0]
                                      for s, t in zip(source, target)]) for hd in range(heads)])  # [H, 4, D]
    assert not torch.allclose(moved_k, k[0, :, source], atol=1e-3)  # unrotated moves differ: the check can fail
    want = torch.empty_like(got)
    for hd in range(heads):
        want[0, hd] = attend(q[0, hd], k[0, hd], v[0, hd])
        for p in range(n_text + n):
            keys, vals = k[1, hd], v[1, hd]
            if p in target:  # a scene-subject query: its own keys and the moved reference subject
                keys, vals = torch.cat([keys, moved_k[hd]]), torch.cat([vals, v[0, hd, source]])
            want[1, hd, p] = attend(q[1, hd, p:p + 1], keys, vals)[0]
    assert torch.allclose(got, want, atol=1e-10)
