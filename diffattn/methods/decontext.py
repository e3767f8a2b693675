"""DeContext: the context share of in-context editors' attention, and the control that records it.

Shen, Cui & Yang, "DeContext as Defense: Safe Image Editing in Diffusion Transformers"
(arXiv 2512.16625). An in-context editor (FLUX.1 Kontext) attends over the joint sequence
``Z = [Z_text ; Z_tgt ; Z_ctx]`` (text, the noisy target image, the context image). The
*context proportion* of a target query q is the attention mass it gives the context keys C,
with the softmax over **all** keys S of the joint sequence (paper Eqs. 7-8):

    r_ctx(q) = Σ_{k∈C} softmax_{k∈S}(q·kᵀ/√d)

DeContext perturbs the context image so that r_ctx drops (loss L = 1 − r̄_ctx, Eq. 9, r̄ the
mean over heads, selected blocks and target queries), detaching the edit from the image.

Never building the target × joint map: r_ctx(q) = exp(LSE_{k∈C}(s_qk) − LSE_{k∈S}(s_qk)), two
row log-sum-exps (:func:`context_share`), computed by ``diffattn.kernels.attention(...,
return_lse=True)`` on the key subsets (the full-row LSE may be the main call's own). The
segments come from the call's :class:`~diffattn.layout.TokenLayout` (FLUX: ``text``, ``image``
= the target, ``context``), derived from ``img_ids``, so any resolution, and a context image
of another size than the target, is handled; the official code's hard-coded token slices
(2048 / 2560 at 512²) silently skip every block at other sizes, leaving a constant zero loss.

:class:`ContextShareProbe` records r_ctx at its sites (double- or single-stream blocks) during
a denoiser forward, keeping the autograd graph when asked; ``diffattn.pipelines.decontext``
runs the PGD loop on it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..controls import AttentionCall, Control
from ..errors import ConfigError, LayoutError
from ..kernels import attention

CONTEXT_KINDS = ("joint", "single")  # FLUX double-stream (joint) and single-stream blocks see the context keys


class SharesComplete(Exception):
    """Raised by a :class:`ContextShareProbe` with ``early_exit`` once every expected site has
    reported: the blocks after the last selected one cannot change the shares, so the loop
    stops the forward there (control flow, not an error)."""


# ----------------------------------------------------------------------------- pure math


def _bias_block(bias: torch.Tensor | None, queries: slice, keys: slice) -> torch.Tensor | None:
    """The ``[.., queries, keys]`` block of a bias broadcastable to ``[B, H, Nq, Nk]`` (broadcast
    dimensions of size 1 stay size 1)."""
    if bias is None:
        return None
    b = bias
    while b.dim() < 4:
        b = b.unsqueeze(0)  # [.., Nq|1, Nk|1] -> [1, 1, Nq|1, Nk|1]
    if b.shape[2] != 1:
        b = b[:, :, queries]
    if b.shape[3] != 1:
        b = b[:, :, :, keys]
    return b


def key_lse(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Row log-sum-exp ``LSE_k(q·kᵀ·scale + bias)`` of queries ``q`` [B, H, Nq, D] over keys
    ``k`` [B, H, Nk, D] -> [B, H, Nq] (fp32; fp64 for fp64 inputs), through
    ``diffattn.kernels.attention(..., return_lse=True)`` (chunked / fused: no Nq × N map is
    kept). No keys give ``-inf`` (an empty sum). Differentiable in q and k."""
    if k.shape[2] == 0:
        dtype = torch.promote_types(q.dtype, torch.float32)
        return q.new_full(q.shape[:3], float("-inf"), dtype=dtype)
    # the values are never used: k itself (same shape, so every backend supports the call)
    _, lse = attention(q, k, k, scale=scale, bias=bias, return_lse=True)
    return lse


