"""Model families: everything diffattn knows about one kind of denoiser, in one file each.

=============  ============================================  =========================================================
family         denoiser (diffusers)                          pipelines served by its adapters
=============  ============================================  =========================================================
unet           ``UNet2DConditionModel`` (SD1.5, SD2, SDXL)   ``StableDiffusionPipeline``, ``...XLPipeline``
sd3            ``SD3Transformer2DModel`` (SD3, SD3.5)        ``StableDiffusion3Pipeline``
flux           ``FluxTransformer2DModel`` (FLUX.1, Kontext)  ``FluxPipeline``; editor: ``FluxKontextPipeline``
wan            ``WanTransformer3DModel`` (Wan 2.1 / 2.2)     (controls only: no diffattn loop yet)
hunyuan_video  ``HunyuanVideoTransformer3DModel``            (controls only; the text-only token refiner gets no site)
=============  ============================================  =========================================================

A :class:`~diffattn.families.base.Family` owns, for its denoiser: detection of its attention
modules, their site kinds, its processor (a mirror of the stock diffusers processor), its
token layout, its per-forward record (read by its processor through
``ForwardContext.info``) and the pipeline adapters that diffattn's own sampling loops
(``diffattn.pipelines``) call instead of testing ``family == ...``.

Adding a family is one new file with a ``Family`` subclass and one line in
:data:`_BUILTIN` (or :func:`register_family` from user code): the engine, sites, guidance
and pipelines read the registry, never a family name.
"""
from __future__ import annotations

import importlib

from ..errors import UnsupportedModelError
from .base import Family, PipelineAdapter, RunState

# Built-in families, in detection order: module path -> class name (imported on first use, so
# `import diffattn` stays cheap).
_BUILTIN = {
    "unet": ("diffattn.families.unet", "UNetFamily"),
    "sd3": ("diffattn.families.sd3", "SD3Family"),
    "flux": ("diffattn.families.flux", "FluxFamily"),
    "wan": ("diffattn.families.wan", "WanFamily"),
    "hunyuan_video": ("diffattn.families.hunyuan_video", "HunyuanVideoFamily"),
}
_REGISTRY: dict[str, Family] = {}
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, (module, cls) in _BUILTIN.items():
        if name not in _REGISTRY:
            _REGISTRY[name] = getattr(importlib.import_module(module), cls)()


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add ``family`` (a :class:`Family` instance) to the registry; it is tried after the
    families registered before it. Returns it (usable as a decorator on an instance)."""
    _load_builtin()
    if not isinstance(family, Family):
        raise UnsupportedModelError(f"register_family takes a diffattn.families.Family instance; got "
                                    f"{type(family).__name__}")
    if family.name in _REGISTRY and not replace:
        raise UnsupportedModelError(f"a family named {family.name!r} is registered already; pass replace=True to "
                                    f"override it, or pick another name")
    _REGISTRY[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family added with :func:`register_family` (built-ins stay)."""
    _load_builtin()
    if name in _BUILTIN:
        raise UnsupportedModelError(f"{name!r} is a built-in family and cannot be removed")
    _REGISTRY.pop(name, None)


def families() -> tuple[Family, ...]:
    """Every registered family, in detection order."""
    _load_builtin()
    return tuple(_REGISTRY.values())


def get_family(name: str) -> Family:
    """The family registered as ``name``."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedModelError(f"no model family {name!r}; known: {sorted(_REGISTRY)}") from None


def family_of(model, module) -> Family | None:
    """The family whose processor runs attention ``module`` of denoiser ``model`` (``None``: none)."""
    for fam in families():
        if fam.owns(model, module):
            return fam
    return None


def supported() -> str:
    """A sentence naming every registered family's denoisers (for error messages)."""
    return ", ".join(f.description for f in families()) + "; pass a pipeline of one of them or its .unet / .transformer"


def adapter_for(pipe, *, method: str = "this method", editor: bool = False) -> PipelineAdapter:
    """The :class:`PipelineAdapter` serving ``pipe`` (its class or a base class of it): among the
    families' text-to-image ``adapters()``, or with ``editor=True`` their in-context
    ``editor_adapters()``.

    ``UnsupportedModelError`` names the pipelines diffattn's loops support."""
    listed = (lambda fam: fam.editor_adapters()) if editor else (lambda fam: fam.adapters())
    for fam in families():
        for cls in listed(fam):
            if cls.serves(pipe):
                return cls(pipe)
    names = [n for fam in families() for cls in listed(fam) for n in cls.pipeline_names]
    raise UnsupportedModelError(
        f"{method} supports {', '.join(names)} (and their subclasses); got {type(pipe).__name__}. Load one of those "
        f"pipelines (e.g. StableDiffusionPipeline.from_pretrained(...)) and pass it"
    )


__all__ = ["Family", "PipelineAdapter", "RunState", "adapter_for", "families", "family_of", "get_family",
           "register_family", "supported", "unregister_family"]
