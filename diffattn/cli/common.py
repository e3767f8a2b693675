"""What the commands share: model loading and its arguments, call arguments, and the images
they write (panels side by side, rows of maps underneath)."""
from __future__ import annotations

import argparse


def load_model(name: str | None, dtype: str = "float32", device: str = "cpu"):
    """A pipeline from a testbed name, a local folder or a hub id."""
    import torch

    from .. import testbed

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


def add_model_arguments(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--model`` (default: tiny-sd3, or ``default``), ``--device``, ``--dtype``."""
    if default is None:
        p.add_argument("--model", default=None, help="tiny-sd3 (default), tiny-sd, a diffusers folder or a hub id")
    else:
        others = ", ".join(m for m in ("tiny-sd3", "tiny-sd") if m != default)
        p.add_argument("--model", default=default, help=f"{default} (default), {others}, a diffusers folder or a hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def is_testbed_name(name: str | None) -> bool:
    """Whether a ``--model`` value names a shipped testbed model (``None``: the default, tiny-sd3)."""
    from .. import testbed

    return (name or testbed.DEFAULT_MODEL) in testbed.MODELS


def call_kwargs(args) -> dict:
    """The pipeline's call keywords from ``--steps``, ``--guidance``, ``--size`` (those given)."""
    kw = {}
    if getattr(args, "steps", None) is not None:
        kw["num_inference_steps"] = args.steps
    if getattr(args, "guidance", None) is not None:
        kw["guidance_scale"] = args.guidance
    if getattr(args, "size", None) is not None:
        kw["height"] = kw["width"] = args.size
    return kw


def side_by_side(images: list, labels: list[str], scale: int = 4):
    """Images in a row, upscaled (nearest) so a 64x64 testbed image is readable, labelled."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    f = max(1, scale if w <= 128 else 1)
    label_h = 14
    canvas = Image.new("RGB", (w * f * len(images), h * f + label_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (im, label) in enumerate(zip(images, labels)):
        canvas.paste(im.resize((w * f, h * f), Image.NEAREST), (i * w * f, label_h))
        draw.text((i * w * f + 3, 1), label, fill="black")
    return canvas


def maps_row(maps: dict, size: int):
    """The heat maps of one image (``{label: PIL}``) side by side, labelled, each ``size`` pixels wide."""
    from PIL import Image, ImageDraw

    label_h = 14
    row = Image.new("RGB", (size * len(maps), size + label_h), "white")
    draw = ImageDraw.Draw(row)
    for i, (label, im) in enumerate(maps.items()):
        row.paste(im.resize((size, size), Image.BILINEAR), (i * size, label_h))
        draw.text((i * size + 3, 1), str(label), fill="black")
    return row


def compose(top, rows):
    """``top`` (the side-by-side image) with ``rows`` ``[(label, PIL image)]`` stacked underneath."""
    from PIL import Image

    height = top.height + sum(r.height for _, r in rows)
    width = max([top.width] + [r.width for _, r in rows])
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(top, (0, 0))
    y = top.height
    for _, r in rows:
        canvas.paste(r, (width - r.width, y))  # under the right-most (method) image
        y += r.height
    return canvas


def rgb_image(x):
    """A ``[3, H, W]`` float tensor in [0, 1] (``UAMPipeline.load_image(...)[0]``) as a PIL RGB image."""
    import numpy as np
    from PIL import Image

    arr = x.permute(1, 2, 0).numpy()
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))
