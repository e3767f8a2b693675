"""HeadHunter vs no guidance vs layer-level PAG on the testbed, on held-out seeds.

    python benchmarks/headhunt_eval.py --model tiny-sd3 --search-seeds 32 --eval-seeds 256 \
        --out runs/headhunt-eval --json headhunt_eval.json

1. Fidelity search: ``da.HeadHunter`` with the oracle-fidelity objective on the "two" suite,
   training seeds only (``TRAIN_SEEDS``), PAG-style perturbation (u = 1) at scale ``--scale``.
2. Equal-cost baseline: layer-level PAG (every head of one layer, u = 1, same scale; one extra
   branch, like the head set) scored on the *same training pairs*; the best layer there is
   "layer PAG (best)". Choosing it on training pairs keeps the comparison fair; every layer's
   held-out figure is reported too.
3. Held-out evaluation on ``--eval-seeds`` evaluation seeds (``eval_seeds``; never searched):
   no guidance, the head set at u in ``--u-sweep``, and layer PAG. Object accuracy and
   all-present rate with Wilson 95% intervals, plus *paired* differences against no
   guidance and against the best layer (same seeds, so a paired bootstrap over images,
   10,000 resamples, 95% percentile interval).
4. Style search (``--style dark``): HeadHunter with ``oracle_style`` on the style suite's
   prompts that ask for that style, then style accuracy held out, guided vs not.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import diffattn as da
from diffattn import testbed
from diffattn.methods.headhunter import HeadHunter
from diffattn.testbed.objectives import oracle_fidelity, oracle_style
from diffattn.testbed.evaluate import TRAIN_SEEDS, eval_seeds, evaluate, paired_bootstrap, suite_prompts, wilson_interval


def per_image(report, metric: str) -> np.ndarray:
    if metric == "object_accuracy":
        return np.array([s.object_accuracy for s in report.scores])
    if metric == "all_present":
        return np.array([float(s.all_present) for s in report.scores])
    if metric == "style":
        return np.array([np.mean([s.style_ok[k] for k, asked in s.style_requested.items() if asked]) for s in report.scores])
    raise ValueError(metric)


def run_config(pipe, control, prompts, seeds, **call_kwargs):
    if control is None:
        return evaluate(pipe, prompts, seeds, progress=False, **call_kwargs)
    with da.attach(pipe, control):
        return evaluate(pipe, prompts, seeds, progress=False, **call_kwargs)


def fmt_rate(x: np.ndarray) -> str:
    lo, hi = wilson_interval(float(x.sum()), len(x))
    return f"{x.mean():.3f} [{lo:.3f}, {hi:.3f}]"


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers (``"0.5,1,2"``)."""
    return [float(x) for x in text.split(",")]


