"""Quality of block-sparse attention against dense attention on tiny-wan (issue 25).

    python benchmarks/sparse_quality.py --model runs/tiny-wan-export --clips 64 --json runs/bench/sparse-quality.json
    python benchmarks/sparse_quality.py ... --conditions rectified:0.5,random:0.9 --json runs/bench/sq-b.json
    python benchmarks/sparse_quality.py --report runs/bench/sq-a.json,runs/bench/sq-b.json   # one table, no run

Every condition generates the same (prompt, seed) pairs: clip i is prompt ``i % P`` of the
chosen video suites (default ``single`` and ``two``: one or two movers, 64 prompts) with
evaluation seed i (``evaluate.eval_seeds``: no training run sees them), 20 steps at the
model's CFG. First the dense clips, then each ``(mode, drop)`` of
``da.RectifiedSparseAttention(drop, mode=..., block_size=64)`` from the same generator seeds:

- ``rectified``: IPAR-reweighted pooled scores, top-k + neighbour blocks, GAPR compensation;
- ``vanilla``: the same block selection without rectification (plain block-sparse);
- ``random``: random key blocks at the same top-k budget (ablation).

Per condition: PSNR and SSIM of every frame against the dense clip of the same seed (per clip
the PSNR of the clip's mean squared error and the mean frame SSIM; mean over clips with a
Student-t interval), the video oracle's per-frame object accuracy, motion-direction accuracy,
object accuracy and whole-clip correctness (95% Wilson intervals over clips), the paired
difference of per-frame object accuracy against dense (bootstrap over clips), and the density
actually kept (the mean share of key blocks in each query block's LUT, over every sparse call:
read from the plans the control builds, so "equal density" is checked, not assumed). Then the
goal's orderings paired clip by clip (``paired_table``): rectified - vanilla, vanilla - random and
rectified - random in PSNR and SSIM at each drop rate, bootstrap intervals over clips, and the share
of clips where the first condition is the closer to dense. The paired rows need the per-clip
similarities that the JSON keeps since session 20 (``--report`` of older files prints no pairs).

Settings. Wan's defaults keep the first two layers and the first five of the twenty steps dense
(official scripts), and the first latent frame's blocks attend to each other. Blocks of 64
tokens: tiny-wan's 768 video tokens per clip are 12 key blocks, a 3 x 2 x 2 grid of 1 x 8 x 8
tiles. Two settings differ from the official ones, both because that grid is tiny:

- ``--neighbours`` off by default: in a 3 x 2 x 2 grid almost every block is a neighbour of
  every other, so the neighbour rule alone keeps 0.80-0.91 of the blocks at drop 0.9-0.5
  (measured); the drop rates would not differ. Pass ``--neighbours`` to measure that setting.
- ``--p-remain 0`` by default: the cumulative-mass floor (official 0.3) keeps more blocks
  where the pooled scores are flat, and only in the score-driven modes, so ``random`` (top-k
  only) would run at a lower density. With ``p_remain = 0`` every mode keeps exactly top-k
  blocks plus the same first-frame blocks: equal density by construction, checked by the
  ``density`` column.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

import diffattn as da
from diffattn.methods import spaattn
from diffattn.pipelines import ssim
from diffattn.testbed import load
from diffattn.testbed.evaluate import eval_seeds, mean_interval, paired_bootstrap
from diffattn.testbed.video import video_suite_prompts
from diffattn.testbed.video_oracle import evaluate_video


class DensityRecorder:
    """Records the kept-block share of every plan ``RectifiedSparseAttention`` builds while
    installed: it wraps ``spaattn.block_sparse_plan`` (looked up at call time) and restores it
    on exit. Share per call: mean over rows, heads and query blocks of |LUT| / key blocks."""

    def __init__(self):
        self.shares: list[float] = []
        self._original = None

    def __enter__(self):
        self._original = original = spaattn.block_sparse_plan

        def recording(q, k, v, **kw):
            plan = original(q, k, v, **kw)
            n_key_blocks = -(-k.shape[2] // plan.block_k)
            self.shares.append(float((plan.lut >= 0).sum(-1).float().mean()) / n_key_blocks)
            return plan

        spaattn.block_sparse_plan = recording
        return self

    def __exit__(self, *exc):
        spaattn.block_sparse_plan = self._original
        return False


def clip_similarity(clip: np.ndarray, dense: np.ndarray) -> tuple[float, float]:
    """(PSNR of the clip's mean squared error, mean frame SSIM) of uint8 clips [F, H, W, 3]."""
    a, b = clip.astype(np.float64) / 255.0, dense.astype(np.float64) / 255.0
    mse = float(np.mean((a - b) ** 2))
    clip_psnr = float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))
    return clip_psnr, float(np.mean([ssim(x, y) for x, y in zip(a, b)]))


