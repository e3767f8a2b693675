"""``diffattn sites``: list the attention sites of a model."""
from __future__ import annotations

from .common import add_model_arguments, load_model


def register(subparsers) -> None:
    p = subparsers.add_parser("sites", help="list the attention sites of a model")
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args):
    from ..sites import format_sites, sites

    pipe = load_model(args.model, args.dtype, args.device)
    print(format_sites(sites(pipe)))
