"""A-STAR / Attend-and-Excite: loss math on synthetic maps, concept tokens, the reference
equivalence with diffusers' StableDiffusionAttendAndExcitePipeline, the pipeline on tiny
UNet / SDXL / SD3 models, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattn.errors import DiffattnError, UnsupportedModelError
from diffattn.methods.astar import (
    ConceptError,
    attend_excite_loss,
    binarize,
    combined_loss,
    concept_maps,
    concept_token_indices,
    gaussian_kernel,
    heatmap_image,
    otsu_threshold,
    rescale_to_norm,
    retention_loss,
    segregation_loss,
    smooth_maps,
    text_positions,
)
from diffattn.pipelines import AStarConfig, AStarPipeline


def blob(cx, cy, size=16, sigma=2.5):
    """A Gaussian blob [size, size] centred at (cx, cy) (differentiable in the centre)."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


# ----------------------------------------------------------------------------- losses


def test_segregation_zero_for_disjoint_and_half_for_identical():
    a = torch.zeros(8, 8)
    a[:4] = 1.0
    b = torch.zeros(8, 8)
    b[4:] = 1.0
    assert segregation_loss(torch.stack([a, b])).item() == 0.0
    m = torch.rand(8, 8) + 0.1
    assert segregation_loss(torch.stack([m, m])).item() == pytest.approx(0.5, abs=1e-6)
    # three identical maps: three pairs of 0.5
    assert segregation_loss(torch.stack([m, m, m])).item() == pytest.approx(1.5, abs=1e-6)


def test_segregation_gradient_pushes_overlapping_blobs_apart():
    c1 = torch.tensor([6.0, 8.0], requires_grad=True)
    c2 = torch.tensor([9.0, 8.0], requires_grad=True)
    maps = torch.stack([blob(*c1), blob(*c2)])
    loss = segregation_loss(maps)
    g1, g2 = torch.autograd.grad(loss, [c1, c2])
    assert g1[0] > 0 and g2[0] < 0  # descent moves blob 1 left and blob 2 right
    with torch.no_grad():
        n1, n2 = c1 - 2.0 * g1, c2 - 2.0 * g2
        after = segregation_loss(torch.stack([blob(*n1), blob(*n2)]))
    assert (n2[0] - n1[0]) > (c2[0] - c1[0]).detach()
    assert after < loss


def test_retention_minimal_when_map_equals_target():
    target = torch.zeros(2, 8, 8)
    target[0, 2:5, 2:5] = 1
    target[1, 4:8, 1:3] = 1
    at_target = retention_loss(target.clone(), target)
    assert at_target.item() == pytest.approx(2 * 0.5, abs=1e-6)  # 0.5 per concept, its minimum
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = torch.rand(2, 8, 8, generator=g)
        assert retention_loss(other, target) >= at_target - 1e-6
    # the gradient pulls the map toward the target: descent raises A inside B, lowers it outside
    a = torch.full((2, 8, 8), 0.3, requires_grad=True)
    (grad,) = torch.autograd.grad(retention_loss(a, target), [a])
    assert (grad[target.bool()] < 0).all() and (grad[~target.bool()] > 0).all()


def test_single_concept_and_combined_loss():
    maps = torch.rand(1, 8, 8, requires_grad=True)
    seg = segregation_loss(maps)
    assert seg.item() == 0.0 and seg.requires_grad
    loss, parts = combined_loss(maps, {"segregation": 1.0, "retention": 1.0})  # no target yet: retention skipped
    assert loss.item() == 0.0 and parts == {"segregation": 0.0}
    target = binarize(maps)
    loss, parts = combined_loss(maps, {"segregation": 1.0, "retention": 2.0, "attend_excite": 1.0}, target)
    expected = 2 * retention_loss(maps, target) + attend_excite_loss(maps)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"segregation", "retention", "attend_excite"}
    with pytest.raises(ConceptError, match="unknown loss"):
        combined_loss(maps, {"overlap": 1.0})


def test_attend_excite_loss_is_the_worst_concept():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1], maps[1, 2, 2], maps[2, 0, 3] = 0.9, 0.3, 1.2
    assert attend_excite_loss(maps).item() == pytest.approx(0.7)
    assert attend_excite_loss(torch.ones(2, 4, 4) * 1.5).item() == 0.0


