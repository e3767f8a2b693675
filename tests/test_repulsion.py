"""Contextual-space repulsion (diffattn.methods.repulsion): the math, the block hooks, the control.

The math is checked against its definitions (log Vendi of identical / orthogonal rows,
gradients against finite differences in float64, no NaN for identical samples); the control on
tiny SD3 and FLUX pipelines: η = 0 and B = 1 are bit-exact no-ops, permuting the batch permutes
the outputs, two prompts in one batch (and the two CFG branches) never mix, a UNet is refused,
and a compiled denoiser gives the eager result.
"""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

import diffattn as da
from diffattn.controls import StepState
from diffattn.engine import ForwardContext
from diffattn.methods.repulsion import (
    DIVERSITY_LOSSES,
    branch_groups,
    cosine_kernel,
    diversity_gradient,
    log_vendi,
    logdet_dpp,
    rbf_energy,
    repel,
)
from diffattn.tiny import output_of, tiny_call_kwargs, tiny_pipeline

# ----------------------------------------------------------------------------- math


def test_log_vendi_limits_and_kernel():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    k = cosine_kernel(x)
    assert torch.allclose(k.diagonal(), torch.ones(3, dtype=torch.float64))
    same = x[:1].expand(4, -1, -1)
    assert abs(log_vendi(same, jitter=0).item()) < 1e-9  # one distinct sample: Vendi 1
    eye = torch.eye(4, dtype=torch.float64)
    assert math.isclose(log_vendi(eye, jitter=0).item(), math.log(4), rel_tol=1e-12)  # orthogonal: Vendi B
    # reference from the definition: -Σ λ log λ of K/B
    lam = torch.linalg.eigvalsh(k / 3)
    assert math.isclose(log_vendi(x, jitter=0).item(), -(lam * lam.log()).sum().item(), rel_tol=1e-10)


@pytest.mark.parametrize("name", sorted(DIVERSITY_LOSSES))
def test_gradients_match_finite_differences_float64(name):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    fn = DIVERSITY_LOSSES[name]
    if name == "rbf":
        fn = lambda z: -rbf_energy(z, bandwidth=5.0)  # noqa: E731  (the median heuristic is held constant)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
    g = diversity_gradient(x.detach(), DIVERSITY_LOSSES[name])
    assert g.shape == x.shape and torch.isfinite(g).all()


@pytest.mark.parametrize("name", sorted(DIVERSITY_LOSSES))
@pytest.mark.parametrize("spread", [0.0, 1e-7, 1e-4])
def test_identical_and_near_identical_samples_have_finite_gradients(name, spread):
    torch.manual_seed(1)
    base = torch.randn(1, 6, 8)
    x = (base.expand(4, -1, -1) + spread * torch.randn(4, 6, 8)).requires_grad_(True)
    (raw,) = torch.autograd.grad(DIVERSITY_LOSSES[name](x), x)  # the loss's own gradient, no NaN clean-up
    assert torch.isfinite(raw).all()
    x = x.detach()
    g = diversity_gradient(x, DIVERSITY_LOSSES[name])
    assert torch.isfinite(g).all()
    if spread == 0.0 and name != "dpp":
        assert g.abs().max() < 1e-3  # the symmetric point: no direction is preferred
    y = repel(x, 0.5, 3, DIVERSITY_LOSSES[name])
    assert torch.isfinite(y).all()


def test_repel_ascends_and_is_a_noop_at_zero():
    torch.manual_seed(2)
    x = torch.randn(4, 5, 6)
    assert repel(x, 0.0, 5) is x
    assert torch.equal(repel(x, 0.0, 5), x) and torch.equal(repel(x[:1], 1.0, 5), x[:1])
    y = repel(x, 0.2, 5)
    assert log_vendi(y) > log_vendi(x)
    # norm invariance: scaling the features scales the edit, η unchanged
    torch.testing.assert_close(repel(1e3 * x, 0.2, 5), 1e3 * y, rtol=1e-4, atol=1e-3)
    raw = repel(1e3 * x, 0.2, 5, norm_invariant=False)
    assert (raw - 1e3 * x).abs().max() < 1e-3 * (y - x).abs().max() * 1e3  # raw η shrinks as 1/‖c‖²


