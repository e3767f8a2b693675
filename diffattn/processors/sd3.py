"""SD3 / SD3.5 attention: ``JointAttnProcessor2_0`` semantics, ``[image ‖ text]`` (image first).

SD3.5's dual-attention blocks call the *same* stock processor on an image-only ``attn2``
(no ``encoder_hidden_states``); the last block is ``context_pre_only`` (no text output
projection). The stock processor never passes a mask to SDPA, so neither do we.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import sd3_layout
from .base import DiffattnProcessor


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
                grid = self.engine.image_grid(n_img) if self.engine is not None else None
                return sd3_layout(n_img, n_txt, grid=grid)

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
