"""``diffattn invert``: invert an image and reconstruct it with the source prompt, the empty
prompt and uniform attention maps (UAM), side by side with PSNR."""
from __future__ import annotations

from .common import (
    STEPS,
    add_limit_arguments,
    add_model_arguments,
    check_distinct,
    check_model_args,
    check_output,
    check_steps,
    check_text,
    is_testbed_name,
    load_for,
    model_label,
    nonempty,
    open_image,
    rgb_image,
    side_by_side,
)

UAM_DEFAULT_MODEL = "tiny-sd"  # UAM's commands default to the UNet testbed model (the paper's architecture)


def register(subparsers) -> None:
    p = subparsers.add_parser("invert", help="invert an image and reconstruct it with the source prompt, the empty "
                                             "prompt and uniform attention maps (UAM), side by side with PSNR")
    add_model_arguments(p, default=UAM_DEFAULT_MODEL)
    p.add_argument("image", help="image (RGB; grayscale and RGBA are converted), sides multiples of the model's unit "
                                 "(tiny-sd: 16 px; native 64x64)")
    p.add_argument("--prompt", default=None, type=nonempty("--prompt"),
                   help="source prompt (default on testbed models: the oracle's caption)")
    p.add_argument("--out", default="result.png", help="image: input | source prompt | empty prompt | uniform maps, "
                                                       "each labelled with its PSNR")
    p.add_argument("--steps", type=STEPS, default=None, help="inversion / reconstruction steps (default: the model's)")
    add_limit_arguments(p)
    p.set_defaults(func=run)


def prepare(args, out_flags=(("--out", "out"),)):
    """The checks of ``invert`` / ``edit`` before the model loads, then the model and the image:
    ``(uam_kwargs -> UAMPipeline, PIL RGB image)`` is left to the caller; returns the PIL image."""
    for flag, attr in out_flags:
        check_output(getattr(args, attr), flag)
    check_distinct(("", args.image), *((flag, getattr(args, attr)) for flag, attr in out_flags))
    check_steps(args, args.steps)
    image = open_image(args, args.image)  # exists, an image, within --max-side; RGB
    check_model_args(args)
    return image


def fit_image(uam, args, image):
    """The image as ``uam.load_image`` takes it, after a size check worded for the command line."""
    from ..errors import ImageInputError

    unit, (w, h) = uam.size_unit, image.size
    if w % unit or h % unit:
        fit = f"{max(unit, round(w / unit) * unit)}x{max(unit, round(h / unit) * unit)}"
        nh, nw = uam.image_size
        raise ImageInputError(f"{args.image} is {w}x{h} pixels; {model_label(args)} takes sides that are multiples of "
                              f"{unit} pixels (native {nw}x{nh}): resize or crop it, e.g. to {fit}")
    if uam.max_side is not None and max(w, h) > uam.max_side:
        raise ImageInputError(f"{args.image} is {w}x{h} pixels; the position embedding of {model_label(args)} covers "
                              f"sides up to {uam.max_side} pixels: resize it")
    return uam.load_image(image)


def source_prompt(args, image, given: str | None) -> str:
    """``given``, or on a testbed model the oracle's caption of the image (the testbed's default)."""
    from ..errors import EditPromptError

    if given is not None:
        return given
    if is_testbed_name(args.model):
        from ..testbed.defaults import default_caption

        return default_caption(image)
    raise EditPromptError("give the source prompt (--prompt / --source): only testbed images can be captioned "
                          "automatically")


def run(args) -> dict:
    """Reconstructions side by side, one PSNR line per conditioning."""
    from ..pipelines.uam import CONDITIONINGS, UAMPipeline

    image = prepare(args)
    pipe = load_for(args)
    uam = UAMPipeline(pipe, progress=True)
    x = fit_image(uam, args, image)  # [1, 3, H, W]
    image = rgb_image(x[0])
    prompt = source_prompt(args, image, args.prompt)
    check_text(pipe, prompt, "--prompt")
    rec = uam.reconstruct_all(x[0], prompt, num_inference_steps=args.steps)[0]
    labels = {"source": "source prompt", "empty": "empty prompt", "uniform": "uniform maps"}
    panels = [image] + [rec[c].image for c in CONDITIONINGS]
    side_by_side(panels, ["input"] + [f"{labels[c]}: PSNR {rec[c].psnr:.1f} dB" for c in CONDITIONINGS]).save(args.out)
    print(f"prompt: {prompt!r}")
    for c in CONDITIONINGS:
        print(f"{labels[c]:14s} PSNR {rec[c].psnr:6.2f} dB  SSIM {rec[c].ssim:.4f}")
    print(f"wrote {args.out}")
    return rec
