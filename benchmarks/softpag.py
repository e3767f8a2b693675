"""SoftPAG cost: time per denoiser step and attention-map memory, side by side in one run.

    python benchmarks/softpag.py [--threads 2] [--reps 9] [--tokens 1024]

Rows (median of interleaved repetitions on one transformer, batch = [uncond, cond, perturbed]):
- unguided, batch 2 ([uncond, cond]);
- the same 3-row batch with no perturbation: the cost of the extra branch alone;
- SoftPAG in output space (u = 0.5 on every head of every layer);
- SoftPAG through a materialised map: A = softmax(QK^T) built explicitly and blended as
  (1-u)A + uI before multiplying V, what the paper's code does.
The "extra beyond the branch" column is (row − plain 3-row batch) / plain 3-row batch.
Memory: the L×L map a materialised implementation holds per layer (B·H·L²·4 bytes) vs the
output-space blend's [B, H, L, D] target; on CUDA peak allocator memory is reported too.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffattn as da
from diffattn.controls import Control
from diffattn.tiny import tiny_sd3


class MaterialisedSoftPAG(Control):
    """Reference implementation with the explicit L×L map (for the comparison only)."""

    def __init__(self, u):
        super().__init__()
        self.u = u

    def edit_output(self, call, out):
        rows = call.rows(("perturbed",))
        if not rows.any():
            return out
        q, k, v = call.q[rows], call.k[rows], call.v[rows]
        attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # [b, H, L, L]
        eye = torch.eye(attn.shape[-1], dtype=attn.dtype)
        attn = (1 - self.u) * attn + self.u * eye
        out = out.clone()
        out[rows] = attn @ v
        return out

    def guidance_scale(self, step):
        return 0.0  # the batch is built by hand here; no wrapper


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--tokens", type=int, default=1024, help="image tokens (a square grid)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    side = int(args.tokens**0.5)
    pipe = tiny_sd3(num_layers=4, heads=4, head_dim=32, patch_size=2, sample_size=2 * side)
    model = pipe.transformer
    cfg = model.config

    def inputs(b):
        g = torch.Generator().manual_seed(0)
        return dict(hidden_states=torch.randn(b, cfg.in_channels, 2 * side, 2 * side, generator=g),
                    encoder_hidden_states=torch.randn(b, 77, cfg.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=g),
                    timestep=torch.full((b,), 500.0))

    two, three = inputs(2), inputs(3)
    branches = {"uncond": slice(0, 1), "cond": slice(1, 2), "perturbed": slice(2, 3)}
    soft = da.SoftPAG("all", strength=0.5, scale=0.0)  # scale 0: we place the branch ourselves
    mat = MaterialisedSoftPAG(0.5)

    def run(kw, control=None):
        with torch.no_grad():
            if control is None:
                t0 = time.perf_counter()
                model(**kw)
                return time.perf_counter() - t0
            with da.attach(model, control) as h, h.branches(branches):
                t0 = time.perf_counter()
                model(**kw)
                return time.perf_counter() - t0

    variants = {"unguided (batch 2)": (two, None), "3-row batch, no perturbation": (three, None),
                "SoftPAG, output space": (three, soft), "SoftPAG, materialised map": (three, mat)}
    times = {k: [] for k in variants}
    for name, (kw, c) in variants.items():
        run(kw, c)  # warm-up
    for _ in range(args.reps):
        for name, (kw, c) in variants.items():
            times[name].append(run(kw, c))
    med = {k: statistics.median(v) for k, v in times.items()}
    base3 = med["3-row batch, no perturbation"]
    n = args.tokens + 77
    print(f"| SD3 transformer, 4 layers x 4 heads of 32, {args.tokens} image + 77 text tokens | ms / step | vs unguided | extra beyond the branch |")
    print("|---|---|---|---|")
    for k, t in med.items():
        print(f"| {k} | {t * 1e3:.1f} | {t / med['unguided (batch 2)']:.3f} | {(t - base3) / base3 * 100:+.1f}% |")
    print(f"\nAttention map a materialised implementation holds per layer for the perturbed row: "
          f"{4 * n * n * 4 / 2**20:.1f} MiB (1 x 4 heads x {n}^2 x fp32); output-space target: "
          f"{4 * n * 32 * 4 / 2**20:.2f} MiB ([1, 4, {n}, 32]).")


if __name__ == "__main__":
    main()
