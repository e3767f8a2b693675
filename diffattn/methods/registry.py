"""The method registry: one record per method, read by every frontend.

The CLI builds ``diffattn generate --method NAME`` and its flags from these records; a Gradio
tab or a ComfyUI node is generated from the same :class:`Param` list (type, default, help,
choices, range). Importing this module is cheap (no torch): a record's factory imports its
method only when it is built.

    from diffattn.methods.registry import get_method, methods
    m = get_method("softpag")
    [p.name for p in m.params]                     # ['heads', 'scale', 'strength']
    run = m.build(pipe, heads="mid", scale=3.0)    # checks the values, builds the control
    out = run("a red circle", generator=torch.Generator().manual_seed(0))
    out.images[0]

A method's factory is ``factory(pipe, **params) -> MethodRun`` (``params``: every parameter,
defaults filled in, checked). :class:`MethodRun` is what a frontend runs: ``run(prompt,
generator=..., **call_kwargs) -> MethodOutput`` (images, optional per-image attention maps),
``run.check(prompt)`` to reject a prompt before any image is made, and ``run.control`` /
``run.pipeline`` for frontends that drive the sampling themselves.

New methods register a :class:`Method` with :func:`register_method`; the factory may be a
``"module:function"`` string, imported at the first build.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import MethodError, UnknownMethodError

KINDS = ("control", "pipeline")  # a Control attached to the stock pipeline | a pipeline of its own loop
# inputs every frontend shows beside a method's own parameters (the app's standard inputs, the
# CLI's generate flags): a parameter of one of these names would shadow them
RESERVED_PARAMS = ("model", "prompt", "seed", "randomize", "steps", "guidance", "images")
_MISSING = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a method, as a frontend shows it.

    name:    the keyword of ``Method.build`` (a Python identifier).
    type:    ``str``, ``int``, ``float`` or ``bool``: the type of a frontend's field (a text
             box, a number, a checkbox); a factory may accept richer Python values too (A-STAR's
             ``concepts`` also takes a list or a callable).
    default: the value when not given; ``None``: the method decides (e.g. a preset's value).
    help:    one line for the flag's / field's help.
    choices: the allowed values (a dropdown), or ``None``.
    range:   ``(low, high)`` bounds of a number (either may be ``None``), or ``None``.
    flag:    the CLI flag; default ``--`` + name with ``-`` for ``_``.
    repeated: a list of values of :attr:`type` (CLI: the flag given once per value; a text
             field: one value per line), e.g. IR-Diffusion's ``--subject``.
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    range: tuple | None = None
    flag: str | None = None
    repeated: bool = False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value, method: str = "") -> Any:
        """``value`` converted to :attr:`type` when it is a plain value of another (``"2"`` for a
        float), and checked against :attr:`choices` and :attr:`range`; ``None`` passes (the
        method's default). A value out of bounds is a :class:`MethodError` naming the parameter."""
        if value is None:
            return None
        if self.repeated:
            if isinstance(value, str):  # a text field: one value per line
                value = [line.strip() for line in value.splitlines() if line.strip()]
            if not isinstance(value, (list, tuple)):
                raise MethodError(f"{method} {self.name}={value!r}: give a list of values (one per line)")
            one = Param(self.name, self.type, None, self.help, self.choices, self.range, self.flag)
            return [one.check(v, method) for v in value]
        where = f"{method} {self.name}" if method else self.name
        if self.type in (int, float) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            try:
                value = self.type(value)
            except ValueError:
                raise MethodError(f"{where}={value!r}: expected a number ({self.type.__name__})") from None
        elif self.type is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise MethodError(f"{where}={value!r}: expected true or false")
            value = value.lower() in ("true", "1", "yes")
        if self.choices is not None and value not in self.choices:
            raise MethodError(f"{where}={value!r}: choose one of {', '.join(map(str, self.choices))}")
        if self.range is not None and isinstance(value, (int, float)):
            lo, hi = self.range
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise MethodError(f"{where}={value!r}: must lie in [{'' if lo is None else lo}, "
                                  f"{'' if hi is None else hi}]")
        return value


@dataclass
class MethodOutput:
    """What a method run returns: ``images`` (PIL), optionally ``maps`` (per image, a dict
    ``label -> PIL heat map``, e.g. A-STAR's concept maps) and ``info`` (method-specific).

    On a video pipeline (its output has ``.frames``: ``WanPipeline``, ``HunyuanVideoPipeline``)
    ``frames`` holds the clips, one list of PIL frames per clip, and ``images`` is empty;
    ``None`` for image pipelines."""

    images: list
    maps: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    frames: list[list] | None = None


@dataclass
class MethodRun:
    """A built method, ready to run: ``run(prompt, generator=None, **call_kwargs)``.

    label:    a short label for the result (``"softpag s=2 u=1"``, ``"A-STAR"``).
    fn:       ``fn(prompt, generator=..., **call_kwargs) -> MethodOutput``; the call keywords
              are the pipeline's (``num_inference_steps``, ``guidance_scale``, ``height``...).
    checker:  ``checker(prompt)`` raises before any image is made if the prompt cannot be used.
    control:  the :class:`~diffattn.controls.Control` of a ``"control"`` method (to attach
              in a frontend's own sampling), else ``None``.
    pipeline: the pipeline object of a ``"pipeline"`` method (e.g. an ``AStarPipeline``).
    """

    label: str
    fn: Callable
    checker: Callable | None = None
    control: Any = None
    pipeline: Any = None

    def check(self, prompt) -> None:
        if self.checker is not None:
            self.checker(prompt)

    def __call__(self, prompt, generator=None, **call_kwargs) -> MethodOutput:
        return self.fn(prompt, generator=generator, **call_kwargs)


@dataclass(frozen=True)
class Method:
    """A registered method.

    name:     the registry key and ``--method`` value (``"softpag"``).
    label:    a display name (``"SoftPAG"``).
    summary:  one line for a frontend's help text.
    kind:     ``"control"`` (a Control on the stock pipeline) or ``"pipeline"`` (its own loop,
              in ``diffattn.pipelines``).
    params:   the :class:`Param` s ``build`` takes.
    factory:  ``factory(pipe, **params) -> MethodRun``, or ``"module:function"``.
    paper:    the citation.
    own_baseline: its run returns its own baseline panels of the same noise, labelled in
              ``MethodOutput.info["labels"]`` (IR-Diffusion: references | vanilla scene | IR
              scene), so frontends make no stock baseline call beside it.
    """

    name: str
    label: str
    summary: str
    kind: str
    params: tuple = ()
    factory: Callable | str | None = None
    paper: str = ""
    own_baseline: bool = False

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise MethodError(f"{self.name} has no parameter {name!r}; its parameters: {self._names()}")

    def _names(self) -> str:
        return ", ".join(p.name for p in self.params) or "none"

    def defaults(self) -> dict:
        """``{name: default}`` of every parameter."""
        return {p.name: p.default for p in self.params}

    def resolve(self, **params) -> dict:
        """Every parameter's value: the given ones checked, the others at their defaults.
        A name the method does not have is a :class:`MethodError` listing its parameters."""
        names = {p.name for p in self.params}
        unknown = sorted(set(params) - names)
        if unknown:
            raise MethodError(f"{self.name} has no parameter(s) {unknown}; its parameters: {self._names()}")
        return {p.name: p.check(params.get(p.name, p.default), self.name) for p in self.params}

    def build(self, pipe, **params) -> MethodRun:
        """The method built on ``pipe`` with ``params`` (checked; see :meth:`resolve`)."""
        values = self.resolve(**params)
        factory = self.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        if factory is None:
            raise MethodError(f"method {self.name!r} has no factory")
        return factory(pipe, **values)


_METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (a name taken by another record is a :class:`MethodError`
    unless ``replace=True``); returns it."""
    if not isinstance(method, Method):
        raise MethodError(f"register_method takes a Method record, got {type(method).__name__}")
    if method.kind not in KINDS:
        raise MethodError(f"method {method.name!r}: kind {method.kind!r} is not one of {KINDS}")
    names = [p.name for p in method.params]
    if len(set(names)) != len(names):
        raise MethodError(f"method {method.name!r} declares a parameter twice: {names}")
    clash = [n for n in names if n in RESERVED_PARAMS]
    if clash:
        raise MethodError(f"method {method.name!r}: parameter(s) {clash} shadow the frontends' own inputs "
                          f"{RESERVED_PARAMS}; rename them (e.g. noise_seed)")
    if method.name in _METHODS and _METHODS[method.name] != method and not replace:
        raise MethodError(f"method {method.name!r} is registered already; pass replace=True to override it")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The record of ``name``; an unknown name is an :class:`UnknownMethodError` listing the known ones."""
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(_METHODS) or 'none'}")
    return _METHODS[name]


