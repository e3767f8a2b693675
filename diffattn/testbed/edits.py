"""Edits of the shapes world: an instruction grammar, a pair sampler and the edit oracle.

The data and the grader of ``tiny-kontext``, the testbed's in-context editor
(``FluxKontextPipeline``; ``kontext_models``). An **edit pair** is a world-v2 source scene, an
instruction and the target scene it asks for, in which every object the instruction does not
name is *identical* (same colour, shape, marking, size and position) and the backdrop (dark,
outline, shadow and light strengths) is unchanged.

Grammar of instructions (``parse_instruction``; ``edit_instruction`` writes them)::

    REF         := "the" [COLOUR] SHAPE                       the colour is needed when two objects share the shape
    instruction := "make" REF COLOUR                          recolour
                 | "make" REF MARKING_WORD                    marking  (plain | dotted | striped | halved)
                 | "give" REF MARKING_NOUN                    marking  ("a dot" | "stripes" | "a shaded half")
                 | "move" REF DIRECTION                       move     ("to the left" | "to the right" | "up" | "down")
                 | "add a" [MARKING_WORD] COLOUR SHAPE        add      (an unnamed marking is the editor's choice)
                 | "remove" REF                               remove

World scenes never hold two objects of one colour and shape, so ``the COLOUR SHAPE`` always
names one object; the sampler names the colour when the shape alone is ambiguous and, half of
the time, when it is not.

**Sampling** (``sample_edit``, deterministic from a seed). The source is a world-v2 scene
(``world.sample_scene_v2``: 1-3 objects, markings, dark / outline / shadow / light styles) whose
objects all have a circumradius of at least ``EDIT_MIN_RADIUS``. The edit kind is drawn by
``P_EDITS`` among the feasible ones: recolour (a colour the object's shape does not have in the
scene yet), marking (another marking), move (``MOVE_RANGE`` px along the axis, the object
staying inside the frame and ``world.MIN_GAP`` apart from the others), add (a new (colour,
shape) of the radius range, placed apart from the others; scenes of at most 2 objects) and
remove (scenes of at least 2). Why the minimum radius: on clean renders of world-v2 scenes
(``sample_scene_v2``) the oracle (``oracle.parse_v2``) read back every colour, shape and marking
of 1,065 objects when every radius was >= 8.5 px, but with radii down to the world's 7 px it left
4 of 817 markings unreadable (all on outlined triangles under 8.1 px, 8-15 readable fill pixels)
and missed one object: an edit whose grade cannot be read on the exact answer tests no editor.

**Held-out split.** A pair depends on its integer seed only. Training pairs take seeds below
``evaluate.EVAL_SEED_START`` (``train_edit_seeds``; the ``tiny-kontext`` data stage refuses
others), evaluation pairs the evaluation seeds ``evaluate.eval_seeds`` (from 1,000,000), the
range no training, search or tuning of the testbed uses; an evaluation pair's generation
noise is seeded with the same seed.

**The edit oracle** (``score_edit(source, instruction, edited)``). The source is the
``Scene`` (exact truth) or an image (read with ``parse_v2``; its unreadable markings stay
unknown). The instruction's referent is resolved in the source; the expected edited scene is
the source's objects with the asked change (the referent's new colour or marking, its move
along the axis, a new object, or the referent gone). The edited image is read with
``parse_v2``, and its objects are matched to the expected ones of the same colour and shape
(one to one, nearest first). Then

- ``changed``: the asked change happened to the referent and only it: recolour and marking:
  the referent is found with the new colour (marking), its shape and its other attributes, within
  ``POSITION_TOLERANCE`` of its place; move: found displaced at least ``MOVE_MIN_SHIFT`` px in the
  asked direction and at most ``POSITION_TOLERANCE`` px across it; add: an object of the asked
  colour and shape (and marking, when named) is found besides the kept ones; remove: no object
  of the referent's colour and shape is left. An object of the referent's old colour and shape
  left over (an unrecoloured, unmoved or unremoved copy) fails ``changed``.
- ``preserved``: every other object is found with its colour, shape and marking within
  ``POSITION_TOLERANCE`` of its place, and no other object appeared.
- ``success = changed and preserved``.

Both are ``True``, ``False`` or ``None``: **unreadable**, when everything readable holds but a
marking that must be checked is ``"unreadable"`` (in the edited image, or in a source image);
``unreadable`` lists what could not be read, and ``success`` is then ``False`` (a grade that
cannot be read is no success). ``style_kept`` reports whether the dark background and the
outlines were kept (not part of ``success``, which the issue defines on objects).

**Tolerances**, from the oracle's measured centre error (the distance of a detected object's
centre from the truth; world-v2 scenes with every radius >= 8.5 px, 600 scenes and ~1,065
objects per row): clean renders mean 0.17,
99th percentile 0.48, max 0.77 px; renders degraded by ``oracle.perturb`` at strength 1 (blur
0.8 px, jitter 0.75 px, colour drift and noise) max 1.12 px, at strength 1.5 max 1.52 px.
``POSITION_TOLERANCE`` = 3 px is twice the worst error under the strongest degradation the
oracle still reads (so a kept object is never failed by the oracle's own error) and under a fifth
of the smallest object's diameter (17 px), so an object drawn a quarter of its size away is
not "kept". ``MOVE_MIN_SHIFT`` = 6 px is twice the tolerance (a kept object can never pass as
moved, nor a moved one as kept) and 60% of the smallest sampled move (10 px).

**Oracle accuracy** (``oracle_edit_accuracy``, 500 held-out pairs, ``tests/test_edits.py``):
``score_edit(source, instruction, render(target))`` succeeds on all 500 and
``score_edit(source, instruction, render(source))`` has ``changed=False`` on all 500.

Suite metrics (``edit_metrics``) are rates over pairs with 95% Wilson intervals
(``evaluate.rate_metric``); ``evaluate_edits`` runs an editor over pairs and grades it.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from ..errors import EditPromptError, UsageError
from .evaluate import EVAL_SEED_START, Metric, eval_seeds, rate_metric
from .oracle import UNREADABLE, ParsedV2, parse_v2
from .world import (
    COLORS,
    MARKING_WORDS,
    MARKINGS,
    MIN_GAP,
    P_MARKINGS,
    RADIUS_RANGE,
    SHAPES,
    SIZE,
    WORD_MARKINGS,
    Scene,
    SceneObject,
    render,
    sample_scene_v2,
    vocabulary,
)

EDIT_KINDS = ("recolour", "marking", "move", "add", "remove")
P_EDITS = {"recolour": 0.25, "marking": 0.2, "move": 0.25, "add": 0.15, "remove": 0.15}
P_OBJECTS = {1: 0.3, 2: 0.4, 3: 0.3}  # objects in a source scene (add needs <= 2, remove >= 2)
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # image axes, y down
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
MARKING_NOUNS = {"dot": "a dot", "stripes": "stripes", "half": "a shaded half"}  # "give the circle ..."

EDIT_MIN_RADIUS = 8.5  # px: every object of an edit pair is at least this large (module notes)
MOVE_RANGE = (10.0, 18.0)  # px a move displaces its object along the axis
POSITION_TOLERANCE = 3.0  # px: a kept object's centre lies within this of its place (module notes)
MOVE_MIN_SHIFT = 6.0  # px: a moved object's centre moved at least this far the asked way
P_REF_COLOR = 0.5  # the sampler names the referent's colour when the shape alone would do
P_ADD_MARKING = 0.5  # "add a striped red circle": the added object's marking is named
P_GIVE_FORM = 0.5  # "give the circle stripes" rather than "make the circle striped"

GRAMMAR = (
    "instructions: 'make the [COLOUR] SHAPE COLOUR' | 'make the [COLOUR] SHAPE plain|dotted|striped|halved' | "
    "'give the [COLOUR] SHAPE a dot|stripes|a shaded half' | "
    "'move the [COLOUR] SHAPE to the left|to the right|up|down' "
    f"| 'add a [MARKING] COLOUR SHAPE' | 'remove the [COLOUR] SHAPE'; colours {list(COLORS)}, shapes {list(SHAPES)}"
)


# ----------------------------------------------------------------------------- grammar


@dataclass(frozen=True)
class EditSpec:
    """What an instruction asks. ``ref_shape`` / ``ref_color``: the referent ("the [colour]
    shape"; None for add). ``color``: recolour's new colour or the added object's; ``marking``:
    the marking edit's new marking or the added object's (None: unnamed, the editor's choice);
    ``shape``: the added object's; ``direction``: the move's (DIRECTIONS)."""

    kind: str
    ref_shape: str | None = None
    ref_color: str | None = None
    color: str | None = None
    marking: str | None = None
    shape: str | None = None
    direction: str | None = None

    @property
    def referent(self) -> str:
        """The referring phrase, e.g. "the red circle" ("" for add)."""
        if self.ref_shape is None:
            return ""
        return f"the {self.ref_color} {self.ref_shape}" if self.ref_color else f"the {self.ref_shape}"


_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_MW = "|".join(WORD_MARKINGS)
_REF = rf"the (?:(?P<rc>{_C}) )?(?P<rs>{_S})"
_PATTERNS = {
    "recolour": re.compile(rf"make {_REF} (?P<c>{_C})"),
    "marking": re.compile(rf"make {_REF} (?P<mw>{_MW})"),
    "give": re.compile(rf"give {_REF} (?P<mn>{'|'.join(MARKING_NOUNS.values())})"),
    "move": re.compile(rf"move {_REF} (?P<d>{'|'.join(DIRECTION_PHRASES.values())})"),
    "add": re.compile(rf"add a (?:(?P<mw>{_MW}) )?(?P<c>{_C}) (?P<s>{_S})"),
    "remove": re.compile(rf"remove {_REF}"),
}
_NOUN_MARKINGS = {v: k for k, v in MARKING_NOUNS.items()}
_PHRASE_DIRECTIONS = {v: k for k, v in DIRECTION_PHRASES.items()}


def parse_instruction(instruction: str) -> EditSpec:
    """Read an instruction of the edit grammar (module notes) into an :class:`EditSpec`.

    Case and surrounding blanks are ignored. A :class:`UsageError` that names the grammar for
    anything outside it."""
    if not isinstance(instruction, str):
        raise UsageError(f"an edit instruction is a string, got {type(instruction).__name__}; {GRAMMAR}")
    text = " ".join(instruction.strip().lower().rstrip(".").split())
    for name, pattern in _PATTERNS.items():
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groupdict()
        ref = dict(ref_shape=g.get("rs"), ref_color=g.get("rc"))
        if name == "recolour":
            return EditSpec("recolour", color=g["c"], **ref)
        if name == "marking":
            return EditSpec("marking", marking=WORD_MARKINGS[g["mw"]], **ref)
        if name == "give":
            return EditSpec("marking", marking=_NOUN_MARKINGS[g["mn"]], **ref)
        if name == "move":
            return EditSpec("move", direction=_PHRASE_DIRECTIONS[g["d"]], **ref)
        if name == "add":
            return EditSpec("add", color=g["c"], shape=g["s"], marking=WORD_MARKINGS[g["mw"]] if g["mw"] else None)
        return EditSpec("remove", **ref)
    raise UsageError(f"{instruction!r} is not an edit instruction of the shapes world; {GRAMMAR}")


def edit_instruction(spec: EditSpec, give_form: bool = False) -> str:
    """The instruction of a spec. ``give_form``: a dot, stripes or a half marking as "give the
    circle stripes" rather than "make the circle striped" (plain has only the make form)."""
    ref = spec.referent
    if spec.kind == "recolour":
        return f"make {ref} {spec.color}"
    if spec.kind == "marking":
        if give_form and spec.marking in MARKING_NOUNS:
            return f"give {ref} {MARKING_NOUNS[spec.marking]}"
        return f"make {ref} {MARKING_WORDS[spec.marking]}"
    if spec.kind == "move":
        return f"move {ref} {DIRECTION_PHRASES[spec.direction]}"
    if spec.kind == "add":
        words = ["add a"] + ([MARKING_WORDS[spec.marking]] if spec.marking else []) + [spec.color, spec.shape]
        return " ".join(words)
    if spec.kind == "remove":
        return f"remove {ref}"
    raise UsageError(f"unknown edit kind {spec.kind!r}; expected one of {EDIT_KINDS}")


def edit_vocabulary() -> list[str]:
    """Words of the instructions that world v2's captions do not use, sorted (the tokenizer of
    tiny-kontext appends them after the v2 words, so every v2 id stays)."""
    words = {"make", "give", "move", "add", "remove", "the", "a", "to"}
    words |= set(" ".join(DIRECTION_PHRASES.values()).split()) | set(" ".join(MARKING_NOUNS.values()).split())
    words |= set(MARKING_WORDS.values()) | set(COLORS) | set(SHAPES)
    return sorted(words - set(vocabulary(2)))


def max_instruction_words() -> int:
    """Words in the longest instruction ("move the red circle to the right": 7)."""
    longest = [edit_instruction(EditSpec("move", "triangle", "yellow", direction="right")),
               edit_instruction(EditSpec("add", color="yellow", shape="triangle", marking="stripes")),
               edit_instruction(EditSpec("marking", "triangle", "yellow", marking="half"), give_form=True)]
    return max(len(t.split()) for t in longest)


# ----------------------------------------------------------------------------- resolution


def _describe(o) -> str:
    return f"the {o.color} {o.shape}"


def resolve_referent(spec: EditSpec, objects) -> int:
    """Index of the object the instruction's referent names among ``objects`` (SceneObjects or
    detected objects). An :class:`EditPromptError` when it names none or several (name the
    colour then)."""
    hits = [i for i, o in enumerate(objects)
            if o.shape == spec.ref_shape and (spec.ref_color is None or o.color == spec.ref_color)]
    if len(hits) == 1:
        return hits[0]
    held = ", ".join(_describe(o) for o in objects) or "no object"
    if not hits:
        raise EditPromptError(f"the instruction names {spec.referent}, but the source holds {held}; "
                              "name one of its objects")
    raise EditPromptError(f"{spec.referent} is ambiguous: the source holds {held}; name its colour "
                          f"({' or '.join(repr(_describe(objects[i])) for i in hits)})")


def check_edit(spec: EditSpec, objects) -> int | None:
    """Validate an edit against the source's objects: the referent's index (None for add), or
    an :class:`EditPromptError` saying why the edit cannot be made (an object that would
    duplicate another's colour and shape, a colour or marking the referent already has)."""
    keys = {(o.color, o.shape) for o in objects}
    if spec.kind == "add":
        if (spec.color, spec.shape) in keys:
            raise EditPromptError(f"'add a {spec.color} {spec.shape}': the source already holds one, and a scene never "
                                  "holds two objects of one colour and shape; add another colour or shape")
        return None
    i = resolve_referent(spec, objects)
    o = objects[i]
    if spec.kind == "recolour":
        if spec.color == o.color:
            raise EditPromptError(f"{_describe(o)} is already {spec.color}; ask for another colour")
        if (spec.color, o.shape) in keys:
            raise EditPromptError(f"the source already holds a {spec.color} {o.shape}; recolour to a colour no other "
                                  f"{o.shape} has")
    if spec.kind == "marking" and getattr(o, "marking", None) == spec.marking:
        raise EditPromptError(f"{_describe(o)} is already {MARKING_WORDS[spec.marking]}; ask for another marking")
    return i


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class EditPair:
    """A source scene, the instruction and the target scene it asks for (untouched objects
    identical). ``referent``: the index of the edited object in ``source.objects`` (None for
    add); in ``target`` the edited object keeps its index, an added one comes last, a removed
    one is gone."""

    seed: int
    source: Scene
    instruction: str
    target: Scene
    spec: EditSpec
    referent: int | None


def sample_edit_source(rng: np.random.Generator) -> Scene:
    """A world-v2 source scene (1-3 objects by ``P_OBJECTS``, no stated relation) whose objects
    all have a radius of at least ``EDIT_MIN_RADIUS`` (the scene is drawn again, with the same
    number of objects, until they do)."""
    counts, probs = list(P_OBJECTS), np.array(list(P_OBJECTS.values()))
    n = int(rng.choice(counts, p=probs / probs.sum()))
    while True:
        scene = sample_scene_v2(rng, n_objects=n)
        if min(o.size for o in scene.objects) >= EDIT_MIN_RADIUS:
            return replace(scene, objects=tuple(replace(o, shape=str(o.shape)) for o in scene.objects))


def _inside(cx: float, cy: float, r: float) -> bool:
    return r + 1 <= cx <= SIZE - r - 1 and r + 1 <= cy <= SIZE - r - 1


def _apart(cx: float, cy: float, r: float, others) -> bool:
    return all(np.hypot(cx - o.cx, cy - o.cy) > r + o.size + MIN_GAP for o in others)


def _moved(scene: Scene, i: int, direction: str, rng: np.random.Generator, tries: int = 20) -> SceneObject | None:
    """The referent displaced by a distance in MOVE_RANGE along ``direction``, inside the frame
    and apart from the others; None when no draw fits."""
    o = scene.objects[i]
    others = [q for j, q in enumerate(scene.objects) if j != i]
    dx, dy = DIRECTIONS[direction]
    for _ in range(tries):
        d = float(rng.uniform(*MOVE_RANGE))
        cx, cy = o.cx + d * dx, o.cy + d * dy
        if _inside(cx, cy, o.size) and _apart(cx, cy, o.size, others):
            return replace(o, cx=float(cx), cy=float(cy))
    return None


def _added(scene: Scene, color: str, shape: str, marking: str, rng: np.random.Generator,
           tries: int = 300) -> SceneObject | None:
    """A new object of radius in [EDIT_MIN_RADIUS, RADIUS_RANGE[1]] inside the frame and apart
    from the scene's objects; None when no draw fits."""
    for _ in range(tries):
        r = float(rng.uniform(EDIT_MIN_RADIUS, RADIUS_RANGE[1]))
        cx, cy = (float(v) for v in rng.uniform(r + 1, SIZE - r - 1, size=2))
        if _apart(cx, cy, r, scene.objects):
            return SceneObject(shape=shape, color=color, cx=cx, cy=cy, size=r, marking=marking)
    return None


def _draw_marking(rng: np.random.Generator) -> str:
    names, probs = list(P_MARKINGS), np.array(list(P_MARKINGS.values()))
    return names[int(rng.choice(len(names), p=probs / probs.sum()))]


def apply_edit(scene: Scene, instruction: str | EditSpec, seed: int | np.random.Generator = 0) -> Scene:
    """The target scene of an instruction on ``scene``: the referent recoloured, re-marked,
    moved by a distance drawn in MOVE_RANGE, or removed, or a new object added at a free place
    (its marking drawn by P_MARKINGS when unnamed); every other object and the backdrop
    unchanged. An :class:`EditPromptError` when the edit cannot be made (no room to move or add,
    a scene left with no object or more than 3)."""
    spec = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    objects = list(scene.objects)
    i = check_edit(spec, objects)
    if spec.kind == "recolour":
        objects[i] = replace(objects[i], color=spec.color)
    elif spec.kind == "marking":
        objects[i] = replace(objects[i], marking=spec.marking)
    elif spec.kind == "move":
        moved = _moved(scene, i, spec.direction, rng)
        if moved is None:
            raise EditPromptError(f"no room to move {spec.referent} {DIRECTION_PHRASES[spec.direction]} by "
                                  f"{MOVE_RANGE[0]:g}-{MOVE_RANGE[1]:g} px inside the frame and apart from the others")
        objects[i] = moved
    elif spec.kind == "add":
        if len(objects) >= 3:
            raise EditPromptError("a scene holds at most 3 objects; remove one before adding another")
        new = _added(scene, spec.color, spec.shape, spec.marking or _draw_marking(rng), rng)
        if new is None:
            raise EditPromptError(f"no room to add a {spec.color} {spec.shape} apart from the scene's objects")
        objects.append(new)
    else:  # remove
        if len(objects) <= 1:
            raise EditPromptError(f"removing {spec.referent} would leave no object; a scene holds 1 to 3 objects")
        del objects[i]
    return replace(scene, objects=tuple(objects), relation=None)


def _edit_options(scene: Scene, kind: str) -> list[EditSpec]:
    """Every edit of ``kind`` the scene admits, referents without their colour yet (move:
    per object and direction; feasibility of the move itself is tried when drawn)."""
    objs = scene.objects
    keys = {(o.color, o.shape) for o in objs}
    out = []
    if kind == "recolour":
        out = [EditSpec("recolour", o.shape, o.color, color=c) for o in objs for c in COLORS
               if (c, o.shape) not in keys]
    elif kind == "marking":
        out = [EditSpec("marking", o.shape, o.color, marking=m) for o in objs for m in MARKINGS if m != o.marking]
    elif kind == "move":
        out = [EditSpec("move", o.shape, o.color, direction=d) for o in objs for d in DIRECTIONS]
    elif kind == "add" and len(objs) <= 2:
        out = [EditSpec("add", color=c, shape=s) for c in COLORS for s in SHAPES if (c, s) not in keys]
    elif kind == "remove" and len(objs) >= 2:
        out = [EditSpec("remove", o.shape, o.color) for o in objs]
    return out


def sample_edit(seed: int) -> EditPair:
    """The edit pair of an integer seed (module notes): a source scene, an edit kind drawn by
    ``P_EDITS`` (again when the scene admits no edit of the kind), one of its edits at random
    (the next when there is no room to move or add that way), the instruction and the target."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"an edit pair's seed is an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    source = sample_edit_source(rng)
    kinds, probs = list(P_EDITS), np.array(list(P_EDITS.values()))
    while True:
        kind = kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]
        options = _edit_options(source, kind)
        for k in rng.permutation(len(options)):  # the edits of the kind in random order, until one fits
            spec = options[int(k)]
            if spec.kind == "add" and rng.random() < P_ADD_MARKING:
                spec = replace(spec, marking=_draw_marking(rng))
            if spec.ref_shape is not None:
                shared = sum(o.shape == spec.ref_shape for o in source.objects) > 1
                if not shared and rng.random() >= P_REF_COLOR:
                    spec = replace(spec, ref_color=None)
            try:
                target = apply_edit(source, spec, rng)
            except EditPromptError:  # no room to move or add this way: try the next
                continue
            give = spec.kind == "marking" and rng.random() < P_GIVE_FORM
            referent = None if spec.kind == "add" else resolve_referent(spec, source.objects)
            return EditPair(seed=int(seed), source=source, instruction=edit_instruction(spec, give_form=give),
                            target=target, spec=spec, referent=referent)


def train_edit_seeds(n: int, offset: int = 0) -> list[int]:
    """``n`` seeds of training pairs from ``offset``: all below ``evaluate.EVAL_SEED_START``, so
    no training pair is an evaluation pair."""
    if n < 0 or offset < 0 or offset + n > EVAL_SEED_START:
        raise UsageError(f"training edit pairs take seeds in [0, {EVAL_SEED_START}) (the evaluation seeds start "
                         f"there); asked for {n} from {offset}")
    return list(range(offset, offset + n))


def eval_edit_seeds(n: int, offset: int = 0) -> list[int]:
    """``n`` seeds of held-out pairs: the testbed's evaluation seeds (``evaluate.eval_seeds``)."""
    return eval_seeds(n, offset)


def edit_pairs(seeds) -> list[EditPair]:
    """The pairs of ``seeds``."""
    return [sample_edit(int(s)) for s in seeds]


def eval_edit_pairs(n: int, offset: int = 0) -> list[EditPair]:
    """``n`` held-out pairs (``eval_edit_seeds``)."""
    return edit_pairs(eval_edit_seeds(n, offset))


# ----------------------------------------------------------------------------- the edit oracle


@dataclass(frozen=True)
class _Expected:
    """An object the edited image should show. ``marking``: None unspecified (an added object
    whose marking the instruction leaves open), UNREADABLE when the source image hid it.
    ``cx, cy``: its place (a moved object: its place in the source; None for an added one)."""

    role: str  # "kept" | "edited" | "added"
    color: str
    shape: str
    marking: str | None
    cx: float | None
    cy: float | None


@dataclass
class ObjectCheck:
    """The grade of one expected object: ``found`` (an object of its colour and shape was matched),
    ``place_ok`` (position, or for a move the displacement), ``marking_ok`` (None: unreadable or
    unspecified), ``shift`` (its displacement, px, as (dx, dy))."""

    name: str
    role: str
    found: bool
    place_ok: bool = False
    marking_ok: bool | None = None
    shift: tuple[float, float] | None = None

    @property
    def ok(self) -> bool | None:
        """Found, in place and (where it is read) with its marking; None when only an
        unreadable marking is in doubt."""
        return _all([self.found, self.place_ok, self.marking_ok])


@dataclass
class EditScore:
    """The edit oracle's grade of one edited image (module notes)."""

    instruction: str
    kind: str
    changed: bool | None  # None: unreadable
    preserved: bool | None
    unreadable: list[str] = field(default_factory=list)  # what could not be read
    checks: list[ObjectCheck] = field(default_factory=list)  # per expected object
    leftover: int = 0  # objects of the referent's old colour and shape left over (fail ``changed``)
    extra_objects: int = 0  # other objects that appeared (fail ``preserved``)
    style_kept: dict[str, bool | None] = field(default_factory=dict)  # dark background, outlines (not in success)
    parsed: ParsedV2 | None = None

    @property
    def success(self) -> bool:
        """The asked change happened and everything else was kept (both read, not unreadable)."""
        return self.changed is True and self.preserved is True

    @property
    def readable(self) -> bool:
        return not self.unreadable

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("parsed")
        d.update(success=self.success, readable=self.readable)
        return d


def _all(values) -> bool | None:
    """Three-valued AND: False if any is False, else None if any is None, else True."""
    values = list(values)
    if any(v is False for v in values):
        return False
    if any(v is None for v in values):
        return None
    return True


def _source_view(source):
    """(objects, background, outline) of a source Scene (exact) or image (``parse_v2``)."""
    if isinstance(source, Scene):
        return list(source.objects), source.background, source.outline
    parsed = parse_v2(source)
    return list(parsed.objects), parsed.background, parsed.outline


def expected_objects(spec: EditSpec, objects) -> list[_Expected]:
    """The objects the edited image should show (module notes), the edited one first when
    there is one; validates the edit against the source (``check_edit``)."""
    i = check_edit(spec, objects)
    out = []
    for j, o in enumerate(objects):
        marking = getattr(o, "marking", UNREADABLE)
        if j != i:
            out.append(_Expected("kept", o.color, o.shape, marking, o.cx, o.cy))
        elif spec.kind == "recolour":
            out.append(_Expected("edited", spec.color, o.shape, marking, o.cx, o.cy))
        elif spec.kind == "marking":
            out.append(_Expected("edited", o.color, o.shape, spec.marking, o.cx, o.cy))
        elif spec.kind == "move":
            out.append(_Expected("edited", o.color, o.shape, marking, o.cx, o.cy))
    if spec.kind == "add":
        out.append(_Expected("added", spec.color, spec.shape, spec.marking, None, None))
    return sorted(out, key=lambda e: e.role == "kept")


def _anchor(e: _Expected, direction: str | None) -> tuple[float, float] | None:
    """Where to look for an expected object when several of its colour and shape are found."""
    if e.cx is None:
        return None
    if e.role == "edited" and direction is not None:
        dx, dy = DIRECTIONS[direction]
        d = float(np.mean(MOVE_RANGE))
        return e.cx + d * dx, e.cy + d * dy
    return e.cx, e.cy


def _match(expected: list[_Expected], detected, direction: str | None) -> list[int | None]:
    """One-to-one matching of expected objects to detected ones of the same colour and shape,
    nearest first (Hungarian on the distance to ``_anchor``); an index or None per expected."""
    out: list[int | None] = [None] * len(expected)
    for key in {(e.color, e.shape) for e in expected}:
        rows = [k for k, e in enumerate(expected) if (e.color, e.shape) == key]
        cols = [j for j, d in enumerate(detected) if (d.color, d.shape) == key]
        if not cols:
            continue
        cost = np.zeros((len(rows), len(cols)))  # [expected of the key, detected of the key]
        for a, k in enumerate(rows):
            anchor = _anchor(expected[k], direction)
            for b, j in enumerate(cols):
                cost[a, b] = 0.0 if anchor is None else np.hypot(detected[j].cx - anchor[0], detected[j].cy - anchor[1])
        for a, b in zip(*linear_sum_assignment(cost)):
            out[rows[a]] = cols[b]
    return out


def _check(e: _Expected, d, direction: str | None, unreadable: list[str]) -> ObjectCheck:
    name = f"the {e.color} {e.shape}" + (" (added)" if e.role == "added" else "")
    if d is None:
        return ObjectCheck(name, e.role, found=False)
    shift = None if e.cx is None else (float(d.cx - e.cx), float(d.cy - e.cy))
    if e.cx is None:
        place_ok = True
    elif e.role == "edited" and direction is not None:
        ux, uy = DIRECTIONS[direction]
        along = shift[0] * ux + shift[1] * uy
        across = abs(shift[0] * uy - shift[1] * ux)
        place_ok = along >= MOVE_MIN_SHIFT and across <= POSITION_TOLERANCE
    else:
        place_ok = bool(np.hypot(*shift) <= POSITION_TOLERANCE)
    marking_ok: bool | None
    if e.marking is None:
        marking_ok = True  # unspecified
    elif e.marking == UNREADABLE:
        marking_ok = None
        unreadable.append(f"marking of {name} in the source")
    elif getattr(d, "marking", UNREADABLE) == UNREADABLE:
        marking_ok = None
        unreadable.append(f"marking of {name}")
    else:
        marking_ok = d.marking == e.marking
    return ObjectCheck(name, e.role, found=True, place_ok=bool(place_ok), marking_ok=marking_ok, shift=shift)


def score_edit(source, instruction: str, edited, *, parsed: ParsedV2 | None = None) -> EditScore:
    """Grade an edit (module notes): did the asked change happen (``changed``), were the other
    objects kept (``preserved``), ``success`` both; None where a needed marking is unreadable.

    source: the source ``Scene`` (exact) or image (read with ``oracle.parse_v2``); instruction: of
    the edit grammar (:class:`UsageError` otherwise; :class:`EditPromptError` when it does not
    apply to the source); edited: any image the oracle reads (PIL, array, tensor), or pass its
    ``parsed`` reading."""
    spec = parse_instruction(instruction)
    objects, background, outline = _source_view(source)
    expected = expected_objects(spec, objects)
    parsed = parsed if parsed is not None else parse_v2(edited)
    detected = parsed.objects
    direction = spec.direction if spec.kind == "move" else None
    matched = _match(expected, detected, direction)
    unreadable: list[str] = []
    checks = [_check(e, detected[j] if j is not None else None, direction, unreadable)
              for e, j in zip(expected, matched)]
    used = {j for j in matched if j is not None}
    rest = [j for j in range(len(detected)) if j not in used]
    old_key = None
    if spec.kind != "add":
        ref = objects[resolve_referent(spec, objects)]
        old_key = (ref.color, ref.shape)
    leftover = sum((detected[j].color, detected[j].shape) == old_key for j in rest)
    extra = len(rest) - leftover
    edited_checks = [c for c in checks if c.role != "kept"]
    changed = _all([c.ok for c in edited_checks] + [leftover == 0])
    preserved = _all([c.ok for c in checks if c.role == "kept"] + [extra == 0])
    style_kept = {"dark": None if parsed.calls.get("dark") is None else parsed.calls["dark"] == (background == "dark"),
                  "outline": parsed.outline == outline}
    return EditScore(instruction=instruction, kind=spec.kind, changed=changed, preserved=preserved,
                     unreadable=unreadable, checks=checks, leftover=leftover, extra_objects=extra,
                     style_kept=style_kept, parsed=parsed)


# ----------------------------------------------------------------------------- suite metrics


def edit_metrics(scores: list[EditScore]) -> dict[str, Metric]:
    """Suite metrics, each a rate over edited images with its 95% Wilson interval
    (``evaluate.rate_metric``): success, changed, preserved (unreadable counts as not), the
    unreadable rate, success over the readable images, extra-object and style-kept rates, and
    success per edit kind (``success/recolour``...). Intervals are over images, the sampled unit."""
    out = {
        "success": rate_metric([s.success for s in scores]),
        "changed": rate_metric([s.changed is True for s in scores]),
        "preserved": rate_metric([s.preserved is True for s in scores]),
        "unreadable_rate": rate_metric([not s.readable for s in scores]),
        "success_readable": rate_metric([s.success for s in scores if s.readable]),
        "extra_object_rate": rate_metric([s.extra_objects > 0 for s in scores]),
        "style_kept": rate_metric([all(v is True for v in s.style_kept.values()) for s in scores]),
    }
    for kind in EDIT_KINDS:
        of_kind = [s.success for s in scores if s.kind == kind]
        if of_kind:
            out[f"success/{kind}"] = rate_metric(of_kind)
    return out


def metrics_markdown(metrics: dict[str, Metric], title: str = "") -> str:
    """A table row per metric: value, 95% interval, n."""
    head = f"metric ({title})" if title else "metric"
    rows = [f"| {head} | value | 95% CI | n |", "|---|---|---|---|"]
    rows += [f"| {k} | {m.value:.3f} | [{m.low:.3f}, {m.high:.3f}] | {m.n} |" for k, m in metrics.items()]
    return "\n".join(rows)


def oracle_edit_accuracy(n: int = 500, offset: int = 0) -> dict:
    """The edit oracle on clean renders of ``n`` held-out pairs: ``success`` (rate of
    ``score_edit(source, instruction, render(target)).success``), ``unchanged`` (rate of
    ``changed is False`` on ``render(source)``: the unedited image is never an edit), and the
    seeds of the pairs that failed either."""
    ok, unchanged, failed = [], [], []
    for pair in eval_edit_pairs(n, offset):
        a = score_edit(pair.source, pair.instruction, render(pair.target))
        b = score_edit(pair.source, pair.instruction, render(pair.source))
        ok.append(a.success)
        unchanged.append(b.changed is False)
        if not (a.success and b.changed is False):
            failed.append(pair.seed)
    return {"success": float(np.mean(ok)), "unchanged": float(np.mean(unchanged)), "n": n, "failed": failed}


# ----------------------------------------------------------------------------- harness


@dataclass
class EditReport:
    scores: list[EditScore]
    seeds: list[int]
    images: list = field(default_factory=list)  # uint8 [H, W, 3] per edit, when return_images=True
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def metrics(self) -> dict[str, Metric]:
        return edit_metrics(self.scores)

    def to_markdown(self, title: str = "") -> str:
        return metrics_markdown(self.metrics(), title)

    def as_dict(self, per_edit: bool = True) -> dict:
        d = {"n_edits": len(self), "settings": self.settings,
             "metrics": {k: m._asdict() for k, m in self.metrics().items()}}
        if per_edit:
            d["edits"] = [dict(s.as_dict(), seed=seed) for s, seed in zip(self.scores, self.seeds)]
        return d


def evaluate_edits(pipe, pairs: list[EditPair] | None = None, n: int | None = None, *, context_images=None,
                   batch_size: int = 8, progress: bool = True, return_images: bool = False,
                   **call_kwargs) -> EditReport:
    """Edit every pair's source with ``pipe`` and grade the edit with ``score_edit``.

    pairs: edit pairs (default: ``eval_edit_pairs(n)``). context_images: the images to give the
    editor instead of the clean source renders (e.g. protected ones; one per pair); the grade is
    always against the clean source scene. Edit i's noise comes from
    ``torch.Generator().manual_seed(pairs[i].seed)``. ``pipe`` is a ``FluxKontextPipeline`` (or
    any callable taking ``image=, prompt=, generator=, output_type="np"`` and returning
    ``.images`` [B, H, W, 3] in [0, 1]); ``call_kwargs`` go to it."""
    import torch
    from tqdm.auto import tqdm

    if pairs is None:
        if n is None:
            raise UsageError("evaluate_edits() needs pairs=[EditPair, ...] or n (held-out pairs eval_edit_pairs(n))")
        pairs = eval_edit_pairs(n)
    pairs = list(pairs)
    if context_images is not None and len(context_images) != len(pairs):
        raise UsageError(f"evaluate_edits(): {len(context_images)} context images for {len(pairs)} pairs; "
                         "give one per pair")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    plain = (int, float, str, bool, type(None))
    settings = {"batch_size": batch_size, **{k: v if isinstance(v, plain) else repr(v) for k, v in call_kwargs.items()}}
    report = EditReport(scores=[], seeds=[], settings=settings)
    call_kwargs.setdefault("output_type", "np")
    bar = tqdm(total=len(pairs), desc="evaluate edits", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        images = ([_as_pil(im) for im in context_images[start: start + batch_size]] if context_images is not None
                  else [render(p.source) for p in chunk])
        gens = [torch.Generator().manual_seed(p.seed) for p in chunk]
        out = pipe(image=images, prompt=[p.instruction for p in chunk], generator=gens, **call_kwargs).images
        for p, img in zip(chunk, out):
            arr = (np.asarray(img.convert("RGB")) if isinstance(img, Image.Image)  # output_type="pil"
                   else (np.clip(np.asarray(img, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8))  # [H, W, 3]
            report.scores.append(score_edit(p.source, p.instruction, arr))
            report.seeds.append(p.seed)
            if return_images:
                report.images.append(arr)
        bar.update(len(chunk))
    bar.close()
    return report


def _as_pil(image) -> Image.Image:
    from .oracle import to_pil

    return to_pil(image)


__all__ = ["EditSpec", "EditPair", "EditScore", "ObjectCheck", "EditReport", "parse_instruction", "edit_instruction",
           "edit_vocabulary", "max_instruction_words", "resolve_referent", "check_edit", "apply_edit", "sample_edit",
           "sample_edit_source", "train_edit_seeds", "eval_edit_seeds", "edit_pairs", "eval_edit_pairs",
           "expected_objects", "score_edit", "edit_metrics", "metrics_markdown", "oracle_edit_accuracy",
           "evaluate_edits", "EDIT_KINDS", "P_EDITS", "DIRECTIONS", "EDIT_MIN_RADIUS", "MOVE_RANGE",
           "POSITION_TOLERANCE", "MOVE_MIN_SHIFT", "GRAMMAR"]
