"""Tiny, randomly initialised diffusers pipelines for every supported family, built offline.

Each builder returns a *real* diffusers pipeline (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``,
``FluxKontextPipeline``, ``WanPipeline``, ``WanImageToVideoPipeline``,
``HunyuanVideoPipeline``) assembled from configs, with tokenizers built locally
(:mod:`diffattn.tokenizers`; HunyuanVideo's Llama tokenizer here), so nothing touches the
Hugging Face Hub (``HF_HUB_OFFLINE=1`` works). Weights are drawn from ``torch.manual_seed``
per component, so the same ``seed`` always gives the same pipeline; every module is fp32 and in
eval mode (dropout off: T5 otherwise breaks determinism).

The configs start from the ones diffusers' own pipeline tests use
(``tests/pipelines/*/get_dummy_components``) and change them so that attention is worth
addressing: at least 2 layers and 2 heads per transformer family, FLUX with 2 double and
2 single blocks, the SD1.5 UNet with cross-attention at two resolutions plus the mid block,
the SDXL UNet with several transformer blocks per attention (ComfyUI ``d1.1``-style aliases).
Keyword arguments grow the attention (layers, heads, head_dim, sample_size) for benchmarks.

    pipe = tiny_pipeline("flux", num_layers=4)
    image = pipe(**tiny_call_kwargs("flux")).images[0]
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .tokenizers import clip_tokenizer, t5_tokenizer

FAMILIES = ("sd15", "sdxl", "sd3", "sd35", "flux", "flux_kontext", "wan", "wan_i2v", "hunyuan_video")

CLIP_LENGTH = 77  # CLIPTokenizer.model_max_length; the pipelines need a finite value
# Sentences the T5 unigram model is trained on (any text works; these cover the prompts of
# the tests and the shapes world).
_T5_SENTENCES = (
    "a red circle left of a blue square",
    "a green triangle above a yellow star on a white background",
    "a photo of a cat, a painting of a squirrel eating a burger",
    "dance monkey, negative, bad quality, blurry",
)


# ----------------------------------------------------------------------------- components


def _eval_fp32(pipe):
    """Put every torch module of ``pipe`` in fp32 eval mode and silence its progress bar."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            if any(p.dtype != torch.float32 for p in component.parameters()):
                component.to(torch.float32)  # built fp32 already; only a changed default dtype lands here
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip_tokenizer():
    return clip_tokenizer(None, model_max_length=CLIP_LENGTH)


def _t5_tokenizer():
    return t5_tokenizer(list(_T5_SENTENCES), vocab_size=64)


