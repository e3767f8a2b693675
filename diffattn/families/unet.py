"""UNets: ``UNet2DConditionModel`` (SD1.5, SD2, SDXL) with ``AttnProcessor2_0``.

Everything diffattn knows about the family: detection, site kinds and the d/m/u aliases, the
processor, the token layout, the per-forward record, and the adapters of
``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline``.

``attn1`` is image self-attention, ``attn2`` image queries × text keys. The processor mirrors
everything the stock one does: spatial norm, 4D inputs, group norm, ``norm_cross``, masks
through ``attn.prepare_attention_mask`` (the UNet passes ``encoder_attention_mask`` to
``attn2`` this way), q/k norm, residual connection and ``rescale_output_factor``. Like the
stock processor it uses SDPA's default scale 1/sqrt(D) (``attn.scale`` is not applied there
either).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..layout import TokenLayout, _check_grid, segments
from ..processors.base import DiffattnProcessor
from .base import Family, PipelineAdapter, RunState, TextBlock, latent_stats
from .sd3 import LatentInfo


def unet_layout(n_query: int, n_key: int, *, cross: bool, grid: tuple[int, int] | None) -> TokenLayout:
    """UNet ``attn1``: image × image; ``attn2``: image queries × text keys. ``grid`` is the
    ``(h, w)`` of this UNet level (from :func:`~diffattn.layout.grid_shape` of the latent)."""
    image = segments(("image", n_query, _check_grid(n_query, grid)))
    return TokenLayout(image, segments(("text", n_key, None)) if cross else image)


class UNetProcessor(DiffattnProcessor):
    family = "unet"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # [B, HW, C]
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)  # [B*H, Nq|1, Nk]
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])  # [B, H, Nq|1, Nk]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, Nq, D]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, Nk, D]
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, Nk, D]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.controls:
            n_q, n_k = query.shape[2], key.shape[2]
            grid = (height, width) if input_ndim == 4 else None

            def layout():
                g = grid
                if g is None:
                    info = self.forward_info()
                    g = info.image_grid(n_q) if info is not None else None
                return unet_layout(n_q, n_k, cross=is_cross, grid=g)

            hidden_states = self.attend(query, key, value, layout, bias=attention_mask)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                           is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # [B, Nq, H*D]
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)  # [B, C, H, W]
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


_UNET_PARTS = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _ints(name: str) -> tuple[int, ...]:
    return tuple(int(c) for c in name.split(".") if c.isdigit())


def _unet_order(name: str):
    """Forward-order sort key of a UNet site: down blocks, mid block, up blocks."""
    return (_UNET_PARTS.get(name.split(".")[0], 3), _ints(name), name.rsplit(".", 1)[-1])


class UNetFamily(Family):
    name = "unet"
    description = "UNet2DConditionModel (SD1.5, SDXL)"
    mirrored = ("AttnProcessor2_0", "AttnProcessor", "FusedAttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU")
    processor = UNetProcessor

    def owns(self, model, module) -> bool:
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import Attention

        return isinstance(module, Attention) and isinstance(model, UNet2DConditionModel)

    def kind(self, module) -> str:
        return "cross" if module.is_cross_attention else "self"

    def blocks(self, entries):
        """Forward order, the running ``BasicTransformerBlock`` index over the whole UNet and
        the d/m/u alias (the ComfyUI block-list convention, see :mod:`diffattn.sites`)."""
        entries = sorted(entries, key=lambda e: _unet_order(e[0]))
        blocks: dict[str, int] = {}  # BasicTransformerBlock path -> running index
        groups: dict[str, tuple[str, int]] = {}  # ".attentions.A" path -> (letter, index in part)
        per_part: dict[str, int] = {}
        out = []
        for name, module in entries:
            comps = name.split(".")
            block = blocks.setdefault(name.rsplit(".", 1)[0], len(blocks))
            alias = None
            if "attentions" in comps and "transformer_blocks" in comps:
                group_path = ".".join(comps[: comps.index("attentions") + 2])
                if group_path not in groups:
                    letter = {"down_blocks": "d", "mid_block": "m", "up_blocks": "u"}.get(comps[0])
                    if letter is not None:
                        groups[group_path] = (letter, per_part.get(letter, 0))
                        per_part[letter] = per_part.get(letter, 0) + 1
                if group_path in groups:
                    letter, index = groups[group_path]
                    alias = f"{letter}{index}.{comps[comps.index('transformer_blocks') + 1]}"
            out.append((name, module, block, alias))
        return out

    def forward_info(self, config, arguments: dict, cache: dict) -> LatentInfo:
        return LatentInfo(tuple(arguments["sample"].shape[-2:]))

    def adapters(self):
        return (SDXLAdapter, SDAdapter)


# ----------------------------------------------------------------------------- levels


def unet_site_factor(name: str, n_levels: int) -> int | None:
    """Downsampling factor of the UNet level a site runs at: ``down_blocks.i`` 2^i,
    ``mid_block`` 2^(n-1), ``up_blocks.j`` 2^(n-1-j)."""
    part, _, rest = name.partition(".")
    if part == "mid_block":
        return 2 ** (n_levels - 1)
    if part in ("down_blocks", "up_blocks"):
        i = int(rest.split(".")[0])
        return 2 ** i if part == "down_blocks" else 2 ** (n_levels - 1 - i)
    return None


def default_unet_factor(cross_sites, n_levels: int) -> int:
    """The UNet level whose cross-attention maps localise concepts, scaled to the model.

    On SD1.x (latent 64, levels 64/32/16/8) Attend-and-Excite uses 16×16, latent/4, and on
    SDXL 32×32 = latent/4. Rule: among the levels with at least two cross-attention sites
    outside the mid block, the factor closest to 4 (log scale), ties to the finer level. SD1.x,
    SD2, SDXL: 4; the tiny testbed UNet (levels 16/8/4, the 4×4 level only in the mid block): 2.
    """
    counts: dict[int, int] = {}
    for s in cross_sites:
        if not s.name.startswith("mid_block"):
            f = unet_site_factor(s.name, n_levels)
            if f is not None:
                counts[f] = counts.get(f, 0) + 1
    if not counts:
        raise UnsupportedModelError("this UNet has no cross-attention outside the mid block; pass AStarConfig(sites=...)")
    good = [f for f, n in counts.items() if n >= 2] or list(counts)
    return min(good, key=lambda f: (abs(math.log2(f) - 2), f))


# ----------------------------------------------------------------------------- pipelines


class SDAdapter(PipelineAdapter):
    """``StableDiffusionPipeline`` (SD1.x, SD2.x): CLIP text, CFG in one batch, ε or v."""

    name = "sd"
    family = "unet"
    pipeline_names = ("StableDiffusionPipeline (SD1.x, SD2.x)",)
    solver = "ddim"
    upcast_vae = True

    @classmethod
    def pipeline_classes(cls):
        from diffusers import StableDiffusionPipeline

        return (StableDiffusionPipeline,)

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def native_size(self):
        s = int(self.denoiser.config.sample_size) * self.vae_factor
        return s, s

    @property
    def size_unit(self) -> int:
        """The VAE factor times the UNet's downsampling (2 per level after the first)."""
        return self.vae_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def encode_prompt(self, prompts, negative_prompt=None, *, num_images_per_prompt=1, cfg=False,
                      max_sequence_length=None, clip_skip=None):
        cond, uncond = self.pipe.encode_prompt(prompts, self.device, num_images_per_prompt, cfg, negative_prompt,
                                               clip_skip=clip_skip)
        return {"encoder_hidden_states": cond}, ({"encoder_hidden_states": uncond} if cfg else None)

    def text_blocks(self):
        return {"clip": TextBlock(self.pipe.tokenizer, True, 0)}

    def missing_text_block(self, keys):
        return f"text_keys={keys!r}: this {self.name.upper()} UNet has CLIP text keys only; use 'clip' or 'auto'"

    def text_attention_sites(self, all_sites):
        from ..sites import select

        n_levels = len(self.denoiser.config.block_out_channels)
        cross = select(all_sites, "cross")
        factor = default_unet_factor(cross, n_levels)
        return [s.name for s in cross if unet_site_factor(s.name, n_levels) == factor], factor

    def timesteps(self, num_steps, height, width):
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        timesteps, _ = retrieve_timesteps(self.pipe.scheduler, num_steps, self.device)
        return timesteps

    def scale_model_input(self, x, t):
        return self.pipe.scheduler.scale_model_input(x, t)

    def step_kwargs(self, generator=None, eta=0.0):
        return self.pipe.prepare_extra_step_kwargs(generator, eta)

    def added_conditions(self, x: torch.Tensor, cond: dict) -> dict | None:
        """``added_cond_kwargs`` of the UNet (SDXL's pooled text and micro-conditioning)."""
        return None

    def predict(self, run: RunState, x, t, cond, guidance=None):
        model = self.denoiser
        return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"].to(model.dtype),
                     added_cond_kwargs=self.added_conditions(x, cond), return_dict=False)[0]

    def to_latents(self, moments):
        return moments * self.pipe.vae.config.scaling_factor

    def from_latents(self, latents):
        return latents / self.pipe.vae.config.scaling_factor

    def postprocess(self, image, output_type, dtype):
        pipe = self.pipe
        denorm = [True] * image.shape[0]
        if getattr(pipe, "safety_checker", None) is not None:
            image, nsfw = pipe.run_safety_checker(image, self.device, dtype)
            denorm = [not x for x in nsfw] if nsfw is not None else denorm
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm)


