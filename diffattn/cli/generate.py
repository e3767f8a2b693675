"""``diffattn generate``: one prompt, the baseline and (optionally) a method side by side.

The methods and their flags come from the method registry (:mod:`diffattn.methods.registry`):
each method's parameters become flags of their own group (``--heads`` of softpag,
``--concepts`` of astar...); a flag given for another method than ``--method`` is an error
naming the method it belongs to. On the testbed models the testbed's defaults
(:func:`diffattn.testbed.defaults.method_defaults`: A-STAR's concepts from the caption, its
temperature) fill in what is not given.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from .common import (
    COLORBAR_WIDTH,
    GUIDANCE,
    SEED,
    int_arg,
    SIZE,
    STEPS,
    add_limit_arguments,
    add_model_arguments,
    call_kwargs,
    check_call_args,
    check_model_args,
    check_output,
    check_size_for,
    check_text,
    compose,
    load_for,
    maps_row,
    nonempty,
    side_by_side,
)

_DEST = "method_param__"  # namespace prefix of the method flags' dests
_HELP_EXTRA = {("softpag", "heads"): "; or a site selector, optionally :HEADS (transformer_blocks.2-3, m0, "
                                     "transformer_blocks.2:0,3)"}


def _flag_type(param, method: str):
    """The argparse type of a method flag: the value converted and checked against the
    parameter's choices and range (and finite, for numbers) while the command line is read."""

    def parse(text):
        import math

        from ..errors import DiffattnError

        value = text
        if param.type is float:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
            if not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"{text!r} is not finite: give a finite number")
        elif param.type is str and not text.strip():
            raise argparse.ArgumentTypeError("the value is empty")
        try:
            return param.check(value, method)
        except DiffattnError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = param.type.__name__
    return parse


def add_method_arguments(p: argparse.ArgumentParser) -> dict[str, list[tuple[str, str]]]:
    """One flag per method parameter, grouped per method, none with a default (a flag not
    given is absent from the namespace). Returns ``{dest: [(method, param name), ...]}``
    (methods sharing a flag list it once)."""
    from ..methods.registry import methods

    owners: dict[str, list[tuple[str, str]]] = {}
    for m in methods():
        group = None
        for param in m.params:
            dest = _DEST + param.cli_flag.lstrip("-").replace("-", "_")
            if dest not in owners:
                group = group or p.add_argument_group(f"--method {m.name} ({m.label})", m.summary)
                one = _flag_type(replace(param, repeated=False), m.name)
                group.add_argument(param.cli_flag, dest=dest, type=one, default=argparse.SUPPRESS,
                                   action="append" if param.repeated else "store",
                                   metavar=None if param.choices else param.name.upper(),
                                   choices=list(param.choices) if param.choices else None,
                                   help=param.help + _HELP_EXTRA.get((m.name, param.name), "")
                                   + (f" (default {param.default})" if param.default is not None else ""))
                owners[dest] = []
            owners[dest].append((m.name, param.name))
    return owners


