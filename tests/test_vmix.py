"""VMix (diffattn.methods.vmix): value-mixed cross-attention adapters.

The zero-initialised adapter and λ = 0 reproduce the base bit for bit (UNet, SD3); taps are the
base map with VMix on; the mixed output matches a float64 reference written from the formula
x̂ = softmax(QKᵀ/√d)(V_c + λV_a) (MMDiT: image rows mixed, text rows untouched); files round-trip
and bad input is a typed error; a resumed training run equals an uninterrupted one.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import diffattn as da
from diffattn.errors import ConfigError, ControlError, MethodError, ModelLoadError, PathError
from diffattn.methods.vmix import VMixAdapter, ValueMix, load_adapter, read_config
from diffattn.methods.vmix.mix import joint_rows, merged_rows, mix_values
from diffattn.tiny import output_of

LABELS = {"shadow": "with shadows", "outline": "with outlines", "light": "in soft light"}


def _adapter(pipe, seed=0, trained=True):
    """An adapter for ``pipe``; ``trained``: Z and F randomised as after training (f_a ≠ 0)."""
    adapter = VMixAdapter.build(pipe, LABELS, seed=seed)
    if trained:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return adapter


def _run(pipe, inputs, family, *controls):
    if not controls:
        return output_of(pipe(**inputs(family)))
    with da.attach(pipe, *controls):
        return output_of(pipe(**inputs(family)))


class TapStore(da.Control):
    """Stores the image × text probabilities of every call of its sites, and each call's inputs
    as it received them (order -1: before ValueMix edits the values)."""

    order = -1

    def __init__(self, sites):
        super().__init__(sites=sites)
        self.store, self.calls = [], []

    def edit_qkv(self, call):
        self.calls.append((call.site, call.layout, call.q, call.k, call.v, dict(call.branches)))

    def edit_spec(self, call):
        call.tap("image", "text", store=self.store)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_zero_adapter_and_zero_lambda_are_the_base_bit_for_bit(tiny_pipe, tiny_inputs, family):
    pipe = tiny_pipe(family)
    base = _run(pipe, tiny_inputs, family)
    fresh = VMixAdapter.build(pipe, LABELS)  # Z = 0: f_a = 0, V_a = 0
    assert torch.equal(_run(pipe, tiny_inputs, family, ValueMix(fresh, ["shadow"], scale=1.5, uncond="both")), base)
    trained = _adapter(pipe)
    assert torch.equal(_run(pipe, tiny_inputs, family, ValueMix(trained, scale=0.0)), base)
    assert torch.equal(_run(pipe, tiny_inputs, family, ValueMix(trained, scale=lambda site, step: 0.0)), base)
    moved = _run(pipe, tiny_inputs, family, ValueMix(trained, ["shadow"], scale=1.5))
    assert not torch.allclose(moved, base, atol=1e-4)  # a trained adapter does change the image


@pytest.mark.parametrize("family,kind", [("sd15", "cross"), ("sd3", "joint")])
def test_taps_identical_with_vmix_on_and_off(tiny_pipe, tiny_inputs, family, kind):
    """Every call's map with VMix on equals the map of the same call's q, k, v with VMix off,
    bit for bit (and the very first call, whose inputs VMix cannot have changed yet, equals
    the VMix-off pipeline's)."""
    from diffattn.controls import AttentionCall
    from diffattn.processors.base import run_controls

    pipe = tiny_pipe(family)
    adapter = _adapter(pipe)
    off, on = TapStore(kind), TapStore(kind)
    out_off = _run(pipe, tiny_inputs, family, off)
    out_on = _run(pipe, tiny_inputs, family, ValueMix(adapter, ["shadow", "light"], scale=2.0, uncond="null"), on)
    assert not torch.allclose(out_on, out_off, atol=1e-4)
    assert len(on.store) == len(off.store) == len(on.calls) > 0
    assert torch.equal(on.store[0], off.store[0])
    for probs, (site, layout, q, k, v, branches) in zip(on.store, on.calls):
        again = TapStore(kind)
        run_controls(AttentionCall(site, layout, q, k, v, branches=branches), [again])
        assert torch.equal(probs, again.store[0])


def test_uncond_policy_positive_leaves_uncond_rows_alone(tiny_pipe):
    pipe = tiny_pipe("sd15")
    adapter = _adapter(pipe)
    site = next(s for s in da.sites(pipe) if s.kind == "cross")
    control = ValueMix(adapter, ["shadow"], scale=1.0)
    from diffattn.controls import AttentionCall

    q = torch.randn(4, site.heads, 6, site.head_dim)
    call = AttentionCall(site, None, q, q, q, branches={"uncond": slice(0, 2), "cond": slice(2, 4)})
    mask, weight = control.row_inputs(call)
    assert weight.tolist() == [0.0, 0.0, 1.0, 1.0] and mask[2:].tolist() == [[True, False, False]] * 2
    control.uncond = "null"
    mask, weight = control.row_inputs(call)
    assert weight.tolist() == [1.0] * 4 and not mask[:2].any() and mask[2:, 0].all()


# ----------------------------------------------------------------------------- float64 references


def _reference(q, k, v, va, lam, text: slice, image_rows: slice | None):
    """softmax(QKᵀ/√d)(V + λ[V_a on the first C text keys]) in float64, built from the formula;
    with ``image_rows`` only those query rows see the mixed values (the MMDiT port)."""
    q, k, v, va, lam = (x.double() for x in (q, k, v, va, lam))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, H, Nq, Nk]
    pad = torch.zeros_like(v)
    pad[:, :, text.start:text.start + va.shape[2]] = va
    mixed = probs @ (v + lam.view(-1, 1, 1, 1) * pad)
    if image_rows is None:
        return mixed
    out = probs @ v
    out[:, :, image_rows] = mixed[:, :, image_rows]
    return out