def context_share(q: torch.Tensor, k: torch.Tensor, target: slice, context: slice, *, scale: float | None = None,
                  bias: torch.Tensor | None = None, lse_all: torch.Tensor | None = None) -> torch.Tensor:
    """DeContext's context proportion per target query (paper Eqs. 7-8), from two LSEs:

        r_ctx(q) = Σ_{k∈C} softmax_{k∈S}(q·kᵀ·scale + b) = exp(LSE_C(s_q) − LSE_S(s_q))

    q [B, H, Nq, D], k [B, H, Nk, D] (after q/k-norm and RoPE), ``target`` the query positions
    of the target image, ``context`` the key positions of the context image, S every key;
    ``bias`` broadcastable to [B, H, Nq, Nk]; ``lse_all`` [B, H, Nq] the full-row LSE when the
    caller has it (the main attention call's). -> [B, H, N_target] in [0, 1], differentiable.
    An empty context gives 0 (the share of no keys)."""
    q_t = q[:, :, target]  # [B, H, Nt, D]
    if lse_all is None:
        lse_all = key_lse(q_t, k, scale=scale, bias=_bias_block(bias, target, slice(None)))
    else:
        lse_all = lse_all[:, :, target]  # [B, H, Nt]
    lse_ctx = key_lse(q_t, k[:, :, context], scale=scale, bias=_bias_block(bias, target, context))
    return torch.exp(lse_ctx - lse_all.to(lse_ctx.dtype))


