"""The only ComfyUI-specific attention code: ComfyUI's call convention <-> an AttentionCall.

ComfyUI (Comfy-Org/ComfyUI @ 82997188568abe525d2b961fa2d4feae8f98f843, read from
``comfy/ldm/modules/attention.py``, ``comfy/model_patcher.py``, ``comfy_extras/nodes_pag.py``)
calls attention in two ways this module serves:

- an ``attn1`` / ``attn2`` *replace patch* of a UNet ``BasicTransformerBlock``:
  ``patch(q, k, v, extra_options) -> out`` with ``q, k, v`` the ``to_q / to_k / to_v``
  projections ``[B, N, H·D]`` and ``extra_options`` holding ``n_heads``, ``dim_head``,
  ``block`` (``("input" | "middle" | "output", id)``), ``block_index`` (the transformer
  block inside it), ``cond_or_uncond``, ``sigmas``...; the patch returns ``[B, Nq, H·D]``;
- an ``optimized_attention_override`` in ``transformer_options``: ``override(func, q, k, v,
  heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
  transformer_options=..., **kw)`` where ``func`` is the attention ComfyUI would have run;
  ``skip_reshape`` means q/k/v come as ``[B, H, N, D]``, ``skip_output_reshape`` that the
  output stays ``[B, H, N, D]``. DiT models name the block through ``transformer_options``
  (``block_type`` "double" / "single", ``block_index``).

Either way :func:`comfy_attention` turns the tensors into ``[B, H, N, D]``, builds an
:class:`~diffattn.controls.AttentionCall` and runs the controls exactly as the diffusers
processors do (:func:`diffattn.processors.base.run_controls`: the same method functions and
the same ``diffattn.kernels.attention``), and turns the output back.

:func:`comfy_sites` lists a ComfyUI diffusion model's attention sites as
:class:`~diffattn.sites.Site` s, so selectors, head specs and the method controls' own site
resolution work on ComfyUI models: UNet sites are named by ComfyUI's module paths
(``input_blocks.4.1.transformer_blocks.0.attn1``, ``middle_block.1...``,
``output_blocks.3.1...``) and carry the d/m/u alias (``d2.0``, ``m0.0``, ``u3.0``; the same
convention as diffusers sites), DiT sites are ``joint_blocks.{i}`` (SD3),
``double_blocks.{i}`` / ``single_blocks.{i}`` (FLUX).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..controls import AttentionCall, StepState
from ..errors import UnsupportedModelError
from ..layout import TokenLayout, segments
from ..processors.base import run_controls
from ..sites import Site

FAMILY = "comfy"
UNET_PARTS = (("input_blocks", "input", "d"), ("middle_block", "middle", "m"), ("output_blocks", "output", "u"))


# ----------------------------------------------------------------------------- tensors


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's ``[B, N, H·D]`` -> ``[B, H, N, D]`` (as its ``attention_pytorch`` reshapes)."""
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H·D]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def mask_to_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """ComfyUI's attention mask (additive float or boolean, ``[Nq, Nk]``, ``[B, Nq, Nk]`` or
    ``[B, H, Nq, Nk]``) as a bias broadcastable to ``[B, H, Nq, Nk]`` (the unsqueezes of its
    ``attention_pytorch``)."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask


# ----------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class ComfySite:
    """A site plus where ComfyUI addresses it: ``patch_key`` for a UNet replace patch
    (``(block name, id, transformer index)``, attn ``"attn1"`` / ``"attn2"``), or the DiT
    ``(block_type, block_index)`` of ``transformer_options``."""

    site: Site
    attn: str | None = None  # "attn1" | "attn2" (UNet); None (DiT)
    patch_key: tuple | None = None  # UNet: (block name, id, transformer index)
    dit_key: tuple | None = None  # DiT: (block_type, block_index)


def _unet_sites(dm) -> list[ComfySite]:
    out, running = [], 0
    for attr, block_name, letter in UNET_PARTS:
        part = getattr(dm, attr, None)
        if part is None:
            continue
        blocks = [part] if attr == "middle_block" else list(part)
        counter = 0
        for idx, block in enumerate(blocks):
            layers = list(block) if hasattr(block, "__iter__") else [block]
            found = False
            for j, layer in enumerate(layers):
                tbs = getattr(layer, "transformer_blocks", None)
                if tbs is None:
                    continue
                found = True
                bid = 0 if attr == "middle_block" else idx
                for t, tb in enumerate(tbs):
                    alias = f"{letter}{counter}.{t}"
                    base = f"{attr}.{j}" if attr == "middle_block" else f"{attr}.{idx}.{j}"
                    for attn, kind in (("attn1", "self"), ("attn2", "cross")):
                        mod = getattr(tb, attn, None)
                        if mod is None:
                            continue
                        if attn == "attn1" and getattr(tb, "disable_self_attn", False):
                            kind = "cross"
                        heads = int(getattr(mod, "heads"))
                        head_dim = int(getattr(mod, "dim_head", 0) or mod.to_q.out_features // heads)
                        site = Site(f"{base}.transformer_blocks.{t}.{attn}", FAMILY, kind, running, heads, head_dim,
                                    alias=alias, module=mod)
                        out.append(ComfySite(site, attn, (block_name, bid, t)))
                    running += 1
            if found:
                counter += 1
    return out


def _heads_of(block) -> tuple[int, int] | None:
    for path in ("num_heads", "attn.num_heads", "x_block.attn.num_heads", "img_attn.num_heads"):
        obj = block
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, int):
            hidden = getattr(block, "hidden_size", None) or getattr(getattr(block, "x_block", None), "attn", None)
            dim = None
            if isinstance(hidden, int):
                dim = hidden // obj
            else:
                qkv = getattr(getattr(getattr(block, "x_block", block), "attn", block), "qkv", None)
                if qkv is not None and hasattr(qkv, "out_features"):
                    dim = qkv.out_features // 3 // obj
            return obj, int(dim or 0)
    return None


def _dit_sites(dm) -> list[ComfySite]:
    out, running = [], 0
    for attr, kind, block_type in (("joint_blocks", "joint", "double"), ("double_blocks", "joint", "double"),
                                   ("single_blocks", "single", "single")):
        for i, block in enumerate(getattr(dm, attr, None) or ()):
            hd = _heads_of(block)
            if hd is None:
                continue
            site = Site(f"{attr}.{i}", FAMILY, kind, running, hd[0], hd[1], module=block)
            out.append(ComfySite(site, None, None, (block_type, i)))
            running += 1
    return out


def comfy_sites(diffusion_model) -> list[ComfySite]:
    """The attention sites of a ComfyUI diffusion model (``model.get_model_object(
    "diffusion_model")``): UNet ``SpatialTransformer`` blocks, or DiT joint / double / single
    blocks. Another model is an :class:`~diffattn.errors.UnsupportedModelError`."""
    found = _unet_sites(diffusion_model) or _dit_sites(diffusion_model)
    if not found:
        raise UnsupportedModelError(
            f"{type(diffusion_model).__name__}: no ComfyUI UNet (input_blocks/middle_block/output_blocks with "
            f"SpatialTransformers) or DiT (joint_blocks, double_blocks, single_blocks) attention found")
    return found


_BLOCK_NAME = re.compile(r"(?<![\w.])(input|middle|output)[ _.]?(\d+)(?:\.(\d+))?(?![\w.-])")


def _block_path(m: re.Match) -> str:
    part, bid, t = m.groups()
    path = "middle_block" if part == "middle" else f"{part}_blocks.{bid}"
    return path if t is None else f"{path}.**.transformer_blocks.{t}"


def comfy_selector(text: str) -> str:
    """ComfyUI block names in a selector or a heads text (``input 4``, ``middle 0``,
    ``output 3.1``) as site paths (``input_blocks.4``, ``middle_block``,
    ``output_blocks.3.**.transformer_blocks.1``); everything else unchanged.

    Only the selector part of each ``;``-separated item is translated (what comes before
    its ``:``; the heads after it are left alone), and every separator is kept, so the heads
    language passes through: ``"input 4: 0,3; u1: 1=0.5"`` ->
    ``"input_blocks.4: 0,3; u1: 1=0.5"``. A JSON object is returned as it is."""
    if text.lstrip().startswith("{"):
        return text
    out = []
    for item in re.split(r"(;)", text):
        selector, sep, heads = item.partition(":")
        out.append(_BLOCK_NAME.sub(_block_path, selector) + sep + heads)
    return "".join(out)


class ComfyEngine:
    """What a control reads from its engine (``sites``, ``per_site``, ``context``), for
    controls used inside ComfyUI's sampling: no diffusers model, no hooks."""

    def __init__(self, csites: list[ComfySite], controls=()):
        self.csites = list(csites)
        self.sites = [c.site for c in self.csites]
        self.controls = tuple(controls)
        self.context = None
        self.models = []
        self.per_site: dict[str, tuple] = {}

    def attach(self) -> "ComfyEngine":
        """Resolve each control's sites (its ``on_attach``), as ``diffattn.attach`` does."""
        from ..sites import select

        for c in self.controls:
            c._diffattn_engine = self
            c.on_attach(self)
        per_site = {s.name: [] for s in self.sites}
        for c in self.controls:
            chosen = [s for s in self.sites if c.sites(s)] if callable(c.sites) else select(self.sites, c.sites)
            for s in chosen:
                per_site[s.name].append(c)
        self.per_site = {n: tuple(sorted(cs, key=lambda c: c.order)) for n, cs in per_site.items()}
        return self

    def active_sites(self) -> list[ComfySite]:
        return [c for c in self.csites if self.per_site.get(c.site.name)]