def methods() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


# ----------------------------------------------------------------------------- built-in methods
# Their factories import the method modules (torch) only when built.


def _softpag(pipe, *, heads="mid", scale=None, strength=None, target="identity", semantics="joint") -> MethodRun:
    from ..engine import attach
    from .softpag import SoftPAG, is_preset, load_preset, middle_layer

    if heads == "mid":
        heads = middle_layer(pipe)
    elif isinstance(heads, str) and heads.endswith(".json"):
        heads = load_preset(heads)
    scale = scale if scale is not None or is_preset(heads) else 2.0
    control = SoftPAG(heads, strength=strength, scale=scale, target=target, semantics=semantics)  # None: the preset's

    def run(prompt, generator=None, **call_kwargs):
        with attach(pipe, control):
            return pipeline_output(pipe(prompt, generator=generator, **call_kwargs))  # images, or a video's frames

    u = "preset" if strength is None and control.preset is not None else f"{control.strength:g}"
    return MethodRun(f"softpag s={control.scale:g} u={u}", run, control=control)


ASTAR_LOSSES = {"astar": "astar", "ae": "attend_and_excite", "segregation": "segregation_only",
                "retention": "retention_only"}  # --astar-loss -> AStarConfig preset


def split_concepts(concepts):
    """A comma-separated string of concept words as a list (``"circle, square"`` -> two);
    anything else (a list, a dict, a callable, ``None``) as given."""
    if isinstance(concepts, str):
        return [c.strip() for c in concepts.split(",") if c.strip()]
    return concepts


