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


from diffattn.errors import DiffattnError, LimitError, ModelLoadError, UsageError  # noqa: F401  (re-exported)


class AppInputError(UsageError):
    """Input the app refuses (a bad value, an unreadable upload): a
    :class:`~diffattn.errors.UsageError`, so a :class:`~diffattn.errors.DiffattnError` (and a
    ``ValueError``). Over a limit: :class:`AppLimitError`; a model that cannot (or may not) be
    loaded: :class:`diffattn.errors.ModelLoadError`, re-exported here."""


class AppLimitError(AppInputError, LimitError):
    """A request over one of the server's limits (the message names the flag that sets it)."""


def whole(value, what: str) -> int:
    """``value`` as an int, refusing what is not a whole number (``2.7``, ``"two"``, ``True``)
    instead of truncating it."""
    if isinstance(value, bool):
        raise AppInputError(f"{what}={value!r}: expected a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise AppInputError(f"{what}={value!r}: expected a whole number")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise AppInputError(f"{what}={value!r}: expected a whole number")
    try:
        return whole(float(value), what)  # a numpy number
    except (TypeError, ValueError):
        raise AppInputError(f"{what}={value!r}: expected a whole number") from None


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

    def __post_init__(self):
        import math

        size = self.max_upload_mb
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size) or size <= 0:
            raise UsageError(f"--max-upload-mb {size!r}: a finite number of megabytes above 0")
        for name in ("max_side", "max_steps", "max_batch", "max_seeds", "max_candidates", "max_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name}={value!r}: a whole number of at least 1 (--{name.replace('_', '-')})")

    def steps(self, n) -> int | None:
        if n is None or n == "":
            return None
        n = whole(n, "steps")
        if n < 1:
            raise AppInputError(f"steps={n}: at least 1")
        if n > self.max_steps:
            raise AppLimitError(f"steps={n} is over this server's limit of {self.max_steps} steps (--max-steps)")
        return n

    def batch(self, n) -> int:
        n = 1 if n is None or n == "" else whole(n, "images")
        if n < 1:
            raise AppInputError(f"images={n}: at least 1")
        if n > self.max_batch:
            raise AppLimitError(f"images={n} is over this server's limit of {self.max_batch} images per request "
                                f"(--max-batch)")
        return n

    def upload(self, path: str, what: str = "upload") -> None:
        size = os.path.getsize(path)
        if size > self.max_upload_mb * 2**20:
            raise AppLimitError(f"the {what} is {size / 2**20:.1f} MB; this server's limit is {self.max_upload_mb:g} MB "
                                f"(--max-upload-mb)")

    def count(self, n, limit: int, what: str) -> int:
        n = whole(n, what)
        if n < 1:
            raise AppInputError(f"{what}={n}: at least 1")
        if n > limit:
            raise AppLimitError(f"{what}={n} is over this server's limit of {limit}")
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

    from diffattn.images import to_rgb

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
                    raise AppLimitError(f"the uploaded image is {w}x{h} pixels; this server takes sides up to "
                                        f"{limits.max_side} pixels (--max-side)")
                f.load()
                im = f.copy()
        except DiffattnError:
            raise
        except UnidentifiedImageError:  # PIL's message names the server's temp path: not shown
            raise AppInputError("cannot read the upload as an image: it is no image format PIL can decode "
                                "(PNG, JPEG, WebP...)") from None
        except Image.DecompressionBombError:
            raise AppLimitError(f"the uploaded image has too many pixels to decode safely; this server takes sides "
                                f"up to {limits.max_side} pixels (--max-side)") from None
        except OSError:
            raise AppInputError("cannot read the upload as an image: the file is damaged or truncated") from None
    w, h = im.size
    if max(w, h) > limits.max_side:
        raise AppLimitError(f"the image is {w}x{h} pixels; this server takes sides up to {limits.max_side} pixels "
                            f"(--max-side)")
    buf = io.BytesIO()
    to_rgb(im).save(buf, format="PNG")  # as the CLI and the library read files (orientation, alpha on white)
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
        self.users = 0  # requests holding or waiting for a copy (guarded by the pool's lock): never evicted then
        self.lock = threading.Lock()


DEFAULT_MAX_MODELS = 3  # --max-models: models held in memory at once


