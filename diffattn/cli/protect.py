"""``diffattn protect``: protect an image from in-context editing (DeContext, or a baseline).

    diffattn protect photo.png --out protected.png --model black-forest-labs/FLUX.1-Kontext-dev
    diffattn protect photo.png --out protected.png --model tiny-random-kontext --steps 50 --eps 8/255

The protected PNG satisfies ‖protected − input‖∞ ≤ ε exactly (8-bit rounding, then re-projection);
the input file is never overwritten.
"""
from __future__ import annotations

import argparse
from .common import COUNT, SEED, STEPS, add_limit_arguments, check_distinct, check_output, check_steps, nonempty

TINY_RANDOM = "tiny-random-kontext"  # diffattn.tiny's FluxKontextPipeline (random weights): for smoke tests
METHODS = ("decontext", "encoder", "diffpgd", "random")  # diffattn.pipelines.decontext.METHODS (no torch here)
DEFAULT_EPS, DEFAULT_ALPHA, DEFAULT_STEPS = 0.05, 0.0025, 800  # DeContextConfig's: the paper's in [0, 1] units


def parse_eps(text: str) -> float:
    """An L∞ budget as a fraction of the pixel range: ``"8/255"``, ``"0.0314"`` or ``"12.75/255"``,
    in (0, 1]; anything else is an ``argparse.ArgumentTypeError`` naming the accepted forms."""
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a budget: write a fraction of the pixel range such as "
                                         f"8/255 or 0.03") from None
    if not value == value or not 0.0 < value <= 1.0:  # NaN fails the first test
        raise argparse.ArgumentTypeError(f"{text!r} = {value:g} is outside (0, 1]: ε is a fraction of the pixel "
                                         f"range (8/255 ≈ 0.031; the paper's 12.75/255 = 0.05)")
    return value


parse_eps.__name__ = "eps"


def add_editor_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` (an in-context editor), ``--device``, ``--dtype``, ``--allow-pickle``."""
    p.add_argument("--model", default=None,
                   help=f"a FluxKontextPipeline: a diffusers folder or hub id (e.g. black-forest-labs/FLUX.1-Kontext-"
                        f"dev), or {TINY_RANDOM} (a tiny random-weights editor, for smoke tests)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle (.bin) weights: only for checkpoints you trust")


def add_protect_arguments(p: argparse.ArgumentParser) -> None:
    """The attack's flags (shared with ``try-edit``)."""
    p.add_argument("--method", default="decontext", choices=list(METHODS),
                   help="decontext (default), encoder (PhotoGuard), diffpgd (Diff-PGD) or random (±ε sign noise)")
    p.add_argument("--eps", type=parse_eps, default=DEFAULT_EPS,
                   help="L∞ budget as a fraction of the pixel range, e.g. 8/255 (default 12.75/255, the paper's)")
    p.add_argument("--alpha", type=parse_eps, default=DEFAULT_ALPHA,
                   help="PGD step as a fraction of the pixel range (default 0.0025 = 0.64/255, the paper's)")
    p.add_argument("--steps", type=STEPS, default=DEFAULT_STEPS, help="PGD steps (default 800, the paper's)")
    p.add_argument("--instruction-pool", action="append", default=None, type=nonempty("--instruction-pool"),
                   metavar="TEXT", help="an edit instruction of the EOT pool (repeat; default: the built-in pool)")
    p.add_argument("--blocks", default="auto",
                   help="sites whose context share is attacked: auto (single-stream blocks of the front two "
                        "thirds) or a selector such as single_transformer_blocks.0-25")
    p.add_argument("--seed", type=SEED, default=0, help="EOT sampling seed")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (for full-size models)")
    p.add_argument("--max-sequence-length", type=COUNT, default=None, help="T5 tokens (default: the pipeline's)")


def register(subparsers) -> None:
    p = subparsers.add_parser("protect", help="protect an image from in-context editing (DeContext: detach the "
                                              "editor's attention from it), or a baseline on the same budget")
    p.add_argument("image", help="image to protect (RGB; sides multiples of 2 x the VAE factor: 16 px on FLUX.1)")
    p.add_argument("--out", required=True, help="protected image (.png: lossless, so ε holds on the file)")
    p.add_argument("--plot", default=None, help="also write per-block r_ctx, clean vs protected, as a bar chart PNG")
    add_editor_arguments(p)
    add_protect_arguments(p)
    add_limit_arguments(p)
    p.set_defaults(func=run)


def load_editor(args):
    """The ``--model`` pipeline (``tiny-random-kontext``: built offline with random weights)."""
    from ..errors import UsageError
    from .common import load_model

    if args.model is None:
        raise UsageError("--model is required: a FluxKontextPipeline folder or hub id (no Kontext testbed model is "
                         f"shipped yet), or {TINY_RANDOM} for a smoke test")
    if args.model == TINY_RANDOM:
        from ..tiny import tiny_pipeline

        return tiny_pipeline("flux_kontext").to(args.device)
    return load_model(args.model, args.dtype, args.device, allow_pickle=args.allow_pickle)


def protector_for(args, pipe):
    """A :class:`~diffattn.pipelines.decontext.DeContextProtector` of the command's flags."""
    from ..pipelines.decontext import DeContextProtector

    return DeContextProtector(pipe, progress=True, method=args.method, eps=args.eps, alpha=args.alpha,
                              steps=args.steps, instructions=args.instruction_pool, blocks=args.blocks, seed=args.seed,
                              gradient_checkpointing=args.checkpointing, max_sequence_length=args.max_sequence_length)


def check_paths(args, outputs, inputs=()) -> None:
    """Outputs writable PNGs, none of them an input (checked before the model loads)."""
    for flag, path in outputs:
        check_output(path, flag, (".png",))
    check_distinct(("", args.image), *inputs, *outputs)
    check_steps(args, args.steps)


def run(args):
    """Protect, write the PNG (and the r_ctx chart), print ‖δ‖∞ and the time."""
    from .common import open_image

    check_paths(args, [("--out", args.out), ("--plot", args.plot)])
    image = open_image(args, args.image)
    pipe = load_editor(args)
    result = protector_for(args, pipe).protect(image, diagnostics=args.plot is not None or args.method == "decontext")
    result.save(args.out)
    levels = round(args.eps * 255, 2)
    print(f"{args.method}: ‖δ‖∞ = {result.linf}/255 (budget {levels:g}/255), {len(result.losses)} steps in "
          f"{result.seconds:.1f} s")
    if result.shares:
        clean, prot = (sum(d.values()) / max(1, len(d)) for d in (result.shares["clean"], result.shares["protected"]))
        print(f"mean context share r_ctx over all blocks: clean {clean:.4f} -> protected {prot:.4f}")
    if args.plot is not None:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    print(f"wrote {args.out}")
    return result
