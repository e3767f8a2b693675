"""Wan 2.1 / 2.2 attention: ``WanAttnProcessor`` semantics.

attn1: video self-attention with RoPE (q/k norm across all heads, before the head split);
attn2: video queries × text keys, plus for I2V a second attention over image tokens (the
first ``N - 512`` context tokens, as the stock processor splits them) added to the output.
"""
from __future__ import annotations

from ..layout import TokenLayout, segments
from .base import DiffattnProcessor


def _rope(x, cos, sin):
    """Wan's interleaved rotary embedding on [B, N, H, D] (as the stock processor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = x.new_empty(x.shape)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanProcessor(DiffattnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        is_cross = encoder_hidden_states is not None
        context_img = None
        if attn.add_k_proj is not None:
            n_img_ctx = encoder_hidden_states.shape[1] - 512  # the stock processor's split
            context_img = encoder_hidden_states[:, :n_img_ctx]
            encoder_hidden_states = encoder_hidden_states[:, n_img_ctx:]
        if attn.fused_projections:
            if is_cross:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            query, key, value = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, N, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rope(query, *rotary_emb), _rope(key, *rotary_emb)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, N, D]
        grid = self.engine.context.video_grid if self.engine.context is not None else None

        def layout():
            video = segments(("video", q.shape[2], grid))
            return TokenLayout(query=video, key=segments(("text", k.shape[2], None)) if is_cross else video)

        out = self.attend(q, k, v, layout, bias=attention_mask)
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)  # [B, N, H*D]
        if context_img is not None:
            if attn.fused_projections:
                key_img, value_img = attn.to_added_kv(context_img).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(context_img), attn.add_v_proj(context_img)
            key_img = attn.norm_added_k(key_img)
            k_img = key_img.unflatten(2, (attn.heads, -1)).transpose(1, 2)  # [B, H, N_img, D]
            v_img = value_img.unflatten(2, (attn.heads, -1)).transpose(1, 2)

            def layout_img():
                return TokenLayout(query=segments(("video", q.shape[2], grid)), key=segments(("image", k_img.shape[2], None)))

            out_img = self.attend(q, k_img, v_img, layout_img)
            hidden_states = hidden_states + out_img.transpose(1, 2).flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
