"""Attention sites: every attention module of a diffusers model, with a stable name.

A *site* is one attention module (``down_blocks.1.attentions.0.transformer_blocks.0.attn1``,
``transformer_blocks.3.attn``). Selectors address sites and heads by strict integers
(``blocks.1`` never matches ``blocks.10``), by kind, by ranges, and by the d/m/u aliases
UNet users know from ComfyUI (``d2.1``, ``m0``, ``u1.0-2``).

Selector grammar (:func:`select`), each form also usable inside a list (union):

- ``"all"``; a kind: ``"self"``, ``"cross"``, ``"joint"``, ``"single"``;
- a path, matched component by component against the *start* of site names:
  ``"transformer_blocks.1"`` selects ``transformer_blocks.1.attn`` (and ``.attn2``) but never
  ``transformer_blocks.10.attn``; a component may be ``*`` (any one component), a glob such as
  ``attn*``, an inclusive integer range ``2-4``, a list ``0,3`` or both ``0-2,5``; ``**``
  matches any number of components (``"**.attn2"``: every ``attn2``);
- a UNet alias ``d{i}.{t}``, ``m{i}.{t}``, ``u{i}.{t}`` (ranges/lists allowed in both numbers;
  ``.{t}`` optional), or ``"down"``, ``"mid"``, ``"up"`` for a whole part;
- a string holding several of these separated by commas or spaces (``"m0, u0.4"``); a bare
  number after a comma continues the previous item (``"blocks.0,3"`` is one item);
- a :class:`Site` (by name), a callable ``Site -> bool``, ``None`` (= ``"all"``).

UNet aliases follow pamparamm/sd-perturbed-attention (the ComfyUI block-list convention):
``d``/``m``/``u`` = ComfyUI ``input``/``middle``/``output`` blocks; the first number counts the
*attention-bearing* blocks of that part in forward order (one diffusers
``{down,mid,up}_blocks.B.attentions.A`` = one ComfyUI block holding a SpatialTransformer); the
second number is the ``transformer_blocks`` index inside it. SD1.5: ``d0..d5``, ``m0``,
``u0..u8``, all ``.0``; SDXL: ``d0-1.0-1``, ``d2-3.0-9``, ``m0.0-9``, ``u0-2.0-9``,
``u3-5.0-1``. A BasicTransformerBlock holds ``attn1`` (self) and ``attn2`` (cross): both carry
its alias; narrow with a kind (``select(select(unet, "m0"), "self")``).
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import SelectorError, UnsupportedModelError

if TYPE_CHECKING:  # torch is imported when a model is addressed, so `import diffattn` (and the CLI's --help) stays cheap
    import torch.nn as nn

KINDS = ("self", "cross", "joint", "single")
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")  # pipeline attributes searched, in order



@dataclass(frozen=True)
class Site:
    """One attention module of a model.

    name:   module path inside the denoiser, e.g. ``transformer_blocks.3.attn``
            (the key of ``attn_processors`` without the ``.processor`` suffix).
    family: the name of the :mod:`diffattn.families` family whose processor runs it
            (``"unet" | "sd3" | "flux" | "wan"`` or a registered one).
    kind:   ``"self" | "cross" | "joint" | "single"`` (single = FLUX single-stream block,
            text and image pre-concatenated).
    block:  index of the transformer block in its stack (UNet: running index of
            ``BasicTransformerBlock`` over the whole UNet in forward order).
    heads:  number of attention heads.
    head_dim: channels per head.
    alias:  UNet d/m/u alias (``d1.0``, ``m0``, ``u2.1``), else ``None``.
    module: the attention module itself (excluded from equality/hash).
    denoiser: the pipeline attribute holding the module (``"unet"``, ``"transformer"``,
            ``"transformer_2"``), ``None`` when sites were listed from a bare model. Sites of
            ``transformer_2`` carry the name prefix ``transformer_2.``.
    """

    name: str
    family: str
    kind: str
    block: int
    heads: int
    head_dim: int
    alias: str | None = None
    module: nn.Module | None = field(default=None, compare=False, hash=False, repr=False)
    denoiser: str | None = None

    @property
    def local_name(self) -> str:
        """The name inside its own denoiser (without a ``transformer_2.`` prefix)."""
        prefix = _prefix(self.denoiser)
        return self.name[len(prefix):] if prefix and self.name.startswith(prefix) else self.name

    @property
    def processor_key(self) -> str:
        """The key of this site in its denoiser's ``attn_processors`` dict."""
        return self.local_name + ".processor"


