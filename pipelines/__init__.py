"""Ready pipelines for methods that change the sampling loop (A-STAR, UAM, IR-Diffusion, DeContext).

    from diffattn.pipelines import AStarPipeline, AStarConfig
"""
from __future__ import annotations

import contextlib
import importlib

# Public names -> defining module, resolved lazily (importing diffattn.pipelines stays cheap).
_EXPORTS = {
    "AStarPipeline": "diffattn.pipelines.astar",
    "AStarConfig": "diffattn.pipelines.astar",
    "AStarOutput": "diffattn.pipelines.astar",
    "UAMPipeline": "diffattn.pipelines.uam",
    "UAMConfig": "diffattn.pipelines.uam",
    "Inversion": "diffattn.pipelines.uam",
    "Reconstruction": "diffattn.pipelines.uam",
    "EditOutput": "diffattn.pipelines.uam",
    "PromptToPromptReplace": "diffattn.methods.p2p",
    "ImageInputError": "diffattn.pipelines.uam",
    "EditPromptError": "diffattn.pipelines.uam",
    "psnr": "diffattn.pipelines.uam",
    "ssim": "diffattn.pipelines.uam",
}


def configure(config, default_cls, overrides: dict, error_cls, method: str):
    """``config`` (or ``default_cls()``) with keyword ``overrides`` replacing its fields, validated.

    An override that is not a field raises ``error_cls`` naming the fields there are.
    """
    from dataclasses import fields, replace

    names = {f.name for f in fields(default_cls)}
    bad = set(overrides) - names
    if bad:
        raise error_cls(f"unknown {method} option(s) {sorted(bad)}; {default_cls.__name__} has {sorted(names)}")
    return replace(config or default_cls(), **overrides).validate()


def flow_timestep_kwargs(scheduler_config, num_steps: int, image_seq_len: int, *, flux: bool = False) -> dict:
    """``set_timesteps`` keywords of a flow-matching pipeline, as SD3's and FLUX's pipelines
    compute them: FLUX's σ = linspace(1, 1/n, n) (``flux``, unless the scheduler makes its own
    flow sigmas) and, with dynamic shifting, μ from the image's token count (max_shift default
    1.15 on FLUX, 1.16 on SD3)."""
    import numpy as np
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    c = scheduler_config
    kw = {}
    if flux and not c.get("use_flow_sigmas", False):
        kw["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
    if c.get("use_dynamic_shifting", False):
        kw["mu"] = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                   c.get("base_shift", 0.5), c.get("max_shift", 1.15 if flux else 1.16))
    return kw


def latent_stats(vae, like):
    """(mean, std) ``[1, C, 1, 1]`` like ``like`` of a VAE that standardises its latents per
    channel (``latents_mean`` / ``latents_std`` in its config, some SDXL VAEs), else (None, None)."""
    import torch

    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None, None
    return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)


@contextlib.contextmanager
def vae_upcast(vae):
    """Run an fp16 VAE in fp32 where its config asks (``force_upcast``: SDXL's VAE overflows in
    fp16), as the diffusers pipelines do; its dtype is restored after."""
    import torch

    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(torch.float16)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffattn.pipelines' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