def run_condition(pipe, pairs, control=None, batch_size: int = 4, steps: int = 20):
    """(VideoReport with clips, kept shares) of one condition on the given (prompt, seed) pairs."""
    with DensityRecorder() as rec:
        if control is None:
            report = evaluate_video(pipe, pairs=pairs, batch_size=batch_size, return_clips=True,
                                    num_inference_steps=steps)
        else:
            with da.attach(pipe, control):
                report = evaluate_video(pipe, pairs=pairs, batch_size=batch_size, return_clips=True,
                                        num_inference_steps=steps)
    return report, rec.shares


def summarise(report, shares, dense) -> dict:
    """The row of one condition (``dense``: the dense condition's report, or None for itself)."""
    m = report.metrics()
    row = {k: m[k]._asdict() for k in ("frame_object_accuracy", "direction_accuracy", "object_accuracy",
                                       "all_present", "correct", "unreadable_rate")}
    row["density"] = float(np.mean(shares)) if shares else 1.0
    row["sparse_calls"] = len(shares)
    sims = [None] * len(report.scores)
    if dense is not None:
        sims = [clip_similarity(c, d) for c, d in zip(report.clips, dense.clips)]
        finite = [p for p, _ in sims if np.isfinite(p)]
        row["psnr"] = dict(zip(("value", "low", "high"), mean_interval(finite)), n=len(finite),
                           identical=len(sims) - len(finite))
        row["ssim"] = dict(zip(("value", "low", "high"), mean_interval([s for _, s in sims])), n=len(sims))
        fa = [s.frame_accuracy for s in report.scores]
        fd = [s.frame_accuracy for s in dense.scores]
        row["delta_frame_accuracy"] = dict(zip(("value", "low", "high"), paired_bootstrap(fa, fd)))
    row["per_clip"] = [dict(seed=s, frame_accuracy=c.frame_accuracy, direction_accuracy=c.direction_accuracy,
                            correct=c.correct, **({} if sim is None else dict(psnr=sim[0], ssim=sim[1])))
                       for s, c, sim in zip(report.seeds, report.scores, sims)]
    return row


def paired_similarity(a: dict, b: dict) -> dict:
    """Paired differences ``a - b`` of two conditions' per-clip PSNR and SSIM against dense (the
    same clips: same prompt and seed), each with its bootstrap interval over clips. A clip equal
    to its dense clip in either condition has an infinite PSNR: it leaves the PSNR pairs
    (counted in ``psnr_pairs``) and stays in the SSIM pairs."""
    ca, cb = a["per_clip"], b["per_clip"]
    if not ca or [c["seed"] for c in ca] != [c["seed"] for c in cb]:
        raise ValueError("the two conditions ran different (or no) clips; pair only rows of one benchmark run")
    finite = [(x["psnr"], y["psnr"]) for x, y in zip(ca, cb) if np.isfinite(x["psnr"]) and np.isfinite(y["psnr"])]
    nan = (float("nan"),) * 3
    psnr = paired_bootstrap([x for x, _ in finite], [y for _, y in finite]) if finite else nan
    ssim_d = paired_bootstrap([x["ssim"] for x in ca], [y["ssim"] for y in cb])
    wins = float(np.mean([x > y for x, y in finite])) if finite else float("nan")
    return dict(psnr=dict(zip(("value", "low", "high"), psnr)), psnr_pairs=len(finite), psnr_wins=wins,
                ssim=dict(zip(("value", "low", "high"), ssim_d)))


# The orderings the goal names: rectified over vanilla, vanilla over random, at each drop rate.
ORDERINGS = (("rectified", "vanilla"), ("vanilla", "random"), ("rectified", "random"))


def paired_table(results: dict) -> str:
    """Paired PSNR / SSIM differences of the goal's orderings at every drop rate in ``results``
    (rows named ``"<mode> <drop>"`` with per-clip similarities)."""
    rows = ["| comparison | Δ PSNR (dB, paired) | clips where the first is closer | Δ SSIM (paired) |",
            "|---|---|---|---|"]
    drops = sorted({k.split(" ")[1] for k in results if k != "dense" and len(k.split(" ")) == 2})
    for drop in drops:
        for first, second in ORDERINGS:
            a, b = results.get(f"{first} {drop}"), results.get(f"{second} {drop}")
            if a is None or b is None or not all(r["per_clip"] and "psnr" in r["per_clip"][0] for r in (a, b)):
                continue
            d = paired_similarity(a, b)
            rows.append(f"| {first} − {second} @ {drop} | {fmt(d['psnr'], 2)} | {d['psnr_wins']:.2f} of "
                        f"{d['psnr_pairs']} | {fmt(d['ssim'], 4)} |")
    return "\n".join(rows)


