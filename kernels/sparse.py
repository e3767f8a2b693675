"""Block-sparse attention: the selection and rectification of Rectified SpaAttn, and a fast CPU path.

Rectified SpaAttn (Liu et al., "Rectified SpaAttn: Revisiting Attention Sparsity for Efficient
Video Generation", arXiv 2511.19835). For query i, split the keys into a critical set C and the
rest N; exactly

    o_i = R_i · o_i^sparse + Σ_{j∈N} p_ij v_j,    R_i = Σ_{j∈C} p_ij,
    o_i^sparse = Σ_{j∈C} p_ij v_j / R_i                                        (§1.1)

Block-sparse attention computes only ``o^sparse``; Rectified SpaAttn estimates R and the lost
term from an "implicit full attention" over mean-pooled blocks. The per-call algorithm
(``docs: /shared/reference/sparse_attention.md`` §1.2), one small pure function per step:

1. :func:`block_stats`      one pre-pass: per-block means of q, k, v, and the mean absolute
                            deviations |q - q̄|, |k - k̄| (padding- and text-aware counts;
                            with a key mask, per batch row over that row's live keys);
2. :func:`pooled_logits`    s_bj = q̄_b·k̄_j·scale, plus log c_j for a pooled column standing for
                            c_j tokens (IPAR's cluster-size weighting), text keys isolated;
3. :func:`ipar_probs`       P̂ = softmax of those logits = c_j p_j / Σ c p (step 4, IPAR);
4. :func:`topk_blocks`      n = max(#{cumsum P̂ ≤ p_remain} + 1, top_k) largest blocks (step 5),
                            OR forced blocks (text, neighbours, dense rows);
5. :func:`gapr_untrusted`   the pooled estimate of s_bj is untrusted where its first-order
                            pooling error |Δq̄·k̄| + |q̄·Δk̄| is not below |q̄·k̄| (step 6, GAPR);
6. :func:`rectification`    C' = selected ∪ untrusted ∪ text: R_b = Σ_{C'} P̂_bj,
                            comp_b = Σ_{j∉C'} P̂_bj v̄_j (step 7);
7. the kernel               O = R ⊙ softmax_selected(q kᵀ) v + comp (steps 8-9):
                            :func:`gathered_attention` here (CPU), the Triton LUT kernel on CUDA.

:func:`block_sparse_plan` chains 1-6 into a :class:`~diffattn.kernels.BlockSparsePlan` (a compact
-1 padded LUT plus ``rescale`` = R and ``comp``), which ``diffattn.kernels.attention(...,
spec=KernelSpec(sparse=plan))`` executes; its masked reference stays the exactness oracle.

The CPU path (:func:`gathered_attention`): for every query block, gather only its selected key
and value blocks (one ``index_select`` of whole blocks) and run the fused CPU flash attention of
PyTorch on them, all query blocks of a chunk in one call (the query blocks are the batch, padded
to the widest LUT row with a -inf key mask). Chunks bound the gathered copy to a few MB that stay
in cache (as the reference's query chunks bound its score matrix); at 75 % drop it does a quarter
of the FLOPs of dense SDPA (benchmarks/sparse.py).

Key masks (:func:`key_mask_of`): a boolean bias broadcast over the queries, ``[B|1, H|1, 1, Nk]``
(HunyuanVideo's padded text when the prompts of a batch differ in length), is a per-row *key*
mask ``m_bt``. The plan then pools each row's live keys only (masked keys leave k̄, Δk, v̄ and
the cluster sizes c_bj that weight IPAR; a block with no live key of a row gets P̂ = 0, is
never selected for that row and adds no compensation), and every path applies the mask inside
the selected blocks (the masked reference through the bias, the gathered path and the Triton
LUT kernel through ``key_mask``), so each batch row equals that row computed alone.

Tensors are ``[B, H, N, D]``; block-level tensors ``[B, H, n_blocks, ...]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffattn.kernels.errors import KernelError
from diffattn.kernels.reference import default_scale
from diffattn.kernels.spec import BlockSparsePlan, lut_from_mask

__all__ = ["BlockStats", "block_stats", "pooled_logits", "ipar_probs", "topk_blocks", "random_blocks",
           "gapr_untrusted", "rectification", "block_sparse_plan", "lut_from_mask", "gathered_attention",
           "key_mask_of", "live_blocks", "MODES", "GATHER_BYTES", "MIN_TILE"]

MODES = ("rectified", "vanilla", "random")
MIN_TILE = 16  # the smallest block the Triton kernel tiles (tl.dot needs every dimension >= 16)
GATHER_BYTES = 8 << 20  # gathered K + V bytes per chunk of the CPU path (stays in L2/L3)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 at least, fp64 kept."""
    return torch.promote_types(dtype, torch.float32)


