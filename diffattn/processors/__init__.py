"""The processor core every family shares (:mod:`.base`): build the call, run the controls,
one kernel call.

The per-family processors, each a mirror of its stock diffusers processor, live in their
family's file (:mod:`diffattn.families`): ``UNetProcessor`` (``AttnProcessor2_0``),
``SD3Processor`` (``JointAttnProcessor2_0``), ``FluxProcessor`` (``FluxAttnProcessor``),
``WanProcessor`` (``WanAttnProcessor``). ``PROCESSORS`` / ``MIRRORED`` read the registry.
"""
from ..kernels import uniform_keys_attention  # lives in diffattn.kernels.composite; re-exported here
from .base import DiffattnProcessor, kernel_spec, run_controls, run_kernel, run_taps

_FAMILY_PROCESSORS = {"UNetProcessor": "unet", "SD3Processor": "sd3", "FluxProcessor": "flux", "WanProcessor": "wan",
                      "HunyuanVideoProcessor": "hunyuan_video"}


def __getattr__(name: str):
    from ..families import families, get_family

    if name == "PROCESSORS":  # {family name: its processor class}
        return {f.name: f.processor for f in families()}
    if name == "MIRRORED":  # {family name: stock processor class names it reproduces}
        return {f.name: f.mirrored for f in families()}
    if name in _FAMILY_PROCESSORS:
        return get_family(_FAMILY_PROCESSORS[name]).processor
    raise AttributeError(f"module 'diffattn.processors' has no attribute {name!r}")


__all__ = ["MIRRORED", "DiffattnProcessor", "FluxProcessor", "SD3Processor", "UNetProcessor", "WanProcessor", "PROCESSORS",
           "kernel_spec", "run_controls", "run_kernel", "run_taps", "uniform_keys_attention"]
