"""The ComfyUI node pack (diffattn.comfy) without ComfyUI installed.

ComfyUI's call conventions are reproduced here from its source, read at
Comfy-Org/ComfyUI @ 82997188568abe525d2b961fa2d4feae8f98f843:

- ``comfy/ldm/modules/attention.py``: ``optimized_attention(q, k, v, heads, mask=None,
  attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)`` with q/k/v
  ``[B, N, H·D]`` (``skip_reshape``: ``[B, H, N, D]``), viewed as ``[B, N, H, D]`` and
  transposed for SDPA, a 2-D / 3-D mask unsqueezed to 4-D, the output transposed back to
  ``[B, N, H·D]`` unless ``skip_output_reshape``; ``wrap_attn`` hands the call to
  ``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` when set;
  ``BasicTransformerBlock.forward`` looks up an ``attn1`` / ``attn2`` replace patch under
  ``(block[0], block[1], block_index)`` then ``block``, and calls it as
  ``patch(to_q(n), to_k(ctx), to_v(ctx), extra_options)`` (``extra_options``: every
  ``transformer_options`` key but ``patches`` / ``patches_replace``, plus ``n_heads``,
  ``dim_head``, ``attn_precision``), then ``to_out``;
- ``comfy/model_patcher.py``: ``set_model_options_patch_replace(model_options, patch, name,
  block_name, number, transformer_index=None)`` stores the patch under
  ``transformer_options["patches_replace"][name][(block_name, number[, transformer_index])]``
  on copies of those dicts; ``ModelPatcher.set_model_attn1_replace`` / ``attn2`` and
  ``set_model_sampler_post_cfg_function(fn, disable_cfg1_optimization)``;
- ``comfy_extras/nodes_pag.py``: the post-CFG function gets ``model``, ``cond_denoised``,
  ``cond``, ``denoised``, ``sigma``, ``model_options``, ``input`` and returns
  ``denoised + (cond_denoised - perturbed) * scale`` with the perturbed pass from
  ``comfy.samplers.calc_cond_batch(model, [cond], x, sigma, model_options)``.

Everything below re-implements those conventions (none of ComfyUI is imported).
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import types

import pytest
import torch

from diffattn.comfy import adapter as A
from diffattn.comfy import nodes as N
from diffattn.controls import StepState
from diffattn.methods.softpag import SoftPAG
from diffattn.methods.uniform import UniformAttention
from diffattn.sites import Site
from diffattn.workflow import CONTROL_NODES


# ----------------------------------------------------------------------------- ComfyUI's conventions, re-implemented


def comfy_optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                              skip_output_reshape=False, **kwargs):
    """ComfyUI's ``attention_pytorch`` calling convention (our re-implementation)."""
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=kwargs.get("scale"))
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


def wrap_attn(func):
    """ComfyUI's ``wrap_attn`` dispatch to ``optimized_attention_override`` (re-implemented)."""

    def wrapper(*args, **kwargs):
        if "_inside_attn_wrapper" not in kwargs:
            to = kwargs.get("transformer_options")
            kwargs["_inside_attn_wrapper"] = True
            if to is not None and "optimized_attention_override" in to:
                return to["optimized_attention_override"](func, *args, **kwargs)
        return func(*args, **kwargs)

    return wrapper


def patch_replace(model_options, patch, name, block_name, number, transformer_index=None):
    """``comfy.model_patcher.set_model_options_patch_replace`` (re-implemented)."""
    to = dict(model_options.get("transformer_options", {}))
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
    block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    to["patches_replace"][name][block] = patch
    model_options = dict(model_options)
    model_options["transformer_options"] = to
    return model_options


class Attn(torch.nn.Module):
    """ComfyUI ``CrossAttention``: to_q/k/v [.., H·D], optimized attention, to_out."""

    def __init__(self, dim, heads, dim_head, context_dim=None):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_k = torch.nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = torch.nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner, dim))

    def forward(self, x, context=None, transformer_options=None):
        c = x if context is None else context
        out = wrap_attn(comfy_optimized_attention)(self.to_q(x), self.to_k(c), self.to_v(c), self.heads,
                                                   transformer_options=transformer_options or {})
        return self.to_out(out)


class Block(torch.nn.Module):
    """ComfyUI ``BasicTransformerBlock``'s attention part, with its replace-patch lookup."""

    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.n_heads, self.d_head = heads, dim_head
        self.attn1 = Attn(dim, heads, dim_head)
        self.attn2 = Attn(dim, heads, dim_head, context_dim)

    def forward(self, x, context, to):
        block, index = to.get("block"), to.get("block_index", 0)
        extra = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        extra.update(n_heads=self.n_heads, dim_head=self.d_head, attn_precision=None)
        replace = to.get("patches_replace", {})
        key = (block[0], block[1], index) if block is not None else None
        for name, attn, ctx in (("attn1", self.attn1, x), ("attn2", self.attn2, context)):
            table = replace.get(name, {})
            k = key if key in table else block
            if k in table:
                n = attn.to_out(table[k](attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx), extra))
            else:
                n = attn(x, context=None if name == "attn1" else ctx, transformer_options=to)
            x = x + n
        return x


