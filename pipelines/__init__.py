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
    "IRDiffusionPipeline": "diffattn.pipelines.ir",
    "IRConfig": "diffattn.pipelines.ir",
    "IRDiffusionOutput": "diffattn.pipelines.ir",
    "PromptToPromptReplace": "diffattn.methods.p2p",
    "ImageInputError": "diffattn.pipelines.uam",
    "EditPromptError": "diffattn.pipelines.uam",
    "psnr": "diffattn.pipelines.uam",
    # shared diffusers glue lives with the families; importable from here too
    "flow_timestep_kwargs": "diffattn.families.base",
    "latent_stats": "diffattn.families.base",
    "vae_upcast": "diffattn.families.base",
    "ssim": "diffattn.pipelines.uam",
    "DeContextProtector": "diffattn.pipelines.decontext",
    "DeContextConfig": "diffattn.pipelines.decontext",
    "ProtectionResult": "diffattn.pipelines.decontext",
    "protect": "diffattn.pipelines.decontext",
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


@contextlib.contextmanager
def frozen_weights(*modules):
    """Within the block, gradients flow to the inputs only (the latent, the pixels): weights
    that require grad would make autograd keep activations for their gradients too (about 20%
    more memory per gradient pass). Their flags are restored after."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffattn.pipelines' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
