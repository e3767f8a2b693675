"""SD3 / SD3.5: ``SD3Transformer2DModel`` with ``JointAttnProcessor2_0``, ``[image ‖ text]`` (image first).

Everything diffattn knows about the family: detection, site kinds, the processor, the token
layout, the per-forward record and the ``StableDiffusion3Pipeline`` adapter.

SD3.5's dual-attention blocks call the *same* stock processor on an image-only ``attn2`` (no
``encoder_hidden_states``); the last block is ``context_pre_only`` (no text output
projection). The stock processor never passes a mask to SDPA, so neither do we. The text keys
are ``[CLIP-L ‖ CLIP-G (77, padded to T5's width) ‖ T5 (max_sequence_length)]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..layout import TokenLayout, _check_grid, grid_shape, segments
from ..processors.base import DiffattnProcessor
from .base import Family, PipelineAdapter, RunState, TextBlock, flow_timestep_kwargs


def sd3_layout(n_image: int, n_text: int, *, grid: tuple[int, int] | None) -> TokenLayout:
    """SD3 joint attention: ``[image ‖ text]`` on both sides (image first); ``n_text = 0`` for
    SD3.5's image-only ``attn2``. ``grid = (H / patch, W / patch)`` of the latent."""
    segs = segments(("image", n_image, _check_grid(n_image, grid)), ("text", n_text, None))
    return TokenLayout(segs, segs)


@dataclass
class LatentInfo:
    """Per-forward record of a family whose image tokens tile the latent (UNet levels, SD3 patches).

    latent_hw: latent height, width of this forward; patch: latent pixels per token side
    (SD3's patch size; a UNet's levels are found by :func:`~diffattn.layout.grid_shape`).
    """

    latent_hw: tuple[int, int]
    patch: int = 1
    grids: dict = field(default_factory=dict)  # n tokens -> (h, w), computed once per forward

    def image_grid(self, n_tokens: int) -> tuple[int, int]:
        """``(h, w)`` of an ``n_tokens`` image at this forward's latent aspect."""
        grid = self.grids.get(n_tokens)
        if grid is None:
            h, w = self.latent_hw
            p = self.patch
            grid = (h // p, w // p) if (h // p) * (w // p) == n_tokens else grid_shape(n_tokens, h, w)
            self.grids[n_tokens] = grid
        return grid


class SD3Processor(DiffattnProcessor):
    family = "sd3"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, N_img, D]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, N_txt, D]
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)  # [B, H, N_img + N_txt, D]
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)

        if self.controls:
            n_img = residual.shape[1]
            n_txt = query.shape[2] - n_img

            def layout():
                info = self.forward_info()
                return sd3_layout(n_img, n_txt, grid=info.image_grid(n_img) if info is not None else None)

            hidden_states = self.attend(query, key, value, layout)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # [B, N, H*D]
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1]:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class SD3Family(Family):
    name = "sd3"
    condition_arguments = ("encoder_hidden_states", "pooled_projections")  # T5/CLIP tokens, pooled CLIP
    description = "SD3Transformer2DModel (SD3, SD3.5)"
    mirrored = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0", "XFormersJointAttnProcessor")
    processor = SD3Processor

    def owns(self, model, module) -> bool:
        from diffusers import SD3Transformer2DModel
        from diffusers.models.attention_processor import Attention

        return isinstance(module, Attention) and isinstance(model, SD3Transformer2DModel)

    def kind(self, module) -> str:
        return "joint" if getattr(module, "add_q_proj", None) is not None else "self"  # SD3.5 dual blocks: image-only attn2

    def auxiliary_branch(self, arguments: dict) -> str | None:
        """StableDiffusion3Pipeline's skip-layer guidance forward (``skip_layers=[...]``, the
        conditional rows only) is the ``"skip"`` branch."""
        return "skip" if arguments.get("skip_layers") is not None else None

    def forward_info(self, config, arguments: dict, cache: dict) -> LatentInfo:
        hidden = arguments["hidden_states"]
        return LatentInfo(tuple(hidden.shape[-2:]), int(config.patch_size))

    def adapters(self):
        return (SD3Adapter,)

    def text_stream_blocks(self, model) -> list[tuple[str, tuple[int, ...], str]]:
        """The blocks that pass a text stream on, in execution order: ``(module name, positions
        of the stream in the block's output, kind)``. Joint blocks return ``(text, image)``; the
        last, ``context_pre_only`` block returns no text and is left out (contextual repulsion)."""
        return [(f"transformer_blocks.{i}", (0,), "joint") for i, block in enumerate(model.transformer_blocks)
                if not getattr(block, "context_pre_only", False)]


