"""Evaluation harness: suites, seeds, intervals, Vendi score, evaluate() end to end (on a
renderer whose truth is known, on a real tiny diffusers pipeline) and the eval command."""
from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest
import torch

from diffattn.errors import DiffattnError
from diffattn.testbed import evaluate as ev
from diffattn.testbed import oracle
from diffattn.testbed.world import RELATIONS, parse_prompt, render, sample_scene, with_styles


class _Out:
    def __init__(self, images):
        self.images = images


class RenderPipe:
    """A pipeline-shaped renderer: prompt -> the scene it asks for, placed by the seed (drawn
    from the generator, as a diffusion pipeline draws its noise). The truth is known, so the
    harness must report perfect scores."""

    def __init__(self, swap_color: bool = False):
        self.swap_color = swap_color  # render every object in the next colour: all objects wrong
        self.calls = []

    def __call__(self, prompt, generator, **kw):
        self.calls.append((list(prompt), kw))
        images = []
        for p, g in zip(prompt, generator):
            spec = parse_prompt(p)
            seed = int(torch.randint(0, 10**6, (1,), generator=g))
            objects = list(spec.objects)
            if self.swap_color:
                nxt = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}
                objects = [(nxt[c], s) for c, s in objects]
            scene = sample_scene(seed, objects=objects, relation=spec.relation,
                                 background="dark" if spec.styles["dark"] else "light", outline=spec.styles["outline"])
            images.append(render(scene))
        return _Out(images)


# ----------------------------------------------------------------------------- suites and seeds


def test_suites_are_fixed_balanced_and_in_the_grammar():
    assert list(ev.SUITES) == ["single", "two", "relation", "three", "style"]
    sizes = {name: len(ev.suite_prompts(name)) for name in ev.SUITES}
    assert sizes == {"single": 12, "two": 32, "relation": 32, "three": 32, "style": 32}
    # pinned: the suites are part of the benchmark definition and must not drift
    assert ev.suite_prompts("two")[:2] == ["a red circle and a red triangle", "a green circle and a red square"]
    assert ev.suite_prompts("relation")[1] == "a green circle right of a red square"
    assert ev.suite_prompts("three")[0] == "a red triangle, a blue circle and a red square"
    assert ev.suite_prompts("style")[:2] == ["a red circle on a dark background", "a red square with outlines"]
    balance = {"single": {1}, "two": {5, 6}, "relation": {5, 6}, "three": {8}, "style": {2, 3}}
    for name in ev.SUITES:
        prompts = ev.suite_prompts(name)
        assert len(set(prompts)) == len(prompts)
        specs = [parse_prompt(p) for p in prompts]
        assert specs == [ev.PromptSpec(s.objects, s.relation, s.styles) for s in ev.suite_specs(name)]
        counts = collections.Counter(o for s in specs for o in s.objects)
        assert len(counts) == 12 and set(counts.values()) == balance[name], (name, counts)
        assert all(len(set(s.objects)) == len(s.objects) for s in specs)  # distinct objects
    rel = collections.Counter(parse_prompt(p).relation for p in ev.suite_prompts("relation"))
    assert rel == {r: 8 for r in RELATIONS}
    styles = collections.Counter(tuple(parse_prompt(p).styles.values()) for p in ev.suite_prompts("style"))
    assert styles == {(True, False): 11, (False, True): 10, (True, True): 11}
    with pytest.raises(DiffattnError, match="unknown suite"):
        ev.suite_prompts("four")


def test_eval_seeds_are_disjoint_from_training_seeds():
    assert ev.eval_seeds(3) == [ev.EVAL_SEED_START, ev.EVAL_SEED_START + 1, ev.EVAL_SEED_START + 2]
    assert min(ev.eval_seeds(10)) > max(ev.TRAIN_SEEDS)
    assert ev.eval_seeds(2, offset=5)[0] == ev.EVAL_SEED_START + 5
    assert ev.train_seeds(3) == [0, 1, 2]
    assert ev.cross_pairs(["a", "b"], [1, 2]) == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]


# ----------------------------------------------------------------------------- statistics


