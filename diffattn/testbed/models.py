"""Configs of the testbed's tiny models, and the pipelines assembled from them.

Every model here is a stock diffusers / transformers class; only the sizes are small:
- VAE: ``AutoencoderKL`` 64x64x3 -> 16x16x4 (three blocks, downsampling by 4);
- tiny-sd: ``UNet2DConditionModel`` on 16x16 latents with cross-attention at 16x16 and 8x8
  (plus the 4x4 mid block), 4 heads per attention, one ``CLIPTextModel``;
- tiny-sd3: ``SD3Transformer2DModel`` with 6 joint blocks x 4 heads of 32 (patch 2: 64 image
  tokens), two ``CLIPTextModelWithProjection`` and no T5.
The text encoders are learned jointly with the denoisers, over a word-level tokenizer of the
world's vocabulary (``diffattn.tokenizers.clip_tokenizer``).
"""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..tokenizers import clip_tokenizer
from .world import vocabulary

TEXT_LENGTH = 24  # world v1: tokens per caption, BOS/EOS included; the longest caption needs 19
TEXT_LENGTHS = {1: TEXT_LENGTH, 2: 32}  # per world version; the longest v2 caption needs 30
LATENT_SIZE = 16
LATENT_CHANNELS = 4


def make_tokenizer(world: int = 1):
    """The word-level tokenizer of a world version's captions. v2 appends its words after v1's
    (``world.vocabulary``), so every v1 word keeps its token id."""
    v1 = vocabulary(1)
    # the v2 words go in after BOS and EOS (``extra_words``), so those ids stay too
    return clip_tokenizer(v1, model_max_length=TEXT_LENGTHS[world], extra_words=vocabulary(world)[len(v1):])


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=1.0,  # set from data after training (1 / std of the latents)
        shift_factor=0.0,  # SD3-style mean shift, set from data after training
    )


def text_config(tokenizer, projection: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=64 if projection else 512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def unet_config() -> dict:
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        attention_head_dim=4,  # diffusers' UNet reads this as the number of heads
        cross_attention_dim=64,
        norm_num_groups=16,
    )


def sd3_config() -> dict:
    return dict(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=128,  # two CLIP encoders of width 64, concatenated
        caption_projection_dim=128,
        pooled_projection_dim=128,
        pos_embed_max_size=32,
    )


def sd_scheduler(prediction_type: str = "epsilon") -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
    )


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def build_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config())


def build_sd(vae: AutoencoderKL, seed: int = 0, prediction_type: str = "epsilon", world: int = 1) -> StableDiffusionPipeline:
    """A fresh (untrained) tiny-sd pipeline around a trained VAE (ε- or v-prediction, as SD2-v),
    with the tokenizer of world version ``world``."""
    tokenizer = make_tokenizer(world)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(tokenizer, projection=False))
    unet = UNet2DConditionModel(**unet_config())
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd3(vae: AutoencoderKL, seed: int = 0, world: int = 1) -> StableDiffusion3Pipeline:
    """A fresh (untrained) tiny-sd3 pipeline around a trained VAE, with the tokenizer of world
    version ``world``."""
    tokenizer = make_tokenizer(world)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(text_config(tokenizer, projection=True))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, projection=True))
    transformer = SD3Transformer2DModel(**sd3_config())
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=sd3_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_tokenizer(world),
        text_encoder_3=None,
        tokenizer_3=None,
    )
