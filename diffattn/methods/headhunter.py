"""HeadHunter: greedy search for the attention heads whose perturbation best serves an objective.

Ahn et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (arXiv
2506.10978), Algorithm 1: in each of R rounds, every candidate head (l, h) is scored by the
mean objective over fixed prompt–seed pairs when guiding with the heads chosen so far plus
(l, h); the top k join the selection. The search runs PAG (u = 1) as the paper does; the
preset it writes can then be used at a lower u (SoftPAG).

    hunter = HeadHunter(pipe, make_objective("pickscore"), prompts, seeds, top_k=3, rounds=2, state_dir="hunt")
    result = hunter.run()
    result.save_preset("preset.json"); result.save_heatmap("heads.png")
    da.SoftPAG("preset.json", strength=0.5)

Objectives are ``(images, prompts) -> scores`` callables: CLIP-based scorers for real models
(:func:`clip_score`, :func:`pick_score`; PickScore is the paper's objective), the testbed
oracles (:mod:`diffattn.testbed.objectives`), or any function; :func:`make_objective` builds
one by name (:mod:`diffattn.methods.objectives` holds the registry).

Scores per image are cached by (head set, prompt, seed) in ``state_dir`` (JSON), and the
selection after each round is saved there too, so an interrupted search resumes. The
settings that change the images or their scores (model, objective name, scale, strength,
semantics and the pipeline's call arguments) are written to ``settings.json`` beside them; a
search whose settings differ refuses the folder rather than reuse scores of another setup,
and a search over other pairs, candidates or top k starts its rounds over (reusing every
cached score that applies) instead of resuming a selection made for another search.

**Distributed search.** Launched as several processes (``accelerate launch`` or
``torchrun``), the candidates of each round are split across the processes (rank-strided),
each process scores its share, and the per-image scores are gathered to every process
(``accelerate.utils.gather_object``), so every process takes the same greedy decision and the
result equals a one-process run exactly. Put each process's pipeline on its own device
(``PartialState().device``; :func:`distributed_state` builds the state, using gloo on CPUs);
``state_dir`` must be on a filesystem all processes share. Only the main process writes the
cache, the state, presets and heat maps; the others write their share of the running round
to ``cache.rank<N>.json`` (so an interrupted round resumes), merged by the main process at the
end of the round. ::

    accelerate launch --num_processes 8 -m diffattn.cli headhunt --model M --objective pickscore ...
    torchrun --nproc_per_node 2 -m diffattn.cli headhunt ...      # CPUs too (gloo)

On CPUs launch with ``torchrun`` (or ``accelerate launch --multi_gpu --num_processes N``, which
runs torchrun): ``accelerate launch --cpu`` starts a single process unless MPI is configured.
Scores are bit-identical to a one-process run when every process computes as that run does:
same device type and the same number of intra-op threads (torchrun sets ``OMP_NUM_THREADS=1``
per process; set it for the one-process run too, or fewer threads change the last float bits).
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..distributed import distributed_state, is_main_process, launched_processes
from ..engine import attach
from ..errors import ControlError, ObjectiveError  # noqa: F401  (ObjectiveError: re-exported here)
from ..sites import sites
from .objectives import make_objective, objective_names, register_objective  # noqa: F401  (re-exported)
from .softpag import PERTURBABLE_KINDS, SoftPAG, model_id

Head = tuple[str, int]


# ---------------------------------------------------------------------------- objectives
# Named objectives (make_objective, register_objective) live in .objectives (torch-free, so
# frontends can list them); the testbed's oracle objectives in diffattn.testbed.objectives.


DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"


def _has_safetensors(folder: str) -> bool:
    return any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in os.listdir(folder))


def _pooled(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose pooler_output
    holds the projected features (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _as_pil(images) -> list:
    """Pipeline outputs as PIL images: PIL lists pass through; ``output_type="pt"`` tensors
    ``[B,3,H,W]`` and ``"np"`` arrays ``[B,H,W,3]`` in [0, 1] are quantised to 8 bits."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.dtype != np.uint8:
            images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in images]
    return [im if isinstance(im, Image.Image) else _as_pil(np.asarray(im))[0] for im in images]


