"""tiny-kontext: the testbed's in-context editor and FLUX text-to-image model, a stock
``FluxKontextPipeline`` sized for CPU training (its text-to-image view, a stock ``FluxPipeline``
over the same modules, is :func:`text_to_image`: diffattn's text-to-image loops refuse an editor).

Every part is a stock diffusers / transformers class; only the sizes are small:

- **VAE**: the world-v2 ``AutoencoderKL`` of tiny-sd3 (``assets/tiny-sd3/vae``), re-used frozen:
  64x64x3 -> 16x16x4 (factor 4), its ``shift_factor`` / ``scaling_factor`` (set from world-v2
  data) being exactly FLUX's latent convention ``(z - shift) * scale``. FLUX.1's VAE has 16
  channels and factor 8; ``FluxKontextPipeline`` takes both numbers from the VAE (it packs
  ``transformer.in_channels // 4`` channels and encodes the context with
  ``vae.config.latent_channels``), so nothing assumes 16: with 4 channels a packed 2x2 patch is
  a **16-channel token** (``in_channels = 16``), and the pipeline's size unit is 2 x 4 = 8 px.
  Re-using the VAE keeps the latent space of the testbed's other models (one VAE, decoded the
  same way everywhere) and spends no training on it.
- **Denoiser**: ``FluxTransformer2DModel`` with double-stream (MM-DiT) blocks followed by
  single-stream blocks, as FLUX.1 (19 + 38; here 3 + 6 at width 128: 4 heads of 32, as
  tiny-sd3's 6 joint blocks), patch 1 on the packed tokens, 3-axis RoPE (index, row, column:
  8 + 12 + 12 of the 32 head dims; the index axis only tells the target (0) from the context
  image (1)), no guidance embedding: the tiny model is not guidance-distilled, so classifier-free
  guidance is the pipeline's ``true_cfg_scale`` with an empty negative prompt (trained by
  caption dropout).
- **Text**: a ``CLIPTextModel`` (its pooled vector -> ``pooled_projections``) and a small
  ``T5EncoderModel`` (its token states -> the text stream), both over one word-level tokenizer
  (``make_kontext_tokenizer``: the world-v2 words with their ids, then the edit words of
  ``edits.edit_vocabulary``), learned jointly with the denoiser.

**Tokens per image at 64 px**: 64 / 4 = 16x16 latents, packed 2x2 -> 8x8 = **64 image tokens**
(tiny-sd3 has 64 too). A text-to-image call attends over 32 text + 64 = 96 tokens; an edit over
32 text + 64 target + 64 context = **160** (``[text | target | context]``, the context's ids
with first coordinate 1).

**64 px calls** (``ShapesKontextPipeline``'s defaults). ``FluxKontextPipeline`` resizes twice,
both for FLUX.1 at ~1 megapixel: (1) the *output* size becomes sqrt(max_area * aspect), with
``max_area`` 1024**2 by default, so a 64x64 request comes out 1024x1024; (2) with
``_auto_resize=True`` the *context image* is resized to the nearest of its 17 preferred
resolutions (672-1568 px a side: 1024x1024 for a square), 16,384 context tokens for a model
trained on 64. The testbed pipeline therefore sets ``max_area = height * width`` and
``_auto_resize=False``; the sides are then only floored to multiples of 8 px (2 x the VAE
factor), which 64 already is, and the output size defaults to the context image's (64x64).

``preset="tiny"`` shrinks the transformer and text encoders (1 + 1 blocks of 2 heads x 16) for
tests, with the same VAE, tokenizer and token counts.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline,
                       FluxTransformer2DModel)

from ..errors import ModelLoadError, UsageError
from ..tokenizers import clip_tokenizer
from .edits import edit_vocabulary
from .pipelines import CallDefaults
from .video_models import parameter_counts
from .world import SIZE, vocabulary

TEXT_LENGTH = 32  # tokens per caption or instruction, BOS and EOS included (the longest v2 caption needs 32)
VAE_FACTOR = 4  # the world VAE: 64 px -> 16 latent px
LATENT_CHANNELS = 4
PACK = 2  # FLUX packs 2x2 latent patches into one token
VAE_FOLDER = ("tiny-sd3", "vae")  # under testbed.assets_dir(): the shipped world-v2 VAE

PRESETS: dict[str, dict] = {
    "base": dict(
        transformer=dict(double=3, single=6, heads=4, head_dim=32, rope=(8, 12, 12)),
        clip=dict(hidden=64, layers=2, heads=2),
        t5=dict(d_model=64, layers=2, heads=4, d_kv=16, d_ff=128),
    ),
    "tiny": dict(
        transformer=dict(double=1, single=1, heads=2, head_dim=16, rope=(4, 6, 6)),
        clip=dict(hidden=16, layers=1, heads=2),
        t5=dict(d_model=16, layers=1, heads=2, d_kv=8, d_ff=32),
    ),
}

# Call defaults of ShapesKontextPipeline (module notes); steps and guidance as tiny-sd3's until a
# sweep on training seeds picks them.
KONTEXT_DEFAULTS = dict(num_inference_steps=20, true_cfg_scale=5.0, max_sequence_length=TEXT_LENGTH,
                        _auto_resize=False)


def _preset(name: str) -> dict:
    if name not in PRESETS:
        raise UsageError(f"unknown tiny-kontext preset {name!r}; choose one of {list(PRESETS)}")
    return PRESETS[name]


def make_kontext_tokenizer():
    """The word-level tokenizer of captions and instructions: the world's v1 words, then (after
    BOS and EOS) the v2 words, then the edit words, so ``models.make_tokenizer(2)``'s ids are a
    prefix of it: every v2 caption encodes to the same ids."""
    v1 = vocabulary(1)
    return clip_tokenizer(v1, model_max_length=TEXT_LENGTH, extra_words=vocabulary(2)[len(v1):] + edit_vocabulary())


def transformer_config(preset: str = "base") -> dict:
    """``FluxTransformer2DModel`` kwargs: 16-channel packed tokens, text width = the T5 encoder's,
    pooled width = the CLIP encoder's."""
    p = _preset(preset)
    t = p["transformer"]
    if sum(t["rope"]) != t["head_dim"]:
        raise UsageError(f"preset {preset!r}: the RoPE axes {t['rope']} must sum to the head dim {t['head_dim']}")
    return dict(patch_size=1, in_channels=LATENT_CHANNELS * PACK * PACK, num_layers=t["double"],
                num_single_layers=t["single"], attention_head_dim=t["head_dim"], num_attention_heads=t["heads"],
                joint_attention_dim=p["t5"]["d_model"], pooled_projection_dim=p["clip"]["hidden"],
                guidance_embeds=False, axes_dims_rope=tuple(t["rope"]))