class PipelinePool:
    """Per model, ``slots`` private copies of its pipeline; :meth:`acquire` lends one.

    loader:     ``loader(name) -> pipeline`` (default :func:`load_pipeline`).
    allowed:    if given, the only model names requests may load (others are refused, the
                message lists them).
    max_models: the most models held at once; loading one more evicts the least recently used
                model that no request holds (all busy: the request is refused), so requests
                naming model after model cannot fill the server's memory.
    """

    def __init__(self, slots: int = 1, *, loader=None, allowed=None, dtype: str = "float32", device: str = "cpu",
                 max_models: int | None = DEFAULT_MAX_MODELS):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise UsageError(f"--slots {slots!r}: at least 1 pipeline copy per model")
        if max_models is not None and (isinstance(max_models, bool) or not isinstance(max_models, int)
                                       or max_models < 1):
            raise UsageError(f"--max-models {max_models!r}: at least 1 model")
        self.slots = int(slots)
        self.loader = loader or (lambda name: load_pipeline(name, dtype, device))
        self.allowed = tuple(allowed) if allowed else None
        self.max_models = max_models
        self._models: dict[str, _Model] = {}  # least recently used first
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._pending: set[str] = set()  # names being loaded (they count against max_models)
        self.evicted: list[str] = []     # the models evicted so far, in order (logs, tests)

    def loaded(self) -> list[str]:
        return list(self._models)

    def _check_allowed(self, name: str) -> None:
        if self.allowed is not None and name not in self.allowed:
            raise ModelLoadError(f"model {name!r} is not served here: this server loads only its listed models "
                                 f"({', '.join(self.allowed)}; set with --models, the default with --model)")

    def _idle(self, but: str | None = None) -> list[_Model]:
        """Under ``self._lock``: the models no request holds, least recently used first."""
        return [m for m in self._models.values() if m.users == 0 and m.busy == 0 and m.name != but]

    def _check_room(self, name: str) -> None:
        """Under ``self._lock``, before loading ``name``: refuse when ``max_models`` are held and
        every one is in use (nothing could be evicted)."""
        if self.max_models is not None and len(self._models) + len(self._pending) >= self.max_models \
                and not self._idle():
            raise AppLimitError(f"model {name!r}: this server holds {self.max_models} model(s) at once and all are "
                                f"in use; try again in a moment (--max-models)")

    def _evict(self, keep: str) -> None:
        """Under ``self._lock``, after loading ``keep``: drop least recently used idle models
        until at most ``max_models`` are held (after the load, so a failed load evicts nothing)."""
        if self.max_models is None:
            return
        while len(self._models) > self.max_models:
            idle = self._idle(but=keep)
            if not idle:  # they became busy meanwhile: over by one until the next load
                log.warning("holding %d models (--max-models %d): all others are in use", len(self._models),
                            self.max_models)
                return
            victim = idle[0]
            del self._models[victim.name]
            self.evicted.append(victim.name)
            victim.copies.clear()
            while not victim.free.empty():
                victim.free.get_nowait()
            log.info("evicted model %s (least recently used) after loading %s", victim.name, keep)
            import gc

            gc.collect()

    def _get(self, name: str, reserve: bool) -> _Model:
        self._check_allowed(name)
        while True:
            with self._lock:
                m = self._models.get(name)
                if m is not None:
                    self._models[name] = self._models.pop(name)  # most recently used now
                    if reserve:
                        m.users += 1
                    return m
                lock = self._loading.setdefault(name, threading.Lock())
            with lock:  # one load per model; other models load meanwhile
                with self._lock:
                    if name in self._models:
                        continue  # loaded by another request meanwhile
                    self._check_room(name)
                    self._pending.add(name)
                try:
                    pipe = self.loader(name)
                    # every copy from the pristine pipeline, before any request attaches anything
                    copies = [pipe] + [copy.deepcopy(pipe) for _ in range(self.slots - 1)]
                finally:
                    with self._lock:
                        self._pending.discard(name)
                with self._lock:
                    m = self._models[name] = _Model(name, copies)
                    if reserve:
                        m.users += 1
                    self._evict(keep=name)
                    return m

    def model(self, name: str) -> _Model:
        """The model's copies, loading it (once) on first use (evicting the least recently used
        idle model when ``max_models`` are held)."""
        return self._get(name, reserve=False)

    @contextmanager
    def acquire(self, name: str):
        """A pipeline copy of ``name`` for one request (waits while all are busy)."""
        from diffattn.engine import is_attached

        m = self._get(name, reserve=True)
        try:
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
        finally:
            with self._lock:
                m.users -= 1


# ----------------------------------------------------------------------------- errors


def one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0]


def endpoint(fn):
    """``fn`` with its errors as ``gr.Error``: library and input errors with their own one-line
    message, anything else logged with its traceback and shown as one line."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except DiffattnError as e:
            raise gr.Error(one_line(e), print_exception=False) from None
        except Exception as e:
            log.exception("error in %s", fn.__name__)
            raise gr.Error(f"internal error ({type(e).__name__}): {one_line(e)}", print_exception=False) from None

    return wrapped