# ----------------------------------------------------------------------------- enumeration


def _prefix(denoiser: str | None) -> str:
    """Name prefix of a denoiser's sites: only a second expert gets one (``transformer_2.``)."""
    return "transformer_2." if denoiser == "transformer_2" else ""


def _unwrap(model):
    """The module behind ``torch.compile`` (``OptimizedModule._orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def denoisers(target) -> list[tuple[str | None, nn.Module]]:
    """``[(attribute, model), ...]`` of the attention-bearing denoisers of ``target``.

    A pipeline gives its ``unet`` or ``transformer`` (and ``transformer_2`` when set, Wan 2.2);
    a bare model gives ``[(None, model)]``.
    """
    import torch.nn as nn

    target = _unwrap(target)
    if isinstance(target, nn.Module) and hasattr(target, "attn_processors"):
        return [(None, target)]
    found = []
    for attr in DENOISER_ATTRS:
        model = getattr(target, attr, None)
        if model is not None:
            model = _unwrap(model)
            if isinstance(model, nn.Module) and hasattr(model, "attn_processors"):
                found.append((attr, model))
    if not found:
        raise UnsupportedModelError(
            f"{type(target).__name__} has no attention processors diffattn can address. Supported: {_supported()}."
        )
    return found


def _supported() -> str:
    from .families import supported

    return supported()


def _make_site(name, family, module, block, alias, denoiser) -> Site:
    heads = int(module.heads)
    return Site(
        name=_prefix(denoiser) + name,
        family=family.name,
        kind=family.kind(module),
        block=block,
        heads=heads,
        head_dim=module.to_q.out_features // heads,
        alias=alias,
        module=module,
        denoiser=denoiser,
    )


def _model_sites(model: nn.Module, denoiser: str | None) -> list[Site]:
    """Sites of one denoiser: each attention module's family from the registry
    (:mod:`diffattn.families`), which also orders them and names their blocks."""
    from .families import family_of, supported

    by_family: dict[str, tuple[object, list]] = {}
    for key in model.attn_processors:
        name = key.removesuffix(".processor")
        module = model.get_submodule(name)
        family = family_of(model, module)
        if family is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: attention module {name!r} ({type(module).__name__}) has no diffattn "
                f"processor family. Supported: {supported()}."
            )
        by_family.setdefault(family.name, (family, []))[1].append((name, module))
    if not by_family:
        raise UnsupportedModelError(f"{type(model).__name__} has no attention modules. Supported: {supported()}.")
    return [_make_site(name, family, module, block, alias, denoiser)
            for family, entries in by_family.values()
            for name, module, block, alias in family.blocks(entries)]


def sites(target) -> list[Site]:
    """Every attention site of a pipeline or a bare denoiser, in forward order.

    ``target``: a diffusers pipeline (its ``unet`` / ``transformer``, plus ``transformer_2``
    with the name prefix ``transformer_2.``), a denoiser model, or a list of sites (returned
    as a list). Raises :class:`~diffattn.errors.UnsupportedModelError` for other models.
    """
    if isinstance(target, (list, tuple)) and all(isinstance(s, Site) for s in target):
        return list(target)
    out: list[Site] = []
    for denoiser, model in denoisers(target):
        out.extend(_model_sites(model, denoiser))
    return out


# ----------------------------------------------------------------------------- matching

_INT_SPEC = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_ALIAS = re.compile(r"^([dmu])(\d[\d,\-]*)?(?:\.(\d[\d,\-]*))?$")
_PARTS = {"down": "d", "mid": "m", "middle": "m", "up": "u"}


def parse_ints(spec: str) -> list[int] | None:
    """``"2-4"`` -> [2, 3, 4], ``"0,3"`` -> [0, 3], ``"0-2,5"`` -> [0, 1, 2, 5] (inclusive
    ranges, sorted, unique); ``None`` when ``spec`` is not such a list."""
    spec = spec.replace(" ", "")
    if not _INT_SPEC.match(spec):
        return None
    values: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        if hi_i < lo_i:
            raise SelectorError(f"range {part!r} is empty: write low-high with low <= high")
        values.update(range(lo_i, hi_i + 1))
    return sorted(values)


def _component_matches(pattern: str, comp: str) -> bool:
    """One path component: integer spec (strict integers), glob, or literal."""
    ints = parse_ints(pattern)
    if ints is not None:
        return comp.isdigit() and int(comp) in ints
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(comp, pattern)
    return comp == pattern


def match_path(pattern: str, name: str) -> bool:
    """Whether path ``pattern`` matches the start of site ``name``, component by component.

    ``match_path("blocks.1", "blocks.1.attn1")`` is True, ``match_path("blocks.1",
    "blocks.10.attn1")`` is False; ``*`` is one component, ``**`` any number of them.
    """
    pat, comps = pattern.split("."), name.split(".")

    def go(i: int, j: int) -> bool:
        if i == len(pat):
            return True  # prefix match: the rest of the name is free
        if pat[i] == "**":
            return any(go(i + 1, k) for k in range(j, len(comps) + 1))
        return j < len(comps) and _component_matches(pat[i], comps[j]) and go(i + 1, j + 1)

    return go(0, 0)


def match_alias(pattern: str, alias: str | None) -> bool:
    """Whether UNet alias ``pattern`` (``d2``, ``u1.0-2``, ``m0``, ``d0-1.1``) matches ``alias``."""
    if alias is None:
        return False
    m, a = _ALIAS.match(pattern), _ALIAS.match(alias)
    if m is None or a is None or m.group(1) != a.group(1):
        return False
    for want, have in ((m.group(2), a.group(2)), (m.group(3), a.group(3))):
        if want is not None and int(have) not in (parse_ints(want) or []):
            return False
    return True


def is_alias(text: str) -> bool:
    """Whether ``text`` is a d/m/u alias pattern."""
    return bool(_ALIAS.match(text))


def split_selector(text: str) -> list[str]:
    """Split a selector string into items: commas/spaces separate items, but a bare number
    after a comma continues the previous item's last component (``"blocks.0,3"``)."""
    items: list[str] = []
    for raw in re.split(r"\s*,\s*|\s+", text.strip()):
        if not raw:
            continue
        if parse_ints(raw) is not None and items:
            items[-1] += "," + raw
        elif parse_ints(raw) is not None:
            raise SelectorError(
                f"selector {text!r} starts with a bare number: block numbers are ambiguous across stacks; "
                f"write a path such as 'transformer_blocks.{raw}' or 'blocks.{raw}'"
            )
        else:
            items.append(raw)
    return items


