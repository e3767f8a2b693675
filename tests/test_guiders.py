"""diffattn.SoftPAGGuidance: SoftPAG as a Modular Diffusers guider (diffusers.guiders).

Tiny modular SDXL and SD3 pipelines are built offline from diffattn.tiny's components
(``<Family>AutoBlocks().init_pipeline()`` + ``update_components(**pipe.components)``), and the
guider is compared with diffusers' own ``PerturbedAttentionGuidance`` on the same whole layers.

diffusers 0.42.1 registers no layer-skip metadata for SD3's ``JointAttnProcessor2_0``, so its
PAG guider raises "Model class JointAttnProcessor2_0 not registered" on any SD3 model; the SD3
comparison registers that metadata for the test (its output function is never called when
``skip_attention_scores=True``) and removes it afterwards.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers.guiders")
pytest.importorskip("diffusers.modular_pipelines")

from diffusers.guiders import ClassifierFreeGuidance, PerturbedAttentionGuidance  # noqa: E402
from diffusers.hooks import LayerSkipConfig  # noqa: E402

import diffattn as da  # noqa: E402
from diffattn.errors import ControlError, SelectorError  # noqa: E402

MID = "mid_block.attentions.0.transformer_blocks"  # the tiny SDXL UNet's mid block: 2 transformer blocks
WINDOW = dict(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)  # steps 1..N-1 (diffusers' strict start)
STEPS = 4
TOL = 1e-5


def _modular(blocks_cls, pipe):
    modular = blocks_cls().init_pipeline()
    modular.update_components(**{k: v for k, v in pipe.components.items() if v is not None})
    modular.set_progress_bar_config(disable=True)
    return modular


@pytest.fixture(scope="module")
def sdxl():
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    from diffattn.tiny import tiny_sdxl

    return _modular(StableDiffusionXLAutoBlocks, tiny_sdxl())


@pytest.fixture(scope="module")
def sd3():
    from diffusers.modular_pipelines import StableDiffusion3AutoBlocks

    from diffattn.tiny import tiny_sd3

    return _modular(StableDiffusion3AutoBlocks, tiny_sd3(num_layers=3))


@pytest.fixture
def joint_processor_registered():
    """Register SD3's JointAttnProcessor2_0 with diffusers' layer-skip registry (missing in
    diffusers 0.42.1) for the duration of a test."""
    from diffusers.hooks._helpers import AttentionProcessorMetadata, AttentionProcessorRegistry
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    AttentionProcessorRegistry._register()
    had = JointAttnProcessor2_0 in AttentionProcessorRegistry._registry
    if not had:
        def unused(*args, **kwargs):  # only skip_attention=True calls it; PAG skips the scores
            raise NotImplementedError

        AttentionProcessorRegistry.register(JointAttnProcessor2_0, AttentionProcessorMetadata(unused))
    yield
    if not had:
        AttentionProcessorRegistry._registry.pop(JointAttnProcessor2_0, None)


def _run_sdxl(modular, guider):
    modular.update_components(guider=guider)
    return modular(prompt="a red circle", negative_prompt="", num_inference_steps=STEPS, height=32, width=32,
                   generator=torch.Generator().manual_seed(0), output="latents")


def _run_sd3(modular, guider):
    modular.update_components(guider=guider)
    return modular(prompt="a red circle", negative_prompt="", num_inference_steps=STEPS, height=16, width=16,
                   max_sequence_length=16, generator=torch.Generator().manual_seed(0), output="latents")


def _snapshot(model):
    """The model's processor objects (by identity) and every diffusers hook on its modules."""
    procs = {k: id(p) for k, p in model.attn_processors.items()}
    hooks = {name: sorted(m._diffusers_hook.hooks) for name, m in model.named_modules()
             if hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks}
    return procs, hooks


def _diffusers_pag(layers, fqn, **kw):
    config = LayerSkipConfig(indices=list(layers), fqn=fqn, skip_attention=False, skip_attention_scores=True,
                             skip_ff=False)
    return PerturbedAttentionGuidance(perturbed_guidance_config=config, **kw)


# ----------------------------------------------------------------------------- equivalence