def _astar(pipe, *, concepts=None, loss="astar", temperature=None, text_keys="auto", center_tokens=False) -> MethodRun:
    from ..pipelines.astar import AStarConfig, AStarPipeline

    overrides = {"text_keys": text_keys, "center_tokens": bool(center_tokens)}
    if temperature is not None:
        overrides["temperature"] = float(temperature)
    astar = AStarPipeline(pipe, getattr(AStarConfig, ASTAR_LOSSES[loss])(**overrides))
    concepts = split_concepts(concepts)

    def check(prompt):
        astar._concepts_for(prompt, concepts)  # raises ConceptError (missing concepts, words not in the prompt)

    def run(prompt, generator=None, **call_kwargs):
        out = astar(prompt, concepts, generator=generator, return_attention_maps=True, **call_kwargs)
        return MethodOutput(out.images, maps=list(out.attention_maps), info={"losses": out.losses})

    label = {"astar": "A-STAR", "ae": "Attend-and-Excite"}.get(loss, f"A-STAR ({loss} only)")
    return MethodRun(label, run, checker=check, pipeline=astar)


register_method(Method(
    name="softpag", label="SoftPAG",
    summary="perturbed-attention guidance on chosen heads, interpolating their maps toward uniform by u",
    kind="control",
    params=(
        Param("heads", str, "mid", "heads: mid (the middle layer), all, or a HeadHunter preset JSON"),
        Param("scale", float, None, "guidance scale (default 2, or the preset's)", range=(0.0, None)),
        Param("strength", float, None, "strength u in [0, 1] (default 1, or the preset's per-head u)",
              range=(0.0, 1.0)),
        Param("target", str, "identity", "the map the chosen heads move toward: identity (PAG), uniform or "
                                         "meanquery (SEG as sigma -> inf)", choices=("identity", "uniform", "meanquery")),
        Param("semantics", str, "joint", "joint-attention semantics of the perturbation: joint (the paper's "
                                         "code), image, image-self (diffusers' SD3 PAG)",
              choices=("joint", "image", "image-self")),
    ),
    factory=_softpag,
    paper="Ahn et al., Fine-Grained Perturbation Guidance via Attention Head Selection (arXiv 2506.10978)",
))