def _matcher(item) -> Callable[[Site], bool]:
    """The predicate of one selector item (string item, Site, or callable)."""
    if isinstance(item, Site):
        return lambda s: s.name == item.name
    if callable(item):
        return lambda s: bool(item(s))
    if not isinstance(item, str):
        raise SelectorError(
            f"cannot select sites with {item!r} ({type(item).__name__}): use 'all', a kind {KINDS}, a path, "
            f"a d/m/u alias, a list of these, or a callable Site -> bool"
        )
    if item == "all":
        return lambda s: True
    if item in KINDS:
        return lambda s: s.kind == item
    if item in _PARTS:
        return lambda s: s.alias is not None and s.alias.startswith(_PARTS[item])
    if _ALIAS.match(item):
        return lambda s: match_alias(item, s.alias)
    return lambda s: match_path(item, s.name)


def _items(selector) -> list:
    """Flatten a selector into its items (strings split on commas/spaces)."""
    if selector is None:
        return ["all"]
    if isinstance(selector, str):
        items = split_selector(selector)
        if not items:
            raise SelectorError("empty selector: use 'all', a kind, a path or a d/m/u alias")
        return items
    if isinstance(selector, Site) or callable(selector):
        return [selector]
    if isinstance(selector, Iterable):
        out = []
        for item in selector:
            out.extend(_items(item) if isinstance(item, str) else [item])
        if not out:
            raise SelectorError("empty selector list: name at least one site")
        return out
    return [selector]


def select(sites_or_target, selector) -> list[Site]:
    """The sites ``selector`` names (grammar in the module docstring), in forward order.

    A list of items is a union; every item must name at least one site, else
    :class:`~diffattn.errors.SelectorError` says what exists. Selecting from a previous
    result intersects: ``select(select(pipe, "m0"), "self")``.
    """
    all_sites = sites(sites_or_target)
    chosen: set[str] = set()
    for item in _items(selector):
        matches = _matcher(item)
        hits = [s.name for s in all_sites if matches(s)]
        if not hits:
            raise SelectorError(f"selector {_show(item)} names no site. {describe(all_sites)}")
        chosen.update(hits)
    return [s for s in all_sites if s.name in chosen]


