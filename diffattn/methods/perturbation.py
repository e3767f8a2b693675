"""Perturbed attention in output space: the math of PAG, SoftPAG and their targets.

Ahn et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (arXiv
2506.10978), Eq. 7 (SoftPAG) interpolates a head's attention map toward a target map P:

    A' = (1 - u) A + u P,      so      O' = A' V = (1 - u) O + u P V,

exact because O = A V is linear in A. Every function here therefore works on outputs and
values only and never builds the L x L map. Targets (paper App. C):

- identity  P = I             ->  P V = V                         (PAG, Ahn et al. 2024)
- uniform   P = 1/N           ->  P V = mean_j V_j                 (SoftUG)
- meanquery P = softmax(q̄ K^T) ->  P V = attention(q̄, K, V)        (SEG with sigma -> inf,
                                                                    Hong 2024; SoftSEG)

Joint attention (MMDiT) needs a choice of which rows and keys the target covers:

- ``joint``:      the target spans the whole joint sequence (the paper's code);
- ``image``:      image rows take the target over the whole sequence, text rows are untouched;
- ``image-self``: image queries attend to themselves plus all text keys, text rows are
                  untouched (diffusers' ``PAGJointAttnProcessor2_0``); identity target only.

All tensors are [B, H, N, D] (heads second, as ``diffattn.kernels.attention``).
"""
from __future__ import annotations

import torch

from ..errors import ControlError

TARGETS = ("identity", "uniform", "meanquery")
SEMANTICS = ("joint", "image", "image-self")


def soft_blend(out: torch.Tensor, target: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SoftPAG Eq. 7 in output space: (1 - u) * out + u * target.

    out, target: [B, H, N, D]; u: broadcastable to [B, H, N, 1] (0 leaves ``out`` as is).
    Written as ``out + u * (target - out)`` so u = 0 returns ``out`` bit for bit.
    """
    return out + u * (target - out)


def identity_target(v: torch.Tensor) -> torch.Tensor:
    """P = I: every query returns its own value. v: [B, H, N, D] -> [B, H, N, D]."""
    return v


def uniform_target(v: torch.Tensor, n_queries: int) -> torch.Tensor:
    """P = 1/N_k: every query returns the mean value. v: [B, H, Nk, D] -> [B, H, Nq, D]."""
    return v.mean(dim=-2, keepdim=True).expand(*v.shape[:-2], n_queries, v.shape[-1])


def meanquery_target(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attention_fn) -> torch.Tensor:
    """SEG at sigma -> inf: the mean query attends for every row (HeadHunter App. C).

    q: [B, H, Nq, D] (the rows whose mean is taken), k, v: [B, H, Nk, D] -> [B, H, Nq, D].
    """
    q_mean = q.mean(dim=-2, keepdim=True)  # [B, H, 1, D]
    out = attention_fn(q_mean, k, v, scale=scale)  # [B, H, 1, D]
    return out.expand(*q.shape[:-1], v.shape[-1])


def image_self_target(
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    k_txt: torch.Tensor,
    v_txt: torch.Tensor,
    scale: float,
    attention_fn,
) -> torch.Tensor:
    """Image queries attend to themselves plus all text keys (diffusers' SD3 PAG mask).

    The row's softmax runs over {its own key} ∪ text keys; computed exactly by merging the
    self term with a text-only attention through their log-sum-exps:

        s_i = q_i·k_i·scale,   (O_txt, L_txt) = attention(q_i, K_txt, V_txt)
        out_i = σ(s_i - L_txt)·v_i + σ(L_txt - s_i)·O_txt,i          (σ = logistic)

    q_img, k_img, v_img: [B, H, Ni, D]; k_txt, v_txt: [B, H, Nt, D] -> [B, H, Ni, D].
    """
    acc = torch.promote_types(q_img.dtype, torch.float32)  # fp32 at least, fp64 kept
    self_score = (q_img.to(acc) * k_img.to(acc)).sum(-1) * scale  # [B, H, Ni]
    if k_txt.shape[-2] == 0:
        return v_img
    o_txt, lse_txt = attention_fn(q_img, k_txt, v_txt, scale=scale, return_lse=True)  # [B,H,Ni,D], [B,H,Ni]
    w_self = torch.sigmoid(self_score - lse_txt.to(acc)).unsqueeze(-1).to(v_img.dtype)  # [B, H, Ni, 1]
    return w_self * v_img + (1 - w_self) * o_txt


def check_target(target: str, semantics: str) -> None:
    if target not in TARGETS:
        raise ControlError(f"unknown perturbation target {target!r}; choose one of {TARGETS}")
    if semantics not in SEMANTICS:
        raise ControlError(f"unknown joint-attention semantics {semantics!r}; choose one of {SEMANTICS}")
    if semantics == "image-self" and target != "identity":
        raise ControlError(
            "semantics 'image-self' is defined for the identity target only (diffusers' SD3 PAG mask); "
            "use semantics 'image' or 'joint' for the uniform and meanquery targets"
        )


def materialised_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    *,
    target: str = "identity",
    semantics: str = "joint",
    image: slice | None = None,
    text: slice | None = None,
) -> torch.Tensor:
    """The perturbed attention built the slow way, for tests: materialise A, build the target
    map P explicitly, form A' = (1-u) A + u P per head, and return A' V (float64).

    q, k, v: [B, H, N, D] (self/joint attention); u: [H]; image/text: the segments' slices
    (needed for the ``image`` and ``image-self`` semantics).
    """
    q, k, v = q.double(), k.double(), v.double()
    n, d = q.shape[-2], q.shape[-1]
    scale = d**-0.5
    logits = q @ k.transpose(-1, -2) * scale  # [B, H, N, N]
    attn = logits.softmax(-1)
    rows = torch.zeros(n, dtype=torch.bool)
    rows[image if semantics != "joint" else slice(None)] = True
    if target == "identity":
        p = torch.eye(n, dtype=q.dtype).expand_as(attn)
    elif target == "uniform":
        p = torch.full_like(attn, 1.0 / n)
    elif target == "meanquery":
        q_mean = q[..., rows, :].mean(-2, keepdim=True)  # [B, H, 1, D]
        p = (q_mean @ k.transpose(-1, -2) * scale).softmax(-1).expand_as(attn)
    else:
        raise ValueError(target)
    if semantics == "image-self":
        masked = logits.clone()
        img_idx = torch.arange(n)[image]
        block = torch.full((len(img_idx), len(img_idx)), float("-inf"), dtype=q.dtype)
        block.fill_diagonal_(0.0)
        masked[..., image, image] = logits[..., image, image] + block
        p = masked.softmax(-1)
    uu = u.double().view(1, -1, 1, 1) * rows.double().view(1, 1, n, 1)  # [1, H, N, 1]
    attn_new = (1 - uu) * attn + uu * p
    return attn_new @ v
