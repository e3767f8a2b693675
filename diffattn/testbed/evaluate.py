"""Evaluation harness: many (prompt, seed) pairs -> oracle metrics with 95% intervals.

    from diffattn.testbed.evaluate import evaluate, evaluate_suite, suite_prompts, eval_seeds
    report = evaluate(pipe, suite_prompts("two"), eval_seeds(64), num_inference_steps=20)
    print(report.to_markdown())

**Pairing.** Image ``i`` pairs prompt ``prompts[i % len(prompts)]`` with seed ``seeds[i]``:
``n`` seeds give ``n`` images, cycling through the prompts (a multiple of the suite length
gives every prompt the same number of images). Pass ``pairs=[(prompt, seed), ...]`` for any
other design, e.g. ``cross_pairs(prompts, seeds)`` for every prompt with every seed. Each
image is generated with ``torch.Generator().manual_seed(seed)``, so an image depends on its
own seed only, not on the batch it was drawn in (up to batched-kernel float noise).

**Seeds.** ``TRAIN_SEEDS`` are for searches and tuning (HeadHunter, defaults sweeps);
``eval_seeds(n)`` come from a disjoint range that no training, search or tuning may use.

**Intervals** (95%):

- rates of a yes/no per image (all objects present, relation, extra objects, fully correct):
  Wilson score interval (Wilson 1927), which stays inside [0, 1] and is sound at 0 and 1;
- per-image fractions (object, colour and style accuracy): Wilson interval of the mean
  fraction with n = the number of images. Counting each object as a trial would treat the
  objects of one image as independent; they are not (a failed generation loses all of
  them), so the interval is taken over images, the unit that was sampled;
- Vendi scores: mean over prompts with a Student-t interval over prompts.

**Diversity.** Vendi score (Friedman & Dieng 2023, "The Vendi Score", eq. 1):
``exp(-sum_i lambda_i log lambda_i)``, ``lambda`` the eigenvalues of ``K / n`` with ``K`` the
cosine-similarity kernel of ``n`` feature vectors: the effective number of distinct items,
1 for identical items, ``n`` for orthogonal ones. Computed per prompt across its seeds, then
averaged over prompts. ``vendi`` uses oracle features (which objects, where, how big, which
style: ``oracle_features``), ``vendi_pixels`` 16x16 downsampled pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from ..errors import DiffattnError
from . import oracle
from .world import COLORS, RELATIONS, SHAPES, SIZE, PromptSpec, caption, parse_prompt

# ----------------------------------------------------------------------------- seeds

TRAIN_SEEDS = range(0, 100_000)  # for searches and tuning
EVAL_SEED_START = 1_000_000  # evaluation seeds: never used for training, searches or tuning


def eval_seeds(n: int, offset: int = 0) -> list[int]:
    """``n`` evaluation seeds (disjoint from ``TRAIN_SEEDS``); ``offset`` skips the first ones."""
    return list(range(EVAL_SEED_START + offset, EVAL_SEED_START + offset + n))


def train_seeds(n: int, offset: int = 0) -> list[int]:
    """``n`` seeds for searches and tuning."""
    if offset + n > len(TRAIN_SEEDS):
        raise DiffattnError(f"only {len(TRAIN_SEEDS)} training seeds exist; asked for {offset + n}")
    return list(TRAIN_SEEDS[offset : offset + n])


# ----------------------------------------------------------------------------- suites

OBJECTS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)  # 12, colour-major
# Suites hold 32 prompts (single: 12) so that the usual 64 or 128 seeds give every prompt the
# same number of images. Pairs and triples come from cyclic designs over the 12 objects.
_PAIR_OFFSETS = (2, 3, 5)  # object i pairs with i + d (mod 12): 36 distinct pairs, each object in 6
_PAIRS_DROPPED = ((5, 0), (5, 4), (5, 6), (5, 8))  # (d, i): 4 disjoint pairs -> 32; objects in 5 or 6 pairs
_TRIPLE_OFFSETS = ((1, 5), (2, 7), (3, 8))  # object i with i + a and i + b: 36 distinct triples, each object in 9
_TRIPLES_DROPPED = (((1, 5), 0), ((1, 5), 3), ((1, 5), 6), ((1, 5), 9))  # 4 disjoint triples -> 32, each object in 8
_STYLE_COMBOS = ({"dark": True, "outline": False}, {"dark": False, "outline": True}, {"dark": True, "outline": True})


def _pairs() -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """32 unordered pairs of distinct objects (4 share a colour, 12 a shape), every object in 5
    or 6 of them, the first position alternating between the two objects."""
    out = []
    for d in _PAIR_OFFSETS:
        for i in range(len(OBJECTS)):
            if (d, i) in _PAIRS_DROPPED:
                continue
            a, b = OBJECTS[i], OBJECTS[(i + d) % len(OBJECTS)]
            out.append((a, b) if i % 2 == 0 else (b, a))
    return out


def _triples() -> list[tuple[tuple[str, str], ...]]:
    """32 distinct triples, every object in 8; the order rotates so each position is shared."""
    out = []
    for a, b in _TRIPLE_OFFSETS:
        for i in range(len(OBJECTS)):
            if ((a, b), i) in _TRIPLES_DROPPED:
                continue
            t = [OBJECTS[i], OBJECTS[(i + a) % 12], OBJECTS[(i + b) % 12]]
            r = i % 3
            out.append(tuple(t[r:] + t[:r]))
    return out


def _build_suites() -> dict[str, tuple[PromptSpec, ...]]:
    plain = {"dark": False, "outline": False}
    return {
        # every colour x shape once
        "single": tuple(PromptSpec(objects=(o,), styles=dict(plain)) for o in OBJECTS),
        # 32 near-balanced distinct-object pairs, "a X and a Y"
        "two": tuple(PromptSpec(objects=p, styles=dict(plain)) for p in _pairs()),
        # the same pairs with a relation, the four relations 8 times each
        "relation": tuple(
            PromptSpec(objects=p, relation=RELATIONS[k % 4], styles=dict(plain)) for k, p in enumerate(_pairs())
        ),
        # 32 balanced triples
        "three": tuple(PromptSpec(objects=t, styles=dict(plain)) for t in _triples()),
        # single objects with a style combination (dark, outlines, both), each combination ~11 times
        "style": tuple(
            PromptSpec(objects=(OBJECTS[k % 12],), styles=dict(_STYLE_COMBOS[(k // 12 + k) % 3])) for k in range(32)
        ),
    }


SUITE_SPECS: dict[str, tuple[PromptSpec, ...]] = _build_suites()
SUITES: dict[str, tuple[str, ...]] = {name: tuple(caption(s) for s in specs) for name, specs in SUITE_SPECS.items()}


# v2 suites (world v2: markings, graded aesthetics, partial captions), beside the v1 suites
# above, which stay as they are. Prompts are v2 captions (``world.parse_prompt_v2``), graded by
# ``oracle.score_v2``; seeds are the same ``eval_seeds``.
from . import world as _w  # noqa: E402

_MARKED = ("dot", "stripes", "half", "none")  # cycled over subjects: every marking, each shape and colour


class SubjectGroup(NamedTuple):
    """IR-Diffusion: reference prompts (one subject each) and the scene that must show those
    subjects, their identities (colour, shape and marking) taken from the references."""

    references: tuple[_w.PromptSpecV2, ...]
    scene: _w.PromptSpecV2


def _ir_groups(named: bool) -> tuple[SubjectGroup, ...]:
    """32 two-subject groups over the v1 pairs; subject markings cycle over every marking. The
    scene names colour and shape only (the marking is the references' identity); references
    name the marking (``named``) or leave it to the reference image."""
    out = []
    for k, pair in enumerate(_pairs()):
        marks = (_MARKED[k % 4], _MARKED[(k + 1 + k // 4) % 4])
        refs = tuple(_w.PromptSpecV2(objects=(_w.ObjectSpec(s, c, m if named else None),)) for (c, s), m in zip(pair, marks))
        scene = _w.PromptSpecV2(objects=tuple(_w.ObjectSpec(s, c) for c, s in pair),
                                relation=RELATIONS[k % 4] if k % 2 else None)
        out.append(SubjectGroup(refs, scene))
    return tuple(out)


def _ir_groups3() -> tuple[SubjectGroup, ...]:
    """32 three-subject groups over the v1 triples, references naming the marking; the three
    subjects of a group carry three different markings, cycling over ``_MARKED`` so each marking
    appears 24 times in all. The scene names colour and shape only, with no relation (the
    world's relations are binary)."""
    out = []
    for k, triple in enumerate(_triples()):
        marks = tuple(_MARKED[(k + j) % 4] for j in range(3))
        refs = tuple(_w.PromptSpecV2(objects=(_w.ObjectSpec(s, c, m),)) for (c, s), m in zip(triple, marks))
        out.append(SubjectGroup(refs, _w.PromptSpecV2(objects=tuple(_w.ObjectSpec(s, c) for c, s in triple))))
    return tuple(out)


def _aesthetic_content(k: int) -> tuple[_w.ObjectSpec, ...]:
    """Content of aesthetic prompt k: a single object (even k) or a v1 pair (odd k), markings open."""
    objs = (OBJECTS[k % 12],) if k % 2 == 0 else _pairs()[k]
    return tuple(_w.ObjectSpec(s, c) for c, s in objs)


def _underspecified() -> tuple[_w.PromptSpecV2, ...]:
    """64 prompts whose open attributes have known priors (``world.P_MARKINGS``, uniform
    colours): 12 colour + shape (marking open), 12 marking + shape (colour open), 8 shape-only
    layouts (colours and markings open), 16 v1 pairs with colours named (markings open) and 16
    two-shape layouts naming nothing else (issue 24 asks for >= 64 prompts)."""
    out = [_w.PromptSpecV2(objects=(_w.ObjectSpec(s, c),)) for c, s in OBJECTS]
    out += [_w.PromptSpecV2(objects=(_w.ObjectSpec(s, None, m),)) for m in ("none", "dot", "stripes", "half") for s in SHAPES]
    O = _w.ObjectSpec
    out += [_w.PromptSpecV2(objects=(O(s),)) for s in SHAPES]
    out += [_w.PromptSpecV2(objects=(O("circle"), O("square"))), _w.PromptSpecV2(objects=(O("square"), O("triangle"))),
            _w.PromptSpecV2(objects=(O("triangle"), O("circle")), relation="left of"),
            _w.PromptSpecV2(objects=(O("circle"), O("circle"))),
            _w.PromptSpecV2(objects=(O("circle"), O("square"), O("triangle")))]
    out += [_w.PromptSpecV2(objects=tuple(O(s, c) for c, s in pair), relation=RELATIONS[k % 4] if k % 2 else None)
            for k, pair in enumerate(_pairs()[:16])]
    seen = {_w.caption_v2(sp) for sp in out}
    k = 0
    while len(out) < 64:  # two shapes (3 x 3 orders) x no relation / each relation, skipping prompts already listed
        sp = _w.PromptSpecV2(objects=(O(SHAPES[k % 3]), O(SHAPES[(k // 3) % 3])), relation=(None, *RELATIONS)[k % 5])
        if _w.caption_v2(sp) not in seen:
            seen.add(_w.caption_v2(sp))
            out.append(sp)
        k += 1
    return tuple(out)


def _build_suites_v2() -> dict[str, tuple[_w.PromptSpecV2, ...]]:
    styles = _w.STYLES_V2
    return {
        # v1 suites as v2 prompts: the same captions, read with unnamed styles open
        **{f"v1_{name}": tuple(_w.parse_prompt_v2(p) for p in prompts) for name, prompts in SUITES.items()},
        # every marking x colour x shape, fully named (48)
        "marked": tuple(_w.PromptSpecV2(objects=(_w.ObjectSpec(s, c, m),)) for m in _w.MARKINGS for c, s in OBJECTS),
        # IR-Diffusion: the scenes of the subject groups (references in IR_SUITES)
        "ir_scene": tuple(g.scene for g in _ir_groups(True)),
        # VMix: one named aesthetic per prompt (dark, outline, shadow, light, centred cycling), markings open
        "aesthetic_one": tuple(_w.PromptSpecV2(objects=_aesthetic_content(k), styles={styles[k % 5]: True})
                               for k in range(32)),
        # VMix: every aesthetic named (the "all positive labels" input)
        "aesthetic_all": tuple(_w.PromptSpecV2(objects=_aesthetic_content(k), styles={s: True for s in styles})
                               for k in range(32)),
        # VMix: the same content with no aesthetic named (uncaptioned: the model's choice, the base rates)
        "aesthetic_none": tuple(_w.PromptSpecV2(objects=_aesthetic_content(k)) for k in range(32)),
        # repulsion: under-specified prompts, each a group over seeds with a known mode set
        "underspecified": _underspecified(),
    }


SUITE_SPECS_V2: dict[str, tuple[_w.PromptSpecV2, ...]] = _build_suites_v2()
SUITES_V2: dict[str, tuple[str, ...]] = {n: tuple(_w.caption_v2(s) for s in specs) for n, specs in SUITE_SPECS_V2.items()}
# IR-Diffusion subject groups: references naming the marking ("ir_named") or leaving it open ("ir_open")
IR_SUITES: dict[str, tuple[SubjectGroup, ...]] = {"ir_named": _ir_groups(True), "ir_open": _ir_groups(False),
                                                   "ir_named3": _ir_groups3()}


def suite_specs_v2(name: str) -> list[_w.PromptSpecV2]:
    """The fixed v2 prompt specs of a v2 suite (``SUITES_V2``)."""
    if name not in SUITE_SPECS_V2:
        raise DiffattnError(f"unknown v2 suite {name!r}; choose one of {list(SUITE_SPECS_V2)}")
    return list(SUITE_SPECS_V2[name])


def suite_prompts_v2(name: str) -> list[str]:
    """The fixed v2 captions of a v2 suite."""
    return [_w.caption_v2(s) for s in suite_specs_v2(name)]


def open_modes(spec: _w.PromptSpecV2) -> list[tuple[tuple[str, str], ...]]:
    """Every mode an under-specified prompt allows: per object the (colour, marking) pairs its
    open attributes can take (named ones fixed), as the product over objects. The world's
    priors: colours uniform, markings ``world.P_MARKINGS``."""
    import itertools

    per = [[(c, m) for c in ([o.color] if o.color else list(COLORS)) for m in ([o.marking] if o.marking else _w.MARKINGS)]
           for o in spec.objects]
    return list(itertools.product(*per))


def check_suite(name: str) -> None:
    """A :class:`~diffattn.errors.DiffattnError` listing the suites unless ``name`` is one."""
    if name not in SUITES:
        raise DiffattnError(f"unknown suite {name!r}; choose one of {list(SUITES)} (or 'all' on the command line)")


def suite_specs(name: str) -> list[PromptSpec]:
    """The fixed prompt specs of a suite (what each prompt asks for)."""
    check_suite(name)
    return list(SUITE_SPECS[name])


_suite_specs = suite_specs  # older name


def suite_prompts(name: str) -> list[str]:
    """The fixed prompt list of a suite: ``single`` (12 prompts), ``two``, ``relation``,
    ``three``, ``style`` (32 each)."""
    check_suite(name)
    return list(SUITES[name])


def cross_pairs(prompts, seeds) -> list[tuple[str, int]]:
    """Every prompt with every seed (prompt-major): for diversity over seeds per prompt."""
    return [(p, int(s)) for p in prompts for s in seeds]


# ----------------------------------------------------------------------------- statistics


class Metric(NamedTuple):
    value: float
    low: float
    high: float
    n: int  # number of units the value is a mean over (images, or prompts for Vendi)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate ``successes / n`` (Wilson 1927):
    ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``. ``successes`` may be fractional
    (a mean of per-unit fractions times n). NaNs for n = 0."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t ``confidence`` interval of a sample (NaN bounds for fewer than 2)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (float("nan"),) * 3
    m = float(v.mean())
    if len(v) < 2:
        return (m, float("nan"), float("nan"))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return (m, m - half, m + half)


def paired_bootstrap(a, b, n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired samples (the same prompt and seed under two settings)
    and its 95% percentile-bootstrap interval (``n`` resamples of the pairs)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))  # [n, pairs] resampled pair indices
    means = d[idx].mean(axis=1)  # [n]
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def rate_metric(values) -> Metric:
    """Mean of per-unit values in [0, 1] (booleans or fractions) with its Wilson interval."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return Metric(float("nan"), float("nan"), float("nan"), 0)
    return Metric(float(v.mean()), *wilson_interval(float(v.sum()), len(v)), len(v))


def vendi_score(features) -> float:
    """Vendi score of n items (Friedman & Dieng 2023, eq. 1): ``exp(-Σ λ log λ)``, λ the
    eigenvalues of K/n, K the cosine similarities of the rows of ``features`` [n, d].
    1 for identical items, n for mutually orthogonal ones."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise DiffattnError(f"vendi_score takes features [n, d] with n >= 1, got shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # rows to unit length
    lam = np.clip(np.linalg.eigvalsh(x @ x.T / len(x)), 0, None)  # [n], sums to 1
    lam = lam[lam > 1e-12]
    return float(np.exp(-(lam * np.log(lam)).sum()))


# ----------------------------------------------------------------------------- features

_SLOTS = [(c, s) for c in COLORS for s in (*SHAPES, "blob")]  # 16 object kinds
_GRID = (np.arange(4) + 0.5) * SIZE / 4  # 4 x 4 position centres, px
_POS_SIGMA = SIZE / 6  # px: objects a quarter-frame apart are still somewhat alike
_SIZE_CENTRES = np.array([6.0, 9.0, 12.0])  # circumradius, px
_SIZE_SIGMA = 2.0
STYLE_WEIGHT = 0.5  # same objects, other style: cosine 0.8; other objects, same style: 0.2


def oracle_features(parsed: oracle.Parsed) -> np.ndarray:
    """What an image shows, as a non-negative vector for the Vendi kernel.

    Objects: the sum over detected objects of one-hot(colour, shape) ⊗ a Gaussian encoding of
    the centre on a 4x4 grid ⊗ a Gaussian encoding of the size, normalised to unit length
    (an image with nothing detected gets its own "empty" direction). Styles: one-hot of
    (background light/dark/other, outline yes/no) with weight ``STYLE_WEIGHT``. Cosine
    similarity is then 1 for the same objects at the same places in the same style, and falls
    as objects move, change size, kind, number or style."""
    style = np.zeros((3, 2))  # [background light/dark/other, outline no/yes]
    style[("light", "dark", "other").index(parsed.background), int(parsed.outline)] = STYLE_WEIGHT
    return np.concatenate([_object_field(parsed.objects, _SLOTS, lambda o: (o.color, o.shape)), style.reshape(-1)])


def _object_field(objects, kinds: list, kind_of) -> np.ndarray:
    """Unit-length sum over ``objects`` of one-hot(kind) ⊗ Gaussian centre on a 4x4 grid ⊗
    Gaussian size, then one "empty" entry (1 when nothing was detected): ``[len(kinds)*48 + 1]``."""
    def rbf(centres, values, sigma):  # [m, len(centres)] Gaussian encodings of m values
        return np.exp(-((centres[None, :] - np.asarray(values, dtype=np.float64)[:, None]) ** 2) / (2 * sigma**2))

    gx = rbf(_GRID, [o.cx for o in objects], _POS_SIGMA)  # [m, 4]
    gy = rbf(_GRID, [o.cy for o in objects], _POS_SIGMA)  # [m, 4]
    gs = rbf(_SIZE_CENTRES, [o.size for o in objects], _SIZE_SIGMA)  # [m, 3]
    field_ = np.zeros((len(kinds), 4, 4, len(_SIZE_CENTRES)))  # [kinds, 4 rows, 4 cols, 3 sizes]
    for k, o in enumerate(objects):
        field_[kinds.index(kind_of(o))] += gy[k][:, None, None] * gx[k][None, :, None] * gs[k][None, None, :]
    field_ = field_.reshape(-1)  # [kinds * 4 * 4 * 3]
    norm = np.linalg.norm(field_)
    empty = np.array([0.0 if norm > 0 else 1.0])
    return np.concatenate([field_ / norm if norm > 0 else field_, empty])


def pixel_features(image) -> np.ndarray:
    """The image at 16x16 (4x4 block means), centred on mid-grey, flattened [768]."""
    arr = oracle.to_array(image) / 255.0  # [64, 64, 3]
    small = arr.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))  # [16, 16, 3]
    return (small - 0.5).reshape(-1)


# ----------------------------------------------------------------------------- report


@dataclass
class EvalReport:
    """Scores of every generated image, with the metrics computed from them."""

    scores: list[oracle.Score]
    seeds: list[int]
    features: list[np.ndarray]  # oracle_features per image
    pixel_features: list[np.ndarray] = field(default_factory=list)
    images: list = field(default_factory=list)  # PIL images, when return_images=True
    settings: dict = field(default_factory=dict)  # call kwargs and batch size, for the record

    def __len__(self) -> int:
        return len(self.scores)

    def _by_prompt(self, feats) -> dict[str, list[np.ndarray]]:
        groups: dict[str, list[np.ndarray]] = {}
        for s, f in zip(self.scores, feats):
            groups.setdefault(s.prompt, []).append(f)
        return groups

    def vendi_per_prompt(self, pixels: bool = False) -> dict[str, float]:
        """Vendi score of each prompt's images (prompts with at least 2 images)."""
        feats = self.pixel_features if pixels else self.features
        return {p: vendi_score(np.stack(fs)) for p, fs in self._by_prompt(feats).items() if len(fs) > 1}

    def metrics(self) -> dict[str, Metric]:
        """name -> Metric(value, low, high, n), 95% intervals (see the module docstring).

        object_accuracy, color_accuracy: per image, the fraction of requested objects found
        (colour and shape / colour). all_present: every object found. correct: everything
        right (objects, relation, styles, no extra object). relation_accuracy /
        relation_color_accuracy: over relation prompts, strict / on colour matches.
        style_accuracy: over prompts asking for a style, the fraction of asked styles shown;
        unrequested_style_rate: images that leave the plain default where the prompt asks
        nothing (a dark or coloured background, outlines nobody asked for). extra_object_rate:
        images with an object no requested object explains. vendi / vendi_pixels: diversity
        over seeds, per prompt, averaged."""
        sc = self.scores
        out = {
            "object_accuracy": rate_metric([s.object_accuracy for s in sc]),
            "all_present": rate_metric([s.all_present for s in sc]),
            "color_accuracy": rate_metric([s.color_accuracy for s in sc]),
        }
        rel = [s for s in sc if s.relation_ok is not None]
        if rel:
            out["relation_accuracy"] = rate_metric([s.relation_ok for s in rel])
            out["relation_color_accuracy"] = rate_metric([s.relation_color_ok for s in rel])
        styled = [s for s in sc if any(s.style_requested.values())]
        if styled:
            out["style_accuracy"] = rate_metric(
                [np.mean([s.style_ok[k] for k, asked in s.style_requested.items() if asked]) for s in styled]
            )
        out["unrequested_style_rate"] = rate_metric(
            [any(not s.style_ok[k] for k, asked in s.style_requested.items() if not asked) for s in sc]
        )
        out["extra_object_rate"] = rate_metric([s.extra_objects > 0 for s in sc])
        out["correct"] = rate_metric([s.correct for s in sc])
        for name, pixels in (("vendi", False), ("vendi_pixels", True)):
            v = list(self.vendi_per_prompt(pixels).values()) if (self.pixel_features or not pixels) else []
            if v:
                out[name] = Metric(*mean_interval(v), len(v))
        return out

    def as_dict(self, per_image: bool = True) -> dict:
        """JSON-ready: metrics, settings and (optionally) every image's score and detections."""
        d = {
            "n_images": len(self),
            "settings": self.settings,
            "metrics": {k: m._asdict() for k, m in self.metrics().items()},
        }
        if per_image:
            d["images"] = [dict(s.as_dict(), seed=seed) for s, seed in zip(self.scores, self.seeds)]
        return d

    def to_markdown(self, title: str = "") -> str:
        """A table row per metric: value, 95% interval, n."""
        head = f"metric ({title})" if title else "metric"
        rows = [f"| {head} | value | 95% CI | n |", "|---|---|---|---|"]
        for name, m in self.metrics().items():
            rows.append(f"| {name} | {m.value:.3f} | [{m.low:.3f}, {m.high:.3f}] | {m.n} |")
        return "\n".join(rows)

    def save_grid(self, path: str, ncols: int = 8, scale: int = 2, limit: int | None = None) -> None:
        """Save the kept images (``return_images=True``) as one grid PNG, in generation order."""
        from diffusers.utils import make_image_grid

        if not self.images:
            raise DiffattnError("this report kept no images; call evaluate(..., return_images=True) to save a grid")
        images = [oracle.to_pil(im) for im in self.images[:limit]]
        images = [im.resize((im.width * scale, im.height * scale), 0) for im in images]  # 0: nearest
        rows = math.ceil(len(images) / ncols)
        cols = min(ncols, len(images))
        blank = images[0].copy()
        blank.paste((255, 255, 255), (0, 0, *blank.size))
        images += [blank] * (rows * cols - len(images))
        make_image_grid(images, rows=rows, cols=cols).save(path)


# ----------------------------------------------------------------------------- harness


def evaluate(
    pipe,
    prompts=None,
    seeds=None,
    *,
    pairs=None,
    batch_size: int = 16,
    progress: bool = True,
    return_images: bool = False,
    **call_kwargs,
) -> EvalReport:
    """Generate one image per (prompt, seed) pair and grade it with the oracle.

    pipe: any callable ``pipe(prompt=[...], generator=[...], **call_kwargs)`` returning an
    object with ``.images`` (a diffusers pipeline, optionally with diffattn controls
    attached). prompts, seeds: image i is ``prompts[i % len(prompts)]`` with ``seeds[i]``;
    or pass ``pairs`` [(prompt, seed), ...]. Prompts must be of the world's grammar."""
    if pairs is None:
        if not prompts or seeds is None:
            raise DiffattnError("evaluate() needs prompts and seeds (image i: prompts[i % len(prompts)], seeds[i]) "
                                "or pairs=[(prompt, seed), ...]")
        prompts = list(prompts)
        pairs = [(prompts[i % len(prompts)], int(s)) for i, s in enumerate(seeds)]
    pairs = [(p, int(s)) for p, s in pairs]
    for p in dict.fromkeys(p for p, _ in pairs):
        try:
            parse_prompt(p)
        except ValueError as e:
            raise DiffattnError(f"evaluate(): {e}") from None
    if batch_size < 1:
        raise DiffattnError(f"batch_size must be >= 1, got {batch_size}")
    plain = (int, float, str, bool, type(None))
    settings = {"batch_size": batch_size, **{k: v if isinstance(v, plain) else repr(v) for k, v in call_kwargs.items()}}
    report = EvalReport(scores=[], seeds=[], features=[], settings=settings)
    for p, s, im in _generate(pipe, pairs, batch_size, progress, call_kwargs):
        parsed = oracle.parse(im)
        report.scores.append(oracle.score(im, p, parsed=parsed))
        report.seeds.append(s)
        report.features.append(oracle_features(parsed))
        report.pixel_features.append(pixel_features(im))
        if return_images:
            report.images.append(oracle.to_pil(im))
    return report


def _generate(pipe, pairs, batch_size: int, progress: bool, call_kwargs: dict):
    """Yield ``(prompt, seed, image)`` for every pair, generated ``batch_size`` at a time, each
    image from its own ``torch.Generator().manual_seed(seed)``."""
    bar = tqdm(total=len(pairs), desc="evaluate", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(s) for _, s in chunk]
        images = pipe(prompt=[p for p, _ in chunk], generator=generators, **call_kwargs).images
        if len(images) != len(chunk):
            raise DiffattnError(f"the pipeline returned {len(images)} images for {len(chunk)} prompts; "
                                "pass num_images_per_prompt=1")
        yield from ((p, s, im) for (p, s), im in zip(chunk, images))
        bar.update(len(chunk))
    bar.close()


def evaluate_suite(pipe, suite: str, n_seeds: int = 64, *, seed_offset: int = 0, **kwargs) -> EvalReport:
    """``evaluate`` on a suite's prompts with ``eval_seeds(n_seeds)``: n_seeds images, cycling
    through the prompts (use a multiple of the suite length for equal images per prompt)."""
    return evaluate(pipe, suite_prompts(suite), eval_seeds(n_seeds, seed_offset), **kwargs)


# ----------------------------------------------------------------------------- v2 harness
#
# World v2 prompts leave attributes open, so a v2 report grades what a caption names
# (``oracle.score_v2``) and records what the image chose where it names nothing: the modes
# of under-specified prompts (repulsion), the aesthetics shown uncaptioned (VMix), and each
# object's marking (IR-Diffusion's identities).

_KINDS_V2 = [(c, s, m) for c in COLORS for s in (*SHAPES, "blob") for m in (*_w.MARKINGS, oracle.UNREADABLE)]


def oracle_features_v2(parsed: oracle.ParsedV2) -> np.ndarray:
    """``oracle_features`` for world v2: object kinds are (colour, shape, marking), and the
    style part is the five v2 calls (dark, outline, shadow, light, centred; each shown / not /
    unreadable) with weight ``STYLE_WEIGHT`` spread over them, so two images that differ only
    in one attribute's call keep a cosine near 1 - STYLE_WEIGHT² / 5."""
    objects = _object_field(parsed.objects, _KINDS_V2, lambda o: (o.color, o.shape, getattr(o, "marking", oracle.UNREADABLE)))
    style = np.zeros((len(_w.STYLES_V2), 3))  # [attribute, shown / not shown / unreadable]
    for i, name in enumerate(_w.STYLES_V2):
        call = parsed.calls.get(name)
        style[i, 2 if call is None else 0 if call else 1] = STYLE_WEIGHT / np.sqrt(len(_w.STYLES_V2))
    return np.concatenate([objects, style.reshape(-1)])


def _matched_objects(score: oracle.ScoreV2) -> list:
    """Per requested object, the detected object matched to it (or None)."""
    return [score.parsed.objects[j] if j is not None else None for j in score.matched]


def marking_calls(score: oracle.ScoreV2) -> list[tuple[str, str] | None]:
    """Per requested object whose marking the caption names: (named, drawn) when an object of
    its shape and named colour was matched to it, else None (absent: not a marking error)."""
    spec = _w.parse_prompt_v2(score.prompt)
    out = []
    for want, obj in zip(spec.objects, _matched_objects(score)):
        if want.marking is None:
            continue
        present = obj is not None and obj.shape == want.shape and (want.color is None or obj.color == want.color)
        out.append((want.marking, obj.marking) if present else None)
    return out


def read_mode(score: oracle.ScoreV2, spec: _w.PromptSpecV2) -> tuple | None:
    """The mode an image chose for an under-specified prompt (``score.mode``: per object its
    open colour and marking), or None unless every open attribute was read (an object absent
    or a marking unreadable)."""
    for (color, marking), want in zip(score.mode, spec.objects):
        if (want.color is None and color is None) or (want.marking is None and marking in (None, oracle.UNREADABLE)):
            return None
    return score.mode


@dataclass
class EvalReportV2:
    """Scores of every generated image of a v2 evaluation, with the metrics computed from them.

    groups: per image, the key of its diversity group (default: its prompt)."""

    scores: list[oracle.ScoreV2]
    seeds: list[int]
    groups: list
    features: list[np.ndarray]  # oracle_features_v2 per image
    images: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def by_group(self) -> dict:
        """group key -> indices of its images, in generation order."""
        out: dict = {}
        for i, g in enumerate(self.groups):
            out.setdefault(g, []).append(i)
        return out

    def metrics(self) -> dict[str, Metric]:
        """name -> Metric(value, low, high, n), 95% intervals (as ``EvalReport.metrics``).

        object_accuracy / all_present: requested objects found with every named attribute.
        marking_accuracy: per image, the fraction of objects with a named marking that carry
        it, among those drawn with their shape and named colour (images drawing none of them
        are left out; their absence counts in object_accuracy). marking_unreadable: the
        fraction of those the oracle could not read. ``<style>_named`` / ``<style>_unnamed``:
        the rate at which the image shows a v2 style (dark, outline, shadow, light, centred)
        when the caption names it / does not (an unreadable call counts as not shown).
        vendi: diversity per group (oracle_features_v2), averaged over groups of ≥ 2 images;
        mode_coverage: per group of an under-specified prompt, distinct (colour, marking)
        modes fully read (``read_mode``) over ``min(images, modes)``, so an image whose open
        attributes cannot be read adds no mode."""
        sc = self.scores
        out = {
            "object_accuracy": rate_metric([np.mean(s.found) for s in sc]),
            "all_present": rate_metric([all(s.found) for s in sc]),
        }
        calls = [[c for c in marking_calls(s) if c is not None] for s in sc]
        calls = [c for c in calls if c]
        if calls:
            out["marking_accuracy"] = rate_metric([np.mean([a == b for a, b in c]) for c in calls])
            out["marking_unreadable"] = rate_metric([np.mean([b == oracle.UNREADABLE for _, b in c]) for c in calls])
        for name in _w.STYLES_V2:
            named = [s.parsed.calls.get(name) is True for s in sc if _w.parse_prompt_v2(s.prompt).styles.get(name)]
            unnamed = [s.parsed.calls.get(name) is True for s in sc if not _w.parse_prompt_v2(s.prompt).styles.get(name)]
            if named:
                out[f"{name}_named"] = rate_metric(named)
            if unnamed:
                out[f"{name}_unnamed"] = rate_metric(unnamed)
        groups = [ix for ix in self.by_group().values() if len(ix) > 1]
        if groups:
            out["vendi"] = Metric(*mean_interval([vendi_score(np.stack([self.features[i] for i in ix])) for ix in groups]),
                                  len(groups))
            cover = []
            for ix in groups:
                spec = _w.parse_prompt_v2(sc[ix[0]].prompt)
                n_modes = len(open_modes(spec))
                if n_modes > 1:
                    read = [m for m in (read_mode(sc[i], spec) for i in ix) if m is not None]
                    cover.append(len(set(read)) / min(len(ix), n_modes))
            if cover:
                out["mode_coverage"] = Metric(*mean_interval(cover), len(cover))
        return out

    to_markdown = EvalReport.to_markdown  # the same table, from this report's metrics
    save_grid = EvalReport.save_grid


def evaluate_v2(pipe, prompts=None, seeds=None, *, pairs=None, groups=None, batch_size: int = 16,
                progress: bool = True, return_images: bool = False, **call_kwargs) -> EvalReportV2:
    """``evaluate`` for world-v2 prompts (``world.parse_prompt_v2``), graded by
    ``oracle.score_v2``. ``groups``: per pair, the key of its diversity group (default: the
    prompt, so all seeds of a prompt are one group)."""
    if pairs is None:
        if not prompts or seeds is None:
            raise DiffattnError("evaluate_v2() needs prompts and seeds or pairs=[(prompt, seed), ...]")
        prompts = list(prompts)
        pairs = [(prompts[i % len(prompts)], int(s)) for i, s in enumerate(seeds)]
    pairs = [(p, int(s)) for p, s in pairs]
    for p in dict.fromkeys(p for p, _ in pairs):
        try:
            _w.parse_prompt_v2(p)
        except ValueError as e:
            raise DiffattnError(f"evaluate_v2(): {e}") from None
    if groups is not None and len(groups) != len(pairs):
        raise DiffattnError(f"evaluate_v2(): {len(groups)} group keys for {len(pairs)} (prompt, seed) pairs; give one per pair")
    if batch_size < 1:
        raise DiffattnError(f"batch_size must be >= 1, got {batch_size}")
    plain = (int, float, str, bool, type(None))
    settings = {"batch_size": batch_size, **{k: v if isinstance(v, plain) else repr(v) for k, v in call_kwargs.items()}}
    report = EvalReportV2(scores=[], seeds=[], groups=list(groups) if groups is not None else [p for p, _ in pairs],
                          features=[], settings=settings)
    for p, s, im in _generate(pipe, pairs, batch_size, progress, call_kwargs):
        parsed = oracle.parse_v2(im)
        report.scores.append(oracle.score_v2(im, p, parsed=parsed))
        report.seeds.append(s)
        report.features.append(oracle_features_v2(parsed))
        if return_images:
            report.images.append(oracle.to_pil(im))
    return report


def identity_match(reference: oracle.ParsedV2, scene: oracle.ParsedV2, want: _w.ObjectSpec) -> tuple[str, str] | None:
    """IR-Diffusion's identity question for one subject: the marking its reference image drew
    and the marking the scene drew on the object of the same colour and shape, or None when
    either image lacks it or its marking is unreadable (not an identity verdict)."""
    def find(parsed):
        hits = [o for o in parsed.objects if o.shape == want.shape and (want.color is None or o.color == want.color)]
        return hits[0].marking if len(hits) == 1 and hits[0].marking != oracle.UNREADABLE else None

    ref, got = find(reference), find(scene)
    return None if ref is None or got is None else (ref, got)


# ----------------------------------------------------------------------------- cost


def _status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: resident now; ``VmHWM``: its peak)."""
    import re

    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def peak_rss_rise_mib(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), MiB)``: how far the call raises this process's resident memory above
    what it was before the call, at its peak. The kernel's peak-RSS mark (``VmHWM``) is reset
    first (``/proc/self/clear_refs`` 5, Linux), so an earlier peak, e.g. of loading the model,
    does not hide the call (``ru_maxrss`` cannot be reset). Linux only (``/proc``); elsewhere
    ``OSError``."""
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn(*args, **kwargs)
    return out, (_status_kib("VmHWM") - before) / 1024
