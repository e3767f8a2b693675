"""Serving safely: one pipeline copy per concurrent request, input limits, uploads, errors.

- :class:`PipelinePool`: per model, ``slots`` copies of the loaded pipeline (``copy.deepcopy``
  of the pristine pipeline, made when the model loads, before any request touches it); a
  request takes one copy for its whole run and gives it back, so a control attached by one
  request never reaches another (``slots=1``: the pipeline behind a lock). A model's slot
  count is its concurrency limit; a request for a busy model waits in the queue.
- :class:`Limits`: upload size, image side, steps, batch, HeadHunter's search size; every
  check says the limit and the flag that sets it.
- :func:`read_image`: an upload decoded with PIL (size checked before decoding), converted to
  RGB and re-encoded as PNG in memory, so the library gets pixels, never a path.
- :func:`read_json`: an uploaded JSON file (size-limited, ``json`` only: no pickle anywhere).
- :func:`endpoint`: library errors (and limit errors) become ``gr.Error`` with their one-line
  message; anything else is logged and shown as one line too, never a traceback page.
"""
from __future__ import annotations

import copy
import functools
import io
import json
import logging
import os
import queue
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("diffattn.app")


class AppInputError(ValueError):
    """Input the app refuses (over a limit, an unreadable upload, a model it may not load)."""


class ModelLoadError(AppInputError):
    """A model that cannot be loaded (offline and not cached, no such folder...)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the app's flags of the same names set them)."""

    max_upload_mb: float = 8.0    # --max-upload-mb: any uploaded file
    max_side: int = 1024          # --max-side: an uploaded image's longest side, in pixels
    max_steps: int = 50           # --max-steps: denoising / inversion steps of one request
    max_batch: int = 4            # --max-batch: images per prompt
    max_seeds: int = 8            # HeadHunter: prompt-seed pairs of a search
    max_candidates: int = 24      # HeadHunter: candidate heads of a search
    max_rounds: int = 2           # HeadHunter: rounds of a search

    def steps(self, n) -> int | None:
        if n is None or n == "":
            return None
        n = int(n)
        if n < 1:
            raise AppInputError(f"steps={n}: at least 1")
        if n > self.max_steps:
            raise AppInputError(f"steps={n} is over this server's limit of {self.max_steps} steps (--max-steps)")
        return n

    def batch(self, n) -> int:
        n = int(n or 1)
        if n < 1:
            raise AppInputError(f"images={n}: at least 1")
        if n > self.max_batch:
            raise AppInputError(f"images={n} is over this server's limit of {self.max_batch} images per request "
                                f"(--max-batch)")
        return n

    def upload(self, path: str, what: str = "upload") -> None:
        size = os.path.getsize(path)
        if size > self.max_upload_mb * 2**20:
            raise AppInputError(f"the {what} is {size / 2**20:.1f} MB; this server's limit is {self.max_upload_mb:g} MB "
                                f"(--max-upload-mb)")

    def count(self, n: int, limit: int, what: str) -> int:
        n = int(n)
        if n < 1:
            raise AppInputError(f"{what}={n}: at least 1")
        if n > limit:
            raise AppInputError(f"{what}={n} is over this server's limit of {limit}")
        return n


# ----------------------------------------------------------------------------- uploads


def _upload_path(upload) -> str:
    """The server-side temp path of a Gradio upload (a path string, a FileData-like dict or object)."""
    if isinstance(upload, dict):
        upload = upload.get("path")
    elif hasattr(upload, "path"):
        upload = upload.path
    elif hasattr(upload, "name") and not isinstance(upload, str):
        upload = upload.name
    if not isinstance(upload, str):
        raise AppInputError("no file was uploaded")
    return upload


def read_image(upload, limits: Limits):
    """An uploaded image as a fresh PIL RGB image: file size and pixel size checked before the
    pixels are decoded, decoded with PIL, re-encoded as PNG in memory and decoded again (so no
    file, path or metadata of the upload goes further)."""
    from PIL import Image, UnidentifiedImageError

    if upload is None:
        return None
    if isinstance(upload, Image.Image):  # a frontend that decoded it already
        im = upload
    else:
        path = _upload_path(upload)
        limits.upload(path, "uploaded image")
        try:
            with Image.open(path) as f:
                w, h = f.size  # header only
                if max(w, h) > limits.max_side:
                    raise AppInputError(f"the uploaded image is {w}x{h} pixels; this server takes sides up to "
                                        f"{limits.max_side} pixels (--max-side)")
                f.load()
                im = f.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise AppInputError(f"cannot read the upload as an image: {str(e).splitlines()[0]}") from None
    w, h = im.size
    if max(w, h) > limits.max_side:
        raise AppInputError(f"the image is {w}x{h} pixels; this server takes sides up to {limits.max_side} pixels "
                            f"(--max-side)")
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")


