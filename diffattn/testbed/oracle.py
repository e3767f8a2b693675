"""The oracle: parse any image of the shapes world back into objects, and grade prompts.

``parse(image)`` works in five steps, each chosen to survive what tiny diffusion models do
to an image (blur, colour drift, ragged shapes, colour fringes, specks, noise):

1. **Noise.** Pixel noise is estimated (Immerkær 1996); an image noisier than
   ``NOISE_TOLERATED`` is smoothed down to it, so noise never forms colour regions.
2. **Background.** The median colour of a 2-px frame names the background: light or dark by
   luminance. Within ``BACKGROUND_TOLERANCE`` of the palette background the difference is a
   global colour drift and is subtracted from the whole image; farther away the background is
   ``"other"`` (coloured or patterned: wrong for every prompt, which always means a plain one).
3. **Pixels.** Object colours are saturated, background and outline colours grey, so an
   anti-aliased mix of an object colour with background or outline keeps the object's hue and
   scales its chroma (``max - min`` of RGB). A pixel belongs to the palette colour of the
   nearest hue when its chroma is at least ``MIN_ALPHA`` of that colour's (its coverage
   ``alpha`` is more than half). Outline pixels are grey and nearer the outline colour than
   the background in luminance.
4. **Objects.** Connected components per colour (8-connected), grown through adjacent outline
   pixels (the world draws outlines inside the shape: fill + outline is the whole shape).
   A component touching a much larger one of another colour along its edge is a fringe of it
   (a red shape turning orange at one end) and joins it. A component is an object when it
   has ``MIN_AREA`` pixels, a core (a pixel ``MIN_CORE`` px from its edge) and solid colour
   (``MIN_PURITY``): specks, lines and faint smears are never objects; components spanning
   the frame are background.
5. **Shape.** Templates of each shape with the component's area and centroid (anti-aliased
   by supersampling; squares and triangles also tilted up to ``MAX_TILT``) are compared with
   the component by intersection over union, and the best names the shape. Fill ratios and
   bounding boxes break under blur and rounding; area and centroid do not. Below
   ``MIN_SHAPE_IOU`` the shape is ``"blob"``: a shapeless smear never earns a shape.

Touching components of one colour form one blob, reported as one object with the
best-fitting shape. Objects report their centre in the world's convention (the centre of the
circumscribing circle: for an upright triangle 0.15 R above its centroid) and ``size`` as
that circle's radius, so on clean renders they reproduce the scene's numbers (within 0.5 px
and 1 px).

``score(image, prompt)`` matches the prompt's objects one to one with the detected ones
(exact colour and shape first, then colour, then shape), checks the relation on the matched
centres (``world.relation_holds``) and the styles. ``perturb`` and ``oracle_accuracy``
measure how much degradation the oracle tolerates (table in ``oracle_accuracy``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from ..errors import DiffattnError
from .world import BACKGROUNDS, COLORS, OUTLINE_ON, SHAPES, SIZE, PromptSpec, parse_prompt, relation_holds

COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # [4, 3]

NOISE_TOLERATED = 10.0  # pixel noise (std, 0-255) read as is; noisier images are smoothed down to it
BACKGROUND_TOLERANCE = 75.0  # RGB distance: a frame colour this close to a palette background is that background, drifted
MIN_ALPHA = 0.5  # a pixel belongs to an object colour when more than half its colour is that colour
MAX_HUE_DISTANCE = 50.0  # degrees; pixels of other hues (magenta, cyan...) belong to no object colour
OUTLINE_MAX_CHROMA = 60.0  # outline pixels are grey
MIN_AREA = 25  # pixels; the smallest object of the world (a triangle of radius 7) covers ~64
MIN_CORE = 2.0  # px; an object has a pixel this far from its edge (a fringe or a line does not)
MAX_BORDER_SHARE = 0.2  # a component touching this share of the frame is background
MIN_SHAPE_IOU = 0.7  # below this IoU with every shape template an object is a "blob"
MAX_TILT = 20.0  # degrees a square or triangle may be rotated and still count
TILTS = tuple(np.linspace(-MAX_TILT, MAX_TILT, 7))  # template rotations tried
MIN_PURITY = 0.7  # 90th percentile of an object's colour coverage over its fill (faint smears are not objects)
FRINGE_RATIO = 2.0  # a touching component of another colour this many times larger absorbs a fringe
WEAK_ALPHA = 0.2  # coverage of the seam pixels between a fill and its outline
OUTLINE_GROW = 4  # px an object grows into adjacent outline pixels (2-px outline, blurred, thin triangle apex)
OUTLINE_RING_SHARE = 0.2  # share of outline pixels in the ring inside the objects' edges for "with outlines"


def _hue_chroma(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (max - min) of RGB pixels [..., 3] (the HSV hexcone)."""
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    mx, mn = arr.max(-1), arr.min(-1)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (60.0 * h) % 360.0, c


_PALETTE_HUE, _PALETTE_CHROMA = _hue_chroma(_PALETTE)  # [4], [4]


def _luminance(arr: np.ndarray) -> np.ndarray:
    return arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # Rec. 601 luma


# ----------------------------------------------------------------------------- results


@dataclass
class DetectedObject:
    shape: str  # "circle" | "square" | "triangle" | "blob" (no shape fits: best IoU < MIN_SHAPE_IOU)
    color: str
    cx: float  # centre of the circumscribing circle, pixels (the world's convention)
    cy: float
    size: float  # radius of the circumscribing circle, pixels
    area: int  # pixels, fill and outline
    confidence: float  # shape IoU with the best template x colour purity, in [0, 1]
    shape_iou: dict[str, float] = field(default_factory=dict)  # IoU with each shape's template

    @property
    def centre(self) -> tuple[float, float]:
        return (self.cx, self.cy)


