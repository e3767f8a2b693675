"""Rectified SpaAttn: rectified block-sparse self-attention for video and high-resolution DiTs.

Liu et al., "Rectified SpaAttn: Revisiting Attention Sparsity for Efficient Video Generation"
(arXiv 2511.19835). Block-sparse attention computes ``o^sparse = Σ_{j∈C} p_ij v_j / R_i`` over
the selected (critical) key blocks C only; the exact output is ``R_i·o^sparse + Σ_{j∉C} p_ij v_j``.
Rectified SpaAttn estimates R (IPAR: cluster-size-weighted pooled attention, text keys
isolated) and the lost term (GAPR: pooled-V compensation where the pooled estimate passes a
gain-versus-error test) from mean-pooled blocks, so ``O = R ⊙ O_sparse + comp``. The math is in
:mod:`diffattn.kernels.sparse`; the kernels are ``diffattn.kernels.attention`` with a
:class:`~diffattn.kernels.BlockSparsePlan` (Triton LUT kernel on CUDA, gathered blocks on CPU).

What this module adds is the layout side, per attention call:

- **locality order** (:func:`tiled_order`): blocks of ``block_size`` consecutive tokens are only
  worth selecting if they are spatially compact. The video / image tokens are reordered tile by
  tile over their latent grid (t, h, w) / (h, w) (tiles of ``block_size`` tokens), text tokens
  go last (as the official FLUX and HunyuanVideo code), per call after RoPE (so RoPE needs no
  permutation), and the output is inverse-permuted. The layout's segments decide, not
  positions: FLUX's text comes first in the model's sequence, HunyuanVideo's last; both end up
  after the grid. Attention is permutation-equivariant, so with every block selected the result
  equals dense attention exactly.
- **static blocks** (:func:`neighbour_blocks`): the blocks holding a 26-neighbour (8 in 2-D) of
  a block's tokens; Wan's first-frame blocks attend to each other; text key blocks are always
  attended to and text query blocks attend densely.
- **masked keys** (:func:`live_keys`, :func:`row_key_mask`): keys the call's mask hides from every
  query of every row (HunyuanVideo's padded text, placed last by the reorder) are cut from the
  keys, so the plan neither pools nor isolates them and, with nothing else masked, the call
  needs no bias. Keys masked for some rows only (a batch of prompts of different lengths) stay
  as a per-row key mask: the plan pools each row over its own live keys (masked keys leave the
  pooled means and IPAR's cluster sizes; a block a row masks entirely is never selected for it
  and adds no compensation) and the sparse kernels apply the mask inside the selected blocks,
  so every row equals that prompt run alone. A float bias or a query-dependent mask (another
  control's edit) keeps the masked reference; in ``"rectified"`` mode it is refused, since the
  pooled statistics cannot honour it.
- **schedule**: dense warm-up by layer and step, defaults of the official scripts (Wan2.1 T2V:
  layers 0-1 and the first 5 denoising steps dense (its 10 processor calls, CFG's two passes
  each); Wan I2V: layers 0-1; FLUX: processors 37 and above dense (the last 20 of FLUX.1's 57),
  no step warm-up; HunyuanVideo: no warm-up at all, every dual- and single-stream block sparse,
  the token refiner dense (it has no site)), drop rate 0.75 (Wan) / 0.9 (FLUX) / 0.8
  (HunyuanVideo), p_remain 0.3, blocks of 128.
- **modes** for ablation: ``"rectified"``; ``"vanilla"`` (the same top-k + neighbour + text
  blocks, R = 1, comp = 0: plain block-sparse attention); ``"random"`` (top-k uniformly random
  blocks instead of the scored ones, same neighbour and text blocks, equal budget).

Attach to a ``WanPipeline`` (self-attention ``attn1``), a ``FluxPipeline`` or a
``HunyuanVideoPipeline`` (joint and single blocks)::

    with da.attach(pipe, da.RectifiedSparseAttention(drop=0.75)):
        video = pipe(prompt, num_frames=81).frames
"""
from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence

import torch

from ..controls import AttentionCall, Control, StepWindow
from ..errors import ConfigError, ControlError, LayoutError
from ..kernels.sparse import MIN_TILE, MODES, block_sparse_plan

__all__ = ["RectifiedSparseAttention", "tiled_order", "default_tile", "neighbour_blocks", "live_keys",
           "row_key_mask", "FAMILY_DEFAULTS"]

