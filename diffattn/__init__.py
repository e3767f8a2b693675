"""diffattn: attention control for Hugging Face diffusers.

    import diffattn as da
    da.sites(pipe)                       # every attention module, with stable names
    with da.attach(pipe, da.SoftPAG(heads="all", strength=0.5, scale=3.0)):
        image = pipe("a red circle left of a blue square").images[0]
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names -> module that defines them. Resolved lazily so `import diffattn` stays
# cheap (the CLI's --help must not import torch-heavy modules it does not need).
_EXPORTS = {
    "Site": "diffattn.sites",
    "select": "diffattn.sites",
    "select_heads": "diffattn.sites",
    "format_sites": "diffattn.sites",
    "attach": "diffattn.engine",
    "Handle": "diffattn.engine",
    "Control": "diffattn.controls",
    "AttentionCall": "diffattn.controls",
    "AttentionSpec": "diffattn.controls",
    "Tap": "diffattn.controls",
    "TokenLayout": "diffattn.layout",
    "Segment": "diffattn.layout",
    "GuidanceWrapper": "diffattn.guidance",
    "StepWindow": "diffattn.controls",
    "StepState": "diffattn.controls",
    "UniformKeys": "diffattn.controls",
    "SoftPAG": "diffattn.methods.softpag",
    "SoftPAGGuidance": "diffattn.guiders",
    "UniformAttention": "diffattn.methods.uniform",
    "ContextRepulsion": "diffattn.methods.repulsion",
    "CADS": "diffattn.methods.cads",
    "IsolationAttention": "diffattn.methods.ir",
    "RepositionAttention": "diffattn.methods.ir",
    "MutualCrossAttention": "diffattn.methods.ir",
    "ConsistentSelfAttention": "diffattn.methods.ir",
    "IntervalGuidance": "diffattn.methods.interval",
    "LatentParticleGuidance": "diffattn.methods.particle",
    "HeadHunter": "diffattn.methods.headhunter",
    "clip_score": "diffattn.methods.headhunter",
    "pick_score": "diffattn.methods.headhunter",
    "make_objective": "diffattn.methods.objectives",
    "register_objective": "diffattn.methods.objectives",
    "objective_names": "diffattn.methods.objectives",
    "PromptToPromptReplace": "diffattn.methods.p2p",
    "ValueMix": "diffattn.methods.vmix",
    "RectifiedSparseAttention": "diffattn.methods.spaattn",
    "ContextShareProbe": "diffattn.methods.decontext",
    # DeContext protection is a loop, not a control: da.protect(image, pipe) is the entry point
    "protect": "diffattn.pipelines.decontext",
    "DeContextProtector": "diffattn.pipelines.decontext",
    "DeContextConfig": "diffattn.pipelines.decontext",
    "DiffattnError": "diffattn.errors",
    "SelectorError": "diffattn.errors",
    "UnsupportedModelError": "diffattn.errors",
    "ControlError": "diffattn.errors",
    "LayoutError": "diffattn.errors",
    "ConfigError": "diffattn.errors",
    "ConceptError": "diffattn.errors",
    "ObjectiveError": "diffattn.errors",
    "ImageInputError": "diffattn.errors",
    "EditPromptError": "diffattn.errors",
    "KernelError": "diffattn.errors",
    "MethodError": "diffattn.errors",
    "UnknownMethodError": "diffattn.errors",
    "UsageError": "diffattn.errors",
    "LimitError": "diffattn.errors",
    "PathError": "diffattn.errors",
    "ModelLoadError": "diffattn.errors",
    "WorkflowError": "diffattn.errors",
    # the method registry (what the CLI, the app and the node pack offer); `da.methods` is the
    # subpackage, so the listing is `diffattn.methods.registry.methods()`
    "Method": "diffattn.methods.registry",
    "Param": "diffattn.methods.registry",
    "get_method": "diffattn.methods.registry",
    "register_method": "diffattn.methods.registry",
}


# `da.sites(...)` is a function that shares its name with the module defining it: bind it
# eagerly, so a later `import diffattn.sites` cannot shadow it with the module.
from .sites import sites  # noqa: E402


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffattn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
