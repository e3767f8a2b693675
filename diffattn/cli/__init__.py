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
COMMANDS = ("sites", "generate", "headhunt", "eval", "invert", "edit", "app", "run", "protect", "try_edit", "train_vmix")


def load_model(name: str | None, dtype: str = "float32", device: str = "cpu"):
    """A pipeline from a testbed name, a local folder or a hub id (:func:`diffattn.cli.common.load_model`)."""
    from .common import load_model as _load

    return _load(name, dtype, device)


def _parser_class():
    import argparse

    class Parser(argparse.ArgumentParser):
        """A parser whose errors are one line naming the flag and the fix (exit status 2)."""

        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    return Parser


EXIT_STATUSES = """exit statuses:
  0  done
  1  an internal error (a bug: the traceback is shown; please report it)
  2  bad input: an argument, a file or a model that cannot be used (one line says what to fix; --debug
     shows the traceback)
  130  interrupted (Ctrl-C)"""


def build_parser():
    import argparse
    import importlib

    cls = _parser_class()
    parser = cls(prog="diffattn", description=__doc__, epilog=EXIT_STATUSES,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback (also after "
                                                              "the command: diffattn generate ... --debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cls)
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def _quiet_libraries() -> None:
    """No advisory warnings of transformers / diffusers on every command (the torchvision notice,
    the loading bars); their errors still show."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _QuietLoading:
    """While a command runs: no loading bars or info / warning logs of diffusers and transformers
    (restored afterwards, for callers of :func:`main` in a longer process). Imports them only
    when a command runs, never for ``--help``."""

    def __enter__(self):
        self.saved = []
        for name in ("diffusers", "transformers"):
            try:
                log = __import__(f"{name}.utils.logging", fromlist=["logging"])
            except Exception:  # not installed / failed: nothing to quiet
                continue
            self.saved.append((log, log.get_verbosity(), log.is_progress_bar_enabled()))
            # diffusers logs a load failure at error level before raising it: the command reports it once
            log.set_verbosity(50 if name == "diffusers" else 40)  # CRITICAL / ERROR
            log.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        for log, verbosity, bars in self.saved:
            log.set_verbosity(verbosity)
            if bars:
                log.enable_progress_bar()
        return False


def main(argv=None):
    """Run a command. Bad input (a :class:`~diffattn.errors.DiffattnError`) prints its message,
    which says what to fix, on one line and exits with status 2 instead of a traceback
    (``--debug``: the traceback)."""
    import sys

    from ..errors import DiffattnError

    from_python = argv is not None  # the console script does sys.exit(main()): a result would be printed
    argv = list(sys.argv[1:] if argv is None else argv)
    head = argv[: argv.index("--")] if "--" in argv else argv
    debug = "--debug" in head
    if debug:  # accepted anywhere before `--`, so it can be added at the end of a command line
        i = argv.index("--debug")
        argv = argv[:i] + argv[i + 1:]
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        with _QuietLoading():
            result = args.func(args)
        return result if from_python else None
    except DiffattnError as e:
        if debug:
            raise
        text = " ".join(str(e.args[0] if e.args else e).split())  # KeyError quotes str(e); one line
        print(f"diffattn {args.command}: error: {text}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"diffattn {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if debug or not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"):  # torch's OOM
            raise
        print(f"diffattn {args.command}: error: out of memory; lower --size, --batch-size or the image size "
              f"(--debug shows where)", file=sys.stderr)
        raise SystemExit(1) from None