# official scripts (scripts/main_*.py, Inference.md): drop rate, dense layers, dense denoising steps
FAMILY_DEFAULTS = {
    "wan": dict(drop=0.75, dense_layers=range(0, 2), dense_steps=5),
    "wan_i2v": dict(drop=0.75, dense_layers=range(0, 2), dense_steps=0),
    "flux": dict(drop=0.9, dense_layers=range(37, 1 << 30), dense_steps=0),
    "hunyuan_video": dict(drop=0.8, dense_layers=range(0, 0), dense_steps=0),  # no warm-up (main_hunyuan.py)
}
SPARSE_KINDS = {"wan": ("self",), "flux": ("joint", "single"), "hunyuan_video": ("joint", "single")}


# ----------------------------------------------------------------------------- layout math


def default_tile(block_size: int, ndim: int) -> tuple[int, ...]:
    """A tile of ``block_size`` tokens over a ``ndim``-D grid (powers of two): (h, w) as square as
    possible, w the larger; in 3-D a second frame joins from 128 tokens on (128 -> (2, 8, 8),
    64 -> (1, 8, 8), 16 -> (1, 4, 4)). Raises :class:`ConfigError` for other block sizes."""
    n = int(math.log2(block_size)) if block_size > 0 else -1
    if block_size <= 0 or 2 ** n != block_size:
        raise ConfigError(f"block_size={block_size}: the default tile needs a power of two; give tile=(t, h, w) "
                          f"(or (h, w)) whose product is block_size")
    t_bits = max(0, n - 6) if ndim == 3 else 0
    rest = n - t_bits
    hw = (2 ** (rest // 2), 2 ** (rest - rest // 2))
    return ((2 ** t_bits,) + hw) if ndim == 3 else hw


def tiled_order(shape: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """Locality-preserving token order over a row-major grid: tile by tile (tiles in row-major
    order), row-major inside a tile. Edge tiles are partial. Stands in for the Gilbert curve of
    the official code (Jenga), with the same purpose: consecutive tokens are spatial neighbours.

    shape (t, h, w) or (h, w), tile of the same rank -> LongTensor [prod(shape)]: ``perm[i]`` is the
    row-major index of the token placed at position i.
    """
    shape, tile = tuple(int(s) for s in shape), tuple(min(int(t), int(s)) for t, s in zip(tile, shape))
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, len(shape))
    tiles = [-(-s // t) for s, t in zip(shape, tile)]
    tile_id = torch.zeros(coords.shape[0], dtype=torch.long)
    within = torch.zeros(coords.shape[0], dtype=torch.long)
    for d in range(len(shape)):  # row-major ids of the tile and of the position inside it
        tile_id = tile_id * tiles[d] + coords[:, d] // tile[d]
        within = within * tile[d] + coords[:, d] % tile[d]
    return (tile_id * math.prod(tile) + within).argsort()


def neighbour_blocks(block_of: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Blocks of the 3^d - 1 neighbourhood (26 in 3-D, 8 in 2-D; Jenga's block neighbour map):
    block j neighbours block i when a token of i has a grid neighbour in j (i itself included).

    block_of: LongTensor of the grid's shape, the block of each grid cell -> bool [NB, NB].
    """
    m = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    nd = block_of.dim()
    for off in itertools.product((-1, 0, 1), repeat=nd):
        a = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(off, block_of.shape))
        b = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(off, block_of.shape))
        m[block_of[a].reshape(-1), block_of[b].reshape(-1)] = True
    return m


class _Static:
    """What a call's layout fixes (cached per layout): the permutation, its inverse, and the
    static block structure. Tensors on CPU; moved to the call's device once."""

    def __init__(self, perm, pooled, forced, dense_rows, extra, n_video_blocks):
        self.perm, self.inv = perm, perm.argsort()
        self.pooled, self.forced, self.dense_rows, self.extra = pooled, forced, dense_rows, extra
        self.n_video_blocks = n_video_blocks
        self._dev: dict = {}

    def on(self, device) -> tuple[torch.Tensor, ...]:
        key = str(device)
        if key not in self._dev:
            self._dev[key] = tuple(None if t is None else t.to(device) for t in
                                   (self.perm, self.inv, self.pooled, self.forced, self.dense_rows, self.extra))
        return self._dev[key]


def static_layout(layout, block_size: int, tile: Sequence[int] | None, *, neighbours: bool = True,
                  first_frame: bool = False) -> _Static:
    """The static part of a self / joint call's plan from its :class:`~diffattn.layout.TokenLayout`.

    Grid segments (a video (t, h, w) or image (h, w) shape) are tiled (:func:`tiled_order`) and
    placed first, in layout order; the other segments (text) follow, unpermuted, and are
    isolated IPAR keys, forced key blocks and dense query blocks.
    """
    n = layout.n_query
    grids = [s for s in layout.query if s.shape is not None and len(s.shape) in (2, 3)]
    if not grids:
        raise LayoutError(f"RectifiedSparseAttention needs a video (t, h, w) or image (h, w) token grid; this call's "
                          f"segments are {[s.name for s in layout.query]} with no grid (the family records none, or "
                          f"the latent grid of this forward is unknown)")
    parts, grid_pos = [], []
    pos = 0
    for seg in grids:
        t = tuple(tile) if tile is not None else default_tile(block_size, len(seg.shape))
        if len(t) != len(seg.shape):
            raise ConfigError(f"tile={tuple(tile)} has {len(t)} dims but segment {seg.name!r} is a "
                              f"{len(seg.shape)}-D grid {seg.shape}; give a tile of matching rank")
        order = tiled_order(seg.shape, t)
        parts.append(order + seg.start)
        grid_pos.append((seg, order, pos))
        pos += len(seg)
    others = [torch.arange(s.start, s.stop) for s in layout.query if s not in grids]
    covered = sum(len(s) for s in layout.query)
    if covered != n:  # tokens in no segment: keep them with the text
        seen = torch.zeros(n, dtype=torch.bool)
        for s in layout.query:
            seen[s.slice] = True
        others.append((~seen).nonzero().flatten())
    perm = torch.cat(parts + others)  # [N]
    nb = -(-n // block_size)
    pooled = torch.zeros(n, dtype=torch.bool)
    pooled[:pos] = True  # grid tokens, in the new order
    text_blocks = torch.zeros(nb, dtype=torch.bool)
    if pos < n:
        text_blocks[pos // block_size:] = True
    extra = torch.zeros(nb, nb, dtype=torch.bool)
    for seg, order, start in grid_pos:
        new_pos = torch.empty(len(seg), dtype=torch.long)
        new_pos[order] = torch.arange(len(seg)) + start  # grid cell (row-major) -> position in the new order
        block_of = (new_pos // block_size).view(seg.shape)  # [t, h, w] / [h, w]: the block of each cell
        if neighbours:
            extra |= neighbour_blocks(block_of, nb)
        if first_frame and len(seg.shape) == 3:
            ff = torch.zeros(nb, dtype=torch.bool)
            ff[block_of[0].reshape(-1)] = True
            extra |= ff.view(-1, 1) & ff.view(1, -1)  # [NB, NB]
    n_video = int(math.ceil(pos / block_size)) if pos else 0
    return _Static(perm, pooled if pos < n else None, text_blocks, text_blocks.clone(), extra, n_video)


def live_keys(bias: torch.Tensor, n_key: int) -> tuple[int, bool]:
    """``(n, unmasked)`` of a bias or boolean mask broadcastable to ``[B, H, Nq, Nk]``.

    Keys ``[n, Nk)`` are hidden from every query of every row and head (False, or -inf), so
    cutting them from the call changes no output (their softmax weight is 0 everywhere);
    ``unmasked``: the first ``n`` keys are all visible with no bias (a boolean all True, or a
    float 0), so the cut call needs no bias at all. HunyuanVideo's prompt padding is such a tail
    once the reorder puts the text last (the official code leaves it out of the sparse kernel
    through cu_seqlens). A bias broadcast over the keys, or one hiding every key, is kept whole
    (``(Nk, False)``). One host read per call (two for a float bias).
    """
    visible = bias if bias.dtype == torch.bool else bias > float("-inf")
    if visible.shape[-1] != n_key:
        return n_key, False
    flat = visible.reshape(-1, n_key)  # [B·H·Nq (broadcast ones), Nk]
    seen = torch.stack([flat.any(0), flat.all(0)]).cpu()  # [2, Nk]: any / every query sees the key
    alive = seen[0].nonzero()
    if not alive.numel():
        return n_key, False
    n = int(alive[-1]) + 1
    unmasked = bool(seen[1, :n].all()) and (bias.dtype == torch.bool or bool((bias[..., :n] == 0).all()))
    return n, unmasked


def row_key_mask(bias: torch.Tensor, n_key: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(rest, key_mask)`` of a bias broadcastable to ``[B, H, Nq, Nk]`` that :func:`live_keys`
    left in place: ``key_mask`` bool ``[B|1, H|1, Nk]``, the keys each batch row (and head) may
    attend to (those some query of the row sees), which the plan's per-row pooled statistics
    use; ``rest`` is ``None`` when the bias is nothing but that key mask (a boolean or a 0 / -inf
    float bias broadcast over the queries: the sparse kernels then apply it), else the bias
    itself, which the call must keep (the masked reference runs it). One host read for a float
    bias.
    """
    visible = bias if bias.dtype == torch.bool else bias > float("-inf")
    v4 = visible.reshape((1,) * (4 - visible.dim()) + tuple(visible.shape))  # [B|1, H|1, Nq|1, Nk|1]
    key_mask = v4.any(-2).expand(*v4.shape[:2], n_key)  # [B|1, H|1, Nk]
    pure = v4.shape[-2] == 1 and v4.shape[-1] == n_key and (bias.dtype == torch.bool or bool(
        ((bias == 0) | ~visible).all()))
    return (None if pure else bias), key_mask


# ----------------------------------------------------------------------------- the control


def _check_drop(drop) -> float | None:
    if drop is None:
        return None
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not (0.0 <= float(drop) < 1.0):
        raise ConfigError(f"drop={drop!r}: the fraction of key blocks to skip must lie in [0, 1) (0 = every block "
                          f"computed; the official defaults are 0.75 for Wan, 0.9 for FLUX, 0.8 for HunyuanVideo)")
    return float(drop)


def _check_block(block_size) -> int:
    if (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < MIN_TILE
            or block_size % MIN_TILE):
        raise ConfigError(f"block_size={block_size!r}: blocks must be a positive multiple of {MIN_TILE} tokens (the "
                          f"kernels' smallest tile); the official value is 128")
    return block_size


def _layers(value, name: str):
    """``None`` (family default), an int n (the first n layers) or layer indices."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: give a number of leading layers or a list of layer indices")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}={value}: must not be negative")
        return range(0, value)
    try:
        idx = [int(i) for i in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: give a number of leading layers or a list of layer indices") from None
    return frozenset(idx)


class RectifiedSparseAttention(Control):
    """Rectified block-sparse self-attention (Rectified SpaAttn) on Wan, FLUX and HunyuanVideo.

    drop:         fraction of the video / image key blocks each query block skips, in [0, 1)
                  (``None``: the family's default, Wan 0.75, FLUX 0.9, HunyuanVideo 0.8); the budget is
                  ``top_k = int((1 - drop) · video blocks)`` plus neighbour and text blocks.
    mode:         ``"rectified"`` (IPAR + GAPR), ``"vanilla"`` (no rectification) or
                  ``"random"`` (random blocks at the same budget); ablation modes.
    block_size:   tokens per query and key block (a multiple of 16; official 128).
    p_remain:     the cumulative pooled mass a query block keeps at least (official 0.3).
    dense_layers: layers that stay dense: an int n (the first n) or layer indices, counted over
                  this control's sites in forward order, per denoiser (``None``: the family's
                  default).
    dense_steps:  the first denoising steps that stay dense (``None``: the family's default).
    tile:         the locality tile (t, h, w) or (h, w), product ``block_size`` (``None``:
                  :func:`default_tile`).
    neighbours:   add the grid-neighbour blocks of each block (official: yes).
    first_frame:  Wan: the first frame's blocks attend to each other (``None``: on for Wan).
    seed:         the ``"random"`` mode's seed (each call draws from (seed, step, site)).
    sites:        ``"auto"`` (Wan ``attn1``, FLUX and HunyuanVideo joint and single blocks) or a
                  selector.
    heads, branches: as every control; other heads and rows stay dense.
    steps:        replaces the warm-up window (``dense_steps``) when given.
    """

    order = 95  # last to edit the spec (it reorders q, k, v and the bias), first to see the output

    def __init__(self, drop: float | None = None, *, mode: str = "rectified", block_size: int = 128,
                 p_remain: float = 0.3, dense_layers=None, dense_steps: int | None = None,
                 tile: Sequence[int] | None = None, neighbours: bool = True, first_frame: bool | None = None,
                 seed: int = 0, sites="auto", heads="all", branches=None, steps=None):
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: choose one of {MODES}")
        self.drop = _check_drop(drop)
        self.block_size = _check_block(block_size)
        if tile is not None:
            tile = tuple(int(t) for t in tile)
            if len(tile) not in (2, 3) or min(tile) < 1 or math.prod(tile) != block_size:
                raise ConfigError(f"tile={tile}: give (t, h, w) or (h, w) positive sizes whose product is "
                                  f"block_size={block_size}")
        if not 0.0 <= float(p_remain) <= 1.0:
            raise ConfigError(f"p_remain={p_remain!r} must lie in [0, 1]")
        if dense_steps is not None and (isinstance(dense_steps, bool) or not isinstance(dense_steps, int)
                                        or dense_steps < 0):
            raise ConfigError(f"dense_steps={dense_steps!r}: give a number of leading denoising steps (>= 0)")
        self.mode, self.p_remain, self.tile, self.seed = mode, float(p_remain), tile, int(seed)
        self.neighbours, self.first_frame = bool(neighbours), first_frame
        self.dense_layers, self.dense_steps = _layers(dense_layers, "dense_layers"), dense_steps
        self.site_spec = sites
        self._user_steps = steps
        super().__init__(sites=self._site_filter, heads=heads, steps=steps, branches=branches)
        self._plan_sites: dict[str, tuple[int, str]] = {}  # site name -> (layer index, family key)
        self._static: dict = {}

    # ------------------------------------------------------------------ attach
    def _site_filter(self, site) -> bool:
        return site.name in self._plan_sites

    def on_attach(self, engine) -> None:
        super().on_attach(engine)
        from ..sites import select

        all_sites = engine.sites
        families = {s.family for s in all_sites}
        unsupported = sorted(families - set(SPARSE_KINDS))
        if isinstance(self.site_spec, str) and self.site_spec == "auto":
            if unsupported:
                raise ControlError(f"RectifiedSparseAttention knows the video / image self-attention of "
                                   f"{', '.join(SPARSE_KINDS)}; this model's family {', '.join(unsupported)} has no "
                                   f"such layout (pass sites= to pick the Wan / FLUX / HunyuanVideo sites of a "
                                   f"mixed model)")
            chosen = [s for s in all_sites if s.kind in SPARSE_KINDS[s.family]]
        else:
            chosen = [s for s in all_sites if self.site_spec(s)] if callable(self.site_spec) else select(
                all_sites, self.site_spec)
            bad = [s.name for s in chosen if s.kind not in SPARSE_KINDS.get(s.family, ())]
            if bad:
                raise ControlError(f"RectifiedSparseAttention acts on the self-attention of Wan and the joint / single "
                                   f"blocks of FLUX and HunyuanVideo (a video / image token grid); {bad[:3]} are not "
                                   f"such sites")
        i2v = any(s.kind == "cross" and getattr(s.module, "add_k_proj", None) is not None for s in all_sites)
        per_denoiser: dict = {}
        self._plan_sites = {}
        for s in chosen:
            layer = per_denoiser.setdefault(s.denoiser, itertools.count())
            key = "wan_i2v" if (s.family == "wan" and i2v) else s.family
            self._plan_sites[s.name] = (next(layer), key)
        if self._user_steps is None:
            keys = {k for _, k in self._plan_sites.values()}
            steps = self.dense_steps if self.dense_steps is not None else max(
                (FAMILY_DEFAULTS[k]["dense_steps"] for k in keys), default=0)
            self.steps = StepWindow(start=steps) if steps else None

    def on_detach(self, engine) -> None:
        super().on_detach(engine)
        self._plan_sites, self._static = {}, {}

    def settings(self, site_name: str) -> dict:
        """The drop rate, dense layers and first-frame flag in force at an attached site."""
        layer, key = self._plan_sites[site_name]
        d = FAMILY_DEFAULTS[key]
        dense = self.dense_layers if self.dense_layers is not None else d["dense_layers"]
        return dict(layer=layer, drop=self.drop if self.drop is not None else d["drop"], dense=layer in dense,
                    first_frame=self.first_frame if self.first_frame is not None else key.startswith("wan"))

    def is_active(self, call: AttentionCall) -> bool:
        return (call.part == "main" and call.site.name in self._plan_sites
                and not self.settings(call.site.name)["dense"] and super().is_active(call))

    # ------------------------------------------------------------------ per call
    def _layout_static(self, call: AttentionCall, first_frame: bool) -> _Static:
        layout = call.layout
        if layout.query != layout.key:
            raise LayoutError(f"RectifiedSparseAttention needs self or joint attention (the same query and key tokens) "
                              f"at {call.site.name}; got query {layout.names[0]}, keys {layout.names[1]}")
        key = (layout.query, self.block_size, self.tile, first_frame)
        got = self._static.get(key)
        if got is None:
            got = self._static[key] = static_layout(layout, self.block_size, self.tile, neighbours=self.neighbours,
                                                    first_frame=first_frame)
        return got

    def edit_spec(self, call: AttentionCall) -> None:
        if call.spec.sparse is not None:
            raise ControlError(f"two controls set a block-sparse plan at {call.site.name}; one per call is supported")
        cfg = self.settings(call.site.name)
        st = self._layout_static(call, cfg["first_frame"])
        perm, inv, pooled, forced, dense_rows, extra = st.on(call.q.device)
        call.q, call.k, call.v = (x.index_select(2, perm) for x in (call.q, call.k, call.v))  # [B, H, N, D] reordered
        bias, key_mask = call.spec.bias, None
        if bias is not None:
            n = perm.numel()
            if bias.dim() >= 2 and bias.shape[-2] == n:
                bias = bias.index_select(-2, perm)
            if bias.dim() >= 1 and bias.shape[-1] == n:
                bias = bias.index_select(-1, perm)
            n_key, unmasked = live_keys(bias, call.k.shape[2])
            if n_key < n:  # keys no query sees (HunyuanVideo's padded text, last after the reorder): cut
                call.k, call.v = call.k[:, :, :n_key], call.v[:, :, :n_key]  # [B, H, n_key, D]
                bias = bias[..., :n_key]
                nkb = -(-n_key // self.block_size)
                forced, extra = forced[:nkb], extra[:, :nkb]  # [NK'], [NQ, NK']
                pooled = pooled[:n_key] if pooled is not None else None
            if unmasked:
                bias = None
            else:  # keys masked for some rows only (prompts of different lengths in one batch)
                bias, key_mask = row_key_mask(bias, n_key)
            call.spec.bias = bias if bias is not None else (
                None if key_mask is None else key_mask.unsqueeze(-2))  # [B|1, H|1, 1, Nk]: the kernels' key mask
        b, h = call.q.shape[:2]
        heads, rows = self.head_mask(call), self.rows(call)
        if not bool(heads.all()) or not bool(rows.all()):  # other heads / rows stay dense
            extra = extra.view(1, 1, *extra.shape) | ~heads.view(1, h, 1, 1) | ~rows.view(b, 1, 1, 1)  # [B, H, NB, NB]
        top_k = int((1.0 - cfg["drop"]) * st.n_video_blocks)
        if bias is not None and self.mode == "rectified" and top_k < st.n_video_blocks:
            raise ControlError(
                f"RectifiedSparseAttention(mode='rectified') at {call.site.name}: the call carries a float bias or a "
                f"mask that differs between queries (another control's edit), which the pooled block statistics "
                f"behind R and the compensation cannot honour (they honour key masks such as padded prompts, per "
                f"batch row); drop that control's bias or use mode='vanilla'")
        gen = None
        if self.mode == "random":
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{call.step.index}:{call.site.name}".encode()))
        call.spec.sparse = block_sparse_plan(call.q, call.k, call.v, block_q=self.block_size, top_k=top_k,
                                             p_remain=self.p_remain, scale=call.scale, mode=self.mode,
                                             forced_keys=forced, dense_queries=dense_rows, extra=extra,
                                             pooled_keys=pooled, key_mask=key_mask, generator=gen)
        call.scratch[id(self)] = inv

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        inv = call.scratch.get(id(self))
        return out if inv is None else out.index_select(2, inv)  # [B, H, N, D] back in the model's order

    def __repr__(self):
        return (f"RectifiedSparseAttention(drop={self.drop}, mode={self.mode!r}, block_size={self.block_size}, "
                f"p_remain={self.p_remain}, dense_layers={self.dense_layers!r}, dense_steps={self.dense_steps}, "
                f"sites={self.site_spec!r})")
