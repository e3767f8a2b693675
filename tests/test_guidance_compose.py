"""SoftPAG composes exactly with every guidance knob of the supported diffusers pipelines.

- against diffusers' own PAG pipelines: ``guidance_rescale`` in {0, 0.7} (SD1.5, SDXL), several
  prompts, negatives, ``num_images_per_prompt > 1``;
- against references computed by hand from separate forwards of the denoiser (one step, the
  prediction the scheduler receives): SD3 skip-layer guidance (batch 1 and 2; the skip-layer
  forward gets no perturbed branch), FLUX true CFG, Wan's two-call CFG.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

import diffattn as da
from diffattn.guidance import take_batch
from diffattn.sites import select
from diffattn.tiny import output_of

# ----------------------------------------------------------------------------- vs diffusers PAG


def _mid_self(pipe):
    return {s.name: "all" for s in select(select(pipe, "m0"), "self")}


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("family,ref_cls", [("sd15", StableDiffusionPAGPipeline), ("sdxl", StableDiffusionXLPAGPipeline)])
def test_layer_softpag_equals_diffusers_pag_with_guidance_rescale(tiny_pipe, tiny_inputs, family, ref_cls, rescale):
    """Δ rides on the uncond row, so guidance_rescale's std(ε_c) sees the true ε_c, as in
    diffusers' PAG pipelines (``rescale_noise_cfg(noise_pred, noise_pred_text)``)."""
    pipe = tiny_pipe(family)
    call = dict(steps=3, guidance_scale=4.0, prompt=["a red circle", "a blue square"],
                negative_prompt=["dark", "blurry"], num_images_per_prompt=2, guidance_rescale=rescale)
    with da.attach(pipe, da.SoftPAG(_mid_self(pipe), strength=1.0, scale=2.5)):
        ours = output_of(pipe(**tiny_inputs(family, **call)))
    ref_pipe = ref_cls(**pipe.components, pag_applied_layers=["mid"])
    ref = output_of(ref_pipe(**tiny_inputs(family, **call), pag_scale=2.5))
    assert ours.shape[0] == 4
    assert (ours - ref).abs().max() <= 1e-5


def test_pndm_repeated_timestep_is_not_a_second_call(tiny_fresh, tiny_inputs, recwarn):
    """SD1.5's default PNDM scheduler repeats one timestep across two steps: both are guided
    steps (no 'unidentified' call), so SoftPAG still equals diffusers' PAG pipeline."""
    from diffusers import PNDMScheduler

    pipe = tiny_fresh("sd15")
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    call = dict(steps=4, guidance_scale=4.0)
    with da.attach(pipe, da.SoftPAG(_mid_self(pipe), strength=1.0, scale=2.5)):
        ours = output_of(pipe(**tiny_inputs("sd15", **call)))
    ref = output_of(StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["mid"])(
        **tiny_inputs("sd15", **call), pag_scale=2.5))
    assert not [w for w in recwarn if "more than once" in str(w.message)]
    assert (ours - ref).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- by hand


class Seen(da.Control):
    """Records the branch layout of every attention call at one site."""

    def __init__(self, site):
        super().__init__(sites=site)
        self.layouts = []

    def edit_spec(self, call):
        self.layouts.append({k: (v.start, v.stop) for k, v in call.branches.items()})


def _one_step(pipe, kw, *controls):
    """(the prediction the scheduler receives at the first step, the denoiser's inputs of the
    first call) of one pipeline run with ``controls`` attached."""
    got, inputs = {}, []
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        got.setdefault("pred", model_output.detach().clone())
        return step(model_output, *args, **kwargs)

    denoiser = pipe.transformer
    hook = denoiser.register_forward_pre_hook(lambda m, a, k: inputs.append(dict(k)), with_kwargs=True)
    pipe.scheduler.step = recording_step
    try:
        with da.attach(pipe, *controls):
            pipe(**kw)
    finally:
        del pipe.scheduler.step  # the instance attribute goes: the class's method is back
        hook.remove()
    return got["pred"], inputs


def _perturbation(denoiser, inputs, heads, scale):
    """Δ = s·(ε_c − ε_perturbed) from two separate forwards of the bare denoiser on ``inputs``."""
    inputs = {k: v for k, v in inputs.items() if k != "return_dict"}
    with torch.no_grad():
        eps_c = denoiser(**inputs, return_dict=False)[0]
        with da.attach(denoiser, da.SoftPAG(heads, strength=1.0, scale=0.0)) as h, \
                h.branches({"perturbed": slice(0, eps_c.shape[0])}):
            eps_p = denoiser(**inputs, return_dict=False)[0]
    return scale * (eps_c - eps_p)


