"""What the tabs share: the standard inputs (model, prompt, seed, Advanced: steps, guidance,
images), the result views (gallery, attention maps, info), seeds, call keywords and progress."""
from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_PROMPT = "a red circle left of a blue square"
MAX_SEED = 2**31 - 1


@dataclass
class Standard:
    """The standard components of a tab (``inputs()`` in the order :func:`run_args` reads)."""

    model: object
    prompt: object
    seed: object
    randomize: object
    steps: object
    guidance: object
    images: object

    def inputs(self) -> list:
        return [self.model, self.prompt, self.seed, self.randomize, self.steps, self.guidance, self.images]


def standard_inputs(ctx, *, default_model: str | None = None, prompt: str = DEFAULT_PROMPT, steps: int = 8,
                    guidance: float | None = None, batch: bool = True, prompt_label: str = "prompt") -> Standard:
    """Model picker, prompt, and an Advanced accordion with seed (+ randomise), steps, guidance
    (empty: the model's default) and images per prompt."""
    import gradio as gr

    model = ctx.model_picker(default_model)
    text = gr.Textbox(prompt, label=prompt_label, elem_classes=["prompt"])
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            seed = gr.Number(0, label="seed", precision=0, minimum=0, maximum=MAX_SEED)
            randomize = gr.Checkbox(False, label="randomise seed")
        with gr.Row():
            n_steps = gr.Number(min(steps, ctx.limits.max_steps), label=f"steps (at most {ctx.limits.max_steps})",
                                precision=0)
            cfg = optional_number(guidance, "guidance (CFG; empty: the model's default)")
            images = gr.Number(1, label=f"images per prompt (at most {ctx.limits.max_batch})", precision=0,
                               visible=batch)
    return Standard(model, text, seed, randomize, n_steps, cfg, images)


def optional_number(value=None, label: str = "", **kw):
    """A number that may be left empty (the method's default): a text box, as a ``gr.Number``
    left empty reads as 0 in the browser. Read it with :func:`number_or_none`."""
    import gradio as gr

    return gr.Textbox("" if value is None else str(value), label=label, placeholder="default", **kw)


def number_or_none(value, what: str) -> float | None:
    """An optional number from a text box or an API call (``None``, ``""``, a number or its text)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        from .serving import AppInputError

        raise AppInputError(f"{what}={value!r}: expected a number, or empty for the default") from None
    if number != number or number in (float("inf"), float("-inf")):
        from .serving import AppInputError

        raise AppInputError(f"{what}={value!r}: expected a finite number")
    return number


def image_upload(**kw):
    """A ``gr.Image`` upload (``type="filepath"``) whose undecodable uploads are refused with one
    line: Gradio opens an uploaded image itself before the event's function runs, and its own
    error names the server's temp path and the component's internals."""
    import functools

    import gradio as gr

    component = gr.Image(type="filepath", **kw)
    preprocess = component.preprocess

    @functools.wraps(preprocess)
    def guarded(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:
            from PIL import Image, UnidentifiedImageError

            if isinstance(e, UnidentifiedImageError):
                why = "it is no image format PIL can decode (PNG, JPEG, WebP...)"
            elif isinstance(e, Image.DecompressionBombError):
                why = "it has too many pixels to decode safely"
            else:
                why = "the file is damaged or truncated"
            raise gr.Error(f"cannot read the upload as an image: {why}", print_exception=False) from None

    component.preprocess = guarded
    return component


def results(name: str, label: str = "baseline | controlled", maps: bool = True):
    """Gallery (``#<name>-gallery``), optional attention-maps gallery (``#<name>-maps``), info text."""
    import gradio as gr

    gallery = gr.Gallery(label=label, columns=4, height="auto", format="png", elem_classes=["result"],
                         object_fit="contain", elem_id=f"{name}-gallery")
    maps_view = gr.Gallery(label="attention maps", columns=6, height="auto", format="png", elem_classes=["result"],
                           elem_id=f"{name}-maps") if maps else None
    info = gr.Markdown(elem_id=f"{name}-info")
    return gallery, maps_view, info


def pick_seed(seed, randomize) -> int:
    if randomize:
        return random.randint(0, MAX_SEED)
    from .serving import AppInputError, whole

    seed = 0 if seed is None or seed == "" else whole(seed, "seed")
    if not 0 <= seed <= MAX_SEED:
        raise AppInputError(f"seed={seed}: use 0..{MAX_SEED}")
    return seed


def generator(seed: int, pipe=None):
    import torch

    device = getattr(pipe, "_execution_device", None) or "cpu"
    return torch.Generator(device).manual_seed(int(seed))


def call_kwargs(ctx, steps, guidance, images=None) -> dict:
    """Pipeline call keywords, each checked against the server's limits."""
    kw = {}
    n = ctx.limits.steps(steps)
    if n is not None:
        kw["num_inference_steps"] = n
    w = number_or_none(guidance, "guidance")
    if w is not None:
        if w < 0:
            from .serving import AppInputError

            raise AppInputError(f"guidance={w:g}: a CFG scale is >= 0")
        kw["guidance_scale"] = w
    if images is not None:
        kw["num_images_per_prompt"] = ctx.limits.batch(images)
    return kw


def model_name(ctx, model) -> str:
    return (model or "").strip() or ctx.default_model


class Progress:
    """Reports to a ``gr.Progress`` from a diffattn loop's ``callback(info)`` and from a stock
    diffusers pipeline's ``callback_on_step_end``, over ``loops`` loops in a row."""

    def __init__(self, progress, loops: int = 1):
        self.progress, self.loops, self.done = progress, max(1, loops), 0

    def _show(self, step: int, total: int, desc: str):
        if self.progress is None or not total:
            return
        frac = (self.done + (step + 1) / total) / self.loops
        try:
            self.progress(min(frac, 1.0), desc=desc)
        except Exception:  # progress is cosmetic; never fail a run over it
            pass
        if step + 1 >= total:
            self.done += 1

    def callback(self, info: dict) -> None:
        self._show(int(info["step"]), int(info.get("total") or 0), str(info.get("stage") or "sampling"))

    def diffusers(self, desc: str = "sampling"):
        def on_step_end(pipe, i, t, kwargs):
            self._show(int(i), int(getattr(pipe, "num_timesteps", 0) or 0), desc)
            return kwargs

        return on_step_end
