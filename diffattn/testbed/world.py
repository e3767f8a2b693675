"""The shapes world: scenes, captions and the prompt grammar.

A scene is 1-3 flat-coloured shapes on a plain background, optionally outlined, rendered at
64x64. Everything is deterministic from a seed, so the truth behind every image is known
exactly and an oracle (``diffattn.testbed.oracle``) can grade generated images.

Grammar of captions (the only prompts the tiny models know)::

    object   := "a" COLOUR SHAPE
    scene    := object
              | object "and" object
              | object RELATION object          RELATION in {left of, right of, above, below}
              | object "," object "and" object
    caption  := scene [" on a dark background"] [" with outlines"]
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, like a real image

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"light": (225, 225, 225), "dark": (35, 35, 35)}
# Outline colour contrasts with the background, so "with outlines" is visible on both.
OUTLINE_ON = {"light": (0, 0, 0), "dark": (255, 255, 255)}
RELATIONS = ("left of", "right of", "above", "below")

RADIUS_RANGE = (7.0, 12.0)  # object "size": radius of the circumscribing circle, in pixels
MIN_GAP = 4.0  # pixels between the circumscribing circles of two objects
RELATION_MARGIN = 10.0  # the relation axis separates centres by at least this much

STYLE_SUFFIXES = {"dark": " on a dark background", "outline": " with outlines"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cx: float
    cy: float
    size: float  # radius of the circumscribing circle, pixels


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str = "light"  # "light" | "dark"
    outline: bool = False
    relation: str | None = None  # relation of objects[0] to objects[1], if the caption states one

    @property
    def styles(self) -> dict[str, bool]:
        return {"dark": self.background == "dark", "outline": self.outline}


@dataclass(frozen=True)
class PromptSpec:
    """What a caption asks for: objects as (colour, shape), an optional relation, styles."""

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None
    styles: dict[str, bool] = field(default_factory=lambda: {"dark": False, "outline": False})


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, margin: float = 2.0) -> bool:
    """Whether centre ``a`` is ``relation`` of centre ``b`` (image coordinates, y grows down).

    The relation is judged on its own axis only, with a small margin, as people do.
    """
    (ax, ay), (bx, by) = a, b
    if relation == "left of":
        return ax + margin < bx
    if relation == "right of":
        return ax > bx + margin
    if relation == "above":
        return ay + margin < by
    if relation == "below":
        return ay > by + margin
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


# ----------------------------------------------------------------------------- sampling


def _place(rng: np.random.Generator, sizes: list[float], relation: str | None, tries: int = 300):
    """Centres (and possibly shrunk sizes) for objects inside the frame, not overlapping, and
    with objects 0 and 1 in ``relation`` (by at least RELATION_MARGIN) when one is given.

    Crowded draws shrink every object by 10% after each ``tries`` failed placements."""
    for _ in range(10):
        for _ in range(tries):
            centres = [tuple(rng.uniform(r + 1, SIZE - r - 1, size=2)) for r in sizes]
            ok = all(
                np.hypot(centres[i][0] - centres[j][0], centres[i][1] - centres[j][1]) > sizes[i] + sizes[j] + MIN_GAP
                for i in range(len(sizes))
                for j in range(i)
            )
            if ok and relation is not None:
                ok = relation_holds(centres[0], centres[1], relation, margin=RELATION_MARGIN)
            if ok:
                return centres, sizes
        sizes = [0.9 * r for r in sizes]
    raise RuntimeError("could not place objects without overlap; lower the sizes or the count")


def sample_scene(
    seed: int | np.random.Generator,
    n_objects: int | None = None,
    relation: str | None | bool = False,
    background: str | None = None,
    outline: bool | None = None,
    objects: list[tuple[str, str]] | None = None,
    p_dark: float = 0.3,
    p_outline: float = 0.3,
) -> Scene:
    """A random scene, deterministic from ``seed``.

    n_objects: 1-3 (random if None). relation: a relation name, None for "no relation", or
    True for a random relation (needs 2 objects). objects: fixed (colour, shape) pairs.
    Styles are random (with the given probabilities) unless fixed.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if objects is None:
        n = int(rng.integers(1, 4)) if n_objects is None else n_objects
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        idx = rng.choice(len(pairs), size=n, replace=False)  # never two identical objects
        objects = [pairs[i] for i in idx]
    n = len(objects)
    if not 1 <= n <= 3:
        raise ValueError(f"a scene holds 1 to 3 objects, got {n}")
    if relation is True:
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    relation = relation or None
    if relation is not None and n != 2:
        raise ValueError("a relation needs exactly two objects")
    sizes = [float(rng.uniform(*RADIUS_RANGE)) for _ in range(n)]
    centres, sizes = _place(rng, sizes, relation)
    if background is None:
        background = "dark" if rng.random() < p_dark else "light"
    if outline is None:
        outline = bool(rng.random() < p_outline)
    objs = tuple(
        SceneObject(shape=s, color=c, cx=float(x), cy=float(y), size=r)
        for (c, s), (x, y), r in zip(objects, centres, sizes)
    )
    return Scene(objects=objs, background=background, outline=outline, relation=relation)


