"""Engine overhead: a denoiser forward with diffattn attached (no control) vs stock processors.

    python benchmarks/overhead.py [--threads 2] [--reps 15]

Both variants run interleaved in one process on the same inputs (median of ``--reps``), on
tiny models made large enough that attention matters (256 and 1024 image tokens).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffattn as da
from diffattn.tiny import tiny_flux, tiny_sd3, tiny_sd15


def _sd3(tokens_side):
    pipe = tiny_sd3(num_layers=4, heads=4, head_dim=32, patch_size=2, sample_size=2 * tokens_side)
    m = pipe.transformer
    b = 2
    x = torch.randn(b, m.config.in_channels, 2 * tokens_side, 2 * tokens_side)
    kw = dict(hidden_states=x, encoder_hidden_states=torch.randn(b, 77, m.config.joint_attention_dim),
              pooled_projections=torch.randn(b, m.config.pooled_projection_dim), timestep=torch.tensor([500.0] * b))
    return m, kw


def _unet(side):
    pipe = tiny_sd15(block_out_channels=(64, 64, 64), heads=4, cross_attention_dim=32, sample_size=side)
    m = pipe.unet
    kw = dict(sample=torch.randn(2, 4, side, side), timestep=torch.tensor(500), encoder_hidden_states=torch.randn(2, 16, 32))
    return m, kw


def timed(model, kw, reps):
    with torch.no_grad():
        model(**kw)  # warm-up
        t0 = time.perf_counter()
        model(**kw)
        return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | image tokens | stock ms | attached ms | ratio |")
    print("|---|---|---|---|---|")
    for name, (model, kw), tokens in [
        ("SD3 transformer (4 layers, 4x32 heads)", _sd3(16), 256),
        ("SD3 transformer (4 layers, 4x32 heads)", _sd3(32), 1024),
        ("UNet (64 ch, 4 heads)", _unet(32), 1024),
    ]:
        stock, ours = [], []
        for _ in range(args.reps):  # interleaved: drift of the machine hits both alike
            stock.append(timed(model, kw, 1))
            with da.attach(model):
                ours.append(timed(model, kw, 1))
        s, o = statistics.median(stock), statistics.median(ours)
        print(f"| {name} | {tokens} | {s * 1e3:.1f} | {o * 1e3:.1f} | {o / s:.3f} |", flush=True)


if __name__ == "__main__":
    main()