def _padded_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [B, H, N, D] zero-padded to whole blocks -> [B, H, ceil(N / block), block, D]."""
    n = x.shape[-2]
    nb = -(-n // block)
    if nb * block != n:
        x = torch.nn.functional.pad(x, (0, 0, 0, nb * block - n))  # [B, H, nb*block, D]
    return x.reshape(*x.shape[:-2], nb, block, x.shape[-1])  # [B, H, nb, block, D]


def key_mask_of(bias: torch.Tensor | None, n_key: int) -> torch.Tensor | None:
    """A boolean bias that only masks keys, as the key mask bool ``[B|1, H|1, Nk]`` (True = live).

    ``bias`` broadcastable to ``[B, H, Nq, Nk]``, boolean, broadcast over the queries (its
    query dimension absent or 1) and spelling out the ``n_key`` keys; ``None`` for anything else
    (no bias, a float bias, a mask that differs between queries or is broadcast over the keys).
    Shape checks only: no host sync, so the dispatcher can ask it on every call.
    """
    if (bias is None or bias.dtype != torch.bool or bias.dim() > 4 or bias.shape[-1] != n_key
            or (bias.dim() >= 2 and bias.shape[-2] != 1)):
        return None
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))  # [B|1, H|1, 1, Nk]
    return bias[:, :, 0]  # [B|1, H|1, Nk]


def _key_blocks(key_mask: torch.Tensor, block: int) -> torch.Tensor:
    """key_mask bool [B|1, H|1, Nk] padded with False to whole blocks -> [B|1, H|1, NK, block]."""
    nk = key_mask.shape[-1]
    nb = -(-nk // block)
    if nb * block != nk:
        key_mask = torch.nn.functional.pad(key_mask, (0, nb * block - nk), value=False)  # [B|1, H|1, NK*block]
    return key_mask.reshape(*key_mask.shape[:-1], nb, block)  # [B|1, H|1, NK, block]


def live_blocks(key_mask: torch.Tensor, block: int) -> torch.Tensor:
    """Key blocks holding at least one live key of the row: bool [B|1, H|1, Nk] -> [B|1, H|1, NK]."""
    return _key_blocks(key_mask, block).any(-1)


@dataclass
class BlockStats:
    """The pre-pass of one call (fp32, fp64 for fp64 inputs).

    qbar, dq:  ``[B, H, NQ, D]`` mean query of each query block and mean |q_i - q̄_b|;
    kbar, dk:  ``[B, H, NK, D]`` mean pooled key of each key block and mean |k_t - k̄_j|;
    vbar:      ``[B, H, NK, D]`` mean pooled value of each key block (GAPR's compensation);
    count:     ``[NK]`` pooled tokens per key block (ragged last block and isolated text keys
               excluded; 0 for a block of text only); ``[B|1, H|1, NK]`` with a key mask, per
               row over its live keys only (0 for a block the row masks entirely).
    ``dq``, ``dk``, ``vbar`` are ``None`` when only the means were asked for.
    """

    qbar: torch.Tensor
    kbar: torch.Tensor
    count: torch.Tensor
    dq: torch.Tensor | None = None
    dk: torch.Tensor | None = None
    vbar: torch.Tensor | None = None


def _pool(xb: torch.Tensor, w: torch.Tensor, deviation: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted block mean and mean absolute deviation (Rectified SpaAttn §1.2 steps 2 and 6).

    xb [B, H, NB, bs, D] (acc dtype), w 0/1 token weights [NB, bs] (shared by every row) or
    [B|1, H|1, NB, bs] (per row: a key mask) -> (mean, dev) [B, H, NB, D].
    Blocks with no weight get mean = dev = 0.
    """
    cnt = w.sum(-1).clamp(min=1).unsqueeze(-1)  # [NB, 1] / [B|1, H|1, NB, 1]
    full = w.dim() == 2 and bool((w == 1).all())  # no padding, no isolated keys: plain means, no weighted temporaries
    eq = "bhnsd,ns->bhnd" if w.dim() == 2 else "bhnsd,bhns->bhnd"
    mean = xb.mean(-2) if full else torch.einsum(eq, xb, w) / cnt  # [B, H, NB, D]
    if not deviation:
        return mean, None
    dev = (xb - mean.unsqueeze(-2)).abs_()  # [B, H, NB, bs, D]: the one full-size temporary
    dev = dev.mean(-2) if full else torch.einsum(eq, dev, w) / cnt  # [B, H, NB, D]
    return mean, dev


def _token_weights(n: int, block: int, pooled: torch.Tensor | None, device, dtype) -> torch.Tensor:
    """[NB, block] 1 for the tokens pooled into their block, 0 for padding and isolated keys."""
    nb = -(-n // block)
    w = torch.zeros(nb * block, dtype=dtype, device=device)
    w[:n] = 1.0 if pooled is None else pooled.to(device=device, dtype=dtype)
    return w.view(nb, block)  # [NB, block]


def block_stats(q, k, v, block_q: int, block_k: int, *, pooled_keys: torch.Tensor | None = None,
                deviations: bool = True, key_mask: torch.Tensor | None = None) -> BlockStats:
    """The one pre-pass over Q, K, V (§1.2 steps 2 and 6; §5.2: padding-aware means).

    q [B, H, Nq, D], k, v [B, H, Nk, D]; ``pooled_keys`` bool [Nk]: the keys pooled into their
    block (``None``: all); the others (text keys) are isolated columns (IPAR) and left out of
    k̄, Δk and v̄. ``key_mask`` bool [B|1, H|1, Nk] (``None``: every key live): the keys each
    row may attend to; a row's masked keys are left out of its k̄, Δk, v̄ and counts, so the
    statistics of a row are those of the row alone. ``deviations=False`` skips dq, dk and v̄
    (vanilla / random selection).
    """
    acc = _acc(q.dtype)
    nq, nk = q.shape[-2], k.shape[-2]
    wq = _token_weights(nq, block_q, None, q.device, acc)
    wk = _token_weights(nk, block_k, pooled_keys, k.device, acc)
    if key_mask is not None:  # per-row weights: pooled and live in that row
        wk = wk * _key_blocks(key_mask.to(k.device), block_k).to(acc)  # [B|1, H|1, NK, bk]
    qbar, dq = _pool(_padded_blocks(q.to(acc), block_q), wq, deviations)
    kbar, dk = _pool(_padded_blocks(k.to(acc), block_k), wk, deviations)
    vbar = _pool(_padded_blocks(v.to(acc), block_k), wk, False)[0] if deviations else None
    return BlockStats(qbar=qbar, kbar=kbar, count=wk.sum(-1), dq=dq, dk=dk, vbar=vbar)


def pooled_logits(qbar: torch.Tensor, kbar: torch.Tensor, count: torch.Tensor, scale: float,
                  k_isolated: torch.Tensor | None = None, isolated_live: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the implicit full attention with cluster-size weighting (IPAR, §1.2 steps 3-4).

    A pooled column j stands for ``count_j`` tokens, so its weight is c_j·exp(s_bj):
    logit = q̄_b·k̄_j·scale + log c_j (-inf for empty blocks). Isolated keys (text) are their
    own columns with weight 1, appended after the NK block columns; ``isolated_live`` bool
    [B|1, H|1, T] sets the columns of a row's masked isolated keys to -inf.
    qbar [B, H, NQ, D], kbar [B, H, NK, D], count [NK] or [B|1, H|1, NK] (per row),
    k_isolated [B, H, T, D] -> [B, H, NQ, NK (+ T)].
    """
    log_c = count.to(qbar.dtype).log()
    if log_c.dim() > 1:
        log_c = log_c.unsqueeze(-2)  # [B|1, H|1, 1, NK]
    logits = torch.matmul(qbar, kbar.transpose(-1, -2)) * scale + log_c  # [B, H, NQ, NK]
    if k_isolated is not None and k_isolated.shape[-2]:
        iso = torch.matmul(qbar, k_isolated.to(qbar.dtype).transpose(-1, -2)) * scale  # [B, H, NQ, T]
        if isolated_live is not None:
            iso = iso.masked_fill(~isolated_live.unsqueeze(-2), float("-inf"))  # [B|1, H|1, 1, T] broadcast
        logits = torch.cat([logits, iso], dim=-1)
    return logits


def ipar_probs(logits: torch.Tensor) -> torch.Tensor:
    """P̂ = softmax(logits): with the log-count logits of :func:`pooled_logits` this is IPAR's
    P̂_j = c_j p_j / (Σ_video c p + Σ_text p) (§1.2 step 4). [..., C] -> [..., C]."""
    return torch.softmax(logits, dim=-1)


def topk_blocks(mass: torch.Tensor, top_k: int, p_remain: float = 0.3,
                candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The selection rule of §1.2 step 5 over candidate blocks.

    Sort the candidates' P̂ descending; keep n = max(#{cumsum ≤ p_remain} + 1, top_k) of them
    (at most all candidates). mass [B, H, NQ, NK], candidates bool broadcastable to it
    (``None``: all) -> bool [B, H, NQ, NK].
    """
    if candidates is not None:
        mass = mass.masked_fill(~candidates, -1.0)  # non-candidates sort last and never count
    vals, order = mass.sort(dim=-1, descending=True)
    n = ((vals.clamp(min=0).cumsum(-1) <= p_remain).sum(-1, keepdim=True) + 1).clamp(min=top_k)  # [B, H, NQ, 1]
    n = torch.minimum(n, (vals >= 0).sum(-1, keepdim=True))
    keep = torch.arange(mass.shape[-1], device=mass.device) < n  # [B, H, NQ, NK] in sorted order
    return torch.zeros_like(keep).scatter(-1, order, keep)


def random_blocks(shape, top_k: int, candidates: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``top_k`` uniformly random candidate blocks per query block (the ablation's "random blocks
    at equal density"). shape (B, H, NQ, NK) -> bool [B, H, NQ, NK]."""
    scores = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
    return topk_blocks(scores.to(device), top_k, p_remain=0.0, candidates=candidates)


def gapr_untrusted(qbar, dq, kbar, dk) -> torch.Tensor:
    """GAPR's gain-versus-error test (§1.2 step 6): where the pooled score cannot be trusted.

    First-order pooling error of s_bj = q̄_b·k̄_j: err = |Δq_b·k̄_j| + |q̄_b·Δk_j| with
    Δq_b = mean|q_i - q̄_b|, Δk_j = mean|k_t - k̄_j|; gain = |q̄_b·k̄_j|. Returns ~(gain > err),
    bool [B, H, NQ, NK] (qbar, dq [B, H, NQ, D]; kbar, dk [B, H, NK, D]).
    """
    kt = kbar.transpose(-1, -2)  # [B, H, D, NK]
    gain = torch.matmul(qbar, kt).abs()
    err = torch.matmul(dq, kt).abs() + torch.matmul(qbar, dk.transpose(-1, -2)).abs()
    return ~(gain > err)


def rectification(p_blocks: torch.Tensor, p_isolated: torch.Tensor | None, keep: torch.Tensor,
                  vbar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R and the compensation (§1.2 step 7): with C' = ``keep`` (selected ∪ untrusted) ∪ text,

        R_b = Σ_{j∈C'} P̂_bj,     comp_b = Σ_{j∉C'} P̂_bj · v̄_j.

    Rows whose every block is kept get exactly R = 1, comp = 0 (dense).
    p_blocks [B, H, NQ, NK] (IPAR P̂ of the block columns), p_isolated [B, H, NQ] (their text
    columns' total, always in C'; ``None``: none), keep bool [B, H, NQ, NK], vbar [B, H, NK, D]
    -> (R [B, H, NQ], comp [B, H, NQ, D]).
    """
    dropped = p_blocks.masked_fill(keep, 0.0)  # [B, H, NQ, NK]
    r = (p_blocks - dropped).sum(-1)
    if p_isolated is not None:
        r = r + p_isolated
    comp = torch.matmul(dropped, vbar)  # [B, H, NQ, D]
    dense = keep.all(-1)
    return torch.where(dense, torch.ones_like(r), r), comp.masked_fill(dense.unsqueeze(-1), 0.0)


def _check_key_mask(key_mask, b: int, h: int, nk: int, device) -> torch.Tensor | None:
    """``key_mask`` as bool [B|1, H|1, Nk] on ``device``; :class:`KernelError` when it does not fit."""
    if key_mask is None:
        return None
    if (not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or key_mask.dim() != 3
            or key_mask.shape[0] not in (1, b) or key_mask.shape[1] not in (1, h) or key_mask.shape[2] != nk):
        raise KernelError(f"key_mask must be a bool tensor [B|1, H|1, Nk] = [{b}|1, {h}|1, {nk}] (True = the row "
                          f"may attend to the key); got {getattr(key_mask, 'dtype', type(key_mask).__name__)} "
                          f"{tuple(key_mask.shape) if isinstance(key_mask, torch.Tensor) else ''} (a [B, 1, 1, Nk] "
                          f"attention mask m gives m[:, :, 0])")
    return key_mask.to(device)


def block_sparse_plan(q, k, v, *, block_q: int, block_k: int | None = None, top_k: int, p_remain: float = 0.3,
                      scale: float | None = None, mode: str = "rectified", forced_keys: torch.Tensor | None = None,
                      dense_queries: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                      pooled_keys: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> BlockSparsePlan:
    """The whole selection of one call (§1.2 steps 1-7) as a compact, rectified plan.

    q [B, H, Nq, D], k, v [B, H, Nk, D] (after RoPE, in the locality order);
    top_k:         the block budget per query block, ``int((1 - drop) · video blocks)``;
    forced_keys:   bool [NK] key blocks every query block attends to (text blocks);
    dense_queries: bool [NQ] query blocks that attend to every key block (text rows);
    extra:         bool [NQ, NK] static additions (locality neighbours, first frame);
    pooled_keys:   bool [Nk] keys pooled into their block; the rest (text) are isolated IPAR
                   columns (``None``: all pooled);
    key_mask:      bool [B|1, H|1, Nk] the keys each batch row (and head) may attend to
                   (``None``: all; :func:`key_mask_of` reads it from a [B, 1, 1, Nk] mask). Each
                   row's statistics pool its live keys only; a key block without a live key of
                   the row has P̂ = 0, is never selected for that row (forced, static and dense
                   blocks included) and adds no compensation, so a row's plan is the plan of
                   the row alone. The call must still apply the mask (as its bias): the plan
                   selects blocks, it does not mask keys inside them;
    mode:          ``"rectified"`` (IPAR + GAPR: R and comp), ``"vanilla"`` (the same top-k
                   blocks, R = 1, comp = 0) or ``"random"`` (top_k random candidate blocks,
                   same forced / extra blocks, no rectification; ``generator`` seeds it).
    Returns a :class:`BlockSparsePlan` with a compact int32 LUT (and ``rescale``, ``comp``).
    """
    if mode not in MODES:
        raise KernelError(f"mode={mode!r}: choose one of {MODES}")
    block_k = block_q if block_k is None else block_k
    scale = default_scale(q, scale)
    b, h, nq = q.shape[:3]
    nqb, nkb = -(-nq // block_q), -(-k.shape[-2] // block_k)
    dev = q.device
    key_mask = _check_key_mask(key_mask, b, h, k.shape[-2], dev)
    live = None if key_mask is None else live_blocks(key_mask, block_k).unsqueeze(-2)  # [B|1, H|1, 1, NK]
    forced = torch.zeros(nkb, dtype=torch.bool, device=dev) if forced_keys is None else forced_keys.to(dev)
    stats = None
    if mode == "random":
        cand = ~forced if live is None else ~forced & live
        sel = random_blocks((b, h, nqb, nkb), top_k, cand, generator=generator, device=dev)
    else:
        stats = block_stats(q, k, v, block_q, block_k, pooled_keys=pooled_keys, deviations=mode == "rectified",
                            key_mask=key_mask)
        k_iso = iso_live = None
        if pooled_keys is not None and not bool(pooled_keys.all()):
            isolated = ~pooled_keys.to(dev)
            k_iso = k[..., isolated, :]  # [B, H, T, D] isolated text keys
            iso_live = None if key_mask is None else key_mask[..., isolated]  # [B|1, H|1, T]
        probs = ipar_probs(pooled_logits(stats.qbar, stats.kbar, stats.count, scale, k_iso, iso_live))
        if key_mask is not None:  # a row with no live key at all: softmax of -inf only -> no mass anywhere
            probs = probs.nan_to_num(0.0)  # [B, H, NQ, NK (+T)]
        p_blocks = probs[..., :nkb]
        count = stats.count if stats.count.dim() == 1 else stats.count.unsqueeze(-2)  # [NK] / [B|1, H|1, 1, NK]
        cand = ~forced & (count > 0)
        sel = topk_blocks(p_blocks, top_k, p_remain, cand)
    sel = sel | forced
    if extra is not None:
        sel = sel | extra.to(dev)
    if dense_queries is not None:
        sel = sel | dense_queries.to(dev).view(nqb, 1)  # [NQ, 1]: every key block
    if live is not None:  # never a block the row masks entirely (nothing to attend to there)
        sel = sel & live
    rescale = comp = None
    if mode == "rectified":
        keep = sel | gapr_untrusted(stats.qbar, stats.dq, stats.kbar, stats.dk)
        if live is not None:
            keep = keep | ~live  # masked blocks hold no mass (P̂ = 0): they count as covered, so a row with
            # every live block selected stays exactly dense (R = 1, comp = 0)
        p_iso = probs[..., nkb:].sum(-1) if probs.shape[-1] > nkb else None
        rescale, comp = rectification(p_blocks, p_iso, keep, stats.vbar)
    lut, _ = lut_from_mask(sel)
    return BlockSparsePlan(block_q, block_k, lut=lut, rescale=rescale, comp=comp, compact=True)


# ----------------------------------------------------------------------------- the CPU path


def _flash_cpu(q, k, v, mask, scale):
    """Fused attention with its row LSE: PyTorch's CPU flash kernel (``aten::_scaled_dot_product_
    flash_attention_for_cpu``), or plain matmuls where it is missing. [n, 1, L, D] -> (out, lse [n, 1, L])."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and q.device.type == "cpu":
        return op(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    s = torch.matmul(q.to(_acc(q.dtype)), k.to(_acc(q.dtype)).transpose(-1, -2)) * scale  # [n, 1, L, S]
    if mask is not None:
        s = s + mask.to(s.dtype)
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0), v.to(s.dtype)).to(q.dtype), lse


def gathered_attention(q, k, v, lut: torch.Tensor, counts: torch.Tensor, block_q: int, block_k: int, *,
                       scale: float | None = None, rescale: torch.Tensor | None = None,
                       comp: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                       chunk_bytes: int = GATHER_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention over gathered blocks (the CPU path of ``diffattn.kernels.attention``).

    q [B, H, Nq, D], k, v [B, H, Nk, D]; lut int [B|1, H|1, NQ, W] compact (ascending, -1 as
    trailing padding), counts int [B|1, H|1, NQ]; rescale [B|1, H|1, NQ], comp
    [B|1, H|1, NQ, D] the optional rectification ``out = rescale·O + comp``; key_mask bool
    [B|1, H|1, Nk] the keys each row may attend to (``None``: all), gathered with the blocks
    into the same -inf key mask as the padding.
    Returns (out [B, H, Nq, D] q's dtype, lse [B, H, Nq] fp32 / fp64 of the selected keys);
    rows with no selected (live) key give out = 0 (plus comp) and lse = -inf.
    """
    B, H, nq, D = q.shape
    nk = k.shape[-2]
    scale = default_scale(q, scale)
    nqb, nkb = -(-nq // block_q), -(-nk // block_k)
    width = lut.shape[-1]
    rows = B * H * nqb
    lut = lut.expand(B, H, nqb, width).reshape(rows, width).long()  # [rows, W]
    counts = counts.expand(B, H, nqb).reshape(rows)  # [rows]
    qb = _padded_blocks(q, block_q).reshape(rows, 1, block_q, D)  # [rows, 1, bq, D]
    kf = _padded_blocks(k, block_k).reshape(B * H * nkb, block_k * D)  # [B*H*NK, bk*D]: one row per key block
    vf = _padded_blocks(v, block_k).reshape(B * H * nkb, block_k * D)
    head = torch.arange(B * H, device=q.device).repeat_interleave(nqb) * nkb  # [rows] first key block of the head
    valid = lut >= 0
    gidx = torch.where(valid, lut, 0) + head.unsqueeze(-1)  # [rows, W] global key-block rows
    mask = None
    empty = (counts == 0).view(rows, 1, 1)  # [rows, 1, 1] query blocks with no key to attend to
    tail = nkb * block_k - nk  # padded keys of the last block
    if key_mask is not None or not bool(valid.all()) or (tail and bool((lut == nkb - 1).any())):
        tok = torch.arange(block_k, device=q.device)
        ok = valid.unsqueeze(-1) & ((torch.where(valid, lut, 0).unsqueeze(-1) * block_k + tok) < nk)  # [rows, W, bk]
        if key_mask is not None:  # the row's live keys, gathered block by block as K and V are
            live = _key_blocks(key_mask.expand(B, H, nk), block_k).reshape(B * H * nkb, block_k)  # [B*H*NK, bk]
            ok &= live[gidx]  # [rows, W, bk]
            empty = ~ok.view(rows, 1, width * block_k).any(-1, keepdim=True)  # [rows, 1, 1]
        mask = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill(~ok, float("-inf"))
        mask = mask.view(rows, 1, 1, width * block_k)  # [rows, 1, 1, W*bk]
    per_row = 2 * width * block_k * D * q.element_size()
    step = max(1, chunk_bytes // max(per_row, 1))
    out = torch.empty(rows, 1, block_q, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(rows, 1, block_q, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    n_buf = min(step, rows) * width
    kbuf = torch.empty(n_buf, block_k * D, dtype=k.dtype, device=k.device)
    vbuf = torch.empty(n_buf, block_k * D, dtype=v.dtype, device=v.device)
    for s in range(0, rows, step):  # chunks bound the gathered copy; each is one batched call
        e = min(s + step, rows)
        n = e - s
        idx = gidx[s:e].reshape(-1)
        kg = torch.index_select(kf, 0, idx, out=kbuf[:n * width]).view(n, 1, width * block_k, D)  # [n, 1, W*bk, D]
        vg = torch.index_select(vf, 0, idx, out=vbuf[:n * width]).view(n, 1, width * block_k, D)
        o, l = _flash_cpu(qb[s:e], kg, vg, None if mask is None else mask[s:e], scale)
        out[s:e] = o
        lse[s:e] = l.view(n, 1, block_q)  # [n, 1, bq]
    if bool(empty.any()):  # the CPU flash kernel gives lse 0 on rows it sees fully masked
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    out = out.view(B, H, nqb, block_q, D)  # [B, H, NQ, bq, D]
    if rescale is not None or comp is not None:  # the epilogue O = R·O + comp, one fused pass
        acc = _acc(q.dtype)
        r = (torch.ones((), dtype=acc, device=q.device) if rescale is None
             else rescale.to(acc).expand(B, H, nqb).reshape(B, H, nqb, 1, 1))  # [B, H, NQ, 1, 1]
        c = (torch.zeros((), dtype=acc, device=q.device) if comp is None
             else comp.to(acc).expand(B, H, nqb, D).reshape(B, H, nqb, 1, D))  # [B, H, NQ, 1, D]
        out = torch.addcmul(c, out.to(acc), r).to(q.dtype)
    out = out.reshape(B, H, nqb * block_q, D)[..., :nq, :]  # [B, H, Nq, D]
    lse = lse.view(B, H, nqb * block_q)[..., :nq]  # [B, H, Nq]
    return out, lse


def sparse_flops(counts: torch.Tensor, block_q: int, block_k: int, d: int, b: int, h: int) -> float:
    """Attention FLOPs the plan computes, 4·Σ rows·keys·D (QKᵀ and PV), for speed reports."""
    return 4.0 * float(counts.expand(b, h, -1).sum()) * block_q * block_k * d


def density(counts: torch.Tensor, n_kblocks: int) -> float:
    """Fraction of key blocks computed, averaged over query blocks (1 = dense)."""
    return float(counts.float().mean()) / max(n_kblocks, 1)


def dense_flops(b: int, h: int, nq: int, nk: int, d: int) -> float:
    """4·B·H·Nq·Nk·D: the FLOPs of dense attention."""
    return 4.0 * b * h * nq * nk * d

