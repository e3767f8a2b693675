"""What one protected image costs: seconds and peak memory of DeContext and each baseline at the
defaults (issue 26, "Cost"), side by side in one process.

    python benchmarks/decontext_cost.py                        # the tiny-kontext architecture, 64 px, 800 steps
    python benchmarks/decontext_cost.py --model assets/tiny-kontext --steps 800 --json runs/bench/decontext-cost.json
    python benchmarks/decontext_cost.py --model black-forest-labs/FLUX.1-Kontext-dev --size 512 --device cuda

The model is a tiny-kontext folder or a hub id; by default the tiny-kontext architecture with
freshly initialised weights (``kontext_models.build_kontext("base")``: the cost of a PGD step
does not depend on what the weights learned, so this runs before the trained editor exists).
For every method, in alternation over ``--reps`` rounds (a busy machine slows all alike): the
wall time of ``DeContextProtector.protect`` on one image (PGD loop and 8-bit quantisation, no
diagnostics) and the rise of the process's peak resident memory over the resident size before
the call (``evaluate.peak_rss_rise_mib``: the peak mark is reset per call; on CUDA also
``torch.cuda.max_memory_allocated`` after a reset). One 2-step protection per method first
warms caches. Reported: median seconds per image, seconds per PGD step, and peak MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from PIL import Image

METHODS = ("decontext", "encoder", "diffpgd", "random")


def load_editor(model: str | None, device: str):
    from diffattn.testbed import kontext_models

    if model is None:
        pipe = kontext_models.build_kontext("base")
    elif os.path.isdir(model):
        pipe = kontext_models.load_kontext(model)
    else:
        from diffusers import FluxKontextPipeline

        pipe = FluxKontextPipeline.from_pretrained(model, torch_dtype=torch.bfloat16 if device == "cuda" else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sample_image(size: int) -> Image.Image:
    """A shapes-world render at ``size`` px (a typical input of the testbed's editor)."""
    from diffattn.testbed import world

    return world.render(world.sample_training_scene_v2(0)).resize((size, size), Image.NEAREST)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a tiny-kontext folder or hub id (default: fresh tiny-kontext)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default: DeContextConfig's, the paper's 800)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffattn.pipelines.decontext import DeContextConfig, DeContextProtector
    from diffattn.testbed.evaluate import peak_rss_rise_mib

    steps = args.steps or DeContextConfig().steps
    pipe = load_editor(args.model, args.device)
    image = sample_image(args.size)
    methods = args.methods.split(",")
    protectors = {m: DeContextProtector(pipe, method=m, steps=steps, progress=False) for m in methods}
    for m in methods:  # warm-up
        DeContextProtector(pipe, method=m, steps=2, progress=False).protect(image, diagnostics=False)
    seconds = {m: [] for m in methods}
    peak = {m: [] for m in methods}
    cuda_peak = {m: [] for m in methods}
    for _ in range(args.reps):
        for m in methods:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            _, mib = peak_rss_rise_mib(protectors[m].protect, image, diagnostics=False)
            seconds[m].append(time.perf_counter() - t)
            peak[m].append(mib)
            if args.device == "cuda":
                cuda_peak[m].append(torch.cuda.max_memory_allocated() / 2**20)
    machine = f"{platform.node()} {os.cpu_count()} cpus, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"{args.model or 'tiny-kontext (fresh weights)'}, {args.size} px, {steps} PGD steps, {machine}\n")
    print("| method | s / image | s / PGD step | peak RSS rise (MiB) |" + (" CUDA peak (MiB) |" if cuda_peak[methods[0]] else ""))
    print("|---|---|---|---|" + ("---|" if cuda_peak[methods[0]] else ""))
    rows = {}
    for m in methods:
        s = statistics.median(seconds[m])
        rows[m] = dict(seconds=seconds[m], peak_rss_mib=peak[m], cuda_peak_mib=cuda_peak[m])
        extra = f" {max(cuda_peak[m]):.0f} |" if cuda_peak[m] else ""
        per_step = "—" if m == "random" else f"{s / steps:.4f}"
        print(f"| {m} | {s:.1f} | {per_step} | {max(peak[m]):.0f} |{extra}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": vars(args), "steps": steps, "machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
