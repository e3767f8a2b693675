"""What every diffattn processor shares: build the call, run the controls, one kernel call.

The per-family processors mirror the stock diffusers processors line by line (projections,
q/k-norm, RoPE, masks, output projections). Between the projections and the output
projection they either run the stock attention directly (*fast path*: the site has no
control) or build an :class:`~diffattn.controls.AttentionCall` and hand it to
:func:`run_controls`, which applies the controls in their defined order around one call of
``diffattn.kernels.attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..controls import AttentionCall, StepState, UniformKeys
from ..errors import ControlError
from ..kernels import KernelSpec, SegmentUniform, attention, attention_probs


class DiffattnProcessor:
    """Base of the per-family processors. One instance per site (controls may keep state).

    ``engine`` supplies the per-forward context (step, branches, latent grid, text length);
    ``controls`` are this site's controls in their defined order (ascending ``order``).
    """

    _attention_backend = None
    _parallel_config = None
    family = ""

    def __init__(self, engine, site, controls=()):
        self.engine = engine
        self.site = site
        self.controls = tuple(controls)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout_fn, *, bias=None,
               part: str = "main", parallel_config=None, rope=None) -> torch.Tensor:
        """Attention of ``[B, H, N, D]`` tensors through this site's active controls -> ``[B, H, Nq, D]``.

        ``layout_fn()`` builds the TokenLayout lazily: calls where no control looks at the
        layout never pay for it. When no control is active the stock attention runs
        (:meth:`plain`).
        """
        ctx = self.engine.context if self.engine is not None else None
        call = AttentionCall(self.site, layout_fn, q, k, v, ctx.step if ctx is not None else StepState(),
                             ctx.branches if ctx is not None else None, part=part, context=ctx, rope=rope)
        call.spec.bias = bias
        active = [c for c in self.controls if c.is_active(call)]
        if not active:
            return self.plain(q, k, v, bias, parallel_config)
        return run_controls(call, active)

    def forward_info(self):
        """The family's record of the current denoiser forward (``ForwardContext.info``:
        latent grid, text length...), ``None`` outside one."""
        ctx = self.engine.context if self.engine is not None else None
        return ctx.info if ctx is not None else None

    def plain(self, q, k, v, bias=None, parallel_config=None) -> torch.Tensor:
        """The stock attention of this family on ``[B, H, N, D]``: SDPA (UNet, SD3)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)

    def _kernel(self, call: AttentionCall) -> torch.Tensor:
        return run_kernel(call)

    def __repr__(self):
        return f"<{type(self).__name__} {self.site.name if self.site is not None else '?'}: {len(self.controls)} controls>"


# ----------------------------------------------------------------------------- the flow


def run_controls(call: AttentionCall, active) -> torch.Tensor:
    """The defined order (``diffattn.controls``): q/k/v edits, spec edits (ascending order),
    the kernel, taps, output edits (descending order)."""
    shape = call.q.shape
    for c in active:
        c.edit_qkv(call)
    if call.q.shape != shape:
        raise ControlError(
            f"edit_qkv changed q from {tuple(shape)} to {tuple(call.q.shape)} at {call.site.name}; keep the queries' "
            f"shape (extend keys with call.extend_keys)"
        )
    for c in active:
        n = len(call.taps)
        c.edit_spec(call)
        for tap in call.taps[n:]:
            if tap.owner is None:
                tap.owner = c
    out = run_kernel(call)
    if call.taps:
        run_taps(call)
    for c in reversed(active):
        out = c.edit_output(call, out)
    return out


def run_kernel(call: AttentionCall) -> torch.Tensor:
    """``diffattn.kernels.attention`` with the call's spec as one :class:`~diffattn.kernels.KernelSpec`;
    sets ``call.lse`` when asked for (``spec.return_lse`` or taps)."""
    spec = kernel_spec(call)
    if spec.return_lse:
        out, call.lse = attention(call.q, call.k, call.v, scale=call.scale, spec=spec)
        return out
    return attention(call.q, call.k, call.v, scale=call.scale, spec=spec)