class ImageTextObjective:
    """``(images, prompts) -> scores`` from a CLIP-style model of ``transformers`` (a hub id or a
    local folder; weights from safetensors only, loaded lazily at the first call, batched, under
    ``no_grad``). HeadHunter moves it to its pipeline's device; ``device=`` fixes one.

    ``kind="clip"``: CLIPScore (Hessel et al. 2021), ``max(weight · cos(image, text), 0)`` with
    ``weight`` 100 as torchmetrics reports it (the paper's CLIP-S uses 2.5).
    ``kind="pickscore"``: PickScore (Kirstain et al. 2023), ``logit_scale.exp() · cos`` of the
    projected embeddings; for one image per prompt that scaled similarity is the score (the
    paper's softmax over several images of one prompt only turns it into preferences).
    ``template`` formats the text (``"A photo depicts {prompt}"``); ``processor`` names the
    tokenizer/image-processor source when the model folder has none (PickScore_v1 ships its
    own, the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
    """

    def __init__(self, model: str, *, kind: str = "clip", processor: str | None = None, template: str | None = None,
                 weight: float = 100.0, batch_size: int = 32, device=None, dtype: torch.dtype | None = None):
        if kind not in ("clip", "pickscore"):
            raise ObjectiveError(f"unknown image-text objective kind {kind!r}; choose 'clip' or 'pickscore'")
        if not isinstance(model, str) or not model:
            raise ObjectiveError(f"the {kind} objective needs a model: a hub id or a local folder, got {model!r}")
        if os.path.isdir(model) and not _has_safetensors(model):
            found = sorted(f for f in os.listdir(model) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
            raise ObjectiveError(
                f"{model!r} has no safetensors weights (found {found or 'no weights'}); diffattn loads scorer "
                f"models from safetensors only. Convert once with "
                f"`CLIPModel.from_pretrained(path).save_pretrained(path)` (transformers writes safetensors)")
        if template is not None and "{prompt}" not in template:
            raise ObjectiveError(f"template {template!r} must contain '{{prompt}}'")
        self.model_name, self.kind, self.processor_name = model, kind, processor or model
        self.template, self.weight, self.batch_size = template, float(weight), int(batch_size)
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self._model = self._tokenizer = self._image_processor = None
        self.__name__ = f"{kind}_score"
        self.name = f"{kind}_score({model})"  # the search settings tell scorers apart by model

    def to(self, device):
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    def load(self):
        """Load the model, tokenizer and image processor (done by the first call)."""
        if self._model is not None:
            return self
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        try:
            model = AutoModel.from_pretrained(self.model_name, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ObjectiveError(
                f"cannot load the {self.kind} model {self.model_name!r} with safetensors weights: {e}. Give a local "
                f"folder holding config.json and model.safetensors, or a hub id (reachable or in the local cache)") from e
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ObjectiveError(f"{self.model_name!r} is a {type(model).__name__}, not a CLIP-style image-text model")
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.processor_name)
            self._image_processor = AutoImageProcessor.from_pretrained(self.processor_name)
        except (OSError, ValueError) as e:
            raise ObjectiveError(f"cannot load the tokenizer and image processor of {self.processor_name!r}: {e}. "
                                 f"Pass processor= (the CLIP processor the model was trained with)") from e
        model.eval().requires_grad_(False)
        if self.dtype is not None:
            model.to(self.dtype)
        self._model = model.to(self.device or "cpu")
        return self

    def _max_length(self) -> int:
        limits = [getattr(self._tokenizer, "model_max_length", 77)]
        text_config = getattr(self._model.config, "text_config", None)
        limits.append(getattr(text_config, "max_position_embeddings", 77))
        return int(min(m for m in limits if m and m < 1_000_000))

    @torch.no_grad()
    def similarity(self, images, prompts) -> torch.Tensor:
        """Cosine similarity of each image with its prompt (float32, on the CPU)."""
        self.load()
        images = _as_pil(images)
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ObjectiveError(f"{len(images)} images for {len(prompts)} prompts")
        texts = [p if self.template is None else self.template.format(prompt=p) for p in prompts]
        model, device = self._model, next(self._model.parameters()).device
        dtype = next(self._model.parameters()).dtype
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self._image_processor(images=images[start : start + self.batch_size], return_tensors="pt")["pixel_values"]
            tokens = self._tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                     max_length=self._max_length(), return_tensors="pt")
            img = _pooled(model.get_image_features(pixel_values=pixels.to(device, dtype))).float()
            txt = _pooled(model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                  attention_mask=tokens["attention_mask"].to(device))).float()
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append((img * txt).sum(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, images, prompts) -> list[float]:
        cos = self.similarity(images, prompts)
        if self.kind == "clip":
            scores = (self.weight * cos).clamp(min=0)
        else:
            scores = self._model.logit_scale.detach().float().exp().cpu() * cos
        return [float(s) for s in scores]

    def __repr__(self):
        return f"{type(self).__name__}({self.model_name!r}, kind={self.kind!r})"


def clip_score(model: str = DEFAULT_CLIP_MODEL, *, processor: str | None = None, template: str | None = None,
               weight: float = 100.0, batch_size: int = 32, device=None, dtype=None) -> ImageTextObjective:
    """CLIPScore objective (Hessel et al. 2021): ``max(weight · cos(E_img, E_text), 0)`` with a
    CLIP model of ``transformers`` (hub id or local folder, safetensors only).
    ``weight=100`` is the torchmetrics scale; 2.5 is the paper's CLIP-S."""
    return ImageTextObjective(model, kind="clip", processor=processor, template=template, weight=weight,
                              batch_size=batch_size, device=device, dtype=dtype)


def pick_score(model: str = DEFAULT_PICKSCORE_MODEL, *, processor: str | None = None, template: str | None = None,
               batch_size: int = 32, device=None, dtype=None) -> ImageTextObjective:
    """PickScore objective (Kirstain et al. 2023; the HeadHunter paper's objective):
    ``logit_scale.exp() · cos`` of the projected image and text embeddings of a CLIP-H model.
    ``processor`` defaults to the model's own folder (PickScore_v1 ships model.safetensors and
    its CLIP-H processor)."""
    return ImageTextObjective(model, kind="pickscore", processor=processor, template=template,
                              batch_size=batch_size, device=device, dtype=dtype)


# ---------------------------------------------------------------------------- distribution


def objective_name(objective) -> str:
    """A stable name of an objective for the search settings: its ``name`` attribute, its
    ``__name__``, or its class name."""
    return str(getattr(objective, "name", None) or getattr(objective, "__name__", None) or type(objective).__qualname__)


def _as_setting(value):
    """A pipeline call argument as JSON (numbers, strings, lists as themselves; others by repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_as_setting(v) for v in value]
    return repr(value)


def _write_json(path: str, obj, indent=None) -> None:
    """Write atomically (a reader or an interruption never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


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
        """Write the preset JSON (in a distributed launch, on the main process only)."""
        if is_main_process():
            _write_json(path, self.preset(strength), indent=1)

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
        """Write the heat map PNG (in a distributed launch, on the main process only)."""
        if is_main_process():
            self.heatmap(round_index).save(path)


# ---------------------------------------------------------------------------- search


def _key(heads: Sequence[Head]) -> str:
    return "|".join(f"{s}:{h}" for s, h in sorted(heads)) or "none"


def _check_count(name: str, value, what: str) -> None:
    """``value`` is an integer >= 1 (``what`` says what it counts), else a ControlError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ControlError(f"{name}={value!r}: the number of {what}, an integer >= 1")


class HeadHunter:
    """Greedy head search (see the module docstring).

    pipe:       a diffusers pipeline; objective: ``(images, prompts) -> scores``.
    prompts, seeds: the fixed pairs (zipped; cycle the prompts for more seeds than prompts).
    candidates: "all" (every head of every self/joint/single site) or (site, head) pairs.
    stop_without_gain: end the search early at the first round whose best candidate does not
        score above the current selection (the baseline before round 1); off by default, as
        the paper's Algorithm 1 always adds the top k.
    distributed: under a multi-process launch (``accelerate launch``/``torchrun``), split each
        round's candidates across the processes; ignored in a single process.
    batch_size: images per denoiser batch. A batch holds the prompt-seed pairs of *one*
        candidate, never rows of two candidates: a score then does not depend on which other
        candidates shared its batch (batch composition changes the last bits of a forward),
        so the cache is reusable across searches and an N-process run equals a 1-process run
        bit for bit. Give at least as many pairs as ``batch_size`` to fill the batches.
    """

    def __init__(self, pipe, objective: Callable, prompts: Sequence[str], seeds: Sequence[int], *,
                 candidates="all", top_k: int = 3, rounds: int = 1, scale: float = 3.0, strength: float = 1.0,
                 semantics: str = "joint", batch_size: int = 16, state_dir: str | None = None,
                 progress: bool = True, distributed: bool = True, stop_without_gain: bool = False, **call_kwargs):
        if len(prompts) == 0 or len(seeds) == 0:
            raise ControlError("HeadHunter needs at least one prompt and one seed")
        if not callable(objective):
            raise ObjectiveError(f"the objective must be a callable (images, prompts) -> scores, got {objective!r}")
        _check_count("top_k", top_k, "heads to select per round")
        _check_count("rounds", rounds, "search rounds")
        _check_count("batch_size", batch_size, "images per denoiser batch")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
            raise ControlError(f"scale={scale!r}: the guidance scale s of the search is a finite number >= 0")
        if not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
            raise ControlError(f"strength={strength!r}: u lies in [0, 1] (1 = PAG)")
        self.pipe, self.objective = pipe, objective
        self.model = model_id(getattr(pipe, "transformer", None) or pipe.unet)  # what presets and settings record
        if isinstance(objective, ImageTextObjective) and objective.device is None and hasattr(pipe, "device"):
            objective.to(pipe.device)  # score where the pipeline runs
        self.pairs = [(prompts[i % len(prompts)], int(s)) for i, s in enumerate(seeds)]
        all_sites = [s for s in sites(pipe) if s.kind in PERTURBABLE_KINDS]
        self.layout = {s.name: s.heads for s in all_sites}
        if candidates == "all":
            candidates = [(s.name, h) for s in all_sites for h in range(s.heads)]
        for site, head in candidates:
            if site not in self.layout or not 0 <= head < self.layout[site]:
                raise ControlError(f"candidate head ({site!r}, {head}) does not exist; sites: {list(self.layout)[:8]} ...")
        self.candidates = [tuple(c) for c in candidates]
        if not self.candidates:
            raise ControlError("no candidate heads: give candidates='all' or a non-empty list of (site, head)")
        self.top_k, self.rounds, self.stop_without_gain = top_k, rounds, stop_without_gain
        self.scale, self.strength, self.semantics = scale, strength, semantics
        self.batch_size, self.progress, self.call_kwargs = batch_size, progress, call_kwargs
        self.dist = distributed_state() if distributed and launched_processes() > 1 else None
        self.rank = self.dist.process_index if self.dist else 0
        self.world = self.dist.num_processes if self.dist else 1
        self.state_dir = state_dir
        self.cache: dict[str, float] = {}
        if state_dir:
            os.makedirs(state_dir, exist_ok=True)
            self._check_settings()
            # the main cache plus the shares other processes saved during an interrupted round
            for path in [self._path("cache.json")] + sorted(glob.glob(self._path("cache.rank*.json"))):
                if os.path.exists(path):
                    with open(path) as f:
                        self.cache.update(json.load(f))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def settings(self) -> dict:
        """What the cached scores depend on, beyond the (head set, prompt, seed) of their key."""
        return {"model": self.model, "objective": objective_name(self.objective), "scale": float(self.scale),
                "strength": float(self.strength), "semantics": self.semantics,
                "call_kwargs": {k: _as_setting(v) for k, v in sorted(self.call_kwargs.items())}}

    def _search_key(self) -> str:
        """Fingerprint of what the greedy rounds depend on beyond the cached scores."""
        what = json.dumps([self.pairs, self.candidates, self.top_k, self.stop_without_gain])
        return hashlib.sha256(what.encode()).hexdigest()[:16]

    def _check_settings(self) -> None:
        """Refuse a state folder whose cached scores were made under other settings; else record ours."""
        path, mine = self._path("settings.json"), self.settings()
        if os.path.exists(path):
            with open(path) as f:
                theirs = json.load(f)
            changed = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            if changed:
                what = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
                raise ControlError(
                    f"state_dir {self.state_dir!r} holds scores of a search with other settings ({what}); "
                    f"reusing them would mix setups. Use a new state_dir, or run with the saved settings")
        elif self.is_main:
            _write_json(path, mine, indent=1)

    def _path(self, name):
        return os.path.join(self.state_dir, name)

    def _barrier(self):
        if self.dist is not None and self.world > 1:
            self.dist.wait_for_everyone()

    def _save_share(self, new: dict[str, float]) -> None:
        """During a round: the main process saves the whole cache, the others their share."""
        if not self.state_dir:
            return
        if self.is_main:
            _write_json(self._path("cache.json"), self.cache)
        else:
            _write_json(self._path(f"cache.rank{self.rank}.json"), new)

    def _save(self, state=None):
        """End of a round: the main process saves the merged cache (and the state) and drops the
        shares; every process waits until it has."""
        if self.state_dir and self.is_main:
            _write_json(self._path("cache.json"), self.cache)
            if state is not None:
                _write_json(self._path("state.json"), state, indent=1)
            for share in glob.glob(self._path("cache.rank*.json")):
                os.remove(share)
        self._barrier()

    def _compute(self, heads: Sequence[Head]) -> dict[str, float]:
        """Score the pairs of ``heads`` that are not cached; returns the new cache entries."""
        key = _key(heads)
        todo = [(p, s) for p, s in self.pairs if f"{key}#{p}#{s}" not in self.cache]
        new: dict[str, float] = {}
        control = None
        if heads and todo:
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
            values = list(self.objective(images, prompts))
            if len(values) != len(chunk):
                raise ObjectiveError(f"the objective returned {len(values)} scores for {len(chunk)} images")
            for (p, s), value in zip(chunk, values):
                new[f"{key}#{p}#{s}"] = float(value)
        self.cache.update(new)
        return new

    def _mean(self, heads: Sequence[Head]) -> float:
        key = _key(heads)
        return float(np.mean([self.cache[f"{key}#{p}#{s}"] for p, s in self.pairs]))

    def score(self, heads: Sequence[Head]) -> float:
        """Mean objective over the pairs when guiding with ``heads`` (PAG at u = strength),
        computed in this process."""
        self._compute(heads)
        return self._mean(heads)

    def score_many(self, head_sets: Sequence[Sequence[Head]], desc: str | None = None) -> list[float]:
        """Mean objective of each head set. Under a multi-process launch each process scores
        every ``world``-th set (rank-strided) and the per-image scores are gathered, so every
        process returns the same list."""
        mine = list(head_sets)[self.rank :: self.world]
        new: dict[str, float] = {}
        if self.world > 1 and desc:
            desc = f"{desc} [process {self.rank + 1}/{self.world}]"
        for heads in tqdm(mine, desc=desc, disable=not (self.progress and self.is_main and desc), dynamic_ncols=True):
            new.update(self._compute(heads))
            self._save_share(new)
        if self.world > 1:
            from accelerate.utils import gather_object

            for share in gather_object([new]):
                self.cache.update(share)
        return [self._mean(h) for h in head_sets]

    def run(self) -> HeadHuntResult:
        search = self._search_key()
        state = {"selected": [], "rounds": [], "search": search}
        if self.state_dir and os.path.exists(self._path("state.json")):
            with open(self._path("state.json")) as f:
                saved = json.load(f)
            # the saved rounds resume only the same search (pairs, candidates, top k, stop rule);
            # another one starts over, still reusing every cached score that applies
            if saved.get("search", search) == search:
                state = saved
        self._barrier()  # every process has read the saved state before the main process writes
        selected = [tuple(h) for h in state["selected"]]
        rounds = state["rounds"]
        baseline = self.score_many([[]])[0]
        self._save()
        stopped = state.get("stopped", False)
        for r in range(len(rounds), self.rounds):
            if stopped:
                break
            pool = [c for c in self.candidates if c not in selected]
            values = self.score_many([selected + [c] for c in pool], desc=f"headhunt round {r + 1}/{self.rounds}")
            scores = {f"{c[0]}:{c[1]}": v for c, v in zip(pool, values)}
            best = sorted(pool, key=lambda c: -scores[f"{c[0]}:{c[1]}"])[: self.top_k]
            rounds.append(scores)
            if self.stop_without_gain:
                # the selection's own score is cached (the previous round scored it) when top_k = 1
                current = self.score_many([selected])[0] if selected else baseline
                stopped = max(values) <= current  # no candidate improves the objective
            if not stopped:
                selected += best
            self._save({"selected": selected, "rounds": rounds, "stopped": stopped, "search": search})
        return HeadHuntResult(model=self.model, selected=selected, rounds=rounds, baseline=baseline,
                              scale=self.scale, strength=self.strength, layout=self.layout)
