"""Which attention sites localise concepts? Per-site "lift" of A-STAR's concept maps on the testbed.

    python benchmarks/astar_sites.py --model tiny-sd3 --seeds 8

For baseline generations of the two-object suite (training seeds), the concept map of every
shape noun (``diffattn.methods.astar.concept_maps``: text re-normalisation, softmax(T·A),
A&E's smoothing) is taken at every step from each site alone and from all default sites
averaged, upsampled to the image, and compared with the object the oracle finds for that
noun in the final image: lift = (share of the map's mass inside a disc of the object's
radius + 2 px) / (the disc's share of the image). Lift 1 is a map that ignores the object;
a map inside the disc has lift 1 / (disc share) (about 9 here). Steps are grouped into early
(first quarter), mid and late. A-STAR's gradient acts through the early maps, so sites
with a high early lift are the ones to optimise (``AStarConfig.sites``).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import diffattn as da
from diffattn import testbed
from diffattn.methods.astar import ConceptRecorder, aggregate_attention, concept_maps, text_positions
from diffattn.pipelines.astar import AStarPipeline
from diffattn.testbed import oracle
from diffattn.testbed.defaults import default_concepts
from diffattn.testbed.evaluate import suite_prompts, train_seeds


def map_lift(concept_map: torch.Tensor, cx: float, cy: float, radius: float, size: int = 64) -> float:
    """Mass share of ``concept_map`` [h, w] inside the disc (cx, cy, radius) of a size×size
    image, divided by the disc's area share."""
    up = F.interpolate(concept_map[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    disc = torch.from_numpy(((xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2).astype(np.float32))  # [size, size]
    share = float((up * disc).sum() / up.sum().clamp_min(1e-12))
    return share / float(disc.mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--temperatures", default="100,1000")
    p.add_argument("--sites", default=None,
                   help="site selector to probe (diffattn.sites grammar, e.g. 'cross'); default: A-STAR's default sites")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = testbed.load(args.model)
    astar = AStarPipeline(pipe)
    sites = args.sites if args.sites is not None else astar._sites()[0]
    joint = astar.family in ("sd3", "flux")
    recorder = ConceptRecorder(sites)
    prompts = suite_prompts("two")
    temps = [float(t) for t in args.temperatures.split(",")]
    lifts: dict[tuple[str, str, float], list[float]] = {}
    with da.attach(pipe, recorder):
        for i, seed in enumerate(train_seeds(args.seeds)):
            prompt = prompts[i % len(prompts)]
            per_step: list[list] = []

            def collect(_pipe, step, _t, kw):
                per_step.append(list(recorder.records))
                recorder.records.clear()
                return kw

            recorder.start("main")
            image = pipe(prompt, generator=torch.Generator().manual_seed(seed), callback_on_step_end=collect).images[0]
            recorder.start(None)
            score = oracle.score(image, prompt)
            groups, _ = astar._concepts_for(prompt, default_concepts(prompt))
            eot = astar._eot(prompt)
            n_steps = len(per_step)
            found = [(k, score.parsed.objects[j]) for k, j in enumerate(score.matched) if j is not None and score.found[k]]
            if not found:
                continue
            for s, records in enumerate(per_step):
                phase = "early" if s < n_steps / 4 else "mid" if s < 0.6 * n_steps else "late"
                views = [(name, [(probs[0], grid)], grid) for name, probs, grid in records]
                finest = max((grid for _, _, grid in records), key=lambda g: g[0] * g[1])
                views.append(("all probed sites", [(probs[0], grid) for _, probs, grid in records], finest))
                for name, maps, grid in views:
                    attn = aggregate_attention(maps, grid, renorm_text=joint)  # [h, w, T]
                    positions = text_positions(attn.shape[-1], eot, "prompt", first=astar._first_key())
                    for temp in temps:
                        cmaps = concept_maps(attn, groups, positions, temperature=temp)  # [C, h, w]
                        for k, obj in found:
                            lifts.setdefault((name, phase, temp), []).append(
                                map_lift(cmaps[k], obj.cx, obj.cy, obj.size + 2))
    names = list(dict.fromkeys(k[0] for k in lifts))
    header = "| site | " + " | ".join(f"{ph} T={t:g}" for ph in ("early", "mid", "late") for t in temps) + " |"
    print(header)
    print("|---|" + "---|" * (3 * len(temps)))
    for name in names:
        cells = [f"{np.mean(lifts[(name, ph, t)]):.2f}" for ph in ("early", "mid", "late") for t in temps]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
