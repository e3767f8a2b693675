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
from ..kernels import attention
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


# ----------------------------------------------------------------------------- scene-row attention


def subject_classes(patterns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group query rows by their bool pattern ``[Nq, P]``: (distinct patterns [C, P], class
    of each row [Nq]). Rows of one class see the same keys, so a class is one attention call."""
    distinct, inverse = torch.unique(patterns.to(torch.uint8), dim=0, return_inverse=True)  # [C, P], [Nq]
    return distinct.bool(), inverse


def own_keys_allowed(query_subjects: torch.Tensor, key_member: torch.Tensor, isolate: bool) -> torch.Tensor:
    """Which of a row's own image keys a query of subject set ``query_subjects`` [S] may see.

    key_member: bool [S, L] subject regions on the key grid. Isolation (the T_i T_kᵀ outer
    product of the paper): a query in subject i never sees a key in subject k ≠ i, so it sees
    the background and the keys of exactly its own subject; a background query (empty set) sees
    every key. Returns bool [L]."""
    every = torch.ones(key_member.shape[1], dtype=torch.bool, device=key_member.device)
    if not isolate or not bool(query_subjects.any()):
        return every
    in_none = ~key_member.any(0)  # [L]
    if int(query_subjects.sum()) > 1:  # a cell claimed by two subjects: every subject key is another's
        return in_none
    same = (key_member == query_subjects[:, None]).all(0)  # [L]: exactly the query's own subject
    return in_none | same


def scene_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_image: slice,
                    k_image: slice, member: torch.Tensor, isolate: bool = True, references=(),
                    mutual=(), mutual_weight: float = 0.9) -> torch.Tensor:
    """IR-Diffusion's attention for one scene row, without a query × key mask.

    q [H, Nq, D], k / v [H, Nk, D]: the row's own call (text and image tokens as the layout
    says; ``q_image`` / ``k_image`` the image segments, on the same (h, w) grid).
    member:     bool [S, L] the scene subject regions on that grid (disjoint or not).
    isolate:    apply isolation inside the row's own image block (:func:`own_keys_allowed`).
    references: per subject i, ``(k_i [H, L_i, D], v_i [H, L_i, Dv], keys_i bool [L_i],
                queries_i bool [L])``: the reference block (moved or not) that image queries
                with ``queries_i`` (subject i after mask dropout) also attend to, key j only
                where ``keys_i``; or ``()``.
    mutual:     per subject i, ``(k_i, v_i)`` the text keys of reference i's prompt (IR's
                mutual cross-attention, inherited from DreamStory): a query of subject i gets
                ``(1 − λ)·out + λ·attention over [its keys; reference i's text]``, λ =
                ``mutual_weight``; or ``()``.

    Queries are grouped by what they may see (subject set, visible reference blocks, mutual
    subject): each group is one dense attention call over a gathered key set, so the cost is
    the dense one and no Nq × Nk mask is ever built. Returns out [H, Nq, Dv].
    """
    s, n_q = member.shape[0], q.shape[1]
    pats = torch.zeros(n_q, 2 * s, dtype=torch.bool, device=q.device)  # [Nq, 2S]: subjects, visible references
    pats[q_image, :s] = member.T
    for i, (_, _, _, queries) in enumerate(references):
        pats[q_image, s + i] = queries
    key_member = member.to(q.device)
    distinct, inverse = subject_classes(pats)
    out = q.new_zeros(q.shape[0], n_q, v.shape[-1])  # [H, Nq, Dv]
    for c, pattern in enumerate(distinct):
        rows = torch.nonzero(inverse == c).squeeze(1)  # [n_c]
        own = torch.ones(k.shape[1], dtype=torch.bool, device=q.device)
        own[k_image] = own_keys_allowed(pattern[:s], key_member, isolate)
        keys, vals = [k[:, own]], [v[:, own]]  # [H, m, D]
        for i in torch.nonzero(pattern[s:]).flatten().tolist():
            k_i, v_i, keys_i, _ = references[i]
            keys.append(k_i[:, keys_i])
            vals.append(v_i[:, keys_i])
        kk, vv, qq = torch.cat(keys, 1)[None], torch.cat(vals, 1)[None], q[None, :, rows]  # [1, H, ·, D]
        if kk.shape[2] == 0:  # e.g. a cell of two subjects in a call without text keys: nothing allowed
            out[:, rows] = 0
            continue
        o = attention(qq, kk, vv, scale=scale)[0]  # [H, n_c, Dv]
        subject = torch.nonzero(pattern[:s]).flatten().tolist()
        if mutual and len(subject) == 1:
            k_t, v_t = mutual[subject[0]]
            o_mutual = attention(qq, torch.cat([kk, k_t[None]], 2), torch.cat([vv, v_t[None]], 2), scale=scale)[0]
            o = (1 - mutual_weight) * o + mutual_weight * o_mutual
        out[:, rows] = o
    return out


# ----------------------------------------------------------------------------- controls

ISOLATED_KINDS = ("self", "joint", "single")  # attention whose keys include the image's own tokens
PLAN = "ir-scene-plan"  # call.scratch key the IR controls of one call share (their parts of one scene attention)


def cfg_spans(call) -> list[slice]:
    """The rows of each CFG branch of a call (uncond, then cond), or all rows as one."""
    return [call.branches[x] for x in ("uncond", "cond") if x in call.branches] or [slice(0, call.q.shape[0])]


def scene_rows(call, references: int) -> list[tuple[list[int], int]]:
    """(reference rows, scene row) of each CFG branch of a ``[ref_1 … ref_S, scene] × CFG`` batch;
    with ``references=0`` every row is a scene of its own."""
    groups = []
    for sl in cfg_spans(call):
        rows = list(range(sl.start, sl.stop))
        if references == 0:
            groups += [([], r) for r in rows]
            continue
        if len(rows) != references + 1:
            raise ControlError(f"IR-Diffusion with {references} references needs {references} reference rows then the "
                               f"scene row in each CFG branch ({references + 1} rows); this branch has {len(rows)}")
        groups.append((rows[:references], rows[references]))
    return groups


def isolation_mask(layout, masks: torch.Tensor) -> torch.Tensor | None:
    """The boolean may-attend mask [Nq, Nk] of one call (True = allowed) that isolates the
    subjects ``masks`` [S, H, W] inside the call's image-to-image block (resized to the call's
    grid, :func:`resize_mask`); every other query / key pair is allowed. None when the call has
    no image block or no two subjects meet (nothing to forbid: the call stays exact).
    A float64 oracle for tests: the controls never build it."""
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


class _ScenePlan:
    """What the IR controls of one call ask of its scene rows, computed once in ``edit_output``
    by whichever of them runs first (:func:`scene_attention`)."""

    def __init__(self):
        self.member: torch.Tensor | None = None  # [S, L] scene regions on the call's grid
        self.isolate = False
        self.rows: list[int] = []  # scene rows the plan computes
        self.references: dict[int, list] = {}  # scene row -> reference blocks
        self.mutual: dict[int, list] = {}  # scene row -> reference prompts' text keys
        self.mutual_weight = 0.9
        self.out: torch.Tensor | None = None

    def merge(self, member, rows) -> None:
        if self.member is not None and (self.member.shape != member.shape or not torch.equal(self.member, member)):
            raise ControlError("IsolationAttention and RepositionAttention on one call need the same scene masks; "
                               "give both the same scene_masks")
        self.member = member
        self.rows = sorted(set(self.rows) | set(rows))


def _plan(call) -> _ScenePlan:
    if PLAN not in call.scratch:
        call.scratch[PLAN] = _ScenePlan()
    return call.scratch[PLAN]


def _grid_masks(masks: torch.Tensor, grid, cache: dict) -> torch.Tensor:
    """masks [S, H, W] resized and binarised to ``grid`` -> bool [S, h·w] (cached per grid)."""
    key = tuple(grid)
    if key not in cache:
        cache[key] = torch.stack([resize_mask(m, grid).reshape(-1) for m in masks])
    return cache[key]


def _image_grid(call):
    lay = call.layout
    if not (lay.has_q("image") and lay.has_k("image")):
        return None
    qseg, kseg = lay.q("image"), lay.k("image")
    if qseg.shape is None or qseg.shape != kseg.shape:
        return None
    return tuple(qseg.shape)


def _run_plan(call, out: torch.Tensor) -> torch.Tensor:
    """Replace the scene rows of ``out`` [B, H, Nq, Dv] by the plan's scene attention (once per call)."""
    plan = call.scratch.get(PLAN)
    if plan is None or not plan.rows:
        return out
    if plan.out is None:
        spec = call.spec
        if spec.bias is not None or spec.head_blend is not None or spec.uniform_keys is not None:
            raise ControlError(f"IR-Diffusion computes the scene rows' attention itself at {call.site.name}; another "
                               f"control set a bias, head blend or uniform keys on the same call; restrict one of "
                               f"them to other sites (sites=...)")
        lay = call.layout
        q_image, k_image = lay.q("image").slice, lay.k("image").slice
        plan.out = out.clone()
        for r in plan.rows:
            plan.out[r] = scene_attention(
                call.q[r], call.k[r], call.v[r], scale=call.scale, q_image=q_image, k_image=k_image,
                member=plan.member, isolate=plan.isolate, references=plan.references.get(r, ()),
                mutual=plan.mutual.get(r, ()), mutual_weight=plan.mutual_weight)
    return plan.out