def test_repel_stays_bounded_at_large_eta():
    # the norm-invariant step is scaled by the unedited ‖x_i‖²: a huge η cannot compound
    torch.manual_seed(3)
    x = torch.randn(4, 5, 6)
    y = repel(x, 128.0, 10)
    rel = ((y - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max()
    assert torch.isfinite(y).all() and rel < 50, rel
    assert log_vendi(y) > log_vendi(x)


def test_repel_under_inference_mode():
    torch.manual_seed(5)
    x = torch.randn(3, 4, 5)
    expected = repel(x, 0.3, 2)
    with torch.inference_mode():
        got = repel(x.clone(), 0.3, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_repel_is_permutation_equivariant():
    torch.manual_seed(3)
    x = torch.randn(5, 4, 3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    for name, loss in DIVERSITY_LOSSES.items():
        torch.testing.assert_close(repel(x[perm], 0.3, 4, loss), repel(x, 0.3, 4, loss)[perm], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- grouping and branches


def _ctx(branches, text, batch):
    return ForwardContext(step=StepState(0), branches=branches, batch=batch, text=text)


def test_groups_follow_prompts_within_each_branch():
    a, b, neg = torch.zeros(1, 3, 2), torch.ones(1, 3, 2), torch.full((1, 3, 2), 5.0)
    # CFG batch of two prompts x 2 images: [neg, neg, neg, neg | a, a, b, b]
    text = torch.cat([neg] * 4 + [a, a, b, b])
    ctx = _ctx({"uncond": slice(0, 4), "cond": slice(4, 8), "perturbed": slice(8, 10)}, text, 8)
    assert branch_groups(ctx, ("uncond", "cond")) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert branch_groups(ctx, ("cond",)) == [[4, 5], [6, 7]]


def test_edit_never_mixes_branches_or_groups_and_leaves_other_branches():
    """The hook's edit of one group's rows depends on those rows only (other groups, the other
    CFG branch and the guidance branch are untouched and do not influence it)."""
    torch.manual_seed(4)
    rep = da.ContextRepulsion(eta=0.5, tau=1, inner=3)
    a, b, neg = torch.zeros(1, 3, 2), torch.ones(1, 3, 2), torch.full((1, 3, 2), 5.0)
    text = torch.cat([neg] * 4 + [a, a, b, b])
    ctx = _ctx({"uncond": slice(0, 4), "cond": slice(4, 8), "perturbed": slice(8, 10)}, text, 8)
    rep._diffattn_engine = SimpleNamespace(context=ctx)
    target = SimpleNamespace(outputs=(0,))
    stream, image = torch.randn(10, 6, 4), torch.randn(10, 5, 4)
    try:
        out, img = rep._edit(target, (stream, image))
        assert img is image
        torch.testing.assert_close(out[8:], stream[8:], rtol=0, atol=0)  # the perturbed branch: untouched
        for rows in ([0, 1], [2, 3], [4, 5], [6, 7]):
            assert not torch.equal(out[rows], stream[rows])
            torch.testing.assert_close(out[rows], repel(stream[rows], 0.5, 3), rtol=1e-6, atol=1e-6)
        changed = stream.clone()
        changed[[2, 3, 6, 7, 8]] += 3.0  # the other prompt (both branches) and the perturbed rows
        out2, _ = rep._edit(target, (changed, image))
        torch.testing.assert_close(out2[[0, 1, 4, 5]], out[[0, 1, 4, 5]], rtol=0, atol=0)
    finally:
        rep._diffattn_engine = None


# ----------------------------------------------------------------------------- on tiny pipelines

FAMILIES = {"sd3": dict(num_layers=4), "flux": dict(num_layers=2, num_single_layers=2)}


@pytest.fixture(scope="module")
def pipes():
    return {fam: tiny_pipeline(fam, **kw) for fam, kw in FAMILIES.items()}


def _kw(family, n=3, **over):
    cfg = {"guidance_scale": 4.0} if family == "sd3" else {}
    return tiny_call_kwargs(family, steps=2, num_images_per_prompt=n, **{**cfg, **over})


def _latents(pipe, family, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = pipe.transformer.config.in_channels
    if family == "sd3":
        return torch.randn(batch, c, 8, 8, generator=g)
    return torch.randn(batch, 16, c, generator=g)  # FLUX: packed 2x2 patches of a 16 px image


def _run(pipe, control=None, **kw):
    if control is None:
        return output_of(pipe(**kw))
    with da.attach(pipe, *(control if isinstance(control, list) else [control])):
        return output_of(pipe(**kw))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eta_zero_and_single_sample_are_bit_exact(pipes, family):
    pipe = pipes[family]
    base = _run(pipe, **_kw(family))
    assert torch.equal(_run(pipe, da.ContextRepulsion(eta=0.0, tau=2, blocks="all"), **_kw(family)), base)
    edited = _run(pipe, da.ContextRepulsion(eta=0.5, tau=2, inner=2, blocks="all"), **_kw(family))
    assert not torch.equal(edited, base) and torch.isfinite(edited).all()
    one = _run(pipe, **_kw(family, n=1))
    rep = da.ContextRepulsion(eta=0.5, tau=2, blocks="all")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = _run(pipe, rep, **_kw(family, n=1))
    assert torch.equal(got, one)
    msgs = [w for w in seen if "needs a group" in str(w.message)]
    assert len(msgs) == 1  # once, not per block or step


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_permuting_the_batch_permutes_the_outputs(pipes, family):
    pipe = pipes[family]
    lat = _latents(pipe, family, 4)
    perm = torch.tensor([2, 0, 3, 1])
    rep = da.ContextRepulsion(eta=0.5, tau=2, inner=2, blocks="all")
    out = _run(pipe, rep, **_kw(family, n=4, latents=lat))
    outp = _run(pipe, rep, **_kw(family, n=4, latents=lat[perm]))
    assert not torch.equal(out, _run(pipe, **_kw(family, n=4, latents=lat)))
    torch.testing.assert_close(outp, out[perm], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_prompts_in_one_batch_do_not_mix(pipes, family):
    """Each prompt's samples come out as when that prompt runs alone (CFG branches on SD3)."""
    pipe = pipes[family]
    lat = _latents(pipe, family, 4)
    rep = da.ContextRepulsion(eta=0.5, tau=2, inner=2, blocks="all")
    both = _run(pipe, rep, **_kw(family, n=2, prompt=["a red circle", "a blue square"], latents=lat))
    first = _run(pipe, rep, **_kw(family, n=2, prompt="a red circle", latents=lat[:2]))
    second = _run(pipe, rep, **_kw(family, n=2, prompt="a blue square", latents=lat[2:]))
    torch.testing.assert_close(both[:2], first, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[2:], second, rtol=1e-4, atol=1e-5)
    assert not torch.equal(first, _run(pipe, **_kw(family, n=2, prompt="a red circle", latents=lat[:2])))


def test_flux_true_cfg_keeps_two_prompts_apart_in_its_separate_uncond_forward(pipes):
    """FLUX true CFG runs the negative prompt as its own forward, whose rows all share one
    negative: the uncond pass groups them by their cond twins, so each prompt's samples still
    come out as when it runs alone, and the uncond pass is repelled too."""
    pipe = pipes["flux"]
    lat = _latents(pipe, "flux", 4)
    cfg = dict(true_cfg_scale=3.0)
    rep = da.ContextRepulsion(eta=0.5, tau=2, inner=2, blocks="all")
    both = _run(pipe, rep, **_kw("flux", n=2, prompt=["a red circle", "a blue square"], negative_prompt=["", ""],
                                 latents=lat, **cfg))
    first = _run(pipe, rep, **_kw("flux", n=2, prompt="a red circle", negative_prompt="", latents=lat[:2], **cfg))
    second = _run(pipe, rep, **_kw("flux", n=2, prompt="a blue square", negative_prompt="", latents=lat[2:], **cfg))
    torch.testing.assert_close(both[:2], first, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[2:], second, rtol=1e-4, atol=1e-5)
    cond_only = da.ContextRepulsion(eta=0.5, tau=2, inner=2, blocks="all", branches=("cond",))
    assert not torch.equal(first, _run(pipe, cond_only, **_kw("flux", n=2, prompt="a red circle", negative_prompt="",
                                                              latents=lat[:2], **cfg)))


def test_prompt_groups_of_a_separate_uncond_forward_follow_its_cond_twins():
    from diffattn.controls import StepState
    from diffattn.engine import ForwardContext

    neg = torch.zeros(4, 3, 2)  # one negative prompt for every row
    cond = torch.stack([torch.ones(3, 2), torch.ones(3, 2), 2 * torch.ones(3, 2), 2 * torch.ones(3, 2)])
    step = StepState(index=0, timestep=None, sigma=None, num_steps=None)
    alone = ForwardContext(step=step, branches={"uncond": slice(0, 4)}, batch=4, text=neg)
    assert alone.prompt_groups("uncond") == [[0, 1, 2, 3]]  # nothing tells the prompts apart
    paired = ForwardContext(step=step, branches={"uncond": slice(0, 4)}, batch=4, text=neg, cond_text=cond)
    assert paired.prompt_groups("uncond") == [[0, 1], [2, 3]]
    own = neg.clone()
    own[1] = 5.0  # a different negative splits its prompt's group further
    split = ForwardContext(step=step, branches={"uncond": slice(0, 4)}, batch=4, text=own, cond_text=cond)
    assert split.prompt_groups("uncond") == [[0], [1], [2, 3]]


def test_block_choice_and_single_stream_modes(pipes):
    flux = pipes["flux"].transformer
    names = lambda c: [t.name for t in c.targets(flux)]  # noqa: E731
    assert names(da.ContextRepulsion()) == ["transformer_blocks.1"]  # middle third of 4 blocks: [4 // 3, 8 // 3)
    assert names(da.ContextRepulsion(blocks="all")) == ["transformer_blocks.0", "transformer_blocks.1",
                                                         "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert [t.outputs for t in da.ContextRepulsion(blocks=[3]).targets(flux)] == [(0, 1)]
    assert [t.outputs for t in da.ContextRepulsion(blocks=[3], single="text").targets(flux)] == [(0,)]
    sd3 = pipes["sd3"].transformer  # 4 joint blocks, the last context_pre_only: 3 text-stream blocks
    assert [t.name for t in da.ContextRepulsion().targets(sd3)] == ["transformer_blocks.1"]
    with pytest.raises(da.ControlError, match="text-stream blocks"):
        da.ContextRepulsion(blocks=[9]).targets(sd3)
    for bad in (dict(eta=-1.0), dict(inner=0), dict(loss="nope"), dict(blocks="middle-ish"), dict(single="image")):
        with pytest.raises(da.ControlError):
            da.ContextRepulsion(**bad)


@pytest.mark.parametrize("family", ["sd15", "wan"])
def test_families_without_a_text_stream_are_refused_naming_the_supported_ones(family):
    pipe = tiny_pipeline(family)
    with pytest.raises(da.UnsupportedModelError, match=r"sd3.*flux|flux.*sd3"):
        da.attach(pipe, da.ContextRepulsion())
    from diffattn.engine import is_attached

    assert not is_attached(pipe)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_denoiser_gives_the_eager_result(family):
    torch._dynamo.reset()
    pipe = tiny_pipeline(family, **FAMILIES[family])
    rep = da.ContextRepulsion(eta=0.5, tau=2, inner=2, blocks="all")
    lat = _latents(pipe, family, 3)
    eager = _run(pipe, rep, **_kw(family, latents=lat))
    pipe.transformer.compile(backend="eager")
    try:
        compiled = _run(pipe, rep, **_kw(family, latents=lat))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    assert not torch.equal(compiled, _run(pipe, **_kw(family, latents=lat)))  # the hook did act when compiled
    torch._dynamo.reset()


def test_inside_the_guidance_wrapper_the_extra_branch_is_left_alone(pipes, monkeypatch):
    """With SoftPAG's perturbed branch in the batch, the hooks see the wrapper's batch and
    repel the cond rows only (FLUX: no CFG rows)."""
    import diffattn.methods.repulsion as rep_mod

    seen = []
    original = rep_mod.branch_groups

    def spy(ctx, branches):
        groups = original(ctx, branches)
        seen.append((dict(ctx.branches), groups))
        return groups

    monkeypatch.setattr(rep_mod, "branch_groups", spy)
    pipe = pipes["flux"]
    soft = da.SoftPAG("all", strength=0.5, scale=2.0)
    rep = da.ContextRepulsion(eta=0.5, tau=2, inner=2, blocks="all")
    out = _run(pipe, [soft, rep], **_kw("flux", n=2))
    assert torch.isfinite(out).all()
    assert seen and all(set(b) == {"cond", "perturbed"} for b, _ in seen)
    for branches, groups in seen:
        perturbed = set(range(branches["perturbed"].start, branches["perturbed"].stop))
        assert groups == [[0, 1]] and not perturbed & {r for g in groups for r in g}


def test_registry_record_builds_and_runs(pipes):
    from diffattn.methods.registry import get_method

    m = get_method("repulsion")
    assert m.kind == "control" and [p.name for p in m.params] == ["eta", "tau", "inner", "loss", "norm_invariant"]
    run = m.build(pipes["flux"], eta=0.5, tau=1, inner=2)
    assert isinstance(run.control, da.ContextRepulsion)
    out = run("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=1, height=16,
              width=16, num_images_per_prompt=2, max_sequence_length=16)
    assert len(out.images) == 2


@pytest.mark.parametrize("family", ["sd35", "flux_kontext"])
def test_sd35_and_flux_kontext_pipelines_take_the_control(family):
    """The other MMDiT pipelines of the issue: η = 0 is the stock pipeline bit for bit, η > 0
    changes the samples of a group, and a single sample is left alone."""
    pipe = tiny_pipeline(family)
    over = {"guidance_scale": 4.0} if family == "sd35" else {}
    kw = lambda n: tiny_call_kwargs(family, steps=2, num_images_per_prompt=n, **over)  # noqa: E731
    base = _run(pipe, **kw(3))
    assert torch.equal(_run(pipe, da.ContextRepulsion(eta=0.0, tau=2, blocks="all"), **kw(3)), base)
    edited = _run(pipe, da.ContextRepulsion(eta=0.5, tau=2, inner=2, blocks="all"), **kw(3))
    assert edited.shape == base.shape and not torch.equal(edited, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-group warning of a single sample
        single = _run(pipe, da.ContextRepulsion(eta=0.5, tau=2, inner=2, blocks="all"), **kw(1))
    assert torch.equal(single, _run(pipe, **kw(1)))
