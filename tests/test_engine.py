"""Engine: step and branch tracking, control order and selection, taps, spec (bias, uniform
keys, extended keys), block hooks, errors."""
from __future__ import annotations

import pytest
import torch
from diffusers.hooks import ModelHook

import diffattn as da
from diffattn.controls import AttentionCall, Control, StepState, StepWindow, UniformKeys
from diffattn.errors import ControlError, LayoutError, SelectorError, UnsupportedModelError
from diffattn.kernels import attention
from diffattn.layout import TokenLayout, segments
from diffattn.processors import DiffattnProcessor, run_controls, uniform_keys_attention
from diffattn.sites import Site, denoisers
from diffattn.tiny import output_of


class Recorder(Control):
    """Records (site, part, step, branches, layout) of every call it is active on."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def edit_spec(self, call):
        self.calls.append((call.site.name, call.part, call.step, dict(call.branches), call.layout))


def _steps(rec):
    return [c[2].index for c in rec.calls]


# ----------------------------------------------------------------------------- steps


def test_steps_count_per_run_with_a_flow_scheduler(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    rec = Recorder(sites="transformer_blocks.0.attn")
    with da.attach(pipe, rec):
        pipe(**tiny_inputs("sd3", steps=3, guidance_scale=5.0))
        pipe(**tiny_inputs("sd3", steps=2, guidance_scale=5.0))  # a new run restarts the count
    assert _steps(rec) == [0, 1, 2, 0, 1]
    states = [c[2] for c in rec.calls]
    assert [s.num_steps for s in states] == [3, 3, 3, 2, 2]
    sigmas = [s.sigma for s in states[:3]]
    assert sigmas[0] == pytest.approx(1.0) and sigmas[0] > sigmas[1] > sigmas[2] > 0
    assert states[0].timestep > states[1].timestep > states[2].timestep


def test_steps_count_per_run_with_ddim_and_sigma_from_alphas(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd15")
    rec = Recorder(sites="mid_block.attentions.0.transformer_blocks.0.attn1")
    with da.attach(pipe, rec):
        pipe(**tiny_inputs("sd15", steps=3))
        pipe(**tiny_inputs("sd15", steps=2))  # DDIM has no step_index: the timestep rise restarts
    assert _steps(rec) == [0, 1, 2, 0, 1]
    s = rec.calls[0][2]
    a = float(pipe.scheduler.alphas_cumprod[int(s.timestep)])
    assert s.sigma == pytest.approx(((1 - a) / a) ** 0.5)


def test_wan_step_index_from_cache_context_and_two_call_branches(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("wan")
    rec = Recorder(sites="blocks.0.attn1")
    with da.attach(pipe, rec):
        pipe(**tiny_inputs("wan", steps=2, guidance_scale=5.0))
    assert [tuple(c[3]) for c in rec.calls] == [("cond",), ("uncond",), ("cond",), ("uncond",)]
    assert [c[3][tuple(c[3])[0]] for c in rec.calls] == [slice(0, 1)] * 4
    assert _steps(rec) == [0, 0, 1, 1]
    assert rec.calls[0][2].num_steps == 2


def test_pinned_and_reset_steps_for_custom_loops(tiny_pipe):
    unet = tiny_pipe("sd15").unet
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 16, generator=g)
    rec = Recorder(sites="mid_block.attentions.0.transformer_blocks.0.attn1")
    with da.attach(unet, rec) as h, torch.no_grad():
        for t in (900, 700, 500):
            unet(x, t, text)
        h.reset_steps()
        unet(x, 100, text)
        h.set_step(7)
        unet(x, 200, text)  # inversion: rising timesteps, the loop names the step
        h.set_step(None)
    assert _steps(rec) == [0, 1, 2, 0, 7]
    assert [c[2].timestep for c in rec.calls] == [900, 700, 500, 100, 200]
    assert rec.calls[0][2].num_steps is None and rec.calls[0][2].sigma is None  # bare denoiser: unknown


def test_step_window_forms():
    s = lambda i, n=10, t=None, sigma=None: StepState(index=i, num_steps=n, timestep=t, sigma=sigma)  # noqa: E731
    w = StepWindow(start=1, stop=3)
    assert [w.contains(s(i)) for i in range(4)] == [False, True, True, False]
    assert [StepWindow.of((0.0, 0.5)).contains(s(i)) for i in (0, 4, 5, 9)] == [True, True, False, False]
    assert StepWindow.of({0, 2}).contains(s(2)) and not StepWindow.of({0, 2}).contains(s(1))
    assert StepWindow.of((2, None)).contains(s(5)) and not StepWindow.of((2, None)).contains(s(1))
    assert StepWindow(timestep_range=(800, 500)).contains(s(0, t=600.0))
    assert not StepWindow(sigma_range=(0.0, 0.5)).contains(s(0, sigma=0.9))
    assert StepWindow(sigma_range=(0.0, 0.5)).contains(s(0, sigma=None))  # unknown sigma: open
    with pytest.raises(ControlError):
        StepWindow(start=3, stop=1)
    with pytest.raises(ControlError):
        StepWindow.of("early")


def test_step_window_limits_a_control(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    rec = Recorder(sites="transformer_blocks.0.attn", steps=(1, 2))
    frac = Recorder(sites="transformer_blocks.0.attn", steps=(0.5, 1.0))
    with da.attach(pipe, rec, frac):
        pipe(**tiny_inputs("sd3", steps=4))
    assert _steps(rec) == [1] and _steps(frac) == [2, 3]


# ----------------------------------------------------------------------------- branches


def test_cfg_batched_branches_and_cfg_off(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    rec = Recorder(sites="transformer_blocks.0.attn")
    only_uncond = Recorder(sites="transformer_blocks.0.attn", branches="uncond")
    with da.attach(pipe, rec, only_uncond):
        pipe(**tiny_inputs("sd3", steps=1, guidance_scale=5.0, num_images_per_prompt=2))
        pipe(**tiny_inputs("sd3", steps=1, guidance_scale=1.0))
    assert rec.calls[0][3] == {"uncond": slice(0, 2), "cond": slice(2, 4)}
    assert rec.calls[1][3] == {"cond": slice(0, 1)}
    assert len(only_uncond.calls) == 1  # not active on the CFG-free call (no uncond rows)


def test_flux_true_cfg_is_two_calls(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("flux")
    rec = Recorder(sites="transformer_blocks.0.attn")
    with da.attach(pipe, rec):
        pipe(**tiny_inputs("flux", steps=2, negative_prompt="blurry", true_cfg_scale=2.0))
    assert [tuple(c[3]) for c in rec.calls] == [("cond",), ("uncond",)] * 2
    assert _steps(rec) == [0, 0, 1, 1]


def test_branch_override_for_custom_batches(tiny_pipe):
    unet = tiny_pipe("sd15").unet
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 3, 16, generator=g)
    rec = Recorder(sites="mid_block.attentions.0.transformer_blocks.0.attn1", branches=("ref",))
    with da.attach(unet, rec) as h, torch.no_grad():
        unet(x, 500, text)  # default {"cond": all}: the control is inactive
        with h.branches({"ref": slice(0, 2), "cond": slice(2, 3)}):
            unet(x, 500, text)
        with h.branches(lambda b: {"ref": slice(0, b - 1), "cond": slice(b - 1, b)}):
            unet(x[:2], 400, text[:2])
    assert [c[3] for c in rec.calls] == [{"ref": slice(0, 2), "cond": slice(2, 3)}, {"ref": slice(0, 1), "cond": slice(1, 2)}]


# ----------------------------------------------------------------------------- order and selection


class Ordered(Control):
    def __init__(self, name, log, **kw):
        super().__init__(**kw)
        self.name, self.log = name, log

    def edit_qkv(self, call):
        self.log.append(("qkv", self.name))

    def edit_spec(self, call):
        self.log.append(("spec", self.name))

    def edit_output(self, call, out):
        self.log.append(("out", self.name))
        return out


def test_control_order_qkv_and_spec_ascending_output_descending(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    log = []
    late = Ordered("late", log, sites="transformer_blocks.0.attn", order=10)
    early = Ordered("early", log, sites="transformer_blocks.0.attn", order=-5)
    tie = Ordered("tie", log, sites="transformer_blocks.0.attn", order=10)  # ties keep attach order
    with da.attach(pipe, late, early, tie) as h:
        assert [c.name for c in h.controls] == ["early", "late", "tie"]
        pipe(**tiny_inputs("sd3", steps=1))
    assert log == [("qkv", "early"), ("qkv", "late"), ("qkv", "tie"),
                   ("spec", "early"), ("spec", "late"), ("spec", "tie"),
                   ("out", "tie"), ("out", "late"), ("out", "early")]


def test_sites_and_heads_are_resolved_per_control(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd15")
    rec = Recorder(sites="cross", heads="1")
    with da.attach(pipe, rec) as h:
        pipe(**tiny_inputs("sd15", steps=1))
        per_site = h.engine.per_site
    assert {name for name, _, _, _, _ in rec.calls} == {s.name for s in da.sites(pipe) if s.kind == "cross"}
    assert all((rec in cs) == name.endswith("attn2") for name, cs in per_site.items())
    site = next(s for s in da.sites(pipe) if s.kind == "cross")
    assert rec.heads_at(site) == [1]
    assert Control(heads={site.name: "all"}).heads_at(site) == list(range(site.heads))
    assert Control(heads={"other": [0]}).heads_at(site) == []


# ----------------------------------------------------------------------------- taps


def _materialised(q, k, scale=None, bias=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q.double() @ k.double().transpose(-1, -2) * scale
    if bias is not None:
        s = s + (torch.where(bias, 0.0, float("-inf")).double() if bias.dtype == torch.bool else bias.double())
    return torch.softmax(s, dim=-1)


class TapControl(Control):
    def __init__(self, query, key, tap_kw=None, **kw):
        super().__init__(**kw)
        self.query, self.key, self.tap_kw = query, key, tap_kw or {}
        self.got, self.stored, self.on_taps_got = [], [], []

    def edit_spec(self, call):
        call.tap(self.query, self.key, callback=lambda c, p: self.got.append((c.q, c.k, c.layout, dict(c.branches), p)),
                 store=self.stored, **self.tap_kw)

    def on_taps(self, call, probs):
        self.on_taps_got.append(probs)


@pytest.mark.parametrize("family,site,query,key", [
    ("sd15", "cross", "image", "text"),
    ("sd3", "transformer_blocks.0.attn", "image", "text"),
    ("flux", "single", "text", "image"),
    ("flux_kontext", "transformer_blocks.1.attn", "image", "context"),
    ("wan", "cross", "video", "text"),
])
def test_taps_equal_a_materialised_softmax(tiny_pipe, tiny_inputs, family, site, query, key):
    pipe = tiny_pipe(family)
    ctrl = TapControl(query, key, sites=site)
    with da.attach(pipe, ctrl):
        pipe(**tiny_inputs(family, steps=1))
    assert ctrl.got and len(ctrl.stored) == len(ctrl.got) == len(ctrl.on_taps_got)
    for (q, k, layout, _, probs), stored, (handed,) in zip(ctrl.got, ctrl.stored, ctrl.on_taps_got):
        ref = _materialised(q, k)[:, :, layout.q(query).slice, layout.k(key).slice]
        assert probs.dtype == torch.float32 and not probs.requires_grad
        torch.testing.assert_close(probs.double(), ref, atol=1e-6, rtol=1e-5)
        assert stored is probs and handed is probs


def test_tap_subsets_tokens_heads_and_branches(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd15")
    ctrl = TapControl("image", "text", sites="mid_block.attentions.0.transformer_blocks.0.attn2",
                      tap_kw=dict(key_index=[1, 3], heads=[1], branches=("cond",)))
    with da.attach(pipe, ctrl):
        pipe(**tiny_inputs("sd15", steps=1, guidance_scale=4.0))
    (q, k, layout, branches, probs), = ctrl.got
    cond = branches["cond"]
    ref = _materialised(q, k)[cond][:, [1]][..., layout.q("image").slice, :][..., [1, 3]]
    assert probs.shape == (1, 1, len(layout.q("image")), 2)
    torch.testing.assert_close(probs.double(), ref, atol=1e-6, rtol=1e-5)


def test_taps_respect_the_bias_and_can_keep_gradients():
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 6, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    site = Site("blocks.0.attn", "sd3", "joint", 0, h, d)
    layout = TokenLayout(*(segments(("image", 4, (2, 2)), ("text", 2, None)),) * 2)
    mask = torch.rand(1, 1, n, n) > 0.3
    mask[..., 0] = True  # every row may attend somewhere

    class Grad(Control):
        def edit_spec(self, call):
            call.spec.add_bias(mask)
            call.tap("image", "text", requires_grad=True, store=got)

    got = []
    call = AttentionCall(site, layout, q, k, v)
    with torch.enable_grad():
        out = run_controls(call, [Grad()])
        probs, = got
        ref = _materialised(q, k, bias=mask)[:, :, :4, 4:]
        torch.testing.assert_close(probs.double(), ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.double(), _materialised(q, k, bias=mask) @ v.double(), atol=1e-6, rtol=1e-5)
        probs.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_lse_equals_logsumexp_of_scores():
    q, k, v = torch.randn(3, 2, 3, 7, 16, dtype=torch.float64).unbind(0)
    _, lse = attention(q, k, v, return_lse=True)
    torch.testing.assert_close(lse.double(), torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, -1))


def test_tap_on_a_missing_segment_is_an_error(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd15")
    with da.attach(pipe, TapControl("image", "text", sites="self")):
        with pytest.raises(LayoutError, match="key segments are \\['image'\\]"):
            pipe(**tiny_inputs("sd15", steps=1))
    assert torch.isfinite(output_of(pipe(**tiny_inputs("sd15", steps=1)))).all()  # detached cleanly


# ----------------------------------------------------------------------------- spec


def _uniform_reference(q, k, v, index, bias=None):
    """Materialised: keep each row's share of the subset, spread it uniformly (logits 0 + bias)."""
    p = _materialised(q, k, bias=bias)  # [B, H, Nq, Nk]
    s = torch.zeros(k.shape[-2], dtype=torch.bool)
    s[index] = True
    share = p[..., s].sum(-1, keepdim=True)
    b = torch.zeros(1, 1, 1, int(s.sum()), dtype=torch.float64) if bias is None else (
        torch.where(bias, 0.0, float("-inf")).double() if bias.dtype == torch.bool else bias.double())[..., s]
    within = torch.softmax(b.expand(*p.shape[:-1], -1), dim=-1).nan_to_num(0.0)  # rows with no allowed key in S
    pu = p.clone()
    pu[..., s] = share * within
    return pu @ v.double()