def test_mix_values_matches_the_formula_in_float64():
    from diffattn.kernels import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    va = torch.randn(3, 2, 4, 8, generator=g, dtype=torch.float64)
    lam = torch.tensor([0.0, 1.0, 1.7], dtype=torch.float64)
    text = slice(0, 5)
    out = attention(q, k, mix_values(v, va, lam, text))
    torch.testing.assert_close(out, _reference(q, k, v, va, lam, text, None), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[0], attention(q, k, v)[0])  # λ = 0 row: the stock output


@pytest.mark.parametrize("joint", ["split", "merge"])
def test_mmdit_split_mixes_image_rows_only(tiny_pipe, joint):
    from diffattn.controls import AttentionCall
    from diffattn.families.sd3 import sd3_layout
    from diffattn.kernels import attention
    from diffattn.processors.base import run_controls

    pipe = tiny_pipe("sd3")
    adapter = _adapter(pipe).double()
    site = next(s for s in da.sites(pipe) if s.kind == "joint")
    control = ValueMix(adapter, ["shadow", "outline"], scale=1.3, joint=joint)
    control._names = frozenset([site.name])
    n_img, n_txt = 16, adapter.config.text_length + 3  # 3 more text tokens than f_a covers (T5's)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, site.heads, n_img + n_txt, site.head_dim, generator=g, dtype=torch.float64)
               for _ in range(3))
    call = AttentionCall(site, sd3_layout(n_img, n_txt, grid=(4, 4)), q, k, v,
                         branches={"uncond": slice(0, 1), "cond": slice(1, 2)})
    out = run_controls(call, [control])
    f_a = adapter(control.row_inputs(call)[0])
    va = adapter.site_values(site.name, f_a, site.heads)  # [B, H, C, D]
    lam = torch.tensor([0.0, 1.3], dtype=torch.float64)  # uncond="positive": the uncond row is stock
    text = slice(n_img, n_img + n_txt)
    want = _reference(q, k, v, va, lam, text, slice(0, n_img))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    stock = attention(q, k, v)
    if joint == "split":  # text rows and the uncond row: the stock call's output, bit for bit
        assert torch.equal(out[:, :, n_img:], stock[:, :, n_img:]) and torch.equal(out[0], stock[0])
    assert not torch.allclose(out[1, :, :n_img], stock[1, :, :n_img])