def fmt(d: dict, digits: int = 3) -> str:
    return f"{d['value']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def table(results: dict) -> str:
    rows = ["| condition | density | PSNR vs dense (dB) | SSIM vs dense | frame object acc | Δ vs dense (paired) "
            "| direction acc | clip correct |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        sim = (fmt(r["psnr"], 2), fmt(r["ssim"])) if "psnr" in r else ("—", "—")
        delta = fmt(r["delta_frame_accuracy"]) if "delta_frame_accuracy" in r else "—"
        rows.append(f"| {name} | {r['density']:.3f} | {sim[0]} | {sim[1]} | {fmt(r['frame_object_accuracy'])} "
                    f"| {delta} | {fmt(r['direction_accuracy'])} | {r['correct']['value']:.3f} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-wan", help="a testbed video model name or exported folder")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--suites", default="single,two")
    p.add_argument("--modes", default="rectified,vanilla,random")
    p.add_argument("--drops", default="0.5,0.75,0.9")
    p.add_argument("--conditions", default=None, help="mode:drop list run instead of --modes x --drops "
                                                       "(to split the conditions over processes)")
    p.add_argument("--report", default=None, help="comma list of --json files: print their rows as one table, run nothing")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dense-layers", type=int, default=None, help="leading layers kept dense (default: Wan's 2)")
    p.add_argument("--dense-steps", type=int, default=None, help="leading steps kept dense (default: Wan's 5)")
    p.add_argument("--p-remain", type=float, default=0.0, help="cumulative-mass floor (official 0.3; see above)")
    p.add_argument("--neighbours", action="store_true", help="add grid-neighbour blocks (official; see above)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write every row (and per-clip values) here")
    p.add_argument("--merge", default=None, help="an earlier --json whose rows to keep (the dense row is always "
                                                  "regenerated: it is the reference of the new rows)")
    args = p.parse_args(argv)
    if args.report:
        rows = {}
        for path in args.report.split(","):
            with open(path) as f:
                rows.update(json.load(f)["rows"])
        print(table({k: rows[k] for k in ["dense", *sorted(k for k in rows if k != "dense")]}))
        print("\n" + paired_table(rows))
        return
    if args.conditions:
        conditions = [(m, float(d)) for m, _, d in (c.partition(":") for c in args.conditions.split(","))]
    else:
        conditions = [(m, float(d)) for m in args.modes.split(",") for d in args.drops.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load(args.model)
    prompts = [q for s in args.suites.split(",") for q in video_suite_prompts(s)]
    pairs = [(prompts[i % len(prompts)], seed) for i, seed in enumerate(eval_seeds(args.clips))]
    results = {}
    if args.merge and os.path.exists(args.merge):
        with open(args.merge) as f:
            results = json.load(f)["rows"]
    t0 = time.time()
    dense, shares = run_condition(pipe, pairs, None, args.batch, args.steps)
    results["dense"] = summarise(dense, shares, None)
    print(f"dense: {time.time() - t0:.0f}s", flush=True)
    for mode, drop in conditions:
        t = time.time()
        control = da.RectifiedSparseAttention(drop, mode=mode, block_size=args.block_size,
                                              dense_layers=args.dense_layers, dense_steps=args.dense_steps,
                                              p_remain=args.p_remain, neighbours=args.neighbours)
        report, shares = run_condition(pipe, pairs, control, args.batch, args.steps)
        name = f"{mode} {drop:g}" + (f" p{args.p_remain:g}" if args.p_remain else "") + (" +nb" if args.neighbours else "")
        results[name] = summarise(report, shares, dense)
        print(f"{name}: {time.time() - t:.0f}s, density {results[name]['density']:.3f}", flush=True)
        if args.json:  # after every row: a stopped run keeps what it measured
            _write(args, results, pairs)
    if args.json:
        _write(args, results, pairs)
    print(table(results))
    print("\n" + paired_table(results))


def _write(args, results, pairs):
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"command": vars(args), "machine": f"{platform.node()} {os.cpu_count()} cpus torch {torch.__version__}",
                   "pairs": pairs, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
