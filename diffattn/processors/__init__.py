"""One processor per model family; each mirrors the stock diffusers processor exactly."""
from .base import DiffattnProcessor
from .flux import FluxProcessor
from .sd3 import SD3Processor
from .unet import UNetProcessor
from .wan import WanProcessor

PROCESSORS = {"unet": UNetProcessor, "sd3": SD3Processor, "flux": FluxProcessor, "wan": WanProcessor}

__all__ = ["DiffattnProcessor", "FluxProcessor", "SD3Processor", "UNetProcessor", "WanProcessor", "PROCESSORS"]