def sample_training_scene(seed: int | np.random.Generator) -> Scene:
    """The training distribution: 1-3 objects (40/35/25%); half of the two-object scenes
    carry a relation in their caption; styles at 30% each."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    relation = bool(n == 2 and rng.random() < 0.5)
    return sample_scene(rng, n_objects=n, relation=relation)


# ----------------------------------------------------------------------------- rendering


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape with circumradius ``r`` (None for a circle). Squares are
    axis-aligned; triangles point up."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r / np.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])  # apex up (y grows down)
        # shift the centroid down a little so the triangle fills its circle evenly
        return [(cx + r * np.cos(a), cy + r * np.sin(a) + 0.15 * r) for a in angles]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """Render a scene to a 64x64 RGB image (anti-aliased by supersampling)."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    outline = OUTLINE_ON[scene.background] if scene.outline else None
    width = 2 * s if scene.outline else 0
    for o in scene.objects:
        fill = COLORS[o.color]
        poly = shape_polygon(o.shape, o.cx * s, o.cy * s, o.size * s)
        if poly is None:
            r = o.size * s
            draw.ellipse([o.cx * s - r, o.cy * s - r, o.cx * s + r, o.cy * s + r], fill=fill, outline=outline, width=width)
        else:
            draw.polygon(poly, fill=fill, outline=outline, width=width)
    return img.resize((SIZE, SIZE), Image.BOX)


# ----------------------------------------------------------------------------- captions


def _object_phrase(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def caption(scene: Scene | PromptSpec) -> str:
    """The template caption of a scene (or of a prompt spec)."""
    if isinstance(scene, Scene):
        objs = [(o.color, o.shape) for o in scene.objects]
    else:
        objs = list(scene.objects)
    phrases = [_object_phrase(c, s) for c, s in objs]
    if scene.relation is not None:
        text = f"{phrases[0]} {scene.relation} {phrases[1]}"
    elif len(phrases) == 1:
        text = phrases[0]
    elif len(phrases) == 2:
        text = f"{phrases[0]} and {phrases[1]}"
    else:
        text = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    for name, suffix in STYLE_SUFFIXES.items():
        if scene.styles.get(name):
            text += suffix
    return text


_OBJECT_RE = re.compile(r"\ba (" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")\b")


def parse_prompt(prompt: str) -> PromptSpec:
    """Read a caption of the world's grammar back into what it asks for.

    Raises ValueError (with the grammar) for prompts outside it.
    """
    text = prompt.strip().lower()
    styles = {}
    for name, suffix in STYLE_SUFFIXES.items():
        styles[name] = suffix.strip() in text
        text = text.replace(suffix.strip(), " ")
    objects = tuple((m.group(1), m.group(2)) for m in _OBJECT_RE.finditer(text))
    if not objects:
        raise ValueError(
            f"prompt {prompt!r} names no object of the shapes world; write e.g. 'a red circle' "
            f"(colours {list(COLORS)}, shapes {list(SHAPES)})"
        )
    relation = None
    rest = _OBJECT_RE.sub(" ", text)
    for rel in RELATIONS:
        if re.search(rf"\b{rel}\b", rest):
            relation = rel
            break
    if relation is not None and len(objects) != 2:
        raise ValueError(f"prompt {prompt!r}: a relation needs exactly two objects")
    return PromptSpec(objects=objects, relation=relation, styles=styles)


def vocabulary() -> list[str]:
    """Every word (and punctuation token) the captions use."""
    words = {"a", "and", "on", "dark", "background", "with", "outlines", ","}
    words |= set(SHAPES) | set(COLORS)
    for rel in RELATIONS:
        words |= set(rel.split())
    return sorted(words)


def with_styles(scene: Scene, background: str | None = None, outline: bool | None = None) -> Scene:
    """The same scene with other global style attributes."""
    return replace(
        scene,
        background=scene.background if background is None else background,
        outline=scene.outline if outline is None else outline,
    )