register_method(Method(
    name="astar", label="A-STAR",
    summary="test-time attention segregation and retention (A-STAR), or Attend-and-Excite",
    kind="pipeline",
    params=(
        Param("concepts", str, None, "comma-separated concept words of the prompt (e.g. circle,square)"),
        Param("loss", str, "astar", "astar: A-STAR (segregation + retention); ae: Attend-and-Excite; or one "
                                    "A-STAR loss alone", choices=tuple(ASTAR_LOSSES), flag="--astar-loss"),
        Param("temperature", float, None, "the T of softmax(T·A) over text tokens (default 100; testbed "
                                          "tiny-sd3: 1000)", range=(0.0, None), flag="--astar-temperature"),
        Param("text_keys", str, "auto", "whose tokens the concepts are: auto, clip or t5 (SD3: T5 finds words past "
                                        "CLIP's 77 tokens)", choices=("auto", "clip", "t5"), flag="--astar-text-keys"),
        Param("center_tokens", bool, False, "subtract each token's mean attention over the image first (when one "
                                            "token saturates the maps): true or false", flag="--astar-center-tokens"),
    ),
    factory=_astar,
    paper="Agarwal et al., A-STAR: Test-time Attention Segregation and Retention (ICCV 2023); Chefer et al., "
          "Attend-and-Excite (SIGGRAPH 2023)",
))


def _ir(pipe, *, subjects=None, subject_words=None, isolation=True, reposition=True, move=True, mutual=0.9,
        dropout=0.5) -> MethodRun:
    from ..errors import ConceptError
    from ..pipelines.ir import IRDiffusionPipeline, mask_overlay

    if not subjects:
        raise ConceptError("IR-Diffusion needs the subjects: one reference prompt each (--subject \"a striped red "
                           "circle\" --subject \"a dotted blue square\")")
    ir = IRDiffusionPipeline(pipe, isolation=bool(isolation), reposition=bool(reposition), move=bool(move),
                             mutual=float(mutual), dropout=float(dropout))

    def check(prompt):
        words = subject_words or [ir._default_word(x, prompt) for x in subjects]
        if len(words) != len(subjects):
            raise ConceptError(f"{len(subjects)} subjects but {len(words)} subject words: give one per subject")
        for i, (x, w) in enumerate(zip(subjects, words)):
            ir._word_keys(x, w, f"subject {i}")
            ir._word_keys(prompt, w, "the scene prompt")

    def run(prompt, generator=None, **call_kwargs):
        seed = generator.initial_seed() if generator is not None else 0
        out = ir(prompt, subjects, subject_words=subject_words, seed=seed, return_masks=True, **call_kwargs)
        labels = [f"reference {i + 1}" for i in range(len(subjects))] + ["vanilla scene", "IR scene"]
        # under each panel, the masks it was given: a reference's own, the scene's on both scenes
        overlays = [mask_overlay(im, [m], first=i) for i, (im, m) in enumerate(zip(out.references,
                                                                                 out.reference_mask_images))]
        overlays += [mask_overlay(im, out.scene_mask_images) for im in out.vanilla + out.images]
        return MethodOutput(out.references + out.vanilla + out.images,
                            info={"labels": labels, "own_baseline": True, "attempts": out.attempts,
                                  "missing": out.missing, "overlays": overlays, "overlay_label": "subject masks"})

    return MethodRun("IR-Diffusion", run, checker=check, pipeline=ir)


register_method(Method(
    name="ir", label="IR-Diffusion",
    summary="consistent subjects in a multi-subject scene: isolation + reposition attention to reference images",
    kind="pipeline", own_baseline=True,
    params=(
        Param("subjects", str, None, "a reference prompt of one subject; repeat the flag per subject", flag="--subject",
              repeated=True),
        Param("subject_words", str, None, "the word naming subject i in the scene; repeat per subject (default: "
                                          "each subject prompt's last word)", flag="--subject-word", repeated=True),
        Param("isolation", bool, True, "isolation attention between the scene's subjects: true or false",
              flag="--ir-isolation"),
        Param("reposition", bool, True, "extended attention to the references' subject tokens: true or false",
              flag="--ir-reposition"),
        Param("move", bool, True, "move the reference subject onto the scene subject's box (false: extended K/V "
                                  "in place)", flag="--ir-move"),
        Param("mutual", float, 0.9, "λ of the masked mutual cross-attention to each reference's prompt (0: off)",
              range=(0.0, 1.0), flag="--ir-mutual"),
        Param("dropout", float, 0.5, "per-step dropout of the scene masks (ConsiStory's 0.5)", range=(0.0, 0.99),
              flag="--ir-dropout"),
    ),
    factory=_ir,
    paper="He et al., Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation and "
          "Reposition Attention (arXiv 2411.19261)",
))


