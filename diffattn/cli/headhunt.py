"""``diffattn headhunt``: HeadHunter's greedy head search, written as a SoftPAG preset."""
from __future__ import annotations

from .common import (
    FRACTION,
    GUIDANCE,
    JSON_EXTS,
    STEPS,
    add_limit_arguments,
    add_model_arguments,
    check_call_args,
    check_distinct,
    check_model_args,
    check_output,
    float_arg,
    int_arg,
    load_for,
    nonempty,
)

MAX_SEEDS = 100_000  # diffattn.testbed.evaluate.TRAIN_SEEDS
CLIP_OBJECTIVES = ("clip", "pickscore")  # the objectives that take --clip-model / --clip-processor / --clip-template
ORACLE_OBJECTIVES = ("fidelity", "dark", "outline")  # scored by the testbed oracle: prompts of the shapes world

DESCRIPTION = ("Greedy head search (HeadHunter). To split the candidates across processes, launch it as "
               "`accelerate launch --multi_gpu --num_processes N -m diffattn.cli headhunt ...` (one GPU each) or "
               "`torchrun --nproc_per_node N -m diffattn.cli headhunt ...` (GPUs or CPU processes: on one CPU machine "
               "`accelerate launch` starts a single process unless MPI is set up); the result equals a one-process run.")


def register(subparsers) -> None:
    from .. import testbed  # noqa: F401  (registers the testbed's oracle objectives: fidelity, dark, outline)
    from ..methods.objectives import objective_help, objective_names

    p = subparsers.add_parser("headhunt", help="search the attention heads whose perturbation best serves an objective",
                              description=DESCRIPTION)
    add_model_arguments(p)
    p.set_defaults(device=None)  # default: the process's device (one GPU per process under accelerate/torchrun)
    p.add_argument("--objective", default="fidelity", choices=list(objective_names()),
                   help="; ".join(f"{n}: {objective_help(n)}" if objective_help(n) else n for n in objective_names()))
    p.add_argument("--clip-model", default=None,
                   help="CLIP model folder or hub id for --objective clip|pickscore, safetensors weights "
                        "(default: openai/clip-vit-large-patch14 | yuvalkirstain/PickScore_v1)")
    p.add_argument("--clip-processor", default=None, help="tokenizer/image processor source if not the model's")
    p.add_argument("--clip-template", default=None, help='text scored against the image, e.g. "A photo depicts {prompt}"')
    p.add_argument("--prompt", action="append", type=nonempty("--prompt"),
                   help="prompt to search on (repeatable; default: the --suite prompts)")
    p.add_argument("--suite", default=None, help="prompt suite of the testbed (default two; not with --prompt)")
    p.add_argument("--seeds", type=int_arg(1, MAX_SEEDS, "--seeds"), default=16, help="training seeds (prompt-seed pairs)")
    p.add_argument("--top-k", type=int_arg(1, None, "--top-k (heads selected per round)"), default=3)
    p.add_argument("--rounds", type=int_arg(1, None, "--rounds"), default=1)
    p.add_argument("--stop-without-gain", action="store_true",
                   help="end the search at the first round whose best head does not improve the objective")
    p.add_argument("--scale", type=float_arg(0.0, None, "--scale (the guidance scale s)"), default=2.0)
    p.add_argument("--strength", type=FRACTION, default=1.0, help="u in [0, 1] written into the preset")
    p.add_argument("--steps", type=STEPS, default=None)
    p.add_argument("--guidance", type=GUIDANCE, default=None,
                   help="CFG scale of the search's images (default: the model's; the paper searches without CFG: 0)")
    p.add_argument("--semantics", default="joint", choices=["joint", "image", "image-self"],
                   help="joint-attention semantics of the perturbation (SoftPAG)")
    p.add_argument("--candidates", default=None,
                   help="sites whose heads are candidates (a diffattn site selector, e.g. 'transformer_blocks.0-3'); "
                        "default: every self / joint / single-stream site")
    p.add_argument("--batch-size", type=int_arg(1, 4096, "--batch-size"), default=16,
                   help="images per denoiser batch while scoring")
    p.add_argument("--state-dir", default=None, help="cache and resume the search here")
    p.add_argument("--out", default="preset.json", help="the preset JSON to write")
    p.add_argument("--heatmap", default=None, help="PNG of per-head scores (layers x heads)")
    add_limit_arguments(p)
    p.set_defaults(func=run)


