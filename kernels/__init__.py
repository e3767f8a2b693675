"""``diffattn.kernels``: the one attention function every diffattn processor calls.

    attention(q, k, v, *, scale=None, head_blend=None, bias=None, return_lse=False, backend="auto", spec=None)
    attention_probs(q, k_subset, lse, *, scale=None, bias_subset=None, backend="auto")

q is [B, H, Nq, D]; k, v are [B, H, Nk, D]. The output is [B, H, Nq, D] in q's dtype.

- ``scale``: the softmax scale, default ``D ** -0.5`` (as SDPA).
- ``head_blend`` u ([H] or [B, H], u in [0, 1]; values outside extrapolate and are not checked,
  to avoid a host sync): ``(1-u)·softmax(qkᵀ·scale + bias)·v + u·v`` per head. This is SoftPAG's
  interpolation toward the identity attention map, done exactly in output space (I·V = V), so
  no L×L map is built. It needs self or joint attention (Nq == Nk).
- ``bias``: an additive float bias or a boolean mask (True = may attend, as
  ``F.scaled_dot_product_attention``) broadcastable to [B, H, Nq, Nk].
- ``return_lse``: also return the row log-sum-exp [B, H, Nq] (fp32; fp64 for fp64 inputs on the
  reference) of the scaled scores plus bias over all keys. Exact taps, segment-uniform
  attention and LSE merges use it.

- ``spec``: a :class:`KernelSpec` instead of the field arguments, the whole request as one
  object (what the processors pass): ``head_blend``, ``bias``, ``return_lse`` as above, plus
  ``uniform_keys`` (a :class:`SegmentUniform`: segment-uniform keys, see below) and ``sparse``
  (a :class:`BlockSparsePlan`: attend only to the selected key blocks of each query block;
  exact on every backend, rows with no selected key give 0 and lse -inf; optionally rectified,
  ``out = R·O_sparse + comp`` per query block, Rectified SpaAttn, :mod:`diffattn.kernels.sparse`).
  Pass either ``spec`` or the field arguments, not both. The return follows ``spec.return_lse``.

``attention_probs`` is the tap: ``exp(q·k_subsetᵀ·scale + bias_subset - lse)`` [B, H, Nq, Ns]
(fp32) for a query segment and a key subset, given the *full-row* lse of the main call, so the
L×L matrix is never stored; it is differentiable in q, k_subset and lse.

Composites that need no kernel of their own, because they are exact output-space identities
(:mod:`diffattn.kernels.composite`, exported here):

- **UAM** (uniform attention over a key segment S, :func:`uniform_keys_attention`,
  :func:`segment_uniform_attention`): a uniform map over S gives ``(1/|S|)·Σ_{j∈S} v_j``, the
  mean of V over the segment, a [B, H, 1, D] vector; to keep the other keys' softmax and give S
  its original total share, weight it by ``exp(lse_S - lse_all)`` and combine with the
  attention over the other keys through their LSEs (:func:`merge_lse`, the log-sum-exp merge of
  partial attentions). Only means and LSEs are needed.
- **VMix** (value-mixed cross-attention): attention output is linear in V, so
  ``A·(α V₁ + (1-α) V₂) = α A·V₁ + (1-α) A·V₂``: mixing the values before the call is the same
  kernel call on the mixed V.

Dispatch (one point, flash-attention interface style):

- ``backend="torch"``: the reference (:mod:`diffattn.kernels.reference`). With no blend, bias
  or lse it calls ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)``
  exactly as the stock diffusers processors do, so stock outputs are reproduced bit for bit.
- ``backend="triton"``: the fused Triton kernel (:mod:`diffattn.kernels.triton_attention`,
  :mod:`diffattn.kernels.taps`): fp16/bf16/fp32, head dims up to 256. On CPU tensors it needs
  Triton's interpreter: ``TRITON_INTERPRET=1`` set in the environment before the kernels are
  first imported (fp16/fp32 only); otherwise a :class:`KernelError` says so.
- ``backend="auto"``: Triton on CUDA tensors when the call needs the row LSE (taps,
  segment-uniform attention, LSE merges: what SDPA does not return) and the kernel supports
  the inputs (dtype, head dim, no float bias that needs a gradient); the torch reference
  otherwise. A blend or bias alone goes to SDPA (flash / memory-efficient) plus the exact
  output-space blend (one ``torch.lerp``): on an H100 the vendor kernels are the faster
  choice there (benchmarks/RESULTS.md, "GPU figures").
- a block-sparse call (``spec.sparse``) that asks nothing the sparse kernels cannot do (no
  head blend or uniform keys, no gradient, no bias but a boolean key mask ``[B|1, H|1, 1, Nk]``,
  e.g. per-row padded text, which the sparse kernels apply inside the selected blocks): on
  CUDA the Triton LUT kernel
  (:mod:`diffattn.kernels.triton_sparse`: loops over the selected blocks only, rectification in
  its epilogue) when it supports the inputs, and on CPU the gathered-blocks path
  (:func:`diffattn.kernels.sparse.gathered_attention`, faster than dense SDPA once most blocks
  are dropped); ``backend="triton"`` takes the LUT kernel (the interpreter on CPU) where it
  supports the plan. Everything else, and ``backend="torch"``, runs the plan as a masked dense
  call (the reference: the exactness oracle of the sparse kernels).
- ``with use_backend("triton"):`` makes calls that leave ``backend="auto"`` (every processor's
  call) take that backend instead, e.g. to run a whole pipeline on the Triton kernels on CPU
  under the interpreter, or on the reference on CUDA.

torch.compile: the Triton launches are ``torch.library`` custom ops (``diffattn::attention``,
``diffattn::attention_backward``, ``diffattn::attention_probs``) with fake (meta)
implementations and registered autograd, so a compiled model traces them as single graph
nodes, without graph breaks, on CPU (interpreter) and CUDA; the reference path is plain torch
and traces as such.
"""
from __future__ import annotations

