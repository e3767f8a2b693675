"""What the commands share: the validation layer at the command line's boundary (numbers,
paths, model names, devices, limits: all checked before a model loads or any work starts),
model loading and its arguments, call arguments, and the images they write (panels side by
side, rows of maps underneath).

Every check raises a :class:`~diffattn.errors.DiffattnError` subclass whose one line says what
to fix; :func:`diffattn.cli.main` prints it and exits with status 2. Argument *types* (below)
raise ``argparse.ArgumentTypeError`` so argparse reports them the same way, naming the flag.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from ..errors import LimitError, ModelLoadError, PathError, UsageError

# ----------------------------------------------------------------------------- argument types

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def int_arg(lo: int | None = None, hi: int | None = None, what: str = "a whole number"):
    """An argparse ``type``: an integer in ``[lo, hi]`` (either may be ``None``)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0) if text.strip().lower().startswith(("0x", "0o", "0b")) else int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (an integer)") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range: {what} {_bounds(lo, hi)}")
        return value

    parse.__name__ = "int"
    return parse


def float_arg(lo: float | None = None, hi: float | None = None, what: str = "a number"):
    """An argparse ``type``: a finite float in ``[lo, hi]`` (``nan`` / ``inf`` are refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not finite: {what} must be a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value:g} is out of range: {what} {_bounds(lo, hi)}")
        return value

    parse.__name__ = "float"
    return parse


def _bounds(lo, hi) -> str:
    def b(x):
        return f"{x:g}" if isinstance(x, float) else str(x)

    if hi is None:
        return f"must be at least {b(lo)}"
    if lo is None:
        return f"must be at most {b(hi)}"
    return f"must lie in [{b(lo)}, {b(hi)}]"


STEPS = int_arg(1, None, "the number of denoising steps")
SEED = int_arg(0, SEED_MAX, "the seed (0 to 2**64 - 1)")
GUIDANCE = float_arg(0.0, None, "the CFG scale (>= 0; <= 1 turns CFG off)")
SIZE = int_arg(1, None, "the image side in pixels")
COUNT = int_arg(1, None, "a count (at least 1)")
FRACTION = float_arg(0.0, 1.0, "the value (a fraction)")


def nonempty(what: str):
    """An argparse ``type``: a string with something other than spaces in it."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} is empty: write some words")
        return text

    parse.__name__ = "text"
    return parse


# ----------------------------------------------------------------------------- limits

TESTBED_LIMITS = {"max_side": 256, "max_steps": 1000}  # tiny models on a CPU: 4x the native 64 px side
DEFAULT_LIMITS = {"max_side": 2048, "max_steps": 1000}  # any other model
LIMIT_ENV = {"max_side": "DIFFATTN_MAX_SIDE", "max_steps": "DIFFATTN_MAX_STEPS"}
LIMIT_FLAG = {"max_side": "--max-side", "max_steps": "--max-steps"}


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """``--max-side`` and ``--max-steps``: raise the limits on a big machine."""
    g = p.add_argument_group("limits", "bounds on the work one command may start (raise them on a big machine; "
                                       "also the DIFFATTN_MAX_SIDE / DIFFATTN_MAX_STEPS environment variables)")
    g.add_argument("--max-side", type=int_arg(1, None, "--max-side"), default=None, metavar="PX",
                   help=f"longest image side accepted (default {TESTBED_LIMITS['max_side']} on the testbed models, "
                        f"{DEFAULT_LIMITS['max_side']} otherwise)")
    g.add_argument("--max-steps", type=int_arg(1, None, "--max-steps"), default=None, metavar="N",
                   help=f"most denoising / inversion steps accepted (default {DEFAULT_LIMITS['max_steps']})")


def limit(args, name: str) -> int:
    """The limit ``name`` (``max_side`` / ``max_steps``) for this command: its flag, else the
    environment variable, else the model's default."""
    given = getattr(args, name, None)
    if given is not None:
        return given
    env = os.environ.get(LIMIT_ENV[name])
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value < 1:
            raise UsageError(f"{LIMIT_ENV[name]}={env!r} is not a whole number >= 1; fix or unset it")
        return value
    table = TESTBED_LIMITS if is_testbed_name(getattr(args, "model", None)) else DEFAULT_LIMITS
    return table[name]


def _raise_hint(name: str) -> str:
    return f"raise it with {LIMIT_FLAG[name]} or {LIMIT_ENV[name]} if your machine can take it"


