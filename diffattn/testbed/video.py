"""The moving-shapes world: short clips of the shapes world whose objects move and change colour.

A clip is ``frames`` (default :data:`FRAMES` = 9) 64x64 frames of one or two objects of the
shapes world (``world.py``: its shapes, colours, sizes and renderer) on the light background.
Each object moves in a straight line at a constant speed (``SPEED_RANGE`` px per frame) to the
left, right, up or down, or stands still, and may switch once to another colour at a frame in
the middle third of the clip. Every frame is a v1 :class:`~diffattn.testbed.world.Scene`
rendered by ``world.render`` (so the image oracle reads each frame as it reads a still);
objects stay inside the frame and :data:`~diffattn.testbed.world.MIN_GAP` apart in every frame.
Everything is deterministic from a seed.

Grammar of clip captions (the only prompts tiny-wan knows)::

    object  := "a" COLOUR SHAPE [" moving" DIRECTION] [" turning" COLOUR]
    clip    := object | object " and " object            DIRECTION in {left, right, up, down}

"a red circle moving right", "a blue square moving up and a yellow triangle moving left",
"a red circle turning blue" (a still object), "a green square moving down turning red".
An object without "moving" stands still; without "turning" it keeps its colour. Speed is not
captioned (the model's choice within the world's range; the oracle measures it).

Vocabulary: ``video_vocabulary()`` is ``world.vocabulary(2)`` followed by the new words
(sorted), so every world token keeps its id (``video_models.make_video_tokenizer``).

Evaluation suites (:data:`VIDEO_SUITES`, 32 prompts each): ``single`` (one mover; each
direction 8 times), ``two`` (two movers over the 32 pairs of ``evaluate``'s ``two`` suite),
``change`` (one object turning another colour, half of them moving). Seeds follow
``evaluate``: ``eval_seeds`` for evaluation, ``train_seeds`` for tuning; the training clips of
``train_video``'s data stage come from their own seeded stream.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import PathError, UsageError
from .evaluate import OBJECTS, _pairs, eval_seeds, train_seeds  # noqa: F401  (seeds re-exported)
from .world import COLORS, MIN_GAP, RADIUS_RANGE, SHAPES, SIZE, Scene, SceneObject, render, vocabulary

FRAMES = 9  # default clip length: 1 + 2 x 4, what a VAE of temporal factor 4 encodes into 3 latent frames
MIN_FRAMES, MAX_FRAMES = 5, 17  # clip lengths the sampler supports (1 + 4k keeps the Wan VAE's chunks whole)
DIRECTIONS = ("left", "right", "up", "down")
VELOCITY = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # y grows down
SPEED_RANGE = (1.0, 2.5)  # px per frame: 8-20 px over 9 frames
MAX_OBJECTS = 2

# the training distribution (``sample_training_clip``)
P_TWO = 0.5  # clips with two objects
P_STILL = 0.15  # an object stands still
P_CHANGE = 0.25  # an object turns another colour


@dataclass(frozen=True)
class MovingObject:
    """One object of a clip: a world object at (cx, cy) in frame 0 moving ``speed`` px per frame
    in ``direction`` (None: still), coloured ``color`` before frame ``switch`` and ``color_to``
    from it on (no change when ``color_to`` is None)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float  # radius of the circumscribing circle, px (world.SceneObject.size)
    direction: str | None = None
    speed: float = 0.0
    color_to: str | None = None
    switch: int | None = None  # first frame drawn in color_to

    def centre(self, frame: int) -> tuple[float, float]:
        """The centre in ``frame`` (world convention: the circumscribing circle's centre)."""
        ux, uy = VELOCITY[self.direction] if self.direction else (0.0, 0.0)
        return (self.cx + ux * self.speed * frame, self.cy + uy * self.speed * frame)

    def color_at(self, frame: int) -> str:
        return self.color_to if self.color_to is not None and frame >= self.switch else self.color

    def at(self, frame: int) -> SceneObject:
        """This object in ``frame`` as a still world object."""
        x, y = self.centre(frame)
        return SceneObject(shape=self.shape, color=self.color_at(frame), cx=x, cy=y, size=self.size)