def test_wilson_interval_known_values():
    lo, hi = ev.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = ev.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = ev.wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    assert all(math.isnan(x) for x in ev.wilson_interval(0, 0))
    m = ev.rate_metric([True, False, True, True])
    assert m.value == 0.75 and m.n == 4 and m.low < 0.75 < m.high and m[0] == m.value


def test_mean_interval_is_a_student_t_interval():
    m, lo, hi = ev.mean_interval([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert m == 2.0 and lo == pytest.approx(2 - half, rel=1e-5) and hi == pytest.approx(2 + half, rel=1e-5)
    assert math.isnan(ev.mean_interval([5.0])[1])


def test_vendi_score_bounds_and_invariances():
    assert ev.vendi_score(np.ones((5, 3))) == pytest.approx(1.0)
    assert ev.vendi_score(np.eye(4)) == pytest.approx(4.0)
    assert ev.vendi_score(np.eye(7)[:, ::-1] * 3.0) == pytest.approx(7.0)  # scale-free (cosine kernel)
    two_groups = np.array([[1.0, 0], [2.0, 0], [0, 1.0], [0, 5.0]])
    assert ev.vendi_score(two_groups) == pytest.approx(2.0)
    partial = ev.vendi_score(np.array([[1.0, 0.0], [1.0, 0.1]]))
    assert 1.0 < partial < 1.1
    with pytest.raises(DiffattnError):
        ev.vendi_score(np.zeros(3))


def test_oracle_features_see_position_kind_and_style():
    def feats(scene):
        return ev.oracle_features(oracle.parse(render(scene)))

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    base = sample_scene(0, objects=[("red", "circle")], background="light", outline=False)
    moved = sample_scene(1, objects=[("red", "circle")], background="light", outline=False)
    far = np.hypot(base.objects[0].cx - moved.objects[0].cx, base.objects[0].cy - moved.objects[0].cy)
    assert cos(feats(base), feats(base)) == pytest.approx(1.0)
    assert far > 20 and cos(feats(base), feats(moved)) < 0.5
    assert cos(feats(base), feats(with_styles(base, background="dark"))) == pytest.approx(0.8, abs=0.02)
    other_kind = sample_scene(0, objects=[("blue", "square")], background="light", outline=False)
    assert cos(feats(base), feats(other_kind)) == pytest.approx(0.2, abs=0.02)
    empty = ev.oracle_features(oracle.parse(np.full((64, 64, 3), 225, np.uint8)))
    assert np.isfinite(empty).all() and np.linalg.norm(empty) > 0


# ----------------------------------------------------------------------------- evaluate()


def test_evaluate_end_to_end_on_renders(tmp_path):
    pipe = RenderPipe()
    prompts = ev.suite_prompts("relation")[:4] + ev.suite_prompts("style")[:2]
    report = ev.evaluate(pipe, prompts, ev.eval_seeds(12), batch_size=5, progress=False, return_images=True,
                         num_inference_steps=3)
    assert len(report) == 12 and [len(c[0]) for c in pipe.calls] == [5, 5, 2]
    assert pipe.calls[0][1] == {"num_inference_steps": 3}
    assert [s.prompt for s in report.scores] == [prompts[i % 6] for i in range(12)]  # image i: prompt i % n, seed i
    assert report.seeds == ev.eval_seeds(12)
    m = report.metrics()
    for name in ("object_accuracy", "all_present", "color_accuracy", "relation_accuracy", "relation_color_accuracy",
                 "style_accuracy", "correct"):
        assert m[name].value == 1.0, name
    assert m["extra_object_rate"].value == 0.0 and m["unrequested_style_rate"].value == 0.0
    assert m["relation_accuracy"].n == 8 and m["style_accuracy"].n == 4 and m["object_accuracy"].n == 12
    assert m["object_accuracy"].low == pytest.approx(ev.wilson_interval(12, 12)[0])
    assert m["vendi"].n == 6 and 1.0 < m["vendi"].value <= 2.0 and 1.0 < m["vendi_pixels"].value <= 2.0
    d = json.loads(json.dumps(report.as_dict()))
    assert d["n_images"] == 12 and d["settings"]["num_inference_steps"] == 3 and len(d["images"]) == 12
    assert d["images"][0]["seed"] == ev.EVAL_SEED_START and d["metrics"]["correct"]["value"] == 1.0
    md = report.to_markdown("relation")
    assert md.splitlines()[0] == "| metric (relation) | value | 95% CI | n |" and "| object_accuracy | 1.000 |" in md
    report.save_grid(str(tmp_path / "grid.png"), ncols=4)
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (4 * 128, 3 * 128)


def test_images_depend_on_their_seed_not_their_batch():
    pairs = [(ev.suite_prompts("two")[i % 3], s) for i, s in enumerate(ev.eval_seeds(6))]
    a = ev.evaluate(RenderPipe(), pairs=pairs, batch_size=6, progress=False)
    b = ev.evaluate(RenderPipe(), pairs=pairs[::-1], batch_size=4, progress=False)
    feats_b = {(s.prompt, seed): f for s, seed, f in zip(b.scores, b.seeds, b.features)}
    for s, seed, f in zip(a.scores, a.seeds, a.features):
        assert np.array_equal(f, feats_b[(s.prompt, seed)])


def test_evaluate_reports_failures():
    report = ev.evaluate(RenderPipe(swap_color=True), ev.suite_prompts("two")[:4], ev.eval_seeds(8), progress=False)
    m = report.metrics()
    assert m["object_accuracy"].value == 0.0 and m["color_accuracy"].value < 1.0 and m["correct"].value == 0.0
    assert m["object_accuracy"].high < 0.35 and m["extra_object_rate"].value < 1.0
    with pytest.raises(DiffattnError, match="names no object"):
        ev.evaluate(RenderPipe(), ["a purple hexagon"], [1], progress=False)
    with pytest.raises(DiffattnError, match="needs prompts and seeds"):
        ev.evaluate(RenderPipe(), progress=False)
    with pytest.raises(DiffattnError, match="kept no images"):
        report.save_grid("unused.png")


def test_evaluate_runs_a_real_tiny_diffusers_pipeline(tiny_pipe):
    """An untrained tiny StableDiffusionPipeline: the images are noise, the report's structure
    is what is checked (tensor output and PIL output both read)."""
    pipe = tiny_pipe("sd15")
    kw = dict(num_inference_steps=2, height=32, width=32)
    report = ev.evaluate(pipe, ev.suite_prompts("single")[:2], ev.eval_seeds(4), batch_size=2, progress=False,
                         return_images=True, output_type="pt", **kw)
    assert len(report) == 4 and len(report.images) == 4 and report.images[0].size == (64, 64)
    m = report.metrics()
    assert {"object_accuracy", "all_present", "extra_object_rate", "correct", "vendi", "vendi_pixels"} <= set(m)
    assert all(0.0 <= m[k].value <= 1.0 for k in ("object_accuracy", "all_present", "extra_object_rate"))
    assert 1.0 <= m["vendi_pixels"].value <= 2.0 + 1e-9
    pil = ev.evaluate(pipe, pairs=[(report.scores[0].prompt, report.seeds[0])], progress=False, **kw)
    assert pil.scores[0].prompt == report.scores[0].prompt


def test_eval_command_on_the_default_model(tmp_path, capsys):
    from diffattn.cli import main

    out, grid = tmp_path / "report.json", tmp_path / "grid.png"
    main(["eval", "--suite", "single", "--seeds", "2", "--steps", "2", "--batch-size", "2", "--no-progress",
          "--out", str(out), "--grid", str(grid)])
    text = capsys.readouterr().out
    assert "| metric (single) | value | 95% CI | n |" in text and "| object_accuracy |" in text
    d = json.loads(out.read_text())
    assert d["model"] == "tiny-sd3" and d["single"]["n_images"] == 2 and d["single"]["settings"]["num_inference_steps"] == 2
    assert grid.exists()


def test_paired_bootstrap_mean_and_interval():
    from diffattn.testbed.evaluate import paired_bootstrap

    a = np.array([1, 0, 1, 1, 0, 1, 1, 1] * 8, float)
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    b = np.roll(a, 1)
    d, lo, hi = paired_bootstrap(a, b - 0.25)
    assert d == pytest.approx((a - b).mean() + 0.25) and lo < d < hi
    # the interval of a mean of 64 differences with std ~0.6 is ~±0.15 wide, not ±0 or ±1
    assert 0.05 < hi - lo < 0.6