def _control_run(pipe, control, label: str) -> MethodRun:
    """A MethodRun that attaches ``control`` around each pipeline call."""
    from ..engine import attach

    def run(prompt, generator=None, **call_kwargs):
        with attach(pipe, control):
            return pipeline_output(pipe(prompt, generator=generator, **call_kwargs))  # images, or a video's frames

    return MethodRun(label, run, control=control)


def _repulsion(pipe, *, eta=0.5, tau=1, inner=10, loss="vendi", norm_invariant=True) -> MethodRun:
    from .repulsion import ContextRepulsion

    control = ContextRepulsion(eta=eta, tau=tau, inner=inner, loss=loss, norm_invariant=norm_invariant)
    return _control_run(pipe, control, f"repulsion η={eta:g} τ={tau} M={inner} {loss}")


register_method(Method(
    name="repulsion", label="Contextual repulsion",
    summary="diversity within each prompt's batch: repel the MMDiT text streams of its samples (SD3, FLUX)",
    kind="control",
    params=(
        Param("eta", float, 0.5, "step size η (relative with norm_invariant; the paper's raw η is 5e2-8e9)",
              range=(0.0, None), flag="--eta"),  # the flag of the command
        Param("tau", int, 1, "act on the first tau denoising steps", range=(0, None), flag="--repulsion-tau"),
        Param("inner", int, 10, "inner ascent steps M per block", range=(1, None), flag="--repulsion-inner"),
        Param("loss", str, "vendi", "diversity loss: vendi (log-Vendi, cosine kernel), rbf (particle-guidance "
                                    "energy) or dpp (log det)", choices=("vendi", "rbf", "dpp"),
              flag="--repulsion-loss"),
        Param("norm_invariant", bool, True, "scale the step by |c|^2 so eta needs no per-model rescaling: true "
                                            "or false", flag="--repulsion-norm-invariant"),
    ),
    factory=_repulsion,
    paper="Dahary et al., On-the-fly Repulsion in the Contextual Space (2026)",
))


def _cads(pipe, *, scale=0.25, tau1=0.6, tau2=0.9, psi=1.0, noise_seed=0) -> MethodRun:
    from .cads import CADS

    return _control_run(pipe, CADS(scale=scale, tau1=tau1, tau2=tau2, psi=psi, seed=noise_seed),
                        f"CADS s={scale:g} τ=({tau1:g}, {tau2:g})")


def _particle(pipe, *, coeff=30.0, sigma_min=None) -> MethodRun:
    from .particle import LatentParticleGuidance

    return _control_run(pipe, LatentParticleGuidance(coeff=coeff, sigma_min=sigma_min), f"particle guidance {coeff:g}")


def _interval(pipe, *, sigma_lo=0.28, sigma_hi=5.42) -> MethodRun:
    from .interval import IntervalGuidance

    return _control_run(pipe, IntervalGuidance((sigma_lo, sigma_hi)), f"CFG on σ ∈ ({sigma_lo:g}, {sigma_hi:g}]")


register_method(Method(
    name="cads", label="CADS",
    summary="diversity baseline: anneal noise into the text condition early in sampling",
    kind="control",
    params=(
        Param("scale", float, 0.25, "noise scale s of the condition", range=(0.0, None), flag="--cads-scale"),
        Param("tau1", float, 0.6, "t <= tau1 (late in sampling): the clean condition", range=(0.0, 1.0),
              flag="--cads-tau1"),
        Param("tau2", float, 0.9, "t >= tau2 (early): pure noise of scale s", range=(0.0, 1.0), flag="--cads-tau2"),
        Param("psi", float, 1.0, "rescale mix psi in [0, 1]", range=(0.0, 1.0), flag="--cads-psi"),
        Param("noise_seed", int, 0, "seed of the condition noise (not the image seed)", flag="--cads-seed"),
    ),
    factory=_cads,
    paper="Sadat et al., CADS: Unleashing the Diversity of Diffusion Models through Condition-Annealed Sampling "
          "(ICLR 2024)",
))

