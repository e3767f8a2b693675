"""IR-Diffusion on the testbed: identity match, leakage and all-present for every baseline (issue 22).

    python benchmarks/ir_eval.py --model tiny-sd3 --suite ir_named --seeds 4 --masks attention \
        --json runs/bench/ir-sd3-named.json --grid benchmarks/ir_grids/tiny-sd3-named.png

Each world-v2 subject group (``IR_SUITES``: 32 groups of two references (``ir_named``,
``ir_open``) or three (``ir_named3``), one subject each, and a scene naming every subject's
colour and shape but not its marking) runs with ``--seeds``
evaluation seeds: one rehearsal per (group, seed) (references + vanilla scene, masks), then
the final run of every baseline from that rehearsal, so every row of the table sees the same
noises and the same masks (paired). Per subject, the oracle reads the marking its reference
drew and the marking of the scene object of its colour and shape (``identity_match``):

- identity match: the scene object carries its reference's marking;
- leakage: the scene object carries *another* subject's reference marking, counted per ordered
  pair of subjects (k shows i's) only where the two references' markings differ;
- all-present: every object the scene prompt names is found (colour and shape);

with 95% bootstrap intervals over (group, seed) items and a paired bootstrap of each method
minus vanilla. Chance of identity match = Σ_m p_ref(m)·p_scene(m) from the vanilla marginals.
``--masks oracle`` takes the masks from the oracle's detected objects (the official
detector + SAM slot) instead of the words' cross-attention.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from diffattn.pipelines import IRConfig, IRDiffusionPipeline
from diffattn.pipelines.ir import BASELINES
from diffattn.testbed import load, oracle, world
from diffattn.testbed.evaluate import IR_SUITES, eval_seeds, identity_match

METHODS = ("vanilla", *BASELINES)


def subject_word(scene: world.PromptSpecV2, i: int) -> str:
    """The word naming subject i in the scene: its shape, or its colour when both share a shape."""
    objs = scene.objects
    if sum(o.shape == objs[i].shape for o in objs) == 1:
        return objs[i].shape
    return objs[i].color


def oracle_segmenter(specs):
    """The testbed's detector + segmenter: the disc of the detected object matching subject
    i's colour and shape (references: their one object), None when it is absent."""
    def seg(image, i, role):
        parsed = oracle.parse_v2(image.permute(1, 2, 0).mul(255).round().byte().numpy())
        want = specs[i]
        hits = [o for o in parsed.objects if o.shape == want.shape and o.color == want.color]
        if role == "reference" and not hits and len(parsed.objects) == 1:
            hits = parsed.objects
        if not hits:
            return None
        o = hits[0]
        h, w = image.shape[1:]
        yy, xx = np.mgrid[0:h, 0:w]
        return (yy - o.cy) ** 2 + (xx - o.cx) ** 2 <= o.size ** 2
    return seg


def to_np(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).mul(255).round().clamp(0, 255).byte().numpy()  # [H, W, 3]


def item_scores(refs, scene_img, group) -> dict:
    """Identity match per subject, leakage, all-present of one scene."""
    prompt = world.caption_v2(group.scene)
    parsed_scene = oracle.parse_v2(to_np(scene_img))
    score = oracle.score_v2(to_np(scene_img), prompt, parsed=parsed_scene)
    pairs = [identity_match(oracle.parse_v2(to_np(refs[i])), parsed_scene, want)  # (ref marking, scene marking)
             for i, want in enumerate(group.scene.objects)]
    ref_marks = [None if pr is None else pr[0] for pr in pairs]
    scene_marks = [None if pr is None else pr[1] for pr in pairs]
    matches = [None if pr is None else pr[0] == pr[1] for pr in pairs]
    leaks = []
    n = len(group.scene.objects)
    for k, i in ((k, i) for k in range(n) for i in range(n) if i != k):  # scene subject k shows subject i's marking
        if scene_marks[k] is None or ref_marks[i] is None or ref_marks[i] == ref_marks[k]:
            continue
        leaks.append(scene_marks[k] == ref_marks[i])
    return {"match": matches, "leak": leaks, "present": bool(all(score.found)),
            "scene_marks": scene_marks, "ref_marks": ref_marks}


def bootstrap(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(n)]
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def item_rate(items, key) -> np.ndarray:
    """Per item, the mean of its readable verdicts (items with none are dropped)."""
    out = []
    for it in items:
        v = [x for x in (it[key] if isinstance(it[key], list) else [it[key]]) if x is not None]
        if v:
            out.append(float(np.mean(v)))
    return np.array(out)