def test_joint_and_merged_rows_are_exact_where_nothing_mixes():
    out = torch.randn(2, 2, 5, 4)
    other = torch.randn(2, 2, 5, 4)
    rows, queries = torch.tensor([False, True]), torch.tensor([True, True, True, False, False])
    got = joint_rows(out, other, rows, queries)
    assert torch.equal(got[0], out[0]) and torch.equal(got[1, :, 3:], out[1, :, 3:])
    assert torch.equal(got[1, :, :3], other[1, :, :3])
    merged = merged_rows(out, torch.rand(2, 2, 5, 3), torch.randn(1, 2, 3, 4), torch.tensor([0.0, 1.0]), queries)
    assert torch.equal(merged[0], out[0]) and torch.equal(merged[1, :, 3:], out[1, :, 3:])


# ----------------------------------------------------------------------------- files and errors


def test_save_load_round_trip_exactly(tiny_pipe, tiny_inputs, tmp_path):
    pipe = tiny_pipe("sd3")
    adapter = _adapter(pipe)
    path = str(tmp_path / "vmix.safetensors")
    adapter.save(path)
    loaded = load_adapter(path, pipe)
    assert loaded.config == adapter.config == read_config(path)
    a, b = adapter.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    out_a = _run(pipe, tiny_inputs, "sd3", ValueMix(adapter, ["light"], scale=1.2))
    assert torch.equal(_run(pipe, tiny_inputs, "sd3", ValueMix(loaded, "light", scale=1.2)), out_a)


