"""``diffattn.kernels``: the one attention function every diffattn processor calls.

    attention(q, k, v, *, scale=None, head_blend=None, bias=None, return_lse=False, backend="auto")
    attention_probs(q, k_subset, lse, *, scale=None, bias_subset=None)

q, k, v are [B, H, N, D]. ``head_blend`` ([H] or [B, H], u in [0, 1]) gives
(1-u)·softmax(qk^T)v + u·v per head (SoftPAG toward identity, exact in output space);
``bias`` is an additive float bias or a boolean mask (True = may attend, as PyTorch SDPA)
broadcastable to [B, H, Nq, Nk]; ``return_lse`` also returns the row log-sum-exp [B, H, Nq]
(fp32), which exact probability taps, segment-uniform attention and LSE merges use.

Other controls need no kernel change because they are exact output-space identities:
uniform attention over a key segment is the mean of V over that segment, weighted by the
segment's share exp(lse_seg - lse_all) (UAM); value mixing is linear in V (VMix).

Dispatch: ``backend="torch"`` is the reference (``F.scaled_dot_product_attention`` when no
extras are requested, so stock outputs are reproduced bit for bit); ``"auto"`` is the
reference on CPU and a Triton kernel on CUDA once one is registered.
"""
from __future__ import annotations

import torch

# Absolute imports on purpose: run from the repository root, this folder is also importable
# as a top-level ``kernels`` package, which transformers probes for (the PyPI package of that
# name); it must then import cleanly (and, having no __version__, is judged not to be it).
from diffattn.errors import DiffattnError
from diffattn.kernels.reference import attention_probs_reference, attention_reference

BACKENDS = ("auto", "torch", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class KernelError(DiffattnError, ValueError):
    """Bad input to an attention kernel (shapes, dtypes, an impossible option)."""


def _check(q, k, v, head_blend, bias, backend):
    if backend not in BACKENDS:
        raise KernelError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise KernelError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise KernelError(f"k and v must share [B, H, Nk]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise KernelError(f"q and k must share B, H and D; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype not in _DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise KernelError(f"q, k, v must share one floating dtype of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if head_blend is not None:
        if q.shape[-2] != k.shape[-2]:
            raise KernelError(
                f"head_blend interpolates toward the identity map, which needs self or joint attention "
                f"(Nq == Nk); got Nq={q.shape[-2]}, Nk={k.shape[-2]} (cross attention)"
            )
        ok = head_blend.shape in ((q.shape[1],), (q.shape[0], q.shape[1]))
        if not ok:
            raise KernelError(f"head_blend must be [H]={q.shape[1]} or [B, H]={tuple(q.shape[:2])}; got {tuple(head_blend.shape)}")
    if bias is not None:
        try:
            torch.broadcast_shapes(bias.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            raise KernelError(
                f"bias of shape {tuple(bias.shape)} does not broadcast to [B, H, Nq, Nk]="
                f"{(q.shape[0], q.shape[1], q.shape[2], k.shape[2])}"
            ) from None


def attention(q, k, v, *, scale=None, head_blend=None, bias=None, return_lse=False, backend="auto"):
    """Attention with per-head identity blend, bias/mask and optional row LSE (see module doc)."""
    _check(q, k, v, head_blend, bias, backend)
    if backend == "triton" or (backend == "auto" and q.is_cuda and _triton_available()):
        from diffattn.kernels.triton_attention import attention_triton

        return attention_triton(q, k, v, scale=scale, head_blend=head_blend, bias=bias, return_lse=return_lse)
    return attention_reference(q, k, v, scale=scale, head_blend=head_blend, bias=bias, return_lse=return_lse)


def attention_probs(q, k_subset, lse, *, scale=None, bias_subset=None):
    """Exact probabilities of queries × a key subset given the full-row LSE (never L×L).

    q: [B, H, Nq, D], k_subset: [B, H, Ns, D], lse: [B, H, Nq] -> [B, H, Nq, Ns] fp32.
    """
    if q.shape[:2] != k_subset.shape[:2] or lse.shape != q.shape[:3]:
        raise KernelError(
            f"taps need q [B,H,Nq,D], k_subset [B,H,Ns,D], lse [B,H,Nq]; got {tuple(q.shape)}, "
            f"{tuple(k_subset.shape)}, {tuple(lse.shape)}"
        )
    return attention_probs_reference(q, k_subset, lse, scale=scale, bias_subset=bias_subset)


def _triton_available() -> bool:
    try:
        from diffattn.kernels import triton_attention  # noqa: F401
    except ImportError:
        return False
    return True