class SpatialTransformer(torch.nn.Module):
    def __init__(self, dim, heads, dim_head, context_dim, depth=1):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(Block(dim, heads, dim_head, context_dim) for _ in range(depth))

    def forward(self, x, context, to):
        for i, b in enumerate(self.transformer_blocks):
            to["block_index"] = i
            x = b(x, context, to)
        return x


class Res(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, x, context, to):
        return x + 0.1 * torch.tanh(self.lin(x))


class TinyComfyUNet(torch.nn.Module):
    """A ComfyUI-shaped UNet on token sequences: input_blocks (conv, [res, ST], [res, ST],
    down, [res]), middle_block [res, ST, res], output_blocks [res, ST] x 3; ``num_res_blocks``
    per level [1, 1] as ComfyUI's UNetModel keeps it."""

    def __init__(self, dim=16, heads=2, dim_head=8, context_dim=12):
        super().__init__()
        st = lambda: SpatialTransformer(dim, heads, dim_head, context_dim)  # noqa: E731
        self.num_res_blocks = [1, 1]
        self.input_blocks = torch.nn.ModuleList([
            torch.nn.ModuleList([Res(dim)]), torch.nn.ModuleList([Res(dim), st()]),
            torch.nn.ModuleList([Res(dim)]), torch.nn.ModuleList([Res(dim), st()])])
        self.middle_block = torch.nn.ModuleList([Res(dim), st(), Res(dim)])
        self.output_blocks = torch.nn.ModuleList([torch.nn.ModuleList([Res(dim), st()]) for _ in range(4)])

    def forward(self, x, context, transformer_options):
        to = dict(transformer_options)
        for part, name, blocks in (("input", "input_blocks", self.input_blocks),
                                   ("middle", "middle_block", [self.middle_block]),
                                   ("output", "output_blocks", self.output_blocks)):
            for i, block in enumerate(blocks):
                to["block"] = (part, 0 if part == "middle" else i)
                for layer in block:
                    x = layer(x, context, to)
        return x


class FakePatcher:
    """The parts of ComfyUI's ``ModelPatcher`` the nodes use."""

    def __init__(self, dm, model_options=None):
        self.dm = dm
        self.model_options = model_options or {"transformer_options": {}}
        self.post_cfg = []

    def clone(self):
        import copy

        n = FakePatcher(self.dm, copy.deepcopy({k: v for k, v in self.model_options.items()}))
        n.post_cfg = list(self.post_cfg)
        return n

    def get_model_object(self, name):
        assert name == "diffusion_model"
        return self.dm

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.model_options = patch_replace(self.model_options, patch, "attn1", block_name, number, transformer_index)

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.model_options = patch_replace(self.model_options, patch, "attn2", block_name, number, transformer_index)

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.post_cfg.append(fn)
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True


@pytest.fixture
def comfy_hooks(monkeypatch):
    """ComfyUI's model-options helper and a calc_cond_batch running the tiny UNet."""
    monkeypatch.setattr(N, "set_model_options_patch_replace", patch_replace)

    def calc_cond_batch(model, conds, x, sigma, model_options):
        to = dict(model_options.get("transformer_options", {}), cond_or_uncond=[0], sigmas=sigma)
        return [model(x, conds[0], to) for _ in conds]

    monkeypatch.setattr(N, "calc_cond_batch", calc_cond_batch)


def _site(name="s", kind="self", heads=2, head_dim=8, alias=None):
    return Site(name, "comfy", kind, 0, heads, head_dim, alias=alias)


# ----------------------------------------------------------------------------- import, contracts


