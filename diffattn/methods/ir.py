"""IR-Diffusion's mask and attention math: isolation and reposition attention.

He et al., "Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation
and Reposition Attention" (2024); the official processor's behaviour is summarised in
../shared/reference/astar_ir_uam.md §2. A scene image attends, besides its own tokens, to the
tokens of S reference images (one subject each). For a scene query p and the key blocks
[ref_1 … ref_S, scene]:

- **reference block i**: key j is allowed iff the *relocated* reference mask M̃_i[j] = 1, and
  only for queries inside subject i's (dropped-out) scene mask T_i^drop;
- **scene block (isolation)**: −inf between p ∈ T_i and j ∈ T_k for k ≠ i (the outer product
  T_i T_kᵀ), background rows and columns untouched, so subjects never attend to each other;
- **reposition**: the reference hidden states, masked by R_i, are cropped to R_i's box,
  resized by nearest to T_i's box and pasted at T_i's place on a zero canvas before K/V are
  projected; R_i moves the same way (:func:`reposition`), so reference and scene subject
  tokens share positions (the paper's answer to attention's locality bias).

Masks: a map is resized bilinearly to each attention resolution and binarised with Otsu's
threshold (:func:`otsu_threshold`, :func:`resize_mask`); the scene rehearsal's masks are
closed, grown to a minimum box and made disjoint (:func:`postprocess_masks`, the official
128 px close and 256 px box at 1280×768, here as fractions of the shorter side); at each step a
fresh Bernoulli(1 − p) keeps a part of every scene mask for the reference blocks
(:func:`mask_dropout`, ConsiStory's p = 0.5).

Every function here is pure and works on one image's [h, w] grids (or [S, h, w] stacks);
tokens are row-major, token t = y·w + x.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..controls import Control
from ..errors import ControlError

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open, in grid cells


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape): the cut maximising the between-class
    variance of a ``bins``-bin histogram over [min, max] (Otsu 1979, Eq. 18); a constant input
    returns its value (nothing to separate)."""
    v = values.detach().double().flatten()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    p = hist / hist.sum()  # [bins]
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = torch.cumsum(p, 0)  # class 0 = bins [0..k]
    mu = torch.cumsum(p * centres, 0)
    mu_t = mu[-1]
    between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-30)
    between[w0 >= 1 - 1e-12] = -1  # an empty class 1 separates nothing
    k = int(torch.argmax(between))
    return lo + (k + 1) * (hi - lo) / bins  # the upper edge of the last class-0 bin


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A map or mask [H, W] resized bilinearly to ``size`` (h, w) and binarised with Otsu's
    threshold, as the official processor does at each attention resolution; bool [h, w]."""
    m = mask.detach().float()[None, None]  # [1, 1, H, W]
    r = F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0]  # [h, w]
    if float(r.max()) <= float(r.min()):
        return r > 0
    return r > otsu_threshold(r)


def box_of(mask: torch.Tensor) -> Box | None:
    """The bounding box (y0, y1, x0, x1), half-open, of a bool [h, w] mask; None if empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def reposition(hidden: torch.Tensor, grid: tuple[int, int], ref_mask: torch.Tensor, scene_mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reposition one reference subject onto the scene subject's place.

    hidden: [L, C] the reference's hidden states (L = h·w, row-major); ref_mask / scene_mask:
    bool [h, w]. Returns (canvas [L, C], moved mask bool [h, w]): the masked reference crop of
    R's box resized (nearest) to T's box and pasted there on zeros, and R moved the same way.
    An empty R or T gives a zero canvas and an empty mask (that subject's block admits no key)."""
    h, w = grid
    if hidden.shape[0] != h * w:
        raise ControlError(f"reposition: {hidden.shape[0]} tokens for a {h}x{w} grid")
    canvas = hidden.new_zeros(h, w, hidden.shape[-1])  # [h, w, C]
    moved = torch.zeros(h, w, dtype=torch.bool, device=ref_mask.device)
    rb, tb = box_of(ref_mask), box_of(scene_mask)
    if rb is None or tb is None:
        return canvas.reshape(h * w, -1), moved
    grid_states = (hidden.reshape(h, w, -1) * ref_mask[..., None].to(hidden.dtype))  # [h, w, C] subject tokens only
    crop = grid_states[rb[0]:rb[1], rb[2]:rb[3]]  # [hr, wr, C]
    crop_mask = ref_mask[rb[0]:rb[1], rb[2]:rb[3]]
    th, tw = tb[1] - tb[0], tb[3] - tb[2]
    crop = F.interpolate(crop.permute(2, 0, 1)[None], size=(th, tw), mode="nearest")[0].permute(1, 2, 0)  # [th, tw, C]
    crop_mask = F.interpolate(crop_mask.float()[None, None], size=(th, tw), mode="nearest")[0, 0] > 0.5
    canvas[tb[0]:tb[1], tb[2]:tb[3]] = crop
    moved[tb[0]:tb[1], tb[2]:tb[3]] = crop_mask
    return canvas.reshape(h * w, -1), moved


def isolation_bias(scene_masks: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Additive bias [L, L] of the scene's own block: −inf where the query lies in subject i's
    region and the key in subject k's (k ≠ i), 0 elsewhere (background untouched).
    scene_masks: bool [S, L] (or [S, h, w])."""
    m = scene_masks.reshape(scene_masks.shape[0], -1).to(torch.float32)  # [S, L]
    any_other = m.T @ m  # [L, L]: number of subjects containing both p and j
    own = m.sum(0)  # [L]
    # p in T_i and j in T_k with k != i  <=>  p and j are each in some subject, but not only in shared ones
    cross = (own[:, None] * own[None, :]) > any_other  # [L, L]
    out = torch.zeros(m.shape[1], m.shape[1], dtype=dtype, device=scene_masks.device)
    return out.masked_fill(cross, float("-inf"))


def mask_dropout(mask: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``mask`` with each True cell kept with probability 1 − p (a fresh Bernoulli draw)."""
    if not 0.0 <= p < 1.0:
        raise ControlError(f"mask dropout p={p!r}: in [0, 1)")
    if p == 0.0:
        return mask
    keep = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device) >= p
    return mask & keep


def _close(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Morphological closing (dilate then erode) of bool [h, w] with a k×k square."""
    if k <= 1:
        return mask
    x = mask.float()[None, None]
    pad = k // 2
    dil = F.max_pool2d(F.pad(x, (pad, k - 1 - pad, pad, k - 1 - pad)), k, stride=1)
    # erosion by the reflected square (the two pads swapped), so an even k does not shift the result
    ero = -F.max_pool2d(F.pad(-dil, (k - 1 - pad, pad, k - 1 - pad, pad), value=-1.0), k, stride=1)
    return ero[0, 0] > 0.5


def postprocess_masks(masks: torch.Tensor, close_frac: float = 128 / 768, min_box_frac: float = 256 / 768
                      ) -> torch.Tensor:
    """The official scene-mask clean-up, scaled to resolution: each mask [S, H, W] closed with
    a square of ``close_frac`` of the shorter side and clipped to its own box; a mask whose box
    is smaller than ``min_box_frac`` of the shorter side grown to a box of that side around its
    centre; then cells claimed by several subjects removed from all (the masks are disjoint)."""
    s, h, w = masks.shape
    side = min(h, w)
    k = max(1, round(close_frac * side))
    need = max(1, round(min_box_frac * side))
    out = torch.zeros_like(masks, dtype=torch.bool)
    for i in range(s):
        m = masks[i].bool()
        box = box_of(m)
        if box is None:
            continue
        closed = _close(m, k)
        clip = torch.zeros_like(closed)
        clip[box[0]:box[1], box[2]:box[3]] = True
        m = closed & clip
        y0, y1, x0, x1 = box
        if (y1 - y0) < need and (x1 - x0) < need:  # too small to steer: a minimum box around its centre
            cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
            yy0 = int(min(max(0, math.floor(cy - need / 2)), h - need))
            xx0 = int(min(max(0, math.floor(cx - need / 2)), w - need))
            m = torch.zeros_like(m)
            m[yy0:yy0 + need, xx0:xx0 + need] = True
        out[i] = m
    shared = out.sum(0) > 1
    return out & ~shared


# ----------------------------------------------------------------------------- controls

ISOLATED_KINDS = ("self", "joint", "single")  # attention whose keys include the image's own tokens


def cfg_spans(call) -> list[slice]:
    """The rows of each CFG branch of a call (uncond, then cond), or all rows as one."""
    return [call.branches[x] for x in ("uncond", "cond") if x in call.branches] or [slice(0, call.q.shape[0])]


def isolation_mask(layout, masks: torch.Tensor) -> torch.Tensor | None:
    """The boolean may-attend mask [Nq, Nk] of one call (True = allowed) that isolates the
    subjects ``masks`` [S, H, W] inside the call's image-to-image block (resized to the call's
    grid, :func:`resize_mask`); every other query / key pair is allowed. None when the call has
    no image block or no two subjects meet (nothing to forbid: the call stays exact)."""
    if not (layout.has_q("image") and layout.has_k("image")):
        return None
    q, k = layout.q("image"), layout.k("image")
    if q.shape is None or q.shape != k.shape:
        return None
    grid = torch.stack([resize_mask(m, q.shape) for m in masks])  # [S, h, w]
    bias = isolation_bias(grid.reshape(grid.shape[0], -1))  # [L, L]
    forbid = torch.isinf(bias)
    if not forbid.any():
        return None
    allowed = torch.ones(layout.n_query, layout.n_key, dtype=torch.bool, device=grid.device)
    allowed[q.slice, k.slice] = ~forbid
    return allowed


class IsolationAttention(Control):
    """IR-Diffusion's isolation attention alone: inside the image's own attention, a subject's
    queries never attend to another subject's keys (module docstring); background rows and
    columns, text keys and every other call stay as they are.

    masks:    [S, H, W] subject regions of the image (bool or maps; any resolution: resized
              bilinearly and Otsu-binarised per attention resolution);
    sites:    default the self / joint / single attention calls;
    branches: rows it acts on (default all);
    references: S when the batch is ``[ref_1 … ref_S, scene] × CFG`` (as for
              :class:`RepositionAttention`): only each CFG branch's scene row is isolated.

        with da.attach(pipe, da.IsolationAttention(masks)):   # masks [2, 64, 64]
            image = pipe("a circle left of a square").images[0]
    """

    order = 0

    def __init__(self, masks, *, references: int = 0, sites=None, steps=None, branches=None,
                 order: int | None = None):
        m = torch.as_tensor(masks)
        if not isinstance(references, int) or references < 0:
            raise ControlError(f"IsolationAttention references={references!r}: the number S of reference rows "
                               f"before the scene row in each CFG branch (0: every row is a scene)")
        self.references = references
        if m.dim() != 3 or m.shape[0] < 1:
            raise ControlError(f"IsolationAttention masks of shape {tuple(m.shape)}: give [S, H, W], one region per subject")
        super().__init__(sites=sites if sites is not None else (lambda s: s.kind in ISOLATED_KINDS),
                         steps=steps, branches=branches, order=order)
        self.masks = m.float()
        self._cache: dict = {}  # layout names and grid -> mask; the same for every call of a shape

    def edit_spec(self, call) -> None:
        key = (call.layout.names, call.layout.n_query, call.layout.n_key,
               call.layout.q("image").shape if call.layout.has_q("image") else None)
        if key not in self._cache:
            self._cache[key] = isolation_mask(call.layout, self.masks)
        allowed = self._cache[key]
        if allowed is None:
            return
        rows = self.rows(call)  # [B]
        if self.references:
            rows = rows & self._scene_rows(call)
        allowed = allowed.to(call.q.device)
        per_row = allowed[None, None] | ~rows[:, None, None, None]  # [B, 1, Nq, Nk]: other rows unrestricted
        call.spec.add_bias(per_row)

    def _scene_rows(self, call) -> torch.Tensor:
        """[B] True at each CFG branch's scene row (the last of its S + 1 rows)."""
        b = call.q.shape[0]
        spans = cfg_spans(call)
        out = torch.zeros(b, dtype=torch.bool, device=call.q.device)
        for sl in spans:
            if sl.stop - sl.start != self.references + 1:
                raise ControlError(f"IsolationAttention(references={self.references}) needs {self.references} "
                                   f"reference rows then the scene row in each CFG branch; this one has "
                                   f"{sl.stop - sl.start}")
            out[sl.stop - 1] = True
        return out

    def __repr__(self):
        return f"IsolationAttention(subjects={self.masks.shape[0]}, steps={self.steps!r}, branches={self.branches!r})"


REPOSITION_FAMILIES = ("unet", "sd3")  # no RoPE inside attention: moved tokens keep valid positions


class RepositionAttention(Control):
    """IR-Diffusion's reposition attention alone: the scene row also attends to each reference
    subject's keys and values, moved onto the scene subject's place (:func:`reposition`).

    The batch holds, per CFG branch, S reference rows then the scene row (``[ref_1 … ref_S,
    scene] × (uncond, cond)``, as :class:`~diffattn.pipelines.ir` builds it). For a scene
    query p and reference block i, key j is allowed iff p lies in subject i's scene mask after
    a fresh per-step Bernoulli dropout (``dropout``, ConsiStory's 0.5) and j in the moved
    reference mask; background and text queries see only the scene's own keys; the reference
    rows attend as stock (their extra keys are all forbidden).

    Why K and V may be moved after the projections: ``to_k`` / ``to_v`` and the q/k norms act
    per token, so moving projected tokens equals projecting moved hidden states on every key
    the mask allows (the zero canvas' cells are never attended). Families with RoPE inside
    attention (FLUX, Wan) would need the keys re-rotated to their new positions: refused.

    ref_masks, scene_masks: [S, H, W] regions (any resolution, resized per call);
    dropout: p of the per-step mask dropout; seed: its draws (step i from ``seed`` and i);
    move:    False keeps the reference tokens where they are (masked by R_i): the
             "extended K/V only" ablation (ConsiStory-style subject-driven shared attention).
    """

    order = 0

    def __init__(self, ref_masks, scene_masks, *, dropout: float = 0.5, seed: int = 0, move: bool = True,
                 sites=None, steps=None, order: int | None = None):
        r, t = torch.as_tensor(ref_masks).float(), torch.as_tensor(scene_masks).float()
        if r.dim() != 3 or t.dim() != 3 or r.shape[0] != t.shape[0] or r.shape[0] < 1:
            raise ControlError(f"RepositionAttention masks of shapes {tuple(r.shape)} and {tuple(t.shape)}: give "
                               f"[S, H, W] each, one reference region and one scene region per subject")
        if not 0.0 <= dropout < 1.0:
            raise ControlError(f"RepositionAttention dropout={dropout!r}: in [0, 1)")
        super().__init__(sites=sites if sites is not None else (lambda s: s.kind in ISOLATED_KINDS), steps=steps,
                         order=order)
        self.ref_masks, self.scene_masks, self.dropout, self.seed = r, t, float(dropout), int(seed)
        self.move = bool(move)

    @property
    def subjects(self) -> int:
        return self.ref_masks.shape[0]

    def groups(self, call) -> list[tuple[list[int], int]]:
        """(reference rows, scene row) of each CFG branch of the call's batch."""
        s = self.subjects
        spans = cfg_spans(call)
        out = []
        for sl in spans:
            rows = list(range(sl.start, sl.stop))
            if len(rows) != s + 1:
                raise ControlError(f"RepositionAttention with {s} subjects needs {s} reference rows then the scene row "
                                   f"in each CFG branch ({s + 1} rows); this branch has {len(rows)}")
            out.append((rows[:s], rows[s]))
        return out

    def edit_qkv(self, call) -> None:
        family = getattr(call.context, "family", "")
        if family and family not in REPOSITION_FAMILIES:
            raise ControlError(f"RepositionAttention on {family}: RoPE is applied inside its attention, so moved keys "
                               f"would keep their old rotations; supported: {', '.join(REPOSITION_FAMILIES)}")
        lay = call.layout
        if not (lay.has_q("image") and lay.has_k("image")) or lay.k("image").shape is None:
            return
        seg, qseg = lay.k("image"), lay.q("image")
        grid = seg.shape
        n = len(seg)
        b, heads, nk, d = call.k.shape
        s = self.subjects
        ref = [resize_mask(m, grid) for m in self.ref_masks]
        scene = [resize_mask(m, grid) for m in self.scene_masks]
        step = call.step.index if call.step is not None else 0
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # the same draw at every layer of a step
        dropped = [mask_dropout(m, self.dropout, gen).reshape(-1) for m in scene]  # [L] each
        k_ext = call.k.new_zeros(b, heads, s * n, d)  # [B, H, S·L, D]
        v_ext = call.v.new_zeros(b, heads, s * n, call.v.shape[-1])
        allowed = torch.ones(b, 1, lay.n_query, nk + s * n, dtype=torch.bool, device=call.q.device)
        allowed[..., nk:] = False
        for refs, target in self.groups(call):
            for i in range(s):
                def moved(x):  # [H, L, D] of reference i -> its tokens moved onto subject i's scene box
                    flat = x[:, seg.slice].permute(1, 0, 2).reshape(n, -1)  # [L, H·D]
                    r_i = ref[i].to(flat.device)
                    if self.move:
                        canvas, m = reposition(flat, grid, r_i, scene[i].to(flat.device))
                    else:  # in place: the reference subject's own tokens, nothing else
                        canvas, m = flat * r_i.reshape(-1, 1).to(flat.dtype), r_i
                    return canvas.reshape(n, heads, -1).permute(1, 0, 2), m.reshape(-1)  # [H, L, D], [L]
                kk, key_mask = moved(call.k[refs[i]])
                vv, _ = moved(call.v[refs[i]])
                k_ext[target, :, i * n:(i + 1) * n] = kk
                v_ext[target, :, i * n:(i + 1) * n] = vv
                block = dropped[i].to(call.q.device)[:, None] & key_mask.to(call.q.device)[None, :]  # [Lq, L]
                allowed[target, 0, qseg.slice, nk + i * n:nk + (i + 1) * n] = block
        call.extend_keys("references", k_ext, v_ext, bias_fill=False)
        call.spec.add_bias(allowed)

    def __repr__(self):
        return (f"RepositionAttention(subjects={self.subjects}, dropout={self.dropout:g}, move={self.move}, "
                f"steps={self.steps!r})")


class ConsistentSelfAttention(Control):
    """StoryDiffusion's consistent self-attention (Zhou et al. 2024, ``cal_attn_mask_xl``): the
    IR baseline without masks. Within each CFG branch (and each prompt group), every row's
    image self-attention also sees a random share ``rate`` of the image tokens of the other
    rows, redrawn every step (``seed`` and the step index); no isolation, no reposition.
    StoryDiffusion applies it to the UNet's up-block self-attention after the first steps:
    pass ``sites="u"`` / ``steps=(5, None)`` for that schedule."""

    order = 0

    def __init__(self, rate: float = 0.5, *, seed: int = 0, sites=None, steps=None, order: int | None = None):
        if not 0.0 <= rate <= 1.0:
            raise ControlError(f"ConsistentSelfAttention rate={rate!r}: the share of shared tokens, in [0, 1]")
        super().__init__(sites=sites if sites is not None else (lambda s: s.kind in ISOLATED_KINDS), steps=steps,
                         order=order)
        self.rate, self.seed = float(rate), int(seed)

    def edit_qkv(self, call) -> None:
        lay = call.layout
        if self.rate == 0 or not (lay.has_q("image") and lay.has_k("image")):
            return
        seg, qseg = lay.k("image"), lay.q("image")
        b, heads, nk, d = call.k.shape
        n = len(seg)
        spans = cfg_spans(call)
        groups = [list(range(sl.start, sl.stop)) for sl in spans]
        if all(len(g) < 2 for g in groups):
            return
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + (call.step.index if call.step else 0))
        keep = torch.rand(b, n, generator=gen).to(call.q.device) < self.rate  # [B, L]: row r shares these tokens
        k_ext = call.k.new_zeros(b, heads, b * n, d)
        v_ext = call.v.new_zeros(b, heads, b * n, call.v.shape[-1])
        allowed = torch.ones(b, 1, lay.n_query, nk + b * n, dtype=torch.bool, device=call.q.device)
        allowed[..., nk:] = False
        for g in groups:
            for r in g:
                for o in g:
                    if o == r:
                        continue
                    cols = slice(nk + o * n, nk + (o + 1) * n)
                    k_ext[r, :, o * n:(o + 1) * n] = call.k[o, :, seg.slice]
                    v_ext[r, :, o * n:(o + 1) * n] = call.v[o, :, seg.slice]
                    allowed[r, 0, qseg.slice, cols] = keep[o][None, :]
        call.extend_keys("shared", k_ext, v_ext, bias_fill=False)
        call.spec.add_bias(allowed)

    def __repr__(self):
        return f"ConsistentSelfAttention(rate={self.rate:g}, steps={self.steps!r})"