def test_binarize_rules():
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0], m[0, 1, 1], m[0, 2, 2] = 1.0, 0.6, 0.4
    assert binarize(m, 0.5).sum() == 2
    assert binarize(m, 0.35).sum() == 3
    two = torch.cat([torch.full((50,), 0.1), torch.full((50,), 0.9)])
    assert 0.1 < float(otsu_threshold(two)) < 0.9
    assert binarize(two.view(1, 10, 10), "otsu").sum() == 50
    with pytest.raises(ConceptError, match="otsu"):
        binarize(m, 1.5)


def test_smoothing_and_maps_match_diffusers_attend_and_excite():
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (
        GaussianSmoothing,
        StableDiffusionAttendAndExcitePipeline as AE,
    )

    assert torch.allclose(gaussian_kernel(), GaussianSmoothing().weight[0, 0], atol=1e-7)
    attn = torch.rand(16, 16, 77, generator=torch.Generator().manual_seed(1)) * 0.05
    ref = AE._compute_max_attention_per_index(attn.clone(), [2, 5])
    ours = concept_maps(attn, [[2], [5]], text_positions(77, 7, "diffusers")).flatten(1).max(1).values
    assert torch.allclose(ours, torch.stack(ref), atol=1e-6)
    # multi-token concepts merge after the softmax; "max" is at least "mean"
    mean = concept_maps(attn, [[2, 3]], text_positions(77, 7, "prompt"))
    mx = concept_maps(attn, [[2, 3]], text_positions(77, 7, "prompt"), subtoken="max")
    assert (mx >= mean - 1e-6).all()
    assert smooth_maps(torch.ones(2, 5, 5)).allclose(torch.ones(2, 5, 5))


def test_centered_tokens_undo_a_global_offset():
    """A token with a global attention offset takes every pixel under softmax(T·A); with
    center_tokens each token's map follows where it is relatively strong (reference: the
    formula written out with explicit means)."""
    a, b = blob(4, 4), blob(11, 11)  # [16, 16] each
    attn = torch.zeros(16, 16, 4)
    attn[..., 1] = 0.01 * a + 0.02  # concept 1: offset +0.02 everywhere
    attn[..., 2] = 0.01 * b
    positions = torch.tensor([1, 2])
    plain = concept_maps(attn, [[1], [2]], positions, temperature=1000.0, smooth_size=0)
    assert plain[0].min() > 0.99 and plain[1].max() < 0.01  # concept 2 vanished
    centered = concept_maps(attn, [[1], [2]], positions, temperature=1000.0, smooth_size=0, center_tokens=True)
    x = attn[..., 1:3] - attn[..., 1:3].mean(dim=(0, 1))  # [16, 16, 2]
    ref = torch.softmax(1000.0 * x.double(), dim=-1).permute(2, 0, 1)  # [2, 16, 16]
    assert torch.allclose(centered.double(), ref, atol=1e-6)
    assert centered[0, 4, 4] > 0.9 and centered[1, 11, 11] > 0.9  # each concept keeps its own blob


def test_heatmap_is_png_ready(tmp_path):
    im = heatmap_image(blob(3, 4, size=8), size=32)
    assert im.size == (32, 32) and im.mode == "RGB"
    im.save(tmp_path / "map.png")


# ----------------------------------------------------------------------------- concepts


