"""Contextual repulsion's cost: a whole B-image pipeline call with the control vs without,
timed side by side (interleaved repetitions) on the same pipeline.

    python benchmarks/repulsion_overhead.py                  # tiny-sd3, B = 4, 20 steps, τ 1 / 4, M 10
    python benchmarks/repulsion_overhead.py --taus 1 4 20 --inner 10 --reps 7 --threads 2

Reports the median seconds per call and the ratio to the unmodified batch (the issue's goal:
at most +30%, the paper's +20-30%). The repulsion's work grows with τ (steps it acts on) and
M (inner ascent steps per block), not with the number of steps it leaves alone, so the
per-call overhead is reported next to the per-step one on the steps it acts on.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import diffattn as da  # noqa: E402
from diffattn import testbed  # noqa: E402


def _call(pipe, args, control=None) -> float:
    kw = dict(num_images_per_prompt=args.images, num_inference_steps=args.steps,
              generator=torch.Generator().manual_seed(0), output_type="latent")
    t0 = time.perf_counter()
    if control is None:
        pipe(args.prompt, **kw)
    else:
        with da.attach(pipe, control):
            pipe(args.prompt, **kw)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd3")
    ap.add_argument("--prompt", default="a circle")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--taus", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = testbed.load(args.model)
    pipe.set_progress_bar_config(disable=True)
    runs = {"baseline": None, **{f"τ={t}": da.ContextRepulsion(eta=0.5, tau=t, inner=args.inner) for t in args.taus}}
    _call(pipe, args)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, control in runs.items():
            times[name].append(_call(pipe, args, control))
    base = statistics.median(times["baseline"])
    print(f"{args.model}, B = {args.images}, {args.steps} steps, M = {args.inner}, {args.reps} interleaved reps, "
          f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}\n")
    print("| run | s / call (median) | × baseline | extra per acted-on step, × a baseline step |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        if name == "baseline":
            print(f"| baseline | {med:.3f} | 1.00 | |")
            continue
        tau = int(name.split("=")[1])
        per_step = (med - base) / min(tau, args.steps) / (base / args.steps)
        print(f"| repulsion {name} | {med:.3f} | {med / base:.2f} | {per_step:.2f} |")


if __name__ == "__main__":
    main()
