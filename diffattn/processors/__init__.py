"""One processor per model family; each mirrors the stock diffusers processor exactly.

=======  =================================  ==========================================
family   stock processor mirrored           models
=======  =================================  ==========================================
unet     ``AttnProcessor2_0``               SD1.5, SD2, SDXL ``UNet2DConditionModel``
sd3      ``JointAttnProcessor2_0``          SD3, SD3.5 (incl. dual-attention ``attn2``)
flux     ``FluxAttnProcessor``              FLUX.1, FLUX.1 Kontext
wan      ``WanAttnProcessor``               Wan 2.1 / 2.2 (T2V, I2V)
=======  =================================  ==========================================
"""
from ..kernels import uniform_keys_attention  # lives in diffattn.kernels.composite; re-exported here
from .base import DiffattnProcessor, kernel_spec, run_controls, run_kernel, run_taps
from .flux import FluxProcessor
from .sd3 import SD3Processor
from .unet import UNetProcessor
from .wan import WanProcessor

PROCESSORS = {"unet": UNetProcessor, "sd3": SD3Processor, "flux": FluxProcessor, "wan": WanProcessor}

# Stock processors (by class name) whose computation ours reproduce; anything else installed on a
# site (IP-Adapter, custom processors) would be silently dropped by the swap, so attach refuses it.
MIRRORED = {
    "unet": ("AttnProcessor2_0", "AttnProcessor", "FusedAttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU"),
    "sd3": ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0", "XFormersJointAttnProcessor"),
    "flux": ("FluxAttnProcessor", "FluxAttnProcessor2_0", "FusedFluxAttnProcessor2_0"),
    "wan": ("WanAttnProcessor", "WanAttnProcessor2_0"),
}

__all__ = ["MIRRORED", "DiffattnProcessor", "FluxProcessor", "SD3Processor", "UNetProcessor", "WanProcessor", "PROCESSORS",
           "kernel_spec", "run_controls", "run_kernel", "run_taps", "uniform_keys_attention"]