def test_concept_tokens_words_multitoken_repeats_and_indices(tiny_pipe):
    tok = tiny_pipe("sd15").tokenizer  # letters-only BPE: every word is several tokens
    prompt = "a cat and a dog and a cat"
    cat1, dog, cat2 = concept_token_indices(tok, prompt, ["cat", "dog", "cat"])
    assert len(cat1) == 3 and cat1 == [2, 3, 4] and cat2[0] > dog[0] > cat1[0]
    assert concept_token_indices(tok, prompt, [4, [2, 3]]) == [[4], [2, 3]]
    with pytest.raises(ConceptError, match="not in the prompt") as e:
        concept_token_indices(tok, prompt, ["frog"])
    assert "'d'" in str(e.value)  # the message lists the prompt's tokens
    with pytest.raises(ConceptError, match="listed 3 times"):
        concept_token_indices(tok, prompt, ["cat", "cat", "cat"])
    with pytest.raises(ConceptError, match="at least one concept"):
        concept_token_indices(tok, prompt, [])
    with pytest.raises(ConceptError, match="positions"):
        concept_token_indices(tok, prompt, [0])  # the start token is not a concept


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("images", [1, 2])
def test_reproduces_diffusers_attend_and_excite(tiny_fresh, images):
    """Configured as A&E, the pipeline equals diffusers' A&E pipeline on a tiny UNet (fp32),
    for one image and for a batch of two (each sample optimised on its own).

    tiny_sd15(sample_size=16) with 32 px images has cross attention at 16x16 and 8x8 (+ the
    4x4 mid block); diffusers' A&E keeps maps of ``attn_res`` = 8x8, which is our default
    resolution for this UNet (latent/2: the tiny UNet's A&E level).
    """
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (
        StableDiffusionAttendAndExcitePipeline,
    )

    pipe = tiny_fresh("sd15", sample_size=16)
    comps = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    ae = StableDiffusionAttendAndExcitePipeline(**comps, requires_safety_checker=False)
    ae.set_progress_bar_config(disable=True)
    prompt, steps = "a cat and a dog", 6
    idx = [4, 11]  # the last letter token of each word (A&E takes single positions)
    thresholds = {0: 0.05, 2: 0.5, 4: 0.8}
    kw = dict(num_inference_steps=steps, guidance_scale=5.0, height=32, width=32, output_type="pt",
              num_images_per_prompt=images)
    ref = ae(prompt, token_indices=idx, generator=torch.Generator().manual_seed(0), max_iter_to_alter=3,
             thresholds=thresholds, attn_res=(8, 8), scale_factor=200, **kw).images
    config = AStarConfig.attend_and_excite(text_tokens="diffusers", refine=thresholds, max_iter_to_alter=3,
                                           scale_factor=200)
    out = AStarPipeline(pipe, config)(prompt, [[i] for i in idx], generator=torch.Generator().manual_seed(0), **kw)
    base = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    effect = (base - ref).abs().max().item()
    assert effect > 1e-2  # A&E changed the image...
    assert (out.images - ref).abs().max().item() < 1e-4  # ...and we reproduce it (fp32 rounding only)
    assert out.images.shape[0] == images
    assert out.losses[0][0]["refinements"] > 0 and [s["step"] for s in out.losses[0]] == [0, 1, 2, 4]  # 0-2 update, 4 refines


def test_astar_on_tiny_sd3_maps_and_losses(tiny_pipe):
    pipe = tiny_pipe("sd3")
    astar = AStarPipeline(pipe, max_iter_to_alter=2)
    prompts = ["a red circle and a blue square", "a cat and a dog"]
    concepts = {prompts[0]: ["circle", "square"], prompts[1]: ["cat", "dog"]}
    out = astar(prompts, concepts, num_inference_steps=3, height=32, width=32, max_sequence_length=8,
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)], return_attention_maps=True)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    assert list(out.attention_maps[1]) == ["cat", "dog"]
    assert out.attention_maps[0]["circle"].size == (32, 32)
    assert out.concept_maps[0].shape == (2, 8, 8)  # 32 px / VAE 2 / patch 2
    steps = out.losses[0]
    assert [s["step"] for s in steps] == [0, 1]
    assert "retention" not in steps[0] and "retention" in steps[1]  # B comes from the previous step
    assert all(p.requires_grad for p in pipe.transformer.parameters())  # weights frozen only during the call