@dataclass(frozen=True)
class Clip:
    objects: tuple[MovingObject, ...]
    frames: int = FRAMES

    def scene(self, frame: int) -> Scene:
        """Frame ``frame`` as a v1 scene (light background, no outline: world.render's v1 path)."""
        return Scene(objects=tuple(o.at(frame) for o in self.objects))


@dataclass(frozen=True)
class MotionSpec:
    """What a caption asks of one object: colour and shape, direction (None: still), the colour
    it turns (None: it keeps its colour)."""

    color: str
    shape: str
    direction: str | None = None
    color_to: str | None = None


@dataclass(frozen=True)
class VideoSpec:
    objects: tuple[MotionSpec, ...]


def spec_of(clip: Clip) -> VideoSpec:
    """The full description of a clip."""
    return VideoSpec(tuple(MotionSpec(o.color, o.shape, o.direction, o.color_to) for o in clip.objects))


# ----------------------------------------------------------------------------- sampling


def _check_frames(frames: int) -> None:
    if not isinstance(frames, int) or not MIN_FRAMES <= frames <= MAX_FRAMES or (frames - 1) % 4:
        raise UsageError(f"a clip has 1 + 4k frames between {MIN_FRAMES} and {MAX_FRAMES} (5, 9, 13, 17), got {frames!r}; "
                         "the Wan VAE encodes the first frame alone and then chunks of 4")


def _check_spec(spec: VideoSpec) -> None:
    if not 1 <= len(spec.objects) <= MAX_OBJECTS:
        raise UsageError(f"a clip holds 1 to {MAX_OBJECTS} objects, got {len(spec.objects)}")
    for o in spec.objects:
        if o.color not in COLORS or o.shape not in SHAPES:
            raise UsageError(f"unknown object {o.color!r} {o.shape!r}; colours {list(COLORS)}, shapes {list(SHAPES)}")
        if o.direction is not None and o.direction not in DIRECTIONS:
            raise UsageError(f"unknown direction {o.direction!r}; expected one of {DIRECTIONS} or None (still)")
        if o.color_to is not None and (o.color_to not in COLORS or o.color_to == o.color):
            raise UsageError(f"an object turns another colour of {list(COLORS)}, got {o.color!r} -> {o.color_to!r}")
    for when in ("start", "end"):
        pairs = [(o.color if when == "start" else (o.color_to or o.color), o.shape) for o in spec.objects]
        if len(set(pairs)) != len(pairs):
            raise UsageError(f"the objects of a clip differ in colour or shape at its {when}, got {pairs}")


def _track_start(rng: np.random.Generator, r: float, direction: str | None, travel: float) -> tuple[float, float]:
    """A start centre whose whole track (``travel`` px in ``direction``) stays inside the frame."""
    lo, hi = r + 1, SIZE - r - 1
    x, y = (float(v) for v in rng.uniform(lo, hi, size=2))
    if direction in ("right", "down"):
        start = float(rng.uniform(lo, hi - travel))
    elif direction in ("left", "up"):
        start = float(rng.uniform(lo + travel, hi))
    else:
        return x, y
    return (start, y) if direction in ("left", "right") else (x, start)


def _apart(objs: list[MovingObject], frames: int) -> bool:
    """Whether every pair of objects keeps MIN_GAP between their circles in every frame."""
    for f in range(frames):
        for i in range(len(objs)):
            for j in range(i):
                (ax, ay), (bx, by) = objs[i].centre(f), objs[j].centre(f)
                if math.hypot(ax - bx, ay - by) <= objs[i].size + objs[j].size + MIN_GAP:
                    return False
    return True