def read_json(upload, limits: Limits, what: str = "uploaded JSON"):
    """An uploaded JSON file parsed with ``json`` (size-limited)."""
    path = _upload_path(upload)
    limits.upload(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AppInputError(f"the {what} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------- models

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def load_pipeline(name: str, dtype: str = "float32", device: str = "cpu"):
    """The CLI's loader (:func:`diffattn.cli.common.load_model`) with a clear refusal when a
    model is neither a testbed model, a local diffusers folder nor available from the Hub."""
    from diffattn import testbed
    from diffattn.cli.common import load_model
    from diffattn.errors import DiffattnError

    local = os.path.isdir(name)
    if name not in testbed.MODELS and not local and not _HUB_ID.match(name):
        raise ModelLoadError(f"model {name!r}: not a testbed model ({', '.join(testbed.MODELS)}), not a local diffusers "
                             f"folder and not a Hub id (owner/name)")
    try:
        pipe = load_model(name, dtype, device)
    except DiffattnError:
        raise
    except Exception as e:  # OSError, LocalEntryNotFoundError, HFValidationError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if local:
            why = f"the folder is not a loadable diffusers pipeline ({first})"
        elif _offline():
            why = "the Hub is offline here (HF_HUB_OFFLINE) and the model is not in the local cache"
        else:
            why = f"the Hub could not provide it ({first})"
        raise ModelLoadError(f"cannot load model {name!r}: {why}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Model:
    def __init__(self, name: str, copies: list):
        self.name = name
        self.free: queue.Queue = queue.Queue()
        for p in copies:
            self.free.put(p)
        self.copies = copies
        self.busy = 0   # copies lent right now
        self.peak = 0   # most copies lent at once (how concurrent its requests ran)
        self.lock = threading.Lock()


class PipelinePool:
    """Per model, ``slots`` private copies of its pipeline; :meth:`acquire` lends one.

    loader:  ``loader(name) -> pipeline`` (default :func:`load_pipeline`).
    allowed: if given, the only model names requests may load (others are refused).
    """

    def __init__(self, slots: int = 1, *, loader=None, allowed=None, dtype: str = "float32", device: str = "cpu"):
        if slots < 1:
            raise ValueError(f"slots={slots}: at least 1")
        self.slots = int(slots)
        self.loader = loader or (lambda name: load_pipeline(name, dtype, device))
        self.allowed = tuple(allowed) if allowed else None
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def loaded(self) -> list[str]:
        return list(self._models)

    def model(self, name: str) -> _Model:
        """The model's copies, loading it (once) on first use."""
        if self.allowed is not None and name not in self.allowed:
            raise ModelLoadError(f"model {name!r} is not served here; this server serves {', '.join(self.allowed)}")
        with self._lock:
            if name in self._models:
                return self._models[name]
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:  # one load per model; other models load meanwhile
            if name not in self._models:
                pipe = self.loader(name)
                # every copy from the pristine pipeline, before any request attaches anything
                copies = [pipe] + [copy.deepcopy(pipe) for _ in range(self.slots - 1)]
                with self._lock:
                    self._models[name] = _Model(name, copies)
        return self._models[name]

    @contextmanager
    def acquire(self, name: str):
        """A pipeline copy of ``name`` for one request (waits while all are busy)."""
        from diffattn.engine import is_attached

        m = self.model(name)
        pipe = m.free.get()
        with m.lock:
            m.busy += 1
            m.peak = max(m.peak, m.busy)
        try:
            yield pipe
        finally:
            with m.lock:
                m.busy -= 1
            try:
                attached = is_attached(pipe)
            except Exception:  # not a pipeline diffattn knows: nothing can be attached to it
                attached = False
            if attached:  # never hand a controlled copy on (attach's `with` detaches; this is a guard)
                log.error("a request left controls attached to %s; replacing that copy", name)
                try:
                    pipe = self.loader(name)
                except Exception:  # pragma: no cover
                    log.exception("reloading %s failed; the pool of %s shrinks by one", name, name)
                    pipe = None
            if pipe is not None:
                m.free.put(pipe)


# ----------------------------------------------------------------------------- errors


def one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0]


def endpoint(fn):
    """``fn`` with its errors as ``gr.Error``: library and input errors with their own one-line
    message, anything else logged with its traceback and shown as one line."""
    import gradio as gr

    from diffattn.errors import DiffattnError

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (DiffattnError, AppInputError) as e:
            raise gr.Error(one_line(e), print_exception=False) from None
        except Exception as e:
            log.exception("error in %s", fn.__name__)
            raise gr.Error(f"internal error ({type(e).__name__}): {one_line(e)}", print_exception=False) from None

    return wrapped
