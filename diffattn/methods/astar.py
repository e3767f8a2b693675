"""A-STAR and Attend-and-Excite: concept maps and their losses, as pure functions.

A-STAR (Agarwal et al., "A-STAR: Test-time Attention Segregation and Retention for
Text-to-image Synthesis", ICCV 2023, arXiv 2306.14544) and Attend-and-Excite (Chefer et al.,
SIGGRAPH 2023) steer the latent of a diffusion model with the gradient of a loss on the
cross-attention maps of the prompt's concept tokens. This module holds the parts that do not
depend on a pipeline:

- **concept tokens**: words (or token positions) -> token positions of the prompt
  (:func:`concept_token_indices`); multi-token words and repeated words are handled;
- **concept maps** (A&E ``_compute_max_attention_per_index``): attention of image queries to
  text keys, averaged over sites and heads at one resolution (:func:`aggregate_attention`),
  re-normalised over the text tokens with ``softmax(100·A)`` (:func:`renormalize_text`),
  Gaussian-smoothed (3×3, σ = 0.5, reflect padding, A&E's kernel; :func:`smooth_maps`), in fp32;
- **losses** on maps ``[C, h, w]``: segregation (A-STAR Eq. 2, :func:`segregation_loss`),
  retention (A-STAR Eq. 3, :func:`retention_loss`) with its binarised target
  (:func:`binarize`), and A&E's max-activation loss (:func:`attend_excite_loss`), combined with
  weights by :func:`combined_loss`;
- :class:`ConceptRecorder`, the engine control that collects the maps through exact taps
  (``p = exp(s - lse)`` from the row log-sum-exp; the L×L matrix is never built), with
  gradients to the latents during A-STAR's gradient pass.

The sampling loop lives in ``diffattn.pipelines.AStarPipeline``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..controls import AttentionCall, Control
from ..errors import ConceptError, LayoutError  # noqa: F401  (ConceptError: re-exported here)

LOSSES = ("segregation", "retention", "attend_excite")


# ----------------------------------------------------------------------------- concept tokens


def prompt_ids(tokenizer, prompt: str, max_length: int | None = None) -> list[int]:
    """The prompt's token ids as the text encoder sees them, start/end tokens included, no
    padding, cut at ``max_length`` (the pipeline's ``max_sequence_length``; ``None``: the
    tokenizer's own limit)."""
    kw = {} if max_length is None else {"max_length": int(max_length)}
    return tokenizer(prompt, truncation=True, **kw).input_ids


def prompt_tokens(tokenizer, prompt: str, max_length: int | None = None) -> list[str]:
    """The prompt's tokens as the text encoder sees them, SOT and EOT included (no padding)."""
    return tokenizer.convert_ids_to_tokens(prompt_ids(tokenizer, prompt, max_length))


def _describe_tokens(tokenizer, prompt: str, max_length: int | None = None) -> str:
    return ", ".join(f"{i}: {tok!r}" for i, tok in enumerate(prompt_tokens(tokenizer, prompt, max_length)))


def _continues_word(tokenizer, token_id: int) -> bool:
    """Whether a SentencePiece token (T5) continues the word before it: it lacks the word-start
    mark "▁" and begins with a letter or digit (punctuation such as "," or "." ends the word;
    special tokens do too). (CLIP's BPE marks word *ends* inside the concept's own tokens, so
    its matches end at word ends already.)"""
    if token_id in set(tokenizer.all_special_ids):
        return False
    token = tokenizer.convert_ids_to_tokens(int(token_id))
    return not token.startswith("\u2581") and token[:1].isalnum()


def concept_token_indices(tokenizer, prompt: str, concepts: Sequence, *, start_token: bool = True,
                          max_length: int | None = None) -> list[list[int]]:
    """Token positions of each concept in ``prompt`` (position 0 is the start token; with
    ``start_token=False``, T5's layout, position 0 is the prompt's first token). ``max_length``:
    the text keys the model sees (the pipeline's ``max_sequence_length``); a concept past it
    is not in the prompt. With a SentencePiece tokenizer (T5) a word matches whole words only
    ("cat" not in "cats"), and case counts (T5 does not lowercase; CLIP does).

    A concept is a word or phrase (``"circle"``, ``"red circle"``), a token position (``3``), or
    a list of positions (``[3, 4]``, one multi-token concept). A word that the tokenizer splits
    into several tokens gives all of them (their maps are merged later). When the same word is
    listed k times it takes its k-th occurrence in the prompt ("a red circle and a blue circle"
    with concepts ``["circle", "circle"]``). Raises :class:`ConceptError` for an empty list, a
    word not in the prompt, or a position outside the prompt's tokens, listing the tokens.
    """
    if isinstance(concepts, (str, int)):
        concepts = [concepts]
    concepts = list(concepts) if concepts is not None else []
    if not concepts:
        raise ConceptError(
            f"A-STAR / Attend-and-Excite need at least one concept; the prompt {prompt!r} has the tokens "
            f"[{_describe_tokens(tokenizer, prompt, max_length)}]: pass words (concepts=['circle', 'square']) or "
            f"token positions"
        )
    ids = prompt_ids(tokenizer, prompt, max_length)  # [SOT, ..., EOT] (T5: [..., EOS])
    sentencepiece = any(t.startswith("\u2581") for t in tokenizer.convert_ids_to_tokens(ids))
    inner = range(1 if start_token else 0, len(ids) - 1)  # positions of the prompt's own tokens
    used: dict[tuple[int, ...], int] = {}
    out = []
    for concept in concepts:
        if isinstance(concept, bool):
            raise ConceptError(f"concept {concept!r} is neither a word nor a token position")
        if isinstance(concept, int) or (isinstance(concept, Sequence) and not isinstance(concept, str)):
            group = [concept] if isinstance(concept, int) else list(concept)
            if not group or any(not isinstance(i, int) or i not in inner for i in group):
                raise ConceptError(
                    f"token position(s) {concept!r} are not tokens of the prompt {prompt!r}: use positions "
                    f"{inner.start}..{inner.stop - 1} of [{_describe_tokens(tokenizer, prompt, max_length)}]"
                )
            out.append(group)
            continue
        if not isinstance(concept, str) or not concept.strip():
            raise ConceptError(f"concept {concept!r} must be a non-empty word, a token position or a list of positions")
        word = tuple(tokenizer(concept.strip(), add_special_tokens=False).input_ids)
        starts = [s for s in inner if s + len(word) <= inner.stop and tuple(ids[s : s + len(word)]) == word
                  and not (sentencepiece and _continues_word(tokenizer, ids[s + len(word)]))]
        k = used.get(word, 0)
        if k >= len(starts):
            seen = f" (it occurs {len(starts)} time(s); it was listed {k + 1} times)" if starts else ""
            raise ConceptError(
                f"concept {concept!r} is not in the prompt {prompt!r}{seen}; the prompt's tokens are "
                f"[{_describe_tokens(tokenizer, prompt, max_length)}]: pass one of these words or token positions"
            )
        used[word] = k + 1
        out.append(list(range(starts[k], starts[k] + len(word))))
    return out


def text_positions(n_text: int, eot: int, mode: str = "prompt", first: int = 1) -> torch.Tensor:
    """Text positions over which maps are re-normalised (A&E step 1).

    ``"prompt"``: the prompt's own tokens first..eot-1 (no start, end or padding tokens; the
    original A&E code with ``normalize_eot``). ``"diffusers"``: every position but the first
    and the last of the ``n_text`` keys (``A[:, :, 1:-1]``, diffusers'
    ``StableDiffusionAttendAndExcitePipeline``, which keeps the end and padding tokens).
    ``first``: the prompt's first token (1 after CLIP's start token, 0 for T5, which has none).
    """
    if mode == "prompt":
        return torch.arange(first, eot)
    if mode == "diffusers":
        return torch.arange(first, n_text - 1)
    raise ConceptError(f"text_tokens={mode!r}: use 'prompt' (the prompt's own tokens) or 'diffusers' (keys 1..N-2)")


# ----------------------------------------------------------------------------- concept maps


def aggregate_attention(maps: Sequence[tuple[torch.Tensor, tuple[int, int]]], resolution: tuple[int, int],
                        *, renorm_text: bool = False) -> torch.Tensor:
    """Mean cross-attention map over sites and heads, in fp32 (A&E ``aggregate_attention``).

    maps: ``(probs [H, h*w, T], (h, w))`` per site: image-query × text-key probabilities.
    Maps at another resolution are resized bilinearly to ``resolution`` (A&E keeps only one
    resolution; select sites accordingly for the same behaviour). ``renorm_text`` divides each
    head's map by its total over the text keys first: the cross-attention share of joint
    attention (MMDiT image queries also attend to image keys). -> ``[h, w, T]``.
    """
    if not maps:
        raise ConceptError(
            "no attention maps were recorded: the selected sites saw no image-query x text-key attention "
            "(check the A-STAR sites selector)"
        )
    rh, rw = resolution
    heads = []
    for probs, (h, w) in maps:
        p = probs.float()
        if renorm_text:
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        p = p.reshape(p.shape[0], h, w, p.shape[-1])  # [H, h*w, T] -> [H, h, w, T]
        if (h, w) != (rh, rw):
            p = F.interpolate(p.permute(0, 3, 1, 2), size=(rh, rw), mode="bilinear", align_corners=False)  # [H, T, rh, rw]
            p = p.permute(0, 2, 3, 1)  # [H, rh, rw, T]
        heads.append(p)
    return torch.cat(heads, 0).mean(0)  # [H_all, rh, rw, T] -> [rh, rw, T]


def renormalize_text(attn: torch.Tensor, positions: torch.Tensor, temperature: float = 100.0,
                     center: bool = False) -> torch.Tensor:
    """``softmax(temperature · A[..., positions])`` over the text positions (A&E step 2).

    attn ``[h, w, T]`` -> ``[h, w, len(positions)]``; column j is the map of token ``positions[j]``.
    ``center`` subtracts each token's mean over the image first (not in A&E or A-STAR): a token
    that draws more attention *everywhere* (a global offset) then no longer wins every pixel,
    and the softmax compares where each token is strong relative to its own level.
    """
    sel = attn.index_select(-1, positions.to(attn.device))  # [h, w, P]
    if center:
        sel = sel - sel.mean(dim=(0, 1), keepdim=True)  # [h, w, P] minus per-token spatial mean [1, 1, P]
    return torch.softmax(sel * temperature, dim=-1)


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """A&E's 2-D smoothing kernel ``[size, size]``, summing to 1.

    Each axis uses exp(-((x - μ) / (2σ))²), A&E's form (not the textbook /(2σ²)); with the
    defaults this is the kernel of the original code and of diffusers.
    """
    x = torch.arange(size, dtype=torch.float32)
    g = torch.exp(-(((x - (size - 1) / 2) / (2 * sigma)) ** 2))  # [size]
    k = g[:, None] * g[None, :]  # [size, size]
    return k / k.sum()


def smooth_maps(maps: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Gaussian smoothing of maps ``[C, h, w]`` with reflect padding (A&E step 4); ``size=0`` is off."""
    if not size:
        return maps
    pad = size // 2
    kernel = gaussian_kernel(size, sigma).to(maps.device, maps.dtype)[None, None]  # [1, 1, k, k]
    x = F.pad(maps[:, None], (pad, pad, pad, pad), mode="reflect")  # [C, 1, h+2p, w+2p]
    return F.conv2d(x, kernel)[:, 0]  # [C, h, w]


def concept_maps(attn: torch.Tensor, groups: Sequence[Sequence[int]], positions: torch.Tensor, *,
                 temperature: float = 100.0, smooth_size: int = 3, smooth_sigma: float = 0.5,
                 subtoken: str = "mean", center_tokens: bool = False) -> torch.Tensor:
    """The maps A-STAR and A&E act on: ``[C, h, w]`` fp32, one per concept.

    attn:      aggregated attention ``[h, w, T]`` (:func:`aggregate_attention`);
    groups:    token positions of each concept (:func:`concept_token_indices`);
    positions: text positions to re-normalise over (:func:`text_positions`); every concept
               token must be one of them;
    subtoken:  how the tokens of a multi-token concept merge: ``"mean"`` or ``"max"``;
    center_tokens: subtract each token's spatial mean before the softmax (:func:`renormalize_text`).
    """
    if subtoken not in ("mean", "max"):
        raise ConceptError(f"subtoken={subtoken!r}: use 'mean' or 'max'")
    soft = renormalize_text(attn, positions, temperature, center_tokens)  # [h, w, P]
    where = {int(p): j for j, p in enumerate(positions.tolist())}
    out = []
    for group in groups:
        missing = [i for i in group if i not in where]
        if missing:
            raise ConceptError(
                f"concept token position(s) {missing} lie outside the re-normalised text positions "
                f"{positions.tolist()[:1]}..{positions.tolist()[-1:]}"
            )
        cols = soft[..., [where[i] for i in group]]  # [h, w, n_sub]
        out.append(cols.mean(-1) if subtoken == "mean" else cols.amax(-1))
    maps = torch.stack(out)  # [C, h, w]
    return smooth_maps(maps, smooth_size, smooth_sigma)


# ----------------------------------------------------------------------------- losses


def max_activations(maps: torch.Tensor) -> torch.Tensor:
    """Spatial maximum of each map ``[C, h, w]`` -> ``[C]`` (A&E step 5)."""
    return maps.flatten(1).max(dim=1).values


def attend_excite_loss(maps: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite: ``max_c max(0, 1 - max_ij A_c)``, the worst-attended concept."""
    return torch.clamp(1.0 - max_activations(maps), min=0.0).max()


def _soft_iou(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Σ min(a, b) / Σ (a + b) over the last two dimensions (A-STAR's soft IoU; at most 0.5)."""
    return torch.minimum(a, b).sum((-2, -1)) / ((a + b).sum((-2, -1)) + eps)


def segregation_loss(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """A-STAR Eq. 2: Σ_{m>n} Σ_ij min(A^m, A^n)_ij / Σ_ij (A^m + A^n)_ij over concept pairs.

    Each pair term lies in [0, 0.5]: 0 for disjoint maps, 0.5 for identical ones. One concept
    gives 0 (still attached to the graph).
    """
    c = maps.shape[0]
    if c < 2:
        return maps.sum() * 0.0
    m, n = torch.triu_indices(c, c, offset=1, device=maps.device)  # every unordered pair once
    return _soft_iou(maps[m], maps[n], eps).sum()


def retention_loss(maps: torch.Tensor, targets: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """A-STAR Eq. 3: Σ_m [1 - Σ_ij min(A^m, B^m)_ij / Σ_ij (A^m + B^m)_ij].

    targets ``B`` ``[C, h, w]`` are the binarised maps of the previous step (:func:`binarize`,
    detached) or a user layout mask. For binary B and A ≤ 1 the ratio is at most 0.5, so the
    loss is at least 0.5 per concept and reaches it exactly when A = B: only its gradient
    matters.
    """
    return (1.0 - _soft_iou(maps, targets.to(maps.dtype), eps)).sum()


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of ``values`` (any shape): the cut maximising between-class variance."""
    v = values.detach().flatten().float()
    lo, hi = v.min(), v.max()
    if float(hi - lo) <= 0:
        return hi
    hist = torch.histc(v, bins=bins, min=float(lo), max=float(hi))
    centres = lo + (hi - lo) * (torch.arange(bins, device=v.device) + 0.5) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0) / w0.clamp_min(1)
    m1 = ((hist * centres).sum() - (hist * centres).cumsum(0)) / w1.clamp_min(1)
    between = w0 * w1 * (m0 - m1) ** 2
    k = int(between.argmax())
    return lo + (hi - lo) * (k + 1) / bins  # upper edge of the last bin of the low class


def binarize(maps: torch.Tensor, threshold: float | str = 0.5) -> torch.Tensor:
    """Retention target B (A-STAR Eq. 3; the paper leaves the rule open, so it is configurable).

    Each map ``[C, h, w]`` is min-max normalised to [0, 1]; a pixel is 1 where the normalised
    value is ``>= threshold`` (default 0.5: at least half way from the map's minimum to its
    peak), or, with ``threshold="otsu"``, above the map's Otsu threshold. Detached, fp32.
    """
    m = maps.detach().float()
    lo = m.flatten(1).min(1).values[:, None, None]
    hi = m.flatten(1).max(1).values[:, None, None]
    norm = (m - lo) / (hi - lo).clamp_min(1e-12)  # [C, h, w] in [0, 1]
    if threshold == "otsu":
        cut = torch.stack([otsu_threshold(x) for x in norm])[:, None, None]
        return (norm > cut).float()
    if isinstance(threshold, str) or not 0.0 <= float(threshold) <= 1.0:
        raise ConceptError(f"retention threshold {threshold!r}: use a number in [0, 1] or 'otsu'")
    return (norm >= float(threshold)).float()


def combined_loss(maps: torch.Tensor, weights: dict[str, float], targets: torch.Tensor | None = None,
                  eps: float = 1e-8) -> tuple[torch.Tensor, dict[str, float]]:
    """``Σ_k w_k L_k`` over ``weights`` (keys from :data:`LOSSES`) -> (loss, {name: value}).

    ``retention`` is skipped (contributes 0) while ``targets`` is ``None`` (the first step,
    when there is no previous map and no layout mask).
    """
    unknown = set(weights) - set(LOSSES)
    if unknown:
        raise ConceptError(f"unknown loss(es) {sorted(unknown)}; choose from {LOSSES}")
    total = maps.sum() * 0.0
    parts: dict[str, float] = {}
    for name, w in weights.items():
        if not w:
            continue
        if name == "segregation":
            value = segregation_loss(maps, eps)
        elif name == "retention":
            if targets is None:
                continue
            value = retention_loss(maps, targets, eps)
        else:
            value = attend_excite_loss(maps)
        parts[name] = float(value.detach())
        total = total + w * value
    return total, parts


def rescale_to_norm(z: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``z · ‖reference‖ / ‖z‖`` per sample (the leading dim): keep an updated latent on the
    norm shell of the latent it came from. Not in A-STAR / Attend-and-Excite; the same
    projection keeps an optimised initial noise on the Gaussian shell in noise-optimisation
    methods (e.g. ReNO, Eyring et al. 2024)."""
    dims = tuple(range(1, z.ndim))
    norm = torch.linalg.vector_norm
    return z * (norm(reference, dim=dims, keepdim=True) / norm(z, dim=dims, keepdim=True).clamp_min(1e-12))


# ----------------------------------------------------------------------------- display


_COLORMAP = torch.tensor([  # inferno-like anchors, 0 -> 1
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164],
], dtype=torch.float32)


def colorize(m: torch.Tensor, vmax: float | None = None) -> torch.Tensor:
    """A map ``[h, w]`` -> ``[h, w, 3]`` uint8 heat map (inferno-like) of ``m / vmax`` over
    [0, 1]; ``vmax=None`` normalises the map by its own min and max (every map looks as
    bright as the next: pass a shared ``vmax`` to compare concepts)."""
    m = m.detach().float()
    if vmax is None:
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    else:
        m = (m / max(float(vmax), 1e-12)).clamp(0, 1)
    x = m * (len(_COLORMAP) - 1)
    i = x.floor().long().clamp(max=len(_COLORMAP) - 2)
    f = (x - i)[..., None]
    rgb = _COLORMAP[i] * (1 - f) + _COLORMAP[i + 1] * f  # [h, w, 3]
    return rgb.round().clamp(0, 255).to(torch.uint8)


def heatmap_image(m: torch.Tensor, size: int | tuple[int, int] | None = None, vmax: float | None = None):
    """A PNG-ready ``PIL.Image`` heat map of a map ``[h, w]``, resized (bilinear) to ``size``
    (``vmax``: see :func:`colorize`)."""
    from PIL import Image

    img = Image.fromarray(colorize(m, vmax).cpu().numpy())
    if size is not None:
        img = img.resize((size, size) if isinstance(size, int) else tuple(size), Image.BILINEAR)
    return img


# ----------------------------------------------------------------------------- the tap control


class MapsComplete(Exception):
    """Raised inside a gradient forward once every selected site has reported (early exit)."""


class ConceptRecorder(Control):
    """Collects image-query × text-key attention probabilities at its sites through taps.

    The recorder is inert (the stock fast path runs) until ``mode`` is set:
    ``"grad"``: the taps keep their graph (the gradient pass of A-STAR / A&E, batch of one);
    ``"main"``: detached taps of the ``cond`` rows only (retention targets, display).
    ``records`` receives ``(site name, probs [B', H, Nq_img, N_text], (h, w))``. With
    ``early_exit`` in ``"grad"`` mode, :class:`MapsComplete` stops the forward once every
    site has reported: the rest of the network cannot change the maps.
    """

    order = 1000  # see the call after every other control's edits

    def __init__(self, sites, heads="all"):
        super().__init__(sites=sites, heads=heads)
        self.mode: str | None = None
        self.records: list[tuple[str, torch.Tensor, tuple[int, int]]] = []
        self.early_exit = False
        self.expected: set[str] = set()
        self._seen: set[str] = set()

    def on_attach(self, engine) -> None:
        from ..sites import select

        chosen = [s for s in engine.sites if self.sites(s)] if callable(self.sites) else select(engine.sites, self.sites)
        self.expected = {s.name for s in chosen if s.kind in ("cross", "joint", "single")}  # sites that can see text

    def start(self, mode: str | None, early_exit: bool = False) -> None:
        """Clear the records and set the mode (``None`` turns the recorder off)."""
        self.mode, self.early_exit = mode, early_exit
        self.records = []
        self._seen = set()

    def is_active(self, call: AttentionCall) -> bool:
        if self.mode is None or (self.mode == "main" and not call.has_branch(("cond",))):
            return False
        layout = call.layout
        return layout.has_q("image") and layout.has_k("text")

    def edit_spec(self, call: AttentionCall) -> None:
        heads = self.heads_at(call.site)
        call.tap("image", "text", requires_grad=self.mode == "grad",
                 branches=("cond",) if self.mode == "main" else None,
                 heads=None if len(heads) == call.q.shape[1] else heads)

    def on_taps(self, call: AttentionCall, probs: list[torch.Tensor]) -> None:
        seg = call.layout.q("image")
        if seg.shape is None:
            raise LayoutError(f"the image tokens of {call.site.name} have no known (h, w) grid; A-STAR needs one")
        grid = seg.shape
        self.records.append((call.site.name, probs[0], tuple(grid)))
        self._seen.add(call.site.name)
        if self.mode == "grad" and self.early_exit and self.expected and self._seen >= self.expected:
            raise MapsComplete