def test_sdxl_equals_diffusers_pag_at_whole_layer_strength_one(sdxl):
    """The guider equivalence of item 3: SoftPAG at u = 1 on whole layers == diffusers' PAG."""
    kw = dict(guidance_scale=5.0, perturbed_guidance_scale=2.0, **WINDOW)
    before = _snapshot(sdxl.unet)
    ref = _run_sdxl(sdxl, _diffusers_pag([0, 1], MID, **kw))
    assert _snapshot(sdxl.unet) == before

    by_layers = _run_sdxl(sdxl, da.SoftPAGGuidance(perturbed_guidance_layers=[0, 1], perturbed_guidance_fqn=MID, **kw))
    assert _snapshot(sdxl.unet) == before  # processors and hooks restored after the run
    by_heads = _run_sdxl(sdxl, da.SoftPAGGuidance(heads={f"{MID}.0.attn1": "all", f"{MID}.1.attn1": "0-3"},
                                                  strength=1.0, **kw))
    assert _snapshot(sdxl.unet) == before
    cfg = _run_sdxl(sdxl, ClassifierFreeGuidance(guidance_scale=5.0))

    assert (ref - cfg).abs().max() > 1e-3  # the perturbation acts
    for ours in (by_layers, by_heads):
        diff = (ours - ref).abs().max().item()
        print(f"SoftPAGGuidance vs PerturbedAttentionGuidance (SDXL, mid block, u=1): max |diff| = {diff:.3g}")
        assert diff <= TOL


def test_sd3_equals_diffusers_pag_at_whole_layer_strength_one(sd3, joint_processor_registered):
    """SD3 (joint attention): diffusers' identity replaces the joint attention's output by V
    over image and text tokens, SoftPAG's ``semantics="joint"``; a HeadHunter-style preset with
    u = 1 on every head of the layer is the same guider."""
    kw = dict(guidance_scale=5.0, perturbed_guidance_scale=2.0, **WINDOW)
    before = _snapshot(sd3.transformer)
    ref = _run_sd3(sd3, _diffusers_pag([1], "transformer_blocks", **kw))
    ours = _run_sd3(sd3, da.SoftPAGGuidance(perturbed_guidance_layers=[1], **kw))
    preset = {"model": None, "heads": [["transformer_blocks.1.attn", 0, 1.0], ["transformer_blocks.1.attn", 1, 1.0]],
              "scale": 2.0}
    by_preset = _run_sd3(sd3, da.SoftPAGGuidance(heads=preset, guidance_scale=5.0, **WINDOW))
    assert _snapshot(sd3.transformer) == before
    cfg = _run_sd3(sd3, ClassifierFreeGuidance(guidance_scale=5.0))
    assert (ref - cfg).abs().max() > 1e-3
    for got in (ours, by_preset):
        diff = (got - ref).abs().max().item()
        print(f"SoftPAGGuidance vs PerturbedAttentionGuidance (SD3, block 1, u=1): max |diff| = {diff:.3g}")
        assert diff <= TOL


def test_strength_zero_equals_cfg(sdxl):
    """u = 0 perturbs nothing: no perturbed forward runs and the result is plain CFG, bit for bit."""
    guider = da.SoftPAGGuidance(perturbed_guidance_layers=[0, 1], perturbed_guidance_fqn=MID, strength=0.0,
                                guidance_scale=5.0, perturbed_guidance_scale=2.0, **WINDOW)
    ours = _run_sdxl(sdxl, guider)
    cfg = _run_sdxl(sdxl, ClassifierFreeGuidance(guidance_scale=5.0))
    assert torch.equal(ours, cfg)
    guider.set_state(step=2, num_inference_steps=STEPS, timestep=torch.tensor(500))
    assert guider.num_conditions == 2


def test_partial_strength_lies_between(sdxl):
    """u = 0.5 on the same heads: a perturbation that is neither CFG nor full PAG."""
    kw = dict(guidance_scale=5.0, perturbed_guidance_scale=2.0, **WINDOW)
    full = _run_sdxl(sdxl, da.SoftPAGGuidance(heads={f"{MID}.0.attn1": "all"}, **kw))
    half = _run_sdxl(sdxl, da.SoftPAGGuidance(heads={f"{MID}.0.attn1": "all"}, strength=0.5, **kw))
    cfg = _run_sdxl(sdxl, ClassifierFreeGuidance(guidance_scale=5.0))
    assert (half - cfg).abs().max() > 1e-4 and (half - full).abs().max() > 1e-4


# ----------------------------------------------------------------------------- interface


