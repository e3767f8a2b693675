"""The kernel spec: everything one attention call must do beyond softmax(q kᵀ·scale) v, as one object.

``diffattn.kernels.attention(q, k, v, spec=KernelSpec(...))`` takes it whole, so a processor
hands the call's spec to the kernels without threading it field by field:

    KernelSpec(head_blend=None, bias=None, uniform_keys=None, sparse=None, return_lse=False)

- ``head_blend``, ``bias``, ``return_lse``: as the keyword arguments of
  :func:`diffattn.kernels.attention`;
- ``uniform_keys``: a :class:`SegmentUniform` (key positions, and optionally the batch rows
  and heads it applies to): segment-uniform attention (:mod:`diffattn.kernels.composite`);
- ``sparse``: a :class:`BlockSparsePlan`, which key blocks each query block attends to.

The control-level spec (:class:`diffattn.controls.AttentionSpec`) names key *segments*; the
processor resolves them to positions (:func:`diffattn.processors.base.kernel_spec`) and
builds this one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffattn.kernels.errors import KernelError

__all__ = ["BlockSparsePlan", "KernelSpec", "SegmentUniform", "lut_from_mask"]


def _shape(x) -> tuple:
    return tuple(x.shape)


@dataclass(eq=False)
class SegmentUniform:
    """Uniform logits over the keys ``index`` (UAM), keeping each query row's share of them.

    index: LongTensor [Ns] of key positions (the segment S);
    rows:  ``[B]`` bool batch rows it applies to (``None``: all rows);
    heads: ``[H]`` bool heads it applies to (``None``: all heads).
    Rows and heads outside get the plain attention. See
    :func:`diffattn.kernels.composite.segment_uniform_attention` for the formula.
    """

    index: torch.Tensor
    rows: torch.Tensor | None = None
    heads: torch.Tensor | None = None

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise :class:`KernelError` unless index, rows and heads fit q [B, H, Nq, D], k [B, H, Nk, D]."""
        b, h = q.shape[0], q.shape[1]
        idx = self.index
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise KernelError(f"uniform_keys.index must be a 1-D integer tensor of key positions (e.g. "
                              f"torch.arange(start, stop)); got {getattr(idx, 'dtype', type(idx).__name__)} "
                              f"of shape {_shape(idx) if isinstance(idx, torch.Tensor) else '?'}")
        if idx.device != k.device:
            raise KernelError(f"uniform_keys.index is on {idx.device} but k is on {k.device}; move it to k's device")
        for name, x, n in (("rows", self.rows, b), ("heads", self.heads, h)):
            if x is None:
                continue
            if not isinstance(x, torch.Tensor) or x.dtype != torch.bool or _shape(x) != (n,):
                raise KernelError(f"uniform_keys.{name} must be a [{n}] bool tensor (or None for all); got "
                                  f"{getattr(x, 'dtype', type(x).__name__)} "
                                  f"{_shape(x) if isinstance(x, torch.Tensor) else ''}")
            if x.device != q.device:
                raise KernelError(f"uniform_keys.{name} is on {x.device} but q is on {q.device}; move it to q's device")


