"""FLUX.1 and FLUX.1 Kontext: ``FluxTransformer2DModel`` with ``FluxAttnProcessor``,
``[text ‖ image (‖ context)]`` (text first).

Everything diffattn knows about the family: detection, site kinds, the processor, the token
layout, the per-forward record, the ``FluxPipeline`` adapter and the ``FluxKontextPipeline``
in-context editor adapter (:class:`FluxKontextAdapter`, served by :meth:`FluxFamily.editor_adapters`).

Double blocks project text with ``add_*_proj`` and concatenate it *before* the image; single
blocks receive text and image pre-concatenated (the per-forward record carries the text length
from the denoiser's ``encoder_hidden_states``). Kontext's image stream is ``[target ‖ context
image]``; the split is read from ``img_ids`` (context tokens have first coordinate 1). RoPE is
``diffusers.models.embeddings.apply_rotary_emb``. Without an active control the stock
``dispatch_attention_fn`` runs (honouring ``set_attention_backend``); a mask passed as
``joint_attention_kwargs={"attention_mask": m}`` is honoured on both paths.

FLUX.1 is guidance-distilled: ``guidance_scale`` feeds the transformer's guidance embedding and
no unconditional rows run; its latents are packed 2×2 patches ``[B, h/2 · w/2, 4C]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ..errors import ConfigError, ImageInputError
from ..layout import LayoutError, TokenLayout, _check_grid, segments
from ..processors.base import DiffattnProcessor
from .base import Family, PipelineAdapter, RunState, TextBlock
from .sd3 import flow_timesteps


def flux_layout(n_text: int, n_total: int, *, n_context: int = 0, image_grid=None, context_grid=None) -> TokenLayout:
    """FLUX double and single blocks: ``[text ‖ image]`` (text first); FLUX Kontext:
    ``[text ‖ image (target) ‖ context]``, the context tokens last (``img_ids[:, 0] == 1``)."""
    n_image = n_total - n_text - n_context
    if n_image < 0:
        raise LayoutError(f"{n_total} tokens cannot hold {n_text} text and {n_context} context tokens")
    segs = segments(
        ("text", n_text, None),
        ("image", n_image, _check_grid(n_image, image_grid)),
        ("context", n_context, _check_grid(n_context, context_grid)),
    )
    return TokenLayout(segs, segs)


@dataclass(frozen=True)
class FluxRope:
    """FLUX's rotary embedding of one attention call: ``cos``, ``sin`` ``[N, D]`` per token of
    the joint sequence (each rotation pair's angle repeated on both of its channels), as
    ``FluxPosEmbed`` makes them and ``apply_rotary_emb(..., use_real=True)`` applies them."""

    cos: torch.Tensor
    sin: torch.Tensor

    def relocate(self, x: torch.Tensor, seg: slice, source: torch.Tensor) -> torch.Tensor:
        """Tokens ``x`` [H, L, D] of segment ``seg`` whose token p was rotated at position
        ``source[p]`` (its origin), rotated to position p instead.

        RoPE rotations compose by angle, R(θ_p) R(θ_s)⁻¹ = R(θ_p − θ_s), so the already rotated
        key is turned by the angle difference (cos and sin of it from the product formulas);
        at ``source[p] == p`` it is exact identity up to rounding."""
        cos, sin = self.cos[seg].to(x.device), self.sin[seg].to(x.device)  # [L, D]
        src = source.to(x.device)
        cos_d = cos * cos[src] + sin * sin[src]  # cos(θ_p − θ_s)
        sin_d = sin * cos[src] - cos * sin[src]  # sin(θ_p − θ_s)
        return apply_rotary_emb(x[None], (cos_d, sin_d), sequence_dim=2)[0]  # [1, H, L, D] -> [H, L, D]


@dataclass
class FluxInfo:
    """Per-forward record: text tokens at the start of the single-stream sequence; the target
    image's token grid; FLUX Kontext's context-image tokens at the end and their grid."""

    text_len: int = 0
    image_grid: tuple[int, int] | None = None
    context_len: int = 0
    context_grid: tuple[int, int] | None = None


def image_ids_split(ids: torch.Tensor) -> tuple[int, tuple[int, int] | None, tuple[int, int] | None]:
    """(context tokens, target grid, context grid) from FLUX ``img_ids`` ``[N, 3]`` (or ``[B, N, 3]``):
    FLUX Kontext gives the context image first coordinate 1 and appends it after the target."""
    ids = ids[0] if ids.dim() == 3 else ids  # [N, 3] (diffusers drops a batch dim too)
    is_ctx = ids[:, 0] > 0
    n_ctx = int(is_ctx.sum())
    if not n_ctx:
        return 0, _ids_grid(ids), None
    return n_ctx, _ids_grid(ids[~is_ctx]), _ids_grid(ids[is_ctx])


def _ids_grid(ids: torch.Tensor) -> tuple[int, int] | None:
    """``(h, w)`` of FLUX position ids ``[N, 3]`` (row, column in columns 1 and 2)."""
    if ids.shape[0] == 0:
        return None
    h = int(ids[:, 1].max() - ids[:, 1].min()) + 1
    w = int(ids[:, 2].max() - ids[:, 2].min()) + 1
    return (h, w) if h * w == ids.shape[0] else None


def _qkv(attn, hidden_states, encoder_hidden_states):
    """Projections as diffusers' ``_get_qkv_projections`` (fused or not)."""
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        eq = ek = ev = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, eq, ek, ev
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    eq = ek = ev = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq = attn.add_q_proj(encoder_hidden_states)
        ek = attn.add_k_proj(encoder_hidden_states)
        ev = attn.add_v_proj(encoder_hidden_states)
    return query, key, value, eq, ek, ev


def sdpa_mask(mask: torch.Tensor | None, batch: int, n_key: int) -> torch.Tensor | None:
    """A mask as diffusers' native backend passes it to SDPA: ``[B, Nk]`` -> ``[B, 1, 1, Nk]``."""
    if mask is not None and mask.ndim == 2 and mask.shape[0] == batch and mask.shape[1] == n_key:
        return mask.unsqueeze(1).unsqueeze(1)
    return mask


def dispatch_plain(proc, q, k, v, bias=None, parallel_config=None):
    """The stock ``dispatch_attention_fn`` call on ``[B, H, N, D]`` tensors (it takes ``[B, N, H, D]``)."""
    out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, dropout_p=0.0,
                                is_causal=False, backend=proc._attention_backend, parallel_config=parallel_config)
    return out.transpose(1, 2)  # [B, H, N, D]