@pytest.mark.parametrize("index", [[2, 3, 4], [0, 5, 6, 7], list(range(8))])
@pytest.mark.parametrize("with_mask", [False, True])
def test_uniform_keys_are_exact(index, with_mask):
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 2, 3, 8, 4, dtype=torch.float64).unbind(0)  # [B, H, N, D] each
    mask = None
    if with_mask:
        mask = torch.rand(2, 1, 8, 8) > 0.4
        mask[..., 1] = True
    out, lse = uniform_keys_attention(q, k, v, torch.tensor(index), bias=mask)
    torch.testing.assert_close(out.double(), _uniform_reference(q, k, v, index, mask), atol=1e-10, rtol=1e-8)
    _, lse_ref = attention(q, k, v, bias=mask, return_lse=True)
    torch.testing.assert_close(lse, lse_ref)  # taps still see the unedited map
    out_fast, lse_fast = uniform_keys_attention(q, k, v, torch.tensor(index), bias=mask, need_lse=False)
    torch.testing.assert_close(out_fast, out)  # the no-scores path (every key uniform) is the same map
    if len(index) == 8:
        assert lse_fast is None


def test_uniform_keys_rows_and_heads_subset():
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 2, 3, 6, 4, dtype=torch.float64).unbind(0)
    site = Site("blocks.0.attn", "sd3", "joint", 0, 3, 4)
    layout = TokenLayout(*(segments(("image", 4, (2, 2)), ("text", 2, None)),) * 2)

    class U(Control):
        def edit_spec(self, call):
            call.uniform("text", rows=torch.tensor([False, True]), heads=[0, 2])

    out = run_controls(AttentionCall(site, layout, q, k, v), [U()])
    plain = _materialised(q, k) @ v
    uni = _uniform_reference(q, k, v, [4, 5])
    torch.testing.assert_close(out[0], plain[0])
    torch.testing.assert_close(out[1, [0, 2]], uni[1, [0, 2]])
    torch.testing.assert_close(out[1, 1], plain[1, 1])