def test_import_without_comfyui():
    code = ("import sys, diffattn.comfy as c; assert 'comfy' not in sys.modules and 'comfy_api' not in sys.modules;"
            "assert 'torch' not in sys.modules; print(sorted(c.NODE_CLASS_MAPPINGS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "DiffattnSoftPAG" in out.stdout and "DiffattnUniformAttention" in out.stdout


def test_classic_node_contracts():
    assert set(N.NODE_CLASS_MAPPINGS) == {"Diffattn" + n for n in CONTROL_NODES}
    for node_id, cls in N.NODE_CLASS_MAPPINGS.items():
        node = cls.diffattn_node
        assert cls.RETURN_TYPES == ("MODEL",) and cls.FUNCTION == "patch" and cls.CATEGORY == "diffattn"
        assert callable(getattr(cls(), cls.FUNCTION))
        req = cls.INPUT_TYPES()["required"]
        assert req["model"] == ("MODEL",)
        assert list(req)[1:] == [p.name for p in node.params]  # the registry's names, in order
        for p in node.params:
            kind, opts = req[p.name]
            if p.choices:
                assert kind == list(p.choices) and opts["default"] == p.default
            else:
                assert kind == {float: "FLOAT", str: "STRING", int: "INT", bool: "BOOLEAN"}[p.type]
                assert opts["default"] == (p.default if p.default is not None else "")
                if p.range:
                    assert (opts["min"], opts["max"])[: 1 if p.range[1] is None else 2] == \
                        tuple(x for x in p.range if x is not None)
        assert node_id in N.NODE_DISPLAY_NAME_MAPPINGS
    sp = N.NODE_CLASS_MAPPINGS["DiffattnSoftPAG"].INPUT_TYPES()["required"]
    assert set(sp) == {"model", "heads", "strength", "scale", "preset", "target", "semantics"}


def _fake_io():
    """A stand-in for ``comfy_api.latest.io`` recording what the V3 classes declare."""
    io = types.SimpleNamespace()

    class Rec:
        def __init__(self, kind):
            self.kind = kind

        def Input(self, id, **kw):  # noqa: N802
            return ("in", self.kind, id, kw)

        def Output(self, **kw):  # noqa: N802
            return ("out", self.kind, kw)

    for k in ("Model", "Float", "Int", "String", "Boolean", "Combo", "Mask"):
        setattr(io, k, Rec(k))
    io.Schema = lambda **kw: kw
    io.NodeOutput = lambda *a: ("NodeOutput",) + a

    class ComfyNode:
        pass

    io.ComfyNode = ComfyNode
    return io


def test_v3_schema_by_introspection(comfy_hooks):
    io = _fake_io()
    classes = N.v3_nodes(io)
    assert [c.__name__ for c in classes] == list(N.NODE_CLASS_MAPPINGS)
    for cls in classes:
        node = cls.diffattn_node
        assert issubclass(cls, io.ComfyNode)
        schema = cls.define_schema()
        assert schema["node_id"] == "Diffattn" + node.name and schema["category"] == "diffattn"
        assert schema["outputs"] == [("out", "Model", {})]
        ins = schema["inputs"]
        assert ins[0] == ("in", "Model", "model", {})
        assert [i[2] for i in ins[1:]] == [p.name for p in node.params]
        for p, i in zip(node.params, ins[1:]):
            assert i[1] == ("Combo" if p.choices else {float: "Float", str: "String"}[p.type])
            assert i[3]["default"] == (p.default if p.default is not None else "")
    # execute patches a model like the classic node
    sp = classes[0]
    out = sp.execute(FakePatcher(TinyComfyUNet()), heads="mid", strength=1.0, scale=2.0, preset="")
    assert out[0] == "NodeOutput" and out[1].post_cfg


def test_v3_extension_and_entrypoint_shape():
    io = _fake_io()

    class ComfyExtension:
        pass

    api = types.SimpleNamespace(io=io, ComfyExtension=ComfyExtension)
    ext = N.v3_extension(api)
    assert isinstance(ext, ComfyExtension)
    listed = asyncio.run(ext.get_node_list())
    assert [c.__name__ for c in listed] == list(N.NODE_CLASS_MAPPINGS)
    assert asyncio.iscoroutinefunction(N.comfy_entrypoint)


# ----------------------------------------------------------------------------- sites and selectors


def test_comfy_unet_sites_and_selectors():
    csites = A.comfy_sites(TinyComfyUNet())
    names = [c.site.name for c in csites]
    assert names[:2] == ["input_blocks.1.1.transformer_blocks.0.attn1", "input_blocks.1.1.transformer_blocks.0.attn2"]
    by = {c.site.name: c for c in csites}
    mid = by["middle_block.1.transformer_blocks.0.attn1"]
    assert mid.site.alias == "m0.0" and mid.patch_key == ("middle", 0, 0) and mid.site.kind == "self"
    assert by["input_blocks.3.1.transformer_blocks.0.attn2"].site.alias == "d1.0"
    assert by["output_blocks.2.1.transformer_blocks.0.attn1"].patch_key == ("output", 2, 0)
    from diffattn.workflow import parse_heads

    sites = [c.site for c in csites]
    assert parse_heads("mid", sites) == {"middle_block.1.transformer_blocks.0.attn1": "all"}
    assert parse_heads(A.comfy_selector("input 3"), sites) == {"input_blocks.3.1.transformer_blocks.0.attn1": "all"}
    assert parse_heads("u1: 0=0.5, 1", sites, 0.25) == {"output_blocks.1.1.transformer_blocks.0.attn1": {0: 0.5, 1: 0.25}}
    from diffattn.errors import SelectorError

    with pytest.raises(SelectorError):
        parse_heads("u9", sites)
    # a diffusers preset site name maps to the same UNet place
    tr = N._preset_translator(csites, TinyComfyUNet())
    assert tr("down_blocks.1.attentions.0.transformer_blocks.0.attn1") == "input_blocks.3.1.transformer_blocks.0.attn1"
    assert tr("up_blocks.0.attentions.1.transformer_blocks.0.attn2") == "output_blocks.1.1.transformer_blocks.0.attn2"
    assert tr("mid_block.attentions.0.transformer_blocks.0.attn1") == "middle_block.1.transformer_blocks.0.attn1"


# ----------------------------------------------------------------------------- the adapter


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_override_convention_matches_comfy_attention_when_inactive(skip_reshape):
    """No control at the call's block: the override hands the call to ComfyUI's own func, unchanged."""
    torch.manual_seed(0)
    site = A.ComfySite(_site("double_blocks.0", "joint"), dit_key=("double", 0))
    ctl = SoftPAG({"double_blocks.0": "all"}, scale=2.0)
    engine = A.ComfyEngine([site], [ctl]).attach()
    b, n, h, d = 2, 6, 2, 8
    shape = (b, h, n, d) if skip_reshape else (b, n, h * d)
    q, k, v = (torch.randn(shape) for _ in range(3))
    override = A.attention_override(engine, branch="perturbed")
    opts = {"optimized_attention_override": override, "block_type": "double", "block_index": 1}
    got = wrap_attn(comfy_optimized_attention)(q, k, v, h, skip_reshape=skip_reshape, transformer_options=opts)
    ref = comfy_optimized_attention(q, k, v, h, skip_reshape=skip_reshape)
    assert torch.equal(got, ref)
    # at its block, every head perturbed toward the identity: out = v
    opts["block_index"] = 0
    got = wrap_attn(comfy_optimized_attention)(q, k, v, h, skip_reshape=skip_reshape, transformer_options=opts)
    assert torch.allclose(got, A.from_heads(v) if skip_reshape else v, atol=1e-6)  # output [B, N, H·D] by default


@pytest.mark.parametrize("mask_dims", [2, 3])
def test_adapter_zero_strength_equals_comfy_attention_with_mask(mask_dims):
    torch.manual_seed(1)
    b, n, h, d = 2, 5, 2, 4
    q, k, v = (torch.randn(b, n, h * d) for _ in range(3))
    mask = torch.randn((n, n) if mask_dims == 2 else (b, n, n))
    ctl = UniformAttention("all", strength=0.0)
    site = _site("x", "cross", h, d)
    engine = A.ComfyEngine([A.ComfySite(site, "attn2", ("input", 1, 0))], [ctl]).attach()
    got = A.comfy_attention(engine.per_site["x"], site, q, k, v, h, mask=mask)
    ref = comfy_optimized_attention(q, k, v, h, mask=mask)
    assert torch.allclose(got, ref, atol=1e-6)


def _capture(module):
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["ctx"] = kwargs.get("encoder_hidden_states")
        seen["out"] = out

    return seen, module.register_forward_hook(hook, with_kwargs=True)


def _diffusers_unet_call(pipe, control, site_name, branch):
    from diffattn import attach

    unet = pipe.unet
    module = unet.get_submodule(site_name)
    seen, h = _capture(module)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    try:
        with attach(unet, control) as handle, handle.branches(lambda batch: {branch: slice(0, batch)}):
            unet(sample, 500, encoder_hidden_states=ctx)
    finally:
        h.remove()
    return module, seen


@pytest.mark.parametrize("u", [1.0, 0.5, {0: 0.3, 1: 1.0}])
def test_softpag_adapter_equals_diffusers_processor(tiny_pipe, u):
    """SoftPAG's perturbed attention at a UNet self-attention site: the ComfyUI replace patch on
    the block's to_q/to_k/to_v [B, N, H·D] equals diffattn's diffusers processor (fp32)."""
    pipe = tiny_pipe("sd15")
    name = "mid_block.attentions.0.transformer_blocks.0.attn1"
    heads = {name: u} if isinstance(u, dict) else {name: "all"}
    strength = 1.0 if isinstance(u, dict) else u
    module, seen = _diffusers_unet_call(pipe, SoftPAG(heads, strength=strength, scale=2.0), name, "perturbed")
    x = seen["x"]
    site = _site("middle_block.1.transformer_blocks.0.attn1", "self", module.heads, module.to_q.out_features // module.heads,
                 alias="m0.0")
    csite = A.ComfySite(site, "attn1", ("middle", 0, 0))
    spec = {site.name: u} if isinstance(u, dict) else {site.name: "all"}
    engine = A.ComfyEngine([csite], [SoftPAG(spec, strength=strength, scale=2.0)]).attach()
    patch = A.replace_patch(engine, csite, branch="perturbed")
    with torch.no_grad():
        out = module.to_out[0](patch(module.to_q(x), module.to_k(x), module.to_v(x),
                                     {"n_heads": module.heads, "cond_or_uncond": [0, 1]}))
    assert torch.allclose(out, seen["out"], atol=1e-5), (out - seen["out"]).abs().max()


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_uniform_adapter_equals_diffusers_processor(tiny_pipe, strength):
    """UniformAttention at a UNet cross-attention site (attn2 replace patch) equals the diffusers path."""
    pipe = tiny_pipe("sd15")
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    module, seen = _diffusers_unet_call(pipe, UniformAttention(name, strength=strength), name, "cond")
    x, ctx = seen["x"], seen["ctx"]
    site = _site("output_blocks.3.1.transformer_blocks.0.attn2", "cross", module.heads,
                 module.to_q.out_features // module.heads, alias="u0.0")
    csite = A.ComfySite(site, "attn2", ("output", 3, 0))
    engine = A.ComfyEngine([csite], [UniformAttention(site.name, strength=strength)]).attach()
    patch = A.replace_patch(engine, csite)
    with torch.no_grad():
        out = module.to_out[0](patch(module.to_q(x), module.to_k(ctx), module.to_v(ctx),
                                     {"n_heads": module.heads, "cond_or_uncond": [0]}))
    assert torch.allclose(out, seen["out"], atol=1e-5), (out - seen["out"]).abs().max()


# ----------------------------------------------------------------------------- the nodes on a ComfyUI-shaped model


def test_softpag_node_post_cfg_runs_the_perturbed_pass(comfy_hooks):
    torch.manual_seed(0)
    dm = TinyComfyUNet().eval()
    model = FakePatcher(dm)
    cls = N.NODE_CLASS_MAPPINGS["DiffattnSoftPAG"]
    (patched,) = getattr(cls(), cls.FUNCTION)(model, heads="mid", strength=1.0, scale=2.0, preset="")
    assert patched is not model and not model.post_cfg and len(patched.post_cfg) == 1
    assert patched.model_options.get("disable_cfg1_optimization") is True
    assert "patches_replace" not in patched.model_options["transformer_options"]  # only inside the perturbed pass
    x, cond = torch.randn(1, 6, 16), torch.randn(1, 4, 12)
    with torch.no_grad():
        cond_pred = dm(x, cond, {"cond_or_uncond": [0]})
        denoised = cond_pred * 0.9
        args = dict(model=dm, cond_denoised=cond_pred, cond=cond, denoised=denoised, sigma=torch.tensor([1.0]),
                    model_options=patched.model_options, input=x)
        got = patched.post_cfg[0](args)
        # reference: the mid block's self attention returns V (PAG), by hand
        seen = {}
        st = dm.middle_block[1].transformer_blocks[0].attn1

        def pag(q, k, v, extra):
            return v

        ref_pert = dm(x, cond, patch_replace(patched.model_options, pag, "attn1", "middle", 0, 0)["transformer_options"])
    assert torch.allclose(got, denoised + (cond_pred - ref_pert) * 2.0, atol=1e-5)
    assert not torch.allclose(ref_pert, cond_pred)
    del seen, st


def test_uniform_node_installs_attn2_patches(comfy_hooks):
    dm = TinyComfyUNet().eval()
    cls = N.NODE_CLASS_MAPPINGS["DiffattnUniformAttention"]
    (patched,) = cls().patch(FakePatcher(dm), sites="auto", strength=1.0, mode="auto")
    table = patched.model_options["transformer_options"]["patches_replace"]
    assert set(table) == {"attn2"} and len(table["attn2"]) == 7  # every cross-attention site
    x, cond = torch.randn(1, 6, 16), torch.randn(1, 4, 12)
    with torch.no_grad():
        out = dm(x, cond, patched.model_options["transformer_options"])
        # by hand: uniform maps = mean of the values per head
        def uni(q, k, v, extra):
            return v.mean(1, keepdim=True).expand(-1, q.shape[1], -1)

        opts = {"transformer_options": {}}
        for key in table["attn2"]:
            opts = patch_replace(opts, uni, "attn2", *key)
        ref = dm(x, cond, opts["transformer_options"])
    assert torch.allclose(out, ref, atol=1e-5)


def test_node_rejects_bad_values_with_typed_errors():
    from diffattn.errors import SelectorError, WorkflowError

    cls = N.NODE_CLASS_MAPPINGS["DiffattnSoftPAG"]
    with pytest.raises(WorkflowError, match="strength"):
        cls().patch(FakePatcher(TinyComfyUNet()), heads="mid", strength=2.0, scale=2.0, preset="")
    with pytest.raises(SelectorError):
        cls().patch(FakePatcher(TinyComfyUNet()), heads="u9", strength=1.0, scale=2.0, preset="")


# ----------------------------------------------------------------------------- a real ComfyUI checkout (optional)


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH does not point to a ComfyUI checkout; "
                                                               "set it to run the pack inside real ComfyUI")
def test_in_real_comfyui(tmp_path):
    """Loads the pack from a real ComfyUI checkout, patches a tiny SD1.5-config UNet through
    ModelPatcher and samples one step on CPU (run in a subprocess: ComfyUI parses sys.argv)."""
    script = r'''
import sys, os, torch
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, os.environ["COMFYUI_PATH"])
import comfy.model_patcher, comfy.samplers, comfy.sample, comfy.supported_models, comfy.model_base
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
import diffattn.comfy as pack
unet_config = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                   attention_resolutions=[1, 2], channel_mult=[1, 2], num_heads=2, context_dim=16,
                   use_linear_in_transformer=True, transformer_depth=[1, 1], transformer_depth_middle=1,
                   transformer_depth_output=[1, 1, 1, 1], use_spatial_transformer=True, legacy=False)
conf = comfy.supported_models.SD15(unet_config)
model = comfy.model_base.BaseModel(conf, device=torch.device("cpu"))
patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
for name, cls in pack.NODE_CLASS_MAPPINGS.items():
    node = cls()
    kw = {p: spec[1].get("default", spec[0][0] if isinstance(spec[0], list) else None)
          for p, spec in cls.INPUT_TYPES()["required"].items() if p != "model"}
    (m,) = getattr(node, cls.FUNCTION)(patcher, **kw)
    cond = [[torch.randn(1, 5, 16), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8)
    out = comfy.sample.sample(m, noise, 1, 2.0, "euler", "normal", cond, cond, latent, disable_pbar=True, seed=0)
    assert torch.isfinite(out).all(), name
print("ok")
'''
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_step_and_branches_from_extra_options():
    e = {"sigmas": torch.tensor([2.0]), "sample_sigmas": torch.tensor([4.0, 2.0, 1.0, 0.0]), "cond_or_uncond": [1, 0]}
    st = A.step_from(e)
    assert isinstance(st, StepState) and st.index == 1 and st.num_steps == 3 and st.sigma == 2.0
    assert A.branches_from(e, 4) == {"uncond": slice(0, 2), "cond": slice(2, 4)}
    assert A.branches_from(e, 4, "perturbed") == {"perturbed": slice(0, 4)}


# ----------------------------------------------------------------------------- reviewed defects


def test_readme_heads_language_through_the_node_class(comfy_hooks):
    """The README's ``m0: 0,3; u1: 1=0.5`` (and ComfyUI block names before a ``:``) through the
    real node class: ``;`` stays the item separator, only the selector part is translated."""
    from diffattn.comfy.adapter import comfy_selector

    dm = TinyComfyUNet(heads=4, dim_head=4)
    cls = N.NODE_CLASS_MAPPINGS["DiffattnSoftPAG"]
    node = cls.diffattn_node
    cases = {
        "m0: 0,3; u1: 1=0.5": {"middle_block.1.transformer_blocks.0.attn1": [1, 0, 0, 1],
                               "output_blocks.1.1.transformer_blocks.0.attn1": [0, 0.5, 0, 0]},
        "m0: 0; u1: 1": {"middle_block.1.transformer_blocks.0.attn1": [1, 0, 0, 0],
                         "output_blocks.1.1.transformer_blocks.0.attn1": [0, 1, 0, 0]},
        "input 3: 0,3": {"input_blocks.3.1.transformer_blocks.0.attn1": [1, 0, 0, 1]},
        "middle 0: 2; output 2: 1=0.25": {"middle_block.1.transformer_blocks.0.attn1": [0, 0, 1, 0],
                                          "output_blocks.2.1.transformer_blocks.0.attn1": [0, 0.25, 0, 0]},
    }
    assert comfy_selector("input 4: 0,3; u1: 1=0.5") == "input_blocks.4: 0,3; u1: 1=0.5"
    for heads, want in cases.items():
        (patched,) = cls().patch(FakePatcher(dm), heads=heads, strength=1.0, scale=2.0, preset="")
        assert len(patched.post_cfg) == 1, heads
        _, control = N.build_engine(node, FakePatcher(dm), node.resolve(
            {"heads": heads, "strength": 1.0, "scale": 2.0, "preset": ""}))
        assert {k: v.tolist() for k, v in control.u.items()} == want, heads


class _DiTBlock(torch.nn.Module):
    def __init__(self, heads=4, head_dim=4):
        super().__init__()
        self.x_block = torch.nn.Module()
        self.x_block.attn = torch.nn.Module()
        self.x_block.attn.num_heads = heads
        self.x_block.attn.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)


