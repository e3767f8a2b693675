"""Engine-level gradient checkpointing (``diffattn.engine.gradient_checkpointing``): a block
recomputed in the backward sees its forward's ForwardContext again, so gradients through an
attached control keyed on that context equal the gradients without checkpointing."""
from __future__ import annotations

import pytest
import torch

import diffattn as da
from diffattn.controls import Control
from diffattn.engine import checkpoint_function, gradient_checkpointing
from diffattn.errors import UnsupportedModelError
from diffattn.families import RunState
from diffattn.tiny import tiny_sd3_transformer_and_inputs

STEP = 2  # the pinned step index the control reads


class StepScaledOutput(Control):
    """Scales every attention output by 4^(step index): what it computes depends on the
    per-forward context (``call.step`` comes from ``call.context``; outside a forward it is the
    default step 0), as any step-windowed or step-keyed control does. Counts its calls."""

    def __init__(self):
        super().__init__(sites="all")
        self.calls = 0
        self.without_context = 0

    def edit_output(self, call, out):
        self.calls += 1
        self.without_context += call.context is None
        return out * 4.0 ** call.step.index


def _grads(model, inputs, mode: str):
    """(loss, ∂loss/∂hidden_states, ∂loss/∂encoder_hidden_states, the control) of one forward with
    a StepScaledOutput attached at step STEP: ``mode`` "off" (no checkpointing), "engine" (the
    engine's checkpointing) or "plain" (diffusers' default checkpoint function, which knows no
    diffattn context)."""
    control = StepScaledOutput()
    x = inputs["hidden_states"].clone().requires_grad_(True)  # [2, 4, 8, 8]
    text = inputs["encoder_hidden_states"].clone().requires_grad_(True)  # [2, 6, 32]
    with da.attach(model, control, run=RunState(step=STEP)) as h:
        if mode == "plain":
            model.enable_gradient_checkpointing()
        try:
            with h.gradient_checkpointing(enabled=mode == "engine"):
                out = model(hidden_states=x, encoder_hidden_states=text, timestep=inputs["timestep"],
                            pooled_projections=inputs["pooled_projections"], return_dict=False)[0]  # [2, 4, 8, 8]
                loss = out.square().mean()
                gx, gt = torch.autograd.grad(loss, [x, text])
        finally:
            if mode == "plain":
                model.disable_gradient_checkpointing()
    return loss.detach(), gx, gt, control


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_transformer_and_inputs()


def test_engine_checkpointing_gives_the_gradients_of_no_checkpointing(sd3):
    model, inputs = sd3
    loss, gx, gt, ref = _grads(model, inputs, "off")
    loss_ck, gx_ck, gt_ck, ck = _grads(model, inputs, "engine")
    assert ck.calls == 2 * ref.calls > 0  # every attention call ran again in the backward...
    assert ck.without_context == 0  # ...inside its forward's context
    assert torch.equal(loss, loss_ck)
    assert (gx_ck - gx).abs().max() <= 1e-6 and (gt_ck - gt).abs().max() <= 1e-6
    assert gx.abs().max() > 0 and gt.abs().max() > 0
    # diffusers' own checkpoint function recomputes without the context: step 0, other gradients
    _, gx_plain, _, plain = _grads(model, inputs, "plain")
    assert plain.without_context == ref.calls
    assert (gx_plain - gx).norm() > 1e-3 * gx.norm()  # 2% here: the recomputed activations differ


def test_checkpointing_state_is_restored_and_bad_targets_are_typed(sd3):
    model, inputs = sd3
    fn = checkpoint_function(None)
    model.enable_gradient_checkpointing(fn)  # a caller's own setting survives the block
    try:
        with gradient_checkpointing(model):
            assert model.is_gradient_checkpointing and model._gradient_checkpointing_func is not fn
        assert model.is_gradient_checkpointing and model._gradient_checkpointing_func is fn
    finally:
        model.disable_gradient_checkpointing()
    with gradient_checkpointing(model, enabled=False):
        assert not model.is_gradient_checkpointing
    assert not model.is_gradient_checkpointing
    with pytest.raises(UnsupportedModelError):
        with gradient_checkpointing(torch.nn.Linear(2, 2)):
            pass