def check_args(args) -> list[str]:
    """Everything checkable before the model loads; returns the prompts of the search."""
    import os

    from ..errors import UsageError

    clip_flags = [f for f, v in (("--clip-model", args.clip_model), ("--clip-processor", args.clip_processor),
                                 ("--clip-template", args.clip_template)) if v is not None]
    if clip_flags and args.objective not in CLIP_OBJECTIVES:
        raise UsageError(f"{', '.join(clip_flags)} applies to --objective {' / '.join(CLIP_OBJECTIVES)}, not "
                         f"--objective {args.objective}; leave it out or pick one of those")
    if args.prompt and args.suite is not None:
        raise UsageError("give --prompt or --suite, not both (--suite picks the prompts when no --prompt is given)")
    if args.prompt:
        prompts = list(args.prompt)
    else:
        from ..testbed.evaluate import check_suite, suite_prompts

        check_suite(args.suite or "two")
        prompts = suite_prompts(args.suite or "two")
    if args.objective in ORACLE_OBJECTIVES:  # the oracle grades prompts of the shapes world only
        from ..testbed.world import parse_prompt

        for prompt in prompts:
            try:
                parse_prompt(prompt)
            except ValueError as e:
                raise UsageError(f"--prompt: {e} (--objective {args.objective} is scored by the testbed oracle, "
                                 f"which reads prompts of the shapes world)") from None
    check_output(args.out, "--out", JSON_EXTS)
    check_output(args.heatmap, "--heatmap")
    check_distinct(("--out", args.out), ("--heatmap", args.heatmap))
    if args.state_dir is not None:
        d = args.state_dir
        if os.path.exists(d) and not os.path.isdir(d):
            raise UsageError(f"--state-dir {d} is a file; give a directory (created if missing)")
        parent = os.path.dirname(os.path.abspath(d))
        if not os.path.isdir(parent):
            raise UsageError(f"--state-dir {d}: the directory {parent} does not exist; create it first")
        if not os.access(d if os.path.isdir(d) else parent, os.W_OK | os.X_OK):
            raise UsageError(f"--state-dir {d}: no permission to write there")
    check_call_args(args)
    check_model_args(args)
    return prompts


def run(args):
    import torch

    from ..distributed import distributed_state
    from ..methods.headhunter import HeadHunter, make_objective
    from ..testbed.evaluate import TRAIN_SEEDS

    # one process, or one of several under `accelerate launch` / `torchrun` (candidates split
    # across processes, same result); each process on its own device unless --device is given
    prompts = check_args(args)  # the output files, the prompts, the numbers: before any model loads
    state = distributed_state()
    args.device = args.device or state.device
    pipe = load_for(args)
    from .common import check_text

    for prompt in prompts:
        check_text(pipe, prompt, "--prompt")
    objective = make_objective(args.objective, clip_model=args.clip_model, clip_processor=args.clip_processor,
                               template=args.clip_template, dtype=getattr(torch, args.dtype))
    kw = {} if args.steps is None else {"num_inference_steps": args.steps}
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    from ..errors import UsageError
    from ..methods.softpag import PERTURBABLE_KINDS
    from ..sites import select, sites

    candidates = "all"
    if args.candidates is not None:
        candidates = [(s.name, h) for s in select(pipe, args.candidates) for h in range(s.heads)]
        n = sum(1 for s in select(pipe, args.candidates) if s.kind in PERTURBABLE_KINDS for _ in range(s.heads))
    else:
        n = sum(s.heads for s in sites(pipe) if s.kind in PERTURBABLE_KINDS)
    if n == 0:
        raise UsageError(f"--candidates {args.candidates!r} holds no self / joint / single-stream head to perturb")
    if args.top_k > n:
        raise UsageError(f"--top-k {args.top_k} is more than the {n} candidate heads; pick at most {n}")
    hunt = HeadHunter(pipe, objective, prompts, list(TRAIN_SEEDS)[: args.seeds], top_k=args.top_k, rounds=args.rounds,
                      stop_without_gain=args.stop_without_gain, scale=args.scale, state_dir=args.state_dir,
                      semantics=args.semantics, candidates=candidates, batch_size=args.batch_size,
                      progress=state.is_main_process, **kw)
    result = hunt.run()
    if state.is_main_process:  # the others wait until the files are written
        result.save_preset(args.out, strength=args.strength)
        print(f"selected heads {result.selected}; preset written to {args.out}")
        if args.heatmap:
            from .common import head_heatmap

            head_heatmap(result, f"HeadHunter ({args.objective}): score per head, round 1; framed: selected"
                         ).save(args.heatmap)
            print(f"heat map written to {args.heatmap}")
    state.wait_for_everyone()
    # tear the gloo group down while every process is still here: left to interpreter exit, its
    # threads can be destroyed still joinable and abort one process ("terminate called without
    # an active exception"), failing a search that finished
    state.destroy_process_group()