class TinyComfyDiT(torch.nn.Module):
    """The parts of a ComfyUI SD3 ``MMDiT`` (``joint_blocks``) or FLUX (``double_blocks`` +
    ``single_blocks``) the pack reads: block lists whose attention names its heads."""

    def __init__(self, kind="sd3", n=6, n_single=2):
        super().__init__()
        if kind == "sd3":
            self.joint_blocks = torch.nn.ModuleList(_DiTBlock() for _ in range(n))
        else:
            self.double_blocks = torch.nn.ModuleList(_DiTBlock() for _ in range(n))
            self.single_blocks = torch.nn.ModuleList(_DiTBlock() for _ in range(n_single))


def test_dit_refuses_semantics_that_need_the_text_split(comfy_hooks):
    """ComfyUI's DiT attention call carries no text length: SoftPAG semantics image / image-self
    would silently act as joint there, so the node refuses them (naming the fix); joint works."""
    from diffattn.errors import ControlError

    cls = N.NODE_CLASS_MAPPINGS["DiffattnSoftPAG"]
    for kind in ("sd3", "flux"):
        for semantics in ("image", "image-self"):
            with pytest.raises(ControlError, match=r"semantics='image.*'joint'"):
                cls().patch(FakePatcher(TinyComfyDiT(kind)), heads="all", strength=1.0, scale=2.0, preset="",
                            semantics=semantics)
        (patched,) = cls().patch(FakePatcher(TinyComfyDiT(kind)), heads="all", strength=1.0, scale=2.0, preset="",
                                 semantics="joint")
        assert len(patched.post_cfg) == 1
    # on a UNet the semantics have no text to split either way: accepted
    (patched,) = cls().patch(FakePatcher(TinyComfyUNet()), heads="mid", strength=1.0, scale=2.0, preset="",
                             semantics="image")
    assert len(patched.post_cfg) == 1
    uni = N.NODE_CLASS_MAPPINGS["DiffattnUniformAttention"]
    with pytest.raises(ControlError, match="UniformAttention"):
        uni().patch(FakePatcher(TinyComfyDiT()), sites="auto", strength=1.0, mode="auto")