def _place_clip(rng: np.random.Generator, spec: VideoSpec, frames: int, tries: int = 300) -> tuple[MovingObject, ...]:
    """Sizes, speeds, start centres and switch frames for the spec's objects, all inside the
    frame and apart in every frame; crowded draws shrink every object by 10% after ``tries``
    failed placements (as world._place)."""
    sizes = [float(rng.uniform(*RADIUS_RANGE)) for _ in spec.objects]
    third = math.ceil(frames / 3)
    for _ in range(10):
        for _ in range(tries):
            objs = []
            for o, r in zip(spec.objects, sizes):
                cap = (SIZE - 2 * r - 2) / (frames - 1)  # the fastest speed whose track fits the frame
                speed = float(min(rng.uniform(*SPEED_RANGE), cap)) if o.direction else 0.0
                cx, cy = _track_start(rng, r, o.direction, speed * (frames - 1))
                switch = int(rng.integers(third, frames - third + 1)) if o.color_to else None
                objs.append(MovingObject(o.shape, o.color, cx, cy, r, o.direction, speed, o.color_to, switch))
            if _apart(objs, frames):
                return tuple(objs)
        sizes = [0.9 * r for r in sizes]
    raise RuntimeError("could not place the clip's objects apart in every frame; lower the sizes or the count")


def sample_clip(seed: int | np.random.Generator, spec: VideoSpec | str | None = None, frames: int = FRAMES, *,
                n_objects: int | None = None, p_still: float = P_STILL, p_change: float = P_CHANGE) -> Clip:
    """A random clip, deterministic from ``seed``: of ``spec`` (a VideoSpec or a caption) when
    given (placement, speed and switch frame drawn), else of random objects (``n_objects``, 1 or
    2, random if None), each still with probability ``p_still`` and turning another colour with
    ``p_change``; objects differ in (colour, shape) at the start and at the end."""
    _check_frames(frames)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if isinstance(spec, str):
        spec = parse_video_prompt(spec)
    if spec is None:
        n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
        if not 1 <= n <= MAX_OBJECTS:
            raise UsageError(f"a clip holds 1 to {MAX_OBJECTS} objects, got {n}")
        idx = rng.choice(len(OBJECTS), size=n, replace=False)
        objs = []
        for i in idx:
            color, shape = OBJECTS[int(i)]
            direction = None if rng.random() < p_still else DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
            color_to = None
            if rng.random() < p_change:
                taken = {(o.color_to or o.color, o.shape) for o in objs}
                free = [c for c in COLORS if c != color and (c, shape) not in taken]
                color_to = free[int(rng.integers(len(free)))]
            objs.append(MotionSpec(color, shape, direction, color_to))
        spec = VideoSpec(tuple(objs))
        if len({(o.color_to or o.color, o.shape) for o in objs}) != len(objs):  # an end colour met a start colour
            spec = VideoSpec(tuple(MotionSpec(o.color, o.shape, o.direction) for o in objs))
    _check_spec(spec)
    return Clip(objects=_place_clip(rng, spec, frames), frames=frames)


def sample_training_clip(seed: int | np.random.Generator, frames: int = FRAMES) -> Clip:
    """The training distribution: one or two objects (P_TWO), each still with P_STILL and
    turning another colour with P_CHANGE."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n = 2 if rng.random() < P_TWO else 1
    return sample_clip(rng, frames=frames, n_objects=n)


# ----------------------------------------------------------------------------- rendering


def render_clip(clip: Clip) -> list[Image.Image]:
    """The clip's frames, each ``world.render`` of its scene (64x64 RGB)."""
    return [render(clip.scene(f)) for f in range(clip.frames)]


def clip_array(clip: Clip) -> np.ndarray:
    """The clip as uint8 [F, 64, 64, 3]."""
    return np.stack([np.asarray(im) for im in render_clip(clip)])  # [F, 64, 64, 3]


