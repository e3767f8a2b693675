"""The shapes-world testbed: renderer, oracle, tiny trained models and evaluation harness.

    from diffattn import testbed
    pipe = testbed.load("tiny-sd3")            # a StableDiffusion3Pipeline, offline
    image = pipe("a red circle left of a blue square").images[0]
    testbed.oracle.score(image, "a red circle left of a blue square")
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DiffattnError

MODELS = ("tiny-sd", "tiny-sd3")
DEFAULT_MODEL = "tiny-sd3"


def assets_dir() -> Path:
    """Folder of the shipped testbed models (``assets/`` at the repository root, or the
    ``DIFFATTN_ASSETS`` environment variable)."""
    env = os.environ.get("DIFFATTN_ASSETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "assets"


def model_path(name: str) -> Path:
    if name not in MODELS:
        raise DiffattnError(f"unknown testbed model {name!r}; the testbed ships {list(MODELS)}")
    path = assets_dir() / name
    if not (path / "model_index.json").exists():
        raise DiffattnError(
            f"testbed model {name!r} not found at {path}; train and export it with "
            f"`python -m diffattn.testbed.train` (see the README) or set DIFFATTN_ASSETS"
        )
    return path


MARKER = "testbed.json"  # written by `train export`: {"model": "tiny-sd3"}


def testbed_kind(path) -> str | None:
    """Which testbed model a pipeline folder holds (its ``testbed.json``), or None."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    import json

    kind = json.loads(marker.read_text()).get("model")
    if kind not in MODELS:
        raise DiffattnError(f"{marker} names {kind!r}; expected one of {list(MODELS)}")
    return kind


def load(name: str = DEFAULT_MODEL, **kwargs):
    """Load a testbed model as an ordinary diffusers pipeline, fully offline.

    ``name`` is ``tiny-sd`` / ``tiny-sd3`` (the shipped assets) or the folder of an
    exported testbed model (``python -m diffattn.testbed.train export``). ``tiny-sd`` is a
    ``StableDiffusionPipeline``, ``tiny-sd3`` a ``StableDiffusion3Pipeline`` (subclasses
    whose call defaults suit the tiny models: steps, guidance, and no T5 padding tokens for
    SD3). Extra keyword arguments go to ``from_pretrained``.
    """
    from .pipelines import ShapesSD3Pipeline, ShapesSDPipeline

    if name in MODELS:
        path = model_path(name)
    else:
        path = Path(name)
        kind = testbed_kind(path)
        if kind is None:
            raise DiffattnError(
                f"{name!r} is neither a testbed model name {list(MODELS)} nor a folder "
                f"exported by `python -m diffattn.testbed.train export` (no {MARKER})"
            )
        name = kind
    cls = {"tiny-sd": ShapesSDPipeline, "tiny-sd3": ShapesSD3Pipeline}[name]
    if name == "tiny-sd3":  # components the tiny SD3 does not have
        for absent in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
            kwargs.setdefault(absent, None)
    pipe = cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def __getattr__(name):  # lazy submodules: `testbed.oracle`, `testbed.evaluate`...
    import importlib

    if name in {"world", "oracle", "evaluate", "models", "train", "pipelines", "defaults"}:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)


from . import objectives  # noqa: E402,F401  (registers the oracle objectives: fidelity, dark, outline)
