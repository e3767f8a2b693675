"""Contextual repulsion's baselines (issue 24) and the engine stage they run in.

- the forward stage (``Control.edit_inputs`` / ``edit_prediction``): called once per forward,
  inputs in ascending ``order``, predictions in descending order, only for controls that
  define them;
- latent particle guidance (Corso et al. 2023): φ against a float64 loop written from the
  official code's formula; on tiny SD3, coeff = 0 is bit-exact and the first step's prediction
  moves by exactly −φ on the cond rows and their uncond twins;
- interval guidance (Kynkäänniemi et al. 2024): an interval holding every σ is bit-exact, one
  holding none is the conditional prediction (CFG w drops out);
- CADS (Sadat et al. 2024) as a control: scale 0 is bit-exact; the cond rows get Eq. 3-5 with
  the seeded noise, the uncond rows and the pipeline's tensors stay untouched; reproducible;
- image-token repulsion (``ContextRepulsion(stream="image")``) edits the image stream only.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import diffattn as da
from diffattn.controls import Control, StepState
from diffattn.engine import ForwardContext
from diffattn.errors import ControlError
from diffattn.methods.cads import cads_condition, cads_gamma
from diffattn.methods.interval import flow_sigma, in_interval
from diffattn.methods.particle import particle_repulsion
from diffattn.tiny import output_of, tiny_call_kwargs, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd3", num_layers=4)


def _kw(n=3, **over):
    return tiny_call_kwargs("sd3", steps=2, num_images_per_prompt=n, **{"guidance_scale": 4.0, **over})


def _run(pipe, *controls, **kw):
    if not controls:
        return output_of(pipe(**kw))
    with da.attach(pipe, *controls):
        return output_of(pipe(**kw))


class _Recorder:
    """A torch forward hook on the denoiser: every forward's latents and returned prediction."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, out):
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.calls.append((x.detach().clone(), (out[0] if isinstance(out, tuple) else out.sample).detach().clone()))

    def remove(self):
        self.handle.remove()


# ----------------------------------------------------------------------------- the forward stage


class _Order(Control):
    def __init__(self, tag, log, order):
        super().__init__(sites=lambda s: False, order=order)
        self.tag, self.log = tag, log

    def edit_inputs(self, ctx, arguments):
        self.log.append(("in", self.tag))
        return arguments

    def edit_prediction(self, ctx, arguments, pred):
        self.log.append(("out", self.tag))
        return pred


def test_forward_stage_order_and_fast_path(pipe):
    log = []
    base = _run(pipe, **_kw(n=1))
    got = _run(pipe, _Order("b", log, 2), _Order("a", log, 1), **_kw(n=1))
    assert torch.equal(got, base)  # identity edits: bit-exact
    per_forward = log[:4]
    assert per_forward == [("in", "a"), ("in", "b"), ("out", "b"), ("out", "a")]
    assert len(log) == 4 * 2  # once per forward (two steps, CFG batched)
    assert not da.ContextRepulsion().edits_forward and _Order("x", [], 0).edits_forward


# ----------------------------------------------------------------------------- particle guidance


def _phi_reference(x, sigma, coeff):
    """The official non-SVGD branch, one particle at a time, in float64."""
    v = x.reshape(x.shape[0], -1).double()
    b = v.shape[0]
    out = torch.zeros_like(v)
    for i in range(b):
        others = [j for j in range(b) if j != i]
        d = torch.stack([(v[i] - v[j]).norm() for j in others])
        h = d.median() ** 2 / math.log(b - 1)
        for j, dij in zip(others, d):
            out[i] += 2 * torch.exp(-dij ** 2 / h) * (v[i] - v[j]) / h
    return (out * sigma * coeff).reshape(x.shape)


@pytest.mark.parametrize("b", [3, 4, 6])
def test_particle_repulsion_matches_the_official_formula(b):
    torch.manual_seed(b)
    x = torch.randn(b, 2, 3, 3, dtype=torch.float64)
    got = particle_repulsion(x, sigma=0.7, coeff=2.5)
    assert torch.allclose(got, _phi_reference(x, 0.7, 2.5), atol=1e-12, rtol=1e-10)
    perm = torch.randperm(b)
    assert torch.allclose(particle_repulsion(x[perm], 0.7, 2.5), got[perm], atol=1e-12)
    assert torch.equal(particle_repulsion(x[:2], 0.7, 2.5), torch.zeros_like(x[:2]))  # B = 2: infinite bandwidth
    # it points away from the others: a step along φ increases every pairwise distance here
    y = x + 1e-3 * got
    assert torch.cdist(y.reshape(b, -1), y.reshape(b, -1)).sum() > torch.cdist(x.reshape(b, -1), x.reshape(b, -1)).sum()


def test_particle_guidance_on_a_pipeline(pipe):
    base = _run(pipe, **_kw())
    assert torch.equal(_run(pipe, da.LatentParticleGuidance(coeff=0.0), **_kw()), base)
    rec = _Recorder(pipe.transformer)
    try:
        _run(pipe, **_kw())
        stock = rec.calls[0]
        rec.calls.clear()
        pg = da.LatentParticleGuidance(coeff=3.0)
        edited = _run(pipe, pg, **_kw())
        first = rec.calls[0]
    finally:
        rec.remove()
    assert not torch.equal(edited, base) and torch.isfinite(edited).all()
    x, n = stock[0], 3
    assert torch.equal(first[0], x)  # same latents at the first step
    sigma = float(pipe.scheduler.sigmas[0])
    phi = particle_repulsion(x[n:], sigma, 3.0)  # rows [uncond x3, cond x3]: the cond rows are the particles
    assert torch.allclose(first[1][n:], stock[1][n:] - phi, atol=1e-6)
    assert torch.allclose(first[1][:n], stock[1][:n] - phi, atol=1e-6)  # the uncond twins move with them
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.equal(_run(pipe, da.LatentParticleGuidance(coeff=3.0), **_kw(n=2)), _run(pipe, **_kw(n=2)))
    assert any("groups of 3" in str(w.message) for w in seen)
    with pytest.raises(ControlError, match="coeff"):
        da.LatentParticleGuidance(coeff=-1)


