"""``diffattn eval``: a model on the testbed's prompt suites, oracle metrics with confidence intervals."""
from __future__ import annotations

import json

from .common import (
    GUIDANCE,
    JSON_EXTS,
    STEPS,
    add_limit_arguments,
    add_model_arguments,
    call_kwargs,
    check_call_args,
    check_distinct,
    check_model_args,
    check_output,
    int_arg,
    load_for,
)

MAX_SEEDS = 100_000  # evaluation seeds per suite

SUITE_NAMES = "single, two, relation, three, style"  # diffattn.testbed.evaluate.SUITES (not imported for --help)


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on the testbed prompt suites")
    add_model_arguments(p)
    p.add_argument("--suite", default="all", help=f"{SUITE_NAMES}, a comma list, or all (default)")
    p.add_argument("--seeds", type=int_arg(1, MAX_SEEDS, "--seeds (images per suite)"), default=64,
                   help="images per suite, one evaluation seed each (default 64)")
    p.add_argument("--steps", type=STEPS, default=None, help="denoising steps, >= 1 (default: the pipeline's)")
    p.add_argument("--guidance", type=GUIDANCE, default=None, help="CFG scale, >= 0 (default: the pipeline's)")
    p.add_argument("--batch-size", type=int_arg(1, 4096, "--batch-size"), default=16)
    p.add_argument("--out", default=None, help="write the full report (metrics and every image's score) as JSON")
    p.add_argument("--grid", default=None, help="write a grid PNG of the images (suffixed by the suite name when several)")
    p.add_argument("--grid-images", type=int_arg(1, None, "--grid-images"), default=None,
                   help="images per grid, in generation order (default 32; needs --grid)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_limit_arguments(p)
    p.set_defaults(func=run)


def run(args) -> dict:
    """Evaluate a model (default: the testbed's tiny-sd3) on suites, print a Markdown table per
    suite, optionally write JSON and image grids."""
    from ..errors import UsageError
    from ..testbed.evaluate import SUITES, check_suite, evaluate_suite

    names = list(SUITES) if args.suite.strip() == "all" else [n.strip() for n in args.suite.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--suite {args.suite!r} names no suite; choose from {', '.join(SUITES)} or all")
    for n in names:
        check_suite(n)
    if args.grid_images is not None and not args.grid:
        raise UsageError("--grid-images applies only with --grid (the grid PNG to write)")
    grid_images = 32 if args.grid_images is None else args.grid_images
    check_output(args.out, "--out", JSON_EXTS)
    grids = [_grid_path(args.grid, n, len(names)) for n in names] if args.grid else []
    for g in grids:
        check_output(g, "--grid")
    check_distinct(("--out", args.out), *(("--grid", g) for g in grids))
    check_call_args(args)
    check_model_args(args)
    pipe = load_for(args)
    kw = call_kwargs(args)
    reports = {}
    for name in names:
        report = evaluate_suite(pipe, name, args.seeds, batch_size=args.batch_size, progress=not args.no_progress,
                                return_images=bool(args.grid), **kw)
        print(report.to_markdown(name), flush=True)
        reports[name] = report
        if args.grid:
            captioned_grid(report, limit=grid_images).save(_grid_path(args.grid, name, len(names)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model or "tiny-sd3", **{n: r.as_dict() for n, r in reports.items()}}, f, indent=1)
    return reports


def _grid_path(grid: str, suite: str, n_suites: int) -> str:
    """The grid PNG of ``suite``: ``grid`` itself, or suffixed by the suite name when several."""
    if n_suites == 1:
        return grid
    stem, dot, ext = grid.rpartition(".")
    return f"{stem}-{suite}.{ext}" if dot else f"{grid}-{suite}.png"


def captioned_grid(report, limit: int | None = 32, ncols: int = 8, scale: int = 2):
    """The report's images in generation order, each with its prompt and the oracle's verdict
    (objects found / asked) written underneath."""
    import textwrap

    from PIL import Image, ImageDraw

    from ..testbed import oracle

    images = [oracle.to_pil(im) for im in report.images[:limit]]
    scores = report.scores[: len(images)]
    w, h = images[0].width * scale, images[0].height * scale
    chars = max(8, w // 6)  # PIL's default font: ~6 px a character
    captions = [textwrap.wrap(s.prompt, chars) + [f"found {sum(s.found)}/{s.requested}"] for s in scores]
    text_h = 11 * max(len(c) for c in captions) + 4
    cols = min(ncols, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, caption) in enumerate(zip(images, captions)):
        x, y = (i % cols) * w, (i // cols) * (h + text_h)
        grid.paste(im.resize((w, h), Image.NEAREST), (x, y))
        for j, line in enumerate(caption):
            last = j == len(caption) - 1
            draw.text((x + 2, y + h + 2 + 11 * j), line, fill="gray" if last else "black")
    return grid