register_method(Method(
    name="particle", label="Particle guidance",
    summary="diversity baseline: the samples of a prompt repel each other in latent space (RBF kernel)",
    kind="control",
    params=(
        Param("coeff", float, 30.0, "repulsion scale (0: i.i.d.)", range=(0.0, None), flag="--pg-coeff"),
        Param("sigma_min", float, None, "act only while the scheduler's sigma >= this (default: every step)",
              range=(0.0, None), flag="--pg-sigma-min"),
    ),
    factory=_particle,
    paper="Corso et al., Particle Guidance: non-I.I.D. Diverse Sampling with Diffusion Models (ICLR 2024)",
))

register_method(Method(
    name="interval", label="Interval guidance",
    summary="diversity baseline: CFG only for sigma in (lo, hi], the conditional prediction elsewhere",
    kind="control",
    params=(
        Param("sigma_lo", float, 0.28, "lower end (exclusive), in the scheduler's sigma", range=(0.0, None),
              flag="--interval-lo"),
        Param("sigma_hi", float, 5.42, "upper end (inclusive); flow-matching sigma lies in [0, 1]",
              range=(0.0, None), flag="--interval-hi"),
    ),
    factory=_interval,
    paper="Kynkäänniemi et al., Applying Guidance in a Limited Interval Improves Sample and Distribution Quality "
          "(NeurIPS 2024)",
))


def _vmix(pipe, *, adapter=None, aesthetics=None, lam=1.0, uncond="positive", joint="split") -> MethodRun:
    from .vmix import ValueMix, load_adapter

    if not adapter:
        raise MethodError("vmix needs a trained adapter: --adapter PATH.safetensors (diffattn train-vmix writes one)")
    control = ValueMix(load_adapter(adapter, pipe), aesthetics=split_concepts(aesthetics) or None, scale=lam,
                       uncond=uncond, joint=joint)
    return _control_run(pipe, control, f"VMix λ={lam:g} {','.join(control.aesthetic_names)}")


register_method(Method(
    name="vmix", label="VMix",
    summary="aesthetic adapter: value-mixed cross-attention, softmax(QK^T)(V + λ·V_a) with the base attention map",
    kind="control",
    params=(
        Param("adapter", str, None, "the VMix adapter file (.safetensors) trained for this model"),
        Param("aesthetics", str, None, "comma-separated aesthetic labels of the adapter (default: all of them)"),
        Param("lam", float, 1.0, "λ, the aesthetic value scale (0: the base model; the paper sweeps 1 to 2)",
              range=(0.0, None), flag="--lambda"),
        Param("uncond", str, "positive", "what CFG's unconditional rows get: positive (the base model), both (the "
                                         "same aesthetics) or null (every negative label)",
              choices=("positive", "both", "null"), flag="--vmix-uncond"),
        Param("joint", str, "split", "MMDiT joint attention: split (a second call, text rows bit-equal) or merge "
                                     "(one call + the text keys' probabilities)", choices=("split", "merge"),
              flag="--vmix-joint"),
    ),
    factory=_vmix,
    paper="Wu et al., VMix: Improving Text-to-Image Diffusion Model with Cross-Attention Mixing Control "
          "(arXiv 2412.20800)",
))


def is_video_pipeline(pipe) -> bool:
    """Whether ``pipe`` generates clips (its call takes ``num_frames`` and its output is
    ``.frames``: ``WanPipeline``, ``HunyuanVideoPipeline``) rather than images."""
    import inspect

    try:
        return "num_frames" in inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):  # no signature to read: an image pipeline as far as frontends know
        return False


def pipeline_output(result, info: dict | None = None) -> MethodOutput:
    """A pipeline's result as a :class:`MethodOutput`: ``.frames`` (a video pipeline, one list of
    PIL frames per clip with ``output_type="pil"``) into ``frames``, else ``.images``."""
    info = info if info is not None else {}
    if hasattr(result, "frames"):
        return MethodOutput([], info=info, frames=[list(clip) for clip in result.frames])
    return MethodOutput(result.images, info=info)