def paired(items_a, items_b, key, n=2000, seed=1):
    """Bootstrap of mean(a − b) over items where both have a verdict."""
    diffs = []
    for a, b in zip(items_a, items_b):
        va = [x for x in (a[key] if isinstance(a[key], list) else [a[key]]) if x is not None]
        vb = [x for x in (b[key] if isinstance(b[key], list) else [b[key]]) if x is not None]
        if va and vb:
            diffs.append(np.mean(va) - np.mean(vb))
    return bootstrap(np.array(diffs), n, seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--suite", default="ir_named", choices=sorted(IR_SUITES))
    p.add_argument("--seeds", type=int, default=4, help="evaluation seeds per group (32 groups)")
    p.add_argument("--groups", type=int, default=None, help="first N groups only (smoke runs)")
    p.add_argument("--masks", default="attention", choices=["attention", "oracle"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--grid", default=None, help="PNG grid of the first groups: refs | vanilla | each method")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    ir = IRDiffusionPipeline(pipe)
    groups = list(IR_SUITES[args.suite])[: args.groups]
    items = {m: [] for m in methods}
    attempts, grid_rows, t0 = [], [], time.time()
    for gi, group in enumerate(groups):
        subjects = [world.caption_v2(r) for r in group.references]
        scene = world.caption_v2(group.scene)
        n_subj = len(group.references)
        words = [subject_word(group.scene, i) for i in range(n_subj)]
        for seed in eval_seeds(args.seeds, offset=0):
            seg = oracle_segmenter(group.scene.objects) if args.masks == "oracle" else None
            r = ir.rehearse(scene, subjects, subject_words=words, seed=seed * 100 + gi, segmenter=seg)
            attempts.append(r.attempts)
            row = list(r.images[:n_subj + 1])  # references, then the vanilla scene
            for m in methods:
                if m == "vanilla":
                    refs, img = r.images[:n_subj], r.images[n_subj]
                else:
                    out = ir.final(r, config=IRConfig.baseline(m), output_type="pt")
                    refs, img = out.references, out.images[0]
                    row.append(img)
                items[m].append(item_scores(refs, img, group))
            if args.grid and len(grid_rows) < 8 and seed == eval_seeds(1)[0]:
                grid_rows.append(row)
        print(f"group {gi + 1}/{len(groups)}  {time.time() - t0:.0f}s", flush=True)
    table = {}
    van = items.get("vanilla")
    for m in methods:
        row = {k: bootstrap(item_rate(items[m], k)) for k in ("match", "leak", "present")}
        if van is not None and m != "vanilla":
            row.update({f"d_{k}": paired(items[m], van, k) for k in ("match", "leak", "present")})
        table[m] = row
    if van is not None:  # chance of identity match from the vanilla marginals
        refs = [x for it in van for x in it["ref_marks"] if x]
        scenes = [x for it in van for x in it["scene_marks"] if x]
        marks = world.MARKINGS
        pr = np.array([refs.count(k) for k in marks]) / max(1, len(refs))
        ps = np.array([scenes.count(k) for k in marks]) / max(1, len(scenes))
        table["chance_match"] = float((pr * ps).sum())
    print(f"\n{args.model} {args.suite} masks={args.masks}: {len(groups)} groups x {args.seeds} seeds, "
          f"mean attempts {np.mean(attempts):.2f}, {time.time() - t0:.0f}s")
    print(f"{'method':16s} {'identity match':24s} {'leakage':24s} {'all-present':24s}")
    fmt = lambda t: f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"  # noqa: E731
    for m in methods:
        print(f"{m:16s} {fmt(table[m]['match']):24s} {fmt(table[m]['leak']):24s} {fmt(table[m]['present']):24s}")
        if m != "vanilla" and "d_match" in table[m]:
            print(f"{'  - vanilla':16s} {fmt(table[m]['d_match']):24s} {fmt(table[m]['d_leak']):24s} "
                  f"{fmt(table[m]['d_present']):24s}")
    if "chance_match" in table:
        print(f"chance of identity match (vanilla marginals): {table['chance_match']:.3f}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "table": table, "items": items, "attempts": attempts}, f, indent=1)
    if args.grid and grid_rows:
        from PIL import Image

        cells = [[to_np(x) for x in row] for row in grid_rows]
        h, w = cells[0][0].shape[:2]
        canvas = np.full((h * len(cells), w * max(len(r) for r in cells), 3), 255, np.uint8)
        for y, row in enumerate(cells):
            for x, c in enumerate(row):
                canvas[y * h:(y + 1) * h, x * w:(x + 1) * w] = c
        os.makedirs(os.path.dirname(args.grid) or ".", exist_ok=True)
        Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST).save(args.grid)
        n_subj = len(groups[0].references)
        print("grid columns: " + " | ".join(f"ref {i + 1}" for i in range(n_subj)) + " | vanilla | " + " | ".join(m for m in methods if m != "vanilla"))


if __name__ == "__main__":
    main()
