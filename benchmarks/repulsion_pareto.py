"""Diversity vs fidelity of contextual repulsion and its baselines on a testbed MMDiT (issue 24).

    python benchmarks/repulsion_pareto.py --model tiny-sd3 --cfg 5,8 --json runs/bench/pareto.json \
        --plot benchmarks/repulsion_pareto.png

Every under-specified world-v2 prompt (``underspecified``, 64) is one group of ``--group``
images generated in ONE batch (``num_images_per_prompt``, as repulsion needs), image j of
prompt k from its own evaluation seed, so the i.i.d. baseline is exactly one-image-at-a-time
sampling and every method sees the same initial noise (paired). Each method sweeps its own
knob; per point: Vendi over oracle features and mode coverage per group (diversity), oracle
object accuracy and all-present (fidelity), with 95% intervals over groups / images.

Methods: ``iid`` (plain seeds), ``repulsion`` (η, text stream, middle third, τ steps),
``image`` (the same on the image stream), ``pg`` (latent particle guidance coeff), ``cads``
(s, τ1 = 0.3, τ2 = 0.8, ψ = 1 as the repulsion paper), ``interval`` (CFG only for
flow σ ∈ (0, σ_hi]).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import diffattn as da
from diffattn.testbed import load, oracle, world
from diffattn.testbed.evaluate import (EvalReportV2, eval_seeds, open_modes, oracle_features_v2, paired_bootstrap,
                                       read_mode, suite_prompts_v2, vendi_score)

SWEEPS = {  # method -> (knob name, values, control factory)
    "iid": ("-", [0], lambda v, a: None),
    "repulsion": ("eta", [0.25, 0.5, 1.0, 2.0], lambda v, a: da.ContextRepulsion(eta=v, tau=a.tau, inner=a.inner,
                                                                                     blocks=a.blocks)),
    "image": ("eta", [0.25, 0.5, 1.0, 2.0],
              lambda v, a: da.ContextRepulsion(eta=v, tau=a.tau, inner=a.inner, stream="image", blocks=a.blocks)),
    "pg": ("coeff", [10.0, 30.0, 100.0, 300.0], lambda v, a: da.LatentParticleGuidance(coeff=v, sigma_min=a.pg_sigma_min)),
    "cads": ("s", [0.1, 0.25, 0.5, 0.7], lambda v, a: da.CADS(scale=v, tau1=0.3, tau2=0.8, psi=1.0)),
    "interval": ("sigma_hi", [0.9, 0.8, 0.6, 0.4], lambda v, a: da.IntervalGuidance((0.0, v))),
}


def run_point(pipe, prompts, group: int, control, batch_prompts: int, cfg: float, steps: int | None,
              keep: int = 0) -> tuple[EvalReportV2, list]:
    """The report of one point and the images of its first ``keep`` prompt groups (for grids)."""
    seeds = eval_seeds(len(prompts) * group)
    report = EvalReportV2(scores=[], seeds=[], groups=[], features=[])
    kept = []
    kw = {"guidance_scale": cfg} | ({"num_inference_steps": steps} if steps else {})
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start:start + batch_prompts]
        chunk_seeds = seeds[start * group:(start + len(chunk)) * group]
        gens = [torch.Generator().manual_seed(s) for s in chunk_seeds]
        call = lambda: pipe(prompt=chunk, num_images_per_prompt=group, generator=gens, **kw).images  # noqa: E731
        if control is None:
            images = call()
        else:
            with da.attach(pipe, control):
                images = call()
        for j, im in enumerate(images):
            p = chunk[j // group]
            parsed = oracle.parse_v2(im)
            report.scores.append(oracle.score_v2(im, p, parsed=parsed))
            report.seeds.append(chunk_seeds[j])
            report.groups.append(p)
            report.features.append(oracle_features_v2(parsed))
            if len(kept) < keep * group:
                kept.append(im)
    return report, kept


def save_grid(images: list, group: int, path: str, title: str, scale: int = 2) -> None:
    """One row per prompt group (``group`` images each), upscaled nearest, titled."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    rows = len(images) // group
    canvas = Image.new("RGB", (w * scale * group, h * scale * rows + 14), "white")
    ImageDraw.Draw(canvas).text((3, 1), title, fill="black")
    for i, im in enumerate(images):
        canvas.paste(im.resize((w * scale, h * scale), Image.NEAREST), ((i % group) * w * scale, 14 + (i // group) * h * scale))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


def per_group(report: EvalReportV2) -> tuple[list[float], list[float]]:
    """Vendi and mode coverage of each group, in prompt order (as ``EvalReportV2.metrics`` averages
    them), so two methods run on the same prompts and seeds can be compared group by group."""
    vendi, cover = [], []
    for ix in report.by_group().values():
        vendi.append(vendi_score(np.stack([report.features[i] for i in ix])))
        spec = world.parse_prompt_v2(report.scores[ix[0]].prompt)
        n_modes = len(open_modes(spec))
        read = [m for m in (read_mode(report.scores[i], spec) for i in ix) if m is not None]
        cover.append(len(set(read)) / min(len(ix), n_modes) if n_modes > 1 else float("nan"))
    return vendi, cover


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd3")
    ap.add_argument("--cfg", default="5", help="comma list of CFG scales")
    ap.add_argument("--methods", default=",".join(SWEEPS))
    ap.add_argument("--group", type=int, default=4, help="images per prompt (one batch)")
    ap.add_argument("--prompts", type=int, default=64, help="first N under-specified prompts")
    ap.add_argument("--batch-prompts", type=int, default=4)
    ap.add_argument("--tau", type=int, default=4, help="repulsion: first τ steps")
    ap.add_argument("--inner", type=int, default=10, help="repulsion: inner steps M")
    ap.add_argument("--blocks", default="middle",
                    type=lambda v: v if v in ("middle", "first", "last", "all") else [int(i) for i in v.split(",")],
                    help="repulsion: the blocks it edits, 'middle' (the paper's third), 'all', or indices '1,2,3'")
    ap.add_argument("--pg-sigma-min", type=lambda v: None if v == "none" else float(v), default=0.5,
                    help="particle guidance acts while the flow sigma >= this (default 0.5 = the official code's "
                         "DDPM sigma 1; 'none': every step, as the session-14/17 rows)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="Pareto curves PNG (needs matplotlib: pip install .[bench])")
    ap.add_argument("--values", action="append", default=[], metavar="METHOD=V1,V2",
                    help="replace a method's knob values, e.g. repulsion=4,8,16")
    ap.add_argument("--grid", default=None, help="folder: one PNG per point, its first --grid-groups prompt groups")
    ap.add_argument("--grid-groups", type=int, default=4)
    ap.add_argument("--merge", default=None, help="comma list of earlier --json files whose rows join the plot")
    args = ap.parse_args(argv)
    for spec in args.values:
        name, _, vals = spec.partition("=")
        knob, _, make = SWEEPS[name]
        SWEEPS[name] = (knob, [float(v) for v in vals.split(",")], make)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load(args.model)
    prompts = suite_prompts_v2("underspecified")[:args.prompts]
    rows, iid = [], {}
    print(f"# {args.model}: {len(prompts)} under-specified prompts x {args.group} images per batch")
    print("| cfg | method | knob | vendi [95% CI] | mode coverage | object acc | all present | s |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg in [float(c) for c in args.cfg.split(",")]:
        for method in args.methods.split(","):
            knob, values, make = SWEEPS[method]
            for v in values:
                t0 = time.time()
                report, kept = run_point(pipe, prompts, args.group, make(v, args), args.batch_prompts, cfg, args.steps,
                                         keep=args.grid_groups if args.grid else 0)
                if args.grid:
                    name = f"cfg{cfg:g}-g{args.group}-{method}" + ("" if method == "iid" else f"-{knob}{v:g}")
                    save_grid(kept, args.group, os.path.join(args.grid, name + ".png"),
                              f"{method} {knob}={v:g}, CFG {cfg:g}: first {args.grid_groups} prompts x {args.group} seeds")
                m = report.metrics()
                vendi_g, cover_g = per_group(report)
                row = {"cfg": cfg, "method": method, "knob": knob, "value": v, "seconds": round(time.time() - t0, 1),
                       **{k: m[k]._asdict() for k in ("vendi", "mode_coverage", "object_accuracy", "all_present")},
                       "vendi_per_group": vendi_g, "coverage_per_group": cover_g}
                if method in ("repulsion", "image"):
                    row.update(tau=args.tau, inner=args.inner, blocks=args.blocks)
                if method == "pg":
                    row.update(sigma_min=args.pg_sigma_min)
                if method == "iid":
                    iid[cfg] = (vendi_g, cover_g)
                elif cfg in iid:  # paired over the same prompts and seeds: Δ vs i.i.d. [95% bootstrap]
                    a, b = np.array(cover_g), np.array(iid[cfg][1])
                    keep = ~(np.isnan(a) | np.isnan(b))
                    row["vendi_minus_iid"] = paired_bootstrap(np.array(vendi_g), np.array(iid[cfg][0]))
                    row["coverage_minus_iid"] = paired_bootstrap(a[keep], b[keep])
                rows.append(row)
                f = lambda k: f"{m[k].value:.3f} [{m[k].low:.3f}, {m[k].high:.3f}]"  # noqa: E731
                print(f"| {cfg:g} | {method} | {knob}={v:g} | {f('vendi')} | {f('mode_coverage')} | "
                      f"{f('object_accuracy')} | {f('all_present')} | {row['seconds']} |", flush=True)
                if "vendi_minus_iid" in row:
                    d = lambda t: f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]"  # noqa: E731
                    print(f"|   | paired vs iid | | Δ {d(row['vendi_minus_iid'])} | Δ {d(row['coverage_minus_iid'])} | | | |",
                          flush=True)
                if args.json:
                    with open(args.json, "w") as fh:
                        json.dump({"model": args.model, "group": args.group, "prompts": len(prompts), "rows": rows}, fh,
                                  indent=1)
    if args.plot:
        merged = [r for f in (args.merge.split(",") if args.merge else []) for r in json.load(open(f))["rows"]]
        plot(merged + rows, args.plot)


PLOT_AXES = (("object_accuracy", "vendi"), ("all_present", "vendi"),
             ("object_accuracy", "mode_coverage"), ("all_present", "mode_coverage"))  # (fidelity, diversity)
AXIS_LABELS = {"object_accuracy": "fidelity: oracle object accuracy", "all_present": "fidelity: all objects present",
               "vendi": "diversity: Vendi per group (oracle features)", "mode_coverage": "diversity: mode coverage"}


def plot(rows, path):
    """Pareto curves: one row of panels per CFG, one panel per (fidelity, diversity) pair of
    :data:`PLOT_AXES`; each method's points joined in the order of its knob."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = sorted({r["cfg"] for r in rows})
    fig, axes = plt.subplots(len(cfgs), len(PLOT_AXES), figsize=(4.6 * len(PLOT_AXES), 4.0 * len(cfgs)),
                             squeeze=False)
    for row_axes, cfg in zip(axes, cfgs):
        for ax, (fx, dy) in zip(row_axes, PLOT_AXES):
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r for r in rows if r["cfg"] == cfg and r["method"] == method), key=lambda r: r["value"])
                xs = [r[fx]["value"] for r in pts]
                ys = [r[dy]["value"] for r in pts]
                style = "k*" if method == "iid" else ("o-" if len(pts) > 1 else "D")  # i.i.d.: the reference star
                ax.plot(xs, ys, style, label=method, markersize=12 if method == "iid" else (5 if len(pts) > 1 else 7))
            ax.set_xlabel(AXIS_LABELS[fx])
            ax.set_ylabel(AXIS_LABELS[dy])
            ax.set_title(f"CFG {cfg:g}")
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
