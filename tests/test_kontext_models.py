"""tiny-kontext: the builder, the 64 px testbed call, the training stages (data, resumable
rectified flow, export) and the consumers (DeContext, the edit harness)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffattn as da
from diffattn.errors import DiffattnError, ModelLoadError, PathError, UnsupportedModelError, UsageError
from diffattn import testbed
from diffattn.testbed import edits, kontext_models, models, train_kontext
from diffattn.testbed.world import SIZE, caption_v2, render, sample_training_pair_v2


@pytest.fixture(scope="module")
def pipe():
    return kontext_models.build_kontext("tiny")


def _record_forwards(pipe):
    """Shapes of every transformer forward's inputs (a forward pre-hook)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((tuple(kwargs["hidden_states"].shape), tuple(kwargs["encoder_hidden_states"].shape),
                     tuple(kwargs["img_ids"].shape)))

    return seen, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_tokenizer_keeps_every_v2_id_and_fits_captions_and_instructions():
    tok, v2 = kontext_models.make_kontext_tokenizer(), models.make_tokenizer(2)
    rng = np.random.default_rng(0)
    for _ in range(100):
        text = caption_v2(sample_training_pair_v2(rng)[1])
        assert tok(text).input_ids == v2(text).input_ids
    for word in edits.edit_vocabulary():
        assert len(tok(word).input_ids) == 3, word  # BOS, the word, EOS
    assert tok.model_max_length == kontext_models.TEXT_LENGTH == models.TEXT_LENGTHS[2]
    assert len(tok("move the yellow triangle to the right").input_ids) == edits.max_instruction_words() + 2


def test_build_kontext_is_a_flux_kontext_pipeline_of_double_and_single_blocks(pipe):
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    assert isinstance(pipe, FluxKontextPipeline) and type(pipe).__name__ == "ShapesKontextPipeline"
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert len(pipe.transformer.transformer_blocks) >= 1 and len(pipe.transformer.single_transformer_blocks) >= 1
    assert pipe.transformer.config.in_channels == 16 and pipe.latent_channels == 4 and pipe.vae_scale_factor == 4
    base = kontext_models.transformer_config("base")
    assert (base["num_layers"], base["num_single_layers"], base["num_attention_heads"]) == (3, 6, 4)
    assert kontext_models.tokens_per_image() == 64 and kontext_models.latent_hw() == (16, 16)
    assert {s.kind for s in da.sites(pipe)} == {"joint", "single"}  # diffattn's flux family reads it


def test_64px_edits_and_text_to_image_keep_the_testbed_token_counts(pipe):
    pair = edits.eval_edit_pairs(1)[0]
    seen, handle = _record_forwards(pipe)
    try:
        out = pipe(image=render(pair.source), prompt=pair.instruction, num_inference_steps=1, output_type="np").images
        t2i = pipe(prompt="a red circle", num_inference_steps=1, output_type="np").images
        small = pipe(image=render(pair.source).resize((32, 32)), prompt=pair.instruction, num_inference_steps=1,
                     true_cfg_scale=1.0, output_type="np").images
    finally:
        handle.remove()
    assert out.shape == (1, SIZE, SIZE, 3) and t2i.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()
    text = kontext_models.TEXT_LENGTH
    # CFG: two forwards per step; an edit is [target | context] = 64 + 64 tokens (not 1024 px, 16384)
    assert seen[:2] == [((1, 128, 16), (1, text, 16), (128, 3))] * 2
    assert seen[2:4] == [((1, 64, 16), (1, text, 16), (64, 3))] * 2
    assert small.shape == (1, 32, 32, 3) and seen[4] == ((1, 32, 16), (1, text, 16), (32, 3))  # size follows the image


def test_the_text_to_image_view_is_the_editor_without_a_context_image(pipe):
    """kontext_models.text_to_image: a stock FluxPipeline over the same modules, served by the FLUX
    text-to-image adapter (which refuses the editor itself), generating what the editor generates
    without a context image, step for step."""
    from diffattn.families import adapter_for
    from diffattn.families.flux import FluxAdapter, FluxKontextAdapter

    view = kontext_models.text_to_image(pipe)
    assert view.transformer is pipe.transformer and view.vae is pipe.vae
    assert type(adapter_for(view)) is FluxAdapter and type(adapter_for(pipe, editor=True)) is FluxKontextAdapter
    with pytest.raises(UnsupportedModelError):
        adapter_for(pipe)
    kw = dict(num_inference_steps=2, output_type="np")
    ours = view("a red circle", generator=torch.Generator().manual_seed(3), **kw).images
    editor = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(3), **kw).images
    assert ours.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(ours, editor, atol=1e-6)
    with pytest.raises(UsageError, match="FluxKontextPipeline"):
        kontext_models.text_to_image(view)