class SD3Adapter(PipelineAdapter):
    """``StableDiffusion3Pipeline``: three text encoders, CFG in one batch, flow matching."""

    name = "sd3"
    family = "sd3"
    pipeline_names = ("StableDiffusion3Pipeline",)
    solver = "flow"
    default_max_sequence_length = 256
    denoiser_attr = "transformer"
    joint_attention = True

    @classmethod
    def pipeline_classes(cls):
        from diffusers import StableDiffusion3Pipeline

        return (StableDiffusion3Pipeline,)

    @property
    def patch(self) -> int:
        return int(self.denoiser.config.patch_size)

    @property
    def max_side(self) -> int | None:
        patches = getattr(self.denoiser.config, "pos_embed_max_size", None)
        return None if patches is None else int(patches) * self.size_unit

    def encode_prompt(self, prompts, negative_prompt=None, *, num_images_per_prompt=1, cfg=False,
                      max_sequence_length=None, clip_skip=None):
        cond, uncond, pooled, upooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
            do_classifier_free_guidance=cfg, device=self.device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=self.default_max_sequence_length if max_sequence_length is None else max_sequence_length, clip_skip=clip_skip)
        c = {"encoder_hidden_states": cond, "pooled_projections": pooled}
        return c, ({"encoder_hidden_states": uncond, "pooled_projections": upooled} if cfg else None)

    def text_blocks(self) -> dict[str, TextBlock]:
        clip_len = int(self.pipe.tokenizer_max_length)
        blocks = {"clip": TextBlock(self.pipe.tokenizer, True, 0, span=clip_len)}
        if getattr(self.pipe, "text_encoder_3", None) is not None:
            blocks["t5"] = TextBlock(self.pipe.tokenizer_3, False, clip_len, truncated=True)  # after the CLIP block
        return blocks

    def missing_text_block(self, keys):
        if keys == "t5":
            return ("this SD3 pipeline was loaded without its T5 encoder (its T5 keys are zeros); load "
                    "text_encoder_3 or use text_keys='clip'")
        return super().missing_text_block(keys)

    def word_swap_tokenizers(self) -> list:
        pipe = self.pipe
        tokenizers = [pipe.tokenizer]
        for tok, enc in (("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3")):
            if getattr(pipe, tok, None) is not None and getattr(pipe, enc, None) is not None:
                tokenizers.append(getattr(pipe, tok))
        return tokenizers

    def text_attention_sites(self, all_sites):
        return [s.name for s in all_sites if s.kind == "joint"], None

    def timesteps(self, num_steps, height, width):
        return flow_timesteps(self, num_steps, height, width)

    def predict(self, run: RunState, x, t, cond, guidance=None):
        return self.denoiser(hidden_states=x, timestep=t.expand(x.shape[0]), return_dict=False, **cond)[0]



def flow_timesteps(adapter: PipelineAdapter, num_steps: int, height: int, width: int) -> torch.Tensor:
    """Timesteps of a flow-matching pipeline's run, set on its scheduler as SD3's and FLUX's
    pipelines do (FLUX's σ grid and the dynamic shift from the image's token count)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    n = adapter.image_seq_len((height // adapter.vae_factor, width // adapter.vae_factor))
    kw = flow_timestep_kwargs(adapter.pipe.scheduler.config, num_steps, n, flux=adapter.flux_sigmas)
    timesteps, _ = retrieve_timesteps(adapter.pipe.scheduler, num_steps, adapter.device, **kw)
    return timesteps