def _clip_text(tokenizer, seed: int, *, hidden: int, projection: int | None = None, layers: int = 2):
    """A CLIP text encoder (``CLIPTextModel``, or ``...WithProjection`` when ``projection``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LENGTH,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # not 2: pool at the real EOS, not argmax(ids)
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5_text(tokenizer, seed: int, *, d_model: int = 32, layers: int = 2):
    """A T5 encoder from an inline config (diffusers' tiny-random-t5, fewer layers)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=layers,
        relative_attention_num_buckets=8,
        feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def _vae(seed: int, *, latent_channels: int, block_out_channels: Sequence[int] = (8, 16),
         sd3_style: bool = False):
    """A tiny ``AutoencoderKL``; spatial factor ``2 ** (len(block_out_channels) - 1)``.

    ``sd3_style``: no quant convs and a latent shift, as the SD3 / FLUX VAEs.
    """
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    extra = {}
    if sd3_style:
        extra = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **extra,
    )


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _flow_scheduler(shift: float = 1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


# ----------------------------------------------------------------------------- UNet families


def tiny_sd15(
    seed: int = 0,
    *,
    block_out_channels: Sequence[int] = (8, 16, 16),
    heads: int = 2,
    layers_per_block: int = 1,
    cross_attention_dim: int = 16,
    sample_size: int = 8,
):
    """A tiny ``StableDiffusionPipeline``.

    UNet: ``CrossAttnDownBlock2D`` at the two finest resolutions, a ``DownBlock2D`` below,
    the attention mid block, and the mirrored up path, so the UNet has attention sites at two
    resolutions plus the mid block (aliases ``d0 d1 m0 u0..u3`` with ``layers_per_block=1``).
    ``heads`` is the number of heads (diffusers' ``attention_head_dim`` means heads on UNets).
    VAE factor 2: an image of ``h`` pixels gives ``(h/2)**2`` tokens at the first level.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    text_encoder = _clip_text(tokenizer, seed, hidden=cross_attention_dim)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=heads,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=min(4, min(block_out_channels)),
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(seed, latent_channels=4),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _eval_fp32(pipe)


def tiny_sdxl(
    seed: int = 0,
    *,
    block_out_channels: Sequence[int] = (8, 16, 32),
    heads: Sequence[int] = (2, 2, 4),
    transformer_layers_per_block: Sequence[int] = (1, 1, 2),
    layers_per_block: int = 1,
    sample_size: int = 8,
):
    """A tiny ``StableDiffusionXLPipeline`` (two CLIP encoders, ``text_time`` conditioning).

    The UNet follows SDXL's layout: no attention at the finest level, then attention with
    ``transformer_layers_per_block`` transformer blocks per attention (default 1 and 2, so
    ``d1.0-1``, ``m0.0-1``, ``u0.1`` exist), linear projections, per-level head counts.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    hidden, projection, time_dim = 16, 16, 8
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    text_encoder = _clip_text(tokenizer, seed, hidden=hidden)
    text_encoder_2 = _clip_text(tokenizer_2, seed, hidden=hidden, projection=projection)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=tuple(heads),
        transformer_layers_per_block=tuple(transformer_layers_per_block),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # 6 micro-conditioning scalars (original size, crop, target size) + pooled text
        projection_class_embeddings_input_dim=6 * time_dim + projection,
        cross_attention_dim=2 * hidden,  # both encoders' hidden states, concatenated
        norm_num_groups=min(4, min(block_out_channels)),
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed, latent_channels=4),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sd_scheduler(),
        add_watermarker=False,
    )
    return _eval_fp32(pipe)


# ----------------------------------------------------------------------------- MMDiT families


