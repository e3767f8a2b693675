"""Processors: every family reproduces the stock diffusers processors, with and without controls,
and detach restores the original processor objects."""
from __future__ import annotations

import pytest
import torch

import diffattn as da
from diffattn.controls import Control
from diffattn.processors import PROCESSORS, DiffattnProcessor
from diffattn.sites import denoisers
from diffattn.tiny import FAMILIES, output_of, tiny_pipeline


class Noop(Control):
    """Active everywhere, edits nothing: the controlled path (AttentionCall, kernel) end to end."""


class ZeroBlend(Control):
    """A control at zero strength: a head blend of zeros on every self/joint call."""

    def edit_spec(self, call):
        if call.q.shape[2] == call.k.shape[2]:
            call.head_blend()


def _run(pipe, tiny_inputs, family, **kw):
    return output_of(pipe(**tiny_inputs(family, **kw)))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_equals_stock_and_detach_restores(family, tiny_fresh, tiny_inputs):
    pipe = tiny_fresh(family)
    stock = _run(pipe, tiny_inputs, family)
    originals = {name: dict(model.attn_processors) for name, model in denoisers(pipe)}
    with da.attach(pipe) as handle:
        procs = [p for _, m in denoisers(pipe) for p in m.attn_processors.values()
                 if isinstance(p, DiffattnProcessor)]  # HunyuanVideo's token refiner has no site: stays stock
        assert procs and all(isinstance(p, PROCESSORS[p.site.family]) for p in procs)
        assert len({id(p) for p in procs}) == len(procs)  # one instance per site
        bare = _run(pipe, tiny_inputs, family)
    assert not handle.attached
    with da.attach(pipe, Noop()):
        noop = _run(pipe, tiny_inputs, family)
    with da.attach(pipe, ZeroBlend()):
        zero = _run(pipe, tiny_inputs, family)
    after = _run(pipe, tiny_inputs, family)
    assert torch.equal(bare, stock)  # fast path: the stock code, bit for bit
    assert (noop - stock).abs().max() <= 1e-5
    assert (zero - stock).abs().max() <= 1e-5
    assert torch.equal(after, stock)
    for name, model in denoisers(pipe):
        restored = model.attn_processors
        assert restored.keys() == originals[name].keys()
        assert all(restored[k] is v for k, v in originals[name].items())
        assert not any(isinstance(p, DiffattnProcessor) for p in restored.values())


def test_sd35_shared_stock_processor_is_restored_shared(tiny_fresh):
    pipe = tiny_fresh("sd35")
    before = pipe.transformer.attn_processors
    assert before["transformer_blocks.0.attn.processor"] is before["transformer_blocks.0.attn2.processor"]
    with da.attach(pipe, Noop()):
        during = pipe.transformer.attn_processors
        assert during["transformer_blocks.0.attn.processor"] is not during["transformer_blocks.0.attn2.processor"]
    after = pipe.transformer.attn_processors
    assert after["transformer_blocks.0.attn.processor"] is before["transformer_blocks.0.attn.processor"]
    assert after["transformer_blocks.0.attn2.processor"] is before["transformer_blocks.0.attn2.processor"]


def _unet_inputs(unet, batch=2, n_text=5):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(batch, n_text, unet.config.cross_attention_dim, generator=g)
    return sample, text


def test_unet_encoder_attention_mask_is_honoured(tiny_pipe):
    unet = tiny_pipe("sd15").unet
    sample, text = _unet_inputs(unet)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # [B, N_text]: row 0 ignores its last 2 tokens
    with torch.no_grad():
        stock = unet(sample, 10, text, encoder_attention_mask=mask).sample
        unmasked = unet(sample, 10, text).sample
        with da.attach(unet, Noop()):
            ours = unet(sample, 10, text, encoder_attention_mask=mask).sample
    assert (stock[0] - unmasked[0]).abs().max() > 1e-4  # the mask matters...
    assert (ours - stock).abs().max() <= 1e-5  # ...and the controlled path applies it as stock


def _flux_inputs(model, batch=1, n_text=6, h=4, w=4):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, h * w, model.config.in_channels, generator=g)
    text = torch.randn(batch, n_text, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, model.config.pooled_projection_dim, generator=g)
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1] = torch.arange(h).repeat_interleave(w)
    img_ids[:, 2] = torch.arange(w).repeat(h)
    txt_ids = torch.zeros(n_text, 3)
    return dict(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=torch.full((batch,), 0.5), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


@pytest.mark.parametrize("mask_kind", ["bool4d", "2d"])
def test_flux_attention_mask_kwarg_is_honoured(tiny_pipe, mask_kind):
    model = tiny_pipe("flux").transformer
    kw = _flux_inputs(model)
    n = 6 + 16
    keep = torch.ones(1, n, dtype=torch.bool)
    keep[:, 3:6] = False  # hide three text tokens
    mask = keep[:, None, None, :].expand(1, 1, n, n) if mask_kind == "bool4d" else keep
    with torch.no_grad():
        stock = model(**kw, joint_attention_kwargs={"attention_mask": mask})[0]
        unmasked = model(**kw)[0]
        with da.attach(model, Noop()):
            ours = model(**kw, joint_attention_kwargs={"attention_mask": mask})[0]
    assert (stock - unmasked).abs().max() > 1e-4
    assert (ours - stock).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_fused_projections_are_mirrored(family):
    pipe = tiny_pipeline(family)
    model = pipe.transformer
    model.fuse_qkv_projections()
    assert any(getattr(m, "fused_projections", False) for m in model.modules())
    with torch.no_grad():
        if family == "flux":
            kw = _flux_inputs(model)
        else:
            g = torch.Generator().manual_seed(0)
            kw = dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                      encoder_hidden_states=torch.randn(1, 7, 32, generator=g), return_dict=False)
        stock = model(**kw)[0]
        with da.attach(model):
            fast = model(**kw)[0]
        with da.attach(model, Noop()):
            ours = model(**kw)[0]
    assert torch.equal(fast, stock)
    assert (ours - stock).abs().max() <= 1e-5


def test_processors_carry_the_attention_backend_and_stock_class_attributes(tiny_fresh, tiny_inputs):
    pipe = tiny_fresh("flux")
    for proc in pipe.transformer.attn_processors.values():
        proc._attention_backend = "native"  # as ModelMixin.set_attention_backend does
    with da.attach(pipe):
        procs = list(pipe.transformer.attn_processors.values())
        assert all(p._attention_backend == "native" and p._parallel_config is None for p in procs)
        out = _run(pipe, tiny_inputs, "flux")
    assert torch.isfinite(out).all()
    assert DiffattnProcessor._attention_backend is None and DiffattnProcessor._parallel_config is None


def test_processors_diffattn_does_not_mirror_are_refused(tiny_fresh):
    from diffusers.models.attention_processor import AttnProcessor2_0

    class MyIPAdapterLike(AttnProcessor2_0):
        pass

    pipe = tiny_fresh("sd15")
    procs = pipe.unet.attn_processors
    key = next(k for k in procs if k.endswith("attn2.processor"))
    custom = MyIPAdapterLike()
    pipe.unet.set_attn_processor({**procs, key: custom})
    with pytest.raises(da.UnsupportedModelError, match="MyIPAdapterLike"):
        da.attach(pipe)
    assert pipe.unet.attn_processors[key] is custom  # nothing was swapped