def lut_from_mask(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A block selection as a compact LUT: the selected key blocks of each query block in
    ascending order, padded with -1 at the end, and their count.

    mask: bool ``[..., n_qblocks, n_kblocks]`` -> ``(lut int32 [..., n_qblocks, W], counts int32
    [..., n_qblocks])``. What the block-sparse kernels loop over (``for i < counts``). W is
    ``width``, else the largest count on CPU (one host read, free there) and ``n_kblocks``
    elsewhere (no host sync: the kernels stop at ``counts`` anyway).
    """
    nkb = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    cols = torch.arange(nkb, dtype=torch.int32, device=mask.device)
    keyed = torch.where(mask, cols, torch.full_like(cols, nkb))  # unselected columns sort last
    if width is None:
        width = int(counts.max()) if (mask.device.type == "cpu" and counts.numel()) else nkb
    width = max(min(width, nkb), 1)
    lut = keyed.topk(width, dim=-1, largest=False, sorted=True).values if width < nkb else keyed.sort(-1).values
    return torch.where(lut >= nkb, torch.full_like(lut, -1), lut), counts


@dataclass(eq=False)
class BlockSparsePlan:
    """Which key blocks each query block attends to (block-sparse attention, e.g. Rectified SpaAttn).

    Queries are cut into blocks of ``block_q`` rows and keys into blocks of ``block_k``
    columns (the last block of each may be short: ``n_qblocks = ceil(Nq / block_q)``,
    ``n_kblocks = ceil(Nk / block_k)``). Give the selection as exactly one of:

    - ``mask``: bool ``[B|1, H|1, n_qblocks, n_kblocks]``, True = the query block attends to
      the key block;
    - ``lut``: integer ``[B|1, H|1, n_qblocks, max_sel]``, the selected key-block indices of
      each query block, padded with -1 (order and repeats do not matter).

    Semantics (exact, on every backend): attention restricted to the selected blocks, i.e.
    dense attention with the boolean token mask :meth:`token_mask` ANDed into the call's bias
    (a float bias gets -inf outside). Every block selected gives dense attention. A query row
    with no selected key (or none left by the bias) gets out = 0 and lse = -inf; a head blend
    still mixes in V on top of that. The reference executes the plan masked; the block-sparse
    kernels (:mod:`diffattn.kernels.sparse` on CPU, :mod:`diffattn.kernels.triton_sparse` on
    CUDA) visit only the selected blocks with the same result.

    Optional rectification (Rectified SpaAttn, Liu et al. 2025, ``O = R ⊙ O_sparse + comp``),
    per query block b and applied to every row of the block:

    - ``rescale``: floating ``[B|1, H|1, n_qblocks]``, R_b (IPAR's estimate of the selected mass);
    - ``comp``: floating ``[B|1, H|1, n_qblocks, D]``, the pooled-V compensation of GAPR.

    ``out = rescale_b · softmax_selected(q kᵀ) v + comp_b`` before any head blend (which then
    mixes in V as usual); the row LSE stays that of the selected keys (what taps see). Not
    combinable with ``uniform_keys``.

    ``compact=True`` promises that ``lut`` rows hold no repeats and -1 only as trailing padding
    (what :func:`diffattn.kernels.sparse.lut_from_mask` builds), so the kernels use it as is
    instead of normalising it first.
    """

    block_q: int
    block_k: int
    mask: torch.Tensor | None = None
    lut: torch.Tensor | None = None
    rescale: torch.Tensor | None = None
    comp: torch.Tensor | None = None
    compact: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise KernelError(f"BlockSparsePlan.{name} must be a positive int (tokens per block); got {val!r}")
        if (self.mask is None) == (self.lut is None):
            raise KernelError("BlockSparsePlan needs exactly one of mask= (bool [B|1, H|1, n_qblocks, n_kblocks]) "
                              "or lut= (int [B|1, H|1, n_qblocks, max_sel], -1 padded)")
        if self.mask is not None:
            m = self.mask
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.dim() != 4:
                raise KernelError(f"BlockSparsePlan.mask must be a 4-D bool tensor [B|1, H|1, n_qblocks, n_kblocks]; "
                                  f"got {getattr(m, 'dtype', type(m).__name__)} of "
                                  f"{m.dim() if isinstance(m, torch.Tensor) else '?'} dims "
                                  f"(convert a LUT with lut=...)")
        else:
            t = self.lut
            if (not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype.is_floating_point
                    or t.dtype.is_complex or t.dtype == torch.bool):
                raise KernelError(f"BlockSparsePlan.lut must be a 4-D integer tensor [B|1, H|1, n_qblocks, max_sel] "
                                  f"of key-block indices padded with -1; got {getattr(t, 'dtype', type(t).__name__)} "
                                  f"(a boolean block selection goes in mask=...)")

        for name in ("rescale", "comp"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point
                                  or t.dim() != (3 if name == "rescale" else 4)):
                want = "[B|1, H|1, n_qblocks]" if name == "rescale" else "[B|1, H|1, n_qblocks, D]"
                raise KernelError(f"BlockSparsePlan.{name} must be a floating tensor {want} (one value per query "
                                  f"block); got {getattr(t, 'dtype', type(t).__name__)} of "
                                  f"{t.dim() if isinstance(t, torch.Tensor) else '?'} dims")

    @property
    def rectified(self) -> bool:
        """Whether the plan carries a rectification (``rescale`` or ``comp``)."""
        return self.rescale is not None or self.comp is not None

    @property
    def blocks(self) -> torch.Tensor:
        """The selection as given (``mask`` or ``lut``)."""
        return self.mask if self.mask is not None else self.lut

    def n_blocks(self, nq: int, nk: int) -> tuple[int, int]:
        """(n_qblocks, n_kblocks) for Nq queries and Nk keys."""
        return -(-nq // self.block_q), -(-nk // self.block_k)

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise :class:`KernelError` unless the plan fits q [B, H, Nq, D] and k [B, H, Nk, D]."""
        b, h, nq = q.shape[:3]
        nqb, nkb = self.n_blocks(nq, k.shape[2])
        x = self.blocks
        what = "mask" if self.mask is not None else "lut"
        want = f"[{b}|1, {h}|1, {nqb}, {'max_sel' if what == 'lut' else nkb}]"
        if (x.shape[0] not in (1, b) or x.shape[1] not in (1, h) or x.shape[2] != nqb
                or (what == "mask" and x.shape[3] != nkb)):
            raise KernelError(f"BlockSparsePlan.{what} of shape {_shape(x)} does not fit this call: with "
                              f"block_q={self.block_q}, block_k={self.block_k}, Nq={nq}, Nk={k.shape[2]} it must be "
                              f"{want} (n_qblocks = ceil(Nq / block_q))")
        if x.device != q.device:
            raise KernelError(f"BlockSparsePlan.{what} is on {x.device} but q is on {q.device}; move it to q's device")
        for name, t in (("rescale", self.rescale), ("comp", self.comp)):
            if t is None:
                continue
            if (t.shape[0] not in (1, b) or t.shape[1] not in (1, h) or t.shape[2] != nqb
                    or (name == "comp" and t.shape[3] != q.shape[-1])):
                want = f"[{b}|1, {h}|1, {nqb}" + ("]" if name == "rescale" else f", {q.shape[-1]}]")
                raise KernelError(f"BlockSparsePlan.{name} of shape {_shape(t)} does not fit this call: it must be "
                                  f"{want} (one value per query block, n_qblocks = ceil(Nq / block_q))")
            if t.device != q.device:
                raise KernelError(f"BlockSparsePlan.{name} is on {t.device} but q is on {q.device}; move it to "
                                  f"q's device")
        if what == "lut" and x.numel() and not torch.compiler.is_compiling():  # a host sync: skipped under compile
            lo, hi = int(x.min()), int(x.max())
            if lo < -1 or hi >= nkb:
                raise KernelError(f"BlockSparsePlan.lut holds key-block indices in [{lo}, {hi}]; they must lie in "
                                  f"[0, {nkb - 1}] (n_kblocks = ceil(Nk / block_k)), with -1 as padding")

    def block_mask(self, nk: int) -> torch.Tensor:
        """The selection as bool [B|1, H|1, n_qblocks, n_kblocks] for Nk keys."""
        if self.mask is not None:
            return self.mask
        nkb = -(-nk // self.block_k)
        lut = self.lut.long()
        idx = torch.where(lut < 0, torch.full_like(lut, nkb), lut)  # padding -> a spare column, dropped below
        m = torch.zeros(lut.shape[:3] + (nkb + 1,), dtype=torch.bool, device=lut.device)
        m.scatter_(-1, idx, True)
        return m[..., :nkb]

    def compact_lut(self, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The selection as a compact LUT (:func:`lut_from_mask`): ``(lut int32 [B|1, H|1,
        n_qblocks, W], counts int32 [B|1, H|1, n_qblocks])``. A ``compact`` LUT is used as given."""
        if self.lut is not None and self.compact:
            lut = self.lut.to(torch.int32)
            return lut, (lut >= 0).sum(-1, dtype=torch.int32)
        return lut_from_mask(self.block_mask(nk))

    def rectify(self, out: torch.Tensor) -> torch.Tensor:
        """``rescale_b · out + comp_b`` on the rows of each query block b (the plan's
        rectification; ``out`` unchanged without one). out: [B, H, Nq, D] -> [B, H, Nq, D]."""
        if not self.rectified:
            return out
        nq = out.shape[-2]
        acc = torch.promote_types(out.dtype, torch.float32)
        res = out.to(acc)
        if self.rescale is not None:
            r = self.rescale.to(acc).repeat_interleave(self.block_q, dim=-1)[..., :nq]  # [B|1, H|1, Nq]
            res = res * r.unsqueeze(-1)
        if self.comp is not None:
            res = res + self.comp.to(acc).repeat_interleave(self.block_q, dim=-2)[..., :nq, :]  # [B|1, H|1, Nq, D]
        return res.to(out.dtype)

    def token_mask(self, nq: int, nk: int) -> torch.Tensor:
        """The boolean token mask bool [B|1, H|1, Nq, Nk] (True = may attend) the plan stands for."""
        m = self.block_mask(nk)
        m = m.repeat_interleave(self.block_q, dim=-2)[..., :nq, :]
        return m.repeat_interleave(self.block_k, dim=-1)[..., :nk]

    def masked_bias(self, bias: torch.Tensor | None, nq: int, nk: int) -> torch.Tensor:
        """``bias`` with :meth:`token_mask` ANDed in: the bias the reference (and taps) execute the plan with."""
        mask = self.token_mask(nq, nk)
        if bias is None:
            return mask
        if bias.dtype == torch.bool:
            return bias & mask
        return torch.where(mask, bias, torch.full((), float("-inf"), dtype=bias.dtype, device=bias.device))


@dataclass(eq=False)
class KernelSpec:
    """One attention call's extras, handed to ``diffattn.kernels.attention(q, k, v, spec=...)`` whole.

    head_blend:   ``[H]`` or ``[B, H]`` u: ``(1-u)·attention + u·V`` (Nq == Nk);
    bias:         additive float bias or boolean mask broadcastable to ``[B, H, Nq, Nk]``;
    uniform_keys: a :class:`SegmentUniform` or ``None``;
    sparse:       a :class:`BlockSparsePlan` or ``None``;
    return_lse:   also return the row log-sum-exp ``[B, H, Nq]`` (of the scores plus bias and
                  sparse mask, before uniform keys: what taps use).
    """

    head_blend: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    uniform_keys: SegmentUniform | None = None
    sparse: BlockSparsePlan | None = None
    return_lse: bool = False