def to_frames(video) -> list[Image.Image]:
    """Frames of one clip as PIL images, from a list of images (PIL or arrays), a uint8 or float
    (in [0, 1]) array [F, H, W, 3], or a float tensor [F, 3, H, W] in [0, 1] (a diffusers
    ``WanPipeline`` output with ``output_type="np"`` / ``"pt"``, one clip of the batch)."""
    if hasattr(video, "detach"):  # tensor [F, 3, H, W]
        t = video.detach().float().cpu()
        if t.ndim != 4 or t.shape[1] != 3:
            raise UsageError(f"expected a video tensor [F, 3, H, W] in [0, 1], got shape {tuple(t.shape)}")
        video = t.clamp(0, 1).permute(0, 2, 3, 1).numpy()  # [F, H, W, 3]
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise UsageError(f"expected a video array [F, H, W, 3], got shape {video.shape}")
        if video.dtype != np.uint8:
            video = (np.clip(video, 0, 1) * 255 + 0.5).astype(np.uint8)
        return [Image.fromarray(f) for f in video]
    frames = list(video)
    if not frames:
        raise UsageError("a video needs at least one frame")
    out = []
    for f in frames:
        if isinstance(f, Image.Image):
            out.append(f.convert("RGB"))
        elif isinstance(f, np.ndarray) and f.ndim == 3 and f.shape[-1] == 3:
            out.append(Image.fromarray(f if f.dtype == np.uint8 else (np.clip(f, 0, 1) * 255 + 0.5).astype(np.uint8)))
        else:
            raise UsageError(f"cannot read a frame from {type(f).__name__}; pass PIL images or arrays [H, W, 3]")
    return out


def save_gif(videos, path, fps: float = 4.0, scale: int = 2) -> None:
    """Save one clip, or several side by side (a list of clips), as a looping GIF.

    Each clip is anything ``to_frames`` reads; clips side by side must have as many frames.
    ``scale`` enlarges pixels (nearest). Written with PIL's GIF writer (imageio is not a
    dependency of diffattn)."""
    import os

    if str(path).lower().rsplit(".", 1)[-1] != "gif":
        raise PathError(f"save_gif writes a .gif file, got {str(path)!r}")
    folder = os.path.dirname(os.path.abspath(str(path)))
    if not os.path.isdir(folder):
        raise PathError(f"cannot write {str(path)!r}: folder {folder!r} does not exist")
    first = videos[0] if isinstance(videos, (list, tuple)) and videos else None
    many = first is not None and (isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) == 4)  # clips, not frames
    clips = [to_frames(v) for v in videos] if many else [to_frames(videos)]
    n = len(clips[0])
    if any(len(c) != n for c in clips):
        raise UsageError(f"clips side by side need as many frames each, got {[len(c) for c in clips]}")
    frames = []
    for f in range(n):
        row = np.concatenate([np.asarray(c[f]) for c in clips], axis=1)  # [H, W * clips, 3]
        im = Image.fromarray(row)
        frames.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    frames[0].save(str(path), save_all=True, append_images=frames[1:], duration=int(round(1000 / fps)), loop=0)


# ----------------------------------------------------------------------------- captions


def _phrase(o: MotionSpec) -> str:
    text = f"a {o.color} {o.shape}"
    if o.direction is not None:
        text += f" moving {o.direction}"
    if o.color_to is not None:
        text += f" turning {o.color_to}"
    return text


def video_caption(clip: Clip | VideoSpec) -> str:
    """The caption of a clip (or of a spec)."""
    spec = spec_of(clip) if isinstance(clip, Clip) else clip
    return " and ".join(_phrase(o) for o in spec.objects)


_COLOR = "(" + "|".join(COLORS) + ")"
_OBJECT_RE = re.compile(rf"\ba {_COLOR} ({'|'.join(SHAPES)})(?: moving ({'|'.join(DIRECTIONS)}))?(?: turning {_COLOR})?\b")


