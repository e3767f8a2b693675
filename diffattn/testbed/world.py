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

World v2 (second half of this module) is a strict superset: markings on objects, graded
aesthetics (drop shadow, lighting gradient, centring) and partial captions, with its own
sampler, caption writer and parser (``sample_training_pair_v2``, ``caption_v2``,
``parse_prompt_v2``); v1 scenes, captions, parses and renders are unchanged bit for bit, and
``vocabulary(2)`` only appends words to ``vocabulary()``.
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
    marking: str = "none"  # v2: "none" | "dot" | "stripes" | "half" (MARKINGS); v1 objects are unmarked


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str = "light"  # "light" | "dark"
    outline: bool = False
    relation: str | None = None  # relation of objects[0] to objects[1], if the caption states one
    shadow: float = 0.0  # v2: drop-shadow strength in [0, 1] (0: none, as in v1)
    light: float = 0.0  # v2: lighting-gradient strength in [0, 1] (0: a flat backdrop, as in v1)

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
    """Render a scene to a 64x64 RGB image (anti-aliased by supersampling). Scenes with v2
    attributes (markings, shadow, light) go to ``render_v2``; the rest render as in v1."""
    if not _is_v1(scene):
        return render_v2(scene)
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    outline = OUTLINE_ON[scene.background] if scene.outline else None
    width = 2 * s if scene.outline else 0
    for o in scene.objects:
        _draw_object(draw, o, s, outline, width)
    return img.resize((SIZE, SIZE), Image.BOX)


