"""World-v2 acceptance and headroom of a testbed model (issue 21): what the next methods have
to work with, measured before any of them is built.

    python benchmarks/world_v2_models.py --model tiny-sd3 --seeds 8 --ir-seeds 4

Sections (every image on evaluation seeds, 20 steps and the pipeline's CFG by default):
- ``marked``: every marking x colour x shape, fully named: captioned marking accuracy (the
  acceptance target: >= 0.9).
- VMix headroom: ``aesthetic_none`` (nothing named: the model's own rate of each attribute)
  against ``aesthetic_one`` (one attribute named): an attribute the base model already shows
  uncaptioned leaves an aesthetic adapter nothing to add.
- repulsion headroom: ``underspecified`` prompts, one diversity group per prompt over its
  seeds: Vendi and mode coverage (distinct open (colour, marking) modes over
  min(images, modes)), beside the fully named ``marked`` suite, whose groups have one mode.
- IR headroom: each ``IR_SUITES`` group's references and scene generated alone with the same
  seed: how often the scene keeps each reference subject's marking, against the same
  comparison across different seeds (chance for this model) and the swap rate (a subject
  drawn with the other reference's marking).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from diffattn.testbed import load, world
from diffattn.testbed.evaluate import (IR_SUITES, eval_seeds, evaluate_v2, identity_match, marking_calls,
                                       paired_bootstrap, rate_metric, suite_prompts_v2)


def fmt(m) -> str:
    return f"{m.value:.3f} [{m.low:.3f}, {m.high:.3f}] (n={m.n})"


def headroom_ir(pipe, suite: str, seeds: list[int], call_kwargs: dict) -> dict:
    """Keep, cross-seed keep and swap rates of one IR suite, with the paired keep - chance."""
    groups = IR_SUITES[suite]
    prompts = sorted({world.caption_v2(r) for g in groups for r in g.references} | {world.caption_v2(g.scene) for g in groups})
    report = evaluate_v2(pipe, pairs=[(p, s) for p in prompts for s in seeds], **call_kwargs)
    parsed = {(sc.prompt, s): sc.parsed for sc, s in zip(report.scores, report.seeds)}
    keep, cross, swap, undecided = [], [], [], 0
    for g in groups:
        scene_p = world.caption_v2(g.scene)
        for k, s in enumerate(seeds):
            other = seeds[(k + 1) % len(seeds)]  # a different seed: the same question with unrelated noise
            refs = [parsed[(world.caption_v2(r), s)] for r in g.references]
            refs_other = [parsed[(world.caption_v2(r), other)] for r in g.references]
            for i, want in enumerate(g.scene.objects):
                same = identity_match(refs[i], parsed[(scene_p, s)], want)
                diff = identity_match(refs_other[i], parsed[(scene_p, s)], want)
                if same is None or diff is None:
                    undecided += 1
                    continue
                keep.append(same[0] == same[1])
                cross.append(diff[0] == diff[1])
                j = 1 - i
                mate = identity_match(refs[j], parsed[(scene_p, s)], g.scene.objects[j]) if len(g.scene.objects) == 2 else None
                other_mark = None if mate is None else mate[0]
                swap.append(other_mark is not None and other_mark != same[0] and same[1] == other_mark)
    return {"keep": rate_metric(keep), "cross_seed_keep": rate_metric(cross), "swap": rate_metric(swap),
            "keep_minus_cross": paired_bootstrap(np.array(keep, float), np.array(cross, float)) if keep else None,
            "undecided": undecided, "decided": len(keep), "images": len(report)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd3", help="tiny-sd3, tiny-sd or an exported testbed folder")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per prompt (marked, aesthetic, underspecified)")
    ap.add_argument("--ir-seeds", type=int, default=4, help="seeds per IR group")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sections", default="marked,vmix,repulsion,ir")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load(args.model)
    seeds = eval_seeds(args.seeds)
    sections = set(args.sections.split(","))
    out: dict = {"model": args.model, "seeds": args.seeds, "ir_seeds": args.ir_seeds}
    t0 = time.time()
    kw = dict(progress=not args.no_progress)
    if args.steps is not None:
        kw["num_inference_steps"] = args.steps

    def run(suite):
        prompts = suite_prompts_v2(suite)
        return evaluate_v2(pipe, pairs=[(p, s) for p in prompts for s in seeds], **kw)

    print(f"# {args.model}: {args.seeds} seeds per prompt, {args.ir_seeds} per IR group")
    if sections & {"marked", "repulsion"}:
        marked = run("marked")
        m = marked.metrics()
        per = {}
        for sc in marked.scores:
            want = world.parse_prompt_v2(sc.prompt).objects[0].marking
            calls = [c for c in marking_calls(sc) if c is not None]
            if calls:
                per.setdefault(want, []).append(calls[0][0] == calls[0][1])
        out["marked"] = {k: v._asdict() for k, v in m.items()} | {
            f"marking_accuracy_{k}": rate_metric(v)._asdict() for k, v in per.items()}
        print("\n## marked (captioned markings)")
        for k in ("object_accuracy", "marking_accuracy", "marking_unreadable", "vendi"):
            if k not in m:
                continue
            print(f"- {k}: {fmt(m[k])}")
        for k, v in sorted(per.items()):
            print(f"- marking_accuracy {world.MARKING_WORDS[k]}: {fmt(rate_metric(v))}")
    if "vmix" in sections:
        none, one = run("aesthetic_none").metrics(), run("aesthetic_one").metrics()
        print("\n## VMix headroom: attribute rate uncaptioned (aesthetic_none) vs named (aesthetic_one)")
        print("| attribute | uncaptioned | named |\n|---|---|---|")
        out["vmix"] = {}
        for s in world.STYLES_V2:
            a, b = none.get(f"{s}_unnamed"), one.get(f"{s}_named")
            out["vmix"][s] = {"unnamed": a._asdict() if a else None, "named": b._asdict() if b else None}
            print(f"| {s} | {fmt(a) if a else '—'} | {fmt(b) if b else '—'} |")
        print(f"- object_accuracy uncaptioned {fmt(none['object_accuracy'])}, named {fmt(one['object_accuracy'])}")
    if "repulsion" in sections:
        und = run("underspecified").metrics()
        out["repulsion"] = {k: und[k]._asdict() for k in ("vendi", "mode_coverage", "object_accuracy")}
        print("\n## repulsion headroom: under-specified prompts, one group per prompt over seeds")
        print(f"- underspecified vendi {fmt(und['vendi'])}, mode coverage {fmt(und['mode_coverage'])}, "
              f"object accuracy {fmt(und['object_accuracy'])}")
        print(f"- marked (fully named, one mode) vendi {fmt(m['vendi'])}")
    if "ir" in sections:
        out["ir"] = {}
        print("\n## IR headroom: references and scene generated alone, same seed")
        print("| suite | keep (same seed) | keep (other seed: chance) | keep − chance [95% CI] | swap | decided / undecided |")
        print("|---|---|---|---|---|---|")
        for suite in IR_SUITES:
            r = headroom_ir(pipe, suite, eval_seeds(args.ir_seeds), kw)
            d = r["keep_minus_cross"]
            out["ir"][suite] = {k: (v._asdict() if hasattr(v, "_asdict") else v) for k, v in r.items()}
            print(f"| {suite} | {fmt(r['keep'])} | {fmt(r['cross_seed_keep'])} | "
                  f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | {fmt(r['swap'])} | {r['decided']} / {r['undecided']} |")
    out["seconds"] = round(time.time() - t0, 1)
    print(f"\n{out['seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
