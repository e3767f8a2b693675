"""HeadHunter: greedy search for the attention heads whose perturbation best serves an objective.

Ahn et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (arXiv
2506.10978), Algorithm 1: in each of R rounds, every candidate head (l, h) is scored by the
mean objective over fixed prompt–seed pairs when guiding with the heads chosen so far plus
(l, h); the top k join the selection. The search runs PAG (u = 1) as the paper does; the
preset it writes can then be used at a lower u (SoftPAG).

    hunter = HeadHunter(pipe, oracle_fidelity, prompts, seeds, top_k=3, rounds=2, state_dir="hunt")
    result = hunter.run()
    result.save_preset("preset.json"); result.save_heatmap("heads.png")
    da.SoftPAG("preset.json", strength=0.5)

Scores per image are cached by (head set, prompt, seed) in ``state_dir`` (JSON), and the
selection after each round is saved there too, so an interrupted search resumes.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..engine import attach
from ..errors import ControlError
from ..sites import sites
from .softpag import PERTURBABLE_KINDS, SoftPAG, model_id

Head = tuple[str, int]


# ---------------------------------------------------------------------------- objectives


def oracle_fidelity(images, prompts) -> list[float]:
    """Testbed objective: fraction of the prompt's objects present with the right colour and
    shape, minus a quarter per extra object (so noise blobs do not pay)."""
    from ..testbed import oracle

    out = []
    for im, p in zip(images, prompts):
        s = oracle.score(im, p)
        out.append(s.object_accuracy - 0.25 * min(s.extra_objects, 2))
    return out


def oracle_style(style: str, wanted: bool = True) -> Callable:
    """Testbed objective: 1 when the image shows ``style`` ("dark" or "outline") as wanted."""
    from ..testbed import oracle

    def objective(images, prompts):
        return [float(oracle.parse(im).styles[style] == wanted) for im in images]

    objective.__name__ = f"oracle_style_{style}"
    return objective


# ---------------------------------------------------------------------------- result


@dataclass
class HeadHuntResult:
    model: str
    selected: list[Head]
    rounds: list[dict[str, float]]  # per round: "site:head" -> mean objective
    baseline: float
    scale: float
    strength: float = 1.0
    layout: dict[str, int] = field(default_factory=dict)  # site -> heads, for the heat map

    def preset(self, strength: float | None = None) -> dict:
        u = self.strength if strength is None else strength
        return {"model": self.model, "heads": [[s, h, u] for s, h in self.selected], "scale": self.scale,
                "baseline": self.baseline, "rounds": self.rounds}

    def save_preset(self, path: str, strength: float | None = None) -> None:
        with open(path, "w") as f:
            json.dump(self.preset(strength), f, indent=1)

    def heatmap(self, round_index: int = 0, cell: int = 24) -> Image.Image:
        """Per-head scores of one round as a layers × heads image (blue low, red high;
        selected heads framed in black)."""
        scores = self.rounds[round_index]
        names = list(self.layout)
        width = max(self.layout.values())
        grid = np.full((len(names), width), np.nan)
        for key, value in scores.items():
            site, head = key.rsplit(":", 1)
            grid[names.index(site), int(head)] = value
        lo, hi = np.nanmin(grid), np.nanmax(grid)
        t = (grid - lo) / (hi - lo + 1e-12)
        rgb = np.stack([255 * t, 60 + 0 * t, 255 * (1 - t)], -1)
        rgb[np.isnan(grid)] = 255
        img = np.kron(rgb, np.ones((cell, cell, 1))).astype(np.uint8)
        for site, head in self.selected:
            if site in names:
                y, x = names.index(site) * cell, head * cell
                img[y : y + cell, x : x + 2] = img[y : y + cell, x + cell - 2 : x + cell] = 0
                img[y : y + 2, x : x + cell] = img[y + cell - 2 : y + cell, x : x + cell] = 0
        return Image.fromarray(img)

    def save_heatmap(self, path: str, round_index: int = 0) -> None:
        self.heatmap(round_index).save(path)


# ---------------------------------------------------------------------------- search


def _key(heads: Sequence[Head]) -> str:
    return "|".join(f"{s}:{h}" for s, h in sorted(heads)) or "none"


class HeadHunter:
    """Greedy head search (see the module docstring).

    pipe:       a diffusers pipeline; objective: ``(images, prompts) -> scores``.
    prompts, seeds: the fixed pairs (zipped; cycle the prompts for more seeds than prompts).
    candidates: "all" (every head of every self/joint/single site) or (site, head) pairs.
    """

    def __init__(self, pipe, objective: Callable, prompts: Sequence[str], seeds: Sequence[int], *,
                 candidates="all", top_k: int = 3, rounds: int = 1, scale: float = 3.0, strength: float = 1.0,
                 semantics: str = "joint", batch_size: int = 16, state_dir: str | None = None,
                 progress: bool = True, **call_kwargs):
        if len(prompts) == 0 or len(seeds) == 0:
            raise ControlError("HeadHunter needs at least one prompt and one seed")
        self.pipe, self.objective = pipe, objective
        self.pairs = [(prompts[i % len(prompts)], int(s)) for i, s in enumerate(seeds)]
        all_sites = [s for s in sites(pipe) if s.kind in PERTURBABLE_KINDS]
        self.layout = {s.name: s.heads for s in all_sites}
        if candidates == "all":
            candidates = [(s.name, h) for s in all_sites for h in range(s.heads)]
        for site, head in candidates:
            if site not in self.layout or not 0 <= head < self.layout[site]:
                raise ControlError(f"candidate head ({site!r}, {head}) does not exist; sites: {list(self.layout)[:8]} ...")
        self.candidates = [tuple(c) for c in candidates]
        self.top_k, self.rounds = top_k, rounds
        self.scale, self.strength, self.semantics = scale, strength, semantics
        self.batch_size, self.progress, self.call_kwargs = batch_size, progress, call_kwargs
        self.state_dir = state_dir
        self.cache: dict[str, float] = {}
        if state_dir:
            os.makedirs(state_dir, exist_ok=True)
            if os.path.exists(self._path("cache.json")):
                with open(self._path("cache.json")) as f:
                    self.cache = json.load(f)

    def _path(self, name):
        return os.path.join(self.state_dir, name)

    def _save(self, state=None):
        if not self.state_dir:
            return
        with open(self._path("cache.json"), "w") as f:
            json.dump(self.cache, f)
        if state is not None:
            with open(self._path("state.json"), "w") as f:
                json.dump(state, f, indent=1)

    def score(self, heads: Sequence[Head]) -> float:
        """Mean objective over the pairs when guiding with ``heads`` (PAG at u = strength)."""
        key = _key(heads)
        todo = [(p, s) for p, s in self.pairs if f"{key}#{p}#{s}" not in self.cache]
        control = None
        if heads:
            control = SoftPAG([(s, h) for s, h in heads], strength=self.strength, scale=self.scale, semantics=self.semantics)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            gens = [torch.Generator().manual_seed(s) for _, s in chunk]
            prompts = [p for p, _ in chunk]
            if control is None:
                images = self.pipe(prompt=prompts, generator=gens, **self.call_kwargs).images
            else:
                with attach(self.pipe, control):
                    images = self.pipe(prompt=prompts, generator=gens, **self.call_kwargs).images
            for (p, s), value in zip(chunk, self.objective(images, prompts)):
                self.cache[f"{key}#{p}#{s}"] = float(value)
        return float(np.mean([self.cache[f"{key}#{p}#{s}"] for p, s in self.pairs]))

    def run(self) -> HeadHuntResult:
        state = {"selected": [], "rounds": []}
        if self.state_dir and os.path.exists(self._path("state.json")):
            with open(self._path("state.json")) as f:
                state = json.load(f)
        selected = [tuple(h) for h in state["selected"]]
        rounds = state["rounds"]
        baseline = self.score([])
        for r in range(len(rounds), self.rounds):
            pool = [c for c in self.candidates if c not in selected]
            scores = {}
            for cand in tqdm(pool, desc=f"headhunt round {r + 1}/{self.rounds}", disable=not self.progress, dynamic_ncols=True):
                scores[f"{cand[0]}:{cand[1]}"] = self.score(selected + [cand])
                self._save()
            best = sorted(pool, key=lambda c: -scores[f"{c[0]}:{c[1]}"])[: self.top_k]
            selected += best
            rounds.append(scores)
            self._save({"selected": selected, "rounds": rounds})
        model = model_id(getattr(self.pipe, "transformer", None) or self.pipe.unet)
        return HeadHuntResult(model=model, selected=selected, rounds=rounds, baseline=baseline,
                              scale=self.scale, strength=self.strength, layout=self.layout)
