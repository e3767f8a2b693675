"""The ``diffattn`` command.

    diffattn sites [--model M]                    list the attention sites of a model
    diffattn generate PROMPT --out result.png     generate (baseline | method side by side)
    diffattn eval [--suite two] [--seeds 64]      oracle metrics with confidence intervals
    diffattn headhunt --out preset.json           head search (SoftPAG presets)
    diffattn invert IMAGE --out result.png        DDIM inversion: source / empty / uniform maps
    diffattn edit IMAGE --source S --target T     prompt-to-prompt word swap, with UAM blending

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
    # fp32 is every loader's default; naming it only when it differs keeps clear of the
    # `torch_dtype` -> `dtype` rename across diffusers versions
    dtype_kwargs = {} if dtype == "float32" else {"torch_dtype": getattr(torch, dtype)}
    if name in testbed.MODELS or testbed.testbed_kind(name):
        return testbed.load(name, **dtype_kwargs).to(device)
    from pathlib import Path

    from diffusers import DiffusionPipeline

    absent = {}
    index = Path(name) / "model_index.json"
    if index.is_file():  # a local folder saved without some components (e.g. SD3 without T5)
        import json

        absent = {k: None for k, v in json.loads(index.read_text()).items() if v == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(name, **dtype_kwargs, **absent)
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
    import torch

    from .methods.headhunter import HeadHunter, distributed_state, make_objective
    from .testbed.evaluate import TRAIN_SEEDS, suite_prompts

    # one process, or one of several under `accelerate launch` / `torchrun` (candidates split
    # across processes, same result); each process on its own device unless --device is given
    state = distributed_state()
    pipe = load_model(args.model, args.dtype, args.device or state.device)
    objective = make_objective(args.objective, clip_model=args.clip_model, clip_processor=args.clip_processor,
                               template=args.clip_template, dtype=getattr(torch, args.dtype))
    prompts = args.prompt or suite_prompts(args.suite)
    kw = {} if args.steps is None else {"num_inference_steps": args.steps}
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    candidates = "all"
    if args.candidates is not None:
        from .sites import select

        candidates = [(s.name, h) for s in select(pipe, args.candidates) for h in range(s.heads)]
    hunt = HeadHunter(pipe, objective, prompts, list(TRAIN_SEEDS)[: args.seeds], top_k=args.top_k, rounds=args.rounds,
                      stop_without_gain=args.stop_without_gain, scale=args.scale, state_dir=args.state_dir,
                      semantics=args.semantics, candidates=candidates, batch_size=args.batch_size,
                      progress=state.is_main_process, **kw)
    result = hunt.run()
    if state.is_main_process:  # the others wait until the files are written
        result.save_preset(args.out, strength=args.strength)
        print(f"selected heads {result.selected}; preset written to {args.out}")
        if args.heatmap:
            result.save_heatmap(args.heatmap)
    state.wait_for_everyone()


def cmd_eval(args):
    from .testbed.evaluate import run_eval_cli

    run_eval_cli(args)


def cmd_invert(args):
    from .pipelines.uam import run_invert_cli

    run_invert_cli(args)


def cmd_edit(args):
    from .pipelines.uam import run_edit_cli

    run_edit_cli(args)


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

    p = sub.add_parser("headhunt", help="search the attention heads whose perturbation best serves an objective",
                       description="Greedy head search (HeadHunter). To split the candidates across processes, "
                                   "launch it as `accelerate launch --multi_gpu --num_processes N -m diffattn.cli "
                                   "headhunt ...` (one GPU each) or `torchrun --nproc_per_node N -m diffattn.cli "
                                   "headhunt ...` (GPUs or CPU processes: on one CPU machine `accelerate launch` "
                                   "starts a single process unless MPI is set up); the result equals a one-process run.")
    _add_model_arguments(p)
    p.set_defaults(device=None)  # default: the process's device (one GPU per process under accelerate/torchrun)
    p.add_argument("--objective", default="fidelity", choices=["fidelity", "dark", "outline", "clip", "pickscore"],
                   help="testbed oracle objective (prompt fidelity, or a style to push toward), or CLIPScore / PickScore "
                        "of a CLIP model (--clip-model)")
    p.add_argument("--clip-model", default=None,
                   help="CLIP model folder or hub id for --objective clip|pickscore, safetensors weights "
                        "(default: openai/clip-vit-large-patch14 | yuvalkirstain/PickScore_v1)")
    p.add_argument("--clip-processor", default=None, help="tokenizer/image processor source if not the model's")
    p.add_argument("--clip-template", default=None, help='text scored against the image, e.g. "A photo depicts {prompt}"')
    p.add_argument("--prompt", action="append", help="prompt to search on (repeatable; default: the --suite prompts)")
    p.add_argument("--suite", default="two")
    p.add_argument("--seeds", type=int, default=16, help="training seeds (prompt-seed pairs)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--stop-without-gain", action="store_true",
                   help="end the search at the first round whose best head does not improve the objective")
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--strength", type=float, default=1.0, help="u written into the preset")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale of the search's images (default: the model's; the paper searches without CFG: 0)")
    p.add_argument("--semantics", default="joint", choices=["joint", "image", "image-self"],
                   help="joint-attention semantics of the perturbation (SoftPAG)")
    p.add_argument("--candidates", default=None,
                   help="sites whose heads are candidates (a diffattn site selector, e.g. 'transformer_blocks.0-3'); "
                        "default: every self / joint / single-stream site")
    p.add_argument("--batch-size", type=int, default=16, help="images per denoiser batch while scoring")
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

    from .pipelines.uam import add_edit_arguments, add_invert_arguments

    p = sub.add_parser("invert", help="invert an image and reconstruct it with the source prompt, the empty prompt "
                                      "and uniform attention maps (UAM), side by side with PSNR")
    _add_model_arguments(p)
    p.set_defaults(model="tiny-sd")
    add_invert_arguments(p)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("edit", help="edit an image by a word swap (prompt-to-prompt), with and without UAM's "
                                    "mask-guided blending")
    _add_model_arguments(p)
    p.set_defaults(model="tiny-sd")
    add_edit_arguments(p)
    p.set_defaults(func=cmd_edit)
    return parser


def main(argv=None):
    """Run a command. Bad input (a :class:`~diffattn.errors.DiffattnError`) prints its message,
    which says what to fix, and exits with status 2 instead of a traceback."""
    from .errors import DiffattnError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DiffattnError as e:
        print(f"diffattn {args.command}: error: {e.args[0] if e.args else e}", file=sys.stderr)  # KeyError quotes str(e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
