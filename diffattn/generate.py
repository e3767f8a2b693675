"""``diffattn generate``: one prompt, the baseline and (optionally) a method side by side.

Methods register a builder in ``METHODS``: ``builder(pipe, args) -> (label, run)`` where
``run(generator)`` returns a list of PIL images to place beside the baseline (a method may
add rows underneath, e.g. attention maps).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from PIL import Image, ImageDraw

METHODS: dict[str, Callable] = {}


def _builtin_methods() -> dict[str, Callable]:
    from .methods.softpag import _generate_builder as softpag
    from .pipelines.astar import generate_builder as astar

    return {"softpag": softpag, "astar": astar}


def register_method(name: str):
    def deco(fn):
        METHODS[name] = fn
        return fn

    return deco


def add_generate_arguments(p: argparse.ArgumentParser):
    p.add_argument("prompt")
    p.add_argument("--out", default="result.png", help="PNG to write")
    p.add_argument("--method", default="none", help="none (baseline only) or a method name, e.g. softpag, astar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--size", type=int, default=None, help="height = width in pixels (default: the model's)")
    p.add_argument("--scale", type=float, default=None, help="method guidance scale (softpag; default 2, or the preset's)")
    p.add_argument("--strength", type=float, default=None,
                   help="method strength u (softpag; default 1, or the preset's per-head u)")
    p.add_argument("--heads", default="mid", help="softpag heads: mid (the middle layer), all, or a preset JSON")
    p.add_argument("--concepts", default=None, help="comma-separated concept words (astar)")
    p.add_argument("--astar-loss", default="astar", choices=["astar", "ae", "segregation", "retention"],
                   help="astar: A-STAR (segregation + retention); ae: Attend-and-Excite; or one A-STAR loss alone")


def call_kwargs(args) -> dict:
    kw = {}
    if args.steps is not None:
        kw["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    if args.size is not None:
        kw["height"] = kw["width"] = args.size
    return kw


def side_by_side(images: list[Image.Image], labels: list[str], scale: int = 4) -> Image.Image:
    """Images in a row, upscaled (nearest) so a 64x64 testbed image is readable, labelled."""
    w, h = images[0].size
    f = max(1, scale if w <= 128 else 1)
    label_h = 14
    canvas = Image.new("RGB", (w * f * len(images), h * f + label_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (im, label) in enumerate(zip(images, labels)):
        canvas.paste(im.resize((w * f, h * f), Image.NEAREST), (i * w * f, label_h))
        draw.text((i * w * f + 3, 1), label, fill="black")
    return canvas


def run_generate(args):
    from .cli import load_model

    pipe = load_model(args.model, args.dtype, args.device)
    kw = call_kwargs(args)

    def baseline():
        return pipe(args.prompt, generator=torch.Generator(args.device).manual_seed(args.seed), **kw).images

    method = None
    if args.method != "none":
        methods = {**_builtin_methods(), **METHODS}
        if args.method not in methods:
            raise SystemExit(f"unknown method {args.method!r}; available: none, {', '.join(sorted(methods))}")
        method = methods[args.method](pipe, args)  # checks the method's input before any image is made
    images, labels = baseline(), ["baseline"]
    rows = []
    if method is not None:
        label, run = method
        images += run(torch.Generator(args.device).manual_seed(args.seed), kw)
        labels.append(label)
        rows = getattr(run, "rows", [])
    result = side_by_side(images, labels) if len(images) > 1 else images[0]
    if rows:  # e.g. A-STAR's concept maps under the images
        from .pipelines.astar import compose

        result = compose(result, rows)
    result.save(args.out)
    print(f"wrote {args.out} ({' | '.join(labels)})")
