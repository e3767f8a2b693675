"""FLUX / FLUX Kontext attention: ``FluxAttnProcessor`` semantics ([text ‖ image (‖ context)]).

Double blocks project text with ``add_*_proj``; single blocks receive text and image
pre-concatenated. Kontext's image stream is [target ‖ context image]; the engine reads the
split from ``img_ids`` (context tokens have first coordinate 1).
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..layout import TokenLayout, segments
from .base import DiffattnProcessor


class FluxProcessor(DiffattnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))  # [B, N, H, D]
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            if attn.fused_projections:
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query = torch.cat([eq, query], dim=1)  # [B, N_txt + N_img, H, D]
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, N, D]

        def layout():
            n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.engine.context.text_len
            n_img = q.shape[2] - n_txt
            n_ctx = self.engine.context.context_len if self.engine.context is not None else 0
            segs = segments(
                ("text", n_txt, None),
                ("image", n_img - n_ctx, self.engine.context.image_grid if self.engine.context else None),
                ("context", n_ctx, self.engine.context.context_grid if self.engine.context else None),
            )
            return TokenLayout(query=segs, key=segs)

        out = self.attend(q, k, v, layout, bias=attention_mask)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # [B, N, H*D]
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes([n_txt, hidden_states.shape[1] - n_txt], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states