def fidelity_study(args, pipe, prompts, train, held_out, call, record, t0):
    """Steps 1-3: the fidelity search, layer PAG on the same pairs, the held-out comparison."""
    # 1. fidelity search on training pairs
    hunt = HeadHunter(pipe, oracle_fidelity, prompts, train, top_k=args.top_k, rounds=args.rounds,
                      stop_without_gain=args.stop_without_gain, scale=args.scale,
                      state_dir=os.path.join(args.out, "fidelity-state"), **call)
    result = hunt.run()
    preset = os.path.join(args.out, f"{args.model}-fidelity.json")
    result.save_preset(preset, strength=1.0)
    result.save_heatmap(os.path.join(args.out, f"{args.model}-fidelity-heads.png"))
    record["search"] = {"baseline": result.baseline, "selected": result.selected, "rounds": result.rounds}
    print(f"search: baseline {result.baseline:.3f}; selected {result.selected}", flush=True)

    hunters = {(args.scale, 1.0): hunt}

    def train_score(heads, scale, u=1.0):
        """Mean objective on the training pairs guiding with ``heads`` at (scale, u); one hunter
        (and state folder) per setting, the search's own setting reusing the search's cache."""
        if (scale, u) not in hunters:
            hunters[(scale, u)] = HeadHunter(pipe, oracle_fidelity, prompts, train, scale=scale, strength=u,
                                             progress=False, state_dir=os.path.join(args.out, f"train-state-s{scale:g}-u{u:g}"),
                                             **call)
        return hunters[(scale, u)].score(heads)

    # 2. layer PAG on the same training pairs (equal cost: one perturbed branch)
    layers = list(result.layout)

    def layer_heads(layer):
        return [(layer, h) for h in range(result.layout[layer])]

    layer_train = {layer: train_score(layer_heads(layer), args.scale) for layer in layers}
    best_layer = max(layer_train, key=layer_train.get)
    record["layer_pag_train"] = layer_train
    record["best_layer"] = best_layer
    print(f"layer PAG on training pairs: {layer_train}; best {best_layer}", flush=True)
    best_setting = None
    if args.layer_scales:
        sweep = {(layer, scale): train_score(layer_heads(layer), scale) for scale in args.layer_scales for layer in layers}
        best_setting = max(sweep, key=sweep.get)
        record["layer_scale_sweep_train"] = {f"{layer}@{scale:g}": v for (layer, scale), v in sweep.items()}
        record["best_layer_setting"] = list(best_setting)
        print(f"layer PAG scale sweep on training pairs: best {best_setting} ({sweep[best_setting]:.3f})", flush=True)

    heads = [(site, head) for site, head in result.selected]
    best_heads = None
    if args.head_scales:
        sweep = {(scale, u): train_score(heads, scale, u) for scale in args.head_scales for u in args.u_sweep}
        best_heads = max(sweep, key=sweep.get)
        record["head_scale_sweep_train"] = {f"s={sc:g},u={u:g}": v for (sc, u), v in sweep.items()}
        record["best_head_setting"] = list(best_heads)
        print(f"head set scale x u sweep on training pairs: best {best_heads} ({sweep[best_heads]:.3f})", flush=True)

    # 3. held-out evaluation
    configs = {"no guidance": None}
    for u in args.u_sweep:
        configs[f"HeadHunter u={u:g}"] = da.SoftPAG(heads, strength=u, scale=args.scale)
    for layer in (layers if args.layers == "all" else [best_layer]):
        configs[f"layer PAG {layer}"] = da.SoftPAG({layer: "all"}, strength=1.0, scale=args.scale)
    if best_heads is not None:
        scale, u = best_heads
        configs[f"HeadHunter best (s={scale:g}, u={u:g})"] = da.SoftPAG(heads, strength=u, scale=scale)
    if best_setting is not None:
        layer, scale = best_setting
        configs[f"layer PAG best ({layer}, s={scale:g})"] = da.SoftPAG({layer: "all"}, strength=1.0, scale=scale)
    reports = {}
    for name, control in configs.items():
        reports[name] = run_config(pipe, control, prompts, held_out, **call)
        oa = per_image(reports[name], "object_accuracy")
        print(f"{name}: object accuracy {oa.mean():.3f} ({time.time() - t0:.0f}s)", flush=True)
    base = "no guidance"
    best = f"layer PAG {best_layer}" if best_setting is None else f"layer PAG best ({best_setting[0]}, s={best_setting[1]:g})"
    rows = []
    for name, r in reports.items():
        oa, ap = per_image(r, "object_accuracy"), per_image(r, "all_present")
        row = {"config": name, "object_accuracy": float(oa.mean()),
               "all_present": float(ap.mean()), "all_present_ci": list(wilson_interval(float(ap.sum()), len(ap))),
               "vs_none": paired_bootstrap(oa, per_image(reports[base], "object_accuracy")),
               "vs_best_layer": paired_bootstrap(oa, per_image(reports[best], "object_accuracy"))}
        m = r.metrics()["object_accuracy"]
        row["object_accuracy_ci"] = [m.low, m.high]
        rows.append(row)
    record["held_out"] = rows

    cfg = "model's CFG" if args.cfg is None else f"CFG {args.cfg:g}"
    print(f"\n| {args.model}, '{args.suite}' suite, {len(held_out)} eval seeds, s={args.scale:g}, {cfg} | object accuracy [95% CI] "
          f"| all present [95% CI] | Δ object acc vs none [paired 95% CI] | Δ vs {best} |")
    print("|---|---|---|---|---|")
    for row in rows:
        vn, vb = row["vs_none"], row["vs_best_layer"]
        lo, hi = row["object_accuracy_ci"]
        print(f"| {row['config']} | {row['object_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | "
              f"{row['all_present']:.3f} [{row['all_present_ci'][0]:.3f}, {row['all_present_ci'][1]:.3f}] | "
              f"{vn[0]:+.3f} [{vn[1]:+.3f}, {vn[2]:+.3f}] | {vb[0]:+.3f} [{vb[1]:+.3f}, {vb[2]:+.3f}] |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--suite", default="two")
    p.add_argument("--search-seeds", type=int, default=32)
    p.add_argument("--eval-seeds", type=int, default=256)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--stop-without-gain", action="store_true",
                   help="end the search at the first round whose best head does not improve the objective")
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--cfg", type=float, default=None,
                   help="CFG scale of every run, search included (default: the model's, 5); 0 = no CFG, "
                        "perturbation guidance alone, as the paper's head search and head-vs-layer comparison")
    p.add_argument("--layer-scales", type=floats, default=None,
                   help="also sweep layer PAG's scale (e.g. 0.5,1,2,3) on the training pairs; the best (layer, scale) "
                        "there is evaluated held out as 'layer PAG best (layer, s)': the best equal-cost layer setting")
    p.add_argument("--head-scales", type=floats, default=None,
                   help="also sweep the head set's scale (e.g. 0.5,1,2,3) with every u of --u-sweep on the training "
                        "pairs; the best (scale, u) is evaluated held out as 'HeadHunter best (s, u)', the head set's "
                        "counterpart of --layer-scales")
    p.add_argument("--u-sweep", type=floats, default="0.25,0.5,0.75,1.0")
    p.add_argument("--layers", default="all", choices=["all", "best"],
                   help="held-out rows for layer PAG: every layer, or only the best on the training pairs")
    p.add_argument("--style", default="dark", help="style objective to search (dark | outline | none)")
    p.add_argument("--style-seeds", type=int, default=16)
    p.add_argument("--only-style", action="store_true", help="skip the fidelity search and comparison (steps 1-3)")
    p.add_argument("--out", default="runs/headhunt-eval")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device of the pipeline (e.g. cuda)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    pipe = testbed.load(args.model).to(args.device)
    prompts = suite_prompts(args.suite)
    train = list(TRAIN_SEEDS)[: args.search_seeds]
    held_out = eval_seeds(args.eval_seeds)
    record: dict = {"model": args.model, "suite": args.suite, "scale": args.scale, "search_seeds": len(train),
                    "eval_seeds": len(held_out), "cfg": args.cfg}
    call = {} if args.cfg is None else {"guidance_scale": args.cfg}

    if not args.only_style:
        fidelity_study(args, pipe, prompts, train, held_out, call, record, t0)

    # 4. style search
    if args.style != "none":
        style_prompts = [q for q in suite_prompts("style") if args.style in q]
        style_train = list(TRAIN_SEEDS)[: args.style_seeds]
        shunt = HeadHunter(pipe, oracle_style(args.style), style_prompts, style_train, top_k=args.top_k,
                           rounds=args.rounds, stop_without_gain=args.stop_without_gain, scale=args.scale,
                           state_dir=os.path.join(args.out, "style-state"), **call)
        sres = shunt.run()
        spreset = os.path.join(args.out, f"{args.model}-{args.style}.json")
        sres.save_preset(spreset, strength=1.0)
        sres.save_heatmap(os.path.join(args.out, f"{args.model}-{args.style}-heads.png"))
        none = run_config(pipe, None, style_prompts, held_out, **call)
        guided = run_config(pipe, da.SoftPAG(spreset), style_prompts, held_out, **call)
        sn, sg = per_image(none, "style"), per_image(guided, "style")
        d = paired_bootstrap(sg, sn)
        record["style"] = {"style": args.style, "prompts": style_prompts, "selected": sres.selected,
                           "search_baseline": sres.baseline, "none": float(sn.mean()), "guided": float(sg.mean()),
                           "delta": d}
        print(f"\nstyle '{args.style}' ({len(style_prompts)} prompts, {len(held_out)} eval seeds): heads {sres.selected}; "
              f"style accuracy none {fmt_rate(sn)} → HeadHunter {fmt_rate(sg)}; Δ {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
    record["seconds"] = time.time() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=list)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