def test_dit_preset_maps_to_comfy_blocks(comfy_hooks):
    """A HeadHunter preset made on a DiT (the shipped tiny-sd3 one: ``transformer_blocks.N.attn``)
    loads in ComfyUI: SD3 ``joint_blocks.N``, FLUX ``double_blocks.N`` / ``single_blocks.N``."""
    import json
    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "assets" / "presets" / "tiny-sd3-fidelity.json"
    entries = json.loads(preset.read_text())["heads"]
    cls = N.NODE_CLASS_MAPPINGS["DiffattnSoftPAG"]
    node = cls.diffattn_node
    (patched,) = cls().patch(FakePatcher(TinyComfyDiT("sd3")), heads="mid", strength=1.0, scale=2.0,
                             preset=str(preset))
    assert len(patched.post_cfg) == 1
    _, control = N.build_engine(node, FakePatcher(TinyComfyDiT("sd3")), node.resolve(
        {"preset": str(preset), "strength": 0.5}))
    want = {}
    for site, head, u in entries:
        want.setdefault(site.replace("transformer_blocks", "joint_blocks").removesuffix(".attn"), {})[head] = u * 0.5
    got = {name: {h: float(x) for h, x in enumerate(v) if x} for name, v in control.u.items()}
    assert got == want
    flux = TinyComfyDiT("flux")
    tr = N._preset_translator(A.comfy_sites(flux), flux)
    assert tr("transformer_blocks.3.attn") == "double_blocks.3"
    assert tr("single_transformer_blocks.1.attn") == "single_blocks.1"
    assert tr("single_transformer_blocks.7.attn") is None and tr("transformer_blocks.3.attn.to_q") is None
    (patched,) = cls().patch(FakePatcher(flux), heads="mid", strength=1.0, scale=2.0, preset=str(preset))
    assert len(patched.post_cfg) == 1


