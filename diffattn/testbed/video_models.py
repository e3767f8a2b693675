"""tiny-wan: the testbed's video model, a stock ``WanPipeline`` sized for CPU training.

Every part is a stock diffusers / transformers class; only the sizes are small:

- VAE: ``AutoencoderKLWan`` with **4x spatial and 4x temporal** compression (``dim_mult`` of
  three stages, both downsamplings temporal), 16 latent channels: a 9-frame 64x64 clip
  [3, 9, 64, 64] -> latents [16, 3, 16, 16] (the first frame alone, then each chunk of 4
  frames, as the Wan VAE always encodes). 16 channels per 4x4x4 voxel of pixels keeps the image
  VAE's ratio (``models.vae_config``: 48 values -> 4 channels, here 192 -> 16).
- Denoiser: ``WanTransformer3DModel`` with **patch 1x1x1**, 6 blocks of 4 heads x 32 (width 128,
  as tiny-sd3), FFN 512, 3-axis RoPE: **768 video tokens per clip** (3 x 16 x 16).
- Text: a 2-layer ``UMT5EncoderModel`` (the encoder class of Wan's umT5) of width 64 over the world's
  word-level tokenizer (``make_video_tokenizer``), learned jointly with the denoiser.

Why these factors: the model exists to measure block-sparse attention (Rectified SpaAttn,
issue 25) against dense attention. With 64-token blocks, the Wan default (8x spatial, patch
1x2x2) would leave a 64 px clip 3 x 4 x 4 = 48 tokens (not one block), and 4x spatial with patch
2x2 192 tokens, 3 blocks: top-k at drop 0.75 or 0.9 keeps less than one block, so every drop
rate degenerates to "one block". 4x spatial with patch 1 gives 768 tokens = 12 blocks of 64
(a latent frame is 256 tokens = 4 blocks, e.g. 8x8 tiles): by top-k alone drop 0.5 / 0.75 /
0.9 keep 6 / 3 / ~1 key blocks per query block, so the drop rates differ and a block is a local
space-time region. (Only by top-k: on so small a grid the official neighbour rule alone keeps
0.80-0.91 of the blocks, so the frontends run tiny-wan without it: ``testbed.defaults.
TINY_WAN_SPARSE``; the first latent frame's blocks still attend to each other.) The price is compute: at 768 tokens a training step of batch 16 took 3.9-6.7 s against
0.65 s at 192 tokens (1 thread on the busy 2-core dev box), so the 2-hour CPU recipe
(``train_video``) sees ~20k clips; 32-token blocks at patch 2x2 (6 blocks) are the fallback
if that underfits. Temporal 4x is what the Wan VAE's chunked causal
encoder assumes (it encodes 1 + 4k frames in chunks of 4), and 3 latent frames still carry
motion (positions 4 frames apart).

``preset="tiny"`` shrinks every part (for tests: a 1-block transformer, a 4-channel VAE)
keeping the factors, so tests exercise the same shapes cheaply.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from ..errors import ModelLoadError, UsageError
from ..tokenizers import clip_tokenizer
from .pipelines import CallDefaults
from .video import FRAMES, video_vocabulary
from .world import SIZE, vocabulary

TEXT_LENGTH = 24  # tokens per caption, BOS and EOS included; the longest clip caption needs 17
SPATIAL, TEMPORAL = 4, 4  # VAE compression factors (see the module notes)
PATCH = (1, 1, 1)  # transformer patch (t, h, w)
SHIFT = 1.0  # flow-matching timestep shift at inference (training samples t logit-normally, as tiny-sd3)

PRESETS: dict[str, dict] = {
    "base": dict(
        vae=dict(base_dim=16, dim_mult=(1, 2, 4), z_dim=16),
        transformer=dict(heads=4, head_dim=32, layers=6, ffn_dim=512, freq_dim=64),
        text=dict(d_model=64, layers=2, heads=4, d_kv=16, d_ff=128),
    ),
    "tiny": dict(
        vae=dict(base_dim=4, dim_mult=(1, 1, 1), z_dim=4),
        transformer=dict(heads=2, head_dim=12, layers=1, ffn_dim=32, freq_dim=16),
        text=dict(d_model=16, layers=1, heads=2, d_kv=8, d_ff=32),
    ),
}

# call defaults of the tiny model (ShapesWanPipeline); steps and guidance as tiny-sd3's until a
# sweep on training seeds picks them
WAN_DEFAULTS = dict(num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=20, guidance_scale=5.0,
                    max_sequence_length=TEXT_LENGTH)


def _preset(name: str) -> dict:
    if name not in PRESETS:
        raise UsageError(f"unknown tiny-wan preset {name!r}; choose one of {list(PRESETS)}")
    return PRESETS[name]


def make_video_tokenizer():
    """The word-level tokenizer of clip captions: the world's v1 words first, then (after BOS
    and EOS) the v2 words, then the video words (``video.video_vocabulary``), so every world
    token keeps its id (``models.make_tokenizer(1)`` and ``(2)`` are prefixes of it)."""
    v1 = vocabulary(1)
    return clip_tokenizer(v1, model_max_length=TEXT_LENGTH, extra_words=video_vocabulary()[len(v1):])


def wan_vae_config(preset: str = "base") -> dict:
    """``AutoencoderKLWan`` kwargs: 4x spatial (three stages, two downsamplings), both
    downsamplings also temporal (4x), latents standardised by ``latents_mean`` / ``latents_std``
    (set from data by ``train_video``'s data stage; the pipeline undoes them before decoding)."""
    v = _preset(preset)["vae"]
    z = v["z_dim"]
    return dict(base_dim=v["base_dim"], z_dim=z, dim_mult=list(v["dim_mult"]), num_res_blocks=1, attn_scales=[],
                temperal_downsample=[True, True], dropout=0.0, latents_mean=[0.0] * z, latents_std=[1.0] * z,
                scale_factor_spatial=SPATIAL, scale_factor_temporal=TEMPORAL)


def transformer_config(preset: str = "base") -> dict:
    """``WanTransformer3DModel`` kwargs (patch 1x1x1; text width = the T5 encoder's)."""
    p = _preset(preset)
    t, z = p["transformer"], p["vae"]["z_dim"]
    return dict(patch_size=PATCH, num_attention_heads=t["heads"], attention_head_dim=t["head_dim"], in_channels=z,
                out_channels=z, text_dim=p["text"]["d_model"], freq_dim=t["freq_dim"], ffn_dim=t["ffn_dim"],
                num_layers=t["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=32)


def text_encoder(tokenizer, preset: str = "base", seed: int = 0):
    """A small ``UMT5EncoderModel`` (Wan's text encoder class; no dropout, so training is
    deterministic) over ``tokenizer``."""
    from transformers import UMT5Config, UMT5EncoderModel

    t = _preset(preset)["text"]
    config = UMT5Config(vocab_size=len(tokenizer), d_model=t["d_model"], d_kv=t["d_kv"], d_ff=t["d_ff"],
                        num_heads=t["heads"], num_layers=t["layers"], relative_attention_num_buckets=8,
                        relative_attention_max_distance=TEXT_LENGTH, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return UMT5EncoderModel(config)


def wan_scheduler(shift: float = SHIFT) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_wan_vae(seed: int = 0, preset: str = "base") -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(**wan_vae_config(preset))


def build_wan(vae: AutoencoderKLWan | None = None, seed: int = 0, preset: str = "base", shift: float = SHIFT) -> WanPipeline:
    """A fresh (untrained) tiny-wan ``WanPipeline`` around a (trained) VAE; a fresh VAE of the
    preset when none is given. fp32, eval mode, progress bar off."""
    vae = vae if vae is not None else build_wan_vae(seed, preset)
    z = _preset(preset)["vae"]["z_dim"]
    if vae.config.z_dim != z:
        raise UsageError(f"the VAE has {vae.config.z_dim} latent channels, preset {preset!r} {z}; "
                         "pass the VAE trained for this preset")
    tokenizer = make_video_tokenizer()
    text = text_encoder(tokenizer, preset, seed)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**transformer_config(preset))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae, scheduler=wan_scheduler(shift),
                       transformer=transformer)
    for m in (text, transformer, vae):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_shape(frames: int = FRAMES, size: int = SIZE, preset: str = "base") -> tuple[int, int, int, int]:
    """Latents [C, T, H, W] of one clip."""
    if (frames - 1) % TEMPORAL or size % 16:
        raise UsageError(f"tiny-wan takes 1 + 4k frames and a size divisible by 16, got {frames} frames at {size} px")
    return (_preset(preset)["vae"]["z_dim"], (frames - 1) // TEMPORAL + 1, size // SPATIAL, size // SPATIAL)


def tokens_per_clip(frames: int = FRAMES, size: int = SIZE) -> int:
    """Video tokens per attention call: latent frames x (size / 4 / patch)^2 (768 for 9 x 64 px)."""
    _, t, h, w = latent_shape(frames, size)
    return t // PATCH[0] * (h // PATCH[1]) * (w // PATCH[2])


class ShapesWanPipeline(CallDefaults, WanPipeline):
    """``WanPipeline`` defaulting to the tiny-wan settings (9 frames of 64 px, 24 text tokens)."""

    default_call_kwargs = WAN_DEFAULTS


def load_wan(path, **kwargs) -> ShapesWanPipeline:
    """An exported tiny-wan folder (``python -m diffattn.testbed.train_video export``) as a
    ``ShapesWanPipeline``, offline, from safetensors only; a :class:`ModelLoadError` when the
    folder cannot be loaded."""
    from . import load_failure

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"no tiny-wan model at {path} (no model_index.json); export one with "
                             "`python -m diffattn.testbed.train_video export --run RUN --to FOLDER`")
    kwargs.setdefault("use_safetensors", True)
    try:
        pipe = ShapesWanPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(load_failure(path, e, kwargs["use_safetensors"])) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters of each torch module of a pipeline."""
    return {k: sum(p.numel() for p in m.parameters()) for k, m in pipe.components.items()
            if isinstance(m, torch.nn.Module)}


__all__ = ["build_wan", "build_wan_vae", "make_video_tokenizer", "wan_vae_config", "transformer_config",
           "text_encoder", "wan_scheduler", "latent_shape", "tokens_per_clip", "ShapesWanPipeline", "load_wan",
           "parameter_counts", "PRESETS", "WAN_DEFAULTS", "TEXT_LENGTH", "SPATIAL", "TEMPORAL", "PATCH"]
