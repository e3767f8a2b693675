"""The oracle: parse any image of the shapes world back into objects, and grade prompts.

``parse(image)`` classifies pixels by their nearest palette colour (tolerating the colour
drift of generated images), labels connected components per colour, drops specks, and
names each component's shape from its geometry: the fill ratio of its bounding box
(square ≈ 1.0, circle ≈ π/4, upright triangle ≈ 0.5) and, for the ambiguous middle, whether
it widens downward as an upright triangle does. ``score(image, prompt)`` matches the
prompt's objects one to one with what was found and checks relation and styles.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from .world import BACKGROUNDS, COLORS, OUTLINE_ON, SIZE, PromptSpec, parse_prompt, relation_holds

COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # [4, 3]
MIN_AREA = 14  # pixels; smaller components are specks, not objects
MAX_COLOR_DISTANCE = 110.0  # RGB distance beyond which a pixel belongs to no object colour


@dataclass
class DetectedObject:
    shape: str
    color: str
    cx: float
    cy: float
    size: float  # radius of a disc of the same area
    area: int


@dataclass
class Parsed:
    objects: list[DetectedObject]
    background: str
    outline: bool

    @property
    def styles(self) -> dict[str, bool]:
        return {"dark": self.background == "dark", "outline": self.outline}


@dataclass
class Score:
    prompt: str
    requested: int
    found: list[bool]  # per requested object: present with the right colour and shape
    color_found: list[bool]  # per requested object: its colour present (any shape)
    relation_ok: bool | None  # None when the prompt states no relation
    style_ok: dict[str, bool] = field(default_factory=dict)  # per style the prompt sets or not
    extra_objects: int = 0

    @property
    def object_accuracy(self) -> float:
        return sum(self.found) / self.requested

    @property
    def all_present(self) -> bool:
        return all(self.found)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(object_accuracy=self.object_accuracy, all_present=self.all_present)
        return d


def to_array(image) -> np.ndarray:
    """PIL image, uint8 [H, W, 3] array or float tensor [3, H, W] in [0, 1] -> float [64, 64, 3]."""
    if hasattr(image, "detach"):  # torch tensor
        image = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _background(arr: np.ndarray) -> str:
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # [4*64, 3]
    lum = np.median(border.mean(-1))
    return "dark" if lum < (np.mean(BACKGROUNDS["light"]) + np.mean(BACKGROUNDS["dark"])) / 2 else "light"


def _shape(mask: np.ndarray) -> str:
    """Shape of one component from its geometry (robust to blur and ragged edges).

    Squares fill their bounding box (and its corners), discs leave the corners outside the
    inscribed ellipse empty, upright triangles fill half of the box and widen downward.
    """
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    box = mask[y0 : ys.max() + 1, x0 : xs.max() + 1]
    h, w = box.shape
    fill = box.mean()
    rows = box.sum(1).astype(np.float32)
    third = max(1, h // 3)
    widens = rows[-third:].mean() > 1.6 * rows[:third].mean()
    if fill < 0.62 or (widens and fill < 0.75):
        return "triangle"
    yy, xx = np.mgrid[0:h, 0:w]
    outside = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 > 1.15
    corner_fill = box[outside].mean() if outside.any() else fill
    return "square" if corner_fill > 0.5 else "circle"


def parse(image) -> Parsed:
    """Objects (shape, colour, centre, size), background and outline style of an image."""
    arr = to_array(image)
    background = _background(arr)
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)
    outline_rgb = np.array(OUTLINE_ON[background], dtype=np.float32)
    # nearest of: background, outline colour, the four object colours
    refs = np.concatenate([bg[None], outline_rgb[None], _PALETTE])  # [6, 3]
    dist = np.linalg.norm(arr[:, :, None, :] - refs[None, None], axis=-1)  # [64, 64, 6]
    label = dist.argmin(-1)
    object_px = (label >= 2) & (dist.min(-1) < MAX_COLOR_DISTANCE)
    outline_px = (label == 1) & (dist[..., 1] < 120)
    objects, union = [], np.zeros(arr.shape[:2], dtype=bool)
    for ci, color in enumerate(COLOR_NAMES):
        mask = object_px & (label == ci + 2)
        mask = ndimage.binary_opening(mask, structure=np.ones((2, 2)))  # drop 1-px fringes
        comps, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for i in range(1, n + 1):
            fill = comp = comps == i
            if outline_px.any():  # an outline is drawn inside the shape: grow the fill into it
                for _ in range(4):  # the 2-px outline, and the thin apex of a triangle
                    comp = ndimage.binary_dilation(comp, structure=np.ones((3, 3))) & (comp | outline_px)
            area = int(comp.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(comp)
            objects.append(
                DetectedObject(_shape(comp), color, float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, float(np.sqrt(area / np.pi)), area)
            )
            union |= fill
    # outline: the ring around the objects is mostly outline-coloured
    outline = False
    if union.any():
        ring = ndimage.binary_dilation(union, iterations=2) & ~union
        outline = bool(outline_px[ring].mean() > 0.35)
    return Parsed(objects=objects, background=background, outline=outline)


def _match(spec: PromptSpec, parsed: Parsed):
    """One-to-one matching of requested to detected objects: exact (colour and shape) first."""
    free = list(range(len(parsed.objects)))
    found, matched = [False] * len(spec.objects), [None] * len(spec.objects)
    for i, (color, shape) in enumerate(spec.objects):
        for j in free:
            o = parsed.objects[j]
            if o.color == color and o.shape == shape:
                found[i], matched[i] = True, j
                free.remove(j)
                break
    color_found = [found[i] or any(parsed.objects[j].color == c for j in free) for i, (c, _) in enumerate(spec.objects)]
    return found, matched, color_found, len(free)


def score(image, prompt: str, parsed: Parsed | None = None) -> Score:
    """Grade an image against a prompt of the world's grammar."""
    spec = parse_prompt(prompt)
    parsed = parsed or parse(image)
    found, matched, color_found, extra = _match(spec, parsed)
    relation_ok = None
    if spec.relation is not None:
        a, b = matched
        relation_ok = bool(
            a is not None
            and b is not None
            and relation_holds(
                (parsed.objects[a].cx, parsed.objects[a].cy), (parsed.objects[b].cx, parsed.objects[b].cy), spec.relation
            )
        )
    style_ok = {name: parsed.styles[name] == wanted for name, wanted in spec.styles.items()}
    return Score(prompt, len(spec.objects), found, color_found, relation_ok, style_ok, extra)


def perturb(image, rng: np.random.Generator, strength: float = 1.0) -> Image.Image:
    """A render degraded the way generated images are: blur, colour drift, noise (for tests
    of the oracle's tolerance). ``strength`` 1.0: blur σ 0.8 px, per-channel drift up to
    ±25, noise σ 8."""
    arr = to_array(image)
    arr = ndimage.gaussian_filter(arr, sigma=(0.8 * strength, 0.8 * strength, 0))
    arr = arr + rng.uniform(-25, 25, size=3) * strength
    arr = arr + rng.normal(0, 8 * strength, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