# ----------------------------------------------------------------------------- the call


def comfy_layout(site: Site, n_q: int, n_k: int, text_tokens: int | None = None, text_first: bool = True):
    """The token layout of a ComfyUI call: UNet self (image × image) / cross (image × text);
    DiT joint sequences with ``text_tokens`` text tokens first (ComfyUI concatenates
    ``[txt, img]``) when known."""
    if site.kind == "cross":
        return TokenLayout(segments(("image", n_q, None)), segments(("text", n_k, None)))
    if site.kind in ("joint", "single") and text_tokens:
        segs = segments(("text", text_tokens, None), ("image", n_q - text_tokens, None)) if text_first else \
            segments(("image", n_q - text_tokens, None), ("text", text_tokens, None))
        return TokenLayout(segs, segs)
    segs = segments(("image", n_q, None))
    return TokenLayout(segs, segs)


def comfy_attention(controls, site: Site, q, k, v, heads: int, *, mask=None, skip_reshape: bool = False,
                    skip_output_reshape: bool | None = None, branches: dict | None = None,
                    step: StepState | None = None, text_tokens: int | None = None, scale: float | None = None,
                    order: list[int] | None = None):
    """Attention in ComfyUI's convention through diffattn controls.

    q, k, v: ``[B, N, H·D]`` (or ``[B, H, N, D]`` with ``skip_reshape``); ``heads``: H;
    ``mask``: ComfyUI's attention mask; ``branches``: ``{name: rows}`` (default every row is
    ``cond``; SoftPAG's perturbed pass passes ``{"perturbed": slice(0, B)}``). Returns
    ``[B, Nq, H·D]``, or ``[B, H, Nq, D]`` with ``skip_output_reshape`` (default: the input's
    form); ``order``: the batch rows in the order ``branches`` refers to (:func:`batch_order`),
    the output coming back in the input's order.
    """
    if skip_output_reshape is None:
        skip_output_reshape = skip_reshape
    if not skip_reshape:
        q, k, v = to_heads(q, heads), to_heads(k, heads), to_heads(v, heads)
    if order is not None:
        idx = torch.as_tensor(order, device=q.device)
        q, k, v = q[idx], k[idx], v[idx]
        if mask is not None and mask.ndim >= 3 and mask.shape[0] == len(order) > 1:
            mask = mask[idx]
    n_q, n_k = q.shape[2], k.shape[2]
    call = AttentionCall(site, lambda: comfy_layout(site, n_q, n_k, text_tokens), q, k, v,
                         step if step is not None else StepState(), branches, scale=scale)
    call.spec.bias = mask_to_bias(mask)
    active = [c for c in controls if c.is_active(call)]
    if not active:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=call.spec.bias, scale=scale)
    else:
        out = run_controls(call, active)
    if order is not None:
        out = out[torch.argsort(idx)]
    return out if skip_output_reshape else from_heads(out)