def kernel_spec(call: AttentionCall) -> KernelSpec:
    """The kernel's view of the call's :class:`~diffattn.controls.AttentionSpec`: key segment names
    resolved to positions through the call's layout, head lists to an ``[H]`` mask, and the LSE
    asked for when the call has taps."""
    spec = call.spec
    uk = spec.uniform_keys
    uniform = None
    if uk is not None:
        if isinstance(uk, str):
            uk = spec.uniform_keys = UniformKeys(uk)
        k = call.k
        if isinstance(uk.keys, str):
            seg = call.layout.k(uk.keys)
            index = torch.arange(seg.start, seg.stop, device=k.device)
        else:
            index = torch.as_tensor(uk.keys, dtype=torch.long, device=k.device)
        heads = None
        if uk.heads is not None:
            heads = uk.heads if torch.is_tensor(uk.heads) and uk.heads.dtype == torch.bool else call.head_mask(list(uk.heads))
        uniform = SegmentUniform(index, uk.rows, heads)
    return KernelSpec(head_blend=spec.head_blend, bias=spec.bias, uniform_keys=uniform, sparse=spec.sparse,
                      return_lse=spec.return_lse or bool(call.taps))


def run_taps(call: AttentionCall) -> None:
    """Compute every requested tap from the call's row LSE and deliver it."""
    layout, q_all, k_all, lse_all = call.layout, call.q, call.k, call.lse
    per_owner: dict[int, tuple[object, list]] = {}
    full_bias = call.spec.bias
    if call.spec.sparse is not None:  # the keys a block-sparse plan leaves out have probability 0
        full_bias = call.spec.sparse.masked_bias(full_bias, q_all.shape[2], k_all.shape[2])
    for tap in call.taps:
        qs = layout.q(tap.query).slice if tap.query is not None else slice(None)
        ks = layout.k(tap.key).slice if tap.key is not None else slice(None)
        rows = None if tap.branches is None else call.rows(tap.branches)
        heads = slice(None) if tap.heads is None else list(tap.heads)

        def pick(x, *, keys=False):
            x = x if rows is None else x[rows]
            x = x[:, heads]
            if x.dim() == 3:  # lse [B, H, Nq]
                return x[:, :, qs]
            return x[:, :, ks] if keys else x[:, :, qs]

        q, k, lse = pick(q_all), pick(k_all, keys=True), pick(lse_all)  # [B', H', Nq_seg, D], [B', H', Ns, D], [B', H', Nq_seg]
        if tap.key_index is not None:
            idx = torch.as_tensor(tap.key_index, dtype=torch.long, device=k.device)
            k = k.index_select(2, idx)
        bias = None
        if full_bias is not None:
            bias = _bias_for(full_bias, call.q.shape[0], rows, heads, qs, ks)
            if tap.key_index is not None and bias.shape[-1] != 1:
                bias = bias.index_select(-1, idx)
        with torch.set_grad_enabled(tap.requires_grad and torch.is_grad_enabled()):
            probs = attention_probs(q, k, lse, scale=call.scale, bias_subset=bias)
        if not tap.requires_grad:
            probs = probs.detach()
        if tap.callback is not None:
            tap.callback(call, probs)
        if tap.store is not None:
            tap.store.append(probs)
        if tap.owner is not None:
            per_owner.setdefault(id(tap.owner), (tap.owner, []))[1].append(probs)
    for owner, probs in per_owner.values():
        owner.on_taps(call, probs)


def _bias_for(bias: torch.Tensor, batch: int, rows, heads, qs: slice, ks: slice) -> torch.Tensor:
    """The part of a bias broadcastable to ``[B, H, Nq, Nk]`` for some rows, heads, queries, keys
    (broadcast dimensions of size 1 stay size 1)."""
    b = bias
    while b.dim() < 4:
        b = b.unsqueeze(0)  # [.., Nq|1, Nk|1] -> [1, 1, Nq|1, Nk|1]
    if rows is not None and b.shape[0] == batch:
        b = b[rows]
    if b.shape[1] != 1:
        b = b[:, heads]
    if b.shape[2] != 1:
        b = b[:, :, qs]
    if b.shape[3] != 1:
        b = b[:, :, :, ks]
    return b