def clip_text_encoder(tokenizer, preset: str = "base", seed: int = 0):
    """A small ``CLIPTextModel`` (pooled at the configured EOS id) over ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    c = _preset(preset)["clip"]
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=c["hidden"], intermediate_size=2 * c["hidden"],
                            num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                            max_position_embeddings=tokenizer.model_max_length, projection_dim=c["hidden"],
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def t5_text_encoder(tokenizer, preset: str = "base", seed: int = 0):
    """A small ``T5EncoderModel`` (FLUX's text-stream encoder class; no dropout, so training is
    deterministic) over ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    t = _preset(preset)["t5"]
    config = T5Config(vocab_size=len(tokenizer), d_model=t["d_model"], d_kv=t["d_kv"], d_ff=t["d_ff"],
                      num_heads=t["heads"], num_layers=t["layers"], relative_attention_num_buckets=8,
                      relative_attention_max_distance=TEXT_LENGTH, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def kontext_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flow matching with a static shift of 1 (training samples t logit-normally, as tiny-sd3);
    no dynamic shift, so the pipeline's ``mu`` for its token count is ignored."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def shipped_vae_path() -> Path:
    from . import assets_dir

    return assets_dir().joinpath(*VAE_FOLDER)


def load_world_vae(path=None) -> AutoencoderKL:
    """The world-v2 VAE (default: the shipped ``assets/tiny-sd3/vae``), checked to be what
    tiny-kontext is built for: 4 latent channels, factor 4."""
    path = Path(path) if path is not None else shipped_vae_path()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no VAE at {path} (no config.json); pass the folder of the world-v2 AutoencoderKL "
                             "(assets/tiny-sd3/vae, or a data folder's vae/)")
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        from . import load_failure

        raise ModelLoadError(load_failure(path, e)) from e
    check_vae(vae)
    return vae.eval()


