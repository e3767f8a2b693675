"""IRDiffusionPipeline on the testbed models (real diffusers SD / SD3 pipelines): references
regenerate bit-exactly, masks, retries, progress, and typed errors for bad input."""
from __future__ import annotations

import pytest
import torch

import diffattn as da
from diffattn import testbed
from diffattn.controls import Control
from diffattn.errors import ConceptError, ControlError
from diffattn.pipelines import IRConfig, IRDiffusionPipeline
from diffattn.pipelines.ir import BASELINES, assign_contested, strongest_component

SCENE = "a circle left of a square"
SUBJECTS = ["a striped red circle", "a dotted blue square"]


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sd3"])
def model(request):
    pipe = testbed.load(request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_references_regenerate_bit_exactly_and_every_baseline_runs(model):
    ir = IRDiffusionPipeline(model)
    seen = []
    r = ir.rehearse(SCENE, SUBJECTS, seed=3, num_inference_steps=4, callback=lambda info: seen.append(info["stage"]))
    assert seen == ["rehearsal"] * 4
    assert r.images.shape[0] == 3 and r.scene_masks.shape[0] == 2 and r.scene_masks.any((1, 2)).all()
    for name in BASELINES:
        out = ir.final(r, config=IRConfig.baseline(name), output_type="pt")
        if name != "storydiffusion":  # StoryDiffusion shares tokens among all rows: references change
            assert torch.equal(out.references, r.images[:2]), name
        assert not torch.equal(out.images, r.images[2:]), name
        assert torch.equal(out.vanilla, r.images[2:])


def test_references_in_the_final_run_equal_the_references_alone(model):
    """The issue's invariance: the references of the final run ([ref_1..ref_S, scene] x CFG, IR's
    controls attached) equal the S reference prompts generated alone, without the scene row,
    bit for bit (CPU fp32), when both runs use the same kernels (the rehearsal's recorder taps
    route attention through the reference kernel in every run). Against the stock pipeline with
    no recorder (SDPA) they agree to float rounding only, so that comparison is a tolerance."""
    from diffattn.families import RunState

    ir = IRDiffusionPipeline(model)
    r = ir.rehearse(SCENE, SUBJECTS, seed=5, num_inference_steps=3)
    final = ir.final(r, output_type="pt")
    negative = r.call["negative"][:2] if r.call["negative"] is not None else None
    alone, _ = ir._call(dict(r.call, prompts=SUBJECTS, negative=negative), r.latents[:2], [], RunState(), "alone")
    assert torch.equal(final.references, alone)
    stock = model(prompt=SUBJECTS, negative_prompt=negative, latents=r.latents[:2], num_inference_steps=3,
                  guidance_scale=r.call["guidance"], height=r.call["height"], width=r.call["width"],
                  output_type="pt").images
    torch.testing.assert_close(final.references, stock, atol=1e-4, rtol=0)


class HalveOutput(Control):
    """Halves the attention output of its rows at every site it is active on, and records which
    rows those were (lowest order: the outermost, after IR's scene attention)."""

    order = -10

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = set()

    def edit_output(self, call, out):
        rows = self.rows(call)
        self.seen.add(tuple(rows.nonzero().flatten().tolist()))
        out = out.clone()
        out[rows] = out[rows] * 0.5
        return out


def test_other_controls_join_the_final_run_by_role(model):
    """final(controls=...): the batch's rows are named by role (ref0, ref1, scene: one row of each
    CFG branch) on top of uncond / cond; a control limited to the scene changes the scene and
    leaves the references bit-exact, one limited to ref1 changes ref1 only; a guidance control
    or a non-control is refused."""
    ir = IRDiffusionPipeline(model)
    r = ir.rehearse(SCENE, SUBJECTS, seed=3, num_inference_steps=2)
    plain = ir.final(r, output_type="pt")
    scene = HalveOutput(branches="scene")
    out = ir.final(r, output_type="pt", controls=[scene])
    assert scene.seen == {(2, 5)}  # [ref0, ref1, scene] x (uncond, cond)
    assert torch.equal(out.references, plain.references) and not torch.equal(out.images, plain.images)
    ref1 = HalveOutput(branches=("ref1",))
    out = ir.final(r, output_type="pt", controls=ref1)
    assert ref1.seen == {(1, 4)}
    assert torch.equal(out.references[0], plain.references[0]) and not torch.equal(out.references[1],
                                                                                   plain.references[1])
    # (the scene changes too: reposition reads ref1's keys and values)
    with pytest.raises(ControlError, match="guidance branch"):
        ir.final(r, controls=[da.SoftPAG(heads="all", scale=2.0)])
    with pytest.raises(ControlError, match="diffattn controls"):
        ir.final(r, controls=["scene"])


def test_row_groups_are_checked_against_the_forward():
    """handle.row_groups: a group named like a branch, or naming rows outside the batch, is a
    typed error at the forward; groups select rows as branches do (union of names)."""
    from diffattn.tiny import tiny_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("sd3")
    rec = HalveOutput(branches=("a", "b"))
    with da.attach(pipe, rec) as h, h.row_groups({"a": [0], "b": [3]}):
        pipe(**tiny_call_kwargs("sd3", steps=1, num_images_per_prompt=2))  # batch [u, u, c, c]
    assert rec.seen == {(0, 3)}
    for groups, match in (({"cond": [0]}, "name of a branch"), ({"a": [7]}, "rows \\[7\\]")):
        with da.attach(pipe, HalveOutput(branches="a")) as h, h.row_groups(groups):
            with pytest.raises(ControlError, match=match):
                pipe(**tiny_call_kwargs("sd3", steps=1, num_images_per_prompt=2))


def test_storydiffusion_baseline_follows_the_official_schedule(model):
    """The StoryDiffusion baseline shares tokens at the UNet's up-block self-attention (tiny-sd)
    or the back half of an MMDiT's blocks (tiny-sd3), after the first tenth of the steps."""
    from diffattn.methods.ir import ISOLATED_KINDS
    from diffattn.pipelines.ir import storydiffusion_sites
    from diffattn.sites import sites

    image_sites = [x for x in sites(model) if x.kind in ISOLATED_KINDS]
    chosen = storydiffusion_sites(image_sites)
    if image_sites[0].family == "unet":
        assert chosen and all(n.startswith("up_blocks.") for n in chosen)
        assert set(chosen) == {x.name for x in image_sites if x.name.startswith("up_blocks.")}
    else:
        blocks = sorted({x.block for x in image_sites})
        assert sorted({x.block for x in image_sites if x.name in chosen}) == blocks[len(blocks) // 2:]
    ir = IRDiffusionPipeline(model)
    (story,) = ir._controls(IRConfig.baseline("storydiffusion"), None, None, 2, sites(model), seed=0)
    from diffattn.controls import StepState

    assert story.steps.start_frac == 0.1 and story.steps.stop is None
    holds = [story.window_holds(StepState(index=i, num_steps=20)) for i in range(20)]
    assert holds == [False, False] + [True] * 18  # plain for the first tenth of the steps
    r = ir.rehearse(SCENE, SUBJECTS, seed=3, num_inference_steps=10)
    out = ir.final(r, config=IRConfig.baseline("storydiffusion"), output_type="pt")
    assert not torch.equal(out.images, r.images[2:])  # it acts after the warm-up


def test_mask_overlay_tints_each_subject_and_draws_its_border():
    import numpy as np
    from PIL import Image

    from diffattn.pipelines.ir import OVERLAY_COLORS, mask_overlay

    image = Image.new("RGB", (8, 8), (100, 100, 100))
    a = np.zeros((8, 8), bool)
    a[1:5, 1:5] = True
    b = Image.fromarray(np.where(np.arange(64).reshape(8, 8) % 8 >= 6, 255, 0).astype(np.uint8), "L")
    out = np.asarray(mask_overlay(image, [a, b], alpha=0.5))
    assert out[2, 2].tolist() == [178, 50, 178]  # inside subject 1: half grey, half magenta
    assert out[1, 1].tolist() == list(OVERLAY_COLORS[0])  # its border, opaque
    assert out[0, 0].tolist() == [100, 100, 100]  # outside every mask: untouched
    assert out[3, 7].tolist() == list(OVERLAY_COLORS[1])  # subject 2 reaches the image edge: border
    assert np.asarray(mask_overlay(image, [a], first=1))[1, 1].tolist() == list(OVERLAY_COLORS[1])
    with pytest.raises(ControlError, match="mask 0"):
        mask_overlay(image, [np.zeros((4, 4), bool)])


def test_user_masks_and_mask_images(model):
    ir = IRDiffusionPipeline(model)
    scene = torch.zeros(2, 64, 64)
    scene[0, 16:48, 4:30] = 1
    scene[1, 16:48, 34:60] = 1
    out = ir(SCENE, SUBJECTS, scene_masks=scene, reference_masks=scene, num_inference_steps=3, return_masks=True)
    assert out.attempts == 1 and out.missing == []
    assert out.scene_mask_images[0].size == out.images[0].size == (64, 64)
    assert out.scene_masks.dtype == torch.bool and out.scene_masks.any((1, 2)).all()


def test_a_missing_subject_redraws_the_scene_a_bounded_number_of_times(model):
    calls = []

    def segmenter(image, i, role):
        calls.append(role)
        if role == "scene" and i == 1:
            return None  # the square is never found
        m = torch.zeros(64, 64, dtype=torch.bool)
        m[10:30, 10 + 30 * i:30 + 30 * i] = True
        return m

    ir = IRDiffusionPipeline(model, max_retries=2)
    r = ir.rehearse(SCENE, SUBJECTS, segmenter=segmenter, num_inference_steps=2)
    assert r.attempts == 3 and r.missing == [[1], [1], [1]]
    assert calls.count("reference") == 6 and calls.count("scene") == 6


def test_bad_input_is_a_typed_error(model):
    ir = IRDiffusionPipeline(model)
    with pytest.raises(ConceptError, match="no word of the subject"):
        ir.rehearse("a circle above a circle", ["a red triangle"], num_inference_steps=1)
    with pytest.raises(ConceptError, match="not in"):
        ir.rehearse(SCENE, SUBJECTS, subject_words=["circle", "triangle"], num_inference_steps=1)
    with pytest.raises(ConceptError, match="one word per subject"):
        ir.rehearse(SCENE, SUBJECTS, subject_words=["circle"], num_inference_steps=1)
    with pytest.raises(ControlError, match=r"\[S=2, H, W\]"):
        ir.rehearse(SCENE, SUBJECTS, scene_masks=torch.ones(3, 8, 8), num_inference_steps=1)
    with pytest.raises(ControlError, match="are empty"):
        ir.rehearse(SCENE, SUBJECTS, scene_masks=torch.zeros(2, 8, 8), num_inference_steps=1)
    with pytest.raises(ControlError, match="mutual"):
        IRDiffusionPipeline(model, mutual=2.0)
    with pytest.raises(ControlError, match="unknown IR-Diffusion option"):
        IRDiffusionPipeline(model, isolate=True)
    with pytest.raises(ControlError, match="unknown IR baseline"):
        IRConfig.baseline("consistory")


def test_flux_runs_with_re_rotated_keys_and_references_stay_exact(tiny_pipe):
    """FLUX applies RoPE inside attention: the moved reference keys are re-rotated
    (FluxRope.relocate); the references still regenerate bit-exactly (one branch: distilled)."""
    from diffattn.errors import DiffattnError

    pipe = tiny_pipe("flux")
    ir = IRDiffusionPipeline(pipe)
    masks = torch.zeros(2, 32, 32)
    masks[0, 4:20, 2:14] = 1
    masks[1, 12:28, 18:30] = 1
    r = ir.rehearse("a red circle and a blue square", ["a red circle", "a blue square"], reference_masks=masks,
                    scene_masks=masks.flip(-1), num_inference_steps=2, height=32, width=32, progress=False)
    out = ir.final(r, output_type="pt")
    assert torch.equal(out.references, r.images[:2]) and not torch.equal(out.images, r.images[2:])
    with pytest.raises(DiffattnError):
        IRDiffusionPipeline(tiny_pipe("flux_kontext"))


def test_flux_rope_relocation_equals_rotating_the_unrotated_key_at_its_new_place():
    from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb

    from diffattn.families.flux import FluxRope

    h = w = 4
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1)
    ids = torch.cat([torch.zeros(3, 3), ids.reshape(-1, 3).float()]).double()  # 3 text tokens, then the image
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[2, 4, 2])(ids)
    rope = FluxRope(cos.double(), sin.double())
    k0 = torch.randn(2, h * w, 8, dtype=torch.float64)  # [H, L, D] before RoPE
    seg = slice(3, 3 + h * w)
    rotated = apply_rotary_emb(k0[None], (cos[seg].double(), sin[seg].double()), sequence_dim=2)[0]
    source = torch.randint(0, h * w, (h * w,))
    got = rope.relocate(rotated[:, source], seg, source)
    want = apply_rotary_emb(k0[:, source][None], (cos[seg].double(), sin[seg].double()), sequence_dim=2)[0]
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(rope.relocate(rotated, seg, torch.arange(h * w)), rotated, atol=1e-12)