def test_batched_edits_get_one_negative_prompt_per_row(pipe):
    pairs = edits.eval_edit_pairs(2)
    gens = [torch.Generator().manual_seed(p.seed) for p in pairs]
    out = pipe(image=[render(p.source) for p in pairs], prompt=[p.instruction for p in pairs], generator=gens,
               num_inference_steps=1, output_type="np").images
    assert out.shape == (2, SIZE, SIZE, 3)
    report = edits.evaluate_edits(pipe, pairs, batch_size=2, progress=False, num_inference_steps=1)
    assert len(report) == 2 and {"success", "changed", "preserved", "unreadable_rate"} <= set(report.metrics())
    with pytest.raises(UsageError):
        edits.evaluate_edits(pipe, pairs, context_images=[render(pairs[0].source)], progress=False)


def test_decontext_protects_an_image_against_tiny_kontext(pipe):
    from diffattn.pipelines import protect

    r = protect(render(edits.eval_edit_pairs(1)[0].source), pipe, steps=1, progress=False)
    assert set(r.shares["clean"]) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    assert all(0 < v < 1 for v in r.shares["clean"].values())


def test_bad_presets_and_vaes_are_typed_errors(tmp_path):
    with pytest.raises(UsageError, match="preset"):
        kontext_models.build_kontext("huge")
    from diffusers import AutoencoderKL

    flux1_like = AutoencoderKL(latent_channels=16, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with pytest.raises(UsageError, match="4 latent channels, factor 4"):
        kontext_models.check_vae(flux1_like)
    with pytest.raises(UsageError, match="AutoencoderKL"):
        kontext_models.build_kontext("tiny", vae=torch.nn.Linear(1, 1))
    with pytest.raises(ModelLoadError):
        kontext_models.load_world_vae(tmp_path)
    with pytest.raises(ModelLoadError):
        kontext_models.load_kontext(tmp_path)
    with pytest.raises(UsageError):
        kontext_models.latent_hw(60)


def test_training_resumes_to_the_identical_state_and_exports(tmp_path):
    run = lambda *a: train_kontext.main([*a, "--seed", "0"])  # noqa: E731
    data = str(tmp_path / "data")
    run("data", "--out", data, "--n-t2i", "6", "--n-edit", "6")
    record = train_kontext.read_data_record(data)
    assert (record["n_t2i"], record["n_edit"], record["pair_seeds"]) == (6, 6, [0, 6])
    lat = load_file(os.path.join(data, "latents.safetensors"))
    names = ("t2i_mean", "t2i_std", "source_mean", "target_mean", "target_std")
    assert {k: tuple(v.shape) for k, v in lat.items()} == {k: (6, 4, 16, 16) for k in names}
    with open(os.path.join(data, "instructions.json")) as f:
        assert json.load(f) == [p.instruction for p in edits.edit_pairs(range(6))]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--data", data, "--preset", "tiny", "--batch", "4", "--save-every", "1", "--warmup", "1"]
    run("tiny-kontext", "--out", a, "--steps", "3", *common)
    run("tiny-kontext", "--out", b, "--steps", "2", *common)
    run("tiny-kontext", "--out", b, "--steps", "3", *common)  # resumes at step 2
    for name in ("denoiser", "text_encoder", "text_encoder_2", "ema", "optimizer"):
        wa, wb = load_file(os.path.join(a, f"{name}.safetensors")), load_file(os.path.join(b, f"{name}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    out = str(tmp_path / "export")
    run("export", "--run", a, "--to", out, "--samples", "1", "--sample-steps", "1")
    assert os.path.isfile(os.path.join(a, "samples.png"))
    with open(os.path.join(out, "testbed.json")) as f:
        assert json.load(f)["model"] == "tiny-kontext"
    pipe = kontext_models.load_kontext(out)
    assert type(pipe).__name__ == "ShapesKontextPipeline"
    assert type(testbed.load(out)).__name__ == "ShapesKontextPipeline"  # testbed.json routes the folder
    ema = load_file(os.path.join(a, "ema.safetensors"))
    torch.testing.assert_close(pipe.transformer.proj_out.weight, ema["denoiser.proj_out.weight"], rtol=0, atol=0)
    torch.testing.assert_close(pipe.text_encoder_2.shared.weight, ema["text_encoder_2.embed_tokens.weight"],
                               rtol=0, atol=0)  # the tied T5 embedding comes back from the encoder stack
    source = render(edits.eval_edit_pairs(1)[0].source)
    img = pipe(image=source, prompt="remove the circle", num_inference_steps=1).images[0]
    assert img.size == (SIZE, SIZE)
    with pytest.raises(PathError):
        run("tiny-kontext", "--out", str(tmp_path / "c"), "--data", a)
    with pytest.raises(UsageError, match="--batch"):
        run("tiny-kontext", "--out", str(tmp_path / "d"), "--data", data, "--batch", "64")
    with pytest.raises(UsageError):
        run("data", "--out", str(tmp_path / "e"), "--n-edit", "10", "--pair-offset", str(edits.EVAL_SEED_START - 5))
    with pytest.raises(DiffattnError):
        train_kontext.assemble(str(tmp_path))
