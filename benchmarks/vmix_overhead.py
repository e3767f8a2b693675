"""VMix's inference cost: a pipeline call with ``da.ValueMix`` vs the base model, timed side by
side (interleaved repetitions) on the same pipeline, and the same with the engine attached but
no control (so the engine's own share is visible).

    python benchmarks/vmix_overhead.py --adapter runs/vmix-sd3/adapter.safetensors
    python benchmarks/vmix_overhead.py --adapter A --reps 9 --steps 20 --threads 2

The adapter's extra work per forward: the AesEmb projection (a [N -> C] linear, LayerNorm and
the zero-init linear) once, and per cross-attention site one value projection W_V^a and an
add; the attention map is the base's (one SDPA call), so the overhead should be a few percent.
Reports median seconds per call and per step, and the ratios to the base.
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
from diffattn.methods.vmix import load_adapter  # noqa: E402


def _call(pipe, args, controls) -> float:
    kw = dict(num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="latent")
    t0 = time.perf_counter()
    if controls is None:
        pipe([args.prompt] * args.batch, **kw)
    else:
        with da.attach(pipe, *controls):
            pipe([args.prompt] * args.batch, **kw)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd3")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--aesthetics", default="shadow")
    ap.add_argument("--prompt", default="a red circle")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = testbed.load(args.model)
    pipe.set_progress_bar_config(disable=True)
    adapter = load_adapter(args.adapter, pipe)
    configs = {
        "base": None,
        "engine, no control": [],
        "VMix λ=1.5": [da.ValueMix(adapter, aesthetics=args.aesthetics.split(","), scale=1.5)],
    }
    for c in configs.values():  # warm-up
        _call(pipe, args, c)
    times = {k: [] for k in configs}
    for _ in range(args.reps):
        for k, c in configs.items():
            times[k].append(_call(pipe, args, c))
    base = statistics.median(times["base"])
    print(f"# {args.model}, batch {args.batch}, {args.steps} steps, {args.reps} interleaved reps, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| configuration | s / call (median) | s / step | ratio to base |\n|---|---|---|---|")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"| {k} | {m:.3f} | {m / args.steps:.4f} | {m / base:.3f} |")


if __name__ == "__main__":
    main()
