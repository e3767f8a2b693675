"""HunyuanVideo (diffattn.families.hunyuan_video): sites, the processor against the stock one,
the ``[video ‖ text]`` layout, RoPE relocation, a control end to end on a tiny
``HunyuanVideoPipeline``, and Rectified SpaAttn on its joint and single blocks (including a
batch of two prompts of different text lengths: each row equals its prompt run alone)."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

import diffattn as da
from diffattn.controls import Control
from diffattn.errors import ControlError
from diffattn.families import family_of, get_family
from diffattn.families.hunyuan_video import HunyuanVideoProcessor, HunyuanVideoRope, hunyuan_video_layout
from diffattn.methods.spaattn import live_keys
from diffattn.processors import DiffattnProcessor
from diffattn.tiny import output_of

FAMILY = "hunyuan_video"
SITES = [("transformer_blocks.0.attn", "joint", 0), ("transformer_blocks.1.attn", "joint", 1),
         ("single_transformer_blocks.0.attn", "single", 0), ("single_transformer_blocks.1.attn", "single", 1)]


class Noop(Control):
    """Active everywhere, edits nothing: the controlled path (AttentionCall, kernel) end to end."""


class ZeroBlend(Control):
    """A control at zero strength: a head blend of zeros on every call."""

    def edit_spec(self, call):
        call.head_blend()


class Recorder(Control):
    """Records each call's layout and taps video queries × text keys."""

    def __init__(self):
        super().__init__()
        self.layouts, self.probs = {}, []

    def edit_spec(self, call):
        self.layouts[call.site.name] = call.layout
        call.tap("video", "text", store=self.probs)


@pytest.fixture(scope="module")
def pipe():
    from diffattn.tiny import tiny_pipeline

    return tiny_pipeline(FAMILY)


def _run(pipe, tiny_inputs, **kw):
    return output_of(pipe(**tiny_inputs(FAMILY, **kw)))