def _draw_object(draw, o: SceneObject, s: int, outline, width: int) -> None:
    """One object's fill (and outline) on a canvas supersampled ``s`` times."""
    fill = COLORS[o.color]
    poly = shape_polygon(o.shape, o.cx * s, o.cy * s, o.size * s)
    if poly is None:
        r = o.size * s
        draw.ellipse([o.cx * s - r, o.cy * s - r, o.cx * s + r, o.cy * s + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(poly, fill=fill, outline=outline, width=width)


# ----------------------------------------------------------------------------- captions


def _object_phrase(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def _join_phrases(phrases: list[str], relation: str | None) -> str:
    """Object phrases as one caption: "A left of B" with a relation, else "A", "A and B",
    "A, B and C"."""
    if relation is not None:
        return f"{phrases[0]} {relation} {phrases[1]}"
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return f"{phrases[0]}, {phrases[1]} and {phrases[2]}"


def caption(scene: Scene | PromptSpec) -> str:
    """The template caption of a scene (or of a prompt spec)."""
    if isinstance(scene, Scene):
        objs = [(o.color, o.shape) for o in scene.objects]
    else:
        objs = list(scene.objects)
    text = _join_phrases([_object_phrase(c, s) for c, s in objs], scene.relation)
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


def _vocabulary_v1() -> list[str]:
    """Every word (and punctuation token) the v1 captions use, sorted."""
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


# ============================================================================= world v2
#
# A strict superset of v1: every v1 scene, caption, prompt and word means and renders what it
# did (the new fields default to v1-neutral values and render() takes the v1 path for them),
# and the new words come after the v1 words in ``vocabulary(version=2)``, so v1 token ids stay.
#
# New in v2:
# - **Markings**, an identity of each object beyond colour and shape, drawn inside the fill in
#   a darker shade of the object's own hue (``shade_color``): "none", "dot" (a central disc of
#   DOT_RADIUS of the inradius), "stripes" (horizontal bands STRIPE_WIDTH·R wide, the middle one
#   unshaded), "half"
#   (the right half shaded). The shade keeps the hue exactly and 70% of the chroma, so v1's
#   colour and shape calls read a marked object as one solid object of its colour.
# - **Graded aesthetics**, each with an analytic measure in the oracle: ``shadow`` (a soft drop
#   shadow under every object, strength 0-1), ``light`` (a vertical lighting gradient on the
#   backdrop, brighter at the top, strength 0-1) and ``centred`` (the objects' mean centre
#   within CENTRED_MAX px of the frame centre: composition). dark and outline stay as in v1.
# - **Partial captions**: a caption may leave out an object's colour or marking and any
#   aesthetic, which then is the model's choice. Grammar v2::
#
#     object  := "a" [MARKING_WORD] [COLOUR] SHAPE      MARKING_WORD in {plain, dotted, striped, halved}
#     scene   := as in v1, over v2 objects
#     caption := scene [" on a dark background"] [" with outlines"] [" with shadows"]
#                      [" in soft light"] [" in the centre"]
#
#   In v2 a missing word means "unspecified", never "absent" (v1 reads a missing style suffix
#   as "absent"; ``parse_prompt`` keeps that reading for v1 prompts).

MARKINGS = ("none", "dot", "stripes", "half")
MARKING_WORDS = {"none": "plain", "dot": "dotted", "stripes": "striped", "half": "halved"}
WORD_MARKINGS = {w: m for m, w in MARKING_WORDS.items()}
SHADE = 0.7  # a marking's colour: the fill's pure hue (whiteness removed) at 70% of its chroma
# Marking geometry, sized for the testbed VAE rather than for clean renders: with a dot of half
# the inradius (under 3 px on small triangles) and R/3 bands, a 3000-step v2 VAE read back only
# 69% of dots and 75% of stripes (RESULTS.md, session 10); the oracle reads both either way.
DOT_RADIUS = 0.6  # the dot's radius, as a fraction of the shape's inradius
STRIPE_WIDTH = 0.5  # width of a stripe band, as a fraction of the circumradius R

AESTHETICS = ("shadow", "light", "centred")  # new graded attributes (dark and outline are v1's)
STYLES_V2 = ("dark", "outline", *AESTHETICS)
STYLE_SUFFIXES_V2 = {**STYLE_SUFFIXES, "shadow": " with shadows", "light": " in soft light", "centred": " in the centre"}

SHADOW_OFFSET = 2.5  # px, down and right
SHADOW_BLUR = 1.2  # px, Gaussian sigma of the shadow's edge
SHADOW_DARKEN = 0.4  # strength 1 darkens the backdrop under the shadow's core by 40%
LIGHT_AMPLITUDE = 22.0  # 0-255: strength 1 brightens the top row by this much and darkens the bottom row as much
GRADED_RANGE = (0.5, 1.0)  # strengths the v2 samplers draw when an attribute is on (off: 0)
GRADED_ON = 0.25  # an attribute counts as shown at strength >= this (the oracle's threshold too)
CENTRED_MAX = 3.0  # px: a centred scene's mean object centre lies this close to the frame centre
UNCENTRED_MIN = 9.0  # px: an uncentred v2 scene's lies at least this far (v1 scenes: anywhere)
CENTRE_TOLERANCE = 6.0  # px: the oracle calls a scene centred within this (between the two)

# Training-caption probabilities of the v2 sampler (``sample_training_pair_v2``)
P_MARKINGS = {"none": 0.4, "dot": 0.2, "stripes": 0.2, "half": 0.2}
P_CAPTION_MARKING = 0.5  # an object's marking is named (a "plain" one too)
P_CAPTION_COLOR = 0.8  # an object's colour is named
P_CAPTION_STYLE = 0.6  # a shown style or aesthetic is named
P_STYLE_V2 = {"dark": 0.3, "outline": 0.3, "shadow": 0.3, "light": 0.3, "centred": 0.25}


def shade_color(color: str) -> tuple[int, int, int]:
    """The colour of a marking on an object of ``color``: the same hue, whiteness removed,
    chroma scaled by SHADE (red (220, 40, 40) -> (126, 0, 0))."""
    rgb = np.array(COLORS[color], dtype=np.float64)
    return tuple(int(round(v)) for v in SHADE * (rgb - rgb.min()))


def shape_centroid(shape: str, cx: float, cy: float, r: float) -> tuple[float, float]:
    """The centroid of a shape (for an upright triangle 0.15 R below its circle's centre)."""
    return (cx, cy + 0.15 * r) if shape == "triangle" else (cx, cy)


def shape_inradius(shape: str, r: float) -> float:
    """The inradius of a shape of circumradius ``r``."""
    return {"circle": 1.0, "square": 1 / np.sqrt(2), "triangle": 0.5}[shape] * r


def marking_region(marking: str, shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Where a marking shades, at points (xs, ys) (pixel units, broadcastable), before it is
    clipped to the object's fill: a bool array. "none" shades nothing."""
    mx, my = shape_centroid(shape, cx, cy, r)
    dx, dy = xs - mx, ys - my
    if marking == "none":
        return np.zeros(np.broadcast(dx, dy).shape, dtype=bool)
    if marking == "dot":
        return dx**2 + dy**2 <= (DOT_RADIUS * shape_inradius(shape, r)) ** 2
    if marking == "stripes":
        # bands about the circumscribing circle's centre, not the centroid: on a triangle that
        # puts a shaded band across its wide base rather than a sliver of it
        band = np.floor((ys - cy) / (STRIPE_WIDTH * r) + 0.5).astype(int)
        return np.broadcast_to(band % 2 == 1, np.broadcast(dx, dy).shape)
    if marking == "half":
        return np.broadcast_to(dx > 0, np.broadcast(dx, dy).shape)
    raise ValueError(f"unknown marking {marking!r}; expected one of {MARKINGS}")


def centring(scene) -> float:
    """Distance in px of the objects' mean centre from the frame centre (the composition measure)."""
    xs = [o.cx for o in scene.objects]
    ys = [o.cy for o in scene.objects]
    return float(np.hypot(np.mean(xs) - SIZE / 2, np.mean(ys) - SIZE / 2))


def scene_styles_v2(scene: Scene) -> dict[str, bool]:
    """Which of the five style attributes a scene shows (graded ones at >= GRADED_ON)."""
    return {
        "dark": scene.background == "dark",
        "outline": scene.outline,
        "shadow": scene.shadow >= GRADED_ON,
        "light": scene.light >= GRADED_ON,
        "centred": centring(scene) <= CENTRE_TOLERANCE,
    }


def _is_v1(scene: Scene) -> bool:
    return scene.shadow == 0 and scene.light == 0 and all(o.marking == "none" for o in scene.objects)


@dataclass(frozen=True)
class ObjectSpec:
    """What a v2 caption asks of one object: its shape, and its colour and marking or None
    (unspecified: the model's choice)."""

    shape: str
    color: str | None = None
    marking: str | None = None


@dataclass(frozen=True)
class PromptSpecV2:
    """What a v2 caption asks for. ``styles`` holds the attributes it names (True); an
    attribute it does not name is unspecified."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    styles: dict[str, bool] = field(default_factory=dict)

    @property
    def specified(self) -> dict[str, int]:
        """How many object colours and markings the caption names."""
        return {"color": sum(o.color is not None for o in self.objects),
                "marking": sum(o.marking is not None for o in self.objects)}


def spec_v2(scene: Scene) -> PromptSpecV2:
    """The full description of a scene (every colour, marking and shown style named)."""
    objs = tuple(ObjectSpec(o.shape, o.color, o.marking) for o in scene.objects)
    styles = {k: True for k, on in scene_styles_v2(scene).items() if on}
    return PromptSpecV2(objects=objs, relation=scene.relation, styles=styles)


def _object_phrase_v2(o: ObjectSpec) -> str:
    words = ["a"]
    if o.marking is not None:
        words.append(MARKING_WORDS[o.marking])
    if o.color is not None:
        words.append(o.color)
    words.append(o.shape)
    return " ".join(words)


def caption_v2(spec: Scene | PromptSpecV2 | PromptSpec) -> str:
    """The v2 caption of a spec (a Scene: its full description, ``spec_v2``; a v1 PromptSpec:
    its v1 caption, which v2 reads the same way but with unnamed styles unspecified)."""
    if isinstance(spec, PromptSpec):
        return caption(spec)
    if isinstance(spec, Scene):
        spec = spec_v2(spec)
    text = _join_phrases([_object_phrase_v2(o) for o in spec.objects], spec.relation)
    for name, suffix in STYLE_SUFFIXES_V2.items():
        if spec.styles.get(name):
            text += suffix
    return text


_OBJECT_RE_V2 = re.compile(
    r"\ba (?:(" + "|".join(WORD_MARKINGS) + r") )?(?:(" + "|".join(COLORS) + r") )?(" + "|".join(SHAPES) + r")\b"
)


def parse_prompt_v2(prompt: str) -> PromptSpecV2:
    """Read a caption of the v2 grammar (v1 captions included) into what it asks for.

    Raises ValueError (with the grammar) for prompts outside it."""
    text = prompt.strip().lower()
    styles = {}
    for name, suffix in STYLE_SUFFIXES_V2.items():
        if suffix.strip() in text:
            styles[name] = True
            text = text.replace(suffix.strip(), " ")
    objects = tuple(
        ObjectSpec(shape=m.group(3), color=m.group(2), marking=WORD_MARKINGS[m.group(1)] if m.group(1) else None)
        for m in _OBJECT_RE_V2.finditer(text)
    )
    if not objects:
        raise ValueError(
            f"prompt {prompt!r} names no object of the shapes world; write e.g. 'a red circle' or 'a striped circle' "
            f"(markings {list(WORD_MARKINGS)}, colours {list(COLORS)}, shapes {list(SHAPES)}, each but the shape optional)"
        )
    rest = _OBJECT_RE_V2.sub(" ", text)
    relation = next((rel for rel in RELATIONS if re.search(rf"\b{rel}\b", rest)), None)
    if relation is not None and len(objects) != 2:
        raise ValueError(f"prompt {prompt!r}: a relation needs exactly two objects")
    return PromptSpecV2(objects=objects, relation=relation, styles=styles)


def vocabulary(version: int = 1) -> list[str]:
    """Every word (and punctuation token) the captions use. Version 1: the v1 words, sorted
    (their order defines the v1 token ids). Version 2: the v1 list followed by the new words,
    sorted, so every v1 word keeps its position."""
    v1 = _vocabulary_v1()
    if version == 1:
        return v1
    if version != 2:
        raise ValueError(f"vocabulary version must be 1 or 2, got {version!r}")
    new = set(MARKING_WORDS.values())
    for name in AESTHETICS:
        new |= set(STYLE_SUFFIXES_V2[name].split())
    return v1 + sorted(new - set(v1))


def max_caption_words(version: int = 2) -> int:
    """Words (and commas) in the longest caption of a version's grammar: three objects with
    every word, every style suffix. Tokenizers add BOS and EOS."""
    if version == 1:
        return len(caption(PromptSpec(objects=(("red", "circle"),) * 3, styles={"dark": True, "outline": True}))
                   .replace(",", " ,").split())
    spec = PromptSpecV2(objects=(ObjectSpec("circle", "red", "stripes"),) * 3, styles={k: True for k in STYLES_V2})
    return len(caption_v2(spec).replace(",", " ,").split())


# ----------------------------------------------------------------------------- v2 sampling


def sample_scene_v2(
    seed: int | np.random.Generator,
    n_objects: int | None = None,
    relation: str | None | bool = False,
    background: str | None = None,
    outline: bool | None = None,
    objects: list | None = None,
    markings: list[str] | None = None,
    shadow: float | None = None,
    light: float | None = None,
    centred: bool | None = None,
    p_styles: dict[str, float] | None = None,
    p_markings: dict[str, float] | None = None,
) -> Scene:
    """A random v2 scene, deterministic from ``seed``.

    objects: fixed objects as (colour, shape) pairs or ObjectSpecs (a None colour or marking
    is drawn). markings: fixed markings per object. shadow, light: fixed strengths (else 0 or
    uniform in GRADED_RANGE with probability ``p_styles``); centred: True places the objects'
    mean centre within CENTRED_MAX px of the frame centre, False at least UNCENTRED_MIN away.
    Objects are distinct in (colour, shape), as in v1."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    p = {**P_STYLE_V2, **(p_styles or {})}
    pm = p_markings or P_MARKINGS
    if objects is None:
        n = int(rng.integers(1, 4)) if n_objects is None else n_objects
        specs = [ObjectSpec(s) for s in rng.choice(SHAPES, size=n)]
    else:
        specs = [o if isinstance(o, ObjectSpec) else ObjectSpec(o[1], o[0]) for o in objects]
    n = len(specs)
    if not 1 <= n <= 3:
        raise ValueError(f"a scene holds 1 to 3 objects, got {n}")
    pairs = []  # fill unspecified colours, keeping (colour, shape) distinct
    for k, o in enumerate(specs):
        color = o.color
        if color is None:
            taken = {(c, s) for c, s in pairs} | {(q.color, q.shape) for q in specs[k + 1:] if q.color is not None}
            free = [c for c in COLORS if (c, o.shape) not in taken]
            color = free[int(rng.integers(len(free)))]
        pairs.append((color, o.shape))
    if len(set(pairs)) != n:
        raise ValueError(f"objects must differ in colour or shape, got {pairs}")
    if markings is None:
        names, probs = list(pm), np.array(list(pm.values()), dtype=np.float64)
        markings = [o.marking if o.marking is not None else names[int(rng.choice(len(names), p=probs / probs.sum()))]
                    for o in specs]
    if relation is True:
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    relation = relation or None
    if relation is not None and n != 2:
        raise ValueError("a relation needs exactly two objects")
    if background is None:
        background = "dark" if rng.random() < p["dark"] else "light"
    if outline is None:
        outline = bool(rng.random() < p["outline"])
    graded = {}
    for name, fixed in (("shadow", shadow), ("light", light)):
        graded[name] = float(fixed) if fixed is not None else (
            float(rng.uniform(*GRADED_RANGE)) if rng.random() < p[name] else 0.0)
    if centred is None:
        centred = bool(rng.random() < p["centred"])
    sizes = [float(rng.uniform(*RADIUS_RANGE)) for _ in range(n)]
    for _ in range(2000):
        centres, placed = _place(rng, sizes, relation)
        d = float(np.hypot(np.mean([c[0] for c in centres]) - SIZE / 2, np.mean([c[1] for c in centres]) - SIZE / 2))
        if (d <= CENTRED_MAX) if centred else (d >= UNCENTRED_MIN):
            break
    else:
        raise RuntimeError("could not place the objects with the requested composition")
    objs = tuple(
        SceneObject(shape=s, color=c, cx=float(x), cy=float(y), size=r, marking=m)
        for (c, s), (x, y), r, m in zip(pairs, centres, placed, markings)
    )
    return Scene(objects=objs, background=background, outline=outline, relation=relation, **graded)


def describe(scene: Scene, rng: np.random.Generator, p_marking: float = P_CAPTION_MARKING,
             p_color: float = P_CAPTION_COLOR, p_style: float = P_CAPTION_STYLE) -> PromptSpecV2:
    """A partial description of a scene, as the v2 training captions give: each object's
    marking named with probability ``p_marking`` and colour with ``p_color``, each shown style
    with ``p_style``; the relation, when the scene has one, always."""
    objs = tuple(
        ObjectSpec(o.shape, o.color if rng.random() < p_color else None, o.marking if rng.random() < p_marking else None)
        for o in scene.objects
    )
    styles = {k: True for k, on in scene_styles_v2(scene).items() if on and rng.random() < p_style}
    return PromptSpecV2(objects=objs, relation=scene.relation, styles=styles)


def sample_training_pair_v2(seed: int | np.random.Generator) -> tuple[Scene, PromptSpecV2]:
    """The v2 training distribution: a scene (1-3 objects, 40/35/25%; half of the two-object
    scenes with a relation; markings by P_MARKINGS; styles by P_STYLE_V2) and its partial
    description (``describe``); the caption is ``caption_v2(spec)``."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    relation = bool(n == 2 and rng.random() < 0.5)
    scene = sample_scene_v2(rng, n_objects=n, relation=relation)
    return scene, describe(scene, rng)


def sample_training_scene_v2(seed: int | np.random.Generator) -> Scene:
    """The scene of ``sample_training_pair_v2``."""
    return sample_training_pair_v2(seed)[0]


# ----------------------------------------------------------------------------- v2 rendering


def _box_down(a: np.ndarray) -> np.ndarray:
    s = SUPERSAMPLE
    return a.reshape(SIZE, s, SIZE, s, *a.shape[2:]).mean(axis=(1, 3))


def _shape_masks(o: SceneObject, outline: bool) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled [256, 256] masks of an object's interior (fill inside the outline) and of
    its whole shape, rasterised by the same PIL calls as ``render``."""
    s = SUPERSAMPLE
    img = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(img)
    ol, width = (128, 2 * s) if outline else (None, 0)
    poly = shape_polygon(o.shape, o.cx * s, o.cy * s, o.size * s)
    if poly is None:
        r = o.size * s
        draw.ellipse([o.cx * s - r, o.cy * s - r, o.cx * s + r, o.cy * s + r], fill=255, outline=ol, width=width)
    else:
        draw.polygon(poly, fill=255, outline=ol, width=width)
    a = np.asarray(img)
    return a == 255, a > 0


def shadow_field(scene: Scene) -> np.ndarray:
    """Darkening [64, 64] in [0, 1] that the scene's drop shadow applies to the backdrop at
    strength 1 (before SHADOW_DARKEN): the objects' shapes offset by SHADOW_OFFSET, blurred."""
    from scipy import ndimage

    s = SUPERSAMPLE
    union = np.zeros((SIZE * s, SIZE * s), dtype=bool)
    for o in scene.objects:
        union |= _shape_masks(replace(o, cx=o.cx + SHADOW_OFFSET, cy=o.cy + SHADOW_OFFSET), False)[1]
    return np.clip(ndimage.gaussian_filter(_box_down(union.astype(np.float64)), SHADOW_BLUR, mode="constant"), 0, 1)


def light_field(background: str = "light") -> np.ndarray:
    """Per-row brightening [64] of the backdrop at light strength 1: +LIGHT_AMPLITUDE at the
    top row's centre, falling linearly to -LIGHT_AMPLITUDE at the bottom row's."""
    y = np.arange(SIZE) + 0.5
    return LIGHT_AMPLITUDE * (1 - 2 * y / SIZE)


def render_v2(scene: Scene) -> Image.Image:
    """Render any scene (v1 or v2) to 64x64 RGB. The backdrop (with its lighting gradient and
    drop shadow) is computed at 64x64; objects are drawn at 4x as in v1 and box-filtered down.
    ``render`` calls this for v2 scenes; v1 scenes take v1's path, bit for bit."""
    s = SUPERSAMPLE
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    back = np.broadcast_to(bg, (SIZE, SIZE, 3)).copy()  # [64, 64, 3]
    if scene.light:
        back += scene.light * light_field()[:, None, None]
    if scene.shadow:
        back *= 1 - SHADOW_DARKEN * scene.shadow * shadow_field(scene)[..., None]
    back = np.clip(np.round(back), 0, 255).astype(np.uint8)
    img = Image.fromarray(back).resize((SIZE * s, SIZE * s), Image.NEAREST)  # each pixel a 4x4 block
    draw = ImageDraw.Draw(img)
    outline = OUTLINE_ON[scene.background] if scene.outline else None
    width = 2 * s if scene.outline else 0
    ys = (np.arange(SIZE * s)[:, None] + 0.5) / s  # [256, 1] sample centres, pixel units
    xs = (np.arange(SIZE * s)[None, :] + 0.5) / s  # [1, 256]
    for o in scene.objects:
        _draw_object(draw, o, s, outline, width)
        if o.marking != "none":
            interior, _ = _shape_masks(o, scene.outline)
            region = marking_region(o.marking, o.shape, o.cx, o.cy, o.size, xs, ys) & interior
            img.paste(shade_color(o.color), mask=Image.fromarray((region * 255).astype(np.uint8)))
    return img.resize((SIZE, SIZE), Image.BOX)