def check_steps(args, steps: int | None, flag: str = "--steps") -> None:
    if steps is not None and steps > (lim := limit(args, "max_steps")):
        raise LimitError(f"{flag} {steps} is above the limit of {lim} steps for {model_label(args)}; "
                         + _raise_hint("max_steps"))


def check_side(args, side: int, what: str) -> None:
    if side > (lim := limit(args, "max_side")):
        raise LimitError(f"{what} is above the limit of {lim} pixels per side for {model_label(args)}; "
                         + _raise_hint("max_side"))


def check_call_args(args) -> None:
    """``--steps`` / ``--size`` against the limits (before the model loads)."""
    check_steps(args, getattr(args, "steps", None))
    if getattr(args, "size", None) is not None:
        check_side(args, args.size, f"--size {args.size}")


def check_size_for(pipe, args) -> None:
    """``--size`` against what the loaded model can generate (a multiple of its unit, within its
    position embedding), before anything is generated."""
    size = getattr(args, "size", None)
    if size is not None:
        check_side_for(pipe, args, size, f"--size {size}")


def check_side_for(pipe, args, side: int, what: str) -> None:
    """One image side (``what`` names it in the message) against the loaded model's unit and
    position embedding."""
    unit, cap = size_unit(pipe)
    if side % unit or side < unit:
        lo = max(unit, side // unit * unit)
        hint = f"{lo}" + (f" or {lo + unit}" if lo + unit <= limit(args, "max_side") else "")
        raise UsageError(f"{what}: {model_label(args)} generates sides that are multiples of {unit} pixels; "
                         f"use e.g. {hint}")
    if cap is not None and side > cap:
        raise LimitError(f"{what}: the position embedding of {model_label(args)} covers sides up to {cap} pixels")


def size_unit(pipe) -> tuple[int, int | None]:
    """(pixels per latent token side, the longest side the model can embed or ``None``)."""
    try:
        from ..families import adapter_for

        a = adapter_for(pipe)
        return int(a.vae_factor * a.patch), a.max_side
    except Exception:  # a pipeline diffattn's loops do not serve: diffusers' own rule
        return int(getattr(pipe, "vae_scale_factor", 8)), None


# ----------------------------------------------------------------------------- paths

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXTS = (".gif", ".mp4")  # clips of a video model (write_clips): GIF by PIL, MP4 by imageio-ffmpeg if installed
JSON_EXTS = (".json",)


def check_output(path: str | None, flag: str, exts: tuple[str, ...] = IMAGE_EXTS) -> None:
    """An output path that can be written: a known extension, an existing writable directory,
    not a directory itself. Checked before any work, so no result is lost at the end."""
    if path is None:
        return
    p = Path(path)
    if not str(path).strip():
        raise PathError(f"{flag} is empty: give a file name ending in {exts[0]}")
    if p.is_dir():
        raise PathError(f"{flag} {path} is a directory; give a file name in it, e.g. {p / ('result' + exts[0])}")
    if p.suffix.lower() not in exts:
        raise PathError(f"{flag} {path}: write a {' / '.join(exts)} file (the name must end in one of these)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise PathError(f"{flag} {path}: the directory {parent} does not exist; create it first (mkdir -p {parent})")
    if not parent.is_dir():
        raise PathError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise PathError(f"{flag} {path}: no permission to write there; pick a directory you can write to")


def check_distinct(*pairs: tuple[str, str | None]) -> None:
    """No two of these paths (flag, path) are the same file: an output never overwrites an input
    or another output of the same command."""
    seen: dict[str, str] = {}
    for flag, path in pairs:
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise PathError(f"{flag} {path} is the same file as {seen[key]}; give it another name")
        seen[key] = f"{flag} {path}" if flag else str(path)


def check_input_file(path: str, what: str) -> Path:
    """An input file that exists and can be read."""
    p = Path(path)
    if not p.exists():
        raise PathError(f"{what} {path}: no such file")
    if p.is_dir():
        raise PathError(f"{what} {path} is a directory; give a file")
    if not os.access(p, os.R_OK):
        raise PathError(f"{what} {path}: no permission to read it")
    return p


def open_image(args, path: str, what: str = "image"):
    """The image at ``path`` as PIL RGB as a viewer shows it (``diffattn.images.to_rgb``: EXIF
    orientation applied, transparency on white, 16-bit scaled), after checking it exists, is an
    image, and is within ``--max-side`` (read from the header, before the pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

    from ..images import to_rgb

    import warnings

    p = check_input_file(path, what)
    try:
        with warnings.catch_warnings():  # a huge image is refused below by --max-side, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
    except UnidentifiedImageError:
        raise PathError(f"{what} {path} is not an image file PIL can read (PNG, JPEG, WebP, BMP, TIFF...)") from None
    except Image.DecompressionBombError:
        raise LimitError(f"{what} {path} has too many pixels to open safely; resize it") from None
    except OSError as e:
        raise PathError(f"{what} {path} cannot be read: {e}") from None
    w, h = im.size
    check_side(args, max(w, h), f"{what} {path} is {w}x{h} pixels, which")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise PathError(f"{what} {path} is damaged or truncated ({e}); re-export it") from None
    return to_rgb(im)


# ----------------------------------------------------------------------------- models

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def known_models() -> str:
    from .. import testbed

    return f"{', '.join(testbed.SHIPPED[::-1])} (shipped), a diffusers pipeline folder (with model_index.json) or a " \
           f"Hugging Face hub id (org/name)"


def model_label(args) -> str:
    from .. import testbed

    return getattr(args, "model", None) or testbed.DEFAULT_MODEL


def check_model(name: str | None) -> None:
    """A ``--model`` value that can name a model: a testbed name, a diffusers pipeline folder, or
    a hub id; anything else is a :class:`ModelLoadError` listing the known forms."""
    from .. import testbed

    if name is None or name in testbed.SHIPPED:
        return
    p = Path(name)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"--model {name} is a file; give a diffusers pipeline folder (with model_index.json), "
                                 f"or one of: {known_models()}")
        if not (p / "model_index.json").is_file():
            raise ModelLoadError(f"--model {name} is not a diffusers pipeline folder (no model_index.json in it); "
                                 f"known models: {known_models()}")
        testbed.testbed_kind(p)  # a malformed testbed.json is a ModelLoadError
        return
    if _HUB_ID.fullmatch(name) and not name.startswith((".", "~")):
        return
    raise ModelLoadError(f"unknown model {name!r} (no such folder either); known models: {known_models()}")


def check_device(device: str | None) -> None:
    """A device this torch can use (``--device cuda`` on a CPU-only torch is refused here)."""
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda, cuda:1, mps...") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA GPU"
            raise UsageError(f"--device {device}: this machine has {build}; use --device cpu, or install a CUDA "
                             f"build of torch")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif d.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {device}: diffattn's commands run on cpu, cuda or mps")


def check_model_args(args) -> None:
    """``--model`` and ``--device`` (before loading)."""
    check_model(getattr(args, "model", None))
    check_device(getattr(args, "device", None))


def load_model(name: str | None, dtype: str = "float32", device: str = "cpu", *, allow_pickle: bool = False):
    """A pipeline from a testbed name, a local folder or a hub id, from safetensors weights only
    unless ``allow_pickle`` (a pickle checkpoint runs code when loaded: only for files you trust).
    Anything that cannot be loaded is a :class:`ModelLoadError`."""
    import torch

    from .. import testbed

    check_model(name)
    name = name or testbed.DEFAULT_MODEL
    # fp32 is every loader's default: named only when it differs, under the keyword this diffusers
    # takes (`dtype` since the rename; `torch_dtype` before it, now a FutureWarning on every load)
    dtype_kwargs = {} if dtype == "float32" else {_dtype_keyword(): getattr(torch, dtype)}
    safe = {"use_safetensors": None if allow_pickle else True}
    if name in testbed.SHIPPED or testbed.testbed_kind(name):
        pipe = testbed.load(name, **dtype_kwargs, **safe)
        return _to(pipe, device)
    from diffusers import DiffusionPipeline

    absent = {}
    index = Path(name) / "model_index.json"
    if index.is_file():  # a local folder saved without some components (e.g. SD3 without T5)
        import json

        try:
            absent = {k: None for k, v in json.loads(index.read_text()).items() if v == [None, None]}
        except (ValueError, AttributeError) as e:
            raise ModelLoadError(f"{index} is not a valid model_index.json ({e})") from None
    try:
        pipe = DiffusionPipeline.from_pretrained(name, **dtype_kwargs, **absent, **safe)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ModelLoadError(testbed.load_failure(name, e, safe["use_safetensors"])) from e
    return _to(pipe, device)


def _dtype_keyword() -> str:
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


def _to(pipe, device):
    try:
        return pipe.to(device)
    except (RuntimeError, AssertionError) as e:  # e.g. "Torch not compiled with CUDA enabled"
        raise UsageError(f"--device {device}: {' '.join(str(e).split())}") from None


def load_for(args):
    """The pipeline of a command's ``--model`` / ``--dtype`` / ``--device`` / ``--allow-pickle``."""
    return load_model(args.model, args.dtype, args.device, allow_pickle=getattr(args, "allow_pickle", False))


def add_model_arguments(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--model`` (default: tiny-sd3, or ``default``), ``--device``, ``--dtype``, ``--allow-pickle``."""
    if default is None:
        p.add_argument("--model", default=None, help="tiny-sd3 (default), tiny-sd, a diffusers folder or a hub id")
    else:
        others = ", ".join(m for m in ("tiny-sd3", "tiny-sd") if m != default)
        p.add_argument("--model", default=default, help=f"{default} (default), {others}, a diffusers folder or a hub id")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle (.bin) weights when a model has no safetensors: only for checkpoints you "
                        "trust (loading a pickle can run code)")


def check_text(pipe, text: str, what: str) -> None:
    """Refuse text with characters the model's (first) tokenizer maps to its unknown token: the
    model would see end-of-text / unknown tokens there instead of the words."""
    tok = getattr(pipe, "tokenizer", None)
    unk = getattr(tok, "unk_token_id", None)
    if tok is None or unk is None or not text:
        return
    try:
        ids = tok(text, add_special_tokens=False).input_ids
    except Exception:  # a tokenizer that cannot say: nothing to check
        return
    if unk not in ids:
        return
    bad = sorted({c for c in text if not c.isspace() and unk in tok(c, add_special_tokens=False).input_ids})
    shown = " ".join(bad) if bad else "some characters"
    raise UsageError(f"{what} {text!r} has characters this model's tokenizer does not know ({shown}): they would "
                     f"become {tok.unk_token!r} tokens; write them out in words")


def is_testbed_name(name: str | None) -> bool:
    """Whether a ``--model`` value names a shipped testbed model (``None``: the default, tiny-sd3)."""
    from .. import testbed

    if (name or testbed.DEFAULT_MODEL) in testbed.SHIPPED:
        return True
    return (Path(name) / testbed.MARKER).is_file()  # an exported testbed folder


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


COLORBAR_WIDTH = 74  # pixels right of a row of maps: the bar and its labels


def maps_row(maps: dict, size: int, colorbar: bool = True):
    """The heat maps of one image (``{label: PIL}``) side by side, labelled, each ``size`` pixels
    wide, with a colour bar (A-STAR's maps are each scaled to their own min..max)."""
    from PIL import Image, ImageDraw

    label_h = 14
    bar_w = COLORBAR_WIDTH if colorbar else 0
    row = Image.new("RGB", (size * len(maps) + bar_w, size + label_h), "white")
    draw = ImageDraw.Draw(row)
    for i, (label, im) in enumerate(maps.items()):
        row.paste(im.resize((size, size), Image.BILINEAR), (i * size, label_h))
        draw.text((i * size + 3, 1), str(label), fill="black")
    if colorbar:
        x = size * len(maps) + 4
        row.paste(colorbar_image(size - 2), (x, label_h + 1))
        draw.text((x + 14, label_h), "max", fill="black")
        draw.text((x + 14, label_h + size - 12), "min", fill="black")
        draw.text((x + 14, label_h + size // 2 - 6), "(per map)", fill="gray")
    return row


def colorbar_image(height: int, width: int = 10):
    """A vertical colour bar of A-STAR's heat-map colours, high at the top."""
    import numpy as np
    import torch
    from PIL import Image

    from ..methods.astar import colorize

    ramp = torch.linspace(1, 0, max(2, height))[:, None].expand(-1, width)
    return Image.fromarray(np.ascontiguousarray(colorize(ramp, vmax=1.0).numpy()))


def head_heatmap(result, title: str = "", cell: int = 18):
    """HeadHunter's per-head scores of round 1 as a labelled chart: one row per site (its name),
    one column per head (its index), a colour bar with the score range, the selected heads framed."""
    import numpy as np
    from PIL import Image, ImageDraw

    scores = result.rounds[0] if result.rounds else {}
    names = list(result.layout)
    heads = max(result.layout.values()) if result.layout else 1
    grid = np.full((len(names), heads), np.nan)
    for key, value in scores.items():
        site, head = key.rsplit(":", 1)
        if site in names:
            grid[names.index(site), int(head)] = value
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    t = (grid - lo) / (hi - lo + 1e-12)

    def color(v):  # blue (low) -> red (high), as HeadHuntResult.heatmap
        return (int(255 * v), 60, int(255 * (1 - v)))

    left = 8 + 6 * max((len(n) for n in names), default=4)
    top, bar = 30, 70
    w, h = left + heads * cell + bar, top + len(names) * cell + 26
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 2), title or "HeadHunter: score per head, round 1 (framed: selected)", fill="black")
    for j in range(heads):
        d.text((left + j * cell + cell // 2 - 3, top - 13), str(j), fill="black")
    for i, name in enumerate(names):
        y = top + i * cell
        d.text((4, y + cell // 2 - 6), name, fill="black")
        for j in range(heads):
            x = left + j * cell
            box = (x, y, x + cell - 1, y + cell - 1)
            if np.isnan(grid[i, j]):
                d.rectangle(box, fill="white", outline=(220, 220, 220))
            else:
                d.rectangle(box, fill=color(float(t[i, j])))
    for site, head in result.selected:
        if site in names:
            x, y = left + head * cell, top + names.index(site) * cell
            d.rectangle((x, y, x + cell - 1, y + cell - 1), outline="black", width=2)
    d.text((left, top + len(names) * cell + 6), "head", fill="black")
    bx, bh = left + heads * cell + 10, len(names) * cell
    for k in range(bh):
        d.line((bx, top + k, bx + 10, top + k), fill=color(1 - k / max(1, bh - 1)))
    d.text((bx + 14, top - 2), f"{hi:.3g}", fill="black")
    d.text((bx + 14, top + bh - 12), f"{lo:.3g}", fill="black")
    return img


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


def mp4_writer_missing() -> str | None:
    """Why an MP4 cannot be written here (``None``: it can): imageio with its ffmpeg plugin
    writes MP4; PIL writes only the GIF."""
    import importlib.util

    missing = [m for m in ("imageio", "imageio_ffmpeg") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


def check_clip_output(path: str, flag: str = "--out") -> None:
    """A clip file this machine can write (before the model loads): a GIF always, an MP4 only
    with imageio-ffmpeg installed (else a :class:`UsageError` pointing at .gif)."""
    if Path(path).suffix.lower() == ".mp4" and (why := mp4_writer_missing()):
        raise UsageError(f"{flag} {path}: no MP4 writer here ({why}: pip install imageio imageio-ffmpeg); write a "
                         f".gif instead (e.g. {Path(path).with_suffix('.gif')})")


def clip_frames(clips: list, labels: list[str], scale: int = 4) -> list:
    """Clips (each a list of PIL frames) side by side, frame by frame: one labelled
    :func:`side_by_side` image per frame index (the shortest clip's length), the frame number
    after the first label (``baseline  3/9``)."""
    n = min(len(c) for c in clips)
    return [side_by_side([c[i] for c in clips], [f"{labels[0]}  {i + 1}/{n}"] + list(labels[1:]), scale)
            for i in range(n)]


def write_clips(path: str, clips: list, labels: list[str], fps: int = 8) -> int:
    """Write ``clips`` (lists of PIL frames) side by side as one animated GIF (PIL's writer,
    looping, ``fps`` frames per second) or MP4 (imageio-ffmpeg, :func:`check_clip_output`
    first); returns the number of frames written."""
    frames = clip_frames(clips, labels)
    if Path(path).suffix.lower() == ".mp4":
        check_clip_output(path)
        import imageio.v2 as imageio
        import numpy as np

        even = [f.crop((0, 0, f.width // 2 * 2, f.height // 2 * 2)) for f in frames]  # yuv420p: even sides
        imageio.mimwrite(path, [np.asarray(f) for f in even], fps=fps)
    else:  # no optimize: every frame kept whole (the frame counter makes consecutive frames distinct)
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(20, round(1000 / fps)), loop=0,
                       optimize=False)
    return len(frames)


def rgb_image(x):
    """A ``[3, H, W]`` float tensor in [0, 1] (``UAMPipeline.load_image(...)[0]``) as a PIL RGB image."""
    import numpy as np
    from PIL import Image

    arr = x.permute(1, 2, 0).numpy()
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))
