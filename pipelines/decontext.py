"""DeContext: protect an image from in-context editing (FLUX.1 Kontext), with baselines.

Shen, Cui & Yang, "DeContext as Defense: Safe Image Editing in Diffusion Transformers"
(arXiv 2512.16625, §3; method note ``reference/vmix_repulsion_decontext.md`` §3).

    from diffattn.pipelines import DeContextProtector, protect
    result = protect("photo.png", kontext_pipe, steps=800)       # FluxKontextPipeline
    result.save("protected.png")                                 # ‖δ‖∞ ≤ ε holds on this file
    result.shares                                                # per-block r_ctx, clean vs protected

**The attack** (paper Eqs. 7-10). The protected image is the editor's *context image*: pixels
x -> VAE (posterior mode, then (z − shift)·scale) -> FLUX's 2×2 packing (context position ids,
first coordinate 1) -> one transformer forward of ``FluxKontextPipeline``'s denoiser beside a
noisy target. Each of these parts is the editor's pipeline adapter's (the family's
``editor_adapters()``: ``FluxKontextAdapter`` in ``diffattn.families.flux``); this loop knows
no family. :class:`~diffattn.methods.decontext.ContextShareProbe` records, at the selected
blocks, the context proportion r_ctx of the target queries (softmax over the whole joint key
set, from two row log-sum-exps, no map); the loss L = 1 − r̄_ctx is ascended by L∞ PGD,

    x ← clip_[0,1]( clip_[x0−ε, x0+ε]( x + α·sign(∇_x L) ) )                    (Eq. 10)

Per step (expectation over transformations, as the official ``attack_decontext.py``): a random
instruction of the pool, t ~ U[0.98, 1] (the official code draws the integer timesteps
980-999 of 1000: the same window, continuous here) and a fresh pure-Gaussian target latent; the guidance
embedding 3.5 (for models that have one). Defaults are the paper's (``scripts/attack_kontext.sh``):
α = 0.005 and ε = 0.1 in [−1, 1] units, i.e. α = 0.0025 and ε = 0.05 (12.75/255) in the
[0, 1] units used here, 800 steps, no random start; blocks: the single-stream blocks of the
front two thirds (FLUX.1: 0-25 of 38, Table 5's best). The forward stops after the last
selected block (the rest cannot change the shares).

**Fixes over the official code** (note §3.3): the segments come from the token layout (any
resolution; a context image of another size than the target), zero selected blocks is an
error rather than a constant zero loss, and the result is quantised to 8 bits and re-projected
(round, then clip into the ε-ball in 8-bit units), so ‖δ‖∞ ≤ ε holds *on the saved PNG*.

**Baselines** on the same budget and the same loop (different loss; ``method=``):

- ``"encoder"``: PhotoGuard's encoder attack: minimise ‖E(x) − E(x_grey)‖² (the VAE latent
  pushed toward the latent of a grey image);
- ``"diffpgd"``: Diff-PGD / AdvDM on the editor: maximise the flow-matching loss
  ‖v̂(x_t, t | ctx = E(x)) − (ε − z*)‖² with t ~ U[0, 1], x_t = (1 − t)·z* + t·ε and z* the clean
  image's latent (the identity edit's target; the paper's code uses clean edits instead);
- ``"random"``: uniform random ±ε sign noise (no gradient, no steps).

Images must have sides that are multiples of ``2 × vae_scale_factor`` (16 px on FLUX.1, 4 on
the tiny test pipelines): ``FluxKontextPipeline`` floors the context image's sides to that
multiple and, with ``_auto_resize=True`` (its default), first resizes it to the nearest of its
preferred Kontext resolutions; a perturbation made at another size would be resampled. Call the
editor with ``_auto_resize=False`` and ``max_area=H·W`` to edit the protected pixels as saved.

**Many images** (:meth:`DeContextProtector.protect_batch`): image k of the list uses the EOT
seed ``config.seed + k``, so its protected PNG depends on the list and the settings only, not on
how many processes share the work nor on where an earlier run stopped. Launched as several
processes (``torchrun --nproc_per_node N`` on CPUs or GPUs, ``accelerate launch --multi_gpu
--num_processes N`` on GPUs), the main process plans the batch (which outputs are missing, every
input checked), broadcasts the plan, and accelerate's ``PartialState.split_between_processes``
hands each process a contiguous share of the missing images; each output is written to a
temporary file and renamed into place (``os.replace``), so a killed run never leaves a truncated
PNG that a resumed run would keep. ::

    torchrun --nproc_per_node 2 -m diffattn.cli protect photos/ --out-dir protected/ --model M
    accelerate launch --multi_gpu --num_processes 8 -m diffattn.cli protect photos/ --out-dir protected/ --model M

Outputs are byte-identical to a one-process run when every process computes as that run does:
the same device type and the same number of intra-op threads (torchrun sets
``OMP_NUM_THREADS=1`` per process; set it for the one-process run too).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffattn.distributed import distributed_state, launched_processes
from diffattn.engine import gradient_checkpointing
from diffattn.errors import ConfigError, DiffattnError, ImageInputError, PathError, UnsupportedModelError
from diffattn.families import RunState, adapter_for, families
from diffattn.images import to_rgb
from diffattn.methods.decontext import (
    CONTEXT_KINDS,
    ContextShareProbe,
    SharesComplete,
    decontext_loss,
    front_single_blocks,
)
from diffattn.pipelines import configure, frozen_weights

METHODS = ("decontext", "encoder", "diffpgd", "random")

# A default instruction pool for EOT (deduplicated; the paper's pool has 60 prompts on faces):
# the testbed's shapes-world edits first, then portrait / object edits of the paper's categories
# (expressions, accessories, pose, style, scene, combined).
DEFAULT_INSTRUCTIONS = (
    "make the circle blue", "make the square red", "make the triangle green", "make the circle yellow",
    "move the square to the left", "move the circle to the right", "move the triangle up", "move the square down",
    "add a yellow triangle", "add a red circle", "add a blue square", "give the circle stripes",
    "give the square a dot", "remove the square", "remove the circle", "make everything purple",
    "put the shapes on a dark background", "make the triangle bigger", "swap the colours of the shapes",
    "outline every shape",
    "make this person smile", "make this person look surprised", "make this person frown",
    "make this person laugh", "make this person look angry", "make this person close their eyes",
    "put sunglasses on this person", "give this person a hat", "add a scarf", "give this person earrings",
    "give this person a beard", "put a crown on their head", "turn the head to the left",
    "make this person look up", "show this person waving", "make this person raise a hand",
    "turn this into an oil painting", "make it a pencil sketch", "render it as a cartoon",
    "make it look like a watercolour", "turn it into pixel art", "make it a black and white photo",
    "place this person on a beach", "put this in a snowy forest", "move the scene to a city street at night",
    "put this in a library", "change the background to a sunset", "place it in outer space",
    "make it rain", "make the lighting warmer", "a photo of this person at a party",
    "this person as an astronaut", "this person reading a book in a park", "make this person older",
    "make this person younger", "give this person curly hair", "make the hair blond",
    "make this person wear a suit", "turn the photo into a movie poster", "make this person smile and wave",
)


# ----------------------------------------------------------------------------- pure functions


def eps_levels(eps: float) -> int:
    """ε in whole 8-bit levels: ⌊255·ε⌋ (with a 1e-9 tolerance so 8/255 gives 8). The saved
    8-bit file can move each pixel by whole levels only, so this is the budget it may use."""
    return int(math.floor(255.0 * float(eps) + 1e-9))


def pgd_step(x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """One L∞ PGD ascent step (paper Eq. 10; Madry et al. 2018): x + α·sign(∇), projected onto the
    ε-ball around the clean x0, then onto the valid pixel range [0, 1]."""
    stepped = x + alpha * grad.sign()
    return torch.min(torch.max(stepped, x0 - eps), x0 + eps).clamp(0.0, 1.0)


def quantize_protected(x: np.ndarray, clean: np.ndarray, eps: float) -> np.ndarray:
    """The 8-bit image that is saved: round x [H, W, 3] in [0, 1] to 8 bits, then re-project
    into the ε-ball of the 8-bit clean image in whole levels, |q − clean| ≤ ⌊255·ε⌋, and
    into 0..255. Rounding alone can leave a pixel half a level outside the ball (the official
    code's caveat); clipping after it makes ‖q − clean‖∞ / 255 ≤ ε exact on the file."""
    levels = eps_levels(eps)
    c = clean.astype(np.int32)
    q = np.rint(np.asarray(x, dtype=np.float64) * 255.0).astype(np.int32)
    return np.clip(np.clip(q, c - levels, c + levels), 0, 255).astype(np.uint8)


def random_sign_noise(clean: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """The random baseline: x0 + ε·s with s uniform in {−1, +1} per pixel, clamped to [0, 1]."""
    s = torch.randint(0, 2, clean.shape, generator=generator).to(clean) * 2 - 1
    return (clean + eps * s).clamp(0.0, 1.0)


def flow_noisy(z: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """Rectified flow's noisy latent x_t = (1 − t)·z + t·ε (FLUX, t in [0, 1]); its velocity
    target is ε − z."""
    return (1.0 - t) * z + t * noise


# ----------------------------------------------------------------------------- configuration and result


@dataclass
class DeContextConfig:
    """Settings of :class:`DeContextProtector` (defaults: the paper's, in [0, 1] pixel units).

    method:        "decontext" (default), "encoder" (PhotoGuard), "diffpgd" (Diff-PGD / AdvDM) or
                   "random" (±ε sign noise).
    eps:           L∞ budget in [0, 1] units, in (0, 1] (default 0.05 = 12.75/255, the paper's 0.1
                   in [−1, 1]); the saved file uses ⌊255·ε⌋ levels.
    alpha:         PGD step in [0, 1] units (default 0.0025 = the paper's 0.005 in [−1, 1]).
    steps:         PGD iterations (paper: 800).
    blocks:        "auto" (the single-stream blocks of the front ``block_fraction``) or a site
                   selector (``"single_transformer_blocks.0-25"``, ``"joint"``, a list...).
    block_fraction: the front fraction of the single-stream blocks for "auto" (2/3).
    instructions:  the EOT pool (``None``: :data:`DEFAULT_INSTRUCTIONS`), deduplicated.
    negative_share: the share of EOT draws that run the editor's unconditional forward (the
                   empty instruction) instead. An editor sampled with true classifier-free
                   guidance (``true_cfg_scale`` > 1) predicts ``uncond + s·(cond − uncond)``, and
                   its uncond forward reads the context image too, so a defence that only
                   detaches the cond forward leaves half of what the edit sees. ``None``: as the
                   editor runs, 0.5 when its call defaults use true CFG (the testbed's
                   tiny-kontext), else 0 (FLUX.1 Kontext dev is guidance-distilled: one forward,
                   the paper's setting).
    t_range:       the target's timestep is drawn from U[lo, hi] (FLUX units, 0..1; paper 0.98-1).
    guidance_scale: the guidance embedding, for models that have one (paper 3.5).
    max_sequence_length: T5 tokens (``None``: the pipeline's default 512, or the testbed's).
    target_size:   (height, width) of the target image in pixels (``None``: the image's own).
    gradient_checkpointing: recompute block activations in the backward (paper; needed for
                   the full 12B model, slower on small ones).
    early_exit:    stop each forward after the last selected block.
    random_start:  start from uniform noise in the ε-ball (the paper: no).
    encoder_grey:  grey level of the encoder attack's target image.
    diffpgd_t_range: Diff-PGD's timestep range (AdvDM: all of [0, 1]).
    seed:          the EOT sampling seed (instructions, timesteps, noise).
    """

    method: str = "decontext"
    eps: float = 0.05
    alpha: float = 0.0025
    steps: int = 800
    blocks: object = "auto"
    block_fraction: float = 2 / 3
    instructions: Sequence[str] | None = None
    negative_share: float | None = None
    t_range: tuple[float, float] = (0.98, 1.0)
    guidance_scale: float = 3.5
    max_sequence_length: int | None = None
    target_size: tuple[int, int] | None = None
    gradient_checkpointing: bool = False
    early_exit: bool = True
    random_start: bool = False
    encoder_grey: float = 0.5
    diffpgd_t_range: tuple[float, float] = (0.0, 1.0)
    seed: int = 0

    def validate(self) -> "DeContextConfig":
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not 0.0 < float(self.eps) <= 1.0:
            raise ConfigError(f"eps={self.eps!r}: the L∞ budget is a fraction of the pixel range in (0, 1] "
                              f"(8/255 ≈ 0.0314; the paper's 12.75/255 = 0.05)")
        if eps_levels(self.eps) < 1:
            raise ConfigError(f"eps={self.eps:g} is below one 8-bit level (1/255 ≈ 0.0039): the saved PNG could not "
                              f"differ from the input; use at least 1/255")
        if not (isinstance(self.alpha, numbers.Real) and 0.0 < float(self.alpha) <= 1.0):
            raise ConfigError(f"alpha={self.alpha!r}: the PGD step is a fraction of the pixel range in (0, 1]")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r}: at least 1 PGD step")
        for name in ("t_range", "diffpgd_t_range"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: (lo, hi) with 0 <= lo <= hi <= 1 (FLUX timesteps)")
        if not 0.0 < self.block_fraction <= 1.0:
            raise ConfigError(f"block_fraction={self.block_fraction}: a fraction in (0, 1]")
        if self.instructions is not None:
            if isinstance(self.instructions, str) or not all(isinstance(p, str) and p.strip()
                                                             for p in self.instructions) or not self.instructions:
                raise ConfigError("instructions: a non-empty list of non-empty edit instructions")
        share = self.negative_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, numbers.Real)
                                  or not 0.0 <= float(share) <= 1.0):
            raise ConfigError(f"negative_share={share!r}: the share of EOT draws on the unconditional forward, in "
                              f"[0, 1] (None: 0.5 for an editor sampled with true CFG, else 0)")
        if self.target_size is not None and (len(self.target_size) != 2 or min(self.target_size) < 1):
            raise ConfigError(f"target_size={self.target_size!r}: (height, width) in pixels")
        if not 0.0 <= self.encoder_grey <= 1.0:
            raise ConfigError(f"encoder_grey={self.encoder_grey}: a grey level in [0, 1]")
        return self


@dataclass
class ProtectionResult:
    """image: the protected 8-bit image (PIL, what :meth:`save` writes); clean: the input as
    8 bits; method, eps; linf: max |protected − clean| in 8-bit levels (≤ ⌊255·ε⌋); losses: the
    loss of every PGD step (the maximised quantity); seconds: wall time of the attack;
    shares: ``{"clean": {site: r̄_ctx}, "protected": {site: r̄_ctx}}`` over every double and
    single block (``None`` when diagnostics were off)."""

    image: Image.Image
    clean: Image.Image
    method: str
    eps: float
    linf: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    shares: dict | None = None
    source: str | None = None  # the input file, when the image came from one (never overwritten)
    provenance: dict | None = None  # what made it (DeContextProtector.provenance), kept in the PNG

    def save(self, path) -> Path:
        """Write the protected image as PNG (lossless: the ε guarantee holds on the file). Refuses
        other formats and the input file itself."""
        p = Path(path)
        if p.suffix.lower() != ".png":
            raise PathError(f"{path}: save the protected image as .png; a lossy format (JPEG, WebP) would move "
                            f"pixels outside the ε-ball and change the perturbation")
        if self.source is not None and p.resolve() == Path(self.source).resolve():
            raise PathError(f"{path} is the input image itself; write the protected image to another file")
        write_png_atomic(self.image, p, provenance=self.provenance)
        return p

    def plot(self, path) -> Path:
        """A bar chart of per-block r̄_ctx, clean vs protected (PNG, drawn with PIL)."""
        if not self.shares:
            raise ConfigError("this result has no per-block shares: protect with diagnostics=True")
        plot_shares(self.shares, path)
        return Path(path)


PROVENANCE_KEY = "diffattn-protection"  # the PNG text chunk holding a protected file's provenance


def write_png_atomic(image: Image.Image, path: Path, provenance: dict | None = None) -> None:
    """Write ``image`` as PNG to ``path`` all at once: to ``.<name>.<pid>.part`` beside it, then
    ``os.replace`` (atomic on one filesystem), so a process killed mid-write leaves no truncated
    ``path`` (only a hidden ``.part`` file, never read back) and readers see the old file or the new.
    ``provenance`` (JSON) goes into a text chunk (:data:`PROVENANCE_KEY`; pixels untouched)."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if provenance is not None:
        info = PngInfo()
        info.add_text(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def plot_shares(shares: dict, path, *, height: int = 160) -> None:
    """Per-block r̄_ctx bars, clean (grey) beside protected (red), blocks in forward order."""
    from PIL import ImageDraw

    names = list(shares["clean"])
    bar, gap, pad = 8, 6, 24
    width = max(340, pad * 2 + len(names) * (2 * bar + gap))  # room for the title
    top = max([1e-6] + [v for d in shares.values() for v in d.values()])
    canvas = Image.new("RGB", (width, height + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), f"r_ctx per block (max {top:.3f}): clean grey, protected red", fill="black")
    base = height + pad
    for i, name in enumerate(names):
        x = pad + i * (2 * bar + gap)
        for j, (key, colour) in enumerate((("clean", (150, 150, 150)), ("protected", (210, 40, 40)))):
            v = shares.get(key, {}).get(name, 0.0)
            draw.rectangle([x + j * bar, base - int(height * v / top), x + (j + 1) * bar - 1, base], fill=colour)
        draw.text((x, base + 2), name.split(".")[0][0] + name.split(".")[1], fill="black")  # t0 / s3
    canvas.save(path)


# ----------------------------------------------------------------------------- inputs


def check_editor(pipe):
    """The in-context editor adapter serving ``pipe`` (the first of the registered families'
    ``editor_adapters()`` that serves it: ``FluxKontextAdapter`` for a ``FluxKontextPipeline`` or
    a subclass); ``UnsupportedModelError`` for any other pipeline, naming the editors served."""
    try:
        return adapter_for(pipe, editor=True)
    except UnsupportedModelError:
        pass
    name = type(pipe).__name__
    try:
        adapter_for(pipe)  # a pipeline diffattn's text-to-image loops serve
        hint = f" ({name} generates from text only; it has no context image to detach)"
    except UnsupportedModelError:
        hint = ""
    editors = " or a ".join(n for fam in families() for cls in fam.editor_adapters() for n in cls.pipeline_names)
    raise UnsupportedModelError(
        f"DeContext protects images against in-context editors: it needs a {editors}; got {name}{hint}")


def read_image(image) -> tuple[np.ndarray, str | None]:
    """A path, a PIL image, a uint8 array [H, W, 3] or a float array / tensor in [0, 1]
    ([H, W, 3], [3, H, W] or [1, 3, H, W]) -> (uint8 [H, W, 3], the source path or ``None``).

    Files that are not images, or are truncated, raise :class:`ImageInputError`; images are
    read as a viewer shows them (``diffattn.images.to_rgb``, as the CLI and the app read them:
    EXIF orientation applied, alpha over white, 16-bit scaled). Floats are rounded to 8 bits: the ε-ball is
    around the 8-bit image."""
    source = None
    if isinstance(image, (str, Path)):
        source = str(image)
        p = Path(image)
        if not p.is_file():
            raise ImageInputError(f"{image}: no such image file")
        try:
            with Image.open(p) as im:
                im.load()
                image = im.copy()
        except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
            raise ImageInputError(f"{image} is not a readable image (not an image file, or truncated / damaged: "
                                  f"{' '.join(str(e).split())}); re-export it as PNG") from None
    if isinstance(image, Image.Image):
        return np.array(to_rgb(image), dtype=np.uint8), source
    if torch.is_tensor(image):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ImageInputError(f"an image tensor must be [3, H, W] (or [1, 3, H, W]) RGB in [0, 1]; got "
                                  f"{tuple(image.shape)}")
        image = t.permute(1, 2, 0).numpy()  # [H, W, 3]
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ImageInputError(f"an image array must be [H, W, 3] RGB; got shape {image.shape}")
        if image.dtype == np.uint8:
            return image.copy(), source
        arr = image.astype(np.float64)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageInputError("a float image must hold finite values in [0, 1]")
        return np.rint(arr * 255).astype(np.uint8), source
    raise ImageInputError(f"cannot read an image from {type(image).__name__}; pass a path, a PIL image, an array "
                          f"[H, W, 3] or a tensor [3, H, W]")


def finished_output(path: Path, size: tuple[int, int], provenance: dict | None = None) -> bool:
    """Whether ``path`` holds a complete PNG of ``size`` (width, height) and, with
    ``provenance``, one written from the same input by the same settings and seed (its text
    chunk, :func:`write_png_atomic`): an earlier run's output, which a resumed batch keeps. A
    missing, truncated, damaged or other-size file is not, nor one of other settings, another
    input or unknown origin (the image is protected again)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.load()  # decodes every row: a truncated file raises here
            if im.format != "PNG" or im.size != tuple(size):
                return False
            if provenance is None:
                return True
            return json.loads(im.text.get(PROVENANCE_KEY, "null")) == json.loads(json.dumps(provenance, sort_keys=True))
    except (OSError, ValueError, SyntaxError):
        return False


# ----------------------------------------------------------------------------- distribution

# How long a process may wait for the others at a batch's barriers. The shares of a batch differ
# by at most one image, but one image of the full 12B editor takes minutes on a GPU (hours on a
# CPU): torch's defaults (30 min on gloo, 10 min on NCCL) would abort a finished process waiting
# for a busy one. A crashed process does not hang the others: torchrun stops them all.
BATCH_TIMEOUT = datetime.timedelta(hours=24)

def batch_state(timeout: datetime.timedelta = BATCH_TIMEOUT):
    """The ``accelerate.PartialState`` of a multi-process launch (:func:`diffattn.distributed.distributed_state`),
    its process group waiting up to ``timeout`` at a barrier; ``None`` for a lone process, which
    then starts no accelerate state and no process group at all."""
    return distributed_state(timeout) if launched_processes() > 1 else None


# ----------------------------------------------------------------------------- the protector


@dataclass
class _Sample:
    """One EOT draw: the instruction, the timestep (FLUX units) and the target noise [1, C, h, w]."""

    instruction: str
    t: float
    noise: torch.Tensor


class DeContextProtector:
    """L∞ PGD protection of images against a ``FluxKontextPipeline`` (module docstring).

    pipe:   a ``FluxKontextPipeline`` (its modules are shared, never modified; weights are
            frozen only while an attack runs); ``.adapter`` is its editor adapter, which does
            every family-specific part (VAE, packing, the forward, the size rule);
    config: a :class:`DeContextConfig`; keyword ``overrides`` replace its fields;
    progress: a tqdm bar per image (``None``: follow the pipeline's progress-bar config).
    """

    def __init__(self, pipe, config: DeContextConfig | None = None, *, progress: bool | None = None, **overrides):
        self.adapter = check_editor(pipe)
        self.pipe = pipe
        self.config = configure(config, DeContextConfig, overrides, ConfigError, "DeContext")
        if progress is None:
            progress = not getattr(pipe, "_progress_bar_config", {}).get("disable", False)
        self.progress = bool(progress)
        from diffattn.sites import sites

        self.all_sites = [s for s in sites(self.transformer) if s.kind in CONTEXT_KINDS]
        self.blocks = self._blocks()
        self.instructions = tuple(dict.fromkeys(p.strip() for p in (self.config.instructions or DEFAULT_INSTRUCTIONS)))
        self.negative_share = self._negative_share()
        self._embeds: dict[str, dict] = {}

    def __repr__(self):
        return f"DeContextProtector({type(self.pipe).__name__}, method={self.config.method!r}, {len(self.blocks)} blocks)"

    # ------------------------------------------------------------------ properties
    @property
    def transformer(self):
        """The editor's denoiser."""
        return self.adapter.denoiser

    @property
    def device(self):
        return self.adapter.device

    @property
    def size_unit(self) -> int:
        """Image sides must be multiples of this many pixels (the editor's context-image unit:
        FLUX Kontext's VAE factor × its 2×2 packing)."""
        return self.adapter.context_size_unit

    def _blocks(self) -> list[str]:
        """The site names whose r_ctx enters the loss; zero of them is an error."""
        cfg = self.config
        if isinstance(cfg.blocks, str) and cfg.blocks == "auto":
            names = front_single_blocks(self.all_sites, cfg.block_fraction)
        elif isinstance(cfg.blocks, (list, tuple, set, frozenset)) and not cfg.blocks:
            names = []
        else:
            from diffattn.sites import select

            names = [s.name for s in select(self.all_sites, cfg.blocks)]
        if not names and cfg.method == "decontext":
            raise ConfigError(f"blocks={cfg.blocks!r} selects no double- or single-stream block of this transformer, so "
                              f"the DeContext loss would be a constant with no gradient; pick some, e.g. 'auto', "
                              f"'single', or 'single_transformer_blocks.0-1'")
        return names

    def _negative_share(self) -> float:
        """``config.negative_share``, or for ``None`` the editor's own use of an unconditional
        forward: 0.5 when its call defaults sample with true CFG (every step runs the cond and
        the uncond forward once each), else 0."""
        if self.config.negative_share is not None:
            return float(self.config.negative_share)
        return 0.5 if float(self.adapter.call_defaults().get("true_cfg_scale", 1.0)) > 1.0 else 0.0

    # ------------------------------------------------------------------ pieces of the forward
    def check_size(self, height: int, width: int, what: str = "image") -> None:
        """``ImageInputError`` for sides the editor would resample (explaining its rounding)."""
        self.adapter.check_context_size(height, width, what)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [0, 1] -> the editor's image latents [B, C, h, w], as the
        pipeline encodes its context image; differentiable in x."""
        return self.adapter.encode_image(x)

    def pack(self, z: torch.Tensor, context: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [B, C, h, w] -> (tokens [B, N, 4C], position ids [N, 3]) with the pipeline's own
        packing, as the context image (``context``) or the generated target."""
        return self.adapter.pack_context(z) if context else self.adapter.pack_target(z)

    def embed(self, instruction: str) -> dict:
        """The denoiser's conditioning of one instruction (the adapter's ``encode_prompt``: T5
        tokens and pooled CLIP), encoded once (no gradient)."""
        if instruction not in self._embeds:
            n = self.config.max_sequence_length or self.adapter.call_defaults().get(
                "max_sequence_length", self.adapter.default_max_sequence_length)
            with torch.no_grad():
                self._embeds[instruction] = self.adapter.encode_prompt([instruction], max_sequence_length=n)[0]
        return self._embeds[instruction]

    def denoise(self, target: torch.Tensor, target_ids: torch.Tensor, context: torch.Tensor,
                context_ids: torch.Tensor, t: float, instruction: str) -> torch.Tensor:
        """One forward of the editor's denoiser on ``[target ‖ context]`` tokens at flow time t,
        as the pipeline runs it -> the target tokens' velocity [B, N_tgt, 4C]."""
        return self.adapter.predict_with_context(None, target, target_ids, context, context_ids, t,
                                                 self.embed(instruction), float(self.config.guidance_scale))

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return self.adapter.latent_hw(height, width)

    def sample(self, generator: torch.Generator, latent_hw: tuple[int, int], t_range=None) -> _Sample:
        """One EOT draw: a random instruction, t ~ U[t_range], a fresh Gaussian target latent; with
        probability :attr:`negative_share` the instruction is the empty one (the unconditional
        forward of true CFG), drawn last so a share of 0 leaves the other draws as they were."""
        lo, hi = t_range or self.config.t_range
        i = int(torch.randint(len(self.instructions), (1,), generator=generator))
        t = lo + (hi - lo) * float(torch.rand((), generator=generator))
        noise = torch.randn((1, self.adapter.latent_channels, *latent_hw), generator=generator)
        instruction = self.instructions[i]
        if self.negative_share > 0 and float(torch.rand((), generator=generator)) < self.negative_share:
            instruction = ""  # the negative prompt of the testbed's true-CFG calls (ShapesKontextPipeline)
        return _Sample(instruction, t, noise.to(self.device, self.transformer.dtype))

    # ------------------------------------------------------------------ shares
    def _shares_forward(self, probe: ContextShareProbe, x: torch.Tensor, s: _Sample, target_hw):
        """Run one forward with ``probe`` attached (records its shares); stops at SharesComplete."""
        ctx, ctx_ids = self.pack(self.encode(x), context=True)
        tgt, tgt_ids = self.pack(s.noise, context=False)  # pure noise at t ≈ 1 (the paper's target)
        probe.start()
        try:
            self.denoise(tgt, tgt_ids, ctx, ctx_ids, s.t, s.instruction)
        except SharesComplete:
            pass
        return dict(probe.records)

    @torch.no_grad()
    def shares(self, image, *, samples: int = 4, seed: int = 1234) -> dict[str, float]:
        """r̄_ctx of every double and single block for ``image`` (any form :func:`read_image`
        takes), averaged over ``samples`` EOT draws of a fixed seed (the same draws for any
        image, so clean and protected compare): ``{site name: share}``."""
        from diffattn.engine import attach

        u8, _ = read_image(image)
        H, W = u8.shape[:2]
        self.check_size(H, W)
        x = torch.from_numpy(u8).permute(2, 0, 1)[None].float().div(255)  # [1, 3, H, W]
        target_hw = self._latent_hw(*(self.config.target_size or (H, W)))
        gen = torch.Generator().manual_seed(seed)
        probe = ContextShareProbe([s.name for s in self.all_sites])
        sums: dict[str, float] = {}
        with attach(self.transformer, probe, run=RunState()):
            for _ in range(samples):
                for name, r in self._shares_forward(probe, x, self.sample(gen, target_hw), target_hw).items():
                    sums[name] = sums.get(name, 0.0) + float(r.mean()) / samples
        return {s.name: sums[s.name] for s in self.all_sites if s.name in sums}

    def provenance(self, clean_u8: np.ndarray, seed: int) -> dict:
        """What a protected file is the product of, as JSON: the settings (every config field),
        the EOT seed, the editor (transformer class and config, a digest) and the clean pixels (a
        digest). A resumed batch keeps an output only when its record equals this."""
        config = json.loads(json.dumps(dataclasses.asdict(self.config), sort_keys=True, default=str))
        editor = json.dumps({"class": type(self.transformer).__name__, "config": dict(self.transformer.config)},
                            sort_keys=True, default=str)
        return {"config": config, "seed": int(seed), "negative_share": self.negative_share,
                "editor_sha256": hashlib.sha256(editor.encode()).hexdigest()[:16],
                "clean_sha256": hashlib.sha256(np.ascontiguousarray(clean_u8).tobytes()
                                               + str(clean_u8.shape).encode()).hexdigest()[:16]}

    # ------------------------------------------------------------------ the attack
    def protect(self, image, *, callback: Callable[[dict], None] | None = None, diagnostics: bool = True,
                seed: int | None = None) -> ProtectionResult:
        """Protect one image (a path, PIL image, array or tensor; sides multiples of
        :attr:`size_unit`) -> :class:`ProtectionResult` (the 8-bit protected image, ‖δ‖∞ ≤ ε).

        callback: ``callback(info)`` after every PGD step (``RunState.report``: ``step``,
        ``total``, ``stage`` = "protect", ``timestep``, and ``loss``, ``linf`` (levels of the
        current float δ·255), ``instruction``, ``image`` (the current pixels [1, 3, H, W]));
        diagnostics: also measure per-block r̄_ctx, clean vs the saved protected image;
        seed: the EOT seed (default the config's)."""
        cfg = self.config
        u8, source = read_image(image)
        H, W = u8.shape[:2]
        self.check_size(H, W)
        if cfg.target_size is not None:
            self.check_size(*cfg.target_size, what=f"target_size {cfg.target_size}")
        x0 = torch.from_numpy(u8).permute(2, 0, 1)[None].float().div(255).to(self.device)  # [1, 3, H, W]
        seed = cfg.seed if seed is None else int(seed)
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        if cfg.method == "random":
            x, losses = random_sign_noise(x0.cpu(), cfg.eps, gen), []
        else:
            x, losses = self._attack(x0, gen, callback)
        seconds = time.perf_counter() - start
        q = quantize_protected(x[0].permute(1, 2, 0).detach().cpu().numpy(), u8, cfg.eps)  # [H, W, 3] uint8
        linf = int(np.abs(q.astype(np.int32) - u8.astype(np.int32)).max())
        result = ProtectionResult(image=Image.fromarray(q, "RGB"), clean=Image.fromarray(u8, "RGB"), method=cfg.method,
                                  eps=float(cfg.eps), linf=linf, losses=losses, seconds=seconds, source=source,
                                  provenance=self.provenance(u8, seed))
        if diagnostics:
            result.shares = {"clean": self.shares(u8), "protected": self.shares(q)}
        return result

    def _attack(self, x0: torch.Tensor, gen: torch.Generator, callback) -> tuple[torch.Tensor, list[float]]:
        """The PGD loop shared by every gradient method; only the loss differs."""
        from diffattn.engine import attach

        cfg = self.config
        H, W = x0.shape[-2:]
        target_hw = self._latent_hw(*(cfg.target_size or (H, W)))
        run = RunState(callback=callback, progress=self.progress, desc="protect")
        probe = None
        if cfg.method == "decontext":
            probe = ContextShareProbe(self.blocks, requires_grad=True, early_exit=cfg.early_exit)
            loss_fn = self._decontext_loss(probe, target_hw)
        elif cfg.method == "encoder":
            loss_fn = self._encoder_loss(x0)
        else:
            loss_fn = self._diffpgd_loss(x0, target_hw)
        x = x0.clone()
        if cfg.random_start:
            x = (x0 + (torch.rand(x0.shape, generator=gen).to(x0) * 2 - 1) * cfg.eps).clamp(0, 1)
        losses: list[float] = []
        run.start(cfg.steps)
        handle = attach(self.transformer, probe, run=run) if probe is not None else contextlib.nullcontext()
        try:
            with handle as h, frozen_weights(self.transformer, self.pipe.vae), \
                    gradient_checkpointing(self.transformer, h, enabled=cfg.gradient_checkpointing):
                for i in range(cfg.steps):
                    run.step = i
                    xi = x.detach().requires_grad_(True)
                    with torch.enable_grad():
                        loss, info = loss_fn(xi, gen)
                        (grad,) = torch.autograd.grad(loss, [xi])
                    x = pgd_step(xi.detach(), grad, x0, cfg.alpha, cfg.eps)
                    losses.append(float(loss.detach()))
                    run.report(i, info.get("t"), None, None, loss=losses[-1], instruction=info.get("instruction"),
                               linf=float((x - x0).abs().max() * 255), image=x.detach())
        finally:
            run.close()
        return x, losses

    def _decontext_loss(self, probe: ContextShareProbe, target_hw):
        """L = 1 − r̄_ctx over the selected blocks (paper Eq. 9) for one EOT draw."""

        def loss(x, gen):
            s = self.sample(gen, target_hw)
            shares = self._shares_forward(probe, x, s, target_hw)
            probe.frozen = True  # the backward's recomputation (checkpointing) stores nothing
            return decontext_loss(shares), {"t": s.t, "instruction": s.instruction}

        return loss

    def _encoder_loss(self, x0: torch.Tensor):
        """PhotoGuard's encoder attack: −‖E(x) − E(grey)‖² (ascended, i.e. the distance minimised)."""
        with torch.no_grad():
            goal = self.encode(torch.full_like(x0, float(self.config.encoder_grey)))  # [1, C, h, w]

        def loss(x, gen):
            return -F.mse_loss(self.encode(x).float(), goal.float()), {}

        return loss

    def _diffpgd_loss(self, x0: torch.Tensor, target_hw):
        """Diff-PGD / AdvDM on the editor: the flow-matching loss ‖v̂ − (ε − z*)‖² with the image
        as context, z* the clean image's latent at the target size (ascended)."""
        H, W = x0.shape[-2:]
        th, tw = self.config.target_size or (H, W)
        with torch.no_grad():
            clean = x0 if (th, tw) == (H, W) else F.interpolate(x0, size=(th, tw), mode="bilinear", antialias=True)
            z_star = self.encode(clean)  # [1, C, h, w]
        tgt_star, tgt_ids = self.pack(z_star, context=False)

        def loss(x, gen):
            s = self.sample(gen, target_hw, self.config.diffpgd_t_range)
            noise, _ = self.pack(s.noise, context=False)
            ctx, ctx_ids = self.pack(self.encode(x), context=True)
            v = self.denoise(flow_noisy(tgt_star, noise, s.t), tgt_ids, ctx, ctx_ids, s.t, s.instruction)
            return F.mse_loss(v.float(), (noise - tgt_star).float()), {"t": s.t, "instruction": s.instruction}

        return loss

    # ------------------------------------------------------------------ many images
    def protect_batch(self, images: Sequence, out_dir, *, resume: bool = True, diagnostics: bool = False,
                      callback: Callable[[dict], None] | None = None,
                      on_image: Callable[[int, Path, ProtectionResult], None] | None = None) -> list[Path]:
        """Protect several image files into the existing folder ``out_dir`` (``<stem>.png`` each)
        -> the output paths in input order, once every one is written.

        Image k uses the EOT seed ``config.seed + k``, whatever the number of processes, so a
        resumed or distributed run writes what an uninterrupted one-process run would. With
        ``resume`` an output that is already a complete PNG written from the same input by the
        same settings, editor and seed is kept (its provenance chunk, :meth:`provenance`); a
        damaged one, one of other settings (another ε, method, steps...) or a file of unknown
        origin is protected again; without, every image is protected again. Each PNG is written to
        a temporary file and renamed into place (:func:`write_png_atomic`).

        Under a multi-process launch (``torchrun`` / ``accelerate launch``; :func:`batch_state`)
        the main process plans the batch (the missing outputs; every input's file and size
        checked, so bad input fails in every process before any work), the plan is broadcast,
        each process protects its contiguous share (``PartialState.split_between_processes``),
        and every process returns the full list after a barrier. ``out_dir`` must be on a
        filesystem all processes share. A lone process starts no process group.

        diagnostics / callback: as :meth:`protect`, per image; on_image: ``on_image(k, path,
        result)`` after image k is written, in the process that protected it."""
        images = list(images)
        state = batch_state()
        plan = None
        if state is None or state.is_main_process:
            try:
                plan = self._plan_batch(images, out_dir, resume)
            except DiffattnError as e:  # every process raises it, not only the main one
                plan = e
        if state is not None:
            from accelerate.utils import broadcast_object_list

            plan = broadcast_object_list([plan])[0]
        if isinstance(plan, DiffattnError):
            raise plan
        targets, pending = plan
        share = state.split_between_processes(pending) if state is not None else contextlib.nullcontext(pending)
        with share as mine:
            for k in mine:
                result = self.protect(images[k], diagnostics=diagnostics, seed=self.config.seed + k, callback=callback)
                result.save(targets[k])
                if on_image is not None:
                    on_image(k, targets[k], result)
        if state is not None:
            state.wait_for_everyone()  # the main process returns once every share is written
        return targets

    def _plan_batch(self, images: Sequence, out_dir, resume: bool) -> tuple[list[Path], list[int]]:
        """(the output path of every image, the indices of the images to protect now): outputs
        distinct and never an input; every image to protect readable and of the editor's size."""
        out = Path(out_dir)
        if not out.is_dir():
            raise PathError(f"{out_dir}: no such directory; create it first")
        targets: list[Path] = []
        seen: dict[Path, str] = {}
        for image in images:
            if not isinstance(image, (str, os.PathLike)):
                raise ImageInputError(f"protect_batch takes image files (paths), got a {type(image).__name__}; "
                                      f"save the images first, or call protect() on each")
            target = out / f"{Path(image).stem}.png"
            key = target.resolve()
            if key == Path(image).resolve():
                raise PathError(f"{target} is the input image itself; pick another out_dir")
            if key in seen:
                raise PathError(f"{seen[key]} and {image} would both be written to {target} (outputs are named "
                                f"<stem>.png); rename one of them")
            seen[key] = str(image)
            targets.append(target)
        pending = []
        for k, (image, target) in enumerate(zip(images, targets)):
            u8, _ = read_image(image)  # [H, W, 3]; ImageInputError for a missing / damaged file
            if resume and finished_output(target, (u8.shape[1], u8.shape[0]), self.provenance(u8, self.config.seed + k)):
                continue  # written from this input by these settings and seed
            self.check_size(u8.shape[0], u8.shape[1], what=f"image {image}")
            pending.append(k)
        return targets, pending


def protect(image, pipe, *, out=None, callback: Callable[[dict], None] | None = None, diagnostics: bool = True,
            progress: bool | None = None, config: DeContextConfig | None = None, **overrides) -> ProtectionResult:
    """Protect ``image`` against the in-context editor ``pipe`` (a ``FluxKontextPipeline``);
    keyword ``overrides`` are :class:`DeContextConfig` fields (``eps``, ``steps``, ``method``...).
    With ``out`` the protected PNG is written there (never over the input file)."""
    result = DeContextProtector(pipe, config, progress=progress, **overrides).protect(
        image, callback=callback, diagnostics=diagnostics)
    if out is not None:
        result.save(out)
    return result


__all__ = ["DeContextProtector", "DeContextConfig", "ProtectionResult", "protect", "METHODS", "DEFAULT_INSTRUCTIONS",
           "eps_levels", "pgd_step", "quantize_protected", "random_sign_noise", "read_image", "check_editor",
           "plot_shares", "write_png_atomic", "finished_output", "PROVENANCE_KEY", "batch_state", "launched_processes",
           "BATCH_TIMEOUT"]
