"""The ``diffattn`` command.

    diffattn sites [--model M]                    list the attention sites of a model
    diffattn generate PROMPT --out result.png     generate (baseline | method side by side)
    diffattn eval [--suite two] [--seeds 64]      oracle metrics with confidence intervals
    diffattn headhunt --out preset.json           head search (SoftPAG presets)

With no ``--model`` every command uses the built-in testbed model (tiny-sd3, shipped in
``assets/``), so it runs offline on a fresh machine. ``--model`` also takes ``tiny-sd``, a
local diffusers folder, or a Hugging Face model id.
"""
from __future__ import annotations

import argparse
import sys


def load_model(name: str | None, dtype: str = "float32", device: str = "cpu"):
    """A pipeline from a testbed name, a local folder or a hub id."""
    import torch

    from . import testbed

    name = name or testbed.DEFAULT_MODEL
    if name in testbed.MODELS:
        pipe = testbed.load(name)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(name, torch_dtype=getattr(torch, dtype))
    return pipe.to(device)


def _add_model_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help="tiny-sd3 (default), tiny-sd, a diffusers folder or a hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def cmd_sites(args):
    from .sites import format_sites, sites

    pipe = load_model(args.model, args.dtype, args.device)
    print(format_sites(sites(pipe)))


def cmd_generate(args):
    from .generate import run_generate

    run_generate(args)


def cmd_headhunt(args):
    from .methods.headhunter import HeadHunter, oracle_fidelity, oracle_style
    from .testbed.evaluate import TRAIN_SEEDS, suite_prompts

    pipe = load_model(args.model, args.dtype, args.device)
    objective = oracle_fidelity if args.objective == "fidelity" else oracle_style(args.objective)
    prompts = args.prompt or suite_prompts(args.suite)
    kw = {} if args.steps is None else {"num_inference_steps": args.steps}
    hunt = HeadHunter(pipe, objective, prompts, list(TRAIN_SEEDS)[: args.seeds], top_k=args.top_k, rounds=args.rounds,
                      scale=args.scale, state_dir=args.state_dir, **kw)
    result = hunt.run()
    result.save_preset(args.out, strength=args.strength)
    print(f"selected heads {result.selected}; preset written to {args.out}")
    if args.heatmap:
        result.save_heatmap(args.heatmap)


def cmd_eval(args):
    from .testbed.evaluate import run_eval_cli

    run_eval_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffattn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sites", help="list the attention sites of a model")
    _add_model_arguments(p)
    p.set_defaults(func=cmd_sites)

    p = sub.add_parser("generate", help="generate an image, optionally with a method beside the baseline")
    _add_model_arguments(p)
    from .generate import add_generate_arguments

    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("headhunt", help="search the attention heads whose perturbation best serves an objective")
    _add_model_arguments(p)
    p.add_argument("--objective", default="fidelity", choices=["fidelity", "dark", "outline"],
                   help="testbed oracle objective: prompt fidelity, or a style to push toward")
    p.add_argument("--prompt", action="append", help="prompt to search on (repeatable; default: the --suite prompts)")
    p.add_argument("--suite", default="two")
    p.add_argument("--seeds", type=int, default=16, help="training seeds (prompt-seed pairs)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--strength", type=float, default=1.0, help="u written into the preset")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--state-dir", default=None, help="cache and resume the search here")
    p.add_argument("--out", default="preset.json")
    p.add_argument("--heatmap", default=None, help="PNG of per-head scores (layers x heads)")
    p.set_defaults(func=cmd_headhunt)

    p = sub.add_parser("eval", help="evaluate a model on the testbed prompt suites")
    _add_model_arguments(p)
    try:
        from .testbed.evaluate import add_eval_arguments
    except ImportError:  # harness not installed in this build
        add_eval_arguments = None
    if add_eval_arguments is not None:
        add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
