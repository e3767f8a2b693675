"""Stock diffusers pipelines with call defaults that suit the tiny testbed models.

They are subclasses and change nothing but defaults, so everything that takes a
``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline`` takes them, and
``StableDiffusion3Pipeline.from_pretrained("assets/tiny-sd3")`` loads the same weights
(pass ``max_sequence_length=0`` there: the tiny SD3 was trained without T5 padding tokens).
"""
from __future__ import annotations

from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

# Chosen by a sweep on training seeds (benchmarks/testbed_defaults.py; RESULTS.md, "Testbed defaults").
SD_DEFAULTS = dict(num_inference_steps=20, guidance_scale=5.0)
SD3_DEFAULTS = dict(num_inference_steps=20, guidance_scale=5.0, max_sequence_length=0)


class CallDefaults:
    """Mixin before a diffusers pipeline class: ``default_call_kwargs`` fill the call's unset
    keywords (and diffattn's loops read them through ``PipelineAdapter.call_defaults``)."""

    default_call_kwargs: dict = {}

    def __call__(self, *args, **kwargs):
        for key, value in self.default_call_kwargs.items():
            kwargs.setdefault(key, value)
        return super().__call__(*args, **kwargs)


class ShapesSDPipeline(CallDefaults, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` defaulting to the tiny-sd settings."""

    default_call_kwargs = SD_DEFAULTS


class ShapesSD3Pipeline(CallDefaults, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` defaulting to the tiny-sd3 settings (no T5 tokens)."""

    default_call_kwargs = SD3_DEFAULTS
