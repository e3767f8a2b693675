"""A-STAR vs Attend-and-Excite vs baseline on the testbed (oracle metrics, 95% intervals).

    python benchmarks/astar_eval.py --models tiny-sd,tiny-sd3 --suites two,three --seeds 128 \
        --grids benchmarks/astar_grids

For every model and suite (two- and three-object prompts) it generates one image per
evaluation seed (``diffattn.testbed.evaluate.eval_seeds``; the same seeds for every row)
with: the baseline pipeline, Attend-and-Excite, A-STAR (segregation + retention), and the
two ablations (segregation only, retention only). Concepts are the shape nouns of each
caption (repeated shapes take their own occurrence). A-STAR and A&E use the testbed settings
``diffattn.testbed.defaults.TESTBED_OVERRIDES`` (tiny-sd3: softmax temperature 1000, tuned on
training seeds; tiny-sd: A&E's 100; ``--paper-defaults`` for A&E's 100 everywhere), otherwise their defaults. Prints a markdown table of the
all-objects-present rate and the object accuracy with Wilson 95% intervals (plus the
all-colours-present rate, a direct measure of neglected objects since the tiny models get
colours right far more often than shapes, the extra-object rate and seconds per image), writes the full reports as JSON (``--json``) and
sample grids (first 32 images per row, ``--grids``).

``--layout strips`` is a diagnostic, not a paper setting: every concept's retention target is
a fixed vertical strip of the image (concept k of C: the k-th of C equal strips) instead of its
own binarised previous map, i.e. layout guidance through the same latent updates. It asks
whether the updates can steer the model at all when the target is a clean, disjoint layout.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from diffattn import testbed
from diffattn.pipelines import AStarConfig, AStarPipeline
from diffattn.testbed.defaults import default_concepts, testbed_overrides
from diffattn.testbed.evaluate import TRAIN_SEEDS, eval_seeds, evaluate, paired_bootstrap, suite_prompts, wilson_interval
from diffattn.testbed.world import SIZE, parse_prompt


def phrase_concepts(prompt: str) -> list[str]:
    """Concepts as colour + shape phrases ("red circle"): the maps of both words, averaged."""
    return [f"{c} {s}" for c, s in parse_prompt(prompt).objects]


def colour_concepts(prompt: str) -> list[str]:
    """Concepts as the colour words, one per object: the testbed's commonest failure is colour
    leakage (both objects drawn in one prompt colour), not a missing object."""
    return [c for c, _ in parse_prompt(prompt).objects]


def distinguishing_concepts(prompt: str) -> list[str]:
    """Concepts as the words that tell the objects apart: the shape nouns when the shapes
    differ, else the colours ("a red circle and a green circle": "red", "green"); both
    (as phrases) when both differ. Two copies of one word give two identical maps, whose
    segregation has no direction to push."""
    objects = parse_prompt(prompt).objects
    colours_differ = len({c for c, _ in objects}) == len(objects)
    shapes_differ = len({s for _, s in objects}) == len(objects)
    if shapes_differ and colours_differ:
        return [f"{c} {s}" for c, s in objects]
    if shapes_differ:
        return [s for _, s in objects]
    if colours_differ:
        return [c for c, _ in objects]
    return [s for _, s in objects]


CONCEPTS = {"nouns": default_concepts, "phrases": phrase_concepts, "colours": colour_concepts,
            "distinguishing": distinguishing_concepts}


METHODS = {
    "baseline": None,
    "attend-and-excite": lambda kw: AStarConfig.attend_and_excite(**kw),
    "a-star": lambda kw: AStarConfig.astar(**kw),
    "segregation only": lambda kw: AStarConfig.segregation_only(**kw),
    "retention only": lambda kw: AStarConfig.retention_only(**kw),
}


def strip_layout(n_concepts: int, size: int = 64) -> torch.Tensor:
    """[C, size, size] masks: concept k owns the k-th of C equal vertical strips."""
    masks = torch.zeros(n_concepts, size, size)
    edges = [round(k * size / n_concepts) for k in range(n_concepts + 1)]
    for k in range(n_concepts):
        masks[k, :, edges[k]:edges[k + 1]] = 1.0
    return masks


def strip_rate(scores) -> tuple[float, int]:
    """(share of images whose requested objects all sit in their own strips, images counted):
    over the images where every requested object is found (colour and shape), object k's
    centre must lie in the k-th of C equal vertical strips (:func:`strip_layout`)."""
    hits = counted = 0
    for sc in scores:
        if not sc.all_present:
            continue
        counted += 1
        n = len(sc.matched)
        centres = [sc.parsed.objects[j].cx for j in sc.matched]
        hits += all(k * SIZE / n <= cx < (k + 1) * SIZE / n for k, cx in enumerate(centres))
    return (hits / counted if counted else float("nan")), counted


def runner(pipe, method: str, args):
    """The callable ``evaluate`` drives: the pipeline itself, or an AStarPipeline."""
    make = METHODS[method]
    if make is None:
        return pipe
    kw = {} if args.paper_defaults else dict(testbed_overrides(pipe))
    if args.scale_factor is not None:
        kw["scale_factor"] = args.scale_factor
    if args.max_iter is not None:
        kw["max_iter_to_alter"] = args.max_iter
    for item in args.set or []:
        key, _, value = item.partition("=")
        kw[key] = json.loads(value) if value and value[:1] in "[{0123456789-" or value in ("true", "false", "null") else value
        if key == "refine" and isinstance(kw[key], dict):  # JSON keys are strings: "0" a step, "0.2" a fraction
            kw[key] = {(float(k) if "." in k else int(k)): v for k, v in kw[key].items()}
    astar = AStarPipeline(pipe, make(kw))
    concepts = CONCEPTS[args.concepts]

    def run(prompt, generator, **call_kwargs):
        if args.layout == "strips":  # one [C, H, W] target per prompt of the batch
            batch = [prompt] if isinstance(prompt, str) else prompt
            call_kwargs["layout_masks"] = [strip_layout(len(concepts(p))) for p in batch]
        return astar(prompt, concepts, generator=generator, **call_kwargs)

    return run


def paired_rows(reports: dict) -> list[str]:
    """Markdown rows: each method minus the baseline on the same images (paired bootstrap)."""
    out = ["", "| model | suite | method − baseline | all present [paired 95% CI] | all colours present [paired 95% CI] |",
           "|---|---|---|---|---|"]
    for (model, suite, method), report in reports.items():
        base = reports.get((model, suite, "baseline"))
        if method == "baseline" or base is None:
            continue
        cells = []
        for per_image in (lambda r: [float(s.all_present) for s in r.scores],
                          lambda r: [float(all(s.color_found)) for s in r.scores]):
            d, lo, hi = paired_bootstrap(per_image(report), per_image(base))
            cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        out.append(f"| {model} | {suite} | {method} | {cells[0]} | {cells[1]} |")
    return out


def _ci(m) -> str:
    return f"{m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-sd,tiny-sd3")
    p.add_argument("--suites", default="two,three")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    p.add_argument("--seeds", type=int, default=128, help="evaluation seeds (images) per suite and method")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tune", action="store_true", help="use training seeds (for choosing settings), not evaluation seeds")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's; A&E / A-STAR: 7.5)")
    p.add_argument("--scale-factor", type=float, default=None, help="A-STAR / A&E step size (default 20)")
    p.add_argument("--max-iter", type=float, default=None, help="update window: steps (>= 1) or fraction of the run")
    p.add_argument("--concepts", default="nouns", choices=list(CONCEPTS))
    p.add_argument("--layout", default=None, choices=["strips"],
                   help="retention targets: fixed vertical strips, one per concept (diagnostic; needs retention)")
    p.add_argument("--paper-defaults", action="store_true",
                   help="use A&E's temperature 100 on every model (TESTBED_OVERRIDES sets 1000 on tiny-sd3)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="AStarConfig field for every A-STAR / A&E row, e.g. --set temperature=1000 (JSON values)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write every report here")
    p.add_argument("--grids", default=None, help="folder for sample grids")
    args = p.parse_args(argv)
    if args.max_iter is not None and args.max_iter >= 1:
        args.max_iter = int(args.max_iter)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    no_retention = [m for m in methods if args.layout and m in ("attend-and-excite", "segregation only")]
    if no_retention:
        raise SystemExit(f"--layout gives retention targets; {no_retention} have no retention loss: pass --methods "
                         f"from baseline, a-star, retention only")
    if args.grids:
        os.makedirs(args.grids, exist_ok=True)
    call = {} if args.steps is None else {"num_inference_steps": args.steps}
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    seeds = list(TRAIN_SEEDS[: args.seeds]) if args.tune else eval_seeds(args.seeds)
    full: dict = {}
    reports: dict = {}
    rows = ["| model | suite | method | all objects present [95% CI] | object accuracy [95% CI] | all colours present [95% CI] "
            "| extra-object rate | s / image |" + (" objects in their strips |" if args.layout else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|" if args.layout else "")]
    print("\n".join(rows), flush=True)
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        pipe = testbed.load(model)
        for suite in [s.strip() for s in args.suites.split(",") if s.strip()]:
            prompts = suite_prompts(suite)
            for method in methods:
                t0 = time.perf_counter()
                report = evaluate(runner(pipe, method, args), prompts, seeds, batch_size=args.batch_size,
                                  progress=False, return_images=bool(args.grids), **call)
                per_image = (time.perf_counter() - t0) / len(seeds)
                m = report.metrics()
                colours = sum(all(sc.color_found) for sc in report.scores)  # no requested colour missing: neglect
                col = (colours / len(report.scores), *wilson_interval(colours, len(report.scores)))
                line = (f"| {model} | {suite} | {method} | {_ci(m['all_present'])} | {_ci(m['object_accuracy'])} | "
                        f"{_ci(col)} | {m['extra_object_rate'][0]:.3f} | {per_image:.2f} |")
                if args.layout:  # does the layout take? the same measure for every row, baseline included
                    rate, counted = strip_rate(report.scores)
                    line += f" {rate:.3f} of {counted} |"
                rows.append(line)
                print(line, flush=True)
                full.setdefault(model, {}).setdefault(suite, {})[method] = dict(report.as_dict(), seconds_per_image=per_image)
                reports[(model, suite, method)] = report
                if args.grids:
                    report.images = report.images[:32]
                    report.save_grid(os.path.join(args.grids, f"{model}-{suite}-{method.replace(' ', '_')}.png"))
    paired = paired_rows(reports)
    print("\n".join(paired), flush=True)
    rows += paired
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": full}, f, indent=1)
    return "\n".join(rows)


if __name__ == "__main__":
    main()
