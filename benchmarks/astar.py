"""Cost of A-STAR / Attend-and-Excite: seconds per image and peak memory vs the baseline.

    python benchmarks/astar.py --models tiny-sd,tiny-sd3 --batch 1,4 --reps 3

Each (model, method, batch) runs in a fresh subprocess so that its peak memory is its own:
on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the peak resident set size
(``ru_maxrss``) minus the resident size after loading the model and one warm-up baseline call
(the working memory of the run). Seconds per image: median over ``--reps`` calls divided by
the batch. Models: the testbed names, or ``sd15-wide`` (a random tiny-SD1.5 UNet with 64/128/128
channels on 64×64 latents, where activation memory dominates the weights).

The A-STAR pipeline keeps the autograd graph of one sample at a time, so its extra memory
should not grow with the batch; ``a-star (no early exit)`` shows what stopping the gradient
forward after the last map-bearing site saves.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("baseline", "attend-and-excite", "a-star", "a-star (no early exit)")


def load(model: str, device: str):
    if model == "sd15-wide":
        from diffattn.tiny import tiny_sd15

        pipe = tiny_sd15(block_out_channels=(64, 128, 128), heads=4, cross_attention_dim=32, sample_size=64)
        call = dict(height=128, width=128, num_inference_steps=20, guidance_scale=5.0)
        return pipe.to(device), call, ["cat", "dog"], "a cat and a dog"
    from diffattn import testbed

    return testbed.load(model).to(device), {}, ["circle", "square"], "a red circle and a blue square"


def child(model: str, method: str, batch: int, reps: int, device: str) -> dict:
    """Run one configuration in this process; return its timing and memory."""
    from diffattn.pipelines import AStarConfig, AStarPipeline

    torch.set_num_threads(1) if device == "cpu" else None
    pipe, call, concepts, prompt = load(model, device)
    prompts = [prompt] * batch
    gens = lambda: [torch.Generator(device).manual_seed(s) for s in range(batch)]  # noqa: E731
    pipe(prompts, generator=gens(), output_type="latent", **call)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        base_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if method == "baseline":
        run = lambda: pipe(prompts, generator=gens(), output_type="latent", **call)  # noqa: E731
    else:
        config = AStarConfig.attend_and_excite() if method == "attend-and-excite" else AStarConfig.astar()
        if "no early exit" in method:
            config.early_exit = False
        astar = AStarPipeline(pipe, config)
        run = lambda: astar(prompts, concepts, generator=gens(), output_type="latent", **call)  # noqa: E731
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_mem
    return {"seconds_per_image": statistics.median(times) / batch, "peak_extra_mib": max(peak, 0) / 2**20}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-sd,tiny-sd3")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", default="1,4", help="batch sizes (comma-separated)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        model, method, batch = json.loads(args.child)
        print(json.dumps(child(model, method, batch, args.reps, args.device)))
        return
    print(f"| model | method | batch | s / image | vs baseline | peak extra memory (MiB, {args.device}) |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for batch in [int(b) for b in args.batch.split(",")]:
            base = None
            for method in args.methods.split(","):
                cmd = [sys.executable, __file__, "--child", json.dumps([model, method, batch]), "--reps", str(args.reps),
                       "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    print(f"| {model} | {method} | {batch} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                base = r["seconds_per_image"] if method == "baseline" else base
                ratio = f"{r['seconds_per_image'] / base:.2f}x" if base else ""
                print(f"| {model} | {method} | {batch} | {r['seconds_per_image']:.3f} | {ratio} | {r['peak_extra_mib']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
