"""Token layout: the named segments of an attention call's queries and keys.

FLUX puts text first, SD3 puts image first, Kontext appends a context image, Wan's I2V
cross attention carries image tokens beside the text. A :class:`TokenLayout` records which
rows and keys are which, with their spatial shapes, derived at call time from tensor shapes
and the model config (never hard-coded lengths), so no method has to know a model's token
order.

Segment names used by the processors:

========  =====================================  ====================================
family    query segments                         key segments
========  =====================================  ====================================
UNet      ``image (h, w)``                       self: ``image``; cross: ``text``
SD3       ``image (h, w), text``                 same (joint); SD3.5 ``attn2``: ``image``
FLUX      ``text, image (h, w)``                 same (double and single blocks)
Kontext   ``text, image (h, w), context (h, w)`` same
Wan       ``video (t, h, w)``                    self: ``video``; cross: ``text``;
                                                 I2V image branch: ``image``
Hunyuan   ``video (t, h, w), text``              same (joint and single blocks; text last)
========  =====================================  ====================================

The family functions (``unet_layout``, ``sd3_layout``, ``flux_layout``, ``wan_layout``,
``hunyuan_video_layout``, each in
its family's file under :mod:`diffattn.families` and importable from here) are pure: token
counts and grids in, a layout out.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import LayoutError


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, stop)`` of a sequence. ``shape`` is ``(h, w)`` for an image, ``(t, h, w)``
    for a video (row-major token order, as every supported model flattens them), ``None`` for text."""

    name: str
    start: int
    stop: int
    shape: tuple[int, ...] | None = None

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


def _as_segments(segs: Iterable[Segment]) -> tuple[Segment, ...]:
    segs = tuple(segs)
    for a, b in zip(segs, segs[1:]):
        if b.start < a.stop:
            raise LayoutError(f"segments {a.name!r} and {b.name!r} overlap: {a} and {b}")
    return segs


@dataclass(frozen=True)
class TokenLayout:
    """Segments of the query and key sequences of one attention call.

    ``layout.q("image")`` / ``layout.k("text")`` return a :class:`Segment` (or raise
    :class:`~diffattn.errors.LayoutError` listing the segments that exist);
    ``layout.slice("text")`` is the slice of a segment (query side first, then key side);
    ``layout.names`` is ``(query names, key names)``.
    """

    query: tuple[Segment, ...]
    key: tuple[Segment, ...]

    def __post_init__(self):
        object.__setattr__(self, "query", _as_segments(self.query))
        object.__setattr__(self, "key", _as_segments(self.key))

    # ------------------------------------------------------------------ lookups
    def _find(self, segments, name: str, side: str) -> Segment:
        for seg in segments:
            if seg.name == name:
                return seg
        raise LayoutError(
            f"this attention call has no {side} segment {name!r}; its {side} segments are "
            f"{[s.name for s in segments]} (query {list(self.names[0])}, key {list(self.names[1])})"
        )

    def q(self, name: str) -> Segment:
        """The query segment ``name``."""
        return self._find(self.query, name, "query")

    def k(self, name: str) -> Segment:
        """The key segment ``name``."""
        return self._find(self.key, name, "key")

    def segment(self, name: str, side: str = "query") -> Segment:
        """The segment ``name`` of ``side`` (``"query"`` or ``"key"``)."""
        if side not in ("query", "key"):
            raise LayoutError(f"side must be 'query' or 'key', got {side!r}")
        return self._find(self.query if side == "query" else self.key, name, side)

    def slice(self, name: str) -> slice:
        """Slice of segment ``name``: its query range if the queries have it, else its key range."""
        for seg in self.query + self.key:
            if seg.name == name:
                return seg.slice
        raise LayoutError(
            f"this attention call has no segment {name!r}; query segments {list(self.names[0])}, "
            f"key segments {list(self.names[1])}"
        )

    def has_q(self, name: str) -> bool:
        return any(s.name == name for s in self.query)

    def has_k(self, name: str) -> bool:
        return any(s.name == name for s in self.key)

    @property
    def names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(query segment names, key segment names)``."""
        return tuple(s.name for s in self.query), tuple(s.name for s in self.key)

    @property
    def n_query(self) -> int:
        return self.query[-1].stop if self.query else 0

    @property
    def n_key(self) -> int:
        return self.key[-1].stop if self.key else 0

    def with_key_segment(self, name: str, length: int, shape: tuple[int, ...] | None = None) -> "TokenLayout":
        """This layout with ``length`` more keys named ``name`` appended (extended attention)."""
        if self.has_k(name):
            raise LayoutError(f"the keys already have a segment {name!r}; pick another name")
        start = self.n_key
        return TokenLayout(self.query, self.key + (Segment(name, start, start + length, shape),))


def segments(*parts: tuple[str, int, tuple[int, ...] | None]) -> tuple[Segment, ...]:
    """Consecutive segments from ``(name, length, shape)`` parts, skipping empty ones."""
    out, start = [], 0
    for name, length, shape in parts:
        if length > 0:
            out.append(Segment(name, start, start + length, shape))
        start += length
    return tuple(out)


def grid_shape(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """``(h, w)`` of an ``n_tokens`` grid with the aspect ratio of a ``height × width`` latent.

    UNet levels and patchified transformers see the latent downsampled by an integer factor
    f (with ceil rounding at odd sizes): ``n = ceil(H/f)·ceil(W/f)``; try f = round(sqrt(HW/n))
    and its neighbours.
    """
    if n_tokens <= 0:
        raise LayoutError(f"an image segment needs tokens, got {n_tokens}")
    guess = max(1, round(math.sqrt(height * width / n_tokens)))
    candidates = dict.fromkeys([guess, 2 ** round(math.log2(guess)), max(1, guess - 1), guess + 1])
    for f in candidates:
        for rnd in (lambda x: -(-x // f), lambda x: x // f):  # ceil (conv stride 2), floor
            h, w = rnd(height), rnd(width)
            if h * w == n_tokens:
                return h, w
    raise LayoutError(f"{n_tokens} tokens do not tile a {height}x{width} latent at any integer factor")


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _check_grid(n: int, shape) -> tuple[int, ...] | None:
    """``shape`` when it holds exactly ``n`` tokens; ``None`` (shape unknown) otherwise."""
    return tuple(shape) if shape is not None and _numel(shape) == n else None


# ----------------------------------------------------------------------------- families

# Each family's layout function lives in its family's file (diffattn.families.<family>);
# these names stay importable from here.
_FAMILY_LAYOUTS = {"unet_layout": "unet", "sd3_layout": "sd3", "flux_layout": "flux", "wan_layout": "wan",
                   "hunyuan_video_layout": "hunyuan_video"}


def __getattr__(name: str):
    if name in _FAMILY_LAYOUTS:
        import importlib

        return getattr(importlib.import_module(f"diffattn.families.{_FAMILY_LAYOUTS[name]}"), name)
    raise AttributeError(f"module 'diffattn.layout' has no attribute {name!r}")