def tiny_sd3(
    seed: int = 0,
    *,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    patch_size: int = 2,
    sample_size: int = 8,
    qk_norm: str | None = None,
    dual_attention_layers: Sequence[int] = (),
    t5: bool = True,
):
    """A tiny ``StableDiffusion3Pipeline``: two CLIP encoders with projection and a T5.

    Image tokens per call: ``(h / 2 / patch_size) ** 2`` for an ``h``-pixel image (VAE
    factor 2); text tokens: 77 CLIP + ``max_sequence_length`` T5 (``t5=False`` drops the T5
    encoder; the pipeline then pads with zeros). ``qk_norm`` and ``dual_attention_layers``
    give the SD3.5 architecture (:func:`tiny_sd35`).
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_hidden, t5_dim = 16, 32
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    text_encoder = _clip_text(tokenizer, seed, hidden=clip_hidden, projection=clip_hidden)
    text_encoder_2 = _clip_text(tokenizer_2, seed + 1, hidden=clip_hidden, projection=clip_hidden)
    tokenizer_3 = text_encoder_3 = None
    if t5:
        tokenizer_3 = _t5_tokenizer()
        text_encoder_3 = _t5_text(tokenizer_3, seed, d_model=t5_dim)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        # the pipeline pads the concatenated CLIP states (2 x 16) to the T5 width (32)
        joint_attention_dim=max(t5_dim, 2 * clip_hidden),
        caption_projection_dim=heads * head_dim,  # the text stream runs at the inner width
        pooled_projection_dim=2 * clip_hidden,
        pos_embed_max_size=max(64, -(-sample_size // patch_size) * 2),  # grid side limit: 64 -> 4096 tokens
        qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(3.0),
        vae=_vae(seed, latent_channels=4, sd3_style=True),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _eval_fp32(pipe)


def tiny_sd35(seed: int = 0, *, num_layers: int = 3, dual_attention_layers: Sequence[int] | None = None, **kw):
    """A tiny SD3.5 (Medium-style) pipeline: RMS q/k-norm and dual-attention blocks.

    Blocks listed in ``dual_attention_layers`` (default: the first ``num_layers - 1``, as
    SD3.5 Medium uses its early blocks) carry a second, image-only self-attention ``attn2``
    beside the joint ``attn``. Other keywords as :func:`tiny_sd3`.
    """
    if dual_attention_layers is None:
        dual_attention_layers = tuple(range(max(1, num_layers - 1)))
    kw.setdefault("qk_norm", "rms_norm")
    return tiny_sd3(seed, num_layers=num_layers, dual_attention_layers=dual_attention_layers, **kw)


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX RoPE axis split (index, row, column); the three even parts sum to ``head_dim``."""
    if head_dim == 128:
        return (16, 56, 56)  # FLUX.1
    if head_dim % 4:
        raise ValueError(f"FLUX head_dim must be a multiple of 4 for the RoPE axes, got {head_dim}")
    first = max(2, (head_dim // 4) // 2 * 2)
    rest = (head_dim - first) // 2 // 2 * 2
    return (first, rest, head_dim - first - rest)


def _flux_parts(seed, *, num_layers, num_single_layers, heads, head_dim, guidance_embeds):
    from diffusers import FluxTransformer2DModel

    latent_channels, clip_hidden, t5_dim = 4, 16, 32
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_text(tokenizer, seed, hidden=clip_hidden)
    text_encoder_2 = _t5_text(tokenizer_2, seed, d_model=t5_dim)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2x2 latent patches are packed into channels
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_hidden,  # CLIP pooled output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=_rope_axes(head_dim),
    )
    parts = dict(
        scheduler=_flow_scheduler(),
        vae=_vae(seed, latent_channels=latent_channels, sd3_style=True),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return parts


def tiny_flux(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_single_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    guidance_embeds: bool = False,
    sample_size: int = 8,
):
    """A tiny ``FluxPipeline`` (CLIP pooled + T5 text, 2 double-stream and 2 single-stream blocks).

    Image tokens per call: ``(h / 4) ** 2`` for an ``h``-pixel image (VAE factor 2, then 2x2
    packing); text tokens: ``max_sequence_length`` (T5), placed *before* the image tokens.
    ``sample_size`` (latent pixels) sets the default height/width: ``2 * sample_size``.
    """
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**_flux_parts(seed, num_layers=num_layers, num_single_layers=num_single_layers,
                                      heads=heads, head_dim=head_dim, guidance_embeds=guidance_embeds))
    pipe.default_sample_size = sample_size  # instance attribute read by __call__ (default 128)
    return _eval_fp32(pipe)


def tiny_flux_kontext(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_single_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    guidance_embeds: bool = False,
    sample_size: int = 8,
):
    """A tiny ``FluxKontextPipeline``: as :func:`tiny_flux`; the image stream is
    ``[target || context image]`` tokens. Call with ``image=``, ``max_area=h*w`` and
    ``_auto_resize=False`` at tiny sizes (see :func:`tiny_call_kwargs`).
    """
    from diffusers import FluxKontextPipeline

    parts = _flux_parts(seed, num_layers=num_layers, num_single_layers=num_single_layers, heads=heads,
                        head_dim=head_dim, guidance_embeds=guidance_embeds)
    pipe = FluxKontextPipeline(**parts, image_encoder=None, feature_extractor=None)
    pipe.default_sample_size = sample_size
    return _eval_fp32(pipe)


# ----------------------------------------------------------------------------- Wan


def _wan_vae(seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    # diffusers' test VAE: spatial factor 8, temporal factor 4, 16 latent channels
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _wan_transformer(seed: int, *, in_channels: int, num_layers: int, heads: int, head_dim: int,
                     image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    if head_dim % 2:  # RoPE splits it into t, h, w parts of 2 * (head_dim // 6) and the rest
        raise ValueError(f"Wan head_dim must be even for the RoPE axes, got {head_dim}")
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=image_dim,
        # I2V: the cross-attention gets separate k/v projections for the image tokens
        added_kv_proj_dim=heads * head_dim if image_dim is not None else None,
    )


def tiny_wan(
    seed: int = 0,
    *,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 12,
    two_experts: bool = False,
    boundary_ratio: float = 0.875,
):
    """A tiny ``WanPipeline`` (T5 text, ``AutoencoderKLWan``, ``WanTransformer3DModel``).

    Video tokens per call: ``((frames - 1) / 4 + 1) * (h / 16) * (w / 16)`` (VAE factors 4
    and 8, patch 1x2x2). ``two_experts=True`` adds ``transformer_2`` (Wan 2.2 style: the first
    handles timesteps above ``boundary_ratio * 1000``, the second the rest).
    """
    from diffusers import WanPipeline

    tokenizer = _t5_tokenizer()
    text_encoder = _t5_text(tokenizer, seed)
    transformer = _wan_transformer(seed, in_channels=16, num_layers=num_layers, heads=heads, head_dim=head_dim)
    transformer_2 = None
    if two_experts:
        transformer_2 = _wan_transformer(seed + 1, in_channels=16, num_layers=num_layers, heads=heads,
                                         head_dim=head_dim)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_wan_vae(seed),
        scheduler=_flow_scheduler(7.0),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio if two_experts else None,
    )
    return _eval_fp32(pipe)


def tiny_wan_i2v(seed: int = 0, *, num_layers: int = 2, heads: int = 2, head_dim: int = 12, image_size: int = 32,
                 image_patch: int = 8):
    """A tiny ``WanImageToVideoPipeline`` (Wan 2.1 I2V layout).

    A ``CLIPVisionModel`` encodes the first frame into ``(image_size / image_patch)**2 + 1``
    tokens; the transformer's cross-attention ``attn2`` attends to them through separate
    ``add_k_proj``/``add_v_proj`` projections beside the T5 text. diffusers' processor splits
    image from text by a hard-coded text length of 512, so call it with
    ``max_sequence_length=512`` (the pipeline default; :func:`tiny_call_kwargs` does).
    """
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    vision_hidden = 16
    tokenizer = _t5_tokenizer()
    text_encoder = _t5_text(tokenizer, seed)
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=vision_hidden,
            projection_dim=vision_hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            intermediate_size=32,
            patch_size=image_patch,
        )
    )
    image_processor = CLIPImageProcessor(crop_size=image_size, size=image_size)
    # in_channels: 16 noisy latents + 4 frame-mask channels + 16 first-frame latents
    transformer = _wan_transformer(seed, in_channels=36, num_layers=num_layers, heads=heads, head_dim=head_dim,
                                   image_dim=vision_hidden)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_wan_vae(seed),
        scheduler=_flow_scheduler(7.0),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )
    return _eval_fp32(pipe)