class SDXLAdapter(SDAdapter):
    """``StableDiffusionXLPipeline``: two CLIP encoders, pooled text and micro-conditioning
    of an uncropped image of the latents' size, zeros for CFG's unconditional row where
    ``force_zeros_for_empty_prompt``, standardised latents where the VAE says so."""

    name = "sdxl"
    pipeline_names = ("StableDiffusionXLPipeline",)

    @classmethod
    def pipeline_classes(cls):
        from diffusers import StableDiffusionXLPipeline

        return (StableDiffusionXLPipeline,)

    def native_size(self):
        s = int(self.pipe.default_sample_size) * self.vae_factor
        return s, s

    def encode_prompt(self, prompts, negative_prompt=None, *, num_images_per_prompt=1, cfg=False,
                      max_sequence_length=None, clip_skip=None):
        cond, uncond, pooled, upooled = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt, clip_skip=clip_skip)
        c = {"encoder_hidden_states": cond, "text_embeds": pooled}
        return c, ({"encoder_hidden_states": uncond, "text_embeds": upooled} if cfg else None)

    def null_conditioning(self, empty):
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            return {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def word_swap_tokenizers(self):
        pipe = self.pipe
        tokenizers = [pipe.tokenizer]
        if getattr(pipe, "tokenizer_2", None) is not None and getattr(pipe, "text_encoder_2", None) is not None:
            tokenizers.append(pipe.tokenizer_2)
        return tokenizers

    def added_conditions(self, x, cond):
        """SDXL's pooled text and micro-conditioning ``[B, 6]`` of an uncropped image of the
        latents' size (original size, crop (0, 0), target size), as the SDXL pipeline builds it."""
        pipe, model, pooled = self.pipe, self.denoiser, cond["text_embeds"]
        size = (x.shape[-2] * self.vae_factor, x.shape[-1] * self.vae_factor)
        proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=proj)
        ids = ids.to(self.device).repeat(x.shape[0], 1)  # [B, 6]
        return {"text_embeds": pooled.to(model.dtype), "time_ids": ids.to(model.dtype)}

    def latent_shift(self, like):
        return latent_stats(self.pipe.vae, like)

    def to_latents(self, moments):
        return PipelineAdapter.to_latents(self, moments)

    def from_latents(self, latents):
        return PipelineAdapter.from_latents(self, latents)

    def postprocess(self, image, output_type, dtype):
        pipe = self.pipe
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type=output_type)