class UAM(Control):
    """Uniform attention maps over every text key (Mo et al. 2025): out = mean(V)."""

    def __init__(self, **kw):
        super().__init__(sites="cross", **kw)
        self.checked = 0

    def edit_spec(self, call):
        call.spec.uniform_keys = UniformKeys("text")

    def edit_output(self, call, out):
        torch.testing.assert_close(out, call.v.mean(dim=2, keepdim=True).expand_as(out))
        self.checked += 1
        return out


def test_uniform_text_keys_on_a_unet_give_mean_values(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd15")
    uam = UAM()
    with da.attach(pipe, uam):
        out = output_of(pipe(**tiny_inputs("sd15", steps=1)))
    assert uam.checked == sum(s.kind == "cross" for s in da.sites(pipe)) and torch.isfinite(out).all()


class DuplicateKeys(Control):
    """Extended attention onto a copy of the call's own keys: softmax over duplicated keys is
    unchanged, so outputs equal stock."""

    def edit_qkv(self, call):
        call.extend_keys("copy", call.k.clone(), call.v.clone())
        assert call.layout.names[1][-1] == "copy"


class AllowAll(Control):
    def edit_spec(self, call):
        call.spec.add_bias(torch.ones(1, 1, call.q.shape[2], call.k.shape[2], dtype=torch.bool))
        call.spec.add_bias(torch.zeros(call.k.shape[2]))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_extended_keys_and_neutral_bias_leave_outputs_unchanged(family, tiny_pipe, tiny_inputs):
    pipe = tiny_pipe(family)
    stock = output_of(pipe(**tiny_inputs(family)))
    with da.attach(pipe, DuplicateKeys(sites="self" if family == "sd15" else "joint"), AllowAll()):
        ours = output_of(pipe(**tiny_inputs(family)))
    assert (ours - stock).abs().max() <= 1e-5


def test_isolation_bias_equals_a_materialised_reference():
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 1, 2, 6, 4, dtype=torch.float64).unbind(0)
    site = Site("blocks.0.attn1", "unet", "self", 0, 2, 4)
    layout = TokenLayout(*(segments(("image", 6, (2, 3))),) * 2)
    a = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 0, 1, 1, 0], dtype=torch.bool)
    isolate = ~((a[:, None] & b[None, :]) | (b[:, None] & a[None, :]))  # IR-Diffusion: no subject-to-subject

    class Iso(Control):
        def edit_spec(self, call):
            call.spec.add_bias(isolate)

    out = run_controls(AttentionCall(site, layout, q, k, v), [Iso()])
    torch.testing.assert_close(out, _materialised(q, k, bias=isolate) @ v)


