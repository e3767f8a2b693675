"""HeadHunter: greedy rounds, cache and resume, presets into SoftPAG, heat map."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffattn as da
from diffattn.errors import ControlError
from diffattn.methods.headhunter import HeadHunter


def brightness(images, prompts):
    """A deterministic, head-sensitive objective: mean brightness of the image."""
    return [float(np.asarray(im).mean()) for im in images]


def test_greedy_rounds_pick_the_best_heads_and_resume(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sd3")
    kw = dict(num_inference_steps=2, height=16, width=16, guidance_scale=1.0)
    hunt = HeadHunter(pipe, brightness, ["a red circle"], [0, 1], top_k=2, rounds=2, scale=3.0, state_dir=str(tmp_path), progress=False, **kw)
    result = hunt.run()
    n = sum(s.heads for s in da.sites(pipe) if s.kind == "joint")
    assert len(result.rounds[0]) == n and len(result.rounds[1]) == n - 2 and len(result.selected) == 4
    # round 1 picks the top-2 heads by their own scores
    top = sorted(result.rounds[0], key=lambda k: -result.rounds[0][k])[:2]
    assert [f"{s}:{h}" for s, h in result.selected[:2]] == top
    # each score is the mean objective of a real guided run with that head set
    site, head = result.selected[0]
    with da.attach(pipe, da.SoftPAG([(site, head)], strength=1.0, scale=3.0)):
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        imgs = pipe(["a red circle"] * 2, generator=gens, **kw).images  # batched as the search does
    assert abs(np.mean(brightness(imgs, None)) - result.rounds[0][f"{site}:{head}"]) < 1e-6
    # resume: a new hunter on the same state dir recomputes nothing and returns the same
    calls = []
    again = HeadHunter(pipe, lambda i, p: calls.append(1) or brightness(i, p), ["a red circle"], [0, 1], top_k=2, rounds=2,
                       scale=3.0, state_dir=str(tmp_path), progress=False, **kw).run()
    assert again.selected == result.selected and not calls
    # presets load into SoftPAG; heat map has one row per site
    path = tmp_path / "preset.json"
    result.save_preset(str(path), strength=0.5)
    preset = json.loads(path.read_text())
    assert preset["heads"][0][2] == 0.5
    with da.attach(pipe, da.SoftPAG(str(path))):
        pipe("a red circle", **kw)
    heat = result.heatmap(cell=4)
    assert heat.size == (4 * max(result.layout.values()), 4 * len(result.layout))


def test_bad_candidates_are_errors(tiny_pipe):
    with pytest.raises(ControlError, match="does not exist"):
        HeadHunter(tiny_pipe("sd3"), brightness, ["a"], [0], candidates=[("transformer_blocks.0.attn", 99)])