def test_astar_on_flux_t5_concepts_and_stock_equivalence(tiny_fresh):
    """FLUX (guidance-distilled, maps over T5's joint keys): with no update window the loop is
    FluxPipeline's own (dynamic shift, guidance embedding, packing), output for output; with
    updates the concepts are T5 positions (no start token) and the images change."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_fresh("flux", guidance_embeds=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4,
                                                     max_image_seq_len=64)
    pipe.set_progress_bar_config(disable=True)
    prompt, kw = "a cat and a dog", dict(num_inference_steps=3, height=16, width=16, max_sequence_length=16,
                                         guidance_scale=3.5, output_type="pt")
    stock = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    idle = AStarPipeline(pipe, max_iter_to_alter=0)(prompt, ["cat", "dog"], generator=torch.Generator().manual_seed(0),
                                                    **kw).images
    torch.testing.assert_close(idle, stock, atol=1e-5, rtol=1e-5)
    astar = AStarPipeline(pipe, max_iter_to_alter=2)
    out = astar(prompt, ["cat", "dog"], generator=torch.Generator().manual_seed(0), return_attention_maps=True, **kw)
    assert out.concept_maps[0].shape == (2, 4, 4)  # 16 px / VAE 2 / packing 2
    assert [s["step"] for s in out.losses[0]] == [0, 1] and not torch.allclose(out.images, stock)
    with pytest.raises(ConceptError, match="negative_prompt"):
        astar(prompt, ["cat", "dog"], negative_prompt="blurry", **kw)


def test_flux_concepts_are_whole_t5_words_within_the_text_keys(tiny_pipe):
    """T5 has no start token (a concept can be position 0), its pieces must form whole words,
    and only the first max_sequence_length tokens are keys: positions and the end token are
    counted after that cut, and a word past it is missing."""
    pipe = tiny_pipe("flux")
    astar = AStarPipeline(pipe)
    t5 = pipe.tokenizer_2
    cat = t5("cat", add_special_tokens=False).input_ids
    groups, _ = astar._concepts_for("cat and a dog", ["cat"])
    assert groups == [list(range(len(cat)))] and astar._eot("cat and a dog") == len(t5("cat and a dog").input_ids) - 1
    ids = t5("cats and a cat").input_ids
    (group,), _ = astar._concepts_for("cats and a cat", ["cat"])  # not the first piece of "cats"
    assert group[0] > 0 and ids[group[0]: group[0] + len(cat)] == cat
    punctuated, _ = astar._concepts_for("a cat, a dog.", ["cat", "dog"])  # punctuation ends a word
    assert len(punctuated) == 2
    long = "a cat and a dog " + "and a bird " * 30
    assert astar._eot(long, 8) == 7 and len(t5(long).input_ids) > 8
    assert astar._concepts_for(long, ["cat"], 8)[0] == astar._concepts_for(long, ["cat"])[0]
    with pytest.raises(ConceptError, match="not in the prompt"):
        astar._concepts_for(long, ["dog"], 8)  # "dog" starts past the 8 text keys
    out = astar(long, ["cat"], num_inference_steps=2, height=16, width=16, max_sequence_length=8, output_type="pt",
                generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.images).all()


def test_sd3_concepts_from_the_t5_keys(tiny_pipe):
    """SD3 with text_keys="t5": concepts are T5 tokens, at key positions after the CLIP block,
    and the maps re-normalise over the T5 prompt tokens; wrong choices are errors."""
    pipe = tiny_pipe("sd3")
    prompt = "a cat and a dog"
    astar = AStarPipeline(pipe, text_keys="t5", max_iter_to_alter=1)
    offset, t5 = pipe.tokenizer_max_length, pipe.tokenizer_3
    groups, _ = astar._concepts_for(prompt, ["cat", "dog"], 16)
    ids = t5(prompt, truncation=True, max_length=16).input_ids
    for word, g in zip(["cat", "dog"], groups):
        assert min(g) >= offset and [ids[i - offset] for i in g] == t5(word, add_special_tokens=False).input_ids
    assert astar._eot(prompt, 16) == offset + len(ids) - 1 and astar._first_key() == offset
    clip_groups, _ = AStarPipeline(pipe)._concepts_for(prompt, ["cat", "dog"])
    assert max(max(g) for g in clip_groups) < offset
    n_keys = offset + 16  # [CLIP block | 16 T5 keys]
    clip_eot = AStarPipeline(pipe)._eot(prompt)
    assert astar._positions(n_keys, astar._eot(prompt, 16)).tolist() == list(range(offset, astar._eot(prompt, 16)))
    diffusers = {k: AStarPipeline(pipe, text_keys=k, text_tokens="diffusers") for k in ("clip", "t5")}
    assert diffusers["clip"]._positions(n_keys, clip_eot).tolist() == list(range(1, offset - 1))  # CLIP block only
    assert diffusers["t5"]._positions(n_keys, astar._eot(prompt, 16)).tolist() == list(range(offset, n_keys - 1))
    (label,) = astar._concepts_for(prompt, [[1, 2]], 16)[1]
    assert label == "tokens 1,2"  # the positions as given, within T5's tokens
    out = astar(prompt, ["cat", "dog"], num_inference_steps=2, height=16, width=16, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), return_attention_maps=True)
    assert out.concept_maps[0].shape[0] == 2 and torch.isfinite(out.concept_maps[0]).all()
    with pytest.raises(ConceptError, match="CLIP text keys only"):
        AStarPipeline(tiny_pipe("sd15"), text_keys="t5")._concepts_for("a cat", ["cat"])
    with pytest.raises(ConceptError, match="pooled vector"):
        AStarPipeline(tiny_pipe("flux"), text_keys="clip")._concepts_for("a cat", ["cat"])
    with pytest.raises(ConceptError, match="'auto', 'clip' or 't5'"):
        AStarPipeline(pipe, text_keys="both")


def test_flux_loop_equals_fluxpipeline_in_bf16(tiny_fresh):
    """In bf16 the timestep is rounded as FluxPipeline rounds it (cast, then / 1000): with no
    update and nothing recorded the images are FluxPipeline's, bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_fresh("flux", guidance_embeds=True).to(torch.bfloat16)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4,
                                                     max_image_seq_len=64)  # timesteps where the two roundings differ
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=6, height=32, width=32, max_sequence_length=16, guidance_scale=3.5,
              output_type="pt")
    stock = pipe("a cat and a dog", generator=torch.Generator().manual_seed(0), **kw).images
    idle = AStarPipeline(pipe, losses={"segregation": 1.0}, max_iter_to_alter=0)
    ours = idle("a cat and a dog", ["cat", "dog"], generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(ours, stock, atol=0, rtol=0)


@pytest.mark.parametrize("layout", [False, True])
def test_one_update_lowers_the_loss(tiny_pipe, layout):
    """Tiny SD3: one A-STAR step on the latent lowers L_seg + L_ret at a fixed seed, with the
    retention target from the maps themselves or from a user layout mask (left / right half)."""
    from diffattn.engine import attach
    from diffattn.families import RunState
    from diffattn.methods.astar import ConceptRecorder

    pipe = tiny_pipe("sd3")
    astar = AStarPipeline(pipe)
    prompt = "a cat and a dog"
    groups, _ = astar._concepts_for(prompt, ["cat", "dog"])
    eot = len(pipe.tokenizer(prompt).input_ids) - 1
    cond, _ = astar.adapter.encode_prompt([prompt], max_sequence_length=8)
    run = RunState()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(800.0)
    selector, _ = astar._sites()
    rec = ConceptRecorder(selector)
    with attach(pipe, rec) as handle, handle.branches({"cond": slice(0, 1)}):  # a custom loop names its rows
        maps = astar._grad_maps(run, rec, z, t, cond, groups, eot, (8, 8)).detach()
        target = binarize(maps)
        if layout:
            halves = torch.zeros(2, 32, 32)  # [C, H, W], any resolution
            halves[0, :, :16], halves[1, :, 16:] = 1, 1
            target = astar._layout_targets(halves, [(groups, ["cat", "dog"])], [0], (8, 8))[0]
            assert target.shape == (2, 8, 8) and target[0, :, :4].all() and not target[0, :, 4:].any()
        before = combined_loss(maps, astar.config.losses, target)[0].item()
        with torch.enable_grad():
            z2, _ = astar._optimise(run, rec, z, t, cond, groups, eot, (8, 8), target, 5.0, None, True)
        after = combined_loss(astar._grad_maps(run, rec, z2, t, cond, groups, eot, (8, 8)), astar.config.losses, target)[0].item()
    assert not torch.equal(z, z2)
    assert after < before


def test_rescale_to_norm_per_sample():
    """Each sample of the result has its reference's L2 norm and its own direction."""
    g = torch.Generator().manual_seed(0)
    z, ref = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    out = rescale_to_norm(z, ref)
    for b in range(3):
        assert torch.allclose(out[b].norm(), ref[b].norm())
        assert torch.allclose(out[b] / out[b].norm(), z[b] / z[b].norm())


def test_keep_norm_update_stays_on_the_norm_shell(tiny_pipe):
    """keep_norm: the updated latent has the old latent's norm, differs from it, and equals the
    plain update rescaled (same gradient, the same step)."""
    from diffattn.engine import attach
    from diffattn.families import RunState
    from diffattn.methods.astar import ConceptRecorder

    pipe = tiny_pipe("sd3")
    prompt = "a cat and a dog"
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(800.0)
    stepped = {}
    for keep in (False, True):
        astar = AStarPipeline(pipe, AStarConfig(losses={"segregation": 1.0}, keep_norm=keep))
        groups, _ = astar._concepts_for(prompt, ["cat", "dog"])
        eot = len(pipe.tokenizer(prompt).input_ids) - 1
        cond, _ = astar.adapter.encode_prompt([prompt], max_sequence_length=8)
        run = RunState()
        rec = ConceptRecorder(astar._sites()[0])
        with attach(pipe, rec), torch.enable_grad():
            stepped[keep], _ = astar._optimise(run, rec, z, t, cond, groups, eot, (8, 8), None, 50.0, None, True)
    assert not torch.equal(stepped[False], z)
    assert not torch.allclose(stepped[False].norm(), z.norm())
    assert torch.allclose(stepped[True].norm(), z.norm())
    assert torch.allclose(stepped[True], rescale_to_norm(stepped[False], z), atol=1e-6)


def test_astar_runs_on_sdxl_and_layout_masks(tiny_pipe):
    pipe = tiny_pipe("sdxl")
    astar = AStarPipeline(pipe, AStarConfig.retention_only(max_iter_to_alter=1))
    masks = torch.zeros(2, 16, 16)
    masks[0, :, :8] = 1
    masks[1, :, 8:] = 1
    out = astar("a cat and a dog", ["cat", "dog"], num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0), layout_masks=masks)
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()
    assert "retention" in out.losses[0][0]  # a layout mask is a target from the first step
    base = pipe("a cat and a dog", num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(base, out.images)


def test_bad_input(tiny_pipe):
    pipe = tiny_pipe("sd3")
    astar = AStarPipeline(pipe)
    kw = dict(num_inference_steps=1, height=16, width=16, max_sequence_length=8)
    with pytest.raises(ConceptError, match="not in the prompt"):
        astar("a red circle", ["square"], **kw)
    with pytest.raises(ConceptError, match="at least one concept"):
        astar("a red circle", [], **kw)
    with pytest.raises(ConceptError, match="no concepts given.*pass concepts="):
        astar("a red circle", **kw)  # concepts are required: the library has no testbed default
    from diffattn.testbed.defaults import default_concepts

    with pytest.raises(ConceptError, match="not a shapes-world caption"):
        astar("a photo of a cat", default_concepts, **kw)  # the testbed's concepts need a testbed caption
    assert astar._concepts_for("a red circle and a blue square", default_concepts)[1] == ["circle", "square"]
    with pytest.raises(UnsupportedModelError, match="AStarPipeline supports"):
        AStarPipeline(tiny_pipe("flux_kontext"))
    with pytest.raises(ConceptError, match="unknown A-STAR option"):
        AStarPipeline(pipe, step_size=3)
    with pytest.raises(ConceptError, match="positive weight"):
        AStarPipeline(pipe, losses={"segregation": 0.0})
    with pytest.raises(ConceptError, match="must be >= 0"):
        AStarPipeline(pipe, losses={"segregation": 1.0, "retention": -1.0})
    with pytest.raises(ConceptError, match="retention_threshold"):
        AStarPipeline(pipe, retention_threshold=1.5)
    with pytest.raises(ConceptError, match="refine threshold"):
        AStarPipeline(pipe, refine={0: 2.0})
    with pytest.raises(ConceptError, match="past the run"):
        AStarPipeline(pipe, refine={5: 0.5})("a red circle", ["circle"], **kw)
    with pytest.raises(ConceptError, match="retention no weight"):  # a layout mask the config would ignore
        AStarPipeline(pipe, AStarConfig.attend_and_excite())("a red circle", ["circle"], layout_masks=torch.ones(1, 8, 8),
                                                             **kw)
    assert issubclass(ConceptError, DiffattnError)


def test_registry_method_gives_images_and_maps(tiny_pipe):
    from diffattn.cli.common import COLORBAR_WIDTH, compose, maps_row
    from diffattn.methods.registry import get_method

    pipe = tiny_pipe("sd3")
    prompt = "a red circle and a blue square"
    run = get_method("astar").build(pipe, concepts="circle,square")
    run.check(prompt)
    out = run(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=2, height=16, width=16,
              max_sequence_length=8)
    images = out.images
    assert run.label == "A-STAR" and len(images) == 1 and list(out.maps[0]) == ["circle", "square"]
    assert isinstance(run.pipeline, AStarPipeline) and run.control is None
    row = maps_row(out.maps[0], images[0].width * 4)
    assert row.width == 2 * images[0].width * 4 + COLORBAR_WIDTH  # two concepts as wide as the upscaled image, a bar
    assert compose(images[0], [("maps", row)]).height == images[0].height + row.height
    with pytest.raises(ConceptError, match="triangle"):  # checked before any image
        get_method("astar").build(pipe, concepts="circle,triangle").check(prompt)


def test_cli_generate_astar_end_to_end(tmp_path, capsys):
    from PIL import Image

    from diffattn.cli import main

    out = tmp_path / "astar.png"
    main(["generate", "--method", "astar", "--astar-loss", "ae", "--concepts", "circle,square", "--steps", "2",
          "--out", str(out), "a red circle and a blue square"])
    img = Image.open(out)
    assert img.width == 2 * 4 * 64 and img.height > 4 * 64  # baseline | A&E (4x upscaled), concept maps underneath
    bad = tmp_path / "bad.png"
    with pytest.raises(SystemExit) as exit_info:  # a concept missing from the prompt: before any image
        main(["generate", "--method", "astar", "--concepts", "circle,triangle", "--out", str(bad),
              "a red circle and a blue square"])
    assert exit_info.value.code == 2 and not bad.exists()
    assert "triangle" in capsys.readouterr().err


def test_heatmaps_share_one_scale():
    """A neglected concept's map shows dark next to a present one (not min-max stretched)."""
    bright, faint = blob(3, 4, size=8), 0.05 * blob(3, 4, size=8)
    vmax = float(bright.max())
    a, b = (np.asarray(heatmap_image(m, vmax=vmax), dtype=float) for m in (bright, faint))
    assert b.mean() < 0.5 * a.mean()
    stretched = np.asarray(heatmap_image(faint), dtype=float)  # its own min-max: looks like the bright one
    assert np.abs(stretched - np.asarray(heatmap_image(bright), dtype=float)).max() <= 1


@pytest.mark.parametrize("layout, want", [
    # SD1.5: three cross-attention down levels (64/32/16) and a plain 8x8 one -> 16x16 = latent/4
    (dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
          up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(8, 8, 16, 16)), 4),
    # SDXL: a plain 128 level, cross attention at 64 and 32 -> 32x32 = latent/4
    (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(8, 8, 16)), 4),
])
def test_default_map_resolution_on_real_unet_layouts(layout, want):
    """A&E's map level on SD1.x (16x16 of a 64 latent) and SDXL (32x32 of 128): latent/4, from
    UNets with those block layouts (tiny widths)."""
    from diffusers import UNet2DConditionModel

    from diffattn.families.unet import default_unet_factor
    from diffattn.sites import select, sites

    unet = UNet2DConditionModel(sample_size=16, cross_attention_dim=8, attention_head_dim=2, layers_per_block=2,
                                norm_num_groups=4, **layout)
    cross = select(sites(unet), "cross")
    assert default_unet_factor(cross, len(layout["block_out_channels"])) == want
