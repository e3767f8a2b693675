"""FLUX / FLUX Kontext attention: ``FluxAttnProcessor`` semantics, ``[text ‖ image (‖ context)]``.

Double blocks project text with ``add_*_proj`` and concatenate it *before* the image; single
blocks receive text and image pre-concatenated (the engine records the text length from the
denoiser's ``encoder_hidden_states``). Kontext's image stream is ``[target ‖ context image]``;
the engine reads the split from ``img_ids`` (context tokens have first coordinate 1). RoPE is
``diffusers.models.embeddings.apply_rotary_emb``. Without an active control the stock
``dispatch_attention_fn`` runs (honouring ``set_attention_backend``); a mask passed as
``joint_attention_kwargs={"attention_mask": m}`` is honoured on both paths.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ..layout import flux_layout
from .base import DiffattnProcessor


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
            engine = self.engine

            def layout():
                ctx = engine.context if engine is not None else None
                text = n_txt if n_txt is not None else (ctx.text_len if ctx is not None else 0)
                if ctx is None:
                    return flux_layout(text, n_total)
                return flux_layout(text, n_total, n_context=ctx.context_len, image_grid=ctx.image_grid,
                                   context_grid=ctx.context_grid)

            q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, N, D]
            out = self.attend(q, k, v, layout, bias=sdpa_mask(attention_mask, q.shape[0], k.shape[2]))
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
