"""Evaluation harness: many (prompt, seed) pairs -> oracle metrics with 95% intervals.

    report = evaluate(pipe, suite_prompts("two"), eval_seeds(64), num_inference_steps=20)
    print(report.to_markdown())

Image i pairs prompt ``prompts[i % len(prompts)]`` with seed ``seeds[i]``: n seeds give n
images, cycling through the prompts. Rates get Wilson score intervals; diversity is the
Vendi score (Friedman & Dieng 2023: exp of the entropy of the eigenvalues of K/n, K a
cosine-similarity kernel) over oracle feature vectors of the images of one prompt,
averaged over prompts, with a t interval over prompts.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import oracle
from .world import COLORS, RELATIONS, SHAPES, PromptSpec, caption

TRAIN_SEEDS = range(0, 100_000)  # for searches and tuning
EVAL_SEED_START = 1_000_000  # evaluation seeds: never used for training, searches or tuning

_OBJECTS = [(c, s) for c in COLORS for s in SHAPES]


def _spec_prompts(specs) -> list[str]:
    return [caption(s) for s in specs]


def _suite_specs(name: str) -> list[PromptSpec]:
    rng = np.random.default_rng(7)  # fixed: suites are part of the benchmark definition
    pairs = [(a, b) for a, b in itertools.permutations(_OBJECTS, 2) if a[1] != b[1] or a[0] != b[0]]
    if name == "single":
        return [PromptSpec(objects=(o,)) for o in _OBJECTS]
    if name == "two":
        idx = rng.choice(len(pairs), size=32, replace=False)
        return [PromptSpec(objects=pairs[i]) for i in idx]
    if name == "relation":
        idx = rng.choice(len(pairs), size=32, replace=False)
        return [PromptSpec(objects=pairs[i], relation=RELATIONS[k % 4]) for k, i in enumerate(idx)]
    if name == "three":
        triples = list(itertools.permutations(_OBJECTS, 3))
        idx = rng.choice(len(triples), size=32, replace=False)
        return [PromptSpec(objects=triples[i]) for i in idx]
    if name == "style":
        styles = [{"dark": True, "outline": False}, {"dark": False, "outline": True}, {"dark": True, "outline": True}]
        return [PromptSpec(objects=(o,), styles=styles[k % 3]) for k, o in enumerate(_OBJECTS)]
    raise ValueError(f"unknown suite {name!r}; choose one of {SUITES}")


SUITES = ("single", "two", "relation", "three", "style")


def suite_prompts(name: str) -> list[str]:
    """The fixed prompt list of a suite."""
    return _spec_prompts(_suite_specs(name))


def eval_seeds(n: int) -> list[int]:
    return list(range(EVAL_SEED_START, EVAL_SEED_START + n))


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values, z: float = 1.96) -> tuple[float, float, float]:
    """Mean and normal-approximation 95% interval of a sample."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (float("nan"),) * 3
    m = v.mean()
    half = z * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return (m, m - half, m + half)


def vendi_score(features: np.ndarray) -> float:
    """Vendi score of n items: exp(-Σ λ log λ), λ the eigenvalues of K/n, K the cosine
    similarities of the rows of ``features`` [n, d]. 1 for identical items, n for
    orthogonal ones."""
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = x @ x.T / len(x)
    lam = np.clip(np.linalg.eigvalsh(k), 0, None)
    lam = lam[lam > 1e-12]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def oracle_features(parsed: oracle.Parsed) -> np.ndarray:
    """What an image shows, as a vector: per colour×shape the (count, mean x, mean y, mean
    size) of its objects, plus the styles."""
    feats = []
    for c, s in _OBJECTS:
        objs = [o for o in parsed.objects if o.color == c and o.shape == s]
        if objs:
            feats += [len(objs), np.mean([o.cx for o in objs]) / 64, np.mean([o.cy for o in objs]) / 64, np.mean([o.size for o in objs]) / 16]
        else:
            feats += [0.0, 0.0, 0.0, 0.0]
    feats += [float(parsed.background == "dark"), float(parsed.outline)]
    return np.array(feats) + 1e-3  # keep an empty scene a valid direction