# families whose self-attention runs over a video token grid (t, h, w): image masks of subjects
# do not describe moving subjects, so the isolation controls refuse them rather than act on nothing
VIDEO_FAMILIES = ("wan", "hunyuan_video")


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

    The isolated rows are computed by :func:`scene_attention` (queries grouped by subject, one
    dense call per group over its allowed keys): no Nq × Nk mask is built.

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
        self._grids: dict = {}  # grid -> bool [S, L]; the same at every call of a resolution

    def on_attach(self, engine) -> None:
        video = sorted({s.family for s in engine.sites} & set(VIDEO_FAMILIES))
        if video:
            raise ControlError(
                f"IsolationAttention isolates subjects inside an image's token grid; this model's family {video[0]} "
                f"attends over a video (frames x rows x columns), where subjects move and one [S, H, W] mask per "
                f"subject does not hold. Use it on SD1.5 / SDXL, SD3 or FLUX pipelines")

    def edit_qkv(self, call) -> None:
        grid = _image_grid(call)
        if grid is None or self.masks.shape[0] < 2:
            return  # no image block, or one subject: nothing to isolate (the call stays exact)
        member = _grid_masks(self.masks, grid, self._grids).to(call.q.device)
        chosen = self.rows(call).tolist()  # [B] bools
        rows = [scene for _, scene in scene_rows(call, self.references) if chosen[scene]]
        plan = _plan(call)
        plan.merge(member, rows)
        plan.isolate = True

    def edit_output(self, call, out):
        return _run_plan(call, out)

    def __repr__(self):
        return f"IsolationAttention(subjects={self.masks.shape[0]}, steps={self.steps!r}, branches={self.branches!r})"


