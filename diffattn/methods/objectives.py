"""Named HeadHunter objectives: a small registry ``name -> factory`` that :func:`make_objective`
(the CLI's ``--objective``) reads. Importing it is cheap (no torch): frontends list the names.

The library registers ``clip`` (CLIPScore) and ``pickscore`` (PickScore, the HeadHunter paper's
objective), both in :mod:`diffattn.methods.headhunter`. The testbed's oracle objectives
(``fidelity``, ``dark``, ``outline``) are registered by ``import diffattn.testbed``
(:mod:`diffattn.testbed.objectives`); any project can add its own::

    from diffattn.methods.objectives import register_objective
    register_objective("brightness", lambda **options: my_brightness_score)

A factory takes the keyword options of :func:`make_objective` (``clip_model``,
``clip_processor``, ``template``, ``dtype``; it ignores those it has no use for) and returns an
objective: a callable ``(images, prompts) -> scores``.
"""
from __future__ import annotations

from collections.abc import Callable

from ..errors import ObjectiveError

_OBJECTIVES: dict[str, Callable] = {}
_HELP: dict[str, str] = {}
TESTBED_OBJECTIVES = ("fidelity", "dark", "outline")  # registered by `import diffattn.testbed`


def register_objective(name: str, factory: Callable, *, help: str = "", replace: bool = False) -> Callable:
    """Register ``factory(**options) -> objective`` under ``name``; returns the factory.
    A name taken by another factory is an :class:`ObjectiveError` unless ``replace=True``."""
    if not isinstance(name, str) or not name:
        raise ObjectiveError(f"an objective name is a non-empty string, got {name!r}")
    if not callable(factory):
        raise ObjectiveError(f"the factory of objective {name!r} must be callable, got {factory!r}")
    if name in _OBJECTIVES and _OBJECTIVES[name] is not factory and not replace:
        raise ObjectiveError(f"objective {name!r} is registered already; pass replace=True to override it")
    _OBJECTIVES[name] = factory
    _HELP[name] = help
    return factory


def objective_names() -> tuple[str, ...]:
    """The registered objective names, in registration order."""
    return tuple(_OBJECTIVES)


def objective_help(name: str) -> str:
    """The one-line description given at registration ("" if none)."""
    return _HELP.get(name, "")


def make_objective(name, *, clip_model: str | None = None, clip_processor: str | None = None,
                   template: str | None = None, dtype=None) -> Callable:
    """An objective by name (the CLI's ``--objective``), or ``name`` itself if it is already a
    callable ``(images, prompts) -> scores``. ``clip`` / ``pickscore`` take ``clip_model``
    (default: the public CLIP-L / PickScore_v1 models), ``clip_processor`` and ``template``;
    ``fidelity``, ``dark``, ``outline`` are the testbed oracles (after ``import diffattn.testbed``)."""
    if callable(name):
        return name
    if name not in _OBJECTIVES:
        hint = ""
        missing = [n for n in TESTBED_OBJECTIVES if n not in _OBJECTIVES]
        if missing:
            hint = f" (the testbed objectives {', '.join(missing)} come with `import diffattn.testbed`)"
        raise ObjectiveError(f"unknown objective {name!r}; choose one of {', '.join(_OBJECTIVES)}{hint}")
    return _OBJECTIVES[name](clip_model=clip_model, clip_processor=clip_processor, template=template, dtype=dtype)


def _clip(*, clip_model=None, clip_processor=None, template=None, dtype=None, **_):
    from .headhunter import DEFAULT_CLIP_MODEL, clip_score

    return clip_score(clip_model or DEFAULT_CLIP_MODEL, processor=clip_processor, template=template, dtype=dtype)


def _pickscore(*, clip_model=None, clip_processor=None, template=None, dtype=None, **_):
    from .headhunter import DEFAULT_PICKSCORE_MODEL, pick_score

    return pick_score(clip_model or DEFAULT_PICKSCORE_MODEL, processor=clip_processor, template=template, dtype=dtype)


register_objective("clip", _clip, help="CLIPScore of a CLIP model (--clip-model; default openai/clip-vit-large-patch14)")
register_objective("pickscore", _pickscore,
                   help="PickScore of a CLIP-H model (--clip-model; default yuvalkirstain/PickScore_v1)")
