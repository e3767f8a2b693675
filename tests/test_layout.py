"""Token layouts: pure functions, and the segment ranges every family produces at two resolutions."""
from __future__ import annotations

import pytest

import diffattn as da
from diffattn.controls import Control
from diffattn.errors import LayoutError
from diffattn.layout import Segment, TokenLayout, flux_layout, grid_shape, sd3_layout, segments, unet_layout, wan_layout


def test_segments_lookups_and_errors():
    segs = segments(("text", 4, None), ("image", 6, (2, 3)), ("empty", 0, None), ("context", 6, (2, 3)))
    assert [(s.name, s.start, s.stop) for s in segs] == [("text", 0, 4), ("image", 4, 10), ("context", 10, 16)]
    layout = TokenLayout(query=list(segs), key=segs)
    assert layout.names == (("text", "image", "context"),) * 2
    assert layout.q("image") == Segment("image", 4, 10, (2, 3)) and len(layout.k("context")) == 6
    assert layout.slice("image") == slice(4, 10) and layout.n_query == layout.n_key == 16
    assert layout.segment("text", "key").slice == slice(0, 4)
    with pytest.raises(LayoutError, match=r"no key segment 'video'.*\['text', 'image', 'context'\]"):
        layout.k("video")
    with pytest.raises(LayoutError, match="no segment 'video'"):
        layout.slice("video")
    with pytest.raises(LayoutError, match="overlap"):
        TokenLayout((Segment("a", 0, 3), Segment("b", 2, 4)), ())


def test_cross_layout_and_extended_keys():
    layout = unet_layout(16, 77, cross=True, grid=(4, 4))
    assert layout.names == (("image",), ("text",))
    assert layout.slice("text") == slice(0, 77)  # a key-only segment
    ext = layout.with_key_segment("ref", 16, (4, 4))
    assert ext.names == (("image",), ("text", "ref")) and ext.k("ref").slice == slice(77, 93)
    with pytest.raises(LayoutError, match="already"):
        ext.with_key_segment("text", 3)


@pytest.mark.parametrize("n,h,w,expect", [
    (64, 8, 8, (8, 8)), (16, 8, 8, (4, 4)), (4, 8, 8, (2, 2)),
    (32, 8, 16, (4, 8)), (8, 8, 16, (2, 4)),
    (25, 9, 9, (5, 5)), (9, 9, 9, (3, 3)),  # odd latents: stride-2 convs round up
    (15, 6, 10, (3, 5)),
])
def test_grid_shape(n, h, w, expect):
    assert grid_shape(n, h, w) == expect


def test_grid_shape_rejects_impossible_counts():
    with pytest.raises(LayoutError):
        grid_shape(7, 8, 8)


def test_family_layout_functions():
    assert sd3_layout(16, 93, grid=(4, 4)).names == (("image", "text"),) * 2
    assert sd3_layout(16, 0, grid=(4, 4)).names == (("image",),) * 2  # SD3.5 attn2
    assert sd3_layout(16, 93, grid=(3, 3)).q("image").shape is None  # a grid that does not fit is dropped
    k = flux_layout(16, 48, n_context=16, image_grid=(4, 4), context_grid=(4, 4))
    assert [(s.name, s.start, s.stop) for s in k.query] == [("text", 0, 16), ("image", 16, 32), ("context", 32, 48)]
    with pytest.raises(LayoutError):
        flux_layout(40, 48, n_context=16)
    assert wan_layout(8, grid=(2, 2, 2)).names == (("video",), ("video",))
    assert wan_layout(8, 17, grid=(2, 2, 2), key="image").names == (("video",), ("image",))


class Recorder(Control):
    def __init__(self):
        super().__init__()
        self.layouts = {}

    def edit_spec(self, call):
        self.layouts.setdefault((call.site.name, call.part), call.layout)


def _ranges(layout):
    return ([(s.name, s.start, s.stop, s.shape) for s in layout.query], [(s.name, s.start, s.stop, s.shape) for s in layout.key])


def _expected(family, size):
    """Expected (query, key) segments per (site kind, part), from the tiny configs:
    VAE factor 2 (Wan: 8 spatial, 4 temporal), SD3 patch 2, FLUX 2x2 packing, Wan patch 1x2x2;
    CLIP 77 tokens, T5 16 (Wan I2V 512), 5 video frames."""
    lat = size // 2
    if family in ("sd15", "sdxl"):
        first = lat if family == "sd15" else lat // 2  # SDXL: no attention at the finest level
        n, g = first * first, (first, first)
        img = [("image", 0, n, g)]
        return {("self", "main"): (img, img), ("cross", "main"): (img, [("text", 0, 77, None)])}
    if family in ("sd3", "sd35"):
        side = lat // 2
        n = side * side
        segs = [("image", 0, n, (side, side)), ("text", n, n + 77 + 16, None)]
        out = {("joint", "main"): (segs, segs)}
        if family == "sd35":
            out[("self", "main")] = (segs[:1], segs[:1])
        return out
    if family in ("flux", "flux_kontext"):
        side = lat // 2
        n = side * side
        segs = [("text", 0, 16, None), ("image", 16, 16 + n, (side, side))]
        if family == "flux_kontext":
            segs.append(("context", 16 + n, 16 + 2 * n, (side, side)))
        return {("joint", "main"): (segs, segs), ("single", "main"): (segs, segs)}
    side = size // 16
    grid = (2, side, side)  # (5 - 1) / 4 + 1 latent frames
    video = [("video", 0, 2 * side * side, grid)]
    out = {("self", "main"): (video, video), ("cross", "main"): (video, [("text", 0, 16 if family == "wan" else 512, None)])}
    if family == "wan_i2v":
        out[("cross", "image")] = (video, [("image", 0, 17, None)])  # CLIP: 16 patches + class token
    return out


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sd35", "flux", "flux_kontext", "wan", "wan_i2v"])
def test_segment_ranges_every_family_at_two_resolutions(family, tiny_pipe, tiny_inputs):
    pipe = tiny_pipe(family)
    kinds = {s.name: s.kind for s in da.sites(pipe)}
    for size in (16, 32):
        rec = Recorder()
        with da.attach(pipe, rec):
            pipe(**tiny_inputs(family, size=size, steps=1))
        expect = _expected(family, size)
        first_level = {}
        for (name, part), layout in rec.layouts.items():
            key = (kinds[name], part)
            assert key in expect, (family, name, part)
            q, k = _ranges(layout)
            if family in ("sd15", "sdxl"):  # deeper UNet levels: half the side each
                first_level.setdefault(key, []).append(q[0][3])
                side = q[0][3][0]
                assert q == [("image", 0, side * side, (side, side))]
                assert k == (q if key[0] == "self" else [("text", 0, 77, None)])
            else:
                assert (q, k) == expect[key], (family, name, part, size)
        if family in ("sd15", "sdxl"):
            for key, shapes in first_level.items():
                assert max(shapes) == expect[key][0][0][3], (family, key, size)
        assert {(kinds[n], p) for n, p in rec.layouts} == set(expect)


def test_non_square_resolution_keeps_the_aspect(tiny_pipe, tiny_inputs):
    for family, want in (("sd3", (4, 8)), ("sd15", (8, 16)), ("flux", (4, 8))):
        pipe = tiny_pipe(family)
        rec = Recorder()
        with da.attach(pipe, rec):
            pipe(**tiny_inputs(family, steps=1, height=16, width=32))
        shapes = [layout.q("image").shape for layout in rec.layouts.values()]
        assert want in shapes, (family, shapes)
        assert all(s is not None and s[1] == 2 * s[0] for s in shapes), (family, shapes)
