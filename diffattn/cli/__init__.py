"""The ``diffattn`` command.

    diffattn sites [--model M]                    list the attention sites of a model
    diffattn generate PROMPT --out result.png     generate (baseline | method side by side)
    diffattn eval [--suite two] [--seeds 64]      oracle metrics with confidence intervals
    diffattn headhunt --out preset.json           head search (SoftPAG presets)
    diffattn invert IMAGE --out result.png        DDIM inversion: source / empty / uniform maps
    diffattn edit IMAGE --source S --target T     prompt-to-prompt word swap, with UAM blending

With no ``--model`` every command uses the built-in testbed model (tiny-sd3, shipped in
``assets/``; ``invert`` and ``edit``: tiny-sd), so it runs offline on a fresh machine.
``--model`` also takes ``tiny-sd``, a local diffusers folder, or a Hugging Face model id.
"""
from __future__ import annotations

# One module per command, each with ``register(subparsers)`` adding its parser, its arguments
# and ``func``. Building the parser imports no torch: the commands import it when they run.
COMMANDS = ("sites", "generate", "headhunt", "eval", "invert", "edit")


def load_model(name: str | None, dtype: str = "float32", device: str = "cpu"):
    """A pipeline from a testbed name, a local folder or a hub id (:func:`diffattn.cli.common.load_model`)."""
    from .common import load_model as _load

    return _load(name, dtype, device)


def build_parser():
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog="diffattn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv=None):
    """Run a command. Bad input (a :class:`~diffattn.errors.DiffattnError`) prints its message,
    which says what to fix, and exits with status 2 instead of a traceback."""
    import sys

    from ..errors import DiffattnError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DiffattnError as e:
        print(f"diffattn {args.command}: error: {e.args[0] if e.args else e}", file=sys.stderr)  # KeyError quotes str(e)
        raise SystemExit(2) from None
