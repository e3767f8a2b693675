"""Ready pipelines for methods that change the sampling loop (A-STAR, UAM, IR-Diffusion, DeContext).

    from diffattn.pipelines import AStarPipeline, AStarConfig
"""
from __future__ import annotations

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
    "PromptToPromptReplace": "diffattn.pipelines.uam",
    "ImageInputError": "diffattn.pipelines.uam",
    "EditPromptError": "diffattn.pipelines.uam",
    "psnr": "diffattn.pipelines.uam",
    "ssim": "diffattn.pipelines.uam",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffattn.pipelines' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
