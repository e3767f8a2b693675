"""SoftPAG: exactness against materialised references and diffusers' PAG pipelines."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3PAGPipeline, StableDiffusionPAGPipeline

import diffattn as da
from diffattn.controls import AttentionCall, StepState
from diffattn.errors import ControlError, SelectorError
from diffattn.guidance import fold_guidance
from diffattn.layout import TokenLayout, segments
from diffattn.methods.perturbation import materialised_reference
from diffattn.methods.softpag import SoftPAG
from diffattn.processors.base import DiffattnProcessor
from diffattn.sites import Site, select
from diffattn.tiny import output_of


def _call(q, k, v, layout, rows):
    site = Site("blocks.0.attn", "sd3", "joint", 0, q.shape[1], q.shape[-1])
    return AttentionCall(site=site, layout=layout, q=q, k=k, v=v, step=StepState(), branches={"cond": slice(0, rows), "perturbed": slice(rows, q.shape[0])})


@pytest.mark.parametrize("text_first", [False, True])  # SD3: [image, text]; FLUX: [text, image]
@pytest.mark.parametrize("target,semantics", [
    ("identity", "joint"), ("identity", "image"), ("identity", "image-self"),
    ("uniform", "joint"), ("uniform", "image"), ("meanquery", "joint"), ("meanquery", "image"),
])
def test_output_space_equals_materialised_matrix(target, semantics, text_first):
    torch.manual_seed(0)
    b, h, n_img, n_txt, d = 1, 3, 9, 4, 8
    q, k, v = torch.randn(3, 2 * b, h, n_img + n_txt, d, dtype=torch.float64).unbind(0)
    parts = [("image", n_img, (3, 3)), ("text", n_txt, None)]
    layout = TokenLayout(*(segments(*(parts[::-1] if text_first else parts)),) * 2)
    image, text = (slice(n_txt, None), slice(0, n_txt)) if text_first else (slice(0, n_img), slice(n_img, None))
    u = torch.tensor([0.0, 0.4, 1.0])
    ctrl = SoftPAG({"blocks.0.attn": {0: 0.0, 1: 0.4, 2: 1.0}}, target=target, semantics=semantics)
    ctrl.u = {"blocks.0.attn": u}
    call = _call(q, k, v, layout, b)
    proc = DiffattnProcessor.__new__(DiffattnProcessor)
    ctrl.edit_spec(call)
    out = ctrl.edit_output(call, proc._kernel(call))
    ref = materialised_reference(q[b:], k[b:], v[b:], u, target=target, semantics=semantics, image=image, text=text)
    torch.testing.assert_close(out[b:], ref, atol=1e-10, rtol=1e-8)
    plain = torch.softmax(q[:b] @ k[:b].transpose(-1, -2) / d**0.5, -1) @ v[:b]
    torch.testing.assert_close(out[:b], plain, atol=1e-10, rtol=1e-8)  # cond rows untouched


def test_cached_head_blend_is_copied_before_another_control_edits_it():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 13, 8, dtype=torch.float64)
    layout = TokenLayout(*(segments(("image", 9, (3, 3)), ("text", 4, None)),) * 2)
    ctrl = SoftPAG({"blocks.0.attn": [0, 1, 2]})
    ctrl.u = {"blocks.0.attn": torch.tensor([0.0, 0.4, 1.0])}
    first = _call(q, q, q, layout, 1)
    ctrl.edit_spec(first)
    torch.testing.assert_close(first.spec.head_blend, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.4, 1.0]], dtype=torch.float64))
    first.head_blend()[:, 0] = 0.9  # a later control editing the blend in place
    second = _call(q, q, q, layout, 1)
    ctrl.edit_spec(second)  # the cache is untouched by that edit
    torch.testing.assert_close(second.spec.head_blend, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.4, 1.0]], dtype=torch.float64))
    ctrl.u["blocks.0.attn"][0] = 0.25  # editing u in place is seen at the next call
    third = _call(q, q, q, layout, 1)
    ctrl.edit_spec(third)
    assert third.spec.head_blend[1, 0].item() == 0.25 and third.spec.head_blend[0].abs().sum() == 0


def test_guidance_arithmetic():
    c, p = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(fold_guidance(c, [p], [2.0], cfg_scale=1.0), c + 2.0 * (c - p))
    # with CFG w, the pipeline's uncond + w(cond' - uncond) must give uncond + w(c-u) + s(c-p)
    u, w, s = torch.tensor([0.1, 0.2]), 4.0, 3.0
    folded = fold_guidance(c, [p], [s], cfg_scale=w)
    torch.testing.assert_close(u + w * (folded - u), u + w * (c - u) + s * (c - p))


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux", "wan"])
def test_zero_strength_or_no_heads_reproduces_unguided(family, tiny_pipe, tiny_inputs):
    pipe = tiny_pipe(family)
    stock = output_of(pipe(**tiny_inputs(family)))
    with da.attach(pipe, SoftPAG("all", strength=0.0, scale=5.0)):
        zero = output_of(pipe(**tiny_inputs(family)))
    with pytest.raises(ControlError, match="selects no head"):  # no heads: refused, not a silent no-op
        SoftPAG({}, scale=5.0)
    with da.attach(pipe, SoftPAG("all", strength=1.0, scale=5.0)):
        guided = output_of(pipe(**tiny_inputs(family)))
    assert torch.equal(zero, stock)
    assert (guided - stock).abs().max() > 1e-4  # guidance does something


class ForcedBranch(SoftPAG):
    """SoftPAG whose perturbed branch runs even when every u is 0 (no short cut)."""

    def guidance_scale(self, step):
        return self.scale


@pytest.mark.parametrize("family", ["sd15", "sd3", "sd35", "flux", "flux_kontext", "wan"])
def test_perturbed_branch_with_zero_u_is_the_cond_branch(family, tiny_pipe, tiny_inputs):
    """The branch runs (3-row batch, or its own forward on FLUX) with u = 0 on every head:
    ε_pert = ε_c, so the guided output equals the unguided one; u > 0 on one head moves it.
    SD3.5 (qk-norm, dual attention) and FLUX Kontext (context image, RoPE) included."""
    pipe = tiny_pipe(family)
    stock = output_of(pipe(**tiny_inputs(family)))
    with da.attach(pipe, ForcedBranch("all", strength=0.0, scale=5.0)):
        zero = output_of(pipe(**tiny_inputs(family)))
    torch.testing.assert_close(zero, stock, atol=1e-5, rtol=0)  # batch composition may change the last bits
    site = [s for s in da.sites(pipe) if s.kind in ("self", "joint", "single")][0]
    with da.attach(pipe, ForcedBranch({site.name: {0: 1.0}}, scale=5.0)):
        one = output_of(pipe(**tiny_inputs(family)))
    assert (one - stock).abs().max() > 1e-4


def test_preset_values_and_caller_overrides(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sd3")
    preset = {"model": _model_name(pipe),
              "heads": [["transformer_blocks.0.attn", 1, 0.5], ["transformer_blocks.1.attn", 0, 1.0]], "scale": 2.5}
    path = tmp_path / "preset.json"
    path.write_text(__import__("json").dumps(preset))
    with da.attach(pipe, SoftPAG(str(path))) as h:  # the preset's heads, u and scale
        ctrl = h.engine.controls[0]
        assert ctrl.scale == 2.5
        assert ctrl.u["transformer_blocks.0.attn"].tolist() == [0.0, 0.5] + [0.0] * (len(ctrl.u["transformer_blocks.0.attn"]) - 2)
        assert ctrl.u["transformer_blocks.1.attn"][0].item() == 1.0
    with da.attach(pipe, SoftPAG(str(path), strength=0.25, scale=4.0)) as h:  # the caller's values win
        ctrl = h.engine.controls[0]
        assert ctrl.scale == 4.0
        assert ctrl.u["transformer_blocks.0.attn"][1].item() == 0.25 and ctrl.u["transformer_blocks.1.attn"][0].item() == 0.25


def _model_name(pipe):
    from diffattn.methods.softpag import model_id

    return model_id(pipe.transformer)


def test_model_id_of_a_hub_cache_folder():
    from types import SimpleNamespace

    from diffattn.methods.softpag import model_id

    cached = "/root/.cache/huggingface/hub/models--stabilityai--stable-diffusion-3.5-medium/snapshots/b940f670/transformer"
    assert model_id(SimpleNamespace(config=SimpleNamespace(_name_or_path=cached))) == "stabilityai/stable-diffusion-3.5-medium"
    assert model_id(SimpleNamespace(config=SimpleNamespace(_name_or_path="/data/models/tiny-sd3/transformer"))) == "tiny-sd3"


def test_layer_pag_equals_diffusers_unet_pag_pipeline(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd15")
    kw = tiny_inputs("sd15", steps=3, guidance_scale=4.0)
    mid_self = [s.name for s in select(select(pipe, "m0"), "self")]
    with da.attach(pipe, SoftPAG({n: "all" for n in mid_self}, strength=1.0, scale=2.5)):
        ours = output_of(pipe(**kw))
    ref_pipe = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    ref = output_of(ref_pipe(**tiny_inputs("sd15", steps=3, guidance_scale=4.0), pag_scale=2.5))
    assert (ours - ref).abs().max() <= 1e-5


def test_image_self_layer_pag_equals_diffusers_sd3_pag_pipeline(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    layer = "transformer_blocks.1.attn"
    with da.attach(pipe, SoftPAG({layer: "all"}, strength=1.0, scale=2.0, semantics="image-self")):
        ours = output_of(pipe(**tiny_inputs("sd3", steps=3, guidance_scale=3.0)))
    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    ref_pipe = StableDiffusion3PAGPipeline(**parts, pag_applied_layers=[r"transformer_blocks\.1\.attn$"])
    ref = output_of(ref_pipe(**tiny_inputs("sd3", steps=3, guidance_scale=3.0), pag_scale=2.0))
    assert (ours - ref).abs().max() <= 1e-5


def test_bad_input_is_a_clear_error(tiny_pipe):
    pipe = tiny_pipe("sd3")
    with pytest.raises(ControlError, match=r"\[0, 1\]"):
        SoftPAG("all", strength=1.5)
    with pytest.raises(SelectorError, match="no attention site"):
        da.attach(pipe, SoftPAG({"transformer_blocks.77.attn": [0]}))
    with pytest.raises(SelectorError, match="head"):
        da.attach(pipe, SoftPAG({"transformer_blocks.0.attn": [99]}))
    with pytest.raises(ControlError, match="made for"):
        da.attach(pipe, SoftPAG({"model": "some/other-model", "heads": [["transformer_blocks.0.attn", 0, 1.0]], "scale": 3.0}))
    with pytest.raises(ControlError, match="image-self"):
        SoftPAG("all", target="uniform", semantics="image-self")
    with pytest.raises(ControlError, match="made for"):  # another model's preset: the model is named, not its sites
        da.attach(pipe, SoftPAG({"model": "black-forest-labs/FLUX.1-dev",
                                 "heads": [["single_transformer_blocks.0.attn", 0, 1.0]], "scale": 3.0}))
    with pytest.raises(ControlError, match="scale"):
        SoftPAG("all", scale=-1.0)


def test_step_window_and_schedule_end_to_end(tiny_pipe, tiny_inputs):
    """A window holding no step, or a schedule that is 0, gives the unguided output; a window
    over part of the run lies between; a schedule of 1 is the plain scale."""
    pipe = tiny_pipe("sd3")
    kw = lambda: tiny_inputs("sd3", steps=4, guidance_scale=3.0)  # noqa: E731
    stock = output_of(pipe(**kw()))

    def run(**options):
        with da.attach(pipe, SoftPAG("all", strength=1.0, scale=3.0, **options)):
            return output_of(pipe(**kw()))

    full = run()
    assert torch.equal(run(steps=(10, 20)), stock)  # no step of the 4 in the window
    assert torch.equal(run(schedule=lambda step: 0.0), stock)
    torch.testing.assert_close(run(schedule=lambda step: 1.0), full, atol=1e-6, rtol=0)
    half = run(steps=(0.5, 1.0))  # the last two steps only
    assert (half - stock).abs().max() > 1e-4 and (half - full).abs().max() > 1e-4


def test_every_head_spec_form_resolves_to_the_same_u(tiny_pipe):
    """"all", a mapping (head list, "all", {head: u}), (site, head) pairs and (site, head, u)
    triples give the per-head u tensors they say."""
    from diffattn.methods.softpag import resolve_heads

    all_sites = da.sites(tiny_pipe("sd3"))
    a, b = "transformer_blocks.0.attn", "transformer_blocks.1.attn"
    n = next(s.heads for s in all_sites if s.name == a)
    want = {a: torch.tensor([0.0, 0.5] + [0.0] * (n - 2)), b: torch.full((n,), 0.5)}
    forms = [
        {a: [1], b: "all"},
        {a: {1: 0.5}, b: {h: 0.5 for h in range(n)}},
        [(a, 1)] + [(b, h) for h in range(n)],
        [(a, 1, 0.5)] + [(b, h, 0.5) for h in range(n)],
    ]
    for form in forms:
        got = resolve_heads(all_sites, form, 0.5)
        assert set(got) == set(want) and all(torch.equal(got[k].float(), want[k]) for k in want), form
    every = resolve_heads(all_sites, "all", 0.25)
    assert set(every) == {s.name for s in all_sites if s.kind in ("self", "joint", "single")}
    assert all(bool((t == 0.25).all()) for t in every.values())
