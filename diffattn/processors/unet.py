"""UNet attention (SD1.5, SD2, SDXL): diffusers ``Attention`` with ``AttnProcessor2_0`` semantics.

``attn1`` is image self-attention, ``attn2`` image queries × text keys. Everything the stock
processor does is mirrored: spatial norm, 4D inputs, group norm, ``norm_cross``, masks through
``attn.prepare_attention_mask`` (the UNet passes ``encoder_attention_mask`` to ``attn2`` this
way), q/k norm, residual connection and ``rescale_output_factor``. Like the stock processor it
uses SDPA's default scale 1/sqrt(D) (``attn.scale`` is not applied there either).
"""
from __future__ import annotations

import torch.nn.functional as F

from ..layout import unet_layout
from .base import DiffattnProcessor


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
                g = grid if grid is not None else (self.engine.image_grid(n_q) if self.engine is not None else None)
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
