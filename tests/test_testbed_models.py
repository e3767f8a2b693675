"""The testbed's tokenizer, training script (smoke run, resume) and shipped models."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffattn import testbed
from diffattn.errors import DiffattnError
from diffattn.testbed import models, train
from diffattn.testbed.world import (
    caption,
    caption_v2,
    max_caption_words,
    parse_prompt,
    parse_prompt_v2,
    sample_training_pair_v2,
    sample_training_scene,
    vocabulary,
)
from diffattn.tokenizers import clip_tokenizer


def test_every_world_word_is_one_token_and_eos_has_the_top_id():
    tok = models.make_tokenizer()
    for word in vocabulary():
        assert len(tok.tokenize(word)) == 1, word
    assert tok.eos_token_id == len(tok) - 1
    longest = "a red circle, a blue square and a green triangle on a dark background with outlines"
    ids = tok(longest).input_ids
    assert len(ids) <= models.TEXT_LENGTH
    # unknown words fall back to letters instead of failing
    assert tok.tokenize("purple") == ["p", "u", "r", "p", "l", "e</w>"]


def test_clip_tokenizer_merges_keep_earlier_words_whole():
    # "red" then "reddish": the second word's merges must not split the first
    tok = clip_tokenizer(["red", "reddish", "redd", "ed"], model_max_length=16)
    for w in ["red", "reddish", "redd", "ed"]:
        assert tok.tokenize(w) == [w + "</w>"]


def test_captions_round_trip_through_the_prompt_grammar():
    for seed in range(300):
        scene = sample_training_scene(seed)
        spec = parse_prompt(caption(scene))
        assert spec.objects == tuple((o.color, o.shape) for o in scene.objects)
        assert spec.relation == scene.relation
        assert spec.styles == scene.styles


def test_training_smoke_run_resumes_exactly(tmp_path):
    """5 VAE steps, encode a few scenes, 5 denoiser steps in two runs (3 + 2) equal one
    uninterrupted run of 5: checkpoints and data order make training resumable."""
    run = lambda *a: train.main([*a, "--seed", "0"])  # noqa: E731
    vae, data = str(tmp_path / "vae"), str(tmp_path / "data")
    run("vae", "--out", vae, "--steps", "5", "--batch", "4", "--save-every", "5")
    run("data", "--vae", vae, "--out", data, "--n", "40")
    with open(os.path.join(data, "captions.json")) as f:
        assert len(json.load(f)) == 40
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--data", data, "--batch", "4", "--save-every", "1"]
    run("tiny-sd3", "--out", a, "--steps", "5", *common)
    run("tiny-sd3", "--out", b, "--steps", "3", *common)
    run("tiny-sd3", "--out", b, "--steps", "5", *common)
    wa, wb = load_file(os.path.join(a, "denoiser.safetensors")), load_file(os.path.join(b, "denoiser.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    out = str(tmp_path / "export")
    train.main(["export", "--run", a, "--to", out])
    assert os.path.exists(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    pipe = testbed.load(out)  # an exported folder loads like a shipped model, with its defaults
    assert type(pipe).__name__ == "ShapesSD3Pipeline"
    # tiny-sd on per-channel standardised latents: the shipped VAE carries the standardisation
    run("tiny-sd", "--out", str(tmp_path / "sd"), "--steps", "2", "--standardize", *common)
    train.main(["export", "--run", str(tmp_path / "sd"), "--to", str(tmp_path / "sd-export")])
    vae = testbed.load(str(tmp_path / "sd-export")).vae
    assert vae.config.scaling_factor == 1.0
    stats = load_file(os.path.join(tmp_path / "sd", "latent_stats.safetensors"))
    assert stats["mu"].shape == stats["sigma"].shape == (4,)


def test_v2_tokenizer_keeps_every_v1_id_and_fits_the_longest_v2_caption():
    old, new = models.make_tokenizer(1), models.make_tokenizer(2)
    new_vocab = new.get_vocab()
    assert all(new_vocab[tok] == i for tok, i in old.get_vocab().items())
    for seed in range(50):
        text = caption(sample_training_scene(seed))
        assert old(text).input_ids == new(text).input_ids
    assert 2 + max_caption_words(2) <= new.model_max_length == models.TEXT_LENGTHS[2]


def test_world_v2_data_trains_and_exports_a_v2_model(tmp_path):
    """``data --world 2`` encodes partial v2 captions and records the world; the denoiser and
    export stages pick up its tokenizer, so v2 words are single tokens in the exported model."""
    run = lambda *a: train.main([*a, "--seed", "0"])  # noqa: E731
    vae, data = str(tmp_path / "vae"), str(tmp_path / "data")
    run("vae", "--out", vae, "--steps", "2", "--batch", "4", "--save-every", "2", "--world", "2")
    run("data", "--vae", vae, "--out", data, "--n", "60", "--world", "2")
    with open(os.path.join(data, "captions.json")) as f:
        captions = json.load(f)
    rng = np.random.default_rng([0, 10**6])  # the data stage's scene stream
    assert captions == [caption_v2(sample_training_pair_v2(rng)[1]) for _ in range(60)]
    assert any(parse_prompt_v2(c).objects[0].color is None for c in captions)  # partial captions
    assert train.data_world(data) == 2
    run("tiny-sd3", "--out", str(tmp_path / "sd3"), "--steps", "1", "--data", data, "--batch", "4")
    out = str(tmp_path / "export")
    train.main(["export", "--run", str(tmp_path / "sd3"), "--to", out])
    with open(os.path.join(out, "testbed.json")) as f:
        assert json.load(f) == {"model": "tiny-sd3", "world": 2}
    pipe = testbed.load(out)
    assert pipe.tokenizer.tokenize("a striped red circle in soft light") == [
        w + "</w>" for w in "a striped red circle in soft light".split()]
    assert pipe.text_encoder.config.max_position_embeddings == models.TEXT_LENGTHS[2]


def test_standardized_vae_decodes_exactly_like_the_original():
    """standardize_vae folds z' = (z - mu) / sigma into the encoder and its inverse into the
    decoder: the posterior is mapped exactly and decoding a mapped latent is unchanged."""
    torch.manual_seed(0)
    vae_a, vae_b = models.build_vae(), models.build_vae()
    vae_b.load_state_dict(vae_a.state_dict())
    mu, sigma = torch.tensor([1.0, 0.5, -0.4, 0.8]), torch.tensor([1.2, 0.9, 0.3, 2.0])
    train.standardize_vae(vae_b, mu, sigma)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        pa, pb = vae_a.encode(x).latent_dist, vae_b.encode(x).latent_dist
        torch.testing.assert_close(pb.mean, (pa.mean - mu[:, None, None]) / sigma[:, None, None], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pb.std, pa.std / sigma[:, None, None], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(vae_b.decode(pb.mean).sample, vae_a.decode(pa.mean).sample, atol=1e-5, rtol=1e-5)


def test_a_folder_that_is_not_a_testbed_export_is_an_error(tmp_path):
    with pytest.raises(DiffattnError, match="testbed.json"):
        testbed.load(str(tmp_path))


def test_unknown_testbed_model_is_an_error():
    with pytest.raises(DiffattnError, match="tiny-sd3"):
        testbed.load("tiny-flux")


@pytest.mark.parametrize("name", testbed.MODELS)
def test_load_works_offline_and_generates(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = testbed.load(name)
    out = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0))  # model defaults
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]
    assert max(np.asarray(im).std() for im in out.images) > 5  # real pictures, not flat or black frames
    # every weight file is safetensors
    for root, _, files in os.walk(testbed.model_path(name)):
        assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files), root


def test_learning_rate_schedules():
    base, warm, total = 2e-3, 100, 1000
    assert train.lr_at(0, base, warm, total, "wsd") == pytest.approx(base / warm)
    # WSD: the base rate until the last 20% of the steps, then linear to 10% of it
    assert train.lr_at(500, base, warm, total, "wsd") == train.lr_at(800, base, warm, total, "wsd") == base
    assert train.lr_at(900, base, warm, total, "wsd") == pytest.approx(0.55 * base)
    assert train.lr_at(1000, base, warm, total, "wsd") == pytest.approx(0.1 * base)
    # cosine (the VAE stages): half-way between the base and 10% at the middle of the decay
    assert train.lr_at(550, base, warm, total) == pytest.approx(0.55 * base)
    assert train.lr_at(1000, base, warm, total) == pytest.approx(0.1 * base)
    with pytest.raises(ValueError, match="schedule"):
        train.lr_at(500, base, warm, total, "linear")


def test_warm_start_from_the_v1_model_keeps_every_v1_row():
    """``--init-from assets/tiny-sd`` on a world-v2 tiny-sd: the UNet is copied whole; the text
    encoder's token and position tables grew (v2 appends words and is longer), so their v1 rows
    are copied and the new rows keep the fresh init."""
    v1 = os.path.join(os.path.dirname(testbed.__file__), "..", "..", "assets", "tiny-sd")
    pipe = models.build_sd(testbed.load("tiny-sd").vae, 0, "v_prediction", 2)
    fresh = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    modules = {"denoiser": pipe.unet, "text_encoder": pipe.text_encoder}
    grown = train.warm_start(modules, v1, "unet")
    assert sorted(grown) == ["text_encoder.embeddings.position_embedding.weight",
                             "text_encoder.embeddings.token_embedding.weight"]
    src_unet = load_file(os.path.join(v1, "unet", "diffusion_pytorch_model.safetensors"))
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, src_unet[k]), k
    src_text = load_file(os.path.join(v1, "text_encoder", "model.safetensors"))
    now = pipe.text_encoder.state_dict()
    for k, v in src_text.items():
        assert torch.equal(now[k][: v.shape[0]], v), k
        assert torch.equal(now[k][v.shape[0]:], fresh[k][v.shape[0]:]), k
    with pytest.raises(ValueError, match="same stage"):
        train.warm_start({"denoiser": pipe.unet}, os.path.join(v1, "..", "tiny-sd3"), "transformer")
