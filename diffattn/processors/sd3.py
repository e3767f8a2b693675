"""SD3 / SD3.5 joint attention: ``JointAttnProcessor2_0`` semantics ([image ‖ text]).

SD3.5's dual-attention blocks run the same processor as image-only ``attn2`` (no
``encoder_hidden_states``); the last block is ``context_pre_only`` (no text output).
"""
from __future__ import annotations

import torch

from ..layout import TokenLayout, segments
from .base import DiffattnProcessor


class SD3Processor(DiffattnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        split = lambda x: x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731  [B,N,C]->[B,H,N,D]
        query, key, value = split(query), split(key), split(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        n_txt = 0
        if encoder_hidden_states is not None:
            eq = split(attn.add_q_proj(encoder_hidden_states))
            ek = split(attn.add_k_proj(encoder_hidden_states))
            ev = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            n_txt = eq.shape[2]
            query = torch.cat([query, eq], dim=2)  # [B, H, N_img + N_txt, D]
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
        n_img = residual.shape[1]

        def layout():
            segs = segments(("image", n_img, self.engine.grid(n_img)), ("text", n_txt, None))
            return TokenLayout(query=segs, key=segs)

        hidden_states = self.attend(query, key, value, layout)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # [B, N, C]
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
