"""Engine: processor-swap equivalence for every family, detach, taps, steps, branches, errors."""
from __future__ import annotations

import pytest
import torch

import diffattn as da
from diffattn.controls import Control, StepWindow, Tap
from diffattn.errors import ControlError, LayoutError, SelectorError, UnsupportedModelError
from diffattn.sites import denoisers
from diffattn.tiny import FAMILIES, output_of


class ZeroBlend(Control):
    """A control at zero strength: sets a head blend of zeros on every call (exercises the
    non-fast path end to end) and must leave outputs unchanged."""

    def edit_spec(self, call):
        if call.q.shape[2] == call.k.shape[2]:
            call.head_blend()


class Recorder(Control):
    """Records (site, step, branches, layout) of every call."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def edit_spec(self, call):
        self.calls.append((call.site.name, call.step.index, dict(call.branches), call.layout))


def _run(pipe, tiny_inputs, family, **kw):
    return output_of(pipe(**tiny_inputs(family, **kw)))


@pytest.mark.parametrize("family", FAMILIES)
def test_attached_engine_reproduces_stock_outputs_and_detach_restores(family, tiny_fresh, tiny_inputs):
    pipe = tiny_fresh(family)
    stock = _run(pipe, tiny_inputs, family)
    originals = {name: dict(model.attn_processors) for name, model in denoisers(pipe)}
    with da.attach(pipe):
        bare = _run(pipe, tiny_inputs, family)
    with da.attach(pipe, ZeroBlend()):
        zero = _run(pipe, tiny_inputs, family)
    after = _run(pipe, tiny_inputs, family)
    assert (bare - stock).abs().max() <= 1e-5
    assert (zero - stock).abs().max() <= 1e-5
    assert torch.equal(after, stock)
    for name, model in denoisers(pipe):
        restored = model.attn_processors
        assert all(restored[k] is v for k, v in originals[name].items())


def test_layouts_every_family_at_two_resolutions(tiny_pipe, tiny_inputs):
    expect = {
        # family: {kind: (query segment names, key segment names)}
        "sd15": {"self": (("image",), ("image",)), "cross": (("image",), ("text",))},
        "sd3": {"joint": (("image", "text"), ("image", "text"))},
        "flux": {"joint": (("text", "image"), ("text", "image")), "single": (("text", "image"), ("text", "image"))},
        "flux_kontext": {"joint": (("text", "image", "context"), ("text", "image", "context"))},
        "wan": {"self": (("video",), ("video",)), "cross": (("video",), ("text",))},
    }
    for family, kinds in expect.items():
        pipe = tiny_pipe(family)
        for size in (16, 32):
            rec = Recorder()
            with da.attach(pipe, rec):
                pipe(**tiny_inputs(family, size=size, steps=1))
            by_site = {name: layout for name, _, _, layout in rec.calls}
            for s in da.sites(pipe):
                if s.kind not in kinds or s.name not in by_site:
                    continue
                layout = by_site[s.name]
                assert layout.names == kinds[s.kind], (family, s.name)
                # segments tile the sequences with no gap
                for segs in (layout.query, layout.key):
                    assert segs[0].start == 0 and all(a.stop == b.start for a, b in zip(segs, segs[1:]))
                for seg in layout.query:
                    if seg.shape is not None:
                        n = 1
                        for d in seg.shape:
                            n *= d
                        assert n == len(seg), (family, s.name, seg)


def test_sd3_image_grid_follows_the_resolution(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    grids = []
    for size in (16, 32):
        rec = Recorder()
        with da.attach(pipe, rec):
            pipe(**tiny_inputs("sd3", size=size, steps=1))
        grids.append(rec.calls[0][3].q("image").shape)
    assert grids[1][0] == 2 * grids[0][0] and grids[1][1] == 2 * grids[0][1]


def test_steps_and_cfg_branches_are_tracked(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    rec = Recorder(sites="transformer_blocks.0.attn")
    with da.attach(pipe, rec):
        pipe(**tiny_inputs("sd3", steps=3, guidance_scale=5.0))
        pipe(**tiny_inputs("sd3", steps=2, guidance_scale=5.0))  # a new run restarts the count
    steps = [s for _, s, _, _ in rec.calls]
    assert steps == [0, 1, 2, 0, 1]
    assert rec.calls[0][2] == {"uncond": slice(0, 1), "cond": slice(1, 2)}
    rec2 = Recorder(sites="transformer_blocks.0.attn")
    with da.attach(pipe, rec2):
        pipe(**tiny_inputs("sd3", steps=1, guidance_scale=1.0))
    assert rec2.calls[0][2] == {"cond": slice(0, 1)}


def test_wan_two_call_cfg_branches(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("wan")
    rec = Recorder(sites="blocks.0.attn1")
    with da.attach(pipe, rec):
        pipe(**tiny_inputs("wan", steps=2, guidance_scale=5.0))
    names = [tuple(b) for _, _, b, _ in rec.calls]
    assert names == [("cond",), ("uncond",), ("cond",), ("uncond",)]
    assert [s for _, s, _, _ in rec.calls] == [0, 0, 1, 1]


def test_step_window_limits_a_control(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    rec = Recorder(sites="transformer_blocks.0.attn", steps=StepWindow(start=1, stop=2))
    with da.attach(pipe, rec):
        pipe(**tiny_inputs("sd3", steps=3))
    assert [s for _, s, _, _ in rec.calls] == [1]


class TapControl(Control):
    def __init__(self, query, key, **kw):
        super().__init__(**kw)
        self.query, self.key, self.got = query, key, []

    def edit_spec(self, call):
        call.taps.append(Tap(self.query, self.key, callback=lambda c, p: self.got.append((c.q, c.k, c.layout, p))))


@pytest.mark.parametrize("family,site,query,key", [
    ("sd15", "cross", "image", "text"),
    ("sd3", "transformer_blocks.0.attn", "image", "text"),
    ("flux", "single", "text", "image"),
])
def test_taps_equal_a_materialised_softmax(tiny_pipe, tiny_inputs, family, site, query, key):
    pipe = tiny_pipe(family)
    ctrl = TapControl(query, key, sites=site)
    with da.attach(pipe, ctrl):
        pipe(**tiny_inputs(family, steps=1))
    assert ctrl.got
    for q, k, layout, probs in ctrl.got:
        ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        ref = ref[:, :, layout.q(query).slice, layout.k(key).slice]
        torch.testing.assert_close(probs.double(), ref, atol=1e-5, rtol=1e-4)


def test_lse_equals_logsumexp_of_scores():
    q, k, v = torch.randn(3, 2, 3, 7, 16, dtype=torch.float64).unbind(0)
    _, lse = da.kernels.attention(q, k, v, return_lse=True) if hasattr(da, "kernels") else (None, None)
    from diffattn.kernels import attention

    _, lse = attention(q, k, v, return_lse=True)
    torch.testing.assert_close(lse.double(), torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, -1))


def test_tap_on_a_missing_segment_is_an_error(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd15")
    with da.attach(pipe, TapControl("image", "text", sites="self")):
        with pytest.raises(LayoutError, match="key segments are \\['image'\\]"):
            pipe(**tiny_inputs("sd15", steps=1))


def test_bad_input_errors(tiny_pipe):
    pipe = tiny_pipe("sd3")
    with pytest.raises(UnsupportedModelError):
        da.attach(torch.nn.Linear(2, 2))
    with pytest.raises(SelectorError, match="transformer_blocks"):
        da.attach(pipe, Recorder(sites="transformer_blocks.99"))
    ctrl = Recorder()
    with da.attach(pipe, ctrl):
        with pytest.raises(ControlError, match="already attached"):
            da.attach(pipe)
        with pytest.raises(ControlError, match="already attached"):
            da.attach(tiny_pipe("sd15"), ctrl)
    with pytest.raises(ControlError, match="twice"):
        da.attach(pipe, ctrl, ctrl)
    # a failed attach leaves nothing behind
    with da.attach(pipe):
        pass
