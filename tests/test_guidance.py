"""Guidance wrapper: the arithmetic, batching of inputs, and end-to-end runs with CFG on, off,
as separate forwards (Wan, FLUX true CFG) and on a guidance-distilled FLUX."""
from __future__ import annotations

import pytest
import torch

import diffattn as da
from diffattn.controls import Control
from diffattn.errors import ControlError
from diffattn.guidance import expand_batch, fold_guidance, guidance_delta, shift_guidance, take_batch
from diffattn.tiny import output_of


class Perturb(Control):
    """PAG-style test control: identity blend u on the self/joint attention of the perturbed
    rows; u = 0 is a perturbed branch with zero perturbation."""

    extra_branches = ("perturbed",)

    def __init__(self, u=1.0, scale=2.0, sequential=False, **kw):
        super().__init__(branches=("perturbed",), **kw)
        self.u, self.scale, self.sequential = u, scale, sequential
        self.seen = []

    def edit_spec(self, call):
        self.seen.append(dict(call.branches))
        if call.q.shape[2] == call.k.shape[2]:
            call.head_blend()[call.rows(("perturbed",))] = self.u

    def guidance_scale(self, step):
        return self.scale


# ----------------------------------------------------------------------------- arithmetic


def test_fold_and_shift_give_the_guided_prediction():
    torch.manual_seed(0)
    u, c, p1, p2 = torch.randn(4, 3)
    s1, s2, w = 2.0, 0.5, 4.0
    want = u + w * (c - u) + s1 * (c - p1) + s2 * (c - p2)
    folded = fold_guidance(c, [p1, p2], [s1, s2], cfg_scale=w)  # batched CFG: only cond changes
    torch.testing.assert_close(u + w * (folded - u), want)
    delta = guidance_delta(c, [p1, p2], [s1, s2])
    torch.testing.assert_close(delta, s1 * (c - p1) + s2 * (c - p2))
    for w_any in (1.0, 4.0, 7.5):  # two-call CFG: shift both branches, w need not be known
        got = shift_guidance(u, delta) + w_any * (shift_guidance(c, delta) - shift_guidance(u, delta))
        torch.testing.assert_close(got, u + w_any * (c - u) + delta)
    torch.testing.assert_close(fold_guidance(c, [p1], [s1]), c + s1 * (c - p1))  # no CFG
    torch.testing.assert_close(fold_guidance(c, [p1], [0.0], cfg_scale=w), c)
    with pytest.raises(ControlError):
        fold_guidance(c, [p1], [s1], cfg_scale=0.0)


def test_expand_and_take_batch_aligned_inputs():
    x = torch.arange(6.0).view(3, 2)
    args = {"x": x, "t": torch.tensor(5.0), "ids": torch.zeros(7, 3), "nested": {"m": x + 1, "lst": [x, 3]},
            "tup": (x, None)}
    big = expand_batch(args, 3, slice(1, 3), 2)
    assert big["x"].shape == (7, 2) and torch.equal(big["x"][3:5], x[1:3]) and torch.equal(big["x"][5:], x[1:3])
    assert big["t"] is args["t"] and big["ids"] is args["ids"]  # scalar and non-batch tensors untouched
    assert big["nested"]["m"].shape == (7, 2) and big["nested"]["lst"][1] == 3 and big["tup"][1] is None
    small = take_batch(args, 3, slice(1, 3))
    assert torch.equal(small["x"], x[1:3]) and torch.equal(small["nested"]["lst"][0], x[1:3])
    assert expand_batch(x, 3, slice(0, 3), 0) is x


# ----------------------------------------------------------------------------- end to end


CASES = [
    ("sd15", {}, dict(guidance_scale=4.0)),  # CFG in one batch
    ("sdxl", {}, dict(guidance_scale=4.0)),  # + added_cond_kwargs
    ("sd3", {}, dict(guidance_scale=1.0)),  # CFG off
    ("flux", {"guidance_embeds": True}, dict(guidance_scale=3.5)),  # guidance-distilled FLUX
    ("flux", {}, dict(negative_prompt="blurry", true_cfg_scale=2.0)),  # true CFG: two forwards
    ("wan", {}, dict(guidance_scale=3.0)),  # two forwards under cache_context
]


@pytest.mark.parametrize("family,build,call", CASES, ids=[f"{f}-{'-'.join(c)}" for f, _, c in CASES])
def test_zero_perturbation_leaves_the_output_unchanged(family, build, call, tiny_pipe, tiny_inputs):
    pipe = tiny_pipe(family, **build)
    stock = output_of(pipe(**tiny_inputs(family, **call)))
    ctrl = Perturb(u=0.0, scale=3.0)
    with da.attach(pipe, ctrl):
        ours = output_of(pipe(**tiny_inputs(family, **call)))
    assert any("perturbed" in b for b in ctrl.seen)  # the extra branch did run
    assert (ours - stock).abs().max() <= 1e-5