@dataclass
class Parsed:
    objects: list[DetectedObject]
    background: str  # "light" | "dark" | "other" (not a plain background of the world)
    outline: bool
    drift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # global colour drift removed (RGB)
    outline_share: float = 0.0  # share of outline pixels in the ring inside the objects' edges

    @property
    def styles(self) -> dict[str, bool]:
        return {"dark": self.background == "dark", "outline": self.outline}

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Score:
    prompt: str
    requested: int
    found: list[bool]  # per requested object: matched by a detected object of the right colour AND shape
    color_found: list[bool]  # per requested object: matched by a detected object of its colour (any shape)
    relation_ok: bool | None  # None when the prompt states no relation; False unless both objects are found
    style_ok: dict[str, bool] = field(default_factory=dict)  # "dark", "outline": the image shows what the prompt says
    extra_objects: int = 0  # detected objects left over by the one-to-one matching
    relation_color_ok: bool | None = None  # the relation judged on colour matches (shape ignored)
    style_requested: dict[str, bool] = field(default_factory=dict)  # the styles the prompt asks for
    matched: list[int | None] = field(default_factory=list)  # per requested object: index in parsed.objects
    parsed: Parsed | None = None

    @property
    def object_accuracy(self) -> float:
        """Fraction of the requested objects present with the right colour and shape."""
        return sum(self.found) / self.requested

    @property
    def color_accuracy(self) -> float:
        """Fraction of the requested objects whose colour is present (on an object of its own)."""
        return sum(self.color_found) / self.requested

    @property
    def all_present(self) -> bool:
        return all(self.found)

    @property
    def style_accuracy(self) -> float:
        """Fraction of the style attributes (dark background, outlines) the image gets right,
        asked for or not (a caption without the suffix means a light, unoutlined image)."""
        return sum(self.style_ok.values()) / len(self.style_ok)

    @property
    def correct(self) -> bool:
        """Everything right: all objects, the relation, both styles, nothing extra."""
        return (self.all_present and self.relation_ok in (None, True) and all(self.style_ok.values())
                and self.extra_objects == 0)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            object_accuracy=self.object_accuracy,
            color_accuracy=self.color_accuracy,
            all_present=self.all_present,
            style_accuracy=self.style_accuracy,
            correct=self.correct,
        )
        return d


# ----------------------------------------------------------------------------- input


def to_array(image) -> np.ndarray:
    """PIL image, uint8 [H, W, 3] array, float array [H, W, 3] in [0, 1] or float tensor
    [3, H, W] in [0, 1] -> float32 [64, 64, 3] in 0..255 (resized when needed)."""
    if hasattr(image, "detach"):  # torch tensor [3, H, W] (or [1, 3, H, W])
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise DiffattnError(f"oracle: expected a tensor [3, H, W] in [0, 1], got shape {tuple(t.shape)}")
        image = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)  # [H, W, 3]
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 4 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 3 or a.shape[-1] != 3:
            raise DiffattnError(f"oracle: expected an array [H, W, 3], got shape {a.shape}")
        if a.dtype != np.uint8:  # float images in [0, 1] (diffusers output_type="np")
            a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
        image = Image.fromarray(a)
    if not isinstance(image, Image.Image):
        raise DiffattnError(
            f"oracle: cannot read an image from {type(image).__name__}; pass a PIL image, an array or a tensor"
        )
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.BILINEAR)  # Pillow filters when it shrinks
    return np.asarray(image, dtype=np.float32)


