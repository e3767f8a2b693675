"""The shapes-world testbed: renderer, oracle, tiny trained models and evaluation harness.

    from diffattn import testbed
    pipe = testbed.load("tiny-sd3")            # a StableDiffusion3Pipeline, offline
    image = pipe("a red circle left of a blue square").images[0]
    testbed.oracle.score(image, "a red circle left of a blue square")
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelLoadError

MODELS = ("tiny-sd", "tiny-sd3")  # the image models (the app and the image harnesses iterate these)
VIDEO_MODELS = ("tiny-wan",)  # loaded by ``video_models.load_wan``
EDITOR_MODELS = ("tiny-kontext",)  # FluxKontextPipeline, loaded by ``kontext_models.load_kontext``
SHIPPED = MODELS + VIDEO_MODELS + EDITOR_MODELS  # every name ``load()`` takes
DEFAULT_MODEL = "tiny-sd3"


def assets_dir() -> Path:
    """Folder of the shipped testbed models (``assets/`` at the repository root, or the
    ``DIFFATTN_ASSETS`` environment variable)."""
    env = os.environ.get("DIFFATTN_ASSETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "assets"


def model_path(name: str) -> Path:
    if name not in SHIPPED:
        raise ModelLoadError(f"unknown testbed model {name!r}; the testbed ships {list(SHIPPED)}")
    path = assets_dir() / name
    if not (path / "model_index.json").exists():
        raise ModelLoadError(
            f"testbed model {name!r} not found at {path}; train and export it with "
            f"`python -m diffattn.testbed.{_TRAINERS.get(name, 'train')}` (see the README) or set DIFFATTN_ASSETS"
        )
    return path


MARKER = "testbed.json"  # written by `train export`: {"model": "tiny-sd3"}
_TRAINERS = {"tiny-wan": "train_video", "tiny-kontext": "train_kontext"}  # the module that trains each model


def testbed_kind(path) -> str | None:
    """Which testbed model a pipeline folder holds (its ``testbed.json``), or None."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    import json

    try:
        record = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{marker} is not readable JSON ({e}); it should read {{\"model\": \"tiny-sd3\"}} "
                             f"(one of {list(MODELS)}), as `python -m diffattn.testbed.train export` writes it") from None
    kind = record.get("model") if isinstance(record, dict) else None
    if kind not in SHIPPED:
        raise ModelLoadError(f"{marker} names {kind!r}; expected {{\"model\": one of {list(SHIPPED)}}}")
    return kind


def load(name: str = DEFAULT_MODEL, **kwargs):
    """Load a testbed model as an ordinary diffusers pipeline, fully offline.

    ``name`` is ``tiny-sd`` / ``tiny-sd3`` (the shipped assets) or the folder of an
    exported testbed model (``python -m diffattn.testbed.train export``). ``tiny-sd`` is a
    ``StableDiffusionPipeline``, ``tiny-sd3`` a ``StableDiffusion3Pipeline`` (subclasses
    whose call defaults suit the tiny models: steps, guidance, and no T5 padding tokens for
    SD3). Extra keyword arguments go to ``from_pretrained``.

    Weights load from safetensors only (``use_safetensors=True``); pass ``use_safetensors=None``
    (diffusers' default: safetensors where present, else pickle) to accept a ``.bin`` checkpoint you
    trust. A folder that cannot be loaded (missing or
    truncated weights, a malformed config) is a :class:`~diffattn.errors.ModelLoadError`.
    """
    from .pipelines import ShapesSD3Pipeline, ShapesSDPipeline

    if name in SHIPPED:
        path = model_path(name)
    else:
        path = Path(name)
        kind = testbed_kind(path)
        if kind is None:
            raise ModelLoadError(
                f"{name!r} is neither a testbed model name {list(SHIPPED)} nor a folder "
                f"exported by `python -m diffattn.testbed.train export` (no {MARKER})"
            )
        name = kind
    if name in VIDEO_MODELS:
        from .video_models import load_wan

        return load_wan(path, **kwargs)
    if name in EDITOR_MODELS:  # tiny-kontext: a ShapesKontextPipeline, also the testbed's FLUX text-to-image model
        from .kontext_models import load_kontext

        return load_kontext(path, **kwargs)
    cls = {"tiny-sd": ShapesSDPipeline, "tiny-sd3": ShapesSD3Pipeline}[name]
    if name == "tiny-sd3":  # components the tiny SD3 does not have
        for absent in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
            kwargs.setdefault(absent, None)
    kwargs.setdefault("use_safetensors", True)
    try:
        pipe = cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # diffusers: OSError for missing / truncated weights
        raise ModelLoadError(load_failure(path, e, kwargs["use_safetensors"])) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_failure(path, error: BaseException, use_safetensors: bool | None = True) -> str:
    """One line on why the pipeline folder ``path`` did not load (for :class:`ModelLoadError`)."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.replace("Please check out the root cause in the stacktrace above.", "(--debug shows the cause)")
    hint = ""
    if "outgoing traffic has been disabled" in text or "not fully cached" in text:
        hint = f" (download it first, e.g. `hf download {path}`, or allow downloads: unset HF_HUB_OFFLINE)"
    elif use_safetensors is True and ("safetensors" in text or ".bin" in text) and "no file named" in text.lower():
        hint = (" (diffattn loads safetensors weights only; for a pickle .bin checkpoint you trust, pass "
                "--allow-pickle / use_safetensors=None)")
    return f"cannot load the pipeline at {path}: {text}{hint}"


def __getattr__(name):  # lazy submodules: `testbed.oracle`, `testbed.evaluate`...
    import importlib

    if name in {"world", "oracle", "evaluate", "models", "train", "pipelines", "defaults",
                "video", "video_oracle", "video_models", "train_video", "edits", "kontext_models",
                "train_kontext"}:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)


from . import objectives  # noqa: E402,F401  (registers the oracle objectives: fidelity, dark, outline)
