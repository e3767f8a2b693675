"""HunyuanVideo: ``HunyuanVideoTransformer3DModel`` with ``HunyuanVideoAttnProcessor2_0``,
``[video ‖ text]`` (text last).

Everything diffattn knows about the family: detection, site kinds, the processor, the token
layout and the per-forward record (no diffattn sampling loop uses HunyuanVideo yet, so no
adapter; ``HunyuanVideoPipeline`` and its image-to-video variants run under ``attach``).

Dual-stream blocks (``transformer_blocks.i.attn``, kind ``"joint"``) project text with
``add_*_proj`` and append it *after* the video tokens; single-stream blocks
(``single_transformer_blocks.i.attn``, kind ``"single"``) receive video and text separately and
the processor concatenates them, again text last. In both, q/k RMS norm runs per head, RoPE
(``apply_rotary_emb`` with HunyuanVideo's 3-D (t, h, w) frequencies) rotates the video tokens
only, and the model's ``[B, 1, 1, N]`` boolean mask hides the padded text keys (the prompt is
padded to ``max_sequence_length``, valid tokens first). Without an active control the stock
``dispatch_attention_fn`` runs (honouring ``set_attention_backend``), bit for bit.

The token refiner inside ``context_embedder`` (``context_embedder.token_refiner.refiner_blocks.
i.attn``, stock ``AttnProcessor2_0``) gets **no site**: it is a text-only self-attention that runs
once per forward before any block, with no video token to address (what every diffattn method
edits: video queries, their keys among video and text). A ``"self"`` site there would let
selectors meant for video self-attention (PAG-style perturbations, ``"self"``) silently perturb
the prompt encoding, and Rectified SpaAttn's official code leaves it dense. The registry still
owns those modules (so the model is recognised) and :meth:`HunyuanVideoFamily.blocks` leaves
them out: ``attach`` never swaps their processors, so they run stock whatever is attached.

Blocks return ``(video, text)``, the reverse of FLUX's ``(text, image)``: the family declares no
``text_stream_blocks`` (contextual repulsion reads the image stream at position 1 of every
family's block outputs), so ContextRepulsion refuses HunyuanVideo.

HunyuanVideo is guidance-distilled (``guidance_scale`` feeds a guidance embedding; one forward
per step, named ``cache_context("cond")``; true CFG adds an ``"uncond"`` forward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ..layout import TokenLayout, _check_grid, segments
from ..processors.base import DiffattnProcessor
from .base import Family, _first_int
from .flux import FluxRope, dispatch_plain, sdpa_mask

REFINER_PREFIX = "context_embedder."  # the token refiner's text-only attention: no site (module docstring)


def hunyuan_video_layout(n_video: int, n_text: int, *, grid: tuple[int, int, int] | None) -> TokenLayout:
    """HunyuanVideo dual- and single-stream blocks: ``[video (t, h, w) ‖ text]`` on both sides
    (text last, padded text included: the mask hides it). ``grid`` = (frames / patch_t,
    height / patch, width / patch) of the latent."""
    segs = segments(("video", n_video, _check_grid(n_video, grid)), ("text", n_text, None))
    return TokenLayout(segs, segs)


@dataclass
class HunyuanVideoInfo:
    """Per-forward record: the video's token grid (t, h, w) after patching (the text length comes
    from each call's own tensors)."""

    video_grid: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class HunyuanVideoRope:
    """HunyuanVideo's rotary embedding of one attention call: ``cos``, ``sin`` ``[N_video, D]``
    of the video tokens, which come first in the joint sequence (the pairs' angles repeated on
    both channels, as ``HunyuanVideoRotaryPosEmbed`` makes them and ``apply_rotary_emb`` applies
    them, FLUX's convention); the text tokens after them are not rotated.

    ``relocate`` is :meth:`FluxRope.relocate` over the whole sequence, the text positions
    carrying the identity rotation (cos 1, sin 0)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def relocate(self, x: torch.Tensor, seg: slice, source: torch.Tensor) -> torch.Tensor:
        """Tokens ``x`` [H, L, D] of segment ``seg`` whose token p was rotated at position
        ``source[p]`` (within ``seg``), rotated to position p instead (see :class:`FluxRope`)."""
        cos, sin = self.cos, self.sin
        pad = (seg.stop or 0) - cos.shape[0]
        if pad > 0:  # text positions: the identity rotation
            cos = torch.cat([cos, cos.new_ones(pad, cos.shape[1])])  # [N, D]
            sin = torch.cat([sin, sin.new_zeros(pad, sin.shape[1])])
        return FluxRope(cos, sin).relocate(x, seg, source)


def _rope_video(x: torch.Tensor, rotary_emb, n_text: int | None) -> torch.Tensor:
    """The stock processor's RoPE on ``[B, N, H, D]``: every token, or (single-stream blocks,
    ``n_text`` given) all but the last ``n_text`` (the text)."""
    if n_text is None:
        return apply_rotary_emb(x, rotary_emb, sequence_dim=1)
    return torch.cat([apply_rotary_emb(x[:, :-n_text], rotary_emb, sequence_dim=1), x[:, -n_text:]], dim=1)


class HunyuanVideoProcessor(DiffattnProcessor):
    family = "hunyuan_video"

    def plain(self, q, k, v, bias=None, parallel_config=None):
        return dispatch_plain(self, q, k, v, bias, self._parallel_config)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n_video = hidden_states.shape[1]
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)  # [B, N_vid + N_txt, C]

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = query.unflatten(2, (attn.heads, -1))  # [B, N, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # the video tokens only
            n_txt = encoder_hidden_states.shape[1] if single else None
            query = _rope_video(query, image_rotary_emb, n_txt)
            key = _rope_video(key, image_rotary_emb, n_txt)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))  # [B, N_txt, H, D]
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=1)  # [B, N_vid + N_txt, H, D]
            key = torch.cat([key, ek], dim=1)
            value = torch.cat([value, ev], dim=1)

        if self.controls:
            n_text = query.shape[1] - n_video

            def layout():
                info = self.forward_info()
                return hunyuan_video_layout(n_video, n_text, grid=info.video_grid if info is not None else None)

            q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, N, D]
            out = self.attend(q, k, v, layout, bias=sdpa_mask(attention_mask, q.shape[0], k.shape[2]),
                              rope=HunyuanVideoRope(*image_rotary_emb) if image_rotary_emb is not None else None)
            hidden_states = out.transpose(1, 2)  # [B, N, H, D]
        else:
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False, backend=self._attention_backend,
                                                  parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3)  # [B, N, H*D]
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :-n_txt], hidden_states[:, -n_txt:]
            if getattr(attn, "to_out", None) is not None:  # single-stream blocks: pre_only, no output projection
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class HunyuanVideoFamily(Family):
    name = "hunyuan_video"
    condition_arguments = ("encoder_hidden_states", "pooled_projections")  # Llama tokens, pooled CLIP
    description = "HunyuanVideoTransformer3DModel (HunyuanVideo T2V / I2V)"
    mirrored = ("HunyuanVideoAttnProcessor2_0",)
    processor = HunyuanVideoProcessor

    def owns(self, model, module) -> bool:
        try:
            from diffusers import HunyuanVideoTransformer3DModel
        except ImportError:
            return False
        from diffusers.models.attention_processor import Attention

        return isinstance(module, Attention) and isinstance(model, HunyuanVideoTransformer3DModel)

    def kind(self, module) -> str:
        return "joint" if getattr(module, "add_q_proj", None) is not None else "single"

    def blocks(self, entries):
        """Forward order (dual-stream ``transformer_blocks`` then ``single_transformer_blocks``,
        as ``attn_processors`` lists them), block = index in its stack; the token refiner's
        text-only attention (``context_embedder.*``) gets no site (module docstring)."""
        return [(name, module, _first_int(name), None) for name, module in entries
                if not name.startswith(REFINER_PREFIX)]

    def forward_info(self, config, arguments: dict, cache: dict) -> HunyuanVideoInfo:
        t, h, w = arguments["hidden_states"].shape[-3:]
        p, pt = int(config.patch_size), int(config.patch_size_t)
        return HunyuanVideoInfo(video_grid=(t // pt, h // p, w // p))
