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

from .common import add_model_arguments, call_kwargs, compose, load_model, maps_row, side_by_side

_DEST = "method_param__"  # namespace prefix of the method flags' dests


def _flag_type(param):
    if param.type is bool:
        return lambda s: param.check(s)
    return param.type


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
                group.add_argument(param.cli_flag, dest=dest, type=_flag_type(param), default=argparse.SUPPRESS,
                                   metavar=None if param.choices else param.name.upper(),
                                   choices=list(param.choices) if param.choices else None,
                                   help=param.help + (f" (default {param.default})" if param.default is not None else ""))
                owners[dest] = []
            owners[dest].append((m.name, param.name))
    return owners


def register(subparsers) -> None:
    from ..methods.registry import methods

    names = ", ".join(m.name for m in methods())
    p = subparsers.add_parser("generate", help="generate an image, optionally with a method beside the baseline")
    add_model_arguments(p)
    p.add_argument("prompt")
    p.add_argument("--out", default="result.png", help="PNG to write")
    p.add_argument("--method", default="none", help=f"none (baseline only) or a method: {names}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--size", type=int, default=None, help="height = width in pixels (default: the model's)")
    p.set_defaults(func=run, method_flags=add_method_arguments(p))


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


def run(args):
    import torch

    from ..methods.registry import get_method
    from ..testbed.defaults import method_defaults

    params = method_params(args)  # checks the flags before the model is loaded
    method = None if args.method == "none" else get_method(args.method)
    pipe = load_model(args.model, args.dtype, args.device)
    kw = call_kwargs(args)
    built = None
    if method is not None:
        built = method.build(pipe, **{**method_defaults(method.name, pipe), **params})
        built.check(args.prompt)  # the method's input is checked before any image is made
    images = pipe(args.prompt, generator=torch.Generator(args.device).manual_seed(args.seed), **kw).images
    labels, rows = ["baseline"], []
    if built is not None:
        out = built(args.prompt, generator=torch.Generator(args.device).manual_seed(args.seed), **kw)
        images += out.images
        labels.append(built.label)
        if out.maps:  # e.g. A-STAR's concept maps, under the method's image
            size = out.images[0].width * (4 if out.images[0].width <= 128 else 1)
            rows = [(f"{built.label} maps", maps_row(out.maps[0], size))]
    result = side_by_side(images, labels) if len(images) > 1 else images[0]
    if rows:
        result = compose(result, rows)
    result.save(args.out)
    print(f"wrote {args.out} ({' | '.join(labels)})")