def register(subparsers) -> None:
    from ..methods.registry import methods

    names = ", ".join(m.name for m in methods())
    p = subparsers.add_parser("generate", help="generate an image, optionally with a method beside the baseline")
    add_model_arguments(p)
    p.add_argument("prompt", type=nonempty("the prompt"))
    p.add_argument("--out", default="result.png", help="image to write (.png, .jpg, .webp...)")
    p.add_argument("--method", default="none", help=f"none (baseline only) or a method: {names}")
    p.add_argument("--seed", type=SEED, default=0, help="random seed, 0 to 2**64 - 1 (default 0)")
    p.add_argument("--steps", type=STEPS, default=None, help="denoising steps, >= 1 (default: the model's)")
    p.add_argument("--guidance", type=GUIDANCE, default=None, help="CFG scale, >= 0 (default: the model's)")
    p.add_argument("--size", type=SIZE, default=None,
                   help="height = width in pixels, a multiple of the model's unit (tiny-sd3: 8; default: the model's)")
    p.add_argument("--num-images", type=NUM_IMAGES, default=1, metavar="B",
                   help=f"images per run, 1 to {MAX_IMAGES}: one batch of B from the seed (the pipeline's "
                        f"num_images_per_prompt), written as a grid, a row per run; contextual repulsion acts "
                        f"within this batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_limit_arguments(p)
    p.set_defaults(func=run, method_flags=add_method_arguments(p))


MAX_IMAGES = 16  # a grid row stays viewable; more is a job for the eval harness
NUM_IMAGES = int_arg(1, MAX_IMAGES, f"the number of images (1 to {MAX_IMAGES})")


def method_params(args) -> dict:
    """The method parameters given on the command line, ``{name: value}`` for ``args.method``.
    A flag of another method (or any method flag with ``--method none``) is a
    :class:`~diffattn.errors.MethodError` naming the method(s) it belongs to."""
    from ..errors import MethodError
    from ..methods.registry import get_method

    given = {dest: v for dest, v in vars(args).items() if dest.startswith(_DEST)}
    method = None if args.method == "none" else get_method(args.method)
    params = {}
    for dest, value in given.items():
        owners = args.method_flags[dest]
        flag = "--" + dest[len(_DEST):].replace("_", "-")
        mine = [name for m, name in owners if method is not None and m == method.name]
        if not mine:
            whose = " / ".join(f"--method {m}" for m, _ in owners)
            now = "no method (--method none)" if method is None else f"--method {method.name}"
            raise MethodError(f"{flag} is an option of {whose}, not of {now}; leave it out or pick that method")
        params[mine[0]] = value
    return params


def heads_flag(pipe, heads):
    """``--heads``: ``mid``, ``all``, a preset JSON, or a site selector (the README's grammar:
    ``transformer_blocks.2-4``, ``m0``, ``joint``...) optionally followed by ``:HEADS``
    (``transformer_blocks.2:0,3``) -> the SoftPAG ``heads`` argument."""
    from ..errors import SelectorError
    from ..methods.softpag import PERTURBABLE_KINDS
    from ..sites import select

    if not isinstance(heads, str) or heads in ("mid", "all") or heads.lower().endswith(".json"):
        return heads
    selector, _, which = heads.partition(":")
    chosen = select(pipe, selector.strip())  # SelectorError lists the sites when nothing matches
    usable = [s for s in chosen if s.kind in PERTURBABLE_KINDS]
    if not usable:
        kinds = sorted({s.kind for s in chosen})
        raise SelectorError(f"--heads {heads!r} selects only {'/'.join(kinds)} attention; SoftPAG perturbs self, joint "
                            f"or single-stream attention (e.g. --heads self, or a site of `diffattn sites`)")
    from ..sites import select_heads

    which = which.strip() or "all"
    for s in usable:
        select_heads(s, which)  # a head that does not exist: SelectorError with the valid range
    return {s.name: which for s in usable}


def precheck_params(method, params: dict) -> None:
    """What can be checked of the method's parameters before the model loads (a preset file)."""
    heads = params.get("heads")
    if method is not None and method.name == "softpag" and isinstance(heads, str) and heads.lower().endswith(".json"):
        from .common import check_input_file

        check_input_file(heads, "--heads")
        from ..methods.softpag import load_preset

        load_preset(heads)  # ControlError: not JSON, not a preset, no heads


def run(args):
    import torch

    from ..errors import UsageError
    from ..methods.registry import get_method, methods, split_concepts
    from ..testbed.defaults import method_defaults

    # everything that can be checked is checked before the model loads
    params = method_params(args)  # a flag of another method, an unknown method
    method = None if args.method == "none" else get_method(args.method)
    check_output(args.out, "--out")
    check_call_args(args)
    precheck_params(method, params)
    check_model_args(args)
    if args.num_images > 1 and method is not None and method.kind != "control":
        raise UsageError(f"--num-images {args.num_images}: --method {method.name} runs its own sampling loop on one "
                         f"image at a time; use --num-images 1, or a control method "
                         f"({', '.join(m.name for m in methods() if m.kind == 'control')})")
    pipe = load_for(args)
    # ... and what needs the model before anything is generated
    check_size_for(pipe, args)
    check_text(pipe, args.prompt, "the prompt")
    if "heads" in params:
        params["heads"] = heads_flag(pipe, params["heads"])
    if method is not None and method.name == "astar" and params.get("concepts"):
        for word in split_concepts(params["concepts"]):
            check_text(pipe, word, "the concept")
    kw = call_kwargs(args)
    if args.num_images > 1:
        kw["num_images_per_prompt"] = args.num_images
    built = None
    if method is not None:
        built = method.build(pipe, **{**method_defaults(method.name, pipe), **params})
        built.check(args.prompt)  # the method's input is checked before any image is made
        if built.control is not None:  # its sites / heads / preset model resolve on this model, before any image
            from ..engine import attach

            with attach(pipe, built.control):
                pass
    pipe.set_progress_bar_config(disable=args.no_progress, leave=False, desc="baseline")
    images = pipe(args.prompt, generator=torch.Generator(args.device).manual_seed(args.seed), **kw).images
    labels, rows = ["baseline"], []
    if built is not None:
        pipe.set_progress_bar_config(disable=args.no_progress, leave=False, desc=built.label)
        out = built(args.prompt, generator=torch.Generator(args.device).manual_seed(args.seed), **kw)
        if out.info.get("own_baseline"):  # e.g. IR-Diffusion: references | its vanilla scene (same noise) | result
            images, labels = list(out.images), list(out.info["labels"])
        else:
            images += out.images
            labels.append(built.label)
        if out.maps:  # e.g. A-STAR's concept maps, under the method's image
            size = out.images[0].width * (4 if out.images[0].width <= 128 else 1)
            fit = (size * len(images) - COLORBAR_WIDTH) // len(out.maps[0])  # maps + colour bar within the panels
            rows = [(f"{built.label} maps", maps_row(out.maps[0], max(32, min(size, fit))))]
    if args.num_images > 1:  # a row of B per run, the run's label on its first image
        per_run = [images[i : i + args.num_images] for i in range(0, len(images), args.num_images)]
        grid = [side_by_side(run_images, [label] + [""] * (len(run_images) - 1))
                for run_images, label in zip(per_run, labels)]
        result = compose(grid[0], [(label, row) for label, row in zip(labels[1:], grid[1:])])
    else:
        result = side_by_side(images, labels) if len(images) > 1 else images[0]
    if rows:
        result = compose(result, rows)
    result.save(args.out)
    print(f"wrote {args.out} ({' | '.join(labels)})")
