"""IR-Diffusion's cost against vanilla generation, side by side in one run (issue 22).

    python benchmarks/ir_cost.py --model tiny-sd3 --repeat 3

Modes, each timed ``--repeat`` times in alternation (so a busy machine slows all alike) and
each run once more in a fresh subprocess for its peak resident memory (the rise of the reset
peak-RSS mark over the resident size before the run, after a warm-up call; Linux):

- ``vanilla``:  one stock call of the scene prompt (batch 1 × CFG);
- ``rehearsal``: the batch ``[ref_1, ref_2, scene] × CFG`` with the map recorder;
- ``final``:    the final IR run of that rehearsal (isolation + reposition + mutual);
- ``ir``:       rehearsal + final, what one IR scene costs (with its references).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

SCENE = "a red circle left of a blue square"
SUBJECTS = ["a striped red circle", "a dotted blue square"]
MODES = ("vanilla", "rehearsal", "final", "ir")


def build(model: str):
    from diffattn.pipelines import IRDiffusionPipeline
    from diffattn.testbed import load

    pipe = load(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, IRDiffusionPipeline(pipe)


def run_mode(pipe, ir, mode: str, rehearsal=None):
    words = ["circle", "square"]
    if mode == "vanilla":
        return pipe(SCENE, generator=torch.Generator().manual_seed(0), output_type="pt")
    if mode == "rehearsal":
        return ir.rehearse(SCENE, SUBJECTS, subject_words=words, progress=False)
    if mode == "final":
        return ir.final(rehearsal, output_type="pt")
    return ir.final(ir.rehearse(SCENE, SUBJECTS, subject_words=words, progress=False), output_type="pt")


def run_peak_mib(pipe, ir, mode: str, rehearsal=None) -> float:
    """How far one run of ``mode`` raises the resident memory above what it was before the run
    (``evaluate.peak_rss_rise_mib``: the peak-RSS mark reset first, so loading the model, whose
    transient copies can peak above any run, does not hide the run; a rise over ``ru_maxrss``
    read 0 MiB in session 16)."""
    from diffattn.testbed.evaluate import peak_rss_rise_mib

    return peak_rss_rise_mib(run_mode, pipe, ir, mode, rehearsal)[1]


def peak_rss_mib(model: str, mode: str, threads: int) -> float:
    """:func:`run_peak_mib` of ``mode`` in a fresh process, after loading the model (and, for
    ``final``, its rehearsal) and one warm-up vanilla call (first-call caches are not the method's)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import torch; torch.set_num_threads({threads}); "
            f"import ir_cost as c; pipe, ir = c.build({model!r}); c.run_mode(pipe, ir, 'vanilla'); "
            f"r = ir.rehearse(c.SCENE, c.SUBJECTS, subject_words=['circle', 'square'], progress=False) "
            f"if {mode!r} == 'final' else None; "
            f"print(c.run_peak_mib(pipe, ir, {mode!r}, r))")
    # run from benchmarks/: the repository root on sys.path would shadow the PyPI `kernels` package
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=here)
    if done.returncode:
        raise RuntimeError(f"the memory probe of {mode} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-sd3")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe, ir = build(args.model)
    rehearsal = run_mode(pipe, ir, "rehearsal")  # warm-up, and the final mode's input
    times = {m: [] for m in MODES}
    for _ in range(args.repeat):
        for m in MODES:
            t = time.perf_counter()
            run_mode(pipe, ir, m, rehearsal)
            times[m].append(time.perf_counter() - t)
    best = {m: min(v) for m, v in times.items()}
    memory = {m: peak_rss_mib(args.model, m, args.threads) for m in MODES}
    print(f"{args.model}, {args.threads} thread(s), best of {args.repeat}:")
    print(f"{'mode':10s} {'seconds':>8s} {'× vanilla':>10s} {'+peak MiB':>13s}")
    for m in MODES:
        print(f"{m:10s} {best[m]:8.2f} {best[m] / best['vanilla']:10.2f} {memory[m]:13.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds": times, "peak_rss_mib": memory}, f, indent=1)


if __name__ == "__main__":
    main()