REPOSITION_FAMILIES = ("unet", "sd3")  # no RoPE inside attention: moved tokens keep valid positions


class RepositionAttention(Control):
    """IR-Diffusion's reposition attention alone: the scene row also attends to each reference
    subject's keys and values, moved onto the scene subject's place (:func:`reposition`).

    The batch holds, per CFG branch, S reference rows then the scene row (``[ref_1 … ref_S,
    scene] × (uncond, cond)``, as :class:`~diffattn.pipelines.IRDiffusionPipeline` builds it). For a scene
    query p and reference block i, key j is allowed iff p lies in subject i's scene mask after
    a fresh per-step Bernoulli dropout (``dropout``, ConsiStory's 0.5) and j in the moved
    reference mask; background and text queries see only the scene's own keys; the reference
    rows attend as stock (their own call, untouched).

    Why K and V may be moved after the projections: ``to_k`` / ``to_v`` and the q/k norms act
    per token, so moving projected tokens equals projecting moved hidden states on every key
    the mask allows (the zero canvas' cells are never attended). Where the family applies RoPE
    inside attention (FLUX), the moved keys carry their origin's rotation: they are turned to
    their new positions through ``call.rope.relocate`` (R(θ_p)R(θ_s)⁻¹ = R(θ_p − θ_s)); values
    carry no rotation. Wan's processor gives no relocation: refused.

    ref_masks, scene_masks: [S, H, W] regions (any resolution, resized per call);
    dropout: p of the per-step mask dropout; seed: its draws (step i from ``seed`` and i);
    move:    False keeps the reference tokens where they are (masked by R_i): the
             "extended K/V only" ablation (ConsiStory-style subject-driven shared attention).
    mutual:  λ of the masked mutual cross-attention to each reference's prompt (0: off), at
             the joint sites of MMDiT families; on UNets use :class:`MutualCrossAttention`.
    extend:  False adds no reference image keys, only the mutual cross-attention (the
             "mutual only" ablation on MMDiT families).
    """

    order = 0

    def __init__(self, ref_masks, scene_masks, *, dropout: float = 0.5, seed: int = 0, move: bool = True,
                 mutual: float = 0.0, extend: bool = True, sites=None, steps=None, order: int | None = None):
        r, t = torch.as_tensor(ref_masks).float(), torch.as_tensor(scene_masks).float()
        if r.dim() != 3 or t.dim() != 3 or r.shape[0] != t.shape[0] or r.shape[0] < 1:
            raise ControlError(f"RepositionAttention masks of shapes {tuple(r.shape)} and {tuple(t.shape)}: give "
                               f"[S, H, W] each, one reference region and one scene region per subject")
        if not 0.0 <= dropout < 1.0:
            raise ControlError(f"RepositionAttention dropout={dropout!r}: in [0, 1)")
        if not 0.0 <= mutual <= 1.0:
            raise ControlError(f"RepositionAttention mutual={mutual!r}: the mutual cross-attention weight λ, in [0, 1]")
        super().__init__(sites=sites if sites is not None else (lambda s: s.kind in ISOLATED_KINDS), steps=steps,
                         order=order)
        self.ref_masks, self.scene_masks, self.dropout, self.seed = r, t, float(dropout), int(seed)
        self.move, self.mutual, self.extend = bool(move), float(mutual), bool(extend)
        self._grids: dict = {}  # grid -> the reference masks there (fixed by the control's masks)
        self._scene_grids: dict = {}  # grid -> the scene masks there

    @property
    def subjects(self) -> int:
        return self.ref_masks.shape[0]

    def groups(self, call) -> list[tuple[list[int], int]]:
        """(reference rows, scene row) of each CFG branch of the call's batch."""
        if not self.subjects:
            return []
        return scene_rows(call, self.subjects)

    def edit_qkv(self, call) -> None:
        family = getattr(call.context, "family", "")
        rope = call.rope if self.move else None  # keys left in place keep their own positions' rotation
        if family and family not in REPOSITION_FAMILIES and call.rope is None:
            raise ControlError(f"RepositionAttention on {family}: RoPE is applied inside its attention and its "
                               f"processor gives no way to re-rotate moved keys; supported: "
                               f"{', '.join(REPOSITION_FAMILIES)} and FLUX")
        grid = _image_grid(call)
        if grid is None:
            return
        lay = call.layout
        seg = lay.k("image")
        n, heads = len(seg), call.k.shape[1]
        ref = _grid_masks(self.ref_masks, grid, self._grids).reshape(self.subjects, *grid).to(call.q.device)
        scene = _grid_masks(self.scene_masks, grid, self._scene_grids).reshape(self.subjects, *grid).to(call.q.device)
        step = call.step.index if call.step is not None else 0
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # the same draw at every layer of a step
        dropped = [mask_dropout(m, self.dropout, gen).reshape(-1) for m in scene]  # [L] each
        origin = torch.arange(n, dtype=torch.float64, device=call.q.device)[:, None]  # [L, 1] token indices
        sources = [reposition(origin, grid, ref[i], scene[i])[0][:, 0].round().long() if rope is not None else None
                   for i in range(self.subjects)]  # per subject, the origin of each canvas cell
        plan = _plan(call)
        groups = self.groups(call)
        plan.merge(scene.reshape(self.subjects, -1), [t for _, t in groups])
        text = lay.k("text").slice if self.mutual and lay.has_k("text") else None
        for refs, target in groups:
            blocks, mutual = [], []
            for i in range(self.subjects):
                def moved(x):  # [H, L, D] of reference i -> its tokens moved onto subject i's scene box
                    flat = x[:, seg.slice].permute(1, 0, 2).reshape(n, -1)  # [L, H·D]
                    if self.move:
                        canvas, m = reposition(flat, grid, ref[i], scene[i])
                    else:  # in place: the reference subject's own tokens, nothing else
                        canvas, m = flat * ref[i].reshape(-1, 1).to(flat.dtype), ref[i]
                    return canvas.reshape(n, heads, -1).permute(1, 0, 2), m.reshape(-1)  # [H, L, D], [L]
                kk, key_mask = moved(call.k[refs[i]])
                if rope is not None:  # rotated at the reference's positions: turn them to the scene box's
                    kk = rope.relocate(kk, seg.slice, sources[i])
                vv, _ = moved(call.v[refs[i]])
                blocks.append((kk, vv, key_mask, dropped[i]))
                if text is not None:
                    mutual.append((call.k[refs[i], :, text], call.v[refs[i], :, text]))
            if self.extend:
                plan.references[target] = blocks
            if mutual:
                plan.mutual[target] = mutual
                plan.mutual_weight = self.mutual

    def edit_output(self, call, out):
        return _run_plan(call, out)

    def __repr__(self):
        return (f"RepositionAttention(subjects={self.subjects}, dropout={self.dropout:g}, move={self.move}, "
                f"steps={self.steps!r})")


