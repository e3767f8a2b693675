"""Evaluation harness: suites, seeds, intervals, Vendi score, and evaluate() end to end."""
from __future__ import annotations

import numpy as np
import torch

from diffattn.testbed import evaluate as ev
from diffattn.testbed.world import parse_prompt, render, sample_scene


class RenderPipe:
    """A pipeline-shaped renderer (prompt -> the scene it asks for, placed by the seed): checks
    the harness end to end where the truth is known."""

    def __call__(self, prompt, generator, **kw):
        class Out:
            pass

        out = Out()
        out.images = []
        for p, g in zip(prompt, generator):
            spec = parse_prompt(p)
            seed = int(torch.randint(0, 10**6, (1,), generator=g))
            out.images.append(render(sample_scene(seed, objects=list(spec.objects), relation=spec.relation,
                                                  background="dark" if spec.styles["dark"] else "light", outline=spec.styles["outline"])))
        return out


def test_suites_are_fixed_and_seeds_disjoint():
    for s in ev.SUITES:
        assert ev.suite_prompts(s) == ev.suite_prompts(s) and len(ev.suite_prompts(s)) >= 12
    assert min(ev.eval_seeds(10)) > max(ev.TRAIN_SEEDS)


def test_wilson_interval_and_mean_interval():
    lo, hi = ev.wilson_interval(50, 100)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9 and 0.39 < lo < 0.41
    assert ev.wilson_interval(0, 10)[0] == 0.0 and ev.wilson_interval(10, 10)[1] == 1.0
    m, lo, hi = ev.mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and lo < 2.0 < hi


def test_vendi_score_bounds():
    assert abs(ev.vendi_score(np.ones((5, 3))) - 1.0) < 1e-9
    assert abs(ev.vendi_score(np.eye(4)) - 4.0) < 1e-9


def test_evaluate_end_to_end_on_renders(tmp_path):
    report = ev.evaluate(RenderPipe(), ev.suite_prompts("relation")[:4], ev.eval_seeds(8), batch_size=3, progress=False, return_images=True)
    m = report.metrics()
    assert m["object_accuracy"][0] == 1.0 and m["all_present"][0] == 1.0 and m["relation_accuracy"][0] == 1.0
    assert m["extra_object_rate"][0] == 0.0 and m["vendi"][0] > 1.0
    assert "object_accuracy" in report.to_markdown() and len(report.as_dict()["images"]) == 8
    report.save_grid(str(tmp_path / "grid.png"), ncols=4)
    assert (tmp_path / "grid.png").exists()
