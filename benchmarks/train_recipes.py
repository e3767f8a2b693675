"""Compare testbed training recipes at a fixed budget: train several runs side by side, then
score each exported model on training seeds (never the evaluation seeds).

    python benchmarks/train_recipes.py --device cuda --data runs/data --vae-from runs/decoder/final \
        --recipes "sd3-cos:tiny-sd3:5600:64:5e-4:cosine" "sd3-wsd:tiny-sd3:5600:64:1e-3:wsd" ...

A recipe is ``name:model:steps:batch:lr:schedule``. Runs go to ``<--out>/<name>`` (resumable),
``--parallel`` at a time (tiny models leave a GPU mostly idle, so several share it). Each
finished run is exported with ``--vae-from`` and evaluated with the shipped sampler defaults
on ``--seeds`` training seeds per suite. ``samples`` = steps x batch: on the CPU box a step
costs time proportional to its batch, so equal samples mean equal CPU time (measured rates
in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from diffattn import testbed
from diffattn.testbed.evaluate import evaluate, suite_prompts, train_seeds


def parse_recipe(spec: str) -> dict:
    name, model, steps, batch, lr, schedule = spec.split(":")
    if model not in ("tiny-sd", "tiny-sd3"):
        raise ValueError(f"recipe {spec!r}: model must be tiny-sd or tiny-sd3")
    return dict(name=name, model=model, steps=int(steps), batch=int(batch), lr=float(lr), schedule=schedule)


def train_command(r: dict, args) -> list[str]:
    cmd = [sys.executable, "-m", "diffattn.testbed.train", r["model"], "--out", os.path.join(args.out, r["name"]),
           "--data", args.data, "--steps", str(r["steps"]), "--batch", str(r["batch"]), "--lr", str(r["lr"]),
           "--schedule", r["schedule"], "--device", args.device, "--threads", str(args.threads),
           "--save-every", "1000"]
    if r["model"] == "tiny-sd":  # the shipped tiny-sd objective
        cmd += ["--standardize", "--prediction", "v_prediction"]
    return cmd


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", required=True)
    p.add_argument("--data", default="runs/data")
    p.add_argument("--vae-from", default="runs/decoder/final")
    p.add_argument("--out", default="runs/recipes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="CPU threads per training process")
    p.add_argument("--seeds", type=int, default=96, help="training seeds per suite")
    p.add_argument("--suites", default="single,two")
    args = p.parse_args()
    recipes = [parse_recipe(s) for s in args.recipes]

    suites = args.suites.split(",")
    os.makedirs(args.out, exist_ok=True)
    print(f"| recipe | model | steps x batch | samples | lr | schedule | wall ({args.device}, {args.parallel} at a time) | "
          + " | ".join(f"{s}: object acc / all present" for s in suites) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(suites), flush=True)
    queue, running = list(recipes), {}
    while queue or running:
        while queue and len(running) < args.parallel:
            r = queue.pop(0)
            log = open(os.path.join(args.out, f"{r['name']}.log"), "w")
            running[r["name"]] = (r, subprocess.Popen(train_command(r, args), stdout=log, stderr=subprocess.STDOUT), time.time(), log)
        time.sleep(2)
        for name, (r, proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            wall = time.time() - t0
            log.close()
            del running[name]
            if proc.returncode:
                print(f"| {name} | failed (rc {proc.returncode}); see {args.out}/{name}.log |", flush=True)
                continue
            print(f"| {name} | {r['model']} | {r['steps']} x {r['batch']} | {r['steps'] * r['batch'] / 1000:.0f}k | "
                  f"{r['lr']:g} | {r['schedule']} | {wall:.0f} s | " + " | ".join(score(r, args, suites)) + " |", flush=True)


def score(r: dict, args, suites) -> list[str]:
    """Export a finished run and evaluate it on training seeds: one cell per suite."""
    folder = os.path.join(args.out, r["name"], "export")
    subprocess.run([sys.executable, "-m", "diffattn.testbed.train", "export", "--run", os.path.join(args.out, r["name"]),
                    "--to", folder, "--vae-from", args.vae_from], check=True, capture_output=True)
    pipe = testbed.load(folder).to(args.device)
    cells = []
    for s in suites:
        m = evaluate(pipe, suite_prompts(s), train_seeds(args.seeds), batch_size=32, progress=False).metrics()
        cells.append(f"{m['object_accuracy'].value:.3f} / {m['all_present'].value:.3f}")
    return cells


if __name__ == "__main__":
    main()
