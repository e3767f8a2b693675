"""Workflow files, and the control-node registry the ComfyUI nodes share.

A *workflow* is a small JSON file that names a model, a list of controls with their
parameters and the sampling settings; :func:`run_workflow` attaches the controls with
``diffattn.attach`` and samples once::

    {
      "model": "tiny-sd3",
      "controls": [
        {"node": "SoftPAG", "heads": "mid", "strength": 1, "scale": 2}
      ],
      "sampling": {"prompt": "a red circle", "seed": 0, "steps": 8, "guidance": 4.0}
    }

``model``     a name the caller's model loader knows (the ``diffattn run`` command passes the
              testbed names, local diffusers folders and hub ids in); required.
``controls``  a list (may be empty) of objects, each with ``"node"`` (a name of
              :data:`CONTROL_NODES`: ``SoftPAG``, ``UniformAttention``) and that node's
              parameters, by the same names as the ComfyUI node's inputs (the method
              registry's :class:`~diffattn.methods.registry.Param` s); a parameter left out
              takes its default.
``sampling``  ``prompt`` (required), ``negative_prompt``, ``seed`` (default 0), ``steps``,
              ``guidance`` (the pipeline's ``guidance_scale``), ``height``, ``width``.

Every mistake is a :class:`~diffattn.errors.WorkflowError` naming where it is
(``controls[0] (SoftPAG) field 'strength': ...``).

The control-node registry (:data:`CONTROL_NODES`, :func:`register_control_node`) is what the
ComfyUI node pack (``diffattn.comfy``) builds its nodes from: one :class:`ControlNode` per
control, with its parameters and a ``build(sites, **values)`` that makes the
:class:`~diffattn.controls.Control` for a list of sites. A new method (isolation, value
mixing, repulsion, sparse attention) is one more record here plus, in ComfyUI, the site kinds
it patches. The shared heads language is :func:`parse_heads`.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import DiffattnError, WorkflowError
from .methods.registry import Param, get_method

PERTURBABLE = ("self", "joint", "single")

# ----------------------------------------------------------------------------- the heads language


def parse_heads(text, site_list, default_u: float = 1.0, kinds=PERTURBABLE) -> dict:
    """``{site name: [heads] | {head: u}}`` from the heads language shared by the CLI, the
    workflow files and the ComfyUI nodes.

    - ``"all"``: every head of every site of ``kinds``;
    - ``"mid"``: every head of the middle perturbable layer (the UNet mid block, the middle
      joint block of a DiT);
    - a ``diffattn.sites`` selector (``"m0"``, ``"u0.0-2"``, ``"input_blocks.4"``,
      ``"joint_blocks.3"``): every head of the selected sites of ``kinds``;
    - ``"SELECTOR: HEADS; SELECTOR: HEADS"``: heads per selector, ``HEADS`` being ``all``,
      ``0,3``, ``0-2`` or per-head strengths ``0=0.5, 3=1``;
    - a JSON object (the mapping form of ``SoftPAG(heads=...)``) as text, or a mapping.

    Sites of other kinds selected by a selector are dropped (``"m0"`` names attn1 and attn2 of
    a UNet block; SoftPAG takes the self-attention one); a selector left with no site is a
    :class:`~diffattn.errors.SelectorError`.
    """
    from .errors import SelectorError
    from .sites import select

    chosen_kinds = [s for s in site_list if s.kind in kinds]
    if isinstance(text, Mapping):
        return dict(text)
    text = str(text).strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise SelectorError(f"heads {text[:40]!r}...: not valid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise SelectorError("heads given as JSON must be an object {site: heads}")
        return value
    if text in ("", "all"):
        return {s.name: "all" for s in chosen_kinds}
    if text == "mid":
        if not chosen_kinds:
            raise SelectorError(f"no {'/'.join(kinds)} attention site to perturb")
        mids = [s for s in chosen_kinds if s.alias is not None and s.alias.startswith("m")]
        site = mids[0] if mids else chosen_kinds[len(chosen_kinds) // 2]
        return {site.name: "all"}
    out: dict = {}
    for item in [p.strip() for p in text.split(";") if p.strip()]:
        selector, sep, heads = item.partition(":")
        picked = [s for s in select(site_list, selector.strip()) if s.kind in kinds]
        if not picked:
            raise SelectorError(f"heads {item!r}: {selector.strip()!r} selects no {'/'.join(kinds)} attention site")
        spec = _head_values(heads.strip(), item, default_u) if sep else "all"
        for s in picked:
            out[s.name] = spec
    return out


def _head_values(text: str, item: str, default_u: float = 1.0):
    from .errors import SelectorError
    from .sites import parse_ints

    if text in ("", "all"):
        return "all"
    if "=" not in text:
        ints = parse_ints(text)
        if ints is None:
            raise SelectorError(f"heads {item!r}: {text!r} is not 'all', '0,3', '0-2' or '0=0.5, 3=1'")
        return ints
    values = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        h, eq, u = part.partition("=")
        try:
            values[int(h)] = float(u) if eq else float(default_u)
        except ValueError:
            raise SelectorError(f"heads {item!r}: {part!r} is not HEAD=U (e.g. 3=0.5)") from None
    return values


def translate_preset(preset: dict, site_list, translate: Callable[[str], str | None] | None = None) -> list:
    """The ``(site, head, u)`` entries of a HeadHunter preset, with site names passed through
    ``translate`` (a frontend whose site names differ, e.g. ComfyUI's module paths). A site
    that ``translate`` cannot map is a :class:`~diffattn.errors.SelectorError`."""
    from .errors import SelectorError

    known = {s.name for s in site_list}
    out = []
    for entry in preset.get("heads", []):
        name = entry[0]
        mapped = name if translate is None else translate(name)
        if mapped is None or mapped not in known:
            raise SelectorError(f"preset site {name!r} has no counterpart in this model's sites")
        out.append((mapped, *entry[1:]))
    return out


# ----------------------------------------------------------------------------- the control nodes


@dataclass(frozen=True)
class ControlNode:
    """One control as a node: its name (the workflow's ``"node"`` and the ComfyUI node id), its
    parameters (:class:`~diffattn.methods.registry.Param`), and how to build it.

    build:    ``build(sites, **values) -> Control`` (values checked, defaults filled in);
              ``sites`` is the model's site list (diffusers' ``diffattn.sites.sites(pipe)``, or
              the ComfyUI adapter's sites of a ComfyUI model).
    kinds:    the site kinds its attention patch acts on (the ComfyUI pack patches those).
    guidance: whether it adds a guidance branch (ComfyUI: a post-CFG function and a
              perturbed pass; diffusers: the engine's guidance wrapper).
    """

    name: str
    label: str
    summary: str
    params: tuple
    build: Callable
    kinds: tuple = PERTURBABLE
    guidance: bool = False
    method: str | None = None  # the method registry record it shares parameters with

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve(self, values: Mapping, where: str = "") -> dict:
        """Every parameter's value (the given ones checked, the others at their defaults); an
        unknown name or a bad value is a :class:`WorkflowError` naming ``where`` and the field."""
        where = where or self.name
        names = [p.name for p in self.params]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise WorkflowError(f"{where} field {unknown[0]!r}: {self.name} has no such parameter; its parameters: "
                                f"{', '.join(names)}")
        out = {}
        for p in self.params:
            value = values.get(p.name, p.default)
            if p.type is str and value is not None and not isinstance(value, str):
                if not (p.name == "heads" and isinstance(value, Mapping)):
                    raise WorkflowError(f"{where} field {p.name!r}: expected text, got {type(value).__name__}")
            if p.type in (int, float) and isinstance(value, bool):
                raise WorkflowError(f"{where} field {p.name!r}: expected a number, got {value!r}")
            try:
                out[p.name] = p.check(value, self.name)
            except DiffattnError as e:
                raise WorkflowError(f"{where} field {p.name!r}: {e.args[0] if e.args else e}") from None
        return out


CONTROL_NODES: dict[str, ControlNode] = {}


def register_control_node(node: ControlNode, *, replace_existing: bool = False) -> ControlNode:
    """Add a control node (the workflow files and the ComfyUI pack pick it up)."""
    if node.name in CONTROL_NODES and not replace_existing:
        raise WorkflowError(f"control node {node.name!r} is registered already")
    CONTROL_NODES[node.name] = node
    return node


def get_control_node(name: str, where: str = "") -> ControlNode:
    if name not in CONTROL_NODES:
        raise WorkflowError(f"{where + ' ' if where else ''}field 'node': unknown control {name!r}; known: "
                            f"{', '.join(CONTROL_NODES)}")
    return CONTROL_NODES[name]


def _build_softpag(sites, *, heads="mid", strength=1.0, scale=2.0, preset="", target="identity", semantics="joint",
                   translate=None):
    from .methods.softpag import SoftPAG, load_preset

    if preset:
        data = load_preset(preset)
        entries = [(site, int(h), float(rest[0]) * strength if rest else strength)
                   for site, h, *rest in translate_preset(data, sites, translate)]
        return SoftPAG(entries, scale=scale, target=target, semantics=semantics)
    return SoftPAG(parse_heads(heads, sites, strength), strength=strength, scale=scale, target=target,
                   semantics=semantics)


def _build_uniform(sites, *, sites_selector="auto", strength=1.0, mode="auto"):
    from .methods.uniform import UniformAttention
    from .sites import select

    if isinstance(sites_selector, str) and sites_selector.strip() != "auto":
        # resolved here, against this model's sites, so a selector naming nothing is refused
        # where the caller can name the control and its field (not later, at attach)
        select(sites, sites_selector)
    return UniformAttention(sites_selector, strength=strength, mode=mode)


_sp = get_method("softpag")
register_control_node(ControlNode(
    name="SoftPAG", label="SoftPAG (diffattn)", method="softpag",
    summary=_sp.summary,
    params=(
        replace(_sp.param("heads"), help="heads: mid, all, a site selector (m0, u0.0-2, input_blocks.4, "
                                         "joint_blocks.3), 'SELECTOR: 0,3; SELECTOR: 1=0.5' or a JSON mapping"),
        replace(_sp.param("strength"), default=1.0, help="strength u in [0, 1] (1 = PAG); with a preset, "
                                                         "multiplies the preset's per-head u"),
        replace(_sp.param("scale"), default=2.0, help="guidance scale s of the perturbed branch"),
        Param("preset", str, "", "a HeadHunter preset JSON file (replaces heads when given)"),
        _sp.param("target"),
        _sp.param("semantics"),
    ),
    build=lambda site_list, translate=None, **v: _build_softpag(site_list, translate=translate, **v),
    kinds=PERTURBABLE, guidance=True,
))

register_control_node(ControlNode(
    name="UniformAttention", label="Uniform attention maps (diffattn, UAM)",
    summary="uniform attention maps on cross-attention (segment-uniform on joint) sites, blended by strength",
    params=(
        Param("sites", str, "auto", "sites: auto (every cross-attention site; on MMDiTs every joint site) or a "
                                    "selector (cross, u0-2, output_blocks.3)"),
        Param("strength", float, 1.0, "strength u in [0, 1]: A' = (1 - u)A + u·uniform", range=(0.0, 1.0)),
        Param("mode", str, "auto", "auto: replace on cross sites, share on joint sites", choices=("auto", "replace",
                                                                                                   "share")),
    ),
    build=lambda site_list, translate=None, **v: _build_uniform(site_list, sites_selector=v["sites"], strength=v["strength"],
                                                            mode=v["mode"]),
    kinds=("cross", "joint", "single"),
))


# ----------------------------------------------------------------------------- workflow files

SAMPLING_FIELDS = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": float,
                   "height": int, "width": int}
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits (as the CLI's --seed)


@dataclass
class Workflow:
    """A validated workflow: ``model``, ``controls`` (``[(ControlNode, values)]``), ``sampling``."""

    model: str
    controls: list = field(default_factory=list)
    sampling: dict = field(default_factory=dict)
    source: str = "<workflow>"

    def build_controls(self, site_list, translate=None) -> list:
        """The controls for a model with sites ``site_list``; a value the control rejects (a
        selector matching nothing, an unreadable preset) is a :class:`WorkflowError` naming
        the node."""
        out = []
        for i, (node, values) in enumerate(self.controls):
            try:
                out.append(node.build(site_list, translate=translate, **values))
            except (DiffattnError, OSError) as e:
                field_name = _field_of(e, values)
                msg = e.args[0] if isinstance(e, DiffattnError) and e.args else str(e)
                raise WorkflowError(f"{self.source}: controls[{i}] ({node.name}){field_name}: {msg}") from None
        return out

    def call_kwargs(self) -> dict:
        """The pipeline call's keywords from ``sampling`` (the prompt and seed excluded)."""
        s, out = self.sampling, {}
        if "steps" in s:
            out["num_inference_steps"] = s["steps"]
        if "guidance" in s:
            out["guidance_scale"] = s["guidance"]
        for k in ("negative_prompt", "height", "width"):
            if k in s:
                out[k] = s[k]
        return out


def _field_of(error, values) -> str:
    text = str(error.args[0] if error.args else error)
    for name in ("preset", "heads", "sites", "mode", "strength", "scale"):
        if name in values and (name in text or (name == "heads" and "select" in text.lower())
                               or (name == "sites" and "site" in text.lower())):
            return f" field {name!r}"
    return ""


def load_workflow(source) -> Workflow:
    """A :class:`Workflow` from a path, a JSON string or a dict, validated (a
    :class:`WorkflowError` naming the node and field for every mistake)."""
    where = "<workflow>"
    if isinstance(source, (str, os.PathLike)) and not str(source).lstrip().startswith("{"):
        where = str(source)
        try:
            with open(source) as f:
                text = f.read()
        except OSError as e:
            raise WorkflowError(f"{where}: cannot read the workflow file ({e.strerror})") from None
        source = text
    if isinstance(source, str):
        try:
            source = json.loads(source)
        except json.JSONDecodeError as e:
            raise WorkflowError(f"{where}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(source, dict):
        raise WorkflowError(f"{where}: a workflow is a JSON object with 'model', 'controls' and 'sampling'")
    unknown = sorted(set(source) - {"model", "controls", "sampling", "comment"})
    if unknown:
        raise WorkflowError(f"{where}: field {unknown[0]!r} is not a workflow field (model, controls, sampling, comment)")
    model = source.get("model")
    if not isinstance(model, str) or not model.strip():
        raise WorkflowError(f"{where}: field 'model' is missing; name a model (e.g. \"tiny-sd3\", a diffusers "
                            f"folder or a hub id)")
    controls = source.get("controls", [])
    if not isinstance(controls, list):
        raise WorkflowError(f"{where}: field 'controls' must be a list of {{\"node\": ..., parameters}} objects")
    resolved = []
    for i, c in enumerate(controls):
        at = f"{where}: controls[{i}]"
        if not isinstance(c, dict):
            raise WorkflowError(f"{at}: each control is an object with 'node' and its parameters")
        if "node" not in c:
            raise WorkflowError(f"{at} field 'node': missing; one of {', '.join(CONTROL_NODES)}")
        node = get_control_node(c["node"], at)
        params = {k: v for k, v in c.items() if k != "node"}
        resolved.append((node, node.resolve(params, f"{at} ({node.name})")))
    sampling = source.get("sampling", {})
    if not isinstance(sampling, dict):
        raise WorkflowError(f"{where}: field 'sampling' must be an object (prompt, seed, steps, guidance...)")
    checked = {}
    for k, v in sampling.items():
        if k not in SAMPLING_FIELDS:
            raise WorkflowError(f"{where}: sampling field {k!r} is unknown; fields: {', '.join(SAMPLING_FIELDS)}")
        checked[k] = _sampling_value(where, k, v)
    if not checked.get("prompt", "").strip():
        raise WorkflowError(f"{where}: sampling field 'prompt' is "
                            f"{'missing' if 'prompt' not in checked else 'empty: write some words'}")
    return Workflow(model.strip(), resolved, checked, where)


def _sampling_value(where: str, k: str, v):
    """One sampling field checked: its type, finite (JSON reads ``NaN`` / ``Infinity``), whole
    where it must be, and in range (``seed`` 0 to 2**64 - 1; ``steps`` / ``height`` / ``width``
    at least 1; ``guidance`` at least 0)."""
    t = SAMPLING_FIELDS[k]
    at = f"{where}: sampling field {k!r}"
    if t is str:
        if not isinstance(v, str):
            raise WorkflowError(f"{at}: expected str (text), got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise WorkflowError(f"{at}: expected {t.__name__}, got {v!r}")
    if isinstance(v, float):
        if not math.isfinite(v):
            raise WorkflowError(f"{at}: {v!r} is not finite; give a finite number")
        if t is int and not v.is_integer():
            raise WorkflowError(f"{at}: expected int (a whole number), got {v!r}")
    lo, hi = {"seed": (0, SEED_MAX), "guidance": (0, None)}.get(k, (1, None))
    if v < lo or (hi is not None and v > hi):
        bounds = "0 to 2**64 - 1" if k == "seed" else f"at least {lo}"
        raise WorkflowError(f"{at}: {v!r} is out of range ({k} must be {bounds})")
    return t(v)


def run_workflow(workflow, load_model: Callable[[str], Any], *, generator_device: str = "cpu",
                 check: Callable[[Any, "Workflow"], None] | None = None):
    """Run a workflow: ``load_model(name) -> pipeline`` (a frontend passes its loader in), the
    controls attached with ``diffattn.attach``, one pipeline call. Returns the pipeline output.
    A model the loader cannot load is a :class:`WorkflowError` naming the ``model`` field.
    ``check(pipe, workflow)``, when given, runs once the model is loaded and the controls are
    built and attached, before anything is sampled (a frontend's checks of the sizes and the
    prompt against the model)."""
    import torch

    from .engine import attach
    from .sites import sites

    wf = workflow if isinstance(workflow, Workflow) else load_workflow(workflow)
    try:
        pipe = load_model(wf.model)
    except (DiffattnError, OSError, ValueError) as e:
        raise WorkflowError(f"{wf.source}: field 'model': cannot load {wf.model!r}: "
                            f"{e.args[0] if e.args else e}") from None
    controls = wf.build_controls(sites(pipe))
    s = wf.sampling
    generator = torch.Generator(generator_device).manual_seed(int(s.get("seed", 0)))
    with attach(pipe, *controls):
        if check is not None:
            check(pipe, wf)
        return pipe(s["prompt"], generator=generator, **wf.call_kwargs())