# ----------------------------------------------------------------------------- HunyuanVideo


def _llama_tokenizer():
    """An offline ``LlamaTokenizer`` (transformers' fast BPE one, ``LlamaTokenizerFast``): letters,
    digits and punctuation, plus one merge per lower-case letter after the word marker ``▁``
    (so words start with a ``▁x`` token). Right padding with ``<pad>``, as HunyuanVideo's
    tokenizer: the transformer takes the valid tokens to come first."""
    import string

    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "▁": 4}
    for c in string.ascii_letters + string.digits + ",.;:!?'-":
        vocab.setdefault(c, len(vocab))
    merges = []
    for c in string.ascii_lowercase:
        vocab["▁" + c] = len(vocab)
        merges.append(("▁", c))
    return LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>", padding_side="right")


def _hunyuan_vae(seed: int):
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    # diffusers' test VAE: spatial factor 8, temporal factor 4, 4 latent channels
    return AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )


def tiny_hunyuan_video(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_single_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    num_refiner_layers: int = 1,
    patch_size: int = 1,
    patch_size_t: int = 1,
):
    """A tiny ``HunyuanVideoPipeline`` (Llama text tokens, pooled CLIP, ``AutoencoderKLHunyuanVideo``,
    ``HunyuanVideoTransformer3DModel`` with 2 dual-stream and 2 single-stream blocks).

    Video tokens per call: ``((frames - 1) / 4 + 1) * (h / 8 / patch_size) * (w / 8 / patch_size)``
    (VAE factors 4 and 8); text tokens: ``max_sequence_length`` (Llama, right-padded; the model
    masks the padding), placed *after* the video tokens. Guidance-distilled (a guidance
    embedding, one forward per step). Call it with ``prompt_template={"template": "{}",
    "crop_start": 0}`` (:func:`tiny_call_kwargs` does): the default template's ``crop_start``
    of 95 counts tokens of the real Llama tokenizer.
    """
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import LlamaConfig, LlamaModel

    if head_dim % 4:
        raise ValueError(f"HunyuanVideo head_dim must be a multiple of 4 for the (t, h, w) RoPE axes, got {head_dim}")
    llama_hidden, clip_hidden = 16, 8
    tokenizer = _llama_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=llama_hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_key_value_heads=4,
        # the pipeline reads hidden_states[-3] (2 layers skipped): 3 layers put one before it
        num_hidden_layers=3,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    text_encoder = LlamaModel(config)
    tokenizer_2 = _clip_tokenizer()
    text_encoder_2 = _clip_text(tokenizer_2, seed, hidden=clip_hidden)
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=num_refiner_layers,
        patch_size=patch_size,
        patch_size_t=patch_size_t,
        guidance_embeds=True,
        text_embed_dim=llama_hidden,
        pooled_projection_dim=clip_hidden,  # CLIP pooled output
        rope_axes_dim=_rope_axes(head_dim),  # (t, h, w); (16, 56, 56) at 128 as HunyuanVideo
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=_hunyuan_vae(seed),
        scheduler=_flow_scheduler(7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    return _eval_fp32(pipe)


# ----------------------------------------------------------------------------- dispatch

_BUILDERS: dict[str, Callable] = {
    "sd15": tiny_sd15,
    "sdxl": tiny_sdxl,
    "sd3": tiny_sd3,
    "sd35": tiny_sd35,
    "flux": tiny_flux,
    "flux_kontext": tiny_flux_kontext,
    "wan": tiny_wan,
    "wan_i2v": tiny_wan_i2v,
    "hunyuan_video": tiny_hunyuan_video,
}


def _family(name: str) -> str:
    key = name.lower().replace("-", "_").replace(".", "")
    key = {"sd1": "sd15", "sd": "sd15", "kontext": "flux_kontext", "wani2v": "wan_i2v",
           "hunyuan": "hunyuan_video", "hunyuanvideo": "hunyuan_video"}.get(key, key)
    if key not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline family {name!r}; choose one of {', '.join(FAMILIES)}")
    return key


def tiny_sd3_transformer_and_inputs():
    """A 2-block SD3 transformer (2 heads of 8) and one batch of 2: 16 image + 6 text tokens."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=64).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([500.0, 500.0]))
    return model, inputs


def tiny_pipeline(family: str, seed: int = 0, **kw):
    """Build the tiny pipeline of ``family`` (one of :data:`FAMILIES`); ``kw`` go to its builder."""
    return _BUILDERS[_family(family)](seed, **kw)


def tiny_call_kwargs(family: str, *, seed: int = 0, steps: int = 2, size: int = 16, prompt: str = "a red circle",
                     **overrides) -> dict:
    """Keyword arguments for a quick ``pipe(**kwargs)`` call on a tiny pipeline of ``family``.

    ``size`` is the image height and width in pixels (a multiple of 16 for Wan and HunyuanVideo,
    4 for FLUX); Kontext and Wan I2V also get a ``size`` x ``size`` conditioning image, Wan and
    HunyuanVideo 5 frames. The
    result holds a tensor (``output_type="pt"``, read it with :func:`output_of`); ``overrides``
    replace or add any entry (``guidance_scale=1.0`` turns CFG off).
    """
    from PIL import Image

    key = _family(family)
    kwargs = dict(prompt=prompt, height=size, width=size, num_inference_steps=steps,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="pt")
    if key in ("sd3", "sd35", "flux", "flux_kontext"):
        kwargs["max_sequence_length"] = 16
    if key == "flux_kontext":
        kwargs.update(image=Image.new("RGB", (size, size), (200, 40, 40)), max_area=size * size, _auto_resize=False)
    if key in ("wan", "wan_i2v"):
        kwargs.update(num_frames=5, guidance_scale=3.0, negative_prompt="bad quality")
        kwargs["max_sequence_length"] = 16 if key == "wan" else 512  # I2V: diffusers splits at 512
    if key == "wan_i2v":
        kwargs["image"] = Image.new("RGB", (size, size), (200, 40, 40))
    if key == "hunyuan_video":  # a 5-frame video; the plain template (the default one crops 95 real-Llama tokens)
        kwargs.update(num_frames=5, max_sequence_length=16, prompt_template={"template": "{}", "crop_start": 0})
    kwargs.update(overrides)
    return kwargs


def output_of(result) -> torch.Tensor:
    """The image (``[B,3,H,W]``) or video (``[B,F,3,H,W]``) tensor of a pipeline result."""
    return result.frames if hasattr(result, "frames") else result.images