def mean_share(shares: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """r̄_ctx: the mean over blocks of each block's [B, H] (or any shape) shares, averaged over
    its elements (heads, batch rows; target queries already averaged) -> a scalar.

    No block is an error, never a zero loss: a constant has no gradient, and a PGD loop would
    run its steps without moving the image (the official code's failure at other sizes)."""
    values = list(shares.values()) if isinstance(shares, Mapping) else list(shares)
    if not values:
        raise ConfigError("no selected block reported a context share: select FLUX double/single blocks "
                          "(blocks='auto' = the single-stream blocks of the front two thirds) and pass the image as "
                          "the editor's context image (a FluxKontextPipeline forward with img_ids of the context)")
    return torch.stack([v.float().mean() for v in values]).mean()


def decontext_loss(shares: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """DeContext's objective L = 1 − r̄_ctx (paper Eq. 9), which PGD *ascends* (Eq. 10):
    x ← Π_ε(x + α·sign(∇_x L)). Raises :class:`ConfigError` for zero blocks (:func:`mean_share`)."""
    return 1.0 - mean_share(shares)


def front_single_blocks(site_list, fraction: float = 2 / 3) -> list[str]:
    """Names of the single-stream sites of the front ``fraction`` of the single-stream stack,
    ``ceil(fraction · n)`` blocks: the paper's best ablation (Table 5), single blocks 0-25 of
    FLUX.1's 38 (⌈2/3 · 38⌉ = 26). ``site_list``: :class:`~diffattn.sites.Site` s of a model."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction={fraction}: a fraction of the single-stream blocks in (0, 1]")
    single = sorted((s for s in site_list if s.kind == "single"), key=lambda s: s.block)
    return [s.name for s in single[: math.ceil(fraction * len(single))]]


# ----------------------------------------------------------------------------- the control


class ContextShareProbe(Control):
    """Records DeContext's context share r_ctx at its sites (FLUX double / single blocks).

    For every active call that has target (``image``) queries and ``context`` keys, the probe
    asks the kernel for the row LSE (``spec.return_lse``), then computes
    r_ctx = exp(LSE_context − LSE_all) per head and target query (:func:`context_share`, no map)
    and stores its mean over the target queries, ``[B', H']`` (rows of its branches, its heads),
    in ``records[site name]``. The attention output is left unchanged.

    sites:         a site selector (default: every joint and single-stream site);
    requires_grad: keep the graph (PGD on the pixels), else the shares are detached;
    early_exit:    raise :class:`SharesComplete` once every selected site has reported (the
                   forward's later blocks cannot change the shares);
    per_query:     also keep ``[B', H', N_target]`` shares in ``query_records``.

    ``frozen`` (set by a loop before ``backward``): compute as usual but store and raise nothing,
    so a gradient-checkpointed block recomputes exactly the forward it ran.
    """

    order = 1000  # see the call after every other control's q/k edits

    def __init__(self, sites=CONTEXT_KINDS, heads="all", steps=None, branches=None, *, requires_grad: bool = False,
                 early_exit: bool = False, per_query: bool = False):
        super().__init__(sites=list(sites) if isinstance(sites, tuple) else sites, heads=heads, steps=steps,
                         branches=branches)
        self.requires_grad = bool(requires_grad)
        self.early_exit = bool(early_exit)
        self.per_query = bool(per_query)
        self.frozen = False
        self.records: dict[str, torch.Tensor] = {}
        self.query_records: dict[str, torch.Tensor] = {}
        self.expected: set[str] = set()

    def on_attach(self, engine) -> None:
        from ..sites import select

        chosen = [s for s in engine.sites if self.sites(s)] if callable(self.sites) else select(engine.sites, self.sites)
        self.expected = {s.name for s in chosen if s.kind in CONTEXT_KINDS}
        if not self.expected:
            raise ConfigError(f"ContextShareProbe(sites={self.sites!r}) selects no double- or single-stream block: "
                              f"the context share lives in joint attention; select FLUX transformer_blocks.* or "
                              f"single_transformer_blocks.*")

    def start(self) -> None:
        """Clear the records of the previous forward (and unfreeze)."""
        self.records, self.query_records, self.frozen = {}, {}, False

    def is_active(self, call: AttentionCall) -> bool:
        if not super().is_active(call) or call.site.kind not in CONTEXT_KINDS:
            return False
        layout = call.layout
        return layout.has_q("image") and layout.has_k("context")

    def edit_spec(self, call: AttentionCall) -> None:
        call.spec.return_lse = True  # LSE over all keys, reused as the share's denominator

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        layout = call.layout
        target, context = layout.q("image").slice, layout.k("context").slice
        if call.lse is None:
            raise LayoutError(f"{call.site.name}: the kernel returned no row LSE for the context share")
        rows = None if self.branches is None else call.rows(self.branches)
        heads = self.heads_at(call.site)
        all_heads = len(heads) == call.q.shape[1]

        def pick(x):
            x = x if rows is None else x[rows]
            return x if all_heads else x[:, heads]

        bias = call.spec.bias
        if bias is not None and (rows is not None or not all_heads):
            bias = _pick_bias(bias, call.q.shape[0], rows, None if all_heads else heads)
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            r = context_share(pick(call.q), pick(call.k), target, context, scale=call.scale, bias=bias,
                              lse_all=pick(call.lse))  # [B', H', N_target]
        if not self.requires_grad:
            r = r.detach()
        if self.frozen:
            return out
        self.records[call.site.name] = r.mean(-1)  # [B', H']
        if self.per_query:
            self.query_records[call.site.name] = r
        if self.early_exit and self.expected and self.expected <= set(self.records):
            raise SharesComplete
        return out


def _pick_bias(bias: torch.Tensor, batch: int, rows, heads) -> torch.Tensor:
    """Batch rows / heads of a bias broadcastable to [B, H, Nq, Nk] (size-1 dimensions kept)."""
    b = bias
    while b.dim() < 4:
        b = b.unsqueeze(0)  # [.., Nq|1, Nk|1] -> [1, 1, Nq|1, Nk|1]
    if rows is not None and b.shape[0] == batch:
        b = b[rows]
    if heads is not None and b.shape[1] != 1:
        b = b[:, heads]
    return b


__all__ = ["ContextShareProbe", "SharesComplete", "context_share", "key_lse", "mean_share", "decontext_loss",
           "front_single_blocks", "CONTEXT_KINDS"]