@pytest.mark.parametrize("batch", [1, 2])
def test_sd3_skip_layer_guidance_plus_softpag_equals_slg_plus_the_perturbation(tiny_fresh, tiny_inputs, batch):
    """One step of StableDiffusion3Pipeline with ``skip_guidance_layers`` and SoftPAG is SLG's
    own result + s·(ε_c − ε_perturbed); the skip-layer forward (cond rows only, an even batch
    under CFG when batch = 2) is the ``skip`` branch and gets no perturbed branch."""
    pipe = tiny_fresh("sd3", num_layers=3)
    heads, s = {"transformer_blocks.1.attn": "all"}, 2.0
    prompts = ["a red circle", "a blue square"][:batch]
    kw = lambda: tiny_inputs("sd3", steps=1, guidance_scale=4.0, prompt=prompts, skip_guidance_layers=[1],
                             skip_layer_guidance_start=-1.0,  # diffusers' window is i > start·n: from step 0 skip_layer_guidance_stop=1.0,
                             skip_layer_guidance_scale=2.8, output_type="latent")
    stock, inputs = _one_step(pipe, kw())
    seen = Seen("transformer_blocks.0.attn")
    ours, _ = _one_step(pipe, kw(), da.SoftPAG(heads, strength=1.0, scale=s), seen)
    main = inputs[0]  # [uncond, cond] of the guided forward
    assert main["hidden_states"].shape[0] == 2 * batch and inputs[1]["skip_layers"] == [1]
    cond = {k: take_batch(v, 2 * batch, slice(batch, 2 * batch)) for k, v in main.items()}
    delta = _perturbation(pipe.transformer, cond, heads, s)
    torch.testing.assert_close(ours, stock + delta, atol=2e-5, rtol=0)
    assert seen.layouts == [{"uncond": (0, batch), "cond": (batch, 2 * batch), "perturbed": (2 * batch, 3 * batch)},
                            {"skip": (0, batch)}]


def test_flux_true_cfg_plus_softpag(tiny_fresh, tiny_inputs):
    """FluxPipeline with a negative prompt and ``true_cfg_scale`` runs cond and uncond as two
    named forwards; both shift by Δ, so the combination gains exactly Δ."""
    pipe = tiny_fresh("flux")
    heads, s = {"transformer_blocks.0.attn": "all"}, 1.5
    kw = lambda: tiny_inputs("flux", steps=1, negative_prompt="blurry", true_cfg_scale=3.0, output_type="latent")
    stock, inputs = _one_step(pipe, kw())
    seen = Seen("transformer_blocks.0.attn")
    ours, _ = _one_step(pipe, kw(), da.SoftPAG(heads, strength=1.0, scale=s), seen)
    delta = _perturbation(pipe.transformer, inputs[0], heads, s)  # the first forward is the cond one
    torch.testing.assert_close(ours, stock + delta, atol=2e-5, rtol=0)
    assert seen.layouts == [{"cond": (0, 1), "perturbed": (1, 2)}, {"uncond": (0, 1)}]


def test_wan_two_call_cfg_plus_softpag(tiny_fresh, tiny_inputs):
    pipe = tiny_fresh("wan")
    heads, s = {"blocks.0.attn1": "all"}, 1.5
    kw = lambda: tiny_inputs("wan", steps=1, output_type="latent")
    stock, inputs = _one_step(pipe, kw())
    ours, _ = _one_step(pipe, kw(), da.SoftPAG(heads, strength=1.0, scale=s))
    delta = _perturbation(pipe.transformer, inputs[0], heads, s)
    torch.testing.assert_close(ours, stock + delta, atol=2e-5, rtol=0)


def test_an_unnamed_second_call_in_a_step_gets_no_extra_branch(tiny_pipe):
    """A pipeline that calls its denoiser twice in one step without naming the calls: the
    second call is ``unidentified`` (one warning naming the pipeline), with no perturbed rows."""
    pipe = tiny_pipe("sd3")
    model = pipe.transformer
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(1, 5, model.config.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
              timestep=torch.full((1,), 700.0), return_dict=False)
    seen = Seen("transformer_blocks.0.attn")
    pipe._guidance_scale = 1.0  # no CFG: one row per call
    pipe.scheduler.set_timesteps(4)
    pipe.scheduler._step_index = 1  # mid-run, as inside the pipeline's loop
    try:
        with torch.no_grad(), da.attach(pipe, da.SoftPAG("all", scale=1.0), seen):
            model(**kw)
            with pytest.warns(UserWarning, match="StableDiffusion3Pipeline called its denoiser more than once"):
                model(**kw)
            model(**kw)  # warned once only
    finally:
        pipe.scheduler._step_index = None
    assert seen.layouts == [{"cond": (0, 1), "perturbed": (1, 2)}, {"unidentified": (0, 1)}, {"unidentified": (0, 1)}]


def test_diffattn_loops_refuse_controls_attached_around_them(tiny_pipe):
    """A-STAR and UAM run their own CFG: a SoftPAG attached around them would be folded with a
    scale the engine cannot read, so they refuse, naming the fix; the pipeline is untouched."""
    from diffattn.pipelines import AStarPipeline, UAMPipeline

    pipe = tiny_pipe("sd15")
    uam = UAMPipeline(pipe, progress=False)
    with da.attach(pipe, da.SoftPAG("all", scale=2.0)):
        with pytest.raises(da.ControlError, match="AStarPipeline runs its own sampling loop.*Detach them"):
            AStarPipeline(pipe)("a cat and a dog", ["cat", "dog"], num_inference_steps=1)
        with pytest.raises(da.ControlError, match="UAMPipeline runs its own sampling loop"):
            uam.invert(torch.full((3, 32, 32), 0.5), "a cat", num_inference_steps=1)
    assert not any(type(p).__module__.startswith("diffattn") for p in pipe.unet.attn_processors.values())
