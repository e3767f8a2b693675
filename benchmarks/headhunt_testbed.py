"""HeadHunter on the testbed: search heads for oracle fidelity on training seeds, then compare
no guidance, layer-level PAG and the found heads on evaluation seeds the search never saw.

    python benchmarks/headhunt_testbed.py --model tiny-sd3 --search-seeds 16 --eval-seeds 64 --top-k 3

Writes the preset (JSON) and the per-head heat map (PNG) into --out.
"""
from __future__ import annotations

import argparse
import os

import torch

import diffattn as da
from diffattn import testbed
from diffattn.methods.headhunter import HeadHunter
from diffattn.testbed.objectives import oracle_fidelity
from diffattn.testbed.evaluate import TRAIN_SEEDS, evaluate_suite, suite_prompts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--suite", default="two")
    p.add_argument("--search-seeds", type=int, default=16)
    p.add_argument("--eval-seeds", type=int, default=64)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--out", default="runs/headhunt")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    pipe = testbed.load(args.model)
    prompts = suite_prompts(args.suite)
    seeds = list(TRAIN_SEEDS)[: args.search_seeds]
    hunt = HeadHunter(pipe, oracle_fidelity, prompts, seeds, top_k=args.top_k, rounds=args.rounds,
                      scale=args.scale, state_dir=os.path.join(args.out, "state"))
    result = hunt.run()
    result.save_preset(os.path.join(args.out, "preset.json"), strength=args.strength)
    result.save_heatmap(os.path.join(args.out, "heads.png"))
    print(f"search baseline {result.baseline:.3f}; selected {result.selected}")
    best_round = result.rounds[-1]
    print("top candidates:", sorted(best_round.items(), key=lambda kv: -kv[1])[:5])
    # equal cost: layer PAG perturbs every head of one layer; compare with each single layer
    layers = list(result.layout)
    configs = {"no guidance": None, f"HeadHunter {len(result.selected)} heads (u={args.strength:g})":
               da.SoftPAG(os.path.join(args.out, "preset.json"))}
    for layer in layers:
        configs[f"layer PAG {layer}"] = da.SoftPAG({layer: "all"}, strength=1.0, scale=args.scale)
    print(f"| {args.model} ({args.suite}, {args.eval_seeds} eval seeds) | object acc [95% CI] | all present [95% CI] | extra-object rate |")
    print("|---|---|---|---|")
    for name, control in configs.items():
        if control is None:
            r = evaluate_suite(pipe, args.suite, args.eval_seeds, progress=False)
        else:
            with da.attach(pipe, control):
                r = evaluate_suite(pipe, args.suite, args.eval_seeds, progress=False)
        m = r.metrics()
        oa, ap, ex = m["object_accuracy"], m["all_present"], m["extra_object_rate"]
        print(f"| {name} | {oa[0]:.3f} [{oa[1]:.3f}, {oa[2]:.3f}] | {ap[0]:.3f} [{ap[1]:.3f}, {ap[2]:.3f}] | {ex[0]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
