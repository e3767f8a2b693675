"""torch.compile: attached controls trace into the denoiser's graph (issue 5's GPU cost path).

The engine reads the step on the host in one ``torch.compiler.disable``d call per forward;
everything else (processors, controls, the guidance batch) must trace without graph breaks,
give the eager result, and compile nothing new on a second pipeline run (no recompile per
step: a step window costs one graph per window state, not one per step). The ``eager``
backend checks tracing without paying for code generation.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import diffattn as da
from diffattn.tiny import output_of, tiny_call_kwargs, tiny_pipeline
from diffattn.tiny import tiny_sd3_transformer_and_inputs

HOST_BREAK = "torch.compiler.disable"  # the engine's per-forward bookkeeping (_EngineHook.enter)


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _run(pipe, family, control):
    kw = tiny_call_kwargs(family, steps=4, **({"guidance_scale": 5.0} if family in ("sd15", "sd3") else {}))
    with da.attach(pipe, control):
        return output_of(pipe(**kw))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux", "wan"])
def test_softpag_compiles_without_breaks_or_per_step_recompiles(family, fresh_dynamo):
    pipe = tiny_pipeline(family)
    soft = da.SoftPAG("all", strength=0.5, scale=2.0, steps=(0.0, 0.5))
    eager = _run(pipe, family, soft)
    _denoiser(pipe).compile(backend="eager")
    first = _run(pipe, family, soft)
    graphs = counters["stats"]["unique_graphs"]
    second = _run(pipe, family, soft)
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, eager, rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs, "the second run recompiled"
    reasons = [r for r in counters["graph_break"] if HOST_BREAK not in r]
    assert not reasons, f"graph breaks besides the engine's host bookkeeping: {reasons}"


def test_regional_compilation_fullgraph(fresh_dynamo):
    """diffusers' regional compilation (``compile_repeated_blocks``) with ``fullgraph=True``:
    the engine's host work stays outside the blocks, so each block traces whole."""
    pipe = tiny_pipeline("flux")
    soft = da.SoftPAG("all", strength=0.5, scale=2.0)
    eager = _run(pipe, "flux", soft)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    torch.testing.assert_close(_run(pipe, "flux", soft), eager, rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] > 0  # the blocks did run compiled


def test_uncompiled_step_window_still_follows_steps():
    """The host-side window flag matches StepWindow.contains outside compilation too."""
    pipe = tiny_pipeline("sd3")
    seen = []

    class Spy(da.Control):
        def edit_output(self, call, out):
            seen.append(call.step.index)
            return out

    with da.attach(pipe, Spy(steps=(1, 3))):
        pipe(**tiny_call_kwargs("sd3", steps=4, guidance_scale=1.0))
    assert sorted(set(seen)) == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_softpag_under_cuda_graphs(fresh_dynamo):
    """``mode="reduce-overhead"`` (CUDA graphs, what the GPU cost target is measured with)
    gives the eager result with SoftPAG attached."""
    pipe = tiny_pipeline("sd3").to("cuda")
    soft = da.SoftPAG("all", strength=0.5, scale=2.0)
    kw = dict(steps=4, guidance_scale=5.0)

    def run():
        with da.attach(pipe, soft):
            return output_of(pipe(**tiny_call_kwargs("sd3", **kw)))

    eager = run()
    pipe.transformer.compile(mode="reduce-overhead")
    torch.testing.assert_close(run(), eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(), eager, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the kernel seam


class BlendAndTap(da.Control):
    """Sets a per-head blend and taps image queries × text keys (so the kernel returns the lse)."""

    def __init__(self, u):
        super().__init__("all")
        self.u = u
        self.maps = []

    def edit_spec(self, call):
        call.spec.head_blend = self.u
        call.tap("image", "text")

    def on_taps(self, call, probs):
        self.maps.append(probs[0])


def test_processor_with_blend_and_lse_tap_compiles_fullgraph_on_the_reference(fresh_dynamo):
    """``fullgraph=True`` over the SD3 blocks (processor, control, kernel spec, kernel, taps) on
    CPU's default backend, the torch reference: plain torch, traced whole. The same over the
    Triton custom ops (interpreter) is ``test_triton_processor_compiles_fullgraph_through_custom_ops``
    in tests/test_kernels.py."""
    model, inputs = tiny_sd3_transformer_and_inputs()
    ctrl = BlendAndTap(torch.tensor([0.25, 0.75]))
    with torch.no_grad(), da.attach(model, ctrl):
        eager = model(**inputs).sample
        eager_maps, ctrl.maps = ctrl.maps, []
        for block in model.transformer_blocks:
            block.compile(fullgraph=True, backend="eager")
        compiled = model(**inputs).sample
    assert counters["stats"]["unique_graphs"] >= 2  # the blocks did run compiled
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    assert len(ctrl.maps) == len(eager_maps) == 2 and ctrl.maps[0].shape == (2, 2, 16, 6)
    for got, want in zip(ctrl.maps, eager_maps):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