def _forward_inputs(model, batch=1, valid=(7,), n_text=12, frames=2, side=8):
    """A direct transformer forward: ``frames × side × side`` video tokens (patch 1), ``n_text``
    text tokens of which the first ``valid[b]`` are real (right padding, as the pipeline)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, n_text)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    return dict(hidden_states=torch.randn(batch, model.config.in_channels, frames, side, side, generator=g),
                timestep=torch.full((batch,), 500.0),
                encoder_hidden_states=torch.randn(batch, n_text, model.config.text_embed_dim, generator=g),
                encoder_attention_mask=mask,
                pooled_projections=torch.randn(batch, model.config.pooled_projection_dim, generator=g),
                guidance=torch.full((batch,), 6000.0), return_dict=False)


# ----------------------------------------------------------------------------- sites


def test_sites_kinds_blocks_and_the_refiner_left_out(pipe):
    found = da.sites(pipe)
    assert [(s.name, s.kind, s.block) for s in found] == SITES
    assert {s.family for s in found} == {FAMILY}
    assert {s.heads for s in found} == {2} and {s.head_dim for s in found} == {16}
    model = pipe.transformer
    refiner = [k.removesuffix(".processor") for k in model.attn_processors if k.startswith("context_embedder.")]
    assert refiner  # the token refiner's text-only attention exists, is owned, and gets no site
    assert all(family_of(model, model.get_submodule(n)) is get_family(FAMILY) for n in refiner)
    assert [s.name for s in da.select(pipe, "single")] == [n for n, k, _ in SITES if k == "single"]


# ----------------------------------------------------------------------------- the processor


def test_processor_equals_stock_and_detach_restores(pipe, tiny_inputs):
    stock = _run(pipe, tiny_inputs)
    originals = dict(pipe.transformer.attn_processors)
    with da.attach(pipe):
        procs = pipe.transformer.attn_processors
        swapped = {k: p for k, p in procs.items() if isinstance(p, DiffattnProcessor)}
        assert sorted(k.removesuffix(".processor") for k in swapped) == sorted(n for n, _, _ in SITES)
        assert all(isinstance(p, HunyuanVideoProcessor) for p in swapped.values())
        assert all(procs[k] is originals[k] for k in procs if k not in swapped)  # the refiner runs stock
        bare = _run(pipe, tiny_inputs)
    with da.attach(pipe, Noop()):
        noop = _run(pipe, tiny_inputs)
    with da.attach(pipe, ZeroBlend()):
        zero = _run(pipe, tiny_inputs)
    with da.attach(pipe, da.SoftPAG(heads="all", strength=0.0, scale=3.0)):
        pag0 = _run(pipe, tiny_inputs)
    after = _run(pipe, tiny_inputs)
    assert torch.equal(bare, stock)  # fast path: the stock code, bit for bit
    for out in (noop, zero, pag0):
        assert (out - stock).abs().max() <= 1e-6
    assert torch.equal(after, stock)
    restored = pipe.transformer.attn_processors
    assert restored.keys() == originals.keys() and all(restored[k] is v for k, v in originals.items())


def test_padded_text_mask_is_honoured_on_the_controlled_path(pipe):
    model = pipe.transformer
    kw = _forward_inputs(model, batch=2, valid=(5, 12))
    full = dict(kw, encoder_attention_mask=torch.ones_like(kw["encoder_attention_mask"]))
    with torch.no_grad():
        stock = model(**kw)[0]
        unmasked = model(**full)[0]
        with da.attach(model, Noop()):
            ours = model(**kw)[0]
    assert (stock[0] - unmasked[0]).abs().max() > 1e-4  # the padding mask matters for row 0...
    assert (stock[1] - unmasked[1]).abs().max() <= 1e-6  # ...not for the row without padding
    assert (ours - stock).abs().max() <= 1e-6  # and the controlled path applies it as stock


# ----------------------------------------------------------------------------- layout and RoPE


def test_layout_is_video_then_text_with_the_grid(pipe, tiny_inputs):
    rec = Recorder()
    with da.attach(pipe, rec):
        _run(pipe, tiny_inputs, steps=1)
    assert set(rec.layouts) == {n for n, _, _ in SITES}
    for layout in rec.layouts.values():  # 5 frames -> 2 latent frames; 16 px -> 2 x 2 latent; 16 text
        assert layout.query == layout.key and layout.names == (("video", "text"), ("video", "text"))
        video, text = layout.q("video"), layout.q("text")
        assert (video.start, video.stop, video.shape) == (0, 8, (2, 2, 2))
        assert (text.start, text.stop, text.shape) == (8, 24, None)
    n_valid = int(pipe.tokenizer("a red circle", return_tensors="pt").attention_mask.sum())
    assert 0 < n_valid < 16
    for p in rec.probs:  # [B, H, 8 video, 16 text]: the padded text keys get no probability
        assert p.shape == (1, 2, 8, 16)
        assert float(p[..., n_valid:].abs().max()) == 0.0 and float(p[..., :n_valid].min()) > 0.0
    layout = hunyuan_video_layout(12, 5, grid=(1, 3, 4))
    assert [(s.name, s.start, s.stop, s.shape) for s in layout.query] == [("video", 0, 12, (1, 3, 4)),
                                                                          ("text", 12, 17, None)]
    assert hunyuan_video_layout(12, 5, grid=(2, 3, 4)).q("video").shape is None  # a grid that does not fit


def test_rope_relocate_turns_keys_to_new_positions(pipe):
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed

    cfg = pipe.transformer.config
    rope = HunyuanVideoRotaryPosEmbed(cfg.patch_size, cfg.patch_size_t, cfg.rope_axes_dim, cfg.rope_theta)
    cos, sin = rope(torch.zeros(1, 4, 2, 3, 3))  # [18, 16] each: 2 x 3 x 3 video tokens
    r = HunyuanVideoRope(cos, sin)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 18, 16, generator=g, dtype=torch.float64)  # [H, N, D] unrotated keys
    source = torch.randperm(18, generator=g)
    rotated_at_source = apply_rotary_emb(raw[None], (cos[source], sin[source]), sequence_dim=2)[0]
    expected = apply_rotary_emb(raw[None], (cos, sin), sequence_dim=2)[0]
    got = r.relocate(rotated_at_source, slice(0, 18), source)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    text = torch.randn(2, 4, 16, generator=g, dtype=torch.float64)  # text after the video: not rotated
    torch.testing.assert_close(r.relocate(text, slice(18, 22), torch.tensor([2, 0, 3, 1])), text, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- a real control end to end


def test_softpag_pipeline_end_to_end(pipe, tiny_inputs):
    stock = _run(pipe, tiny_inputs)
    with da.attach(pipe, da.SoftPAG(heads="all", strength=1.0, scale=3.0)) as handle:
        out = _run(pipe, tiny_inputs)
        assert len(handle.engine.sites) == 4
    assert out.shape == (1, 5, 3, 16, 16) and bool(torch.isfinite(out).all())
    assert (out - stock).abs().max() > 1e-4
    assert torch.equal(_run(pipe, tiny_inputs), stock)


# ----------------------------------------------------------------------------- Rectified SpaAttn


def test_live_keys():
    m = torch.tensor([[True] * 5 + [False] * 3, [True] * 6 + [False] * 2]).view(2, 1, 1, 8)
    assert live_keys(m, 8) == (6, False)  # row 0 still hides key 5
    assert live_keys(m[:1], 8) == (5, True)
    assert live_keys(torch.ones(1, 1, 1, 8, dtype=torch.bool), 8) == (8, True)
    bias = torch.zeros(1, 1, 1, 8).masked_fill(~m[:1], float("-inf"))
    assert live_keys(bias, 8) == (5, True) and live_keys(bias + 0.5, 8) == (5, False)
    assert live_keys(torch.zeros(1, 1, 1, 8, dtype=torch.bool), 8) == (8, False)


@pytest.mark.parametrize("valid", [(7,), (5, 12)], ids=["cut-padding", "per-row-mask"])
def test_sparse_every_block_equals_dense_and_drop_runs(pipe, valid):
    model = pipe.transformer
    kw = _forward_inputs(model, batch=len(valid), valid=valid)  # 2 x 8 x 8 = 128 video tokens: 8 blocks of 16
    with torch.no_grad():
        dense = model(**kw)[0]
        ctrl = da.RectifiedSparseAttention(drop=0.0, block_size=16, neighbours=False)
        with da.attach(model, ctrl):
            assert ctrl.settings("transformer_blocks.0.attn") == dict(layer=0, drop=0.0, dense=False, first_frame=False)
            every = model(**kw)[0]
        torch.testing.assert_close(every, dense, rtol=0, atol=1e-5)
        outs = {}
        for mode in ("rectified", "vanilla", "random"):
            with da.attach(model, da.RectifiedSparseAttention(drop=0.5, mode=mode, block_size=16, neighbours=False)):
                outs[mode] = model(**kw)[0]
            assert bool(torch.isfinite(outs[mode]).all()) and (outs[mode] - dense).abs().max() > 1e-5
        assert not torch.equal(outs["rectified"], outs["vanilla"])
        assert torch.equal(model(**kw)[0], dense)  # detach restores exactly


@pytest.mark.parametrize("mode", ["rectified", "vanilla"])
def test_sparse_rows_with_different_text_lengths_equal_each_row_alone(pipe, mode):
    """A batch of two prompts of different lengths keeps a per-row key mask after the shared
    padding is cut: each row's plan pools its own live keys, so row b equals row b run alone."""
    model = pipe.transformer
    kw = _forward_inputs(model, batch=2, valid=(5, 9))  # keys 9..12 cut for both rows; 5..9 masked for row 0
    with torch.no_grad():
        dense = model(**kw)[0]
        with da.attach(model, da.RectifiedSparseAttention(drop=0.5, mode=mode, block_size=16, neighbours=False)):
            both = model(**kw)[0]
            alone = [model(**{k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in kw.items()})[0]
                     for i in range(2)]
    for i in range(2):
        assert (both[i] - dense[i]).abs().max() > 1e-3  # sparse: far from dense...
        torch.testing.assert_close(both[i:i + 1], alone[i], rtol=0, atol=1e-5)  # ...and row-independent