class MutualCrossAttention(Control):
    """IR-Diffusion's masked mutual cross-attention (inherited from DreamStory) at UNet
    cross-attention: a scene query of subject i also attends to reference i's prompt,
    ``out = (1 − λ)·out + λ·attention(q, [scene text; reference i's text])`` (λ = ``weight``,
    the official 0.9); background queries and the reference rows are untouched.

    scene_masks: [S, H, W]; batch ``[ref_1 … ref_S, scene] × CFG`` (S = ``scene_masks``' S).
    On MMDiT families the text keys are part of joint attention: use
    ``RepositionAttention(..., mutual=λ)`` there.
    """

    order = 0

    def __init__(self, scene_masks, *, weight: float = 0.9, sites="cross", steps=None, order: int | None = None):
        t = torch.as_tensor(scene_masks).float()
        if t.dim() != 3 or t.shape[0] < 1:
            raise ControlError(f"MutualCrossAttention scene_masks of shape {tuple(t.shape)}: give [S, H, W]")
        if not 0.0 <= weight <= 1.0:
            raise ControlError(f"MutualCrossAttention weight={weight!r}: λ in [0, 1]")
        super().__init__(sites=sites, steps=steps, order=order)
        self.scene_masks, self.weight = t, float(weight)
        self._grids: dict = {}

    def edit_output(self, call, out):
        lay = call.layout
        if not (lay.has_q("image") and lay.has_k("text")) or lay.has_k("image") or lay.q("image").shape is None:
            return out  # cross-attention only (image queries, text keys)
        grid = tuple(lay.q("image").shape)
        member = _grid_masks(self.scene_masks, grid, self._grids).to(call.q.device)  # [S, L]
        s = member.shape[0]
        q_image = lay.q("image").slice
        out = out.clone()
        for refs, target in scene_rows(call, s):
            mutual = [(call.k[r], call.v[r]) for r in refs]
            for i in range(s):
                rows = torch.nonzero(member[i] & ~(member.sum(0) > 1)).flatten() + q_image.start  # [n_i] queries
                if rows.numel() == 0:
                    continue
                qq = call.q[target][None, :, rows]  # [1, H, n_i, D]
                kk = torch.cat([call.k[target], mutual[i][0]], 1)[None]  # [1, H, 2T, D]
                vv = torch.cat([call.v[target], mutual[i][1]], 1)[None]
                o = attention(qq, kk, vv, scale=call.scale)[0]
                out[target][:, rows] = (1 - self.weight) * out[target][:, rows] + self.weight * o
        return out

    def __repr__(self):
        return f"MutualCrossAttention(subjects={self.scene_masks.shape[0]}, weight={self.weight:g})"


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
