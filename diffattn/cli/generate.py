"""``diffattn generate``: one prompt, the baseline and (optionally) a method side by side.

The methods and their flags come from the method registry (:mod:`diffattn.methods.registry`):
each method's parameters become flags of their own group (``--heads`` of softpag,
``--concepts`` of astar...); a flag given for another method than ``--method`` is an error
naming the method it belongs to. On the testbed models the testbed's defaults
(:func:`diffattn.testbed.defaults.method_defaults`: A-STAR's concepts from the caption, its
temperature) fill in what is not given.

On a video model (a pipeline whose output is ``.frames``: ``WanPipeline``,
``HunyuanVideoPipeline``) ``--out`` is a clip: the baseline and the method side by side, frame by
frame, as an animated GIF (or an MP4 where imageio-ffmpeg is installed); ``--frames`` sets the
clip length. A method whose run names the sites it times (``--method sparse``) gets a line
comparing the wall time of those attention modules, and of the whole call, dense vs method.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from .common import (
    COLORBAR_WIDTH,
    IMAGE_EXTS,
    VIDEO_EXTS,
    GUIDANCE,
    SEED,
    int_arg,
    SIZE,
    STEPS,
    add_limit_arguments,
    add_model_arguments,
    call_kwargs,
    check_call_args,
    check_clip_output,
    check_model_args,
    check_output,
    check_size_for,
    check_text,
    compose,
    load_for,
    maps_row,
    nonempty,
    side_by_side,
    write_clips,
)

_DEST = "method_param__"  # namespace prefix of the method flags' dests
_HELP_EXTRA = {("softpag", "heads"): "; or a site selector, optionally :HEADS (transformer_blocks.2-3, m0, "
                                     "transformer_blocks.2:0,3)"}


def _flag_type(param, method: str):
    """The argparse type of a method flag: the value converted and checked against the
    parameter's choices and range (and finite, for numbers) while the command line is read."""

    def parse(text):
        import math

        from ..errors import DiffattnError

        value = text
        if param.type is float:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
            if not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"{text!r} is not finite: give a finite number")
        elif param.type is str and not text.strip():
            raise argparse.ArgumentTypeError("the value is empty")
        try:
            return param.check(value, method)
        except DiffattnError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = param.type.__name__
    return parse


def add_method_arguments(p: argparse.ArgumentParser) -> dict[str, list[tuple[str, str]]]:
    """One flag per method parameter, grouped per method, none with a default (a flag not
    given is absent from the namespace). Returns ``{dest: [(method, param name), ...]}``
    (methods sharing a flag list it once)."""
    from ..methods.registry import methods

    owners: dict[str, list[tuple[str, str]]] = {}
    for m in methods():
        group = None
        for param in m.params:
            dest = _DEST + param.cli_flag.lstrip("-").replace("-", "_")
            if dest not in owners:
                group = group or p.add_argument_group(f"--method {m.name} ({m.label})", m.summary)
                one = _flag_type(replace(param, repeated=False), m.name)
                group.add_argument(param.cli_flag, dest=dest, type=one, default=argparse.SUPPRESS,
                                   action="append" if param.repeated else "store",
                                   metavar=None if param.choices else param.name.upper(),
                                   choices=list(param.choices) if param.choices else None,
                                   help=param.help + _HELP_EXTRA.get((m.name, param.name), "")
                                   + (f" (default {param.default})" if param.default is not None else ""))
                owners[dest] = []
            owners[dest].append((m.name, param.name))
    return owners