def check_vae(vae) -> None:
    """A :class:`UsageError` unless ``vae`` is an AutoencoderKL with 4 latent channels and factor 4."""
    if not isinstance(vae, AutoencoderKL):
        raise UsageError(f"tiny-kontext takes an AutoencoderKL, got {type(vae).__name__}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if vae.config.latent_channels != LATENT_CHANNELS or factor != VAE_FACTOR:
        raise UsageError(f"tiny-kontext is built for the world VAE ({LATENT_CHANNELS} latent channels, factor "
                         f"{VAE_FACTOR}); this one has {vae.config.latent_channels} channels, factor {factor}")


def build_kontext(preset: str = "base", vae=None, seed: int = 0) -> FluxKontextPipeline:
    """A fresh (untrained) tiny-kontext ``ShapesKontextPipeline`` around the world VAE.

    vae: an ``AutoencoderKL`` (checked: 4 channels, factor 4), a folder holding one, or None for
    the shipped world-v2 VAE. fp32, eval mode, progress bar off."""
    if vae is None or isinstance(vae, (str, os.PathLike)):
        vae = load_world_vae(vae)
    check_vae(vae)
    tokenizer, tokenizer_2 = make_kontext_tokenizer(), make_kontext_tokenizer()
    text_encoder = clip_text_encoder(tokenizer, preset, seed)
    text_encoder_2 = t5_text_encoder(tokenizer_2, preset, seed + 1)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**transformer_config(preset))
    pipe = ShapesKontextPipeline(scheduler=kontext_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                                 image_encoder=None, feature_extractor=None)
    for m in (text_encoder, text_encoder_2, transformer, vae):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_hw(size: int = SIZE) -> tuple[int, int]:
    """Spatial latents (h, w) of a ``size`` px square, floored to whole 2x2 patches as
    ``FluxKontextPipeline.prepare_latents`` does."""
    unit = VAE_FACTOR * PACK
    if size % unit or size < unit:
        raise UsageError(f"tiny-kontext images have sides that are multiples of {unit} px, got {size}")
    return (size // VAE_FACTOR, size // VAE_FACTOR)


def tokens_per_image(size: int = SIZE) -> int:
    """Image tokens of one ``size`` px square: (size / 4 / 2)^2 (64 at 64 px)."""
    h, w = latent_hw(size)
    return (h // PACK) * (w // PACK)


def _image_hw(image) -> tuple[int, int] | None:
    """(height, width) of a context image as the pipeline reads it (PIL, array, tensor, or a list)."""
    from PIL import Image

    img = image[0] if isinstance(image, (list, tuple)) and image else image
    if isinstance(img, Image.Image):
        return img.size[1], img.size[0]  # PIL sizes are (w, h)
    if torch.is_tensor(img):
        return tuple(img.shape[-2:])  # [..., 3, H, W]
    if hasattr(img, "shape"):
        return tuple(img.shape[-3:-1]) if img.shape[-1] in (1, 3, 4) else tuple(img.shape[-2:])  # [H, W, C]
    return None


def _empty_negative(prompt, kwargs: dict, default_cfg: float) -> dict:
    """``kwargs`` with the empty negative prompt (one per prompt) that true CFG needs to run at
    all (diffusers runs it only with a negative prompt), unless the caller gave one or CFG is off."""
    if (kwargs.get("true_cfg_scale", default_cfg) > 1 and prompt is not None
            and kwargs.get("negative_prompt") is None and kwargs.get("negative_prompt_embeds") is None):
        kwargs["negative_prompt"] = "" if isinstance(prompt, str) else [""] * len(prompt)
    return kwargs


class ShapesKontextPipeline(CallDefaults, FluxKontextPipeline):
    """``FluxKontextPipeline`` defaulting to the tiny-kontext settings (module notes): the output
    size is the context image's (64x64 without one), ``max_area = height * width`` and no
    auto-resize (so 64 px stays 64 px), 32 text tokens, 20 steps, and classifier-free guidance
    ``true_cfg_scale`` 5 with an empty negative prompt for every prompt of the batch."""

    default_call_kwargs = KONTEXT_DEFAULTS

    def __call__(self, image=None, prompt=None, *args, **kwargs):
        height, width = kwargs.get("height"), kwargs.get("width")
        if height is None and width is None and image is not None:
            height, width = _image_hw(image) or (SIZE, SIZE)
            if torch.is_tensor(image) and image.ndim == 4 and image.shape[1] == self.latent_channels:
                height, width = height * self.vae_scale_factor, width * self.vae_scale_factor  # image latents
        kwargs["height"], kwargs["width"] = height or SIZE, width or SIZE
        kwargs.setdefault("max_area", kwargs["height"] * kwargs["width"])
        return super().__call__(image, prompt, *args, **_empty_negative(prompt, kwargs,
                                                                       KONTEXT_DEFAULTS["true_cfg_scale"]))


class ShapesFluxPipeline(CallDefaults, FluxPipeline):
    """``FluxPipeline`` over tiny-kontext's modules: the testbed's FLUX text-to-image model (the
    loops that refuse an in-context editor, A-STAR, UAM, IR-Diffusion, serve it through the FLUX
    adapter). 64x64, 32 text tokens, 20 steps, ``true_cfg_scale`` 5 with an empty negative prompt,
    as :class:`ShapesKontextPipeline` without a context image."""

    default_call_kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=20, true_cfg_scale=5.0,
                               max_sequence_length=TEXT_LENGTH)

    def __call__(self, prompt=None, *args, **kwargs):
        return super().__call__(prompt, *args, **_empty_negative(prompt, kwargs,
                                                                self.default_call_kwargs["true_cfg_scale"]))


def text_to_image(pipe: FluxKontextPipeline) -> ShapesFluxPipeline:
    """The text-to-image view of a tiny-kontext pipeline: a :class:`ShapesFluxPipeline` sharing its
    modules (no copy; an attached control or a weight edit shows in both). Without a context
    image it generates what the editor generates (tested)."""
    if not isinstance(pipe, FluxKontextPipeline):
        raise UsageError(f"text_to_image takes a FluxKontextPipeline (tiny-kontext); got {type(pipe).__name__}")
    names = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
    view = ShapesFluxPipeline(**{n: getattr(pipe, n) for n in names})
    view.set_progress_bar_config(disable=True)
    return view


def load_kontext(path, **kwargs) -> ShapesKontextPipeline:
    """An exported tiny-kontext folder (``python -m diffattn.testbed.train_kontext export``) as a
    ``ShapesKontextPipeline``, offline, from safetensors only; a :class:`ModelLoadError` when the
    folder cannot be loaded."""
    from . import load_failure

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"no tiny-kontext model at {path} (no model_index.json); export one with "
                             "`python -m diffattn.testbed.train_kontext export --run RUN --to FOLDER`")
    kwargs.setdefault("use_safetensors", True)
    for absent in ("image_encoder", "feature_extractor"):
        kwargs.setdefault(absent, None)
    try:
        pipe = ShapesKontextPipeline.from_pretrained(os.fspath(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(load_failure(path, e, kwargs["use_safetensors"])) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["build_kontext", "make_kontext_tokenizer", "transformer_config", "clip_text_encoder", "t5_text_encoder",
           "kontext_scheduler", "load_world_vae", "check_vae", "shipped_vae_path", "latent_hw", "tokens_per_image",
           "ShapesKontextPipeline", "ShapesFluxPipeline", "text_to_image", "load_kontext", "parameter_counts", "PRESETS", "KONTEXT_DEFAULTS", "TEXT_LENGTH",
           "VAE_FACTOR", "LATENT_CHANNELS"]
