"""The moving-shapes world (testbed/video.py), its oracle (video_oracle.py), tiny-wan
(video_models.py) and its training stages (train_video.py)."""
from __future__ import annotations

import collections
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffattn as da
from diffattn.errors import DiffattnError, PathError, UsageError
from diffattn.testbed import models, train_video, video, video_models, video_oracle
from diffattn.testbed.world import MIN_GAP, SIZE, Scene, render


# ----------------------------------------------------------------------------- world


def test_clips_are_deterministic_from_the_seed():
    for seed in (0, 7):
        a, b = video.sample_training_clip(seed), video.sample_training_clip(seed)
        assert a == b
        np.testing.assert_array_equal(video.clip_array(a), video.clip_array(b))
    assert video.sample_training_clip(0) != video.sample_training_clip(1)
    spec = "a blue square moving up and a yellow triangle moving left"
    assert video.sample_clip(3, spec) == video.sample_clip(3, spec)
    assert video.clip_array(video.sample_clip(3, spec, frames=17)).shape == (17, SIZE, SIZE, 3)


def test_objects_stay_inside_apart_and_switch_colour_in_the_middle_third():
    for seed in range(150):
        clip = video.sample_training_clip(seed, frames=9 if seed % 2 else 17)
        for f in range(clip.frames):
            for o in clip.objects:
                x, y = o.centre(f)
                assert o.size < x < SIZE - o.size and o.size < y < SIZE - o.size
            for i, a in enumerate(clip.objects):
                for b in clip.objects[:i]:
                    (ax, ay), (bx, by) = a.centre(f), b.centre(f)
                    assert np.hypot(ax - bx, ay - by) > a.size + b.size + MIN_GAP
        for o in clip.objects:
            assert (o.speed > 0) == (o.direction is not None)
            if o.color_to:
                third = -(-clip.frames // 3)
                assert third <= o.switch <= clip.frames - third
                assert o.color_at(0) == o.color and o.color_at(clip.frames - 1) == o.color_to


def test_captions_round_trip_and_suites_are_balanced():
    for seed in range(300):
        clip = video.sample_training_clip(seed)
        assert video.parse_video_prompt(video.video_caption(clip)) == video.spec_of(clip)
    for name, prompts in video.VIDEO_SUITES.items():
        assert len(prompts) == len(set(prompts)) == 32
        for p, spec in zip(prompts, video.VIDEO_SUITE_SPECS[name]):
            assert video.parse_video_prompt(p) == spec
    single = collections.Counter(s.objects[0].direction for s in video.VIDEO_SUITE_SPECS["single"])
    assert set(single.values()) == {8}
    assert all(len(s.objects) == 2 and s.objects[0].direction != s.objects[1].direction
               for s in video.VIDEO_SUITE_SPECS["two"])
    assert all(s.objects[0].color_to for s in video.VIDEO_SUITE_SPECS["change"])
    assert video.parse_video_prompt("a red circle turning blue").objects[0] == video.MotionSpec("red", "circle", None, "blue")


@pytest.mark.parametrize("bad", ["a red circle moving diagonally", "a red circle or a blue square", "hello",
                                 "a red circle turning red", "a red circle and a red circle",
                                 "a red circle and a blue square and a green triangle"])
def test_prompts_outside_the_grammar_are_usage_errors(bad):
    with pytest.raises(UsageError):
        video.parse_video_prompt(bad)


def test_bad_clip_requests_are_typed_errors(tmp_path):
    with pytest.raises(UsageError, match="1 \\+ 4k"):
        video.sample_training_clip(0, frames=8)
    with pytest.raises(UsageError):
        video.sample_clip(0, n_objects=3)
    with pytest.raises(PathError):
        video.save_gif(video.render_clip(video.sample_training_clip(0)), tmp_path / "clip.png")
    with pytest.raises(UsageError):
        video_models.build_wan(preset="huge")


def test_video_tokenizer_keeps_every_world_id_and_fits_the_longest_caption():
    tok = video_models.make_video_tokenizer()
    vocab = tok.get_vocab()
    for world in (1, 2):
        assert all(vocab[t] == i for t, i in models.make_tokenizer(world).get_vocab().items())
    for word in video.video_vocabulary():
        assert len(tok.tokenize(word)) == 1, word
    assert video.video_vocabulary()[: len(models.vocabulary(2))] == models.vocabulary(2)
    assert 2 + video.max_caption_words() <= video_models.TEXT_LENGTH == tok.model_max_length


def test_save_gif_writes_clips_side_by_side(tmp_path):
    a = video.clip_array(video.sample_clip(0, "a red circle moving right"))
    b = video.clip_array(video.sample_clip(1, "a blue square moving up"))
    path = tmp_path / "pair.gif"
    video.save_gif([a, b.astype(np.float32) / 255], path, scale=1)
    im = Image.open(path)
    assert im.n_frames == 9 and im.size == (2 * SIZE, SIZE)


# ----------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("seed", range(4))
def test_oracle_is_exact_on_clean_clips(seed):
    prompts = [video.video_suite_prompts(name)[seed * 5] for name in ("single", "two", "change")]
    clips = [video.sample_clip(seed, p) for p in prompts] + [video.sample_training_clip(100 + seed)]
    for clip in clips:
        prompt = video.video_caption(clip)
        s = video_oracle.score_clip(video.render_clip(clip), prompt)
        assert s.correct and s.frame_accuracy == 1.0, (prompt, s.directions, s.color_calls)
        for o, j in zip(clip.objects, s.matched):
            t = s.parsed.tracks[j]
            true_v = np.subtract(o.centre(1), o.centre(0))
            np.testing.assert_allclose(t.velocity, true_v, atol=0.15)
            assert t.residual < 0.5 and t.smooth
            assert t.direction == (o.direction or "still")
            assert (t.start_color, t.end_color) == (o.color, o.color_to or o.color)


def test_oracle_says_unreadable_instead_of_guessing():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(9, SIZE, SIZE, 3)).astype(np.uint8)
    s = video_oracle.score_clip(noise, "a red circle moving right")
    assert s.status == "unreadable" and s.directions == ["unreadable"] and not s.correct
    # ragged: each frame from another clip, objects jumping about
    spec = "a red circle moving right and a blue square moving up"
    frames = [video.render_clip(video.sample_clip(i, spec))[i] for i in range(9)]
    assert video_oracle.parse_clip(frames).status == "unreadable"
    # an empty clip is readable: nothing was drawn
    blank = np.full((9, SIZE, SIZE, 3), 225, np.uint8)
    p = video_oracle.parse_clip(blank)
    assert p.status == "ok" and p.tracks == []
    assert video_oracle.score_clip(blank, "a red circle").found == [False]
    # direction calls: diagonal or erratic motion has no world direction, slow motion stands still
    assert video_oracle.direction_of((1.0, 0.9), 0.2, 9) == "unreadable"
    assert video_oracle.direction_of((1.0, 0.0), 9.0, 9) == "unreadable"
    assert video_oracle.direction_of((0.1, 0.05), 0.2, 9) == "still"
    assert video_oracle.direction_of((0.0, -1.2), 0.2, 9) == "up"
    # a colour that flickers is no colour change
    o = video.sample_clip(2, "a red circle moving right").objects[0]
    frames = [render(Scene(objects=(replace(o.at(f), color="blue" if f % 2 else "red"),))) for f in range(9)]
    t = video_oracle.parse_clip(frames).tracks[0]
    assert t.color_call == "unreadable" and not t.smooth and t.direction == "right"


