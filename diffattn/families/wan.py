"""Wan 2.1 / 2.2: ``WanTransformer3DModel`` with ``WanAttnProcessor`` (T2V, I2V; 2.2's two experts).

Everything diffattn knows about the family: detection, site kinds, the processor, the token
layout and the per-forward record (no diffattn sampling loop uses Wan yet, so no adapter).

``attn1``: video self-attention with Wan's interleaved RoPE (q/k RMS norm across all heads,
before the head split). ``attn2``: video queries × text keys; for I2V the stock processor
takes the first ``N - 512`` context tokens as image tokens (a hard-coded text length) and runs
a *second, separate* softmax over them with ``add_k_proj``/``add_v_proj``, adding its output.
Both softmaxes are attention calls: ``part="main"`` (keys ``text``) and ``part="image"`` (keys
``image``). Without an active control the stock ``dispatch_attention_fn`` runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..layout import TokenLayout, _check_grid, segments
from ..processors.base import DiffattnProcessor
from .base import Family
from .flux import dispatch_plain, sdpa_mask

I2V_TEXT_LEN = 512  # diffusers' WanAttnProcessor: "512 is the context length of the text encoder"


def wan_layout(n_video: int, n_key: int | None = None, *, grid: tuple[int, int, int] | None, key: str = "video") -> TokenLayout:
    """Wan ``attn1``: video × video (``key="video"``); ``attn2``: video queries × ``key="text"``
    keys, or ``key="image"`` for the I2V image branch (a separate softmax in the stock model)."""
    video = segments(("video", n_video, _check_grid(n_video, grid)))
    if key == "video":
        return TokenLayout(video, video)
    return TokenLayout(video, segments((key, n_key, None)))


@dataclass
class WanInfo:
    """Per-forward record: the video's token grid (t, h, w) after patching, the text tokens
    and (I2V) the image tokens at the start of ``encoder_hidden_states``."""

    video_grid: tuple[int, int, int] | None = None
    text_len: int = 0
    image_context_len: int = 0


def wan_rope(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding on ``[B, N, H, D]`` (as the stock processor's local function)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, H, D/2] each
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanProcessor(DiffattnProcessor):
    family = "wan"

    def plain(self, q, k, v, bias=None, parallel_config=None):
        return dispatch_plain(self, q, k, v, bias, parallel_config)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            n_img_ctx = encoder_hidden_states.shape[1] - I2V_TEXT_LEN
            encoder_hidden_states_img = encoder_hidden_states[:, :n_img_ctx]
            encoder_hidden_states = encoder_hidden_states[:, n_img_ctx:]
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.fused_projections:
            if not attn.is_cross_attention:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(source).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, N, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = wan_rope(query, *rotary_emb)
            key = wan_rope(key, *rotary_emb)

        controlled = bool(self.controls)
        if controlled:
            q = query.transpose(1, 2)  # [B, H, N, D]

            def grid():
                info = self.forward_info()
                return info.video_grid if info is not None else None

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            if attn.fused_projections:
                key_img, value_img = attn.to_added_kv(encoder_hidden_states_img).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(encoder_hidden_states_img), attn.add_v_proj(encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))  # [B, N_img, H, D]
            value_img = value_img.unflatten(2, (attn.heads, -1))
            if controlled:
                k_img, v_img = key_img.transpose(1, 2), value_img.transpose(1, 2)  # [B, H, N_img, D]
                out = self.attend(q, k_img, v_img, lambda: wan_layout(q.shape[2], k_img.shape[2], grid=grid(), key="image"),
                                  part="image")
                hidden_states_img = out.transpose(1, 2)  # [B, N, H, D]
            else:
                hidden_states_img = dispatch_attention_fn(query, key_img, value_img, attn_mask=None, dropout_p=0.0,
                                                          is_causal=False, backend=self._attention_backend,
                                                          parallel_config=None)
            hidden_states_img = hidden_states_img.flatten(2, 3)  # [B, N, H*D]
            hidden_states_img = hidden_states_img.type_as(query)

        if controlled:
            k, v = key.transpose(1, 2), value.transpose(1, 2)  # [B, H, Nk, D]
            is_cross = encoder_hidden_states is not None
            out = self.attend(q, k, v, lambda: wan_layout(q.shape[2], k.shape[2], grid=grid(), key="text" if is_cross else "video"),
                              bias=sdpa_mask(attention_mask, q.shape[0], k.shape[2]),
                              parallel_config=None if is_cross else self._parallel_config)
            hidden_states = out.transpose(1, 2)  # [B, N, H, D]
        else:
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend,
                parallel_config=(self._parallel_config if encoder_hidden_states is None else None),
            )
        hidden_states = hidden_states.flatten(2, 3)  # [B, N, H*D]
        hidden_states = hidden_states.type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class WanFamily(Family):
    name = "wan"
    description = "WanTransformer3DModel (Wan 2.1/2.2)"
    mirrored = ("WanAttnProcessor", "WanAttnProcessor2_0")
    processor = WanProcessor

    def owns(self, model, module) -> bool:
        try:
            from diffusers.models.transformers.transformer_wan import WanAttention
        except ImportError:
            return False
        return isinstance(module, WanAttention)

    def kind(self, module) -> str:
        return "cross" if module.is_cross_attention else "self"  # I2V: image k/v ride on attn2

    def forward_info(self, config, arguments: dict, cache: dict) -> WanInfo:
        pt, ph, pw = config.patch_size
        t, h, w = arguments["hidden_states"].shape[-3:]
        ehs = arguments.get("encoder_hidden_states")
        img = arguments.get("encoder_hidden_states_image")
        return WanInfo(video_grid=(t // pt, h // ph, w // pw), text_len=ehs.shape[1] if ehs is not None else 0,
                       image_context_len=img.shape[1] if img is not None else 0)