SPARSE_MODES = ("rectified", "vanilla", "random")  # diffattn.kernels.sparse.MODES (tests/test_cli_sparse.py)


def _sparse(pipe, *, drop=None, mode="rectified", block_size=128, p_remain=0.3, dense_layers=None, dense_steps=None,
            neighbours=True, first_frame=None, block_seed=0) -> MethodRun:
    from ..engine import attach
    from ..sites import sites
    from .spaattn import FAMILY_DEFAULTS, SPARSE_KINDS, RectifiedSparseAttention

    control = RectifiedSparseAttention(drop, mode=mode, block_size=block_size, p_remain=p_remain,
                                       dense_layers=dense_layers, dense_steps=dense_steps, neighbours=neighbours,
                                       first_frame=first_frame, seed=block_seed)
    eligible = [s.name for s in sites(pipe) if s.kind in SPARSE_KINDS.get(s.family, ())]  # the control's "auto" sites
    video = is_video_pipeline(pipe)

    def run(prompt, generator=None, **call_kwargs):
        if video:
            call_kwargs.setdefault("output_type", "pil")
        with attach(pipe, control):  # a family without a video / image grid: ControlError naming Wan, FLUX, Hunyuan
            result = pipe(prompt, generator=generator, **call_kwargs)
            settings = [control.settings(name) for name in eligible]  # resolved per site while attached
        warmup = control.steps.start if control.steps is not None and control.steps.start is not None else 0
        info = {"timed_sites": eligible, "mode": mode, "block_size": block_size,
                "drop": sorted({s["drop"] for s in settings}),
                "sparse_layers": sum(not s["dense"] for s in settings), "layers": len(settings),
                "dense_steps": warmup}
        return pipeline_output(result, info)

    families = sorted({s.family for s in sites(pipe) if s.family in FAMILY_DEFAULTS})
    shown = drop if drop is not None else (FAMILY_DEFAULTS[families[0]]["drop"] if len(families) == 1 else None)
    label = f"sparse {mode}" + (f" drop={shown:g}" if shown is not None else "")
    return MethodRun(label, run, control=control)


register_method(Method(
    name="sparse", label="Rectified SpaAttn",
    summary="block-sparse self-attention for video / high-resolution DiTs (Wan, HunyuanVideo, FLUX), rectified by "
            "pooled estimates of the skipped blocks",
    kind="control",
    params=(
        Param("drop", float, None, "fraction of the video / image key blocks each query block skips, in [0, 1) "
                                   "(default: the family's: Wan 0.75, FLUX 0.9, HunyuanVideo 0.8)",
              range=(0.0, 0.999), flag="--drop"),
        Param("mode", str, "rectified", "rectified (IPAR + GAPR), vanilla (plain block-sparse) or random (random "
                                        "blocks at the same budget): the ablation modes", choices=SPARSE_MODES,
              flag="--sparse-mode"),
        Param("block_size", int, 128, "tokens per query / key block (official 128; a clip of a few hundred tokens "
                                      "needs 16-64 to have several blocks)", choices=(16, 32, 64, 128, 256),
              flag="--sparse-block"),
        Param("p_remain", float, 0.3, "cumulative pooled attention mass each query block keeps at least",
              range=(0.0, 1.0), flag="--sparse-p-remain"),
        Param("dense_layers", int, None, "the first N sparse-capable layers stay dense (default: the family's: Wan "
                                         "the first 2, FLUX layers 37 on, HunyuanVideo none)", range=(0, None),
              flag="--dense-layers"),
        Param("dense_steps", int, None, "the first N denoising steps stay dense (default: the family's: Wan T2V 5, "
                                        "others 0)", range=(0, None), flag="--dense-steps"),
        Param("neighbours", bool, True, "also attend to each block's grid-neighbour blocks: true or false",
              flag="--sparse-neighbours"),
        Param("first_frame", bool, None, "the first latent frame's blocks attend to each other (default: on for "
                                         "Wan): true or false", flag="--sparse-first-frame"),
        Param("block_seed", int, 0, "seed of the random mode's blocks (not the image seed)", range=(0, None),
              flag="--sparse-seed"),
    ),
    factory=_sparse,
    paper="Liu et al., Rectified SpaAttn: Revisiting Attention Sparsity for Efficient Video Generation "
          "(arXiv 2511.19835)",
))