def test_suite_metrics_carry_wilson_intervals():
    scores = []
    for k, p in enumerate(video.video_suite_prompts("change")[:3]):
        scores.append(video_oracle.score_clip(video.render_clip(video.sample_clip(k, p)), p))
    wrong = "a green square moving left"
    scores.append(video_oracle.score_clip(video.render_clip(video.sample_clip(9, "a red circle moving right")), wrong))
    m = video_oracle.video_metrics(scores)
    assert m["correct"].value == 0.75 and m["correct"].n == 4
    assert 0 < m["correct"].low < 0.75 < m["correct"].high <= 1
    assert m["change_accuracy"].value == 1.0 and m["change_accuracy"].n == 3
    assert "| correct | 0.750 |" in video_oracle.metrics_markdown(m)


# ----------------------------------------------------------------------------- tiny-wan


def test_build_wan_makes_a_working_wan_pipeline_end_to_end():
    pipe = video_models.build_wan(preset="tiny")
    assert type(pipe).__name__ == "WanPipeline"
    assert pipe.vae_scale_factor_spatial == video_models.SPATIAL and pipe.vae_scale_factor_temporal == video_models.TEMPORAL
    assert video_models.latent_shape(preset="tiny") == (4, 3, 16, 16)
    assert video_models.tokens_per_clip() == 768  # 3 latent frames x 16 x 16, patch 1: 12 blocks of 64
    kw = dict(video_models.WAN_DEFAULTS, num_inference_steps=2, output_type="np")
    out = pipe(prompt="a red circle moving right", generator=torch.Generator().manual_seed(0), **kw).frames
    assert out.shape == (1, 9, SIZE, SIZE, 3) and np.isfinite(out).all() and 0 <= out.min() <= out.max() <= 1
    assert {s.kind for s in da.sites(pipe)} == {"self", "cross"}  # diffattn's wan family reads it
    report = video_oracle.evaluate_video(pipe, ["a red circle moving right"], [1, 2], batch_size=2, progress=False,
                                         num_inference_steps=2, height=SIZE, width=SIZE, max_sequence_length=24)
    assert len(report) == 2 and set(report.metrics()) >= {"direction_accuracy", "unreadable_rate", "correct"}
    with pytest.raises(UsageError):
        video_oracle.evaluate_video(pipe, ["a purple blob"], [0])


