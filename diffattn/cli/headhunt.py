"""``diffattn headhunt``: HeadHunter's greedy head search, written as a SoftPAG preset."""
from __future__ import annotations

from .common import add_model_arguments, load_model

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
    p.set_defaults(func=run)


def run(args):
    import torch

    from ..methods.headhunter import HeadHunter, distributed_state, make_objective
    from ..testbed.evaluate import TRAIN_SEEDS, suite_prompts

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
        from ..sites import select

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