class FluxProcessor(DiffattnProcessor):
    family = "flux"

    def plain(self, q, k, v, bias=None, parallel_config=None):
        return dispatch_plain(self, q, k, v, bias, self._parallel_config)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, eq, ek, ev = _qkv(attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))  # [B, N, H, D]
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            eq = eq.unflatten(-1, (-1, attn.head_dim))  # [B, N_txt, H, D]
            ek = ek.unflatten(-1, (-1, attn.head_dim))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query = torch.cat([eq, query], dim=1)  # [B, N_txt + N_img, H, D]
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if self.controls:
            n_total = query.shape[1]
            n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None

            def layout():
                info = self.forward_info()
                text = n_txt if n_txt is not None else (info.text_len if info is not None else 0)
                if info is None:
                    return flux_layout(text, n_total)
                return flux_layout(text, n_total, n_context=info.context_len, image_grid=info.image_grid,
                                   context_grid=info.context_grid)

            q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, N, D]
            out = self.attend(q, k, v, layout, bias=sdpa_mask(attention_mask, q.shape[0], k.shape[2]),
                              rope=FluxRope(*image_rotary_emb) if image_rotary_emb is not None else None)
            hidden_states = out.transpose(1, 2)  # [B, N, H, D]
        else:
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                                  backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3)  # [B, N, H*D]
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes([n_txt, hidden_states.shape[1] - n_txt], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxFamily(Family):
    name = "flux"
    condition_arguments = ("encoder_hidden_states", "pooled_projections")  # T5/CLIP tokens, pooled CLIP
    description = "FluxTransformer2DModel (FLUX.1, FLUX.1 Kontext)"
    mirrored = ("FluxAttnProcessor", "FluxAttnProcessor2_0", "FusedFluxAttnProcessor2_0")
    processor = FluxProcessor
    not_batched = frozenset({"img_ids", "txt_ids"})  # position ids: one per sequence, not per row

    def owns(self, model, module) -> bool:
        try:
            from diffusers.models.transformers.transformer_flux import FluxAttention
        except ImportError:  # diffusers < 0.35
            return False
        return isinstance(module, FluxAttention)

    def kind(self, module) -> str:
        return "joint" if getattr(module, "add_q_proj", None) is not None else "single"

    def forward_info(self, config, arguments: dict, cache: dict) -> FluxInfo:
        ehs = arguments.get("encoder_hidden_states")
        info = FluxInfo(text_len=ehs.shape[1] if ehs is not None else 0)
        ids = arguments.get("img_ids")
        if ids is not None:
            if cache.get("ids") is not ids:  # pipelines pass the same tensor every step: analyse it once
                cache["ids"], cache["split"] = ids, image_ids_split(ids)
            info.context_len, info.image_grid, info.context_grid = cache["split"]
        return info

    def adapters(self):
        return (FluxAdapter,)

    def editor_adapters(self):
        """Adapters of the in-context editors of this family (``FluxKontextPipeline``): what a loop
        that feeds the denoiser a context image asks of the pipeline (DeContext's protector).

        Kept apart from :meth:`adapters` on purpose: the text-to-image loops (A-STAR, UAM,
        IR-Diffusion) look adapters up with ``adapter_for`` and must keep refusing an editor."""
        return (FluxKontextAdapter,)

    def text_stream_blocks(self, model) -> list[tuple[str, tuple[int, ...], str]]:
        """The blocks that pass a text stream on, in execution order: ``(module name, positions
        of the stream in the block's output, kind)``. Double blocks return ``(text, image)``
        (the text at 0); single blocks return ``(text, image)`` split from one stream, both
        positions listed (contextual repulsion may take all their tokens)."""
        double = [(f"transformer_blocks.{i}", (0,), "double") for i in range(len(model.transformer_blocks))]
        single = [(f"single_transformer_blocks.{i}", (0, 1), "single")
                  for i in range(len(model.single_transformer_blocks))]
        return double + single


class FluxAdapter(PipelineAdapter):
    """``FluxPipeline``: T5 text keys (CLIP gives the pooled vector), the guidance embedding in
    place of CFG, packed 2×2 latents with position ids, FLUX's σ grid and dynamic shift."""

    name = "flux"
    family = "flux"
    pipeline_names = ("FluxPipeline",)
    solver = "flow"
    distilled = True
    default_max_sequence_length = 512
    denoiser_attr = "transformer"
    joint_attention = True
    flux_sigmas = True

    @classmethod
    def pipeline_classes(cls):
        from diffusers import FluxPipeline

        return (FluxPipeline,)

    @property
    def patch(self) -> int:
        return 2  # FluxPipeline packs 2×2 latent patches into one token

    @property
    def latent_channels(self) -> int:
        """Channels C of the spatial latents: the transformer's input channels over the 2×2 packing."""
        return self.denoiser.config.in_channels // 4

    def fit_size(self, height, width):
        """FluxPipeline's latents hold whole 2×2 patches: the image floors to 2·VAE multiples."""
        unit = self.size_unit
        return height // unit * unit, width // unit * unit

    def encode_prompt(self, prompts, negative_prompt=None, *, num_images_per_prompt=1, cfg=False,
                      max_sequence_length=None, clip_skip=None):
        cond, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=self.default_max_sequence_length if max_sequence_length is None else max_sequence_length)
        return {"encoder_hidden_states": cond, "pooled_projections": pooled}, None  # guidance-distilled: no uncond rows

    def text_blocks(self):
        return {"t5": TextBlock(self.pipe.tokenizer_2, False, 0, truncated=True)}

    def missing_text_block(self, keys):
        return (f"text_keys={keys!r}: FLUX's text keys are T5 tokens (CLIP gives only a pooled vector); use 't5' "
                f"or 'auto'")

    @property
    def default_text_keys(self) -> str:
        return "t5"

    def word_swap_tokenizers(self):
        return [self.pipe.tokenizer_2]  # FLUX's keys are T5 tokens; CLIP gives only the pooled vector

    def text_attention_sites(self, all_sites):
        return [s.name for s in all_sites if s.kind in ("joint", "single")], None

    def timesteps(self, num_steps, height, width):
        return flow_timesteps(self, num_steps, height, width)

    def prepare_latents(self, run: RunState, batch, height, width, dtype, generator=None, latents=None):
        latents, run.image_ids = self.pipe.prepare_latents(batch, self.latent_channels, height, width,
                                                           dtype, self.device, generator, latents)
        return latents  # packed [B, h/2 · w/2, 4C]

    def pack(self, run: RunState, z):
        """[B, C, h, w] -> [B, (h/2)(w/2), 4C] with FluxPipeline's own ``_pack_latents``; sets the
        image tokens' position ids for that grid."""
        tokens, run.image_ids = self.pack_target(z)
        return tokens

    def pack_target(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [B, C, h, w] -> (tokens [B, (h/2)(w/2), 4C], position ids [(h/2)(w/2), 3]) of the
        generated (target) image: the pipeline's own ``_pack_latents`` and
        ``_prepare_latent_image_ids`` (first coordinate 0; row, column)."""
        B, C, h, w = z.shape
        ids = self.pipe._prepare_latent_image_ids(B, h // 2, w // 2, self.device, self.denoiser.dtype)  # [N, 3]
        return self.pipe._pack_latents(z, B, C, h, w), ids  # [B, (h/2)(w/2), 4C]

    def unpack(self, x, height, width):
        return self.pipe._unpack_latents(x, height, width, self.vae_factor)  # [B, C, h, w]

    def predict(self, run: RunState, x, t, cond, guidance=None):
        model = self.denoiser
        return self._forward(x, run.image_ids, t.expand(x.shape[0]).to(x.dtype) / 1000,  # FluxPipeline's order
                             cond["encoder_hidden_states"].to(model.dtype), cond["pooled_projections"].to(model.dtype),
                             guidance)

    def _forward(self, hidden, img_ids, timestep, text, pooled, guidance=None) -> torch.Tensor:
        """One transformer forward as FluxPipeline calls it (zero text ids; the guidance embedding,
        default 1, for models that have one) -> its output tokens."""
        model, b = self.denoiser, hidden.shape[0]
        g = None
        if model.config.guidance_embeds:
            g = torch.full([1], float(1.0 if guidance is None else guidance), device=self.device,
                           dtype=torch.float32).expand(b)
        return model(hidden_states=hidden, timestep=timestep, guidance=g, pooled_projections=pooled,
                     encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3, device=text.device,
                                                                     dtype=text.dtype),
                     img_ids=img_ids, return_dict=False)[0]


class FluxKontextAdapter(FluxAdapter):
    """``FluxKontextPipeline`` (FLUX.1 Kontext), the in-context editor: FLUX whose image stream is
    ``[target ‖ context image]``. Besides the text-to-image contract of :class:`FluxAdapter`
    (Kontext without an image generates as FLUX), what a loop that feeds the editor a context
    image needs, each part as ``FluxKontextPipeline.__call__`` does it:

    - :meth:`encode_image`: pixels -> the context latents (``_encode_vae_image``), differentiable;
    - :meth:`pack_context` / :meth:`pack_target`: 2×2 packing and position ids (the context's
      first coordinate 1, which the token layout reads to split ``image`` from ``context``);
    - :meth:`predict_with_context`: one denoiser forward on ``[target ‖ context]`` tokens -> the
      target tokens' velocity;
    - :attr:`context_size_unit`, :meth:`check_context_size`, :meth:`latent_hw`: the pipeline's
      floor of the sides to multiples of 2 × its VAE factor (and its ``_auto_resize``).

    Served through :meth:`FluxFamily.editor_adapters` (not ``adapters()``), so ``adapter_for``'s
    text-to-image loops keep refusing an editor."""

    name = "flux_kontext"
    pipeline_names = ("FluxKontextPipeline (FLUX.1 Kontext, or the tiny one of "
                      "diffattn.tiny.tiny_pipeline('flux_kontext'))",)
    in_context = True  # feeds the denoiser a context image beside the generated one

    @classmethod
    def pipeline_classes(cls):
        try:
            from diffusers import FluxKontextPipeline
        except ImportError:  # diffusers < 0.34
            return ()
        return (FluxKontextPipeline,)

    def prepare_latents(self, run: RunState, batch, height, width, dtype, generator=None, latents=None):
        """Kontext's ``prepare_latents`` without a context image (its first argument): the
        packed noise [B, h/2 · w/2, 4C]; sets ``run.image_ids``."""
        latents, _, run.image_ids, _ = self.pipe.prepare_latents(None, batch, self.latent_channels, height, width,
                                                                 dtype, self.device, generator, latents)
        return latents

    # ------------------------------------------------------------------ sizes
    @property
    def context_size_unit(self) -> int:
        """The context image's sides must be multiples of this many pixels: 2 × the VAE factor
        (``FluxKontextPipeline`` floors them to it, since latents are packed in 2×2 patches)."""
        return self.size_unit

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """The spatial latent ``(h, w)`` of a ``height × width`` image, floored to whole 2×2
        patches as ``FluxKontextPipeline.prepare_latents`` does: ``2 · ⌊side / (2f)⌋``."""
        f = self.vae_factor
        return 2 * (height // (f * 2)), 2 * (width // (f * 2))

    def check_context_size(self, height: int, width: int, what: str = "image") -> None:
        """``ImageInputError`` for a context image whose sides the editor would resample,
        explaining its rounding and the crop that avoids it."""
        u = self.context_size_unit
        if height % u or width % u or height < u or width < u:
            fit_w, fit_h = max(u, width // u * u), max(u, height // u * u)
            raise ImageInputError(
                f"{what} is {width}x{height} pixels; {type(self.pipe).__name__} floors the context image's sides to "
                f"multiples of {u} px (2 × its VAE factor {u // 2}: latents are packed in 2×2 patches) and, with "
                f"_auto_resize=True (its default), first resizes it to the nearest preferred Kontext resolution, so a "
                f"perturbation made at {width}x{height} would be resampled. Crop it to {fit_w}x{fit_h} "
                f"(image.crop((0, 0, {fit_w}, {fit_h}))) and edit with _auto_resize=False")

    # ------------------------------------------------------------------ the context image
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [0, 1] -> the editor's image latents [B, C, h, w]: the VAE
        posterior's mode, then (z − shift)·scale (``FluxKontextPipeline._encode_vae_image`` with
        ``sample_mode="argmax"``); differentiable in x."""
        vae = self.pipe.vae
        z = vae.encode((x * 2 - 1).to(self.device, vae.dtype)).latent_dist.mode()  # [B, C, h, w]
        return self.to_latents(z)

    def pack_context(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context latents [B, C, h, w] -> (tokens [B, (h/2)(w/2), 4C], position ids [(h/2)(w/2), 3]):
        as :meth:`pack_target`, with first coordinate 1 (``prepare_latents``' ``image_ids``)."""
        tokens, ids = self.pack_target(z)
        ids[..., 0] = 1
        return tokens, ids

    def predict_with_context(self, run: RunState | None, target: torch.Tensor, target_ids: torch.Tensor | None,
                             context: torch.Tensor, context_ids: torch.Tensor, t, cond: dict,
                             guidance: float | None = None) -> torch.Tensor:
        """One denoiser forward on ``[target ‖ context]`` tokens, as ``FluxKontextPipeline.__call__``
        runs it -> the target tokens' velocity [B, N_tgt, 4C].

        target [B, N_tgt, 4C] with ``target_ids`` [N_tgt, 3] (``None``: ``run.image_ids``);
        context [B, N_ctx, 4C] with ``context_ids`` [N_ctx, 3] (:meth:`pack_context`);
        t: the flow time in [0, 1] the transformer takes (the scheduler's timestep / 1000; a
        float or a tensor); cond: :meth:`encode_prompt`'s conditional dict (one row is
        broadcast to B); guidance: the guidance embedding (``None``: ``run.guidance``, else 1),
        for models that have one."""
        model, b = self.denoiser, target.shape[0]
        if target_ids is None:
            if run is None or getattr(run, "image_ids", None) is None:
                raise ConfigError("predict_with_context(target_ids=None) takes the ids from run.image_ids, but no run "
                                  "with image ids was given; pass target_ids from pack_target()")
            target_ids = run.image_ids
        if float(t.max() if torch.is_tensor(t) else t) > 1.0:
            raise ConfigError(f"predict_with_context(t={float(t.max() if torch.is_tensor(t) else t):g}): t is the flow "
                              f"time in [0, 1] the transformer takes; pass the scheduler's timestep / 1000")
        if guidance is None and run is not None:
            guidance = run.guidance
        text = cond["encoder_hidden_states"].to(model.dtype)
        pooled = cond["pooled_projections"].to(model.dtype)
        if text.shape[0] not in (1, b):
            raise ConfigError(f"predict_with_context: the condition has {text.shape[0]} rows for {b} target rows; "
                              f"give one row (broadcast) or one per target row")
        if text.shape[0] != b:
            text, pooled = text.expand(b, -1, -1), pooled.expand(b, -1)  # one condition row for every target row
        hidden = torch.cat([target.to(model.dtype), context.to(model.dtype)], dim=1)  # [B, N_tgt + N_ctx, 4C]
        ids = torch.cat([target_ids, context_ids], dim=0)  # [N_tgt + N_ctx, 3]
        timestep = (t.to(self.device, model.dtype).expand(b) if torch.is_tensor(t)
                    else torch.full([b], float(t), device=self.device, dtype=model.dtype))
        out = self._forward(hidden, ids, timestep, text, pooled, guidance)  # [B, N_tgt + N_ctx, 4C]
        return out[:, : target.shape[1]]