def step_from(extra_options: dict) -> StepState:
    """The :class:`~diffattn.controls.StepState` of a ComfyUI call from its ``sigmas`` and
    ``sample_sigmas`` (step index = the position of sigma in the schedule)."""
    sigmas = extra_options.get("sigmas")
    sigma = float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else None
    schedule = extra_options.get("sample_sigmas")
    index, total = 0, None
    if isinstance(schedule, torch.Tensor) and sigma is not None and schedule.numel():
        total = max(int(schedule.numel()) - 1, 1)
        index = int((schedule.float() - sigma).abs().argmin())
    return StepState(index=index, sigma=sigma, num_steps=total)


def _chunk_kinds(extra_options: dict, batch: int):
    """``(chunk size, [branch of each chunk])`` of ComfyUI's ``cond_or_uncond`` (0 = cond,
    1 = uncond; the batch is ``len(cond_or_uncond)`` equal chunks in that order), or ``None``
    when the call carries none. A batch that does not split evenly is a ControlError."""
    from ..errors import ControlError

    cou = extra_options.get("cond_or_uncond")
    if not cou:
        return None
    if batch % len(cou):
        raise ControlError(f"ComfyUI's cond_or_uncond {list(cou)} names {len(cou)} chunks, but the attention call "
                           f"has {batch} batch rows (not a multiple of {len(cou)}): cannot tell which rows are "
                           f"cond and which uncond")
    return batch // len(cou), ["cond" if c == 0 else "uncond" for c in cou]