def to_pil(image) -> Image.Image:
    """Any image the oracle reads, as a PIL image (its own size when it is already PIL)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(to_array(image).astype(np.uint8))


# ----------------------------------------------------------------------------- parsing


def estimate_noise(arr: np.ndarray) -> float:
    """Standard deviation of additive pixel noise (0-255 units), by Immerkær's fast estimator
    ("Fast noise variance estimation", CVIU 1996): sqrt(pi/2) / (6 (W-2)(H-2)) sum |I * N|,
    N the difference of two Laplacians, which cancels smooth structure; averaged over channels."""
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    h, w = arr.shape[:2]
    total = sum(np.abs(ndimage.convolve(arr[..., c], kernel)[1:-1, 1:-1]).sum() for c in range(3))
    return float(np.sqrt(np.pi / 2) * total / (6 * (w - 2) * (h - 2) * 3))


def _denoise(arr: np.ndarray) -> np.ndarray:
    """Smooth a noisy image just enough that its noise falls to ~NOISE_TOLERATED (a Gaussian of
    sigma s divides iid noise by ~2 sqrt(pi) s), so heavy noise never forms colour regions."""
    noise = estimate_noise(arr)
    if noise <= NOISE_TOLERATED:
        return arr
    sigma = noise / (2 * np.sqrt(np.pi) * NOISE_TOLERATED)
    return ndimage.gaussian_filter(arr, sigma=(sigma, sigma, 0))


def _background(arr: np.ndarray) -> tuple[str, str, np.ndarray]:
    """Background name ("light", "dark", "other"), tone ("light" or "dark" by luminance) and
    the global drift to remove (RGB), from the median colour of a 2-px frame."""
    frame = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3),
                            arr[2:-2, :2].reshape(-1, 3), arr[2:-2, -2:].reshape(-1, 3)])  # [n, 3]: a 2-px frame
    median = np.median(frame, axis=0)
    mid = (np.mean(BACKGROUNDS["light"]) + np.mean(BACKGROUNDS["dark"])) / 2
    tone = "dark" if _luminance(median) < mid else "light"
    drift = median - np.array(BACKGROUNDS[tone], dtype=np.float32)
    if np.linalg.norm(drift) > BACKGROUND_TOLERANCE:
        return "other", tone, np.zeros(3, dtype=np.float32)
    return tone, tone, drift.astype(np.float32)


def _template(shape: str, mx: float, my: float, area: float, x0: int, y0: int, h: int, w: int, angle: float = 0.0,
              ss: int = 4) -> np.ndarray:
    """Coverage [h, w] of the window at (x0, y0) by ``shape`` with area ``area``, centroid
    (mx, my) and rotation ``angle`` (degrees), anti-aliased by ss x ss samples per pixel."""
    off = (np.arange(ss) + 0.5) / ss
    ys = (y0 + np.arange(h)[:, None] + off[None, :]).reshape(-1)  # [h*ss] sample rows
    xs = (x0 + np.arange(w)[:, None] + off[None, :]).reshape(-1)  # [w*ss] sample columns
    dx, dy = xs[None, :] - mx, ys[:, None] - my  # [1, w*ss], [h*ss, 1]
    if angle:  # sample coordinates in the shape's own frame
        c, s_ = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        dx, dy = c * dx + s_ * dy, -s_ * dx + c * dy  # [h*ss, w*ss] each
    if shape == "circle":
        inside = dx**2 + dy**2 <= area / np.pi
    elif shape == "square":
        half = np.sqrt(area) / 2
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # upright equilateral, centroid at (mx, my), circumradius R
        r = np.sqrt(4 * area / (3 * np.sqrt(3)))
        # three half-planes: the base (y <= R/2) and the two sides through the apex (0, -R)
        inside = (dy <= r / 2) & (np.sqrt(3) * dx - dy <= r) & (-np.sqrt(3) * dx - dy <= r)
    else:
        raise ValueError(shape)
    inside = np.broadcast_to(inside, (h * ss, w * ss))
    return inside.reshape(h, ss, w, ss).sum(axis=(1, 3), dtype=np.float32) / (ss * ss)  # [h, w]


def _circumradius(shape: str, area: float) -> float:
    """Radius of the circumscribing circle of ``shape`` with ``area`` (a blob: a disc's)."""
    if shape == "square":
        return float(np.sqrt(area / 2))
    if shape == "triangle":
        return float(np.sqrt(4 * area / (3 * np.sqrt(3))))
    return float(np.sqrt(area / np.pi))


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """Shape of one object mask [H, W] (bool): the template (same area and centroid) of the
    highest intersection over union, or "blob" when none reaches MIN_SHAPE_IOU.

    Squares and triangles may be tilted up to ``MAX_TILT`` degrees (the world draws them
    upright; a generated square a little askew is still a square). Templates are compared
    on a window around the mask wide enough to hold every template of its area."""
    ys, xs = np.nonzero(mask)
    area = float(len(ys))
    mx, my = xs.mean() + 0.5, ys.mean() + 0.5  # centroid, pixel centres
    reach = int(np.ceil(0.9 * np.sqrt(area))) + 1  # > circumradius of a same-area triangle (0.88 sqrt(area))
    # the window holds the mask and every template: the mask's box and the templates' reach
    y0, x0 = min(int(ys.min()), int(np.floor(my)) - reach), min(int(xs.min()), int(np.floor(mx)) - reach)
    h = max(int(ys.max()) + 1, int(np.floor(my)) + reach + 1) - y0
    w = max(int(xs.max()) + 1, int(np.floor(mx)) + reach + 1) - x0
    m = np.zeros((h, w), dtype=np.float32)  # [h, w] the mask in the window, zero outside the image
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(mask.shape[0], y0 + h), min(mask.shape[1], x0 + w)
    m[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = mask[sy0:sy1, sx0:sx1]
    ious = {}
    for shape in SHAPES:
        angles = (0.0,) if shape == "circle" else TILTS
        best = 0.0
        for angle in angles:
            t = _template(shape, mx, my, area, x0, y0, h, w, angle)
            best = max(best, float(np.minimum(m, t).sum() / np.maximum(m, t).sum()))
        ious[shape] = best
    best = max(ious, key=ious.get)
    return (best if ious[best] >= MIN_SHAPE_IOU else "blob"), ious


def _pixel_classes(arr: np.ndarray, tone: str):
    """Per pixel: object colour index (-1 for none), coverage alpha, outline-pixel mask, and
    per colour the pixels of its hue at a coverage of at least WEAK_ALPHA [4, H, W]."""
    hue, chroma = _hue_chroma(arr)  # [H, W] each
    dh = np.abs(hue[..., None] - _PALETTE_HUE)  # [H, W, 4]
    dh = np.minimum(dh, 360 - dh)
    color = dh.argmin(-1)  # [H, W]
    alpha = chroma / _PALETTE_CHROMA[color]
    is_obj = (alpha >= MIN_ALPHA) & (dh.min(-1) <= MAX_HUE_DISTANCE)
    lum = _luminance(arr)
    bg_lum, ol_lum = _luminance(np.array(BACKGROUNDS[tone], np.float32)), _luminance(np.array(OUTLINE_ON[tone], np.float32))
    outline_px = (chroma < OUTLINE_MAX_CHROMA) & (np.abs(lum - ol_lum) < np.abs(lum - bg_lum))
    hue_ok = dh.min(-1) <= MAX_HUE_DISTANCE
    weak = np.stack([(color == ci) & hue_ok & (alpha >= WEAK_ALPHA) for ci in range(len(COLOR_NAMES))])  # [4, H, W]
    return np.where(is_obj, color, -1), alpha, outline_px, weak


def _grow_into_outline(fill: np.ndarray, outline_px: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The whole shape of an object: its fill grown (geodesically, at most OUTLINE_GROW px)
    through adjacent outline pixels and the weaker pixels of its own hue between them (the
    anti-aliased seam of fill and outline), holes closed (blur darkens a small fill inside its
    outline below the colour threshold). Without outline pixels in reach it is the fill."""
    eight = np.ones((3, 3), dtype=bool)
    domain = fill | outline_px | weak
    extent = fill
    for _ in range(OUTLINE_GROW):
        grown = ndimage.binary_dilation(extent, structure=eight) & domain
        if (grown == extent).all():
            break
        extent = grown
    if not (extent & outline_px).any():
        return fill
    return ndimage.binary_fill_holes(extent)


@dataclass
class _Component:
    color: str
    fill: np.ndarray  # [64, 64] bool: pixels of the colour
    extent: np.ndarray  # [64, 64] bool: fill + its outline (+ merged fringes)


def _components(color_idx: np.ndarray, outline_px: np.ndarray, weak: np.ndarray) -> list[_Component]:
    """Connected components (8-connected) of each object colour, grown into their outlines
    (``weak`` [4, H, W]: pixels of each colour's hue at lower coverage). Components covering
    much of the frame (or half the image) are a coloured background."""
    frame = np.zeros(color_idx.shape, dtype=bool)
    frame[[0, -1], :] = frame[:, [0, -1]] = True
    comps = []
    for ci, color in enumerate(COLOR_NAMES):
        labels, n = ndimage.label(color_idx == ci, structure=np.ones((3, 3)))
        for i in range(1, n + 1):
            fill = labels == i
            if (fill & frame).sum() > MAX_BORDER_SHARE * frame.sum() or fill.sum() > 0.5 * fill.size:
                continue
            comps.append(_Component(color, fill, _grow_into_outline(fill, outline_px, weak[ci])))
    return comps


def _merge_fringes(comps: list[_Component]) -> list[_Component]:
    """Fold colour fringes into the object they border: a component touching one of another
    colour at least FRINGE_RATIO times its area, along at least a fifth of its edge, is a
    gradient or fringe of that object (a red shape turning orange at one end), not an object.
    Objects of the world never touch, so clean renders are unaffected."""
    eight = np.ones((3, 3), dtype=bool)
    comps = sorted(comps, key=lambda c: int(c.extent.sum()))
    alive = [True] * len(comps)
    for i, a in enumerate(comps):
        area_a = int(a.extent.sum())
        edge = a.extent & ~ndimage.binary_erosion(a.extent, structure=eight)
        ring = ndimage.binary_dilation(a.extent, structure=eight) & ~a.extent
        best, best_contact = None, 0
        for j in range(i + 1, len(comps)):
            b = comps[j]
            if not alive[j] or b.color == a.color or b.extent.sum() < FRINGE_RATIO * area_a:
                continue
            contact = int((ring & b.extent).sum())
            if contact >= max(2, 0.2 * edge.sum()) and contact > best_contact:
                best, best_contact = j, contact
        if best is not None:
            comps[best].extent = comps[best].extent | a.extent
            alive[i] = False
    return [c for c, keep in zip(comps, alive) if keep]


def _as_object(comp: _Component, alpha: np.ndarray) -> DetectedObject | None:
    """The detected object of a component, or None for a speck, a line or a faint smear."""
    extent = comp.extent
    area = int(extent.sum())
    if area < MIN_AREA or ndimage.distance_transform_edt(np.pad(extent, 1)).max() < MIN_CORE:
        return None
    purity = float(min(1.0, np.percentile(alpha[comp.fill], 90)))
    if purity < MIN_PURITY:
        return None
    shape, ious = classify_shape(extent)
    ys, xs = np.nonzero(extent)
    mx, my = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5  # centroid, pixel centres
    radius = _circumradius(shape, area)
    if shape == "triangle":  # the world's triangle sits 0.15 R below its circle's centre
        my -= 0.15 * radius
    return DetectedObject(shape, comp.color, mx, my, radius, area, float(max(ious.values()) * purity), ious)


def _outline_share(extents: list[np.ndarray], outline_px: np.ndarray) -> float:
    """Share of outline pixels in the band from 1 px outside to 2 px inside the objects' edges.
    The world draws outlines 2 px wide inside the shape: ~1/2 of the band when styled, ~0 not."""
    if not extents:
        return 0.0
    eight = np.ones((3, 3), dtype=bool)
    union = np.logical_or.reduce(extents)
    band = ndimage.binary_dilation(union, structure=eight) & ~ndimage.binary_erosion(union, iterations=2)
    return float(outline_px[band].mean()) if band.any() else 0.0


def _detect(image):
    """What ``parse`` and ``parse_v2`` share: the drift-corrected array, background, tone,
    colour drift, outline pixels, every component, the kept (component, object) pairs (by
    colour, then area) and the objects' outline share."""
    arr = _denoise(to_array(image))
    background, tone, drift = _background(arr)
    arr = np.clip(arr - drift, 0, 255)
    color_idx, alpha, outline_px, weak = _pixel_classes(arr, tone)
    comps = _merge_fringes(_components(color_idx, outline_px, weak))
    comps.sort(key=lambda c: (COLOR_NAMES.index(c.color), -int(c.extent.sum())))
    kept = [(c, o) for c in comps if (o := _as_object(c, alpha)) is not None]
    share = _outline_share([c.extent for c, _ in kept], outline_px)
    return arr, background, tone, drift, outline_px, comps, kept, share


def parse(image) -> Parsed:
    """Objects (shape, colour, centre, size, area, confidence), background and outline style
    of an image of the shapes world (any size; read at 64x64). Objects are listed by colour
    (palette order), then by area."""
    arr, background, tone, drift, outline_px, comps, kept, share = _detect(image)
    return Parsed(
        objects=[o for _, o in kept],
        background=background,
        outline=bool(kept) and share >= OUTLINE_RING_SHARE,
        drift=tuple(float(d) for d in drift),
        outline_share=share,
    )


# ----------------------------------------------------------------------------- scoring

_COST_EXACT, _COST_COLOR, _COST_SHAPE, _COST_NONE = 0.0, 1.0, 2.0, 3.0
_RELATION_TIE = 0.1  # among equally good matchings, prefer one where the relation holds


def _match_cost(want: tuple[str, str], obj: DetectedObject) -> float:
    """Cost of explaining requested (colour, shape) by a detected object: exact < colour only <
    shape only < unrelated; confidence breaks ties (the clearer object is the match)."""
    color, shape = want
    if (obj.color, obj.shape) == want:
        base = _COST_EXACT
    elif obj.color == color:
        base = _COST_COLOR
    else:
        base = _COST_SHAPE if obj.shape == shape else _COST_NONE
    return base + 0.01 * (1.0 - obj.confidence)


def match(spec: PromptSpec, parsed: Parsed) -> list[int | None]:
    """One-to-one matching of the requested objects to detected ones (index or None each).

    Minimises the total cost (exact colour and shape 0, colour only 1, shape only 2; objects
    sharing neither are never matched), so every requested object that can be explained is,
    and the leftovers are the extra objects. For a relation prompt, among matchings of equal
    exactness the one where the relation holds wins (the prompt's objects are whichever
    detected objects best fit it)."""
    n_req, n_det = len(spec.objects), len(parsed.objects)
    if n_det == 0:
        return [None] * n_req
    cost = np.array([[_match_cost(w, o) for o in parsed.objects] for w in spec.objects])  # [n_req, n_det]
    if spec.relation is not None and n_req == 2:
        best, best_cost = [None, None], 2 * _COST_NONE
        for a in [*range(n_det), None]:
            for b in [*range(n_det), None]:
                if a is not None and a == b:
                    continue
                ca = cost[0, a] if a is not None and cost[0, a] < _COST_NONE else _COST_NONE
                cb = cost[1, b] if b is not None and cost[1, b] < _COST_NONE else _COST_NONE
                if (a is not None and ca == _COST_NONE) or (b is not None and cb == _COST_NONE):
                    continue
                total = ca + cb
                objs = parsed.objects
                if a is None or b is None or not relation_holds(objs[a].centre, objs[b].centre, spec.relation):
                    total += _RELATION_TIE
                if total < best_cost - 1e-12:
                    best, best_cost = [a, b], total
        return best
    rows, cols = linear_sum_assignment(cost)
    out: list[int | None] = [None] * n_req
    for r, c in zip(rows, cols):
        if cost[r, c] < _COST_NONE:
            out[r] = int(c)
    return out


def score(image, prompt: str, parsed: Parsed | None = None) -> Score:
    """Grade an image against a prompt of the world's grammar (``world.parse_prompt``).

    found: a matched object has the requested colour and shape. relation_ok: both objects
    found and ``world.relation_holds`` on their centres (None without a relation);
    relation_color_ok: the same on colour matches. style_ok: the image's background is dark
    exactly when the prompt says "on a dark background" (light otherwise; an "other"
    background fails both), and it has outlines exactly when the prompt says "with outlines".
    extra_objects: detected objects that explain no requested object."""
    spec = parse_prompt(prompt)
    parsed = parsed if parsed is not None else parse(image)
    matched = match(spec, parsed)
    objs = [parsed.objects[j] if j is not None else None for j in matched]
    found = [o is not None and (o.color, o.shape) == w for o, w in zip(objs, spec.objects)]
    color_found = [o is not None and o.color == w[0] for o, w in zip(objs, spec.objects)]
    relation_ok = relation_color_ok = None
    if spec.relation is not None:
        a, b = objs
        holds = a is not None and b is not None and relation_holds(a.centre, b.centre, spec.relation)
        relation_ok = bool(holds and all(found))
        relation_color_ok = bool(holds and all(color_found))
    want_bg = "dark" if spec.styles.get("dark") else "light"
    style_ok = {"dark": parsed.background == want_bg, "outline": parsed.outline == bool(spec.styles.get("outline"))}
    extra = len(parsed.objects) - sum(j is not None for j in matched)
    return Score(
        prompt=prompt,
        requested=len(spec.objects),
        found=found,
        color_found=color_found,
        relation_ok=relation_ok,
        style_ok=style_ok,
        extra_objects=extra,
        relation_color_ok=relation_color_ok,
        style_requested={k: bool(v) for k, v in spec.styles.items()},
        matched=matched,
        parsed=parsed,
    )


# ----------------------------------------------------------------------------- robustness

# perturb() at strength 1.0; every parameter scales linearly with the strength
PERTURB_DEFAULTS = dict(blur=0.8, color_drift=25.0, local_drift=12.0, noise=8.0, jitter=0.75)


def perturb(
    image,
    rng: np.random.Generator,
    strength: float = 1.0,
    *,
    blur: float | None = None,
    color_drift: float | None = None,
    local_drift: float | None = None,
    noise: float | None = None,
    jitter: float | None = None,
) -> Image.Image:
    """A render degraded the way generated images are, to measure the oracle's tolerance.

    In order: ``jitter`` (a smooth random displacement field of at most that many pixels:
    wobbly, ragged edges), Gaussian ``blur`` (sigma, px), a global per-channel colour shift
    uniform in ±``color_drift``, a smooth per-channel colour field of amplitude
    ``local_drift`` (drift that differs across the image, which no global correction
    removes), and Gaussian ``noise`` (sigma, 0-255 units). Unset parameters are
    ``PERTURB_DEFAULTS`` x ``strength`` (strength 1: jitter 0.75, blur 0.8, drift ±25,
    local drift 12, noise 8)."""
    p = {k: v * strength for k, v in PERTURB_DEFAULTS.items()}
    for k, v in dict(blur=blur, color_drift=color_drift, local_drift=local_drift, noise=noise, jitter=jitter).items():
        if v is not None:
            p[k] = float(v)
    arr = to_array(image)  # [64, 64, 3]
    h, w = arr.shape[:2]
    if p["jitter"] > 0:
        field_ = ndimage.gaussian_filter(rng.normal(size=(2, h, w)), sigma=(0, 3, 3))  # [2, H, W] smooth
        field_ *= p["jitter"] / max(np.abs(field_).max(), 1e-12)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        coords = np.stack([yy + field_[0], xx + field_[1]])  # [2, H, W]
        arr = np.stack([ndimage.map_coordinates(arr[..., c], coords, order=1, mode="nearest") for c in range(3)], -1)
    if p["blur"] > 0:
        arr = ndimage.gaussian_filter(arr, sigma=(p["blur"], p["blur"], 0))
    arr = arr + rng.uniform(-p["color_drift"], p["color_drift"], size=3)
    if p["local_drift"] > 0:
        lf = ndimage.gaussian_filter(rng.normal(size=(h, w, 3)), sigma=(8, 8, 0))  # [H, W, 3] smooth
        arr = arr + lf * (p["local_drift"] / max(np.abs(lf).max(), 1e-12))
    arr = arr + rng.normal(0, p["noise"], size=arr.shape) if p["noise"] > 0 else arr
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def oracle_accuracy(n: int = 300, strength: float = 1.0, seed: int = 0, **perturb_kwargs) -> dict[str, float]:
    """How often the oracle reads a perturbed render right, over ``n`` scenes of the training
    distribution (``world.sample_training_scene(seed + i)``), perturbed by ``perturb`` at
    ``strength`` (strength 0: clean renders). Returns rates: ``correct`` (everything right),
    ``object_accuracy``, ``color_accuracy``, ``relation_accuracy`` (relation prompts),
    ``style_accuracy`` (both attributes), ``extra_object_rate`` and ``centre_error`` (mean px
    distance of found objects from the truth).

    Measured (n=300, seed 0; see tests/test_oracle.py and benchmarks/RESULTS.md):

    ========  =======  ==========  =========  ========  =====  =====  ============
    strength  correct  object acc  color acc  relation  style  extra  centre error
    ========  =======  ==========  =========  ========  =====  =====  ============
    0         1.000    1.000       1.000      1.000     1.000  0.000  0.15 px
    0.5       1.000    1.000       1.000      1.000     1.000  0.000  0.15 px
    1.0       1.000    1.000       1.000      1.000     1.000  0.000  0.18 px
    1.5       0.970    0.981       0.993      0.962     0.998  0.000  0.27 px
    2.0       0.710    0.901       0.986      0.769     0.927  0.003  0.47 px
    ========  =======  ==========  =========  ========  =====  =====  ============

    One perturbation at a time (strength 1 with the others zero): blur 1.2 px 0.947 correct,
    blur 1.6 px 0.817; drift ±50 with local drift 25, noise 24, jitter 1.5 px: all 1.000.
    Blur is what breaks the oracle: it rounds the corners of small squares and swallows
    2-px outlines."""
    from .world import caption, render, sample_training_scene

    rng = np.random.default_rng(seed)
    names = ("correct", "object_accuracy", "color_accuracy", "relation_accuracy", "style_accuracy", "extra_object_rate",
             "centre_error")
    stats: dict[str, list[float]] = {k: [] for k in names}
    for i in range(n):
        scene = sample_training_scene(seed + i)
        img = render(scene)
        if strength > 0 or perturb_kwargs:
            img = perturb(img, rng, strength, **perturb_kwargs)
        s = score(img, caption(scene))
        stats["correct"].append(s.correct)
        stats["object_accuracy"].append(s.object_accuracy)
        stats["color_accuracy"].append(s.color_accuracy)
        stats["style_accuracy"].append(s.style_accuracy)
        stats["extra_object_rate"].append(s.extra_objects > 0)
        if s.relation_ok is not None:
            stats["relation_accuracy"].append(s.relation_ok)
        for o, j, ok in zip(scene.objects, s.matched, s.found):
            if ok:
                d = s.parsed.objects[j]
                stats["centre_error"].append(float(np.hypot(d.cx - o.cx, d.cy - o.cy)))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}


# ============================================================================= oracle v2
#
# ``parse_v2(image)`` reads what ``parse`` reads, unchanged (the same objects, colours, shapes,
# centres, background and outline: it runs the same steps), and adds:
#
# - **Markings**, per object. A marking is the fill's hue with its whiteness removed and 70%
#   of its chroma (``world.shade_color``), so on a fill pixel the shade fraction b shows twice:
#   in the whiteness (min of RGB) falling from the palette colour's to 0, b_w = 1 - w / w0, and
#   in the chroma falling to 70%, b_c = (1 - c / c0) / (1 - SHADE). The two agree (within
#   MARKING_AGREEMENT) on fill, marking and their anti-aliased mixes, and disagree on a fill
#   mixed with black (an outline seam), the dark backdrop or anything lighter, so only the
#   agreeing fill pixels are read. Their shade fractions are compared with each marking's
#   template drawn at the detected object (``world.marking_region`` clipped to the shape's
#   interior, the outline's 2 px removed when the image has outlines, anti-aliased 4x4); the
#   template of least total absolute difference names the marking when its mean difference is
#   at most MARKING_MAX_ERROR, it beats the runner-up by MARKING_MARGIN (in pixels of
#   difference) and at least MARKING_MIN_PIXELS pixels were read; otherwise the marking is
#   "unreadable" (ragged, blurred, drifted or too small to tell), never a guess.
# - **Aesthetics**, image-level measures with documented calls (``GRADED_ON`` = 0.25):
#   ``light``: the backdrop's luminance fitted as b0 + b1 (1 - 2y/64) on backdrop pixels away
#   from objects and shadows; strength b1 / LIGHT_AMPLITUDE. ``shadow``: the backdrop's
#   darkening 1 - L / (b0 + b1 (1 - 2y/64)) regressed on the predicted shadow (the detected
#   shapes offset by SHADOW_OFFSET and blurred by SHADOW_BLUR) over backdrop pixels it covers;
#   strength = slope / SHADOW_DARKEN. ``centring``: px from the frame centre of the detected
#   objects' mean centre (called centred within ``world.CENTRE_TOLERANCE``). A call is None
#   ("unreadable") when its measure cannot be taken: no objects, a background that is not
#   plain ("other"), too few backdrop pixels, or a backdrop that the fit does not explain
#   (residual above AESTHETIC_MAX_RESIDUAL).

from . import world as _world  # noqa: E402

MARKING_AGREEMENT = 0.3  # |b_w - b_c| at most this: a pixel of fill, marking or their mix
MARKING_MAX_ERROR = 0.2  # mean |shade - template| over the read pixels of the named marking
MARKING_MARGIN = 2.0  # the runner-up's total difference exceeds the best's by this many pixels
MARKING_MIN_PIXELS = 4  # fewer readable fill pixels: unreadable
AESTHETIC_MAX_RESIDUAL = 6.0  # 0-255: backdrop luminance RMS residual above this: light and shadow unreadable
BACKDROP_MAX_CHROMA = 20.0  # backdrop pixels (for light and shadow) are this grey, and 1 px off every object
SHADOW_MIN_COVER = 4.0  # summed predicted shadow over readable backdrop pixels below this: shadow unreadable
UNREADABLE = "unreadable"

_PALETTE_WHITE = _PALETTE.min(-1)  # [4] whiteness of each palette colour


@dataclass
class DetectedObjectV2(DetectedObject):
    marking: str = UNREADABLE  # world.MARKINGS or "unreadable"
    marking_error: dict[str, float] = field(default_factory=dict)  # mean |shade - template| per marking
    marking_pixels: int = 0  # fill pixels read for the marking


@dataclass
class ParsedV2(Parsed):
    shadow: float = float("nan")  # measured drop-shadow strength (1: the world's full shadow)
    light: float = float("nan")  # measured lighting-gradient strength (1: the world's full gradient)
    centring: float = float("nan")  # px of the objects' mean centre from the frame centre
    calls: dict[str, bool | None] = field(default_factory=dict)  # dark, outline, shadow, light, centred; None: unreadable
    backdrop_residual: float = float("nan")  # RMS (0-255) of the backdrop fit

    @property
    def styles_v2(self) -> dict[str, bool | None]:
        return dict(self.calls)


def _marking_templates(obj: DetectedObject, outline: bool) -> dict[str, np.ndarray]:
    """Per marking, the predicted shade fraction [64, 64] of the detected object's interior."""
    if obj.shape not in SHAPES:
        return {}
    so = _world.SceneObject(shape=obj.shape, color=obj.color, cx=obj.cx, cy=obj.cy, size=obj.size)
    interior, _ = _world._shape_masks(so, outline)
    s = _world.SUPERSAMPLE
    ys = (np.arange(SIZE * s)[:, None] + 0.5) / s
    xs = (np.arange(SIZE * s)[None, :] + 0.5) / s
    cover = _world._box_down(interior.astype(np.float32))  # [64, 64]
    safe = np.maximum(cover, 1e-6)
    return {m: _world._box_down((_world.marking_region(m, obj.shape, obj.cx, obj.cy, obj.size, xs, ys) & interior)
                                .astype(np.float32)) / safe for m in _world.MARKINGS}


def _read_marking(arr: np.ndarray, comp: _Component, obj: DetectedObject, outline: bool) -> tuple[str, dict, int]:
    ci = COLOR_NAMES.index(comp.color)
    w0, c0 = float(_PALETTE_WHITE[ci]), float(_PALETTE_CHROMA[ci])
    white = arr.min(-1)
    chroma = arr.max(-1) - white
    b_w = np.clip(1 - white / w0, 0, 1)
    b_c = np.clip((1 - chroma / c0) / (1 - _world.SHADE), 0, 1)
    readable = comp.fill & (np.abs(b_w - b_c) <= MARKING_AGREEMENT)
    templates = _marking_templates(obj, outline)
    n = int(readable.sum())
    if not templates or n < MARKING_MIN_PIXELS:
        return UNREADABLE, {}, n
    b = ((b_w + b_c) / 2)[readable]
    totals = {m: float(np.abs(b - t[readable]).sum()) for m, t in templates.items()}
    errors = {m: v / n for m, v in totals.items()}
    order = sorted(totals, key=totals.get)
    best, second = order[0], order[1]
    if errors[best] > MARKING_MAX_ERROR or totals[second] - totals[best] < MARKING_MARGIN:
        return UNREADABLE, errors, n
    return best, errors, n


def _shift_blur(mask: np.ndarray) -> np.ndarray:
    shifted = ndimage.shift(mask.astype(np.float64), (_world.SHADOW_OFFSET, _world.SHADOW_OFFSET), order=1, cval=0.0)
    return np.clip(ndimage.gaussian_filter(shifted, _world.SHADOW_BLUR, mode="constant"), 0, 1)


def _predicted_shadow(objects: list[DetectedObject], blobs: list[np.ndarray]) -> np.ndarray:
    """The darkening [64, 64] the world's drop shadow (strength 1) of the detected objects
    casts: ``world.shadow_field`` of their shapes, centres and sizes; a blob's own extent,
    offset and blurred."""
    shaped = [_world.SceneObject(o.shape, o.color, o.cx, o.cy, o.size) for o in objects if o.shape in SHAPES]
    field_ = _world.shadow_field(_world.Scene(objects=tuple(shaped))) if shaped else np.zeros((SIZE, SIZE))
    for m in blobs:
        field_ = np.maximum(field_, _shift_blur(m))
    return field_


def _aesthetics(arr: np.ndarray, extents: list[np.ndarray], shadow_t: np.ndarray, background: str):
    """(shadow, light, residual): measured strengths (NaN: unreadable) and the fit's RMS.
    ``extents``: every coloured component; ``shadow_t``: the predicted shadow at strength 1."""
    nan = float("nan")
    if background == "other":
        return nan, nan, nan
    eight = np.ones((3, 3), dtype=bool)
    union = np.logical_or.reduce(extents) if extents else np.zeros(arr.shape[:2], dtype=bool)
    near = ndimage.binary_dilation(union, structure=eight)
    _, chroma = _hue_chroma(arr)
    backdrop = ~near & (chroma < BACKDROP_MAX_CHROMA)
    lum = arr.mean(-1)
    g = np.broadcast_to(_world.light_field()[:, None] / _world.LIGHT_AMPLITUDE, lum.shape)  # 1 at top, -1 at bottom
    free = backdrop & (shadow_t < 0.01)
    if free.sum() < 64:
        return nan, nan, nan
    a = np.stack([np.ones(free.sum()), g[free]], 1)
    (b0, b1), *_ = np.linalg.lstsq(a, lum[free], rcond=None)
    base = b0 + b1 * g
    resid = float(np.sqrt(np.mean((lum[free] - base[free]) ** 2)))
    if resid > AESTHETIC_MAX_RESIDUAL:
        return nan, nan, resid
    light = float(b1 / _world.LIGHT_AMPLITUDE)
    cover = backdrop & (shadow_t >= 0.05)
    if shadow_t[cover].sum() < SHADOW_MIN_COVER:
        return nan, light, resid
    dark = 1 - lum[cover] / np.maximum(base[cover], 1.0)
    t = shadow_t[cover]
    shadow = float((dark * t).sum() / (t * t).sum() / _world.SHADOW_DARKEN)
    return shadow, light, resid


def parse_v2(image) -> ParsedV2:
    """``parse`` plus each object's marking and the image's aesthetics (module notes above).
    Objects, background and outline are exactly those of ``parse(image)``."""
    arr, background, tone, drift, outline_px, comps, kept, share = _detect(image)
    outline = bool(kept) and share >= OUTLINE_RING_SHARE
    objects = []
    for c, o in kept:
        marking, errors, n = _read_marking(arr, c, o, outline)
        objects.append(DetectedObjectV2(**asdict(o), marking=marking, marking_error=errors, marking_pixels=n))
    blobs = [c.extent for c, o in kept if o.shape not in SHAPES]
    shadow_t = _predicted_shadow([o for _, o in kept], blobs)
    shadow, light, resid = _aesthetics(arr, [c.extent for c in comps], shadow_t, background)
    cent = float(np.hypot(np.mean([o.cx for o in objects]) - SIZE / 2, np.mean([o.cy for o in objects]) - SIZE / 2)) \
        if objects else float("nan")
    calls = {
        "dark": None if background == "other" else background == "dark",
        "outline": outline,
        "shadow": None if np.isnan(shadow) else bool(shadow >= _world.GRADED_ON),
        "light": None if np.isnan(light) else bool(light >= _world.GRADED_ON),
        "centred": None if np.isnan(cent) else bool(cent <= _world.CENTRE_TOLERANCE),
    }
    return ParsedV2(objects=objects, background=background, outline=outline, drift=tuple(float(d) for d in drift),
                    outline_share=share, shadow=shadow, light=light, centring=cent, calls=calls,
                    backdrop_residual=resid)


# ----------------------------------------------------------------------------- v2 scoring


def _match_cost_v2(want, obj: DetectedObject) -> float:
    """Cost of explaining a requested v2 object (world.ObjectSpec) by a detected one: the
    wrong shape 2, a wrong named colour 1, a wrong named marking 0.5 (unspecified attributes
    cost nothing); confidence breaks ties."""
    cost = 2.0 * (obj.shape != want.shape)
    cost += 1.0 * (want.color is not None and obj.color != want.color)
    cost += 0.5 * (want.marking is not None and getattr(obj, "marking", None) != want.marking)
    return cost + 0.01 * (1.0 - obj.confidence)


def match_v2(spec, parsed: ParsedV2) -> list[int | None]:
    """One-to-one matching of a v2 prompt's objects to detected ones (index or None each),
    minimising ``_match_cost_v2``; pairs sharing nothing named (cost >= 3) are not matched."""
    n_req, n_det = len(spec.objects), len(parsed.objects)
    if n_det == 0:
        return [None] * n_req
    cost = np.array([[_match_cost_v2(w, o) for o in parsed.objects] for w in spec.objects])  # [n_req, n_det]
    rows, cols = linear_sum_assignment(cost)
    out: list[int | None] = [None] * n_req
    for r, c in zip(rows, cols):
        if cost[r, c] < 3.0:
            out[r] = int(c)
    return out


@dataclass
class ScoreV2:
    prompt: str
    found: list[bool]  # per requested object: a matched object with its shape and every named colour and marking
    relation_ok: bool | None  # None without a relation
    style_ok: dict[str, bool | None]  # per named style: shown (None: unreadable)
    mode: tuple  # per requested object, (colour, marking) detected where the prompt leaves them open (else None)
    extra_objects: int = 0
    matched: list[int | None] = field(default_factory=list)
    parsed: ParsedV2 | None = None

    @property
    def correct(self) -> bool:
        """Every object found, the relation (if any) held, every named style shown, nothing extra."""
        return (all(self.found) and self.relation_ok in (None, True) and all(v is True for v in self.style_ok.values())
                and self.extra_objects == 0)


def score_v2(image, prompt: str, parsed: ParsedV2 | None = None) -> ScoreV2:
    """Grade an image against a v2 prompt (``world.parse_prompt_v2``): named attributes are
    checked, open ones are reported in ``mode`` (the image's choice), unnamed styles are not
    graded (``parsed.calls`` has them)."""
    spec = _world.parse_prompt_v2(prompt)
    parsed = parsed if parsed is not None else parse_v2(image)
    matched = match_v2(spec, parsed)
    objs = [parsed.objects[j] if j is not None else None for j in matched]
    found = [o is not None and _match_cost_v2(w, o) < 0.5 for o, w in zip(objs, spec.objects)]
    relation_ok = None
    if spec.relation is not None:
        a, b = objs
        relation_ok = bool(all(found) and relation_holds(a.centre, b.centre, spec.relation))
    mode = tuple(
        (None if w.color is not None else (o.color if o is not None else None),
         None if w.marking is not None else (o.marking if o is not None else None))
        for o, w in zip(objs, spec.objects)
    )
    style_ok = {k: parsed.calls.get(k) for k, on in spec.styles.items() if on}
    extra = len(parsed.objects) - sum(j is not None for j in matched)
    return ScoreV2(prompt=prompt, found=found, relation_ok=relation_ok, style_ok=style_ok, mode=mode,
                   extra_objects=extra, matched=matched, parsed=parsed)