def test_training_resumes_to_the_identical_state_and_exports(tmp_path):
    run = lambda *a: train_video.main([*a, "--seed", "0"])  # noqa: E731
    vae, data = str(tmp_path / "vae"), str(tmp_path / "data")
    run("vae", "--out", vae, "--preset", "tiny", "--steps", "2", "--batch", "2", "--save-every", "2")
    run("data", "--vae", vae, "--out", data, "--n", "6", "--frames", "5")
    assert train_video.read_data_record(data) == {"world": "video", "frames": 5, "n": 6, "preset": "tiny"}
    assert load_file(os.path.join(data, "latents.safetensors"))["mean"].shape == (6, 4, 2, 16, 16)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--data", data, "--batch", "2", "--save-every", "1"]
    run("tiny-wan", "--out", a, "--steps", "3", *common)
    run("tiny-wan", "--out", b, "--steps", "2", *common)
    run("tiny-wan", "--out", b, "--steps", "3", *common)  # resumes at step 2
    for name in ("denoiser", "text_encoder", "ema", "optimizer"):
        wa, wb = load_file(os.path.join(a, f"{name}.safetensors")), load_file(os.path.join(b, f"{name}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    out = str(tmp_path / "export")
    run("export", "--run", a, "--to", out, "--samples", "1", "--sample-steps", "1")
    assert Image.open(os.path.join(a, "samples.gif")).n_frames == 5
    pipe = video_models.load_wan(out)
    assert type(pipe).__name__ == "ShapesWanPipeline"
    from diffattn import testbed

    assert type(testbed.load(out)).__name__ == "ShapesWanPipeline"  # the testbed's loader routes by testbed.json
    ema = load_file(os.path.join(a, "ema.safetensors"))
    torch.testing.assert_close(pipe.transformer.proj_out.weight, ema["denoiser.proj_out.weight"], rtol=0, atol=0)
    assert pipe.vae.config.latents_std != [1.0] * 4  # the data's standardisation ships with the VAE
    with pytest.raises(PathError):
        run("tiny-wan", "--out", str(tmp_path / "c"), "--data", vae)
    with pytest.raises(DiffattnError):
        video_models.load_wan(str(tmp_path))