def test_batches_and_models_through_the_guider_interface(sdxl):
    """prepare_inputs / prepare_models / cleanup_models as a denoise loop calls them; without
    CFG the perturbed batch takes the *conditional* inputs."""
    unet = sdxl.unet
    guider = da.SoftPAGGuidance(heads={f"{MID}.0.attn1": [0, 2]}, strength=0.7, guidance_scale=1.0,
                                perturbed_guidance_scale=3.0, **WINDOW)
    guider.set_state(step=1, num_inference_steps=STEPS, timestep=torch.tensor(500))
    assert guider.num_conditions == 2
    cond, uncond = torch.ones(1, 3), torch.zeros(1, 3)
    batches = guider.prepare_inputs({"prompt_embeds": (cond, uncond)})
    names = [getattr(b, guider._identifier_key) for b in batches]
    assert names == ["pred_cond", "pred_cond_skip"]
    assert all(torch.equal(b.prompt_embeds, cond) for b in batches)

    before = _snapshot(unet)
    original = unet.attn_processors[f"{MID}.0.attn1.processor"]
    guider.prepare_models(unet)  # the cond batch: the model untouched
    assert _snapshot(unet) == before
    guider.cleanup_models(unet)
    guider.prepare_models(unet)  # the perturbed batch: diffattn's processors in place
    assert unet.attn_processors[f"{MID}.0.attn1.processor"] is not original
    assert guider.get_state()["perturbed_installed"]
    guider.cleanup_models(unet)
    assert _snapshot(unet) == before

    c, pert = torch.full((1, 3), 2.0), torch.full((1, 3), 1.0)
    assert torch.equal(guider.forward(c, None, pert).pred, pert + 3.0 * (c - pert))  # diffusers' form
    original_form = guider.new(use_original_formulation=True, guidance_scale=0.0)  # CFG off in that form
    original_form.set_state(step=1, num_inference_steps=STEPS, timestep=torch.tensor(500))
    assert torch.equal(original_form.forward(c, None, pert).pred, c + 3.0 * (c - pert))  # the paper's


def test_step_windows_follow_diffusers_pag():
    """Same number of batches per step as diffusers' PAG for the same windows."""
    kw = dict(guidance_scale=4.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.1,
              perturbed_guidance_stop=0.6, start=0.0, stop=0.8)
    ours = da.SoftPAGGuidance(perturbed_guidance_layers=[0], **kw)
    ref = PerturbedAttentionGuidance(perturbed_guidance_layers=[0], **kw)
    for step in range(10):
        for g in (ours, ref):
            g.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(999 - step))
        assert ours.num_conditions == ref.num_conditions, step


def test_config_round_trip():
    guider = da.SoftPAGGuidance(heads={f"{MID}.0.attn1": {0: 0.5, 3: 1.0}}, guidance_scale=6.0,
                                perturbed_guidance_scale=1.5, semantics="image")
    again = guider.new(guidance_scale=3.0)
    assert isinstance(again, da.SoftPAGGuidance)
    assert again.guidance_scale == 3.0 and again.perturbed_guidance_scale == 1.5
    assert again.config.heads == guider.config.heads and again.config.semantics == "image"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("heads", [
    {"mid_block.attentions.0.transformer_blocks.7.attn1": "all"},  # no such site
    {f"{MID}.0.attn1": [9]},                                          # no such head
    {f"{MID}.0.attn2": "all"},                                        # cross attention: not perturbable
])
def test_bad_selector_is_a_diffattn_error_and_leaves_the_model(sdxl, heads):
    guider = da.SoftPAGGuidance(heads=heads, guidance_scale=5.0, **WINDOW)
    before = _snapshot(sdxl.unet)
    with pytest.raises(SelectorError):
        _run_sdxl(sdxl, guider)
    assert _snapshot(sdxl.unet) == before
    assert not guider.get_state()["perturbed_installed"]


def test_bad_layers_and_arguments():
    with pytest.raises(ControlError, match="not both"):
        da.SoftPAGGuidance(heads="all", perturbed_guidance_layers=[0])
    with pytest.raises(ControlError, match="u must lie"):
        da.SoftPAGGuidance(strength=1.5)
    with pytest.raises(ControlError, match="target"):
        da.SoftPAGGuidance(target="gaussian")
    with pytest.raises(ControlError, match="block indices"):
        da.SoftPAGGuidance(perturbed_guidance_layers=["mid"])


def test_layers_on_a_unet_need_an_fqn(sdxl):
    guider = da.SoftPAGGuidance(perturbed_guidance_layers=[0], guidance_scale=5.0, **WINDOW)
    guider.set_state(step=1, num_inference_steps=STEPS, timestep=torch.tensor(500))
    guider.prepare_models(sdxl.unet)  # cond
    guider.prepare_models(sdxl.unet)  # uncond
    with pytest.raises(ControlError, match="perturbed_guidance_fqn"):  # perturbed cond
        guider.prepare_models(sdxl.unet)
    guider = da.SoftPAGGuidance(perturbed_guidance_layers=[5], perturbed_guidance_fqn=MID, guidance_scale=5.0, **WINDOW)
    guider.set_state(step=1, num_inference_steps=STEPS, timestep=torch.tensor(500))
    guider.prepare_models(sdxl.unet)
    guider.prepare_models(sdxl.unet)
    with pytest.raises(SelectorError, match="block 5"):
        guider.prepare_models(sdxl.unet)
