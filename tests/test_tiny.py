"""Tiny offline pipelines (diffattn.tiny): build with no network, run, deterministic, fp32 eval."""
from __future__ import annotations

import socket

import pytest
import torch

from diffattn import tiny

# expected output tensor shape for tiny_call_kwargs(family) (size 16; Wan: 5 frames)
SHAPES = {
    "sd15": (1, 3, 16, 16),
    "sdxl": (1, 3, 16, 16),
    "sd3": (1, 3, 16, 16),
    "sd35": (1, 3, 16, 16),
    "flux": (1, 3, 16, 16),
    "flux_kontext": (1, 3, 16, 16),
    "wan": (1, 5, 3, 16, 16),
    "wan_i2v": (1, 5, 3, 16, 16),
    "hunyuan_video": (1, 5, 3, 16, 16),
}
PIPELINE_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd35": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "flux_kontext": "FluxKontextPipeline",
    "wan": "WanPipeline",
    "wan_i2v": "WanImageToVideoPipeline",
    "hunyuan_video": "HunyuanVideoPipeline",
}


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def test_families_listed():
    assert set(tiny.FAMILIES) == set(SHAPES)


def test_builds_with_network_blocked(monkeypatch):
    """Every builder works offline: any socket connection attempt fails the test."""
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest sets it before any hub import

    def refuse(*args, **kwargs):
        raise AssertionError("tiny pipelines must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for family in tiny.FAMILIES:
        pipe = tiny.tiny_pipeline(family)
        assert type(pipe).__name__ == PIPELINE_CLASSES[family]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_runs_and_is_deterministic(family, tiny_pipe, tiny_inputs):
    pipe = tiny_pipe(family)
    out = tiny.output_of(pipe(**tiny_inputs(family)))
    assert tuple(out.shape) == SHAPES[family]
    assert torch.isfinite(out).all()
    again = tiny.output_of(pipe(**tiny_inputs(family)))
    assert torch.equal(out, again)  # same seed -> same output
    other = tiny.output_of(pipe(**tiny_inputs(family, seed=1)))
    assert not torch.equal(out, other)  # the seed matters


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_fp32_eval(family, tiny_pipe):
    pipe = tiny_pipe(family)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            assert not component.training, name
            assert all(p.dtype == torch.float32 for p in component.parameters()), name


@pytest.mark.parametrize("family", ["sd15", "sd35", "flux", "wan"])
def test_same_seed_same_weights(family):
    a, b, c = (denoiser(tiny.tiny_pipeline(family, seed=s)) for s in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_dispatch_names():
    assert type(tiny.tiny_pipeline("flux-kontext")).__name__ == "FluxKontextPipeline"
    with pytest.raises(ValueError, match="sd15"):
        tiny.tiny_pipeline("sd4")


def test_architecture_is_large_enough_to_matter(tiny_pipe):
    """Structure the site/head selection tests rely on."""
    unet = tiny_pipe("sd15").unet
    assert [t for t in unet.config.down_block_types].count("CrossAttnDownBlock2D") == 2
    assert unet.mid_block.attentions is not None and len(unet.mid_block.attentions) == 1
    flux = tiny_pipe("flux").transformer
    assert len(flux.transformer_blocks) == 2 and len(flux.single_transformer_blocks) == 2
    sd35 = tiny_pipe("sd35").transformer
    assert sd35.config.qk_norm == "rms_norm"
    assert sd35.transformer_blocks[0].attn2 is not None and sd35.transformer_blocks[-1].attn2 is None
    for family in ("sd3", "flux", "wan"):
        model = denoiser(tiny_pipe(family))
        assert model.config.num_attention_heads >= 2
    wan = tiny.tiny_pipeline("wan", two_experts=True)
    assert wan.transformer_2 is not None and wan.config.boundary_ratio == 0.875


def test_wan_i2v_cross_attention_sees_image_tokens(tiny_pipe, tiny_inputs):
    """attn2 of the I2V transformer gets [image tokens || 512 text tokens] and has add_k/v."""
    pipe = tiny_pipe("wan_i2v")
    attn2 = pipe.transformer.blocks[0].attn2
    assert attn2.add_k_proj is not None and attn2.add_v_proj is not None
    lengths = []

    def record(module, args, kwargs):
        context = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        lengths.append(context.shape[1])

    hook = attn2.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(**tiny_inputs("wan_i2v", steps=1))
    finally:
        hook.remove()
    n_image = (32 // 8) ** 2 + 1  # CLIP vision tokens: patches + class token
    assert lengths and set(lengths) == {512 + n_image}


@pytest.mark.parametrize(
    "family, kw, size, expected",
    [
        ("sd3", dict(num_layers=3, heads=4, head_dim=16), 64, 256),  # (64 / 2 / 2)^2
        ("flux", dict(num_layers=3, num_single_layers=1, heads=4, head_dim=32), 64, 256),  # 2x2 packing
        ("sd15", dict(heads=4), 64, 1024),  # first level: (64 / 2)^2
    ],
)
def test_bigger_variants(family, kw, size, expected, tiny_inputs):
    """Keyword arguments grow the attention; token counts follow the documented formulas."""
    pipe = tiny.tiny_pipeline(family, **kw)
    model = denoiser(pipe)
    first = next(m for n, m in model.named_modules() if n.endswith(("attn", "attn1")))
    assert first.heads == kw["heads"]
    seen = []
    hook = first.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        pipe(**tiny_inputs(family, size=size, steps=1, guidance_scale=1.0))
    finally:
        hook.remove()
    assert seen[0] == expected


def test_flux_kontext_image_stream_holds_context_tokens(tiny_pipe, tiny_inputs):
    """Kontext's double blocks see [target || context image] tokens: twice FLUX's count."""
    seen = {}
    for family in ("flux", "flux_kontext"):
        attn = tiny_pipe(family).transformer.transformer_blocks[0].attn

        def record(module, args, kwargs, family=family):
            seen.setdefault(family, (args[0] if args else kwargs["hidden_states"]).shape[1])

        hook = attn.register_forward_pre_hook(record, with_kwargs=True)
        try:
            tiny_pipe(family)(**tiny_inputs(family, steps=1))
        finally:
            hook.remove()
    assert seen == {"flux": 16, "flux_kontext": 32}  # 16 px -> 8x8 latents -> 4x4 packed tokens
