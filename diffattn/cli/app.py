"""``diffattn app``: the Gradio app (``diffattn.app``), every method in one web UI."""
from __future__ import annotations


def register(subparsers) -> None:
    from ..app.launcher import add_arguments

    p = subparsers.add_parser("app", help="serve the Gradio app (every method in one web UI) on 127.0.0.1")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args):
    from ..app.launcher import serve

    return serve(args)