@dataclass
class EvalReport:
    scores: list[oracle.Score]
    seeds: list[int]
    features: list[np.ndarray]
    images: list = field(default_factory=list)

    def metrics(self) -> dict[str, tuple[float, float, float, int]]:
        """name -> (value, low, high, n) with 95% intervals."""
        out = {}
        n_obj = sum(s.requested for s in self.scores)
        found = sum(sum(s.found) for s in self.scores)
        out["object_accuracy"] = (found / n_obj, *wilson_interval(found, n_obj), n_obj)
        allp = sum(s.all_present for s in self.scores)
        out["all_present"] = (allp / len(self.scores), *wilson_interval(allp, len(self.scores)), len(self.scores))
        rel = [s.relation_ok for s in self.scores if s.relation_ok is not None]
        if rel:
            out["relation_accuracy"] = (sum(rel) / len(rel), *wilson_interval(sum(rel), len(rel)), len(rel))
        sty = [ok for s in self.scores for name, ok in s.style_ok.items() if _asked(s.prompt, name)]
        if sty:
            out["style_accuracy"] = (sum(sty) / len(sty), *wilson_interval(sum(sty), len(sty)), len(sty))
        extra = sum(s.extra_objects > 0 for s in self.scores)
        out["extra_object_rate"] = (extra / len(self.scores), *wilson_interval(extra, len(self.scores)), len(self.scores))
        by_prompt = {}
        for s, f in zip(self.scores, self.features):
            by_prompt.setdefault(s.prompt, []).append(f)
        vendi = [vendi_score(np.stack(fs)) for fs in by_prompt.values() if len(fs) > 1]
        if vendi:
            out["vendi"] = (*mean_interval(vendi), len(vendi))
        return out

    def as_dict(self) -> dict:
        return {
            "metrics": {k: dict(zip(("value", "low", "high", "n"), v)) for k, v in self.metrics().items()},
            "images": [dict(s.as_dict(), seed=seed) for s, seed in zip(self.scores, self.seeds)],
        }

    def to_markdown(self, title: str = "") -> str:
        rows = [f"| metric{(' (' + title + ')') if title else ''} | value | 95% CI | n |", "|---|---|---|---|"]
        for name, (v, lo, hi, n) in self.metrics().items():
            rows.append(f"| {name} | {v:.3f} | [{lo:.3f}, {hi:.3f}] | {n} |")
        return "\n".join(rows)

    def save_grid(self, path: str, ncols: int = 8, scale: int = 2):
        from diffusers.utils import make_image_grid

        images = [im.resize((im.width * scale, im.height * scale)) for im in self.images]
        rows = math.ceil(len(images) / ncols)
        images += [images[0].copy().point(lambda _: 255)] * (rows * ncols - len(images))
        make_image_grid(images, rows=rows, cols=ncols).save(path)


def _asked(prompt: str, style: str) -> bool:
    from .world import parse_prompt

    return parse_prompt(prompt).styles.get(style, False)


def evaluate(pipe, prompts, seeds, *, batch_size: int = 16, progress: bool = True, return_images: bool = False,
             pairs=None, **call_kwargs) -> EvalReport:
    """Generate one image per (prompt, seed) pair and grade it with the oracle."""
    if pairs is None:
        pairs = [(prompts[i % len(prompts)], s) for i, s in enumerate(seeds)]
    scores, used_seeds, feats, images = [], [], [], []
    bar = tqdm(total=len(pairs), desc="evaluate", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for _, s in chunk]
        out = pipe(prompt=[p for p, _ in chunk], generator=gens, **call_kwargs).images
        for (p, s), im in zip(chunk, out):
            parsed = oracle.parse(im)
            scores.append(oracle.score(im, p, parsed=parsed))
            feats.append(oracle_features(parsed))
            used_seeds.append(int(s))
            if return_images:
                images.append(im)
        bar.update(len(chunk))
    bar.close()
    return EvalReport(scores=scores, seeds=used_seeds, features=feats, images=images)


def evaluate_suite(pipe, suite: str, n_seeds: int = 64, **kw) -> EvalReport:
    return evaluate(pipe, suite_prompts(suite), eval_seeds(n_seeds), **kw)


def add_eval_arguments(p):
    p.add_argument("--suite", default="all", help="single, two, relation, three, style, or all")
    p.add_argument("--seeds", type=int, default=64, help="evaluation seeds (images) per suite")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the full report as JSON")
    p.add_argument("--grid", default=None, help="write a sample grid PNG per suite (suffixed by suite name)")


def run_eval_cli(args):
    from ..cli import load_model

    pipe = load_model(args.model, args.dtype, args.device)
    kw = {}
    if args.steps is not None:
        kw["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    suites = SUITES if args.suite == "all" else tuple(args.suite.split(","))
    full = {}
    for suite in suites:
        report = evaluate_suite(pipe, suite, args.seeds, batch_size=args.batch_size, return_images=bool(args.grid), **kw)
        print(report.to_markdown(suite))
        full[suite] = report.as_dict()
        if args.grid:
            stem, _, ext = args.grid.rpartition(".")
            report.images = report.images[:32]
            report.save_grid(f"{stem}-{suite}.{ext or 'png'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(full, f, indent=1)
