"""``diffattn protect``: protect images from in-context editing (DeContext, or a baseline).

    diffattn protect photo.png --out protected.png --model black-forest-labs/FLUX.1-Kontext-dev
    diffattn protect photo.png --out protected.png --model tiny-random-kontext --steps 50 --eps 8/255
    diffattn protect photos/ more.png --out-dir protected/ --model M        # many images, resumable
    torchrun --nproc_per_node 2 -m diffattn.cli protect photos/ --out-dir protected/ --model M
    accelerate launch --multi_gpu --num_processes 8 -m diffattn.cli protect photos/ --out-dir protected/ --model M

The protected PNG satisfies ‖protected − input‖∞ ≤ ε exactly (8-bit rounding, then re-projection);
the input file is never overwritten. With ``--out-dir`` the images are split across the processes
of a launch (:meth:`~diffattn.pipelines.decontext.DeContextProtector.protect_batch`): image k of
the list gets the seed ``--seed + k``, so the files are the same with any number of processes,
and a rerun keeps the outputs already written.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import (
    COUNT,
    IMAGE_EXTS,
    SEED,
    STEPS,
    add_limit_arguments,
    check_distinct,
    check_input_file,
    check_output,
    check_side,
    check_steps,
    nonempty,
)

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


DESCRIPTION = """Protect images from in-context editing (DeContext: detach the editor's attention from them), or a
baseline on the same budget. One image: IMAGE --out protected.png. Many: images and folders (their
image files, by name) with --out-dir DIR, written as DIR/<stem>.png; a rerun keeps the outputs already
written (an interrupted batch resumes; --overwrite redoes them). Image k of the list uses the seed
--seed + k, so the files do not depend on the number of processes. To split a batch across processes:

  torchrun --nproc_per_node 2 -m diffattn.cli protect photos/ --out-dir protected/ --model M
      (CPU processes on gloo, or one GPU each)
  accelerate launch --multi_gpu --num_processes 8 -m diffattn.cli protect photos/ --out-dir protected/ --model M
      (one GPU each; on one CPU machine `accelerate launch` starts a single process unless MPI is set
      up, so use torchrun there)

Under a launcher leave --device unset: each process takes its own device. DIR must be on a filesystem
all processes share. The files are byte-identical to a one-process run with the same device type and
intra-op threads (torchrun sets OMP_NUM_THREADS=1 per process; set it for the one-process run too)."""


def register(subparsers) -> None:
    p = subparsers.add_parser("protect", help="protect images from in-context editing (DeContext: detach the "
                                              "editor's attention from them), or a baseline on the same budget",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="+", help="image(s) to protect (RGB; sides multiples of 2 x the VAE factor: 16 px "
                                            "on FLUX.1), or with --out-dir also folders of images")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", default=None, help="the protected image, for one IMAGE (.png: lossless, so ε holds on "
                                                 "the file)")
    out.add_argument("--out-dir", default=None, metavar="DIR",
                     help="folder for the protected images, <stem>.png each (created if missing): several images or "
                          "folders, resumable, split across the processes of torchrun / accelerate launch")
    p.add_argument("--overwrite", action="store_true",
                   help="with --out-dir: protect again the images whose output exists (default: keep them)")
    p.add_argument("--plot", default=None, help="with --out: also write per-block r_ctx, clean vs protected, as a "
                                                "bar chart PNG")
    add_editor_arguments(p)
    p.set_defaults(device=None)  # cpu for one process; under torchrun / accelerate each process's own device
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


def check_paths(args, outputs, inputs=(), image: str | None = None) -> None:
    """Outputs writable PNGs, none of them an input (``image``, default ``args.image``; checked
    before the model loads)."""
    for flag, path in outputs:
        check_output(path, flag, (".png",))
    check_distinct(("", args.image if image is None else image), *inputs, *outputs)
    check_steps(args, args.steps)


def run(args):
    """One image with ``--out`` (:func:`run_one`), many with ``--out-dir`` (:func:`run_batch`)."""
    return run_one(args) if args.out_dir is None else run_batch(args)


def run_one(args):
    """Protect, write the PNG (and the r_ctx chart), print ‖δ‖∞ and the time."""
    from ..errors import UsageError
    from ..distributed import launched_processes
    from .common import open_image

    if len(args.image) > 1:
        raise UsageError(f"--out writes one image but {len(args.image)} were given; write them to a folder with "
                         f"--out-dir DIR")
    (image_path,) = args.image
    if Path(image_path).is_dir():
        raise UsageError(f"{image_path} is a folder; protect its images with --out-dir DIR")
    if args.overwrite:
        raise UsageError("--overwrite applies to --out-dir (--out always writes its file)")
    if (n := launched_processes()) > 1:
        raise UsageError(f"--out protects one image, but this is one of {n} launched processes; launch one process, "
                         f"or protect a batch with --out-dir DIR")
    check_paths(args, [("--out", args.out), ("--plot", args.plot)], image=image_path)
    args.device = args.device or "cpu"
    image = open_image(args, image_path)
    pipe = load_editor(args)
    result = protector_for(args, pipe).protect(image, diagnostics=args.plot is not None or args.method == "decontext")
    result.save(args.out)
    levels = round(args.eps * 255, 2)
    print(f"{args.method}: ‖δ‖∞ = {result.linf}/255 (budget {levels:g}/255), {len(result.losses)} steps in "
          f"{result.seconds:.1f} s")
    if result.shares:
        print(f"mean context share r_ctx over all blocks: {share_change(result)}")
    if args.plot is not None:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    print(f"wrote {args.out}")
    return result


def share_change(result) -> str:
    """``clean a -> protected b``: r_ctx averaged over every block, before and after."""
    clean, prot = (sum(d.values()) / max(1, len(d)) for d in (result.shares["clean"], result.shares["protected"]))
    return f"clean {clean:.4f} -> protected {prot:.4f}"


def expand_images(args, paths) -> list[str]:
    """The image files of the command line in its order, a folder giving its image files (by
    name; not hidden, not recursive); each one an image within ``--max-side`` (from its header)."""
    from PIL import Image, UnidentifiedImageError

    from ..errors import PathError

    files: list[str] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            found = sorted((f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                            and f.suffix.lower() in IMAGE_EXTS), key=lambda f: f.name)
            if not found:
                raise PathError(f"{path}: no image files in this folder (looked for {' '.join(IMAGE_EXTS)})")
            files += [str(f) for f in found]
        else:
            check_input_file(path, "image")
            files.append(str(path))
    for f in files:
        try:
            with Image.open(f) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise PathError(f"image {f} is not an image file PIL can read ({' '.join(str(e).split())})") from None
        check_side(args, max(w, h), f"image {f} is {w}x{h} pixels, which")
    return files


def prepare_out_dir(path: str, inputs) -> Path:
    """``--out-dir``: created if missing (its parent must exist), writable, not an input folder
    (a rerun would take the protected images as inputs)."""
    from ..errors import PathError

    d = Path(path)
    if d.exists() and not d.is_dir():
        raise PathError(f"--out-dir {path} is a file; give a folder (created if missing)")
    if not d.exists() and not d.resolve().parent.is_dir():
        raise PathError(f"--out-dir {path}: the folder {d.resolve().parent} does not exist; create it first")
    for src in inputs:
        if Path(src).is_dir() and Path(src).resolve() == d.resolve():
            raise PathError(f"--out-dir {path} is the input folder {src}: a rerun would take the protected images as "
                            f"inputs; write them to another folder")
    d.mkdir(exist_ok=True)  # every process of a launch may do this at once
    if not os.access(d, os.W_OK | os.X_OK):
        raise PathError(f"--out-dir {path}: no permission to write there; pick a folder you can write to")
    return d


def run_batch(args):
    """Protect every image into ``--out-dir`` (this process's share under a launcher), print a
    line per image as it is written, and on the main process the outputs in input order and the
    wall time of the batch."""
    import time

    from ..errors import UsageError
    from ..pipelines.decontext import batch_state

    if args.plot is not None:
        raise UsageError("--plot draws one image's chart: use it with --out (with --out-dir each image's context "
                         "share is printed)")
    images = expand_images(args, args.image)
    out_dir = prepare_out_dir(args.out_dir, args.image)
    check_steps(args, args.steps)
    state = batch_state()  # None for a lone process: no process group
    main_process = state is None or state.is_main_process
    args.device = args.device or (str(state.device) if state is not None else "cpu")
    pipe = load_editor(args)
    protector = protector_for(args, pipe)
    protector.progress = main_process  # one progress bar on the terminal
    world = 1 if state is None else state.num_processes
    tag = "" if world == 1 else f"[process {state.process_index + 1}/{world}] "

    def report(k, path, result):
        line = (f"{tag}{k + 1}/{len(images)} {images[k]} -> {path}: ‖δ‖∞ = {result.linf}/255, "
                f"{len(result.losses)} steps in {result.seconds:.1f} s")
        print(line + (f", mean r_ctx {share_change(result)}" if result.shares else ""), flush=True)

    start = time.perf_counter()
    try:
        paths = protector.protect_batch(images, out_dir, resume=not args.overwrite,
                                        diagnostics=args.method == "decontext", on_image=report)
    finally:
        if state is not None:  # the command ends here: close the process group (a clean exit on errors too)
            state.destroy_process_group()
    seconds = time.perf_counter() - start
    if main_process:
        for path in paths:
            print(f"wrote {path}")
        print(f"{args.method}: {len(paths)} protected images in {out_dir} with {world} process"
              f"{'es' if world > 1 else ''} in {seconds:.2f} s", flush=True)
    return paths
