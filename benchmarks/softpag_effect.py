"""SoftPAG / layer-level PAG vs no perturbation guidance on the testbed (oracle metrics).

    python benchmarks/softpag_effect.py --model tiny-sd3 --seeds 64 --suites single,two

Evaluation seeds only (diffattn.testbed.evaluate.eval_seeds); same seeds for every row.
"""
from __future__ import annotations

import argparse

import torch

import diffattn as da
from diffattn import testbed
from diffattn.methods.softpag import middle_layer
from diffattn.testbed.evaluate import evaluate_suite


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--seeds", type=int, default=64)
    p.add_argument("--suites", default="single,two")
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = testbed.load(args.model)
    mid = middle_layer(pipe)
    configs = {
        "no PAG": None,
        f"layer PAG {list(mid)[0]} (u=1, s={args.scale:g})": da.SoftPAG(mid, strength=1.0, scale=args.scale),
        f"SoftPAG same layer (u=0.5, s={args.scale:g})": da.SoftPAG(mid, strength=0.5, scale=args.scale),
    }
    print(f"| {args.model} config | suite | object acc [95% CI] | all present [95% CI] | extra-object rate |")
    print("|---|---|---|---|---|")
    for name, control in configs.items():
        for suite in args.suites.split(","):
            if control is None:
                r = evaluate_suite(pipe, suite, args.seeds, progress=False)
            else:
                with da.attach(pipe, control):
                    r = evaluate_suite(pipe, suite, args.seeds, progress=False)
            m = r.metrics()
            oa, ap, ex = m["object_accuracy"], m["all_present"], m["extra_object_rate"]
            print(f"| {name} | {suite} | {oa[0]:.3f} [{oa[1]:.3f}, {oa[2]:.3f}] | {ap[0]:.3f} [{ap[1]:.3f}, {ap[2]:.3f}] | {ex[0]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
