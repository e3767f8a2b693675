"""``diffattn eval``: a model on the testbed's prompt suites, oracle metrics with confidence intervals."""
from __future__ import annotations

import json

from .common import add_model_arguments, call_kwargs, load_model

SUITE_NAMES = "single, two, relation, three, style"  # diffattn.testbed.evaluate.SUITES (not imported for --help)


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on the testbed prompt suites")
    add_model_arguments(p)
    p.add_argument("--suite", default="all", help=f"{SUITE_NAMES}, a comma list, or all (default)")
    p.add_argument("--seeds", type=int, default=64, help="images per suite, one evaluation seed each (default 64)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the full report (metrics and every image's score) as JSON")
    p.add_argument("--grid", default=None, help="write a grid PNG of the images (suffixed by the suite name when several)")
    p.add_argument("--grid-images", type=int, default=32, help="images per grid, in generation order (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> dict:
    """Evaluate a model (default: the testbed's tiny-sd3) on suites, print a Markdown table per
    suite, optionally write JSON and image grids."""
    from ..testbed.evaluate import SUITES, check_suite, evaluate_suite

    pipe = load_model(args.model, args.dtype, args.device)
    kw = call_kwargs(args)
    names = list(SUITES) if args.suite == "all" else args.suite.split(",")
    for n in names:
        check_suite(n)
    reports = {}
    for name in names:
        report = evaluate_suite(pipe, name, args.seeds, batch_size=args.batch_size, progress=not args.no_progress,
                                return_images=bool(args.grid), **kw)
        print(report.to_markdown(name), flush=True)
        reports[name] = report
        if args.grid:
            path = args.grid
            if len(names) > 1:
                stem, dot, ext = args.grid.rpartition(".")
                path = f"{stem}-{name}.{ext}" if dot else f"{args.grid}-{name}.png"
            report.save_grid(path, limit=args.grid_images)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model or "tiny-sd3", **{n: r.as_dict() for n, r in reports.items()}}, f, indent=1)
    return reports
