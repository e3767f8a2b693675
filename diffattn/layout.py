"""Token layout: the named segments of an attention call's queries and keys.

FLUX puts text first, SD3 puts image first, Kontext appends a context image, Wan's I2V
cross attention carries image tokens beside the text. A ``TokenLayout`` records which
rows and keys are which, with spatial shapes, derived from tensor shapes at call time,
so no method has to know a model's token order or hard-code a length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import LayoutError


@dataclass(frozen=True)
class Segment:
    """Tokens [start, stop) of a sequence; ``shape`` is (h, w) or (t, h, w) for image/video."""

    name: str
    start: int
    stop: int
    shape: tuple[int, ...] | None = None

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TokenLayout:
    """Segments of the query and key sequences of one attention call."""

    query: tuple[Segment, ...]
    key: tuple[Segment, ...]

    def _find(self, segments, name: str, side: str) -> Segment:
        for seg in segments:
            if seg.name == name:
                return seg
        raise LayoutError(
            f"this attention call has no {side} segment {name!r}; its {side} segments are "
            f"{[s.name for s in segments]}"
        )

    def q(self, name: str) -> Segment:
        return self._find(self.query, name, "query")

    def k(self, name: str) -> Segment:
        return self._find(self.key, name, "key")

    def has_q(self, name: str) -> bool:
        return any(s.name == name for s in self.query)

    def has_k(self, name: str) -> bool:
        return any(s.name == name for s in self.key)

    @property
    def names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(s.name for s in self.query), tuple(s.name for s in self.key)


def segments(*parts: tuple[str, int, tuple[int, ...] | None]) -> tuple[Segment, ...]:
    """Consecutive segments from (name, length, shape) parts, skipping empty ones."""
    out, start = [], 0
    for name, length, shape in parts:
        if length > 0:
            out.append(Segment(name, start, start + length, shape))
        start += length
    return tuple(out)


def grid_shape(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of an n-token grid with the aspect ratio of a height x width latent.

    UNet levels and patchified transformers see the latent downsampled by an integer
    factor f: n = (H/f)(W/f), so f = sqrt(H W / n).
    """
    f = math.sqrt(height * width / n_tokens)
    h, w = round(height / f), round(width / f)
    if h * w != n_tokens:
        raise LayoutError(f"{n_tokens} tokens do not tile a {height}x{width} latent at any integer factor")
    return h, w