def register(subparsers) -> None:
    from ..methods.registry import methods

    names = ", ".join(m.name for m in methods())
    p = subparsers.add_parser("generate", help="generate an image, optionally with a method beside the baseline")
    add_model_arguments(p)
    p.add_argument("prompt", type=nonempty("the prompt"))
    p.add_argument("--out", default="result.png", help="image to write (.png, .jpg, .webp...); on a video model "
                                                        "(Wan, HunyuanVideo) a clip: .gif, or .mp4 with imageio-ffmpeg")
    p.add_argument("--method", default="none", help=f"none (baseline only) or a method: {names}")
    p.add_argument("--seed", type=SEED, default=0, help="random seed, 0 to 2**64 - 1 (default 0)")
    p.add_argument("--steps", type=STEPS, default=None, help="denoising steps, >= 1 (default: the model's)")
    p.add_argument("--guidance", type=GUIDANCE, default=None, help="CFG scale, >= 0 (default: the model's)")
    p.add_argument("--size", type=SIZE, default=None,
                   help="height = width in pixels, a multiple of the model's unit (tiny-sd3: 8; default: the model's)")
    p.add_argument("--num-images", type=NUM_IMAGES, default=1, metavar="B",
                   help=f"images per run, 1 to {MAX_IMAGES}: one batch of B from the seed (the pipeline's "
                        f"num_images_per_prompt), written as a grid, a row per run; contextual repulsion acts "
                        f"within this batch")
    p.add_argument("--frames", type=FRAMES, default=None, metavar="F",
                   help="frames per clip on a video model, 1 + a multiple of its VAE's temporal factor (Wan: 1 + 4k; "
                        "default: the model's)")
    p.add_argument("--fps", type=FPS, default=8, help="frames per second of a written clip, 1 to 50 (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_limit_arguments(p)
    p.set_defaults(func=run, method_flags=add_method_arguments(p))


MAX_IMAGES = 16  # a grid row stays viewable; more is a job for the eval harness
NUM_IMAGES = int_arg(1, MAX_IMAGES, f"the number of images (1 to {MAX_IMAGES})")
FRAMES = int_arg(1, None, "the number of frames")
FPS = int_arg(1, 50, "the frames per second (1 to 50)")


def method_params(args) -> dict:
    """The method parameters given on the command line, ``{name: value}`` for ``args.method``.
    A flag of another method (or any method flag with ``--method none``) is a
    :class:`~diffattn.errors.MethodError` naming the method(s) it belongs to."""
    from ..errors import MethodError
    from ..methods.registry import get_method

    given = {dest: v for dest, v in vars(args).items() if dest.startswith(_DEST)}
    method = None if args.method == "none" else get_method(args.method)
    params = {}
    for dest, value in given.items():
        owners = args.method_flags[dest]
        flag = "--" + dest[len(_DEST):].replace("_", "-")
        mine = [name for m, name in owners if method is not None and m == method.name]
        if not mine:
            whose = " / ".join(f"--method {m}" for m, _ in owners)
            now = "no method (--method none)" if method is None else f"--method {method.name}"
            raise MethodError(f"{flag} is an option of {whose}, not of {now}; leave it out or pick that method")
        params[mine[0]] = value
    return params


def heads_flag(pipe, heads):
    """``--heads``: ``mid``, ``all``, a preset JSON, or a site selector (the README's grammar:
    ``transformer_blocks.2-4``, ``m0``, ``joint``...) optionally followed by ``:HEADS``
    (``transformer_blocks.2:0,3``) -> the SoftPAG ``heads`` argument."""
    from ..errors import SelectorError
    from ..methods.softpag import PERTURBABLE_KINDS
    from ..sites import select

    if not isinstance(heads, str) or heads in ("mid", "all") or heads.lower().endswith(".json"):
        return heads
    selector, _, which = heads.partition(":")
    chosen = select(pipe, selector.strip())  # SelectorError lists the sites when nothing matches
    usable = [s for s in chosen if s.kind in PERTURBABLE_KINDS]
    if not usable:
        kinds = sorted({s.kind for s in chosen})
        raise SelectorError(f"--heads {heads!r} selects only {'/'.join(kinds)} attention; SoftPAG perturbs self, joint "
                            f"or single-stream attention (e.g. --heads self, or a site of `diffattn sites`)")
    from ..sites import select_heads

    which = which.strip() or "all"
    for s in usable:
        select_heads(s, which)  # a head that does not exist: SelectorError with the valid range
    return {s.name: which for s in usable}


def precheck_params(method, params: dict) -> None:
    """What can be checked of the method's parameters before the model loads (a preset file)."""
    heads = params.get("heads")
    if method is not None and method.name == "softpag" and isinstance(heads, str) and heads.lower().endswith(".json"):
        from .common import check_input_file

        check_input_file(heads, "--heads")
        from ..methods.softpag import load_preset

        load_preset(heads)  # ControlError: not JSON, not a preset, no heads


def check_kind_args(pipe, args, video: bool) -> None:
    """``--out``, ``--frames``, ``--num-images`` and ``--size`` against the kind of model loaded
    (an image model writes an image, a video model a clip), before anything is generated; a
    :class:`~diffattn.errors.UsageError` says what to write instead."""
    import math
    from pathlib import Path

    from ..errors import UsageError
    from .common import model_label

    ext, what = Path(args.out).suffix.lower(), f"{model_label(args)} ({type(pipe).__name__})"
    if not video:
        if ext in VIDEO_EXTS:
            raise UsageError(f"--out {args.out}: {what} makes images, not clips; write a "
                             f"{' / '.join(IMAGE_EXTS[:3])} file (e.g. {Path(args.out).with_suffix('.png')})")
        if args.frames is not None:
            raise UsageError(f"--frames {args.frames}: {what} makes images; leave --frames out (it sets a video "
                             f"model's clip length)")
        return
    if ext not in VIDEO_EXTS:
        raise UsageError(f"--out {args.out}: {what} is a video model; write the clip as a .gif (e.g. "
                         f"{Path(args.out).with_suffix('.gif')}), or .mp4 with imageio-ffmpeg installed")
    if args.num_images > 1:
        raise UsageError(f"--num-images {args.num_images}: a video model writes one clip per run; use --num-images 1")
    t = int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)
    if args.frames is not None and (args.frames - 1) % t:
        lo = (args.frames - 1) // t * t + 1
        raise UsageError(f"--frames {args.frames}: {what} takes 1 + a multiple of {t} frames (its VAE's temporal "
                         f"factor); use e.g. {lo} or {lo + t}")
    if args.size is not None:  # Wan and HunyuanVideo check sides in multiples of 16, and of one latent token
        patch = getattr(getattr(pipe, "transformer", None), "config", {}).get("patch_size", 1)
        patch = int(patch[-1] if isinstance(patch, (list, tuple)) else patch or 1)
        unit = math.lcm(16, int(getattr(pipe, "vae_scale_factor_spatial", 8)) * patch)
        if args.size % unit:
            lo = max(unit, args.size // unit * unit)
            raise UsageError(f"--size {args.size}: {what} generates sides that are multiples of {unit} pixels; "
                             f"use e.g. {lo} or {lo + unit}")


class AttentionTimer:
    """Wall time spent in the forward of each attention module of a pipeline while entered:
    ``seconds[site name]`` and ``calls[site name]`` (forward pre / post hooks; on CUDA the device
    is synchronised at both ends, so a module's kernels are counted in it). Projections, norms
    and RoPE are inside the module: the time is the attention module's, not the kernel's alone."""

    def __init__(self, pipe):
        from ..errors import UnsupportedModelError
        from ..sites import sites

        try:
            self.sites = sites(pipe)
        except UnsupportedModelError:  # a model with no attention sites: nothing to time
            self.sites = []
        self.seconds = {s.name: 0.0 for s in self.sites}
        self.calls = {s.name: 0 for s in self.sites}
        self._handles: list = []

    def __enter__(self):
        import time

        import torch

        params = (next(s.module.parameters(), None) for s in self.sites)
        cuda = any(p is not None and p.device.type == "cuda" for p in params)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for s in self.sites:
            started: list[float] = []

            def pre(module, args, _started=started):
                sync()
                _started.append(time.perf_counter())

            def post(module, args, output, _started=started, _name=s.name):
                sync()
                self.seconds[_name] += time.perf_counter() - _started.pop()
                self.calls[_name] += 1

            self._handles += [s.module.register_forward_pre_hook(pre), s.module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def total(self, names) -> tuple[float, int]:
        """(seconds, calls) summed over the sites ``names``."""
        return sum(self.seconds.get(n, 0.0) for n in names), sum(self.calls.get(n, 0) for n in names)


def timed_call(fn, device: str):
    """``(fn(), wall seconds)``; a CUDA device is synchronised before the clock stops."""
    import time

    import torch

    start = time.perf_counter()
    result = fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def speed_line(info: dict, dense: AttentionTimer, method: AttentionTimer, walls: tuple[float, float],
               label: str) -> str:
    """The measured speed of a method that names the attention sites it acts on
    (``info["timed_sites"]``): their modules' wall time dense vs method, and the whole call's,
    with the settings in force. Both from one run each, the baseline first."""
    names = info["timed_sites"]
    (d, n), (m, _) = dense.total(names), method.total(names)

    def ratio(a, b):
        return f"{a / b:.2f}x" if b > 0 else "n/a"

    line = (f"attention speedup {ratio(d, m)} (wall time in the {len(names)} attention modules the method may "
            f"sparsify, projections included, {n} calls per run): dense {d:.3f} s | {label} {m:.3f} s; end-to-end "
            f"{ratio(*walls)}: dense {walls[0]:.2f} s | {label} {walls[1]:.2f} s (one run each, the baseline first)")
    if "drop" in info:
        drops = "/".join(f"{x:g}" for x in info["drop"]) or "n/a"
        line += (f"; drop {drops} ({info['mode']}, blocks of {info['block_size']}, configured: the control records no "
                 f"kept-block fractions), sparse in {info['sparse_layers']} of {info['layers']} layers from step "
                 f"{info['dense_steps']}")
    return line


def run(args):
    import contextlib

    import torch

    from ..errors import UsageError
    from ..methods.registry import get_method, is_video_pipeline, methods, split_concepts
    from ..testbed.defaults import method_defaults

    # everything that can be checked is checked before the model loads
    params = method_params(args)  # a flag of another method, an unknown method
    method = None if args.method == "none" else get_method(args.method)
    check_output(args.out, "--out", IMAGE_EXTS + VIDEO_EXTS)
    if args.out.lower().endswith(VIDEO_EXTS):
        check_clip_output(args.out, "--out")  # .mp4 without a writer: refused now, not after generating
    check_call_args(args)
    precheck_params(method, params)
    check_model_args(args)
    if args.num_images > 1 and method is not None and method.kind != "control":
        raise UsageError(f"--num-images {args.num_images}: --method {method.name} runs its own sampling loop on one "
                         f"image at a time; use --num-images 1, or a control method "
                         f"({', '.join(m.name for m in methods() if m.kind == 'control')})")
    pipe = load_for(args)
    # ... and what needs the model before anything is generated
    video = is_video_pipeline(pipe)
    check_kind_args(pipe, args, video)
    check_size_for(pipe, args)
    check_text(pipe, args.prompt, "the prompt")
    if "heads" in params:
        params["heads"] = heads_flag(pipe, params["heads"])
    if method is not None and method.name == "astar" and params.get("concepts"):
        for word in split_concepts(params["concepts"]):
            check_text(pipe, word, "the concept")
    kw = call_kwargs(args)
    if args.num_images > 1:
        kw["num_images_per_prompt"] = args.num_images
    if video:
        kw["output_type"] = "pil"
        if args.frames is not None:
            kw["num_frames"] = args.frames
    built = None
    if method is not None:
        built = method.build(pipe, **{**method_defaults(method.name, pipe), **params})
        built.check(args.prompt)  # the method's input is checked before any image is made
        if built.control is not None:  # its sites / heads / preset model resolve on this model, before any image
            from ..engine import attach

            with attach(pipe, built.control):
                pass
    pipe.set_progress_bar_config(disable=args.no_progress, leave=False, desc="baseline")
    timers = (AttentionTimer(pipe), AttentionTimer(pipe)) if built is not None else None
    base, base_wall = None, None
    if video or method is None or not method.own_baseline:  # IR-Diffusion makes its own baseline panels
        with timers[0] if timers else contextlib.nullcontext():
            base, base_wall = timed_call(lambda: pipe(args.prompt, generator=torch.Generator(args.device)
                                                      .manual_seed(args.seed), **kw), args.device)
    labels, rows, speed = ["baseline"], [], None
    if video:
        clips = [list(base.frames[0])]
        if built is not None:
            pipe.set_progress_bar_config(disable=args.no_progress, leave=False, desc=built.label)
            with timers[1]:
                out, wall = timed_call(lambda: built(args.prompt, generator=torch.Generator(args.device)
                                                     .manual_seed(args.seed), **kw), args.device)
            if not out.frames:
                raise UsageError(f"--method {method.name} returned no clip on the video model {type(pipe).__name__}; "
                                 f"use it on an image model, or a method for video (sparse)")
            clips.append(list(out.frames[0]))
            labels.append(built.label)
            if out.info.get("timed_sites"):
                speed = speed_line(out.info, timers[0], timers[1], (base_wall, wall), method.name)
        n = write_clips(args.out, clips, labels, fps=args.fps)
        print(f"wrote {args.out} ({' | '.join(labels)}, {n} frames)")
        if speed:
            print(speed)
        return
    images = base.images if base is not None else []
    if built is not None:
        pipe.set_progress_bar_config(disable=args.no_progress, leave=False, desc=built.label)
        with timers[1]:
            out, wall = timed_call(lambda: built(args.prompt, generator=torch.Generator(args.device)
                                                 .manual_seed(args.seed), **kw), args.device)
        if out.info.get("timed_sites"):  # e.g. --method sparse on FLUX
            speed = speed_line(out.info, timers[0], timers[1], (base_wall, wall), method.name)
        if out.info.get("own_baseline"):  # e.g. IR-Diffusion: references | its vanilla scene (same noise) | result
            images, labels = list(out.images), list(out.info["labels"])
        else:
            images += out.images
            labels.append(built.label)
        if out.info.get("overlays"):  # e.g. IR-Diffusion's subject masks, under the panels they belong to
            overlays = out.info["overlays"]
            rows = [(out.info.get("overlay_label", "masks"), side_by_side(overlays, [""] * len(overlays)))]
        if out.maps:  # e.g. A-STAR's concept maps, under the method's image
            size = out.images[0].width * (4 if out.images[0].width <= 128 else 1)
            fit = (size * len(images) - COLORBAR_WIDTH) // len(out.maps[0])  # maps + colour bar within the panels
            rows = [(f"{built.label} maps", maps_row(out.maps[0], max(32, min(size, fit))))]
    if args.num_images > 1:  # a row of B per run, the run's label on its first image
        per_run = [images[i : i + args.num_images] for i in range(0, len(images), args.num_images)]
        grid = [side_by_side(run_images, [label] + [""] * (len(run_images) - 1))
                for run_images, label in zip(per_run, labels)]
        result = compose(grid[0], [(label, row) for label, row in zip(labels[1:], grid[1:])])
    else:
        result = side_by_side(images, labels) if len(images) > 1 else images[0]
    if rows:
        result = compose(result, rows)
    result.save(args.out)
    print(f"wrote {args.out} ({' | '.join(labels)})")
    if speed:
        print(speed)