class FloatBias(Control):
    """A soft (float) bias on every key: what the pooled statistics cannot honour."""

    order = 10

    def edit_spec(self, call):
        call.spec.add_bias(torch.full((1, 1, 1, call.k.shape[2]), 0.25))


def test_rectified_refuses_a_float_bias_vanilla_takes_it(pipe):
    model = pipe.transformer
    kw = _forward_inputs(model, batch=2, valid=(5, 9))
    with torch.no_grad():
        with da.attach(model, FloatBias(), da.RectifiedSparseAttention(drop=0.5, block_size=16, neighbours=False)):
            with pytest.raises(ControlError, match="float bias"):
                model(**kw)
        with da.attach(model, FloatBias()):
            biased = model(**kw)[0]  # a constant bias on every key changes no softmax
        with da.attach(model, FloatBias(), da.RectifiedSparseAttention(drop=0.0, mode="vanilla", block_size=16)):
            torch.testing.assert_close(model(**kw)[0], biased, rtol=0, atol=1e-5)  # every block: the biased call
        with da.attach(model, FloatBias(), da.RectifiedSparseAttention(drop=0.5, mode="vanilla", block_size=16,
                                                                       neighbours=False)):
            sparse = model(**kw)[0]  # the masked reference runs the bias inside the selected blocks
        assert bool(torch.isfinite(sparse).all()) and (sparse - biased).abs().max() > 1e-3