def batch_order(extra_options: dict, batch: int, forced: str | None = None) -> list[int] | None:
    """The row order that puts all rows of each branch together (branches in the order they
    first appear in ``cond_or_uncond``), or ``None`` when they are together already (e.g.
    ``[0, 1]``, ``[0, 0, 1]``); ``[0, 1, 0]`` needs ``[cond rows..., uncond rows...]``.
    :func:`comfy_attention` runs the controls on the batch in this order and restores
    ComfyUI's order after."""
    if forced is not None:
        return None
    found = _chunk_kinds(extra_options, batch)
    if found is None:
        return None
    chunk, kinds = found
    names = list(dict.fromkeys(kinds))
    order = [i * chunk + r for name in names for i, k in enumerate(kinds) if k == name for r in range(chunk)]
    return None if order == list(range(batch)) else order


def branches_from(extra_options: dict, batch: int, forced: str | None = None) -> dict:
    """``{branch: rows}`` from ComfyUI's ``cond_or_uncond`` (0 = cond, 1 = uncond; the batch
    is split into equal chunks in that order): every row of each kind, as one slice of the
    batch in :func:`batch_order` (ComfyUI's own order when the kinds are contiguous, e.g.
    ``[0, 0, 1]`` -> cond rows 0..2c, uncond 2c..3c); ``forced`` names every row one branch.
    A batch not divisible into the chunks is a :class:`~diffattn.errors.ControlError`."""
    if forced is not None:
        return {forced: slice(0, batch)}
    found = _chunk_kinds(extra_options, batch)
    if found is None:
        return {"cond": slice(0, batch)}
    chunk, kinds = found
    out: dict = {}
    start = 0
    for name in dict.fromkeys(kinds):
        n = chunk * kinds.count(name)
        out[name] = slice(start, start + n)
        start += n
    return out


def replace_patch(engine: ComfyEngine, csite: ComfySite, *, branch: str | None = None):
    """A ComfyUI ``attn1`` / ``attn2`` replace patch ``(q, k, v, extra_options) -> out`` running
    the controls of ``csite`` through :func:`comfy_attention`."""
    controls = engine.per_site.get(csite.site.name, ())
    site = csite.site

    def patch(q, k, v, extra_options, mask=None):
        heads = int(extra_options.get("n_heads", site.heads))
        return comfy_attention(controls, site, q, k, v, heads, mask=mask,
                               branches=branches_from(extra_options, q.shape[0], branch),
                               order=batch_order(extra_options, q.shape[0], branch),
                               step=step_from(extra_options))

    patch.diffattn_site = site.name
    return patch


def attention_override(engine: ComfyEngine, *, branch: str | None = None, previous=None):
    """An ``optimized_attention_override`` for DiT models: calls at the engine's active
    ``(block_type, block_index)`` run the controls; others go to ``previous`` (an override
    already installed) or ComfyUI's own ``func``."""
    by_key = {c.dit_key: c for c in engine.active_sites() if c.dit_key is not None}

    def override(func, q, k, v, heads, mask=None, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        key = (to.get("block_type", "double"), to.get("block_index"))
        csite = by_key.get(key)
        if csite is None:
            if previous is not None:
                return previous(func, q, k, v, heads, mask, *args, **kwargs)
            return func(q, k, v, heads, mask, *args, **kwargs)
        return comfy_attention(engine.per_site[csite.site.name], csite.site, q, k, v, heads, mask=mask,
                               skip_reshape=kwargs.get("skip_reshape", False),
                               skip_output_reshape=kwargs.get("skip_output_reshape", False),
                               branches=branches_from(to, q.shape[0], branch),
                               order=batch_order(to, q.shape[0], branch), step=step_from(to),
                               scale=kwargs.get("scale"))

    return override