def test_branches_from_multi_cond_batches():
    """Every row of each kind, also with several conds per kind ([0, 0, 1], [0, 1, 0]); a batch that
    does not split into the chunks is refused."""
    from diffattn.errors import ControlError

    e = {"cond_or_uncond": [0, 0, 1]}
    assert A.branches_from(e, 6) == {"cond": slice(0, 4), "uncond": slice(4, 6)}
    assert A.batch_order(e, 6) is None
    e = {"cond_or_uncond": [0, 1, 0]}
    assert A.branches_from(e, 6) == {"cond": slice(0, 4), "uncond": slice(4, 6)}
    assert A.batch_order(e, 6) == [0, 1, 4, 5, 2, 3]
    assert A.batch_order(e, 6, "perturbed") is None
    with pytest.raises(ControlError, match="not a multiple of 2"):
        A.branches_from({"cond_or_uncond": [0, 1]}, 5)
    # through a replace patch: a control on the cond rows acts on rows 0, 1 (cond), not 2 (uncond)
    torch.manual_seed(0)
    h, d, n = 2, 4, 5
    site = _site("x", "cross", h, d)
    csite = A.ComfySite(site, "attn2", ("input", 1, 0))
    engine = A.ComfyEngine([csite], [UniformAttention("x", strength=1.0, branches="cond")]).attach()
    patch = A.replace_patch(engine, csite)
    q, k, v = (torch.randn(3, n, h * d) for _ in range(3))
    out = patch(q, k, v, {"n_heads": h, "cond_or_uncond": [0, 1, 0]})
    uniform = v.mean(1, keepdim=True).expand(-1, n, -1)
    plain = comfy_optimized_attention(q, k, v, h)
    for row, kind in enumerate(("cond", "uncond", "cond")):
        assert torch.allclose(out[row], (uniform if kind == "cond" else plain)[row], atol=1e-6), row
    with pytest.raises(ControlError):
        patch(q[:2], k[:2], v[:2], {"n_heads": h, "cond_or_uncond": [0, 1, 0]})