def test_sparse_pipeline_batch_of_two_prompt_lengths_equals_each_prompt_alone(pipe, tiny_inputs):
    """End to end on the tiny HunyuanVideoPipeline, rectified mode: two prompts of different token
    lengths in one batch (a per-row text mask in every joint and single block) give, row by row,
    the latents of each prompt run alone from the same generator seed."""
    prompts, seeds = ["a cat", "a red circle"], [0, 1]
    lengths = [int(pipe.tokenizer(p, return_tensors="pt").attention_mask.sum()) for p in prompts]
    assert lengths[0] != lengths[1] and max(lengths) < 16  # both padded, to different lengths

    def run(prompt, seed, sparse=True):
        gen = ([torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list)
               else torch.Generator().manual_seed(seed))
        kw = tiny_inputs(FAMILY, size=64, prompt=prompt, generator=gen, output_type="latent")
        if not sparse:
            return output_of(pipe(**kw))
        with da.attach(pipe, da.RectifiedSparseAttention(drop=0.5, block_size=16, neighbours=False)):
            return output_of(pipe(**kw))

    both = run(prompts, seeds)
    dense = run(prompts, seeds, sparse=False)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        assert (both[i] - dense[i]).abs().max() > 1e-3  # the sparse attention changes the result
        torch.testing.assert_close(both[i:i + 1], run(prompt, seed), rtol=0, atol=1e-5)


def test_sparse_defaults_on_the_pipeline(pipe, tiny_inputs):
    base = _run(pipe, tiny_inputs, size=64)  # 2 x 8 x 8 video tokens + 16 text tokens
    ctrl = da.RectifiedSparseAttention(block_size=16)
    with da.attach(pipe, ctrl):
        assert [ctrl.settings(n) for n, _, _ in SITES] == [dict(layer=i, drop=0.8, dense=False, first_frame=False)
                                                           for i in range(4)]  # no warm-up: every block sparse
        out = _run(pipe, tiny_inputs, size=64)
    assert bool(torch.isfinite(out).all()) and not torch.equal(out, base)
