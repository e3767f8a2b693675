"""``diffattn invert``: invert an image and reconstruct it with the source prompt, the empty
prompt and uniform attention maps (UAM), side by side with PSNR."""
from __future__ import annotations

from .common import add_model_arguments, is_testbed_name, load_model, rgb_image, side_by_side

UAM_DEFAULT_MODEL = "tiny-sd"  # UAM's commands default to the UNet testbed model (the paper's architecture)


def register(subparsers) -> None:
    p = subparsers.add_parser("invert", help="invert an image and reconstruct it with the source prompt, the empty "
                                             "prompt and uniform attention maps (UAM), side by side with PSNR")
    add_model_arguments(p, default=UAM_DEFAULT_MODEL)
    p.add_argument("image", help="RGB image, sides multiples of the model's unit (tiny-sd: 16 px; native 64x64)")
    p.add_argument("--prompt", default=None, help="source prompt (default on testbed models: the oracle's caption)")
    p.add_argument("--out", default="result.png", help="PNG: input | source prompt | empty prompt | uniform maps")
    p.add_argument("--steps", type=int, default=None, help="inversion / reconstruction steps (default: the model's)")
    p.set_defaults(func=run)


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

    pipe = load_model(args.model, args.dtype, args.device)
    uam = UAMPipeline(pipe, progress=True)
    x = uam.load_image(args.image)  # [1, 3, H, W]
    image = rgb_image(x[0])
    prompt = source_prompt(args, image, args.prompt)
    rec = uam.reconstruct_all(x[0], prompt, num_inference_steps=args.steps)[0]
    labels = {"source": "source prompt", "empty": "empty prompt", "uniform": "uniform maps"}
    panels = [image] + [rec[c].image for c in CONDITIONINGS]
    side_by_side(panels, ["input"] + [labels[c] for c in CONDITIONINGS]).save(args.out)
    print(f"prompt: {prompt!r}")
    for c in CONDITIONINGS:
        print(f"{labels[c]:14s} PSNR {rec[c].psnr:6.2f} dB  SSIM {rec[c].ssim:.4f}")
    print(f"wrote {args.out}")
    return rec
