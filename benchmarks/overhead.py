"""Overhead of the diffattn engine: one denoiser forward, engine attached vs stock processors.

    python benchmarks/overhead.py                 # every family, 15 interleaved repetitions
    python benchmarks/overhead.py --families sd3 flux --reps 25 --threads 2

Models are the tiny diffusers models of ``diffattn.tiny`` grown until attention matters
(256-1024 image/video tokens per attention, fp32, CPU). Each repetition times, in turn, the
stock forward, the forward with ``da.attach(model)`` (no control: every site on the fast
path) and, with ``--noop`` (default on), the forward with a do-nothing control at every site
(the controlled path: AttentionCall, ``diffattn.kernels.attention``); attach/detach happen
outside the timed region. Medians (and the ratio of the fastest runs, less sensitive to a busy machine) are
reported as a markdown table, with the engine's fixed bookkeeping per forward (hook µs).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import diffattn as da  # noqa: E402
from diffattn.controls import Control  # noqa: E402
from diffattn import tiny  # noqa: E402


class Noop(Control):
    """Active at every site, edits nothing."""


def _sd15():
    unet = tiny.tiny_sd15(block_out_channels=(32, 64, 64), heads=4, cross_attention_dim=64).unet
    g = torch.Generator().manual_seed(0)
    kw = dict(sample=torch.randn(2, 4, 32, 32, generator=g), timestep=torch.tensor(500),
              encoder_hidden_states=torch.randn(2, 77, 64, generator=g), return_dict=False)
    return unet, kw, 32 * 32


def _sdxl():
    unet = tiny.tiny_sdxl(block_out_channels=(32, 64, 64), heads=(2, 4, 4), transformer_layers_per_block=(1, 2, 2)).unet
    g = torch.Generator().manual_seed(0)
    cond = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    kw = dict(sample=torch.randn(2, 4, 32, 32, generator=g), timestep=torch.tensor(500),
              encoder_hidden_states=torch.randn(2, 77, 32, generator=g), added_cond_kwargs=cond, return_dict=False)
    return unet, kw, 16 * 16


def _sd3():
    model = tiny.tiny_sd3(num_layers=4, heads=4, head_dim=32, sample_size=32).transformer
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, 4, 32, 32, generator=g),
              encoder_hidden_states=torch.randn(2, 93, model.config.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(2, model.config.pooled_projection_dim, generator=g),
              timestep=torch.full((2,), 500.0), return_dict=False)
    return model, kw, 16 * 16 + 93


def _flux():
    model = tiny.tiny_flux(num_layers=2, num_single_layers=4, heads=4, head_dim=32).transformer
    g = torch.Generator().manual_seed(0)
    h = w = 16
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1] = torch.arange(h).repeat_interleave(w)
    img_ids[:, 2] = torch.arange(w).repeat(h)
    kw = dict(hidden_states=torch.randn(1, h * w, model.config.in_channels, generator=g),
              encoder_hidden_states=torch.randn(1, 64, model.config.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
              timestep=torch.full((1,), 0.5), img_ids=img_ids, txt_ids=torch.zeros(64, 3), return_dict=False)
    return model, kw, h * w + 64


def _wan():
    model = tiny.tiny_wan(num_layers=4, heads=4, head_dim=32).transformer
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 3, 32, 32, generator=g), timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 64, 32, generator=g), return_dict=False)
    return model, kw, 3 * 16 * 16


BUILDERS = {"sd15": _sd15, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "wan": _wan}


def _time(model, kw) -> float:
    t0 = time.perf_counter()
    model(**kw)
    return time.perf_counter() - t0


def bench(family: str, reps: int, noop: bool) -> dict:
    model, kw, tokens = BUILDERS[family]()
    n_sites = len(da.sites(model))
    times = {"stock": [], "attached": [], "noop": []}
    with torch.no_grad():
        for _ in range(2):  # warm-up, both paths
            model(**kw)
            with da.attach(model, *( [Noop()] if noop else [])):
                model(**kw)
        variants = [("stock", None), ("attached", ())] + ([("noop", (Noop(),))] if noop else [])
        for rep in range(reps):
            k = rep % len(variants)  # rotate the order: drift and cache effects hit every variant alike
            for name, controls in variants[k:] + variants[:k]:
                if controls is None:
                    times[name].append(_time(model, kw))
                else:
                    with da.attach(model, *controls):
                        times[name].append(_time(model, kw))
        hook_us = _bookkeeping_us(model, kw)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
    best = {f"{k}_min": min(v) * 1e3 for k, v in times.items() if v}
    return dict(family=family, tokens=tokens, sites=n_sites, hook_us=hook_us, **med, **best)


def _bookkeeping_us(model, kw, n: int = 300) -> float:
    """Microseconds the engine's denoiser hook spends per forward (argument binding, step and
    branch tracking, token-layout facts): the whole fixed cost of an attached engine."""
    from diffattn.engine import HOOK_NAME

    with da.attach(model) as handle:
        hook = model._diffusers_hook.get_hook(HOOK_NAME)
        t0 = time.perf_counter()
        for _ in range(n):
            handle.engine.begin_forward(hook, hook.arguments((), kw), None)
        return (time.perf_counter() - t0) / n * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-noop", dest="noop", action="store_false", help="skip the do-nothing-control column")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [bench(f, args.reps, args.noop) for f in args.families]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"fp32 CPU, median of {args.reps} interleaved repetitions\n")
    head = "| model | tokens | sites | hook µs | stock ms | attached ms | ratio | ratio of minima |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if args.noop:
        head += " no-op control ms | ratio | ratio of minima |"
        sep += "---:|---:|---:|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['family']} | {r['tokens']} | {r['sites']} | {r['hook_us']:.0f} | {r['stock']:.1f} | {r['attached']:.1f} | "
                f"{r['attached'] / r['stock']:.3f} | {r['attached_min'] / r['stock_min']:.3f} |")
        if args.noop:
            line += f" {r['noop']:.1f} | {r['noop'] / r['stock']:.3f} | {r['noop_min'] / r['stock_min']:.3f} |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
