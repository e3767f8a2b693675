"""SoftPAG cost: time per denoiser step and attention-map memory, side by side in one run.

    python benchmarks/softpag.py [--threads 2] [--reps 9] [--tokens 1024]
    python benchmarks/softpag.py --device cuda --layers 24 --heads 24 --head-dim 64 --tokens 4096   # SD3-medium-sized
    python benchmarks/softpag.py --compile [...]   # every row under torch.compile (CUDA graphs on a GPU)

Rows (median of interleaved repetitions on one transformer, batch = [uncond, cond, perturbed]):
- unguided, batch 2 ([uncond, cond]);
- the same 3-row batch with no perturbation: the cost of the extra branch alone;
- that batch with the engine attached and a control that does nothing at every site (the
  engine's own per-call cost: its processors, layout and spec);
- SoftPAG in output space (u = 0.5 on every head of every layer);
- SoftPAG through a materialised map: A = softmax(QK^T) built explicitly and blended as
  (1-u)A + uI before multiplying V, what the paper's code does.
The "extra beyond the branch" column is (row − plain 3-row batch) / plain 3-row batch.
With ``--compile`` the transformer runs under ``torch.compile`` (``mode="reduce-overhead"``,
i.e. CUDA graphs, on a GPU; the default mode on the CPU) for every row, so the engine's
per-call Python runs at trace time only: what is left is the blend's device work.
Memory: the L×L map a materialised implementation holds per layer (B·H·L²·4 bytes) vs the
output-space blend's [B, H, L, D] target; on CUDA peak allocator memory is reported too.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch

import diffattn as da
from diffattn.controls import Control
from diffattn.tiny import tiny_sd3


# the batch of every 3-row step: [uncond, cond, perturbed]
BRANCHES = {"uncond": slice(0, 1), "cond": slice(1, 2), "perturbed": slice(2, 3)}


def sd3_inputs(cfg, batch: int, side: int, device="cpu", dtype=torch.float32) -> dict:
    """Seeded inputs of one SD3 transformer step: ``batch`` latents of ``2·side`` pixels (``side²``
    tokens at patch 2), 77 text tokens, timestep 500; floats in ``dtype`` (the timestep stays fp32)."""
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(batch, cfg.in_channels, 2 * side, 2 * side, generator=g),
              encoder_hidden_states=torch.randn(batch, 77, cfg.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
              timestep=torch.full((batch,), 500.0))
    return {k: v.to(device, dtype if v.is_floating_point() and k != "timestep" else v.dtype) for k, v in kw.items()}


class MaterialisedSoftPAG(Control):
    """Reference implementation with the explicit L×L map (for the comparison only)."""

    def __init__(self, u):
        super().__init__()
        self.u = u

    def edit_output(self, call, out):
        rows = call.branches.get("perturbed")  # a slice: no host sync, traces under torch.compile
        if rows is None:
            return out
        q, k, v = call.q[rows], call.k[rows], call.v[rows]  # [b, H, L, D]
        attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # [b, H, L, L]
        eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
        attn = (1 - self.u) * attn + self.u * eye
        return torch.cat([out[: rows.start], attn @ v, out[rows.stop:]], dim=0)

    def guidance_scale(self, step):
        return 0.0  # the batch is built by hand here; no wrapper


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--tokens", type=int, default=1024, help="image tokens (a square grid)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of one SoftPAG step")
    p.add_argument("--compile", action="store_true", help="run every row under torch.compile (see the docstring)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    side = int(args.tokens**0.5)
    pipe = tiny_sd3(num_layers=args.layers, heads=args.heads, head_dim=args.head_dim, patch_size=2, sample_size=2 * side)
    model = pipe.transformer.to(device, dtype)
    cfg = model.config

    two, three = (sd3_inputs(cfg, b, side, device, dtype) for b in (2, 3))
    soft = da.SoftPAG("all", strength=0.5, scale=0.0)  # scale 0: we place the branch ourselves
    mat = MaterialisedSoftPAG(0.5)

    variants = {"unguided (batch 2)": (two, None), "3-row batch, no perturbation": (three, None),
                "3-row batch, engine + do-nothing control": (three, Control()),
                "SoftPAG, output space": (three, soft), "SoftPAG, materialised map": (three, mat)}
    # one copy of the transformer per row, its control attached for the whole run: no row
    # re-attaches (or, compiled, recompiles) between repetitions
    stack = contextlib.ExitStack()
    if args.compile:  # the copies share code objects: one cache entry per row
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    models = {}
    for name, (_, c) in variants.items():
        models[name] = copy.deepcopy(model)
        if c is not None:
            handle = stack.enter_context(da.attach(models[name], c))
            stack.enter_context(handle.branches(BRANCHES))
        if args.compile:  # CUDA graphs on a GPU
            models[name].compile(mode="reduce-overhead" if cuda else None, dynamic=False)

    def run(name):
        kw = variants[name][0]
        with torch.no_grad():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            models[name](**kw)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

    times = {k: [] for k in variants}
    for name in variants:
        for _ in range(3 if args.compile else 1):  # warm-up (compiling: trace, then record the CUDA graph)
            run(name)
    for _ in range(args.reps):
        for name in variants:
            times[name].append(run(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {}
    if cuda:  # peak allocator memory of one step, above the weights and inputs
        for name in variants:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run(name)
            peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    base3 = med["3-row batch, no perturbation"]
    n = args.tokens + 77
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for name in ("3-row batch, no perturbation", "SoftPAG, output space"):
            with profile(activities=acts) as prof:
                run(name)
            print(f"\n### profile: {name}\n")
            print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=14))
    h, d, size = args.heads, args.head_dim, torch.finfo(dtype).bits // 8
    print(f"| SD3 transformer, {args.layers} layers x {h} heads of {d}, {args.tokens} image + 77 text tokens, "
          f"{args.dtype} on {device.type}{', compiled' if args.compile else ''} | ms / step | vs unguided | extra beyond the branch |"
          + (" peak extra memory (MiB) |" if cuda else ""))
    print("|---|---|---|---|" + ("---|" if cuda else ""))
    for k, t in med.items():
        print(f"| {k} | {t * 1e3:.1f} | {t / med['unguided (batch 2)']:.3f} | {(t - base3) / base3 * 100:+.1f}% |"
              + (f" {peak[k]:.0f} |" if cuda else ""))
    print(f"\nAttention map a materialised implementation holds per layer for the perturbed row: "
          f"{h * n * n * size / 2**20:.1f} MiB (1 x {h} heads x {n}^2 x {args.dtype}); output-space target: "
          f"{h * n * d * size / 2**20:.2f} MiB ([1, {h}, {n}, {d}]).")
    stack.close()


if __name__ == "__main__":
    main()
