"""DeContext (issue 26, library half): the context share from LSEs, the PGD protector, its
baselines, the 8-bit ε guarantee, bad input, and the CLI, on the tiny FLUX Kontext pipeline."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import diffattn as da
from diffattn.controls import Control
from diffattn.errors import ConfigError, DiffattnError, ImageInputError, PathError, UnsupportedModelError
from diffattn.families import RunState
from diffattn.methods.decontext import (
    ContextShareProbe,
    context_share,
    decontext_loss,
    front_single_blocks,
    mean_share,
)
from diffattn.pipelines.decontext import (
    DeContextProtector,
    eps_levels,
    protect,
    quantize_protected,
)
from diffattn.sites import Site

SEQ = 16  # T5 tokens in these tests (the pipeline default 512 is slower for nothing)


def dense_share(q, k, target: slice, context: slice, scale=None, bias=None):
    """The paper's r_ctx (Eqs. 7-8) written out: the materialised float64 softmax over *all* keys,
    summed over the context columns, for the target rows."""
    q64, k64 = q.double(), k.double()
    s = q64 @ k64.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)  # [B, H, Nq, Nk]
    if bias is not None:
        s = s + bias.double()
    return torch.softmax(s, dim=-1)[:, :, target, context].sum(-1)  # [B, H, N_target]


def image(w, h, seed=0):
    """A deterministic RGB test image (smooth colours, so PGD has room in both directions)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, size=(1, 1, 3))
    ramp = np.linspace(-30, 30, w)[None, :, None] + np.linspace(-20, 20, h)[:, None, None]
    return Image.fromarray(np.clip(base + ramp, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def kontext():
    from diffattn.tiny import tiny_pipeline

    return tiny_pipeline("flux_kontext")


# ----------------------------------------------------------------------------- the editor adapter


def test_the_editor_adapter_reproduces_the_pipelines_own_forward(kontext):
    """FluxKontextAdapter (the family's editor adapter, what the protector calls): the context
    latents, tokens and ids, the target ids, the conditioning and the target velocity equal what
    FluxKontextPipeline.__call__ hands its transformer and gets back; sizes follow its floors."""
    from diffattn.families import adapter_for
    from diffattn.pipelines.decontext import check_editor

    adapter = check_editor(kontext)
    assert type(adapter).__name__ == "FluxKontextAdapter" and adapter.in_context
    assert DeContextProtector(kontext, progress=False).adapter.pipe is kontext
    with pytest.raises(UnsupportedModelError):
        adapter_for(kontext)  # the text-to-image loops (A-STAR, UAM, IR) keep refusing an editor
    seen = {}

    def keep(module, args, kwargs, out):
        seen.update(kwargs, out=out[0])

    (th, tw), (ch, cw) = (12, 20), (16, 8)
    hook = kontext.transformer.register_forward_hook(keep, with_kwargs=True)
    try:
        kontext(image=image(cw, ch, seed=5), prompt="make the circle blue", height=th, width=tw, max_area=th * tw,
                _auto_resize=False, num_inference_steps=1, max_sequence_length=SEQ, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    x = torch.from_numpy(np.asarray(image(cw, ch, seed=5), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ctx, ctx_ids = adapter.pack_context(adapter.encode_image(x))  # [1, N_ctx, 4C], [N_ctx, 3]
    n_tgt = (th // 4) * (tw // 4)
    tgt, tgt_ids = seen["hidden_states"][:, :n_tgt], seen["img_ids"][:n_tgt]
    assert torch.allclose(ctx, seen["hidden_states"][:, n_tgt:], atol=1e-5)  # fp32 VAE: grad mode vs no_grad
    assert torch.equal(ctx_ids, seen["img_ids"][n_tgt:]) and bool((ctx_ids[:, 0] == 1).all())
    z = torch.zeros(1, adapter.latent_channels, *adapter.latent_hw(th, tw))
    assert torch.equal(adapter.pack_target(z)[1], tgt_ids) and bool((tgt_ids[:, 0] == 0).all())
    with torch.no_grad():  # as the pipeline runs them
        cond = adapter.encode_prompt(["make the circle blue"], max_sequence_length=SEQ)[0]
        v = adapter.predict_with_context(None, tgt, tgt_ids, ctx, ctx_ids, seen["timestep"], cond)
    assert torch.equal(cond["encoder_hidden_states"], seen["encoder_hidden_states"])
    assert torch.equal(cond["pooled_projections"], seen["pooled_projections"])
    assert v.shape == (1, n_tgt, 4 * adapter.latent_channels)
    assert torch.allclose(v, seen["out"][:, :n_tgt], atol=1e-5)
    assert adapter.context_size_unit == 4 and adapter.latent_hw(18, 13) == (8, 6)  # floors to whole 2x2 patches
    run = RunState()
    noise = adapter.prepare_latents(run, 1, th, tw, torch.float32, torch.Generator().manual_seed(0))
    assert torch.equal(noise, tgt) and torch.equal(run.image_ids, tgt_ids)  # the same seeded start as the call
    with pytest.raises(ImageInputError, match=r"FluxKontextPipeline floors .* multiples of 4 px"):
        adapter.check_context_size(18, 16)
    with pytest.raises(ConfigError, match="scheduler's timestep / 1000"):  # scheduler units by mistake
        adapter.predict_with_context(None, tgt, tgt_ids, ctx, ctx_ids, 1000.0, cond)
    with pytest.raises(ConfigError, match="pass target_ids"):
        adapter.predict_with_context(None, tgt, None, ctx, ctx_ids, 0.5, cond)


# ----------------------------------------------------------------------------- the primitive


def test_context_share_from_lses_equals_dense_reference():
    """exp(LSE_C − LSE_all) equals the materialised share (with a float bias, with the caller's
    full-row LSE, in fp32 against float64); an empty context gives 0."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 30, 8, generator=g), torch.randn(2, 3, 30, 8, generator=g)
    bias = torch.randn(1, 3, 30, 30, generator=g)
    tgt, ctx = slice(6, 18), slice(18, 30)
    ref = dense_share(q, k, tgt, ctx, bias=bias)
    got = context_share(q, k, tgt, ctx, bias=bias)
    assert (got.double() - ref).abs().max() < 1e-5
    lse_all = torch.logsumexp(q @ k.transpose(-1, -2) * 8**-0.5 + bias, dim=-1)  # [B, H, Nq]
    assert (context_share(q, k, tgt, ctx, bias=bias, lse_all=lse_all).double() - ref).abs().max() < 1e-5
    assert torch.all(got > 0) and torch.all(got < 1)
    assert torch.equal(context_share(q, k, tgt, slice(30, 30)), torch.zeros(2, 3, 12))


class _Capture(Control):
    """Keeps each call's q, k (what the kernel sees) and segments, to build the dense reference."""

    order = 2000

    def __init__(self):
        super().__init__(sites=["joint", "single"])
        self.calls = {}

    def edit_output(self, call, out):
        lay = call.layout
        self.calls[call.site.name] = (call.q.detach().clone(), call.k.detach().clone(), lay.q("image").slice,
                                      lay.k("context").slice, call.site.kind)
        return out


@pytest.mark.parametrize("target_hw, context_hw", [((16, 16), (16, 16)), ((12, 20), (12, 20)), ((16, 16), (8, 24))],
                         ids=["16x16", "12x20", "context-8x24-of-target-16x16"])
def test_probe_matches_materialised_float64_reference(kontext, target_hw, context_hw):
    """Through the real FluxKontextPipeline call: r_ctx recorded at every double and single block
    equals the float64 map's context columns, at two resolutions and with a context image of
    another size than the target (segments from the token layout)."""
    probe, cap = ContextShareProbe(per_query=True), _Capture()
    (th, tw), (ch, cw) = target_hw, context_hw
    with da.attach(kontext, probe, cap):
        kontext(image=image(cw, ch), prompt="make the circle blue", height=th, width=tw, max_area=th * tw,
                _auto_resize=False, num_inference_steps=1, max_sequence_length=SEQ, output_type="pt")
    kinds = {kind for *_, kind in cap.calls.values()}
    assert kinds == {"joint", "single"} and set(probe.records) == set(cap.calls)
    for name, (q, k, tgt, ctx, _) in cap.calls.items():
        assert tgt.stop - tgt.start == (th // 4) * (tw // 4) and ctx.stop - ctx.start == (ch // 4) * (cw // 4)
        ref = dense_share(q, k, tgt, ctx)
        assert (probe.query_records[name].double() - ref).abs().max() < 2e-6, name
        assert (probe.records[name].double() - ref.mean(-1)).abs().max() < 2e-6


def test_default_blocks_are_the_front_two_thirds_of_the_single_stream():
    """Paper Table 5: single blocks 0-25 of FLUX.1's 38; the double blocks are not attacked."""
    def site(name, kind, block):
        return Site(name, "flux", kind, block, 24, 128)

    sites = [site(f"transformer_blocks.{i}.attn", "joint", i) for i in range(19)]
    sites += [site(f"single_transformer_blocks.{i}.attn", "single", i) for i in range(38)]
    names = front_single_blocks(sites)
    assert names == [f"single_transformer_blocks.{i}.attn" for i in range(26)]


# ----------------------------------------------------------------------------- gradients and the loop


def _loss_and_grad(protector, x, checkpointing: bool):
    """1 − r̄_ctx of one fixed draw and its gradient in the pixels x [1, 3, H, W]."""
    gen = torch.Generator().manual_seed(3)
    s = protector.sample(gen, (x.shape[-2] // 2, x.shape[-1] // 2))
    probe = ContextShareProbe(protector.blocks, requires_grad=True)
    x = x.clone().requires_grad_(True)
    with da.attach(protector.transformer, probe) as h, h.gradient_checkpointing(enabled=checkpointing):
        ctx, ctx_ids = protector.pack(protector.encode(x), context=True)
        tgt, tgt_ids = protector.pack(s.noise, context=False)
        protector.denoise(tgt, tgt_ids, ctx, ctx_ids, s.t, s.instruction)
        probe.frozen = True
        loss = decontext_loss(probe.records)
        (grad,) = torch.autograd.grad(loss, [x])
    return loss, grad


def test_gradients_reach_the_pixels_with_and_without_checkpointing(kontext):
    protector = DeContextProtector(kontext, max_sequence_length=SEQ, progress=False)
    x = torch.from_numpy(np.asarray(image(16, 12), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    loss, grad = _loss_and_grad(protector, x, checkpointing=False)
    assert 0 < float(loss.detach()) < 1
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    loss_ck, grad_ck = _loss_and_grad(protector, x, checkpointing=True)
    assert torch.allclose(loss, loss_ck) and torch.allclose(grad, grad_ck, atol=1e-7)
    assert not kontext.transformer.is_gradient_checkpointing  # restored


def test_eps_holds_on_the_saved_png(kontext, tmp_path):
    """A real PNG round trip: ‖δ‖∞ ≤ ε on the file; the run reports through callback(dict) and
    checkpointing/early exit change nothing."""
    src = tmp_path / "clean.png"
    image(16, 16, seed=1).save(src)
    reports = []
    results = []
    for ck in (False, True):
        r = protect(str(src), kontext, eps=8 / 255, alpha=3 / 255, steps=4, max_sequence_length=SEQ, progress=False,
                    gradient_checkpointing=ck, callback=reports.append, diagnostics=False)
        results.append(r)
    out = results[0].save(tmp_path / "protected.png")
    clean = np.asarray(Image.open(src), dtype=np.int32)
    saved = np.asarray(Image.open(out), dtype=np.int32)
    assert 0 < np.abs(saved - clean).max() <= 8 == eps_levels(8 / 255)
    assert np.array_equal(np.asarray(results[1].image), np.asarray(results[0].image))
    assert [d["step"] for d in reports[:4]] == [0, 1, 2, 3] and reports[0]["total"] == 4
    assert reports[0]["stage"] == "protect" and 0.98 <= reports[0]["timestep"] <= 1.0 and "loss" in reports[0]
    with pytest.raises(PathError):
        results[0].save(src)  # never over the input
    with pytest.raises(PathError):
        results[0].save(tmp_path / "protected.jpg")  # lossy formats would break the bound


def test_quantisation_reprojects_after_rounding():
    """Values that rounding alone would put one level outside the ball are clipped back into it."""
    clean = np.array([[[100, 0, 255]]], dtype=np.uint8)
    eps = 4 / 255
    x = (clean.astype(np.float64) + np.array([4.6, -3.0, 9.0])) / 255  # 4.6 rounds to 5 > 4
    q = quantize_protected(x, clean, eps)
    assert q.tolist() == [[[104, 0, 255]]]
    x = (clean.astype(np.float64) + np.array([-4.6, 2.4, -4.5])) / 255
    assert quantize_protected(x, clean, eps).tolist() == [[[96, 2, 251]]]


def test_any_resolution_and_the_rounding_explained(kontext):
    """A non-square size in the pipeline's unit works (target and context grids from the layout);
    a size it would round is refused with the rounding spelled out."""
    assert da.protect is protect and da.DeContextProtector is DeContextProtector  # the da.protect
    r = da.protect(image(20, 12), kontext, steps=1, max_sequence_length=SEQ, progress=False)
    assert r.image.size == (20, 12) and r.linf <= eps_levels(0.05)
    assert set(r.shares["clean"]) == {s.name for s in da.sites(kontext)}
    r = protect(image(16, 16), kontext, steps=1, target_size=(8, 24), max_sequence_length=SEQ, progress=False,
                diagnostics=False)
    assert r.image.size == (16, 16)
    with pytest.raises(ImageInputError, match=r"multiples of 4 px .*18x18.*Crop it to 16x16"):
        protect(image(18, 18), kontext, steps=1, progress=False)


def test_eot_runs_the_unconditional_forward_as_the_editor_does(kontext):
    """negative_share: None follows the editor (stock Kontext's true_cfg_scale 1: no uncond
    forward, 0; the testbed's true-CFG tiny-kontext: 0.5); a share draws the empty instruction
    that often, after the other draws (so the first draw's t and noise are unchanged); out of
    [0, 1] is a typed error."""
    from diffattn.testbed import kontext_models

    assert DeContextProtector(kontext).negative_share == 0.0
    shapes = kontext_models.build_kontext("tiny")
    assert DeContextProtector(shapes).negative_share == 0.5
    assert DeContextProtector(shapes, negative_share=0.0).negative_share == 0.0
    never, always = DeContextProtector(kontext, negative_share=0.0), DeContextProtector(kontext, negative_share=1.0)
    a = never.sample(torch.Generator().manual_seed(7), (4, 4))
    b = always.sample(torch.Generator().manual_seed(7), (4, 4))
    assert a.instruction in never.instructions and b.instruction == ""
    assert a.t == b.t and torch.equal(a.noise, b.noise)
    half = DeContextProtector(kontext, negative_share=0.5)
    gen = torch.Generator().manual_seed(0)
    empty = sum(half.sample(gen, (4, 4)).instruction == "" for _ in range(400))
    assert 160 < empty < 240
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ConfigError, match="negative_share"):
            DeContextProtector(kontext, negative_share=bad)


def test_zero_selected_blocks_is_an_error_not_a_zero_loss(kontext):
    with pytest.raises(ConfigError, match="no double- or single-stream block"):
        DeContextProtector(kontext, blocks=[])
    with pytest.raises(ConfigError, match="no selected block"):
        mean_share({})
    with pytest.raises(ConfigError, match="no selected block"):
        decontext_loss([])


@pytest.mark.parametrize("method", ["decontext", "encoder", "diffpgd", "random"])
def test_each_method_runs_and_respects_eps(kontext, method):
    eps = 6 / 255
    r = protect(image(16, 16, seed=2), kontext, method=method, eps=eps, alpha=2 / 255, steps=2,
                max_sequence_length=SEQ, progress=False, diagnostics=False)
    clean = np.asarray(r.clean, dtype=np.int32)
    diff = np.abs(np.asarray(r.image, dtype=np.int32) - clean)
    assert 0 < diff.max() <= 6 and r.linf == diff.max() and r.method == method
    assert len(r.losses) == (0 if method == "random" else 2) and all(math.isfinite(v) for v in r.losses)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_typed_errors(kontext, tiny_pipe, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(ImageInputError, match="not a readable image"):
        protect(str(fake), kontext, steps=1, progress=False)
    good = tmp_path / "good.png"
    image(16, 16).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageInputError, match="truncated"):
        protect(str(truncated), kontext, steps=1, progress=False)
    for eps in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            DeContextProtector(kontext, eps=eps)
    for family in ("flux", "sd15"):
        with pytest.raises(UnsupportedModelError, match="FluxKontextPipeline"):
            DeContextProtector(tiny_pipe(family))
    with pytest.raises(ConfigError, match="method"):
        DeContextProtector(kontext, method="photoguard")


# ----------------------------------------------------------------------------- the CLI


def test_cli_eps_parsing():
    import argparse

    from diffattn.cli.protect import parse_eps

    assert parse_eps("8/255") == pytest.approx(8 / 255) and parse_eps("0.03") == 0.03 and parse_eps("1") == 1.0
    for bad in ("0", "-1/255", "2", "abc", "1/0", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_eps(bad)


def test_cli_protect_writes_a_png_within_eps_and_never_the_input(tmp_path, capsys):
    from diffattn.cli import main

    src, out, plot = tmp_path / "in.png", tmp_path / "out.png", tmp_path / "shares.png"
    image(16, 16, seed=4).save(src)
    before = src.read_bytes()
    main(["protect", str(src), "--out", str(out), "--model", "tiny-random-kontext", "--steps", "2", "--eps", "4/255",
          "--plot", str(plot), "--max-sequence-length", str(SEQ)])
    assert src.read_bytes() == before and plot.is_file()
    diff = np.abs(np.asarray(Image.open(out), dtype=np.int32) - np.asarray(Image.open(src), dtype=np.int32))
    assert diff.max() <= 4
    for argv in (["--out", str(src)], ["--out", str(out), "--eps", "0"], ["--out", str(tmp_path / "o.jpg")]):
        with pytest.raises(SystemExit) as e:
            main(["protect", str(src), "--model", "tiny-random-kontext", *argv])
        assert e.value.code == 2
    assert src.read_bytes() == before
    assert isinstance(PathError("x"), DiffattnError)


def test_try_edit_oracle_verdicts_grade_the_edits_against_the_input():
    from diffattn.cli.try_edit import oracle_verdicts
    from diffattn.testbed import edits
    from diffattn.testbed.world import render

    pair = edits.eval_edit_pairs(1)[0]
    source, target = render(pair.source), render(pair.target)
    verdicts, why = oracle_verdicts(source, pair.instruction, [target, source])
    assert why == "" and len(verdicts) == 2
    assert verdicts[0]["success"] is True and verdicts[0]["changed"] is True  # the asked edit, exactly
    assert verdicts[1]["changed"] is False and verdicts[1]["success"] is False  # nothing was edited
    none, why = oracle_verdicts(source, "make it prettier", [target])
    assert none is None and "grammar" in why
    none, why = oracle_verdicts(image(16, 16), pair.instruction, [target])
    assert none is None and "64 px" in why


def test_cli_try_edit_prints_the_oracle_verdicts(tmp_path, capsys):
    from diffattn.cli import main
    from diffattn.testbed import edits
    from diffattn.testbed.world import render

    pair = edits.eval_edit_pairs(1)[0]
    src, out = tmp_path / "scene.png", tmp_path / "try.png"
    render(pair.source).save(src)
    main(["try-edit", str(src), "--instruction", pair.instruction, "--out", str(out), "--model", "tiny-random-kontext",
          "--steps", "1", "--edit-steps", "1", "--max-sequence-length", str(SEQ)])
    text = capsys.readouterr().out
    assert "edit oracle, edit(input): changed " in text and "edit oracle, edit(protected): changed " in text
    assert Image.open(out).size[0] >= 4 * 64  # four 64 px panels side by side


def test_cli_try_edit_refuses_save_protected_with_protected(tmp_path, capsys):
    from diffattn.cli import main

    src = tmp_path / "in.png"
    image(16, 16).save(src)
    with pytest.raises(SystemExit) as e:
        main(["try-edit", str(src), "--instruction", "make the circle blue", "--protected", str(src),
              "--save-protected", str(tmp_path / "p.png"), "--model", "tiny-random-kontext"])
    assert e.value.code == 2 and "--save-protected" in capsys.readouterr().err