def test_bad_files_are_typed_errors(tiny_pipe, tmp_path):
    from safetensors.torch import save_file

    pipe = tiny_pipe("sd3")
    adapter = VMixAdapter.build(pipe, LABELS)
    good = str(tmp_path / "good.safetensors")
    adapter.save(good)
    with pytest.raises(PathError):
        load_adapter(str(tmp_path / "missing.safetensors"))
    pickled = str(tmp_path / "adapter.pt")
    torch.save(adapter.state_dict(), pickled)
    with pytest.raises(ModelLoadError, match="pickle"):
        load_adapter(pickled)
    data = open(good, "rb").read()
    for name, blob in (("truncated", data[: len(data) // 2]), ("garbage", b"\x07" * 200)):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(ModelLoadError):
            load_adapter(str(bad))
    tensors = {k: v.contiguous() for k, v in adapter.state_dict().items()}
    meta = {"diffattn.vmix": adapter.config.to_json()}
    wrong = dict(tensors, **{"token_proj.weight": torch.zeros(3, 3)})
    save_file(wrong, str(tmp_path / "shape.safetensors"), metadata=meta)
    nan = dict(tensors, **{"zero.bias": torch.full_like(tensors["zero.bias"], float("nan"))})
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=meta)
    save_file(tensors, str(tmp_path / "nometa.safetensors"))
    save_file(tensors, str(tmp_path / "badjson.safetensors"), metadata={"diffattn.vmix": "{not json"})
    for name in ("shape", "nan", "nometa", "badjson"):
        with pytest.raises(ModelLoadError):
            load_adapter(str(tmp_path / f"{name}.safetensors"))


def test_another_model_other_sites_labels_and_lambdas_are_typed_errors(tiny_pipe, tmp_path):
    sd3, unet = tiny_pipe("sd3"), tiny_pipe("sd15")
    adapter = VMixAdapter.build(sd3, LABELS, sites="transformer_blocks.0")
    path = str(tmp_path / "sd3.safetensors")
    adapter.save(path)
    with pytest.raises(ModelLoadError, match="built for a SD3Transformer2DModel"):
        load_adapter(path, unet)
    before = {k: type(v).__name__ for k, v in unet.unet.attn_processors.items()}
    with pytest.raises(ControlError, match="built for"):
        da.attach(unet, ValueMix(adapter))
    assert {k: type(v).__name__ for k, v in unet.unet.attn_processors.items()} == before  # nothing half-attached
    with pytest.raises(ControlError, match="not sites of this VMix adapter"):
        da.attach(sd3, ValueMix(adapter, sites="transformer_blocks.1"))
    other = VMixAdapter(adapter.config.__class__(**{**adapter.config.__dict__, "sites": ["transformer_blocks.9.attn"]}))
    with pytest.raises(ControlError, match="no site"):
        da.attach(sd3, ValueMix(other))
    with pytest.raises(ControlError, match="unknown aesthetic"):
        ValueMix(adapter, ["shadow", "sparkle"])
    for bad in (-0.5, float("nan"), float("inf"), "1.0", True):
        with pytest.raises(ControlError):
            ValueMix(adapter, scale=bad)
    with pytest.raises(ControlError):
        ValueMix(adapter, scale={"transformer_blocks.0": -1.0})
    with pytest.raises(ControlError, match="uncond"):
        ValueMix(adapter, uncond="none")
    with pytest.raises(ControlError):
        ValueMix(adapter.state_dict())
    late = ValueMix(adapter, scale=lambda site, step: float("nan"))  # a callable λ is checked at every call
    with pytest.raises(ControlError, match="finite"):
        with da.attach(sd3, late):
            sd3(prompt="a red circle", num_inference_steps=1, height=16, width=16, max_sequence_length=16,
                output_type="pt")


def test_lambda_per_site_and_step(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    adapter = _adapter(pipe)
    base = _run(pipe, tiny_inputs, "sd3")
    seen = []

    def lam(site, step):
        seen.append((site, step.index))
        return 1.0 if step.index == 0 and site.endswith("0.attn") else 0.0

    one = _run(pipe, tiny_inputs, "sd3", ValueMix(adapter, scale=lam))
    mapped = _run(pipe, tiny_inputs, "sd3", ValueMix(adapter, scale={"transformer_blocks.0": lambda s: float(s.index == 0)}))
    assert torch.equal(one, mapped) and not torch.equal(one, base)
    assert {i for _, i in seen} == {0, 1}


def test_registry_builds_vmix(tiny_pipe, tiny_inputs, tmp_path):
    from diffattn.methods.registry import get_method

    pipe = tiny_pipe("sd15")
    path = str(tmp_path / "a.safetensors")
    _adapter(pipe).save(path)
    run = get_method("vmix").build(pipe, adapter=path, aesthetics="shadow,outline", lam=1.5)
    assert isinstance(run.control, ValueMix) and run.control.aesthetic_names == ["shadow", "outline"]
    kw = tiny_inputs("sd15")
    prompt = kw.pop("prompt")
    assert len(run(prompt, **kw).images) == 1
    with pytest.raises(MethodError, match="adapter"):
        get_method("vmix").build(pipe, lam=1.0)


# ----------------------------------------------------------------------------- training


def _data(n_labels, size=16, batch=2):
    from diffattn.methods.vmix.train import VMixBatch

    def data(step):
        g = torch.Generator().manual_seed(1000 + step)
        images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # [B, 3, H, W] in [-1, 1]
        labels = torch.rand(batch, n_labels, generator=g) < 0.5
        return VMixBatch(images, ["a red circle", "a blue square"][:batch], labels)

    return data


@pytest.mark.parametrize("family,lora", [("sd3", 2), ("sd15", 0)])
def test_resumed_training_equals_an_uninterrupted_run(tiny_fresh, tmp_path, family, lora):
    pytest.importorskip("peft") if lora else None
    from diffattn.methods.vmix.train import TrainConfig, train_vmix

    def run(out, stop_at=None, steps=3):
        pipe = tiny_fresh(family)  # a fresh model per run, as a new process would load
        adapter = VMixAdapter.build(pipe, LABELS, seed=0)
        config = TrainConfig(steps=steps, batch=2, lr=1e-2, warmup=1, seed=0, save_every=10, lora_rank=lora)
        stats = train_vmix(pipe, adapter, _data(len(LABELS)), config, str(out), progress=False, stop_at=stop_at)
        return adapter, stats

    whole, stats = run(tmp_path / "a")
    assert stats["step"] == 3 and math.isfinite(stats["loss"])
    assert os.path.exists(tmp_path / "a" / "adapter.safetensors")
    assert (os.path.exists(tmp_path / "a" / "lora.safetensors")) == bool(lora)
    run(tmp_path / "b", stop_at=2)
    assert not os.path.exists(tmp_path / "b" / "adapter.safetensors")  # not finished: checkpoint only
    resumed, _ = run(tmp_path / "b")
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(whole.zero.weight, torch.zeros_like(whole.zero.weight))  # it trained
    if lora:
        from safetensors.torch import load_file

        la, lb = load_file(str(tmp_path / "a" / "lora.safetensors")), load_file(str(tmp_path / "b" / "lora.safetensors"))
        assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_lora_only_trains_lora_and_leaves_the_adapter_out(tiny_fresh, tmp_path):
    """The paper's "w/o value-mixed attention" ablation: LoRA alone, no label input."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from diffattn.methods.vmix.train import TrainConfig, apply_lora, train_vmix

    with pytest.raises(ConfigError, match="lora_rank"):
        TrainConfig(value_mix=False).check()
    pipe = tiny_fresh("sd3")
    adapter = VMixAdapter.build(pipe, LABELS, seed=0)
    config = TrainConfig(steps=2, batch=2, lr=1e-2, warmup=1, seed=0, save_every=10, lora_rank=2, value_mix=False)
    train_vmix(pipe, adapter, _data(len(LABELS)), config, str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "adapter.safetensors")
    assert torch.equal(adapter.zero.weight, torch.zeros_like(adapter.zero.weight))  # the adapter never trained
    lora = load_file(str(tmp_path / "lora.safetensors"))
    assert any(k.endswith("lora_B.vmix.weight") and v.abs().sum() > 0 for k, v in lora.items())  # B left its zero init
    fresh = tiny_fresh("sd3")
    apply_lora(fresh.transformer, str(tmp_path / "lora.safetensors"))
    trained = dict(pipe.transformer.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh.transformer.named_parameters() if "lora_" in n)


def test_shipped_tiny_sd3_adapter_loads_and_is_exact_at_zero():
    """assets/vmix/tiny-sd3.safetensors: loads on the shipped testbed model (its fingerprint
    matches), λ = 0 gives the base image bit for bit, and asking for shadows changes it."""
    from pathlib import Path

    from diffattn import testbed

    path = Path(__file__).resolve().parents[1] / "assets" / "vmix" / "tiny-sd3.safetensors"
    pipe = testbed.load("tiny-sd3")
    adapter = load_adapter(str(path), pipe)
    assert adapter.labels == ["dark", "outline", "shadow", "light", "centred"]

    def image(control=None):
        kw = dict(num_inference_steps=4, generator=torch.Generator().manual_seed(1_000_000), output_type="np")
        if control is None:
            return pipe("a red circle", **kw).images
        with da.attach(pipe, control):
            return pipe("a red circle", **kw).images

    base = image()
    assert (image(ValueMix(adapter, aesthetics=["shadow"], scale=0.0)) == base).all()
    assert not (image(ValueMix(adapter, aesthetics=["shadow"], scale=2.0)) == base).all()
