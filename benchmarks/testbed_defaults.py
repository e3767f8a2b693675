"""Sweep the testbed models' sampler settings on training seeds (never the evaluation seeds).

For each model: guidance scale, number of steps and the scheduler's timestep placement
(tiny-sd3: the flow-matching ``shift`` of ``FlowMatchEulerDiscreteScheduler``, as SD3 uses
3.0; tiny-sd: DPM-Solver++ with linspace / trailing spacing or Karras sigmas). Each row is
scored by the oracle on the single- and two-object suites; the defaults shipped in
``diffattn/testbed/pipelines.py`` and the asset folders' scheduler configs are the best
row, then checked once on evaluation seeds with ``diffattn eval``.

    python benchmarks/testbed_defaults.py --model tiny-sd3 --seeds 96
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from diffattn import testbed
from diffattn.testbed.evaluate import evaluate, suite_prompts, train_seeds


def scheduler_variants(model: str) -> dict[str, dict]:
    """Named scheduler-config overrides to try for ``model``."""
    if model == "tiny-sd3":
        return {f"shift={s}": {"shift": s} for s in (1.0, 2.0, 3.0, 4.0)}
    return {
        "linspace": {"timestep_spacing": "linspace"},
        "trailing": {"timestep_spacing": "trailing"},
        "karras": {"use_karras_sigmas": True},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd3", choices=["tiny-sd", "tiny-sd3"])
    p.add_argument("--seeds", type=int, default=96, help="training seeds per suite")
    p.add_argument("--suites", default="single,two")
    p.add_argument("--guidance", default="3,5,7")
    p.add_argument("--steps", default="20,30")
    p.add_argument("--out", default=None, help="JSON file for the table")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = testbed.load(args.model)
    base_config = dict(pipe.scheduler.config)
    scheduler_cls = type(pipe.scheduler)
    rows = []
    for (name, override), cfg, steps in itertools.product(
        scheduler_variants(args.model).items(), map(float, args.guidance.split(",")), map(int, args.steps.split(","))
    ):
        pipe.scheduler = scheduler_cls.from_config({**base_config, **override})
        row = {"scheduler": name, "guidance_scale": cfg, "steps": steps}
        for suite in args.suites.split(","):
            report = evaluate(pipe, suite_prompts(suite), train_seeds(args.seeds), progress=False,
                              num_inference_steps=steps, guidance_scale=cfg)
            m = report.metrics()
            row[f"{suite}_object"] = round(m["object_accuracy"].value, 3)
            row[f"{suite}_all_present"] = round(m["all_present"].value, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
