"""``diffattn edit``: a prompt-to-prompt word swap, with and without UAM's mask-guided blending."""
from __future__ import annotations

from .common import (
    FRACTION,
    GUIDANCE,
    STEPS,
    add_limit_arguments,
    add_model_arguments,
    check_text,
    float_arg,
    int_arg,
    load_for,
    nonempty,
    rgb_image,
    side_by_side,
)
from .invert import UAM_DEFAULT_MODEL, fit_image, prepare, source_prompt

# UAMConfig's defaults and choices, written out so --help imports no torch (tests/test_cli.py
# checks they match diffattn.pipelines.uam)
MASK_CONVENTIONS = ("code", "paper")
BLENDS = ("target", "both", "source")
DEFAULTS = dict(mask_convention="code", blend="target", mask_timestep=200.0, quantile=0.5, dilation=1,
                cross_replace=0.4, self_replace=0.6)


def register(subparsers) -> None:
    p = subparsers.add_parser("edit", help="edit an image by a word swap (prompt-to-prompt), with and without UAM's "
                                           "mask-guided blending")
    add_model_arguments(p, default=UAM_DEFAULT_MODEL)
    d = DEFAULTS
    p.add_argument("image", help="image (RGB; grayscale and RGBA are converted), sides multiples of the model's unit "
                                 "(tiny-sd: 16 px; native 64x64)")
    p.add_argument("--source", default=None, type=nonempty("--source"),
                   help="source prompt (default on testbed models: the oracle's caption)")
    p.add_argument("--target", required=True, type=nonempty("--target"),
                   help="target prompt: the source with one word swapped")
    p.add_argument("--out", default="result.png", help="image: input | prompt-to-prompt | + UAM | uniform branch")
    p.add_argument("--steps", type=STEPS, default=None)
    p.add_argument("--guidance", type=GUIDANCE, default=None, help="CFG of the source / target branches")
    p.add_argument("--mask-convention", default=d["mask_convention"], choices=list(MASK_CONVENTIONS),
                   help="code: dilate the edit mask (official code, default); paper: dilate the preserve mask")
    p.add_argument("--blend", default=d["blend"], choices=list(BLENDS))
    p.add_argument("--mask-timestep", type=float_arg(0.0, 1000.0, "--mask-timestep"), default=d["mask_timestep"],
                   help="T_mask: blend while t < this (0..1000)")
    p.add_argument("--quantile", type=FRACTION, default=d["quantile"], help="q: the mask threshold's quantile at the last step")
    p.add_argument("--dilation", type=int_arg(0, 64, "--dilation"), default=d["dilation"],
                   help="mask dilation radius in latent pixels (0 = none)")
    p.add_argument("--cross-replace", type=FRACTION, default=d["cross_replace"],
                   help="fraction of steps with the source's cross maps")
    p.add_argument("--self-replace", type=FRACTION, default=d["self_replace"],
                   help="fraction of steps with the source's self maps")
    add_limit_arguments(p)
    p.set_defaults(func=run)


def check_prompts(source: str, target: str) -> None:
    """Source and target differ (an edit that changes nothing is refused, not run)."""
    from ..errors import EditPromptError

    if " ".join(source.lower().split()) == " ".join(target.lower().split()):
        raise EditPromptError(f"--target {target!r} is the source prompt itself: swap one of its words "
                              f"(e.g. a colour or a shape)")


def run(args) -> dict:
    """Prompt-to-prompt word swap with and without UAM blending, side by side."""
    from ..pipelines.uam import UAMPipeline

    if args.source is not None:
        check_prompts(args.source, args.target)
    image = prepare(args)
    pipe = load_for(args)
    uam = UAMPipeline(pipe, progress=True, mask_convention=args.mask_convention, blend=args.blend,
                      mask_timestep=args.mask_timestep, quantile=args.quantile, dilation=args.dilation,
                      cross_replace=args.cross_replace, self_replace=args.self_replace)
    x = fit_image(uam, args, image)
    image = rgb_image(x[0])
    source = source_prompt(args, image, args.source)
    check_prompts(source, args.target)
    check_text(pipe, source, "--source")
    check_text(pipe, args.target, "--target")
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    with_uam = uam.edit(x[0], source, args.target, uam=True, **kw)
    base = uam.edit(x[0], source, args.target, uam=False, inversions=with_uam.inversions, **kw)
    side_by_side([image, base.target, with_uam.target, with_uam.aux],
                 ["input", "prompt-to-prompt", "p2p + UAM", "uniform branch"]).save(args.out)
    print(f"{source!r} -> {args.target!r}")
    print(f"wrote {args.out} (input | prompt-to-prompt | p2p + UAM | uniform branch)")
    return {"p2p": base, "uam": with_uam}
