"""``diffattn sites``: list the attention sites of a model."""
from __future__ import annotations

from .common import add_model_arguments, check_model_args, load_for


def register(subparsers) -> None:
    p = subparsers.add_parser("sites", help="list the attention sites of a model")
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args):
    from ..sites import format_sites, sites

    check_model_args(args)
    pipe = load_for(args)
    print(format_sites(sites(pipe)))