def test_edit_qkv_must_keep_the_query_shape():
    q = torch.randn(1, 2, 4, 8)
    site = Site("blocks.0.attn1", "unet", "self", 0, 2, 8)

    class Bad(Control):
        def edit_qkv(self, call):
            call.q = call.q[:, :, :2]

    with pytest.raises(ControlError, match="keep the queries"):
        run_controls(AttentionCall(site, None, q, q, q), [Bad()])


# ----------------------------------------------------------------------------- hooks, experts, errors


class CountingHook(ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


class BlockHookControl(Control):
    def __init__(self):
        super().__init__()
        self.hook = CountingHook()
        self.attached = self.detached = 0

    def on_attach(self, engine):
        self.attached += 1

    def on_detach(self, engine):
        self.detached += 1

    def block_hooks(self, model):
        return [("transformer_blocks.0", self.hook)]


def test_block_hooks_run_and_are_removed(tiny_pipe, tiny_inputs):
    pipe = tiny_pipe("sd3")
    ctrl = BlockHookControl()
    with da.attach(pipe, ctrl):
        pipe(**tiny_inputs("sd3", steps=2))
    assert ctrl.hook.calls == 2 * 1 and (ctrl.attached, ctrl.detached) == (1, 1)  # one batched CFG forward per step
    pipe(**tiny_inputs("sd3", steps=1))
    assert ctrl.hook.calls == 2
    block = pipe.transformer.transformer_blocks[0]
    assert block._diffusers_hook.get_hook(f"diffattn.BlockHookControl.{id(ctrl)}.0") is None


def test_two_experts_share_the_step_count(tiny_fresh, tiny_inputs):
    pipe = tiny_fresh("wan", two_experts=True)
    rec = Recorder(sites=["blocks.0.attn1", "transformer_2.blocks.0.attn1"])
    originals = [dict(m.attn_processors) for _, m in denoisers(pipe)]
    with da.attach(pipe, rec):
        pipe(**tiny_inputs("wan", steps=4, guidance_scale=1.0))
    names = [c[0] for c in rec.calls]
    assert names[0] == "blocks.0.attn1" and names[-1] == "transformer_2.blocks.0.attn1"
    assert _steps(rec) == [0, 1, 2, 3]
    for (_, m), orig in zip(denoisers(pipe), originals):
        assert all(m.attn_processors[k] is v for k, v in orig.items())


def test_bad_input_errors(tiny_pipe):
    pipe = tiny_pipe("sd3")
    with pytest.raises(UnsupportedModelError):
        da.attach(torch.nn.Linear(2, 2))
    with pytest.raises(SelectorError, match="transformer_blocks"):
        da.attach(pipe, Recorder(sites="transformer_blocks.99"))
    with pytest.raises(ControlError, match="controls"):
        da.attach(pipe, "softpag")
    ctrl = Recorder()
    with da.attach(pipe, ctrl):
        with pytest.raises(ControlError, match="already attached.*detach"):
            da.attach(pipe)
        with pytest.raises(ControlError, match="already attached"):
            da.attach(tiny_pipe("sd15"), ctrl)
        with pytest.raises(ControlError, match="already attached"):
            da.attach(pipe.transformer)  # the bare denoiser of an attached pipeline
    with pytest.raises(ControlError, match="twice"):
        da.attach(pipe, ctrl, ctrl)
    # failed attaches leave nothing behind
    assert not any(isinstance(p, DiffattnProcessor) for p in pipe.transformer.attn_processors.values())
    assert ctrl._diffattn_engine is None
    with da.attach(pipe, ctrl):
        pass
    h = da.attach(pipe)
    h.detach()
    h.detach()  # idempotent
    assert "detached" in repr(h)


def test_any_rows_agrees_with_the_row_mask_without_reading_it():
    q = torch.zeros(5, 2, 3, 4)
    branches = {"uncond": slice(0, 2), "cond": slice(2, 4), "perturbed": slice(4, 5), "empty": slice(5, 5)}
    call = AttentionCall(None, None, q, q, q, branches=branches)
    for names in (None, ("cond",), ("perturbed",), ("empty",), ("missing",), ("empty", "perturbed"), ()):
        assert call.any_rows(names) == bool(call.rows(names).any()), names