def _show(item) -> str:
    if isinstance(item, str):
        return repr(item)
    if isinstance(item, Site):
        return f"Site {item.name!r}"
    return getattr(item, "__name__", repr(item))


def select_heads(site: Site | int, heads="all") -> list[int]:
    """Head indices of ``site`` named by ``heads``: ``"all"``/``None``, an int, a list of ints,
    a ``range``, or a string ``"0-3"``, ``"1,4"``, ``"0-2,7"`` -> sorted unique list.

    ``site`` may also be a head count. A head that does not exist raises
    :class:`~diffattn.errors.SelectorError` giving the valid range.
    """
    n = site if isinstance(site, int) else site.heads
    where = f"{n} heads" if isinstance(site, int) else f"site {site.name!r} has {n} heads"
    valid = f"{where} (valid: 0-{n - 1}, 'all', lists, ranges such as '0-{n - 1}')"
    if heads is None or (isinstance(heads, str) and heads.strip() == "all"):
        return list(range(n))
    if isinstance(heads, bool):
        raise SelectorError(f"heads={heads!r} is not a head index; {valid}")
    if isinstance(heads, int):
        wanted = [heads]
    elif isinstance(heads, str):
        wanted = parse_ints(heads)
        if wanted is None:
            raise SelectorError(f"cannot read heads {heads!r}; {valid}")
    else:
        try:
            wanted = [int(h) for h in heads]
        except (TypeError, ValueError):
            raise SelectorError(f"cannot read heads {heads!r}; {valid}") from None
    if not wanted:
        raise SelectorError(f"heads {heads!r} names no head; {valid}")
    bad = sorted({h for h in wanted if not 0 <= h < n})
    if bad:
        raise SelectorError(f"head(s) {bad} do not exist: {valid}")
    return sorted(set(wanted))


# ----------------------------------------------------------------------------- display


def _ranges(values: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    values = sorted(set(values))
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v != start else f"{v}")
            start = None
    return ",".join(out)


def summarize_names(names: Sequence[str]) -> list[str]:
    """Compress site names exactly: names that differ only in their *last* integer component
    become one pattern with a range (``transformer_blocks.{0-10}.attn``)."""
    groups: dict[str, list[int]] = {}  # template with "{}" at the last integer -> its values
    for name in names:
        comps = name.split(".")
        digits = [i for i, c in enumerate(comps) if c.isdigit()]
        if not digits:
            groups.setdefault(name.replace("{", "{{").replace("}", "}}"), [])
            continue
        last = digits[-1]
        groups.setdefault(".".join(comps[:last] + ["{}"] + comps[last + 1:]), []).append(int(comps[last]))
    out = []
    for template, values in groups.items():
        if not values:
            out.append(template.format())
            continue
        r = _ranges(values)
        out.append(template.format(r if r.isdigit() else "{" + r + "}"))
    return out


def describe(site_list: Sequence[Site]) -> str:
    """What exists, for error messages: site names (compressed), kinds, aliases."""
    if not site_list:
        return "The model has no attention sites."
    names = summarize_names([s.name for s in site_list])
    kinds = sorted({s.kind for s in site_list}, key=KINDS.index)
    text = f"Sites ({len(site_list)}): " + ", ".join(names) + f". Kinds: {', '.join(kinds)}."
    aliases = [s.alias for s in site_list if s.alias]
    if aliases:
        groups: dict[str, list[int]] = {}
        for a in aliases:
            head, _, t = a.partition(".")
            groups.setdefault(head, []).append(int(t))
        text += " Aliases: " + ", ".join(f"{g}.{_ranges(ts)}" for g, ts in groups.items()) + "."
    else:
        text += " (d/m/u aliases exist only on UNet models.)"
    return text


def format_sites(site_list: Sequence[Site]) -> str:
    """A plain-text table of sites (name, family, kind, block, heads, head_dim, alias)."""
    header = ("name", "family", "kind", "block", "heads", "head_dim", "alias")
    rows = [(s.name, s.family, s.kind, str(s.block), str(s.heads), str(s.head_dim), s.alias or "-") for s in site_list]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {3, 4, 5}  # numbers right-aligned

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]
    lines.append(f"{len(rows)} sites")
    return "\n".join(lines)