import contextlib

import torch

# Absolute imports on purpose: run from the repository root, this folder is also importable
# as a top-level ``kernels`` package, which transformers probes for (the PyPI package of that
# name); it must then import cleanly (and, having no __version__, is judged not to be it).
from diffattn.kernels.errors import KernelError
from diffattn.kernels.reference import attention_probs_reference, attention_reference
from diffattn.kernels.spec import BlockSparsePlan, KernelSpec, SegmentUniform, lut_from_mask

__all__ = ["attention", "attention_probs", "KernelError", "BACKENDS", "triton_available", "use_backend",
           "KernelSpec", "SegmentUniform", "BlockSparsePlan", "merge_lse", "blend_heads", "uniform_keys_attention",
           "segment_uniform_attention", "lut_from_mask"]

BACKENDS = ("auto", "torch", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(x) -> tuple:
    return tuple(x.shape)


def _check_backend(backend):
    if backend not in BACKENDS:
        raise KernelError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def _check_bias(bias, target, q, name="bias"):
    """bias: bool or floating, on q's device, broadcastable to ``target``."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise KernelError(f"{name} must be a tensor (additive float bias or boolean mask); got {type(bias).__name__}")
    if bias.dtype != torch.bool and not bias.dtype.is_floating_point:
        raise KernelError(f"{name} must be an additive float bias or a boolean mask (True = may attend); got {bias.dtype}")
    if bias.device != q.device:
        raise KernelError(f"{name} is on {bias.device} but q is on {q.device}; move it to q's device")
    try:
        torch.broadcast_shapes(bias.shape, target)
    except RuntimeError:
        raise KernelError(f"{name} of shape {_shape(bias)} does not broadcast to [B, H, Nq, Nk]={target}") from None


def _check(q, k, v, head_blend, bias, backend):
    """Validate the arguments of :func:`attention`; raise :class:`KernelError` saying what to fix."""
    _check_backend(backend)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise KernelError(f"{name} must be a torch.Tensor [B, H, N, D]; got {type(x).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise KernelError(f"q, k, v must be [B, H, N, D]; got {_shape(q)}, {_shape(k)}, {_shape(v)}")
    if k.shape[:3] != v.shape[:3]:
        raise KernelError(f"k and v must share [B, H, Nk]; got {_shape(k)} and {_shape(v)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise KernelError(f"q and k must share B, H and D; got {_shape(q)} and {_shape(k)}")
    if q.shape[-1] == 0:
        raise KernelError("head dim D must be at least 1")
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise KernelError("attention needs at least one key (Nk = 0); drop the call or add keys")
    if q.dtype not in _DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise KernelError(f"q, k, v must share one floating dtype of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise KernelError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if head_blend is not None:
        if q.shape[-2] != k.shape[-2]:
            raise KernelError(
                f"head_blend interpolates toward the identity map, which needs self or joint attention "
                f"(Nq == Nk); got Nq={q.shape[-2]}, Nk={k.shape[-2]} (cross attention)"
            )
        if not isinstance(head_blend, torch.Tensor) or not head_blend.dtype.is_floating_point:
            raise KernelError(f"head_blend must be a floating tensor [H] or [B, H] of weights u in [0, 1]; got "
                              f"{getattr(head_blend, 'dtype', type(head_blend).__name__)}")
        if head_blend.shape not in ((q.shape[1],), (q.shape[0], q.shape[1])):
            raise KernelError(f"head_blend must be [H]={q.shape[1]} or [B, H]={_shape(q)[:2]}; got {_shape(head_blend)}")
        if head_blend.device != q.device:
            raise KernelError(f"head_blend is on {head_blend.device} but q is on {q.device}; move it to q's device")
    _check_bias(bias, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q)


def attention(q, k, v, *, scale=None, head_blend=None, bias=None, return_lse=False, backend="auto", spec=None):
    """Attention with per-head identity blend, bias/mask and optional row LSE (see the module doc).

    Returns ``out`` [B, H, Nq, D], or ``(out, lse)`` with lse [B, H, Nq] when ``return_lse``
    (``spec.return_lse`` when a :class:`KernelSpec` is given as ``spec``).
    """
    if spec is None:
        _check(q, k, v, head_blend, bias, backend)
        return _dense(q, k, v, scale, head_blend, bias, return_lse, backend)
    if not isinstance(spec, KernelSpec):
        raise KernelError(f"spec must be a diffattn.kernels.KernelSpec; got {type(spec).__name__} (a control's "
                          f"AttentionSpec becomes one through diffattn.processors.base.kernel_spec(call))")
    if head_blend is not None or bias is not None or return_lse:
        raise KernelError("pass either spec= or the field arguments (head_blend, bias, return_lse), not both: "
                          "put them into the KernelSpec")
    head_blend, bias, uniform, sparse, need_lse = spec.head_blend, spec.bias, spec.uniform_keys, spec.sparse, spec.return_lse
    _check(q, k, v, head_blend, bias, backend)
    if uniform is not None:
        if not isinstance(uniform, SegmentUniform):
            raise KernelError(f"spec.uniform_keys must be a diffattn.kernels.SegmentUniform (key positions); got "
                              f"{type(uniform).__name__}")
        uniform.check(q, k)
    if sparse is not None:
        if not isinstance(sparse, BlockSparsePlan):
            raise KernelError(f"spec.sparse must be a diffattn.kernels.BlockSparsePlan; got {type(sparse).__name__}")
        sparse.check(q, k)
        if sparse.rectified and uniform is not None:
            raise KernelError("a rectified BlockSparsePlan (rescale / comp) cannot be combined with uniform_keys: "
                              "drop one of them (plan.rescale = plan.comp = None gives the plain block-sparse plan)")
        route = _route(backend, q, k, v, bias, need_lse=True, sparse=sparse, head_blend=head_blend, uniform=uniform)
        if route in ("sparse_triton", "sparse_cpu"):  # a bias here is a boolean key mask: the kernels take it
            from diffattn.kernels.sparse import gathered_attention, key_mask_of

            key_mask = key_mask_of(bias, k.shape[2])
            if route == "sparse_triton":
                from diffattn.kernels.triton_sparse import sparse_attention_triton

                out, lse = sparse_attention_triton(q, k, v, sparse, scale=scale, key_mask=key_mask)
            else:
                lut, counts = sparse.compact_lut(k.shape[2])
                out, lse = gathered_attention(q, k, v, lut, counts, sparse.block_q, sparse.block_k, scale=scale,
                                              rescale=sparse.rescale, comp=sparse.comp, key_mask=key_mask)
            return (out, lse) if need_lse else out
        bias = sparse.masked_bias(bias, q.shape[2], k.shape[2])
    if uniform is not None:
        out, lse = segment_uniform_attention(q, k, v, uniform, scale=scale, head_blend=head_blend, bias=bias,
                                             need_lse=need_lse, backend=backend)
        return (out, lse) if need_lse else out
    if sparse is not None:
        # the LSE route defines rows left without keys (out = 0) on every backend; SDPA may give NaN there
        if not sparse.rectified:
            out, lse = _dense(q, k, v, scale, head_blend, bias, True, backend)
        else:  # R·O + comp on the attention itself, then the head blend mixes in V
            out, lse = _dense(q, k, v, scale, None, bias, True, backend)
            out = sparse.rectify(out)
            if head_blend is not None:
                out = blend_heads(out, v, head_blend)
        return (out, lse) if need_lse else out
    return _dense(q, k, v, scale, head_blend, bias, need_lse, backend)


def _dense(q, k, v, scale, head_blend, bias, return_lse, backend):
    """One kernel call of validated inputs, on the backend :func:`_route` picks."""
    if _route(backend, q, k, v, bias, need_lse=return_lse) == "triton":
        from diffattn.kernels.triton_attention import attention_triton

        return attention_triton(q, k, v, scale=scale, head_blend=head_blend, bias=bias, return_lse=return_lse)
    return attention_reference(q, k, v, scale=scale, head_blend=head_blend, bias=bias, return_lse=return_lse)


def attention_probs(q, k_subset, lse, *, scale=None, bias_subset=None, backend="auto"):
    """Exact probabilities of queries × a key subset given the full-row LSE (never L×L).

    q: [B, H, Nq, D], k_subset: [B, H, Ns, D], lse: [B, H, Nq] (over *all* keys of the main
    call), bias_subset broadcastable to [B, H, Nq, Ns] -> [B, H, Nq, Ns] fp32 (fp64 for fp64
    inputs on the reference). Differentiable in q, k_subset and lse.
    """
    _check_backend(backend)
    if not all(isinstance(x, torch.Tensor) for x in (q, k_subset, lse)):
        raise KernelError("q, k_subset and lse must be tensors")
    if (q.dim() != 4 or k_subset.dim() != 4 or q.shape[:2] != k_subset.shape[:2]
            or q.shape[-1] != k_subset.shape[-1] or lse.shape != q.shape[:3]):
        raise KernelError(
            f"taps need q [B,H,Nq,D], k_subset [B,H,Ns,D], lse [B,H,Nq]; got {_shape(q)}, "
            f"{_shape(k_subset)}, {_shape(lse)}"
        )
    if q.dtype not in _DTYPES or q.dtype != k_subset.dtype or not lse.dtype.is_floating_point:
        raise KernelError(f"q and k_subset must share one floating dtype of {_DTYPES} and lse must be floating; "
                          f"got {q.dtype}, {k_subset.dtype}, {lse.dtype}")
    if not (q.device == k_subset.device == lse.device):
        raise KernelError(f"q, k_subset, lse must be on one device; got {q.device}, {k_subset.device}, {lse.device}")
    _check_bias(bias_subset, (q.shape[0], q.shape[1], q.shape[2], k_subset.shape[2]), q, name="bias_subset")
    if _route(backend, q, k_subset, k_subset, None) == "triton":
        from diffattn.kernels.taps import attention_probs_triton

        return attention_probs_triton(q, k_subset, lse, scale=scale, bias_subset=bias_subset)
    return attention_probs_reference(q, k_subset, lse, scale=scale, bias_subset=bias_subset)


def _sparse_key_mask(bias, n_key: int) -> bool:
    """Whether a block-sparse call's bias is a boolean key mask the sparse kernels apply (shape checks only)."""
    from diffattn.kernels.sparse import key_mask_of

    return key_mask_of(bias, n_key) is not None


_TRITON_OK: bool | None = None


def triton_available() -> bool:
    """Whether the Triton kernels import (Triton installed and working); cached."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            from diffattn.kernels import taps, triton_attention  # noqa: F401
        except Exception:  # ImportError, or a Triton that fails to initialise
            _TRITON_OK = False
        else:
            _TRITON_OK = True
    return _TRITON_OK


_AUTO_BACKEND = "auto"  # what backend="auto" means; set by use_backend


@contextlib.contextmanager
def use_backend(backend: str):
    """Within the block, calls that leave ``backend="auto"`` take ``backend`` ("torch" or
    "triton"; "auto" restores the dispatch rule). Explicit ``backend=`` arguments still win.
    Enter it outside a compiled region (it is host state; torch.compile guards on it)."""
    global _AUTO_BACKEND
    _check_backend(backend)
    previous, _AUTO_BACKEND = _AUTO_BACKEND, backend
    try:
        yield
    finally:
        _AUTO_BACKEND = previous


def _route(backend, q, k, v, bias, need_lse: bool = True, *, sparse=None, head_blend=None, uniform=None) -> str:
    """The one dispatch decision: which kernel runs a call ("auto" reads :func:`use_backend` first).

    - ``"sparse_triton"`` / ``"sparse_cpu"``: a block-sparse plan (``sparse``) with nothing the
      sparse kernels cannot do (no head blend, uniform keys or gradient, and no bias other than
      a boolean key mask broadcast over the queries, :func:`diffattn.kernels.sparse.key_mask_of`,
      which both kernels apply inside the selected blocks): the Triton LUT kernel for "triton",
      and for "auto" on CUDA inputs it supports; the gathered-blocks path for "auto" on CPU;
    - ``"triton"``: the dense Triton kernel for "triton", and for "auto" on supported CUDA
      inputs of a call that needs the LSE (taps always do);
    - ``"reference"``: everything else (a plan then runs masked: the oracle).
    """
    if backend == "auto":
        backend = _AUTO_BACKEND
    if backend == "torch":
        return "reference"
    if backend == "triton" and not triton_available():
        raise KernelError("backend='triton' needs the triton package (pip install triton, Linux); "
                          "use backend='torch'")
    if sparse is not None and head_blend is None and uniform is None and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))) and (
            bias is None or _sparse_key_mask(bias, k.shape[2])):
        if (backend == "triton" or q.is_cuda) and triton_available():
            from diffattn.kernels.triton_sparse import unsupported as sparse_unsupported

            if sparse_unsupported(q, k, v, sparse) is None:
                return "sparse_triton"
        elif backend == "auto" and q.device.type == "cpu":
            return "sparse_cpu"
    if backend == "triton":
        return "triton"
    if not q.is_cuda or not need_lse or not triton_available():
        return "reference"
    from diffattn.kernels.triton_attention import unsupported

    return "triton" if unsupported(q, k, v, bias) is None else "reference"


# last: the composites call attention() (defined above)
from diffattn.kernels.composite import (  # noqa: E402
    blend_heads,
    merge_lse,
    segment_uniform_attention,
    uniform_keys_attention,
)