def parse_video_prompt(prompt: str) -> VideoSpec:
    """Read a caption of the clip grammar back into what it asks for (the inverse of
    ``video_caption``). A :class:`~diffattn.errors.UsageError` (a ValueError) for text outside
    the grammar: every word must belong to an object phrase or join two of them with "and"."""
    text = " ".join(prompt.strip().lower().split())
    objects = tuple(MotionSpec(m.group(1), m.group(2), m.group(3), m.group(4)) for m in _OBJECT_RE.finditer(text))
    rest = _OBJECT_RE.sub("|", text).replace(" ", "")
    grammar = ("write e.g. 'a red circle moving right', 'a red circle turning blue' or 'a blue square moving up and "
               f"a yellow triangle moving left' (colours {list(COLORS)}, shapes {list(SHAPES)}, directions {list(DIRECTIONS)})")
    if not objects or rest != "and".join(["|"] * len(objects)):  # "|" alone, or "|and|": nothing but "and" between
        raise UsageError(f"prompt {prompt!r} is not a caption of the moving-shapes world; {grammar}")
    spec = VideoSpec(objects)
    try:
        _check_spec(spec)
    except UsageError as e:
        raise UsageError(f"prompt {prompt!r}: {e}") from None
    return spec


def video_vocabulary() -> list[str]:
    """Every word the clip captions use after ``world.vocabulary(2)``: that list first (so every
    world token keeps its id), then the new words, sorted."""
    base = vocabulary(2)
    new = {"moving", "turning"} | set(DIRECTIONS)
    return base + sorted(new - set(base))


def max_caption_words() -> int:
    """Words in the longest clip caption (two moving objects turning colour)."""
    o = MotionSpec("red", "circle", "right", "blue")
    return len(video_caption(VideoSpec((o, MotionSpec("green", "square", "left", "yellow")))).split())


# ----------------------------------------------------------------------------- suites


def _suite_single() -> tuple[VideoSpec, ...]:
    """32 single movers: object k % 12, directions balanced (8 each) and varied per object."""
    return tuple(VideoSpec((MotionSpec(*OBJECTS[k % 12], DIRECTIONS[(k + k // 12) % 4]),)) for k in range(32))


def _suite_two() -> tuple[VideoSpec, ...]:
    """Two movers over evaluate's 32 pairs; the first object cycles the directions, the second
    takes another direction (the pair never moves in parallel)."""
    out = []
    for k, (a, b) in enumerate(_pairs()):
        da = DIRECTIONS[k % 4]
        db = DIRECTIONS[(k % 4 + 1 + (k // 4) % 3) % 4]
        out.append(VideoSpec((MotionSpec(*a, da), MotionSpec(*b, db))))
    return tuple(out)


def _suite_change() -> tuple[VideoSpec, ...]:
    """32 colour changes: object k % 12 turning each other colour in turn; even k stand still,
    odd k move (directions cycling)."""
    out = []
    colors = list(COLORS)
    for k in range(32):
        color, shape = OBJECTS[k % 12]
        others = [c for c in colors if c != color]
        direction = None if k % 2 == 0 else DIRECTIONS[(k // 2) % 4]
        out.append(VideoSpec((MotionSpec(color, shape, direction, others[(k // 12 + k) % 3]),)))
    return tuple(out)


VIDEO_SUITE_SPECS: dict[str, tuple[VideoSpec, ...]] = {
    "single": _suite_single(), "two": _suite_two(), "change": _suite_change()}
VIDEO_SUITES: dict[str, tuple[str, ...]] = {k: tuple(video_caption(s) for s in v) for k, v in VIDEO_SUITE_SPECS.items()}


def video_suite_prompts(name: str) -> list[str]:
    """The fixed prompts of a video suite: ``single``, ``two``, ``change`` (32 each)."""
    if name not in VIDEO_SUITES:
        raise UsageError(f"unknown video suite {name!r}; choose one of {list(VIDEO_SUITES)}")
    return list(VIDEO_SUITES[name])