@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("u", [0.5, {0: 0.3, 1: 1.0}])
def test_softpag_dit_override_equals_diffusers_joint_processor(tiny_pipe, u, skip_reshape):
    """SoftPAG's perturbed joint attention through the DiT ``optimized_attention_override`` (ComfyUI's
    ``[txt, img]`` order, ``skip_reshape`` both ways) equals diffattn's SD3 joint processor (fp32)."""
    from diffattn import attach

    pipe = tiny_pipe("sd3")
    tr = pipe.transformer
    name = "transformer_blocks.0.attn"  # the last block is context_pre_only (no text output)
    module = tr.get_submodule(name)
    heads = {name: u} if isinstance(u, dict) else {name: "all"}
    strength = 1.0 if isinstance(u, dict) else u
    seen, hook = _capture(module)
    g = torch.Generator().manual_seed(0)
    cfg = tr.config
    sample = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    try:
        with torch.no_grad(), attach(tr, SoftPAG(heads, strength=strength, scale=2.0)) as handle, \
                handle.branches(lambda batch: {"perturbed": slice(0, batch)}):
            tr(sample, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=torch.tensor([500.0, 500.0]))
    finally:
        hook.remove()
    x, c = seen["x"], seen["ctx"]
    ref_img, ref_txt = seen["out"]
    b, n_img, n_txt, hn = x.shape[0], x.shape[1], c.shape[1], module.heads
    dh = module.to_q.out_features // hn

    def heads_of(t):
        return t.view(b, -1, hn, dh).transpose(1, 2)

    def norm(f, t):  # the processor's optional q/k norms
        return t if f is None else f(t)

    with torch.no_grad():
        q, k, v = heads_of(module.to_q(x)), heads_of(module.to_k(x)), heads_of(module.to_v(x))
        q, k = norm(module.norm_q, q), norm(module.norm_k, k)
        cq, ck, cv = heads_of(module.add_q_proj(c)), heads_of(module.add_k_proj(c)), heads_of(module.add_v_proj(c))
        cq, ck = norm(module.norm_added_q, cq), norm(module.norm_added_k, ck)
        q, k, v = (torch.cat([t_txt, t_img], dim=2) for t_txt, t_img in ((cq, q), (ck, k), (cv, v)))  # ComfyUI: [txt, img]
        if not skip_reshape:
            q, k, v = A.from_heads(q), A.from_heads(k), A.from_heads(v)
        site = _site("joint_blocks.0", "joint", hn, dh)
        csite = A.ComfySite(site, dit_key=("double", 0))
        spec = {site.name: u} if isinstance(u, dict) else {site.name: "all"}
        engine = A.ComfyEngine([csite], [SoftPAG(spec, strength=strength, scale=2.0)]).attach()
        override = A.attention_override(engine, branch="perturbed")
        opts = {"optimized_attention_override": override, "block_type": "double", "block_index": 0}
        out = wrap_attn(comfy_optimized_attention)(q, k, v, hn, skip_reshape=skip_reshape,
                                                   skip_output_reshape=skip_reshape, transformer_options=opts)
        plain = comfy_optimized_attention(q, k, v, hn, skip_reshape=skip_reshape, skip_output_reshape=skip_reshape)
        assert not torch.allclose(out, plain, atol=1e-4)  # the perturbation did act
        if skip_reshape:
            assert out.shape == (b, hn, n_txt + n_img, dh)
            out = A.from_heads(out)
        txt, img = out[:, :n_txt], out[:, n_txt:]
        img = module.to_out[1](module.to_out[0](img))
        txt = module.to_add_out(txt)
    assert torch.allclose(img, ref_img, atol=1e-5), (img - ref_img).abs().max()
    assert torch.allclose(txt, ref_txt, atol=1e-5), (txt - ref_txt).abs().max()