# ----------------------------------------------------------------------------- interval guidance


def test_interval_math():
    assert in_interval(1.0, 0.28, 5.42) and not in_interval(0.28, 0.28, 5.42) and in_interval(5.42, 0.28, 5.42)
    assert flow_sigma(0.28) == pytest.approx(0.28 / 1.28) and flow_sigma(5.42) == pytest.approx(5.42 / 6.42)


def test_interval_guidance_limits_cfg(pipe):
    base = _run(pipe, **_kw(n=2))
    assert torch.equal(_run(pipe, da.IntervalGuidance((0.0, 10.0)), **_kw(n=2)), base)  # every σ inside
    none = _run(pipe, da.IntervalGuidance((5.0, 10.0)), **_kw(n=2))  # flow σ <= 1: never inside
    cond_only = _run(pipe, **_kw(n=2, guidance_scale=1.0))
    assert not torch.allclose(none, base, atol=1e-4)
    assert torch.allclose(none, cond_only, atol=1e-5)  # the conditional prediction, whatever w
    ctx = ForwardContext(step=StepState(index=0, sigma=0.5, num_steps=2), branches={"uncond": slice(0, 2)}, batch=2)
    with pytest.raises(ControlError, match="own forward"):
        da.IntervalGuidance((0.6, 0.9)).edit_prediction(ctx, {}, torch.zeros(2, 1))
    with pytest.raises(ControlError, match="lo < hi"):
        da.IntervalGuidance((2.0, 1.0))


# ----------------------------------------------------------------------------- CADS


def test_cads_control_edits_only_the_cond_rows():
    cads = da.CADS(scale=0.5, tau1=0.3, tau2=0.8, psi=1.0, seed=7)
    y = torch.randn(4, 5, 6)
    pooled = torch.randn(4, 6)
    args = {"hidden_states": torch.zeros(4, 1), "encoder_hidden_states": y, "pooled_projections": pooled}
    step = StepState(index=1, num_steps=4)  # t = 0.75: γ = (0.8 - 0.75) / 0.5 = 0.1
    ctx = ForwardContext(step=step, branches={"uncond": slice(0, 2), "cond": slice(2, 4)}, family="sd3", batch=4)
    y0, p0 = y.clone(), pooled.clone()
    out = cads.edit_inputs(ctx, args)
    assert torch.equal(y, y0) and torch.equal(pooled, p0)  # never in place
    gamma = cads_gamma(0.75, 0.3, 0.8)
    assert gamma == pytest.approx(0.1)
    g = torch.Generator().manual_seed(7 * 1_000_003 + 1)
    n1 = torch.randn(y[2:].shape, generator=g)
    n2 = torch.randn(pooled[2:].shape, generator=g)
    assert torch.equal(out["encoder_hidden_states"][:2], y[:2]) and torch.equal(out["pooled_projections"][:2], pooled[:2])
    assert torch.allclose(out["encoder_hidden_states"][2:], cads_condition(y[2:], gamma, 0.5, 1.0, noise=n1))
    assert torch.allclose(out["pooled_projections"][2:], cads_condition(pooled[2:], gamma, 0.5, 1.0, noise=n2))
    late = ForwardContext(step=StepState(index=3, num_steps=4), branches=ctx.branches, family="sd3", batch=4)
    assert cads.edit_inputs(late, args) is args  # t = 0.25 <= τ1: the clean condition


def test_cads_on_a_pipeline(pipe):
    base = _run(pipe, **_kw())
    assert torch.equal(_run(pipe, da.CADS(scale=0.0), **_kw()), base)
    a = _run(pipe, da.CADS(scale=0.5, tau1=0.3, tau2=0.8), **_kw())
    b = _run(pipe, da.CADS(scale=0.5, tau1=0.3, tau2=0.8), **_kw())
    assert torch.equal(a, b) and not torch.equal(a, base) and torch.isfinite(a).all()
    with pytest.raises(ControlError, match="scale"):
        da.CADS(scale=-1)


# ----------------------------------------------------------------------------- image-token repulsion


def test_image_token_repulsion_edits_the_image_stream(pipe):
    rep = da.ContextRepulsion(eta=0.5, tau=2, blocks="all", stream="image")
    assert all(t.outputs == (1,) for t in rep.targets(pipe.transformer))
    assert all(t.outputs == (0,) for t in da.ContextRepulsion(blocks="all").targets(pipe.transformer))
    base = _run(pipe, **_kw())
    got = _run(pipe, rep, **_kw())
    assert not torch.equal(got, base) and torch.isfinite(got).all()
    # the first edited block's outputs at the first step: its text stream as the stock block's,
    # its image stream repelled
    first = pipe.transformer.get_submodule(rep.targets(pipe.transformer)[0].name)
    seen = []
    hook = first.register_forward_hook(lambda m, a, out: seen.append([o.clone() for o in out]))
    try:
        _run(pipe, **_kw(num_inference_steps=1))
        _run(pipe, rep, **_kw(num_inference_steps=1))
    finally:
        hook.remove()
    (text0, image0), (text1, image1) = seen
    assert torch.equal(text1, text0) and not torch.equal(image1, image0)
    with pytest.raises(ControlError, match="stream"):
        da.ContextRepulsion(stream="pixels")