def test_mask_cleanup_gives_each_contested_cell_to_the_strongest_map_and_keeps_one_object():
    masks = torch.zeros(2, 4, 6, dtype=torch.bool)
    masks[0, :, 0:4] = True
    masks[1, :, 2:6] = True
    maps = torch.zeros(2, 4, 6)
    maps[0, :, :3] = 1.0
    maps[1, :, 3:] = 1.0
    got = assign_contested(masks, maps)
    assert got[0, :, :3].all() and not got[0, :, 3:].any() and got[1, :, 3:].all() and not got[1, :, :3].any()
    two = torch.zeros(1, 4, 6, dtype=torch.bool)
    two[0, 0, 0] = two[0, 1, 1] = True  # diagonal neighbours: two objects
    two[0, 3, 3:6] = True
    weight = torch.zeros(1, 4, 6)
    weight[0, 3, 4] = 5.0
    kept = strongest_component(two, weight)
    assert kept[0, 3, 3:6].all() and int(kept.sum()) == 3


def test_reposition_blocks_are_counted_over_every_stack_in_forward_order(tiny_pipe):
    """FLUX numbers its joint and single blocks from 0 each: the back 1 - 36/70 of the blocks
    is counted over both stacks in forward order (never by the index alone); a UNet's running
    block index and SD3's one stack give the old cut."""
    import diffattn as da
    from diffattn.methods.ir import ISOLATED_KINDS
    from diffattn.pipelines.ir import back_sites

    for family in ("flux", "sd3", "sd15"):
        image_sites = [s for s in da.sites(tiny_pipe(family)) if s.kind in ISOLATED_KINDS]
        blocks = list(dict.fromkeys((s.name.split(".")[0], s.block) for s in image_sites))
        for start in (0.0, 36 / 70, 0.5, 1.0):
            chosen = back_sites(image_sites, start)
            kept = blocks[round(start * len(blocks)):]
            assert chosen == [s.name for s in image_sites if (s.name.split(".")[0], s.block) in kept], (family, start)
    flux = [s for s in da.sites(tiny_pipe("flux")) if s.kind in ISOLATED_KINDS]
    assert any(s.kind == "joint" for s in flux) and any(s.kind == "single" for s in flux)
    stacks = list(dict.fromkeys((s.name.split(".")[0], s.block) for s in flux))
    n_joint = sum(1 for stack, _ in stacks if stack == "transformer_blocks")
    late = back_sites(flux, n_joint / len(stacks))  # the cut right after the joint stack
    assert late and {s.kind for s in flux if s.name in late} == {"single"}
    assert back_sites(flux, 0.0) == [s.name for s in flux]


def test_forward_level_controls_and_row_groups(model):
    """CADS given IR's "scene" group noises the scene's condition only (the references stay
    exact); ContextRepulsion, which needs prompt groups within a branch, refuses a row group."""
    if model.__class__.__name__ != "ShapesSD3Pipeline":
        pytest.skip("one family is enough: the row sets are family-free")
    ir = IRDiffusionPipeline(model)
    r = ir.rehearse(SCENE, SUBJECTS, seed=3, num_inference_steps=2)
    plain = ir.final(r, output_type="pt")
    out = ir.final(r, output_type="pt", controls=[da.CADS(scale=0.5, branches="scene")])
    assert torch.equal(out.references, plain.references) and not torch.equal(out.images, plain.images)
    with pytest.raises(ControlError, match="row groups of this loop"):
        ir.final(r, controls=[da.ContextRepulsion(eta=1.0, branches="scene")])