@pytest.mark.parametrize("family,build,call", [CASES[2], CASES[3], ("sd3", {}, dict(guidance_scale=4.0)), CASES[5]],
                         ids=["sd3-nocfg", "flux-distilled", "sd3-cfg", "wan"])
def test_batched_and_sequential_extra_branches_agree(family, build, call, tiny_pipe, tiny_inputs):
    pipe = tiny_pipe(family, **build)
    stock = output_of(pipe(**tiny_inputs(family, **call)))
    outs = []
    for sequential in (False, True):
        with da.attach(pipe, Perturb(u=1.0, scale=2.0), sequential=sequential):
            outs.append(output_of(pipe(**tiny_inputs(family, **call))))
    assert (outs[0] - stock).abs().max() > 1e-4  # guidance does something
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


def test_scale_zero_runs_no_extra_branch(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    ctrl = Perturb(u=1.0, scale=0.0)
    with da.attach(pipe, ctrl):
        pipe(**tiny_inputs("sd3", steps=1))
    assert ctrl.seen == []


def _sd3_inputs(model, batch):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, model.config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, model.config.pooled_projection_dim, generator=g),
                timestep=torch.full((batch,), 700.0), return_dict=False)


def test_batched_cfg_fold_at_the_denoiser(tiny_pipe):
    model = tiny_pipe("sd3").transformer
    kw = _sd3_inputs(model, 2)
    s, w = 2.0, 5.0
    ctrl = Perturb(u=1.0, scale=s)
    with torch.no_grad():
        with da.attach(model, ctrl, cfg_scale=w) as h:
            with h.branches({"uncond": slice(0, 1), "cond": slice(1, 2)}):
                guided = model(**kw)[0]
            ctrl.scale = 0.0  # no wrapper: compute the perturbed prediction of the cond row directly
            with h.branches({"perturbed": slice(0, 1)}):
                pert = model(**{k: (v[1:] if torch.is_tensor(v) and v.dim() else v) for k, v in kw.items()})[0]
        stock = model(**kw)[0]
    # Δ rides on the uncond row (ε_u - Δ/(w-1)) and ε_c reaches the pipeline untouched ...
    delta = s * (stock[1:] - pert)
    torch.testing.assert_close(guided[1:], stock[1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(guided[:1], stock[:1] - delta / (w - 1), atol=1e-5, rtol=0)
    # ... so the pipeline's CFG gives ε_u + w(ε_c - ε_u) + Δ
    cfg = guided[:1] + w * (guided[1:] - guided[:1])
    torch.testing.assert_close(cfg, stock[:1] + w * (stock[1:] - stock[:1]) + delta, atol=1e-4, rtol=0)


def test_two_call_cfg_shifts_both_branches(tiny_pipe):
    model = tiny_pipe("wan").transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    text_c, text_u = torch.randn(2, 1, 7, 32, generator=g)
    t = torch.tensor([600.0])
    s = 1.5
    ctrl = Perturb(u=1.0, scale=s)
    with torch.no_grad():
        c = model(x, t, text_c, return_dict=False)[0]
        u = model(x, t, text_u, return_dict=False)[0]
        with da.attach(model, ctrl) as h:
            with model.cache_context("cond", step_index=0):
                gc = model(x, t, text_c, return_dict=False)[0]
            with model.cache_context("uncond", step_index=0):
                gu = model(x, t, text_u, return_dict=False)[0]
            ctrl.scale = 0.0
            with h.branches({"perturbed": slice(0, 1)}):
                p = model(x, t, text_c, return_dict=False)[0]
    delta = s * (c - p)
    torch.testing.assert_close(gc, c + delta, atol=1e-5, rtol=0)
    torch.testing.assert_close(gu, u + delta, atol=1e-5, rtol=0)
    for w in (1.0, 5.0):
        torch.testing.assert_close(gu + w * (gc - gu), u + w * (c - u) + delta, atol=1e-4, rtol=0)


def test_cfg_scale_is_read_from_the_pipeline_or_overridden(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    kw = dict(steps=1, guidance_scale=4.0)
    with da.attach(pipe, Perturb(u=1.0, scale=2.0)):
        auto = output_of(pipe(**tiny_inputs("sd3", **kw)))
    with da.attach(pipe, Perturb(u=1.0, scale=2.0), cfg_scale=lambda step: 4.0):
        same = output_of(pipe(**tiny_inputs("sd3", **kw)))
    with da.attach(pipe, Perturb(u=1.0, scale=2.0), cfg_scale=8.0):
        other = output_of(pipe(**tiny_inputs("sd3", **kw)))
    assert torch.equal(auto, same) and (auto - other).abs().max() > 1e-5


def test_guidance_errors(tiny_pipe):
    model = tiny_pipe("sd3").transformer
    with da.attach(model, Perturb()) as h, h.branches({"uncond": slice(0, 1), "cond": slice(1, 2)}):
        with pytest.raises(ControlError, match="cfg_scale"), torch.no_grad():
            model(**_sd3_inputs(model, 2))

    class Other(Perturb):
        pass

    with pytest.raises(ControlError, match="perturbed"):
        da.attach(model, Perturb(), Other())
