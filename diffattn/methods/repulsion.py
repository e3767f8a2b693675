"""Contextual-space repulsion: diversity within a prompt's batch by repelling MMDiT text streams.

Dahary et al., "On-the-fly Repulsion in the Contextual Space" (2026). In an MMDiT every block
returns enriched text tokens f̂_T^(l) that have absorbed the image (SD3 / SD3.5 joint blocks,
FLUX double blocks; FLUX single blocks carry text and image in one stream). Token k means the
same concept in every sample of a batch, so this *contextual space* is where samples of one
prompt can be pushed apart smoothly (§3, Fig. 3), unlike misaligned latents.

**Objective** (§3.2). Flatten sample i's N×D contextual tokens to c_i ∈ R^{ND}; the cosine
kernel K_ij = ⟨c_i, c_j⟩ / (‖c_i‖‖c_j‖) normalised to K̃ = K/B has eigenvalues λ_k, and

    L_div = −Σ_k λ_k log λ_k          (von Neumann entropy = log Vendi, Eq. 2–3)

is *ascended* M times inside each selected block:

    c_i ← c_i + (η/M)·∇_{c_i} L_div                                   (Eq. 4)

The gradient is taken with respect to the block outputs themselves (a B×B kernel): no
back-propagation through the network and no activation memory. Every step starts again from
the unedited prompt encoding, so the edit never accumulates across steps.

**Norm-invariant step** (``norm_invariant=True``). Every loss here is scale invariant
(L(αc) = L(c)), so ∇L ∝ 1/‖c‖ and the paper needs η = 5e2 … 8e9 depending on ‖c‖ (512×3072
FLUX tokens, 333×2432 SD3.5 tokens). With the option the step is taken on the unit-normalised
features, Δc_i = η·‖c_i‖²·∇_{c_i}L = η·‖c_i‖·∇_{ĉ_i}L: η is then the relative step and needs
no per-model rescaling.

**Spectral stability.** Identical (or near-identical) samples make K̃ rank one: eigenvalues
0 and ∇(λ log λ) = log λ + 1 diverges. The entropy is evaluated on the mixed state
(1 − ε)·K̃ + ε·I/B (ε = ``jitter``, default 1e-6), whose spectrum is bounded below by ε/B; the
eigenvalues come from ``eigvalsh`` in float64, whose backward V·diag(g)·Vᵀ has no
1/(λ_i − λ_j) term, so degenerate spectra are stable. For identical samples the gradient is
exactly zero (the symmetric point), never NaN.

**Other losses** (``loss=``, :data:`DIVERSITY_LOSSES`, each a function [B, d] -> scalar to
*ascend*): ``"vendi"`` (default), ``"rbf"`` (minus the particle-guidance RBF energy of Corso
et al. 2023 with the median-heuristic bandwidth), ``"dpp"`` (log det of the cosine kernel,
DiverseFlow's DPP; stiff for near-identical samples, its gradient grows as 1/jitter); or any
callable.

**Where and when.** Within each *prompt group* (rows of one branch with identical text
conditioning, :meth:`~diffattn.engine.ForwardContext.prompt_groups`) and each CFG branch
(``"uncond"``, ``"cond"``; never across): a guidance control's extra branch (``"perturbed"``)
is left untouched. Blocks: the middle third of the text-stream blocks by default (the paper's
SD3.5 ablation: best diversity); steps: the first τ. On FLUX single blocks the paper repels
all tokens (App. A, ``single="all"``); ``single="text"`` repels the text tokens only.

**Order.** The edit is a diffusers ``ModelHook`` ``post_forward`` on each selected block, so
it runs inside the denoiser forward: inside the guidance wrapper (it sees the wrapper's
batch, branches included), after every attention control of that block, and before the next
block. Hooks of several controls on one block run in ascending control ``order`` (the engine
registers them in that order; diffusers runs the first registered ``post_forward`` first).

    rep = da.ContextRepulsion(eta=0.5, tau=4, inner=10)   # norm-invariant η by default
    with da.attach(pipe, rep):
        images = pipe(prompt, num_images_per_prompt=4).images
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from ..controls import Control, no_sites
from ..errors import ControlError, UnsupportedModelError

BLOCK_CHOICES = ("first", "middle", "last", "all")  # thirds of the text-stream blocks, or all
SINGLE_MODES = ("all", "text")
STREAMS = ("text", "image")  # "image": the same edit on the image stream (the paper's ablation baseline)
IMAGE_POSITION = 1  # every text-stream block returns (text, image) (Family.text_stream_blocks)


# ----------------------------------------------------------------------------- pure math


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, d] in at least float32."""
    return x.reshape(x.shape[0], -1).to(torch.promote_types(x.dtype, torch.float32))


def cosine_kernel(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine kernel K_ij = ⟨c_i, c_j⟩ / (‖c_i‖‖c_j‖) of the flattened rows (§3.2, step 2).

    x: [B, ...] (each row flattened) -> [B, B] in at least float32; a zero row has K_ii = 0."""
    c = _rows(x)
    c = c / c.norm(dim=1, keepdim=True).clamp_min(eps)
    return c @ c.T


def von_neumann_entropy(k: torch.Tensor, jitter: float = 1e-6) -> torch.Tensor:
    """−Σ λ log λ of K̃ = K / B (Eq. 2–3): the log Vendi score of a kernel with unit diagonal.

    Evaluated on (1 − jitter)·K̃ + jitter·I/B in float64 (eigenvalues ≥ jitter/B, finite
    gradient for rank-deficient K; the module docstring); returns a float64 scalar."""
    n = k.shape[0]
    kt = k.to(torch.float64) / n
    kt = 0.5 * (kt + kt.T)  # exact symmetry for eigvalsh
    if jitter:
        kt = (1.0 - jitter) * kt + (jitter / n) * torch.eye(n, dtype=kt.dtype, device=kt.device)
    lam = torch.linalg.eigvalsh(kt).clamp_min(1e-300)
    return -(lam * lam.log()).sum()


def log_vendi(x: torch.Tensor, jitter: float = 1e-6) -> torch.Tensor:
    """log Vendi of the rows of ``x`` [B, ...] under the cosine kernel (§3.2, L_div): 0 for
    identical rows, log B for orthogonal ones."""
    return von_neumann_entropy(cosine_kernel(x), jitter)


def rbf_energy(x: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """Particle-guidance RBF energy (Corso et al. 2023): mean over i ≠ j of exp(−‖c_i − c_j‖²/h).

    h: the median heuristic median_{i≠j}‖c_i − c_j‖² / log(B − 1) (``/ 1`` for B = 2), held
    constant (detached) as in the official code; ``bandwidth`` fixes it. Descending the
    energy repels (its diversity loss is ``-rbf_energy``)."""
    c = _rows(x)
    n = c.shape[0]
    d2 = (c[:, None, :] - c[None, :, :]).pow(2).sum(-1)  # [B, B]
    off = ~torch.eye(n, dtype=torch.bool, device=c.device)
    if bandwidth is None:
        h = d2.detach()[off].median() / (math.log(n - 1) if n > 2 else 1.0)
        h = h.clamp_min(torch.finfo(c.dtype).tiny)
    else:
        h = torch.as_tensor(bandwidth, dtype=c.dtype, device=c.device)
    return torch.exp(-d2 / h)[off].mean()


def logdet_dpp(x: torch.Tensor, jitter: float = 1e-6) -> torch.Tensor:
    """log det(K + jitter·I) of the cosine kernel (a DPP's log-likelihood of the batch,
    DiverseFlow): 0 for orthogonal rows, very negative for near-identical ones (float64)."""
    k = cosine_kernel(x).to(torch.float64)
    k = 0.5 * (k + k.T) + jitter * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    return torch.linalg.slogdet(k)[1]


DIVERSITY_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "vendi": log_vendi,
    "rbf": lambda x: -rbf_energy(x),
    "dpp": logdet_dpp,
}


def diversity_gradient(x: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor] = log_vendi) -> torch.Tensor:
    """∇_x loss(x) for x [B, ...] by autograd on ``x`` alone (a detached copy: no graph into
    the network), in x's dtype promoted to at least float32; zeros where it is not finite.
    Works under ``torch.no_grad`` and ``torch.inference_mode`` (the leaf is a fresh copy)."""
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().to(torch.promote_types(x.dtype, torch.float32)).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(leaf), leaf)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def repel(x: torch.Tensor, eta: float, inner: int = 1, loss: Callable = log_vendi, *,
          norm_invariant: bool = True) -> torch.Tensor:
    """M = ``inner`` ascent steps x ← x + (η/M)·s·∇ loss(x) on one group's rows x [B, ...]
    (Eq. 4); s = ‖x_i‖² of the unedited row with ``norm_invariant`` (module docstring), else 1. Returns a
    new tensor of x's dtype; η = 0 or B < 2 returns ``x`` itself."""
    if eta == 0 or x.shape[0] < 2 or inner < 1:
        return x
    z = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    step = eta / inner
    # ‖x_i‖² of the *unedited* rows: rescaling by the current ‖z_i‖² instead compounds (each
    # step grows z by a fixed fraction, which grows the next step), overshooting by 1e5 at η ~ 100.
    scale = z.reshape(z.shape[0], -1).pow(2).sum(1).reshape((-1,) + (1,) * (z.dim() - 1))
    for _ in range(inner):
        g = diversity_gradient(z, loss)
        if norm_invariant:
            g = g * scale
        z = z + step * g
    return z.to(x.dtype)


# ----------------------------------------------------------------------------- the control


@dataclass(frozen=True)
class _Target:
    """One block to hook: its module name, the output positions holding the repelled stream."""

    name: str
    outputs: tuple[int, ...]
    kind: str



def text_stream_family(model):
    """The registered family of ``model`` that describes its text stream
    (``text_stream_blocks``); an :class:`UnsupportedModelError` naming those families otherwise."""
    from ..families import Family, families, family_of

    capable = [f for f in families() if type(f).text_stream_blocks is not Family.text_stream_blocks]
    module = next((m for m in model.modules() if hasattr(m, "processor")), None)  # its first attention module
    owner = family_of(model, module) if module is not None else None
    if owner in capable:
        return owner
    raise UnsupportedModelError(
        f"contextual repulsion edits the text stream passed between MMDiT blocks; {type(model).__name__} has none "
        f"(no family with a text stream owns it). Supported families: {', '.join(f.name for f in capable)} "
        f"({'; '.join(f.description for f in capable)})"
    )


def branch_groups(ctx, branches: Sequence[str]) -> list[list[int]]:
    """Batch rows repelled together: per branch of ``branches`` present in the forward, its
    prompt groups (:meth:`~diffattn.engine.ForwardContext.prompt_groups`), never across
    branches. The ``"uncond"`` rows of a CFG batch share one negative prompt, so they are
    grouped as their ``"cond"`` twins (row cond.start + j pairs with uncond.start + j), split
    further where their own conditioning differs: the samples of one prompt are repelled in
    both branches, and two prompts in one batch never mix. A separate uncond forward (FLUX
    true CFG) gets the same pairing from the engine (``ForwardContext.cond_text``)."""
    out: list[list[int]] = []
    cond, uncond = ctx.branches.get("cond"), ctx.branches.get("uncond")
    paired = (cond is not None and uncond is not None
              and cond.stop - cond.start == uncond.stop - uncond.start)
    for b in branches:
        if b not in ctx.branches:
            continue
        own = ctx.prompt_groups(b)
        if b == "uncond" and paired:
            which = {r: i for i, g in enumerate(own) for r in g}
            for g in ctx.prompt_groups("cond"):
                split: dict[int, list[int]] = {}
                for r in g:
                    u = r - cond.start + uncond.start
                    split.setdefault(which.get(u, -1), []).append(u)
                out.extend(split.values())
        else:
            out.extend(own)
    return out


class _RepulsionHook(ModelHook):
    """post_forward of one block: repel its text stream within each prompt group and branch."""

    def __init__(self, control: "ContextRepulsion", target: _Target):
        super().__init__()
        self.control = control
        self.target = target

    def post_forward(self, module, output):
        return self.control._edit(self.target, output)


class ContextRepulsion(Control):
    """On-the-fly repulsion in the contextual space (module docstring).

    eta:            step size η (0: off, bit-exact stock); relative with ``norm_invariant``
                    (default), the paper's raw η (5e2 … 8e9) without.
    tau:            act on the first τ denoising steps (``steps`` overrides it).
    inner:          M inner ascent steps per block (paper: 50 FLUX-dev, 100 SD3.5).
    loss:           ``"vendi"`` (default), ``"rbf"``, ``"dpp"`` (:data:`DIVERSITY_LOSSES`) or a
                    callable ``[B, N, D] -> scalar`` to ascend.
    blocks:         ``"middle"`` (default: the middle third of the text-stream blocks, in
                    execution order), ``"first"``, ``"last"``, ``"all"``, or indices into that
                    list / block module names (``"transformer_blocks.3"``).
    single:         FLUX single blocks: ``"all"`` tokens (the paper) or ``"text"`` only.
    stream:         ``"text"`` (the method) or ``"image"``: the same repulsion on the image
                    tokens f̂_I of the same blocks, the paper's image-token baseline (§4.3:
                    a strictly worse frontier, stagnant layouts and texture artefacts).
    norm_invariant: scale the step by ‖c_i‖² (η on the unit sphere).
    branches:       batch branches repelled (default ``("uncond", "cond")``, each on its own).
    """

    order = 0

    def __init__(self, eta: float = 0.5, tau: int = 1, inner: int = 10, *, loss: str | Callable = "vendi",
                 blocks: str | Sequence[int | str] = "middle", single: str = "all", stream: str = "text",
                 norm_invariant: bool = True,
                 steps=None, branches: Sequence[str] | str | None = ("uncond", "cond"), order: int | None = None):
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ControlError(f"ContextRepulsion eta={eta!r}: a finite step size >= 0")
        if not isinstance(tau, int) or tau < 0:
            raise ControlError(f"ContextRepulsion tau={tau!r}: the number of first steps to act on, an int >= 0")
        if not isinstance(inner, int) or inner < 1:
            raise ControlError(f"ContextRepulsion inner={inner!r}: the inner steps M, an int >= 1")
        if isinstance(loss, str):
            if loss not in DIVERSITY_LOSSES:
                raise ControlError(f"ContextRepulsion loss={loss!r}: choose one of {', '.join(DIVERSITY_LOSSES)} "
                                   f"or pass a callable")
            self.loss_name, self.loss = loss, DIVERSITY_LOSSES[loss]
        elif callable(loss):
            self.loss_name, self.loss = getattr(loss, "__name__", "custom"), loss
        else:
            raise ControlError(f"ContextRepulsion loss={loss!r}: a name ({', '.join(DIVERSITY_LOSSES)}) or a callable")
        if isinstance(blocks, str) and blocks not in BLOCK_CHOICES:
            raise ControlError(f"ContextRepulsion blocks={blocks!r}: {', '.join(BLOCK_CHOICES)}, or block indices / names")
        if single not in SINGLE_MODES:
            raise ControlError(f"ContextRepulsion single={single!r}: choose one of {', '.join(SINGLE_MODES)}")
        if stream not in STREAMS:
            raise ControlError(f"ContextRepulsion stream={stream!r}: choose one of {', '.join(STREAMS)}")
        super().__init__(sites=no_sites, steps=steps if steps is not None else (0, tau), branches=branches,
                         order=order)
        self.eta, self.tau, self.inner = float(eta), tau, inner
        self.blocks, self.single, self.stream, self.norm_invariant = blocks, single, stream, bool(norm_invariant)
        self._warned_group = False

    # ------------------------------------------------------------------ where
    def targets(self, model) -> list[_Target]:
        """The blocks of ``model`` this control hooks (UnsupportedModelError without a text stream)."""
        family = text_stream_family(model)
        stream = list(family.text_stream_blocks(model))  # [(name, output positions, kind)] in execution order
        chosen = self._choose(stream)
        out = []
        for name, outputs, kind in chosen:
            if self.stream == "image":
                outputs = (IMAGE_POSITION,)
            elif kind == "single" and self.single == "text":
                outputs = outputs[:1]
            out.append(_Target(name, tuple(outputs), kind))
        return out

    def _choose(self, stream: list) -> list:
        n = len(stream)
        if isinstance(self.blocks, str):
            if self.blocks == "all":
                return stream
            a, b = {"first": (0, 1), "middle": (1, 2), "last": (2, 3)}[self.blocks]
            lo, hi = (n * a) // 3, max((n * b) // 3, (n * a) // 3 + 1)
            return stream[lo:min(hi, n)]
        names = [s[0] for s in stream]
        got = []
        for b in self.blocks:
            if isinstance(b, int) and -n <= b < n:
                got.append(stream[b])
            elif isinstance(b, str) and b in names:
                got.append(stream[names.index(b)])
            else:
                raise ControlError(f"ContextRepulsion blocks: {b!r} is not one of the {n} text-stream blocks "
                                   f"(indices 0..{n - 1} or names such as {names[:2]})")
        return got

    def block_hooks(self, model) -> list:
        return [(t.name, _RepulsionHook(self, t)) for t in self.targets(model)]

    # ------------------------------------------------------------------ what
    @torch.compiler.disable
    def _edit(self, target: _Target, output):
        """The block's output with its stream repelled (returned unchanged when inactive)."""
        ctx = self.context
        if ctx is None or self.eta == 0:
            return output
        active = ctx.in_window.get(id(self))
        if active is None:
            active = self.window_holds(ctx.step)
        if not active:
            return output
        parts = [output[i] for i in target.outputs]
        if any(p is None for p in parts):
            return output
        branches = self.branches or tuple(ctx.branches)
        named = [b for b in branches if b in getattr(ctx, "groups", {})]
        if named:  # a loop's row groups (IR's "scene") cut across the prompt groups repulsion needs
            raise ControlError(f"ContextRepulsion repels the samples of one prompt within a branch; {named} are row "
                               f"groups of this loop, not branches: give branches such as 'cond' / 'uncond'")
        groups = [g for g in branch_groups(ctx, branches) if len(g) > 1]
        if not groups:
            if any(b in ctx.branches for b in branches):  # not a forward of other branches only
                self._warn_group()
            return output
        stream = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [B, N, D]
        edited = stream.clone()
        for rows in groups:
            index = torch.tensor(rows, device=stream.device)
            edited[index] = repel(stream[index], self.eta, self.inner, self.loss, norm_invariant=self.norm_invariant)
        out = list(output)
        start = 0
        for i, p in zip(target.outputs, parts):
            out[i] = edited[:, start:start + p.shape[1]]
            start += p.shape[1]
        return type(output)(out) if isinstance(output, tuple) else out

    def _warn_group(self) -> None:
        if not self._warned_group:
            self._warned_group = True
            warnings.warn(
                "ContextRepulsion found no prompt group of two or more samples in this batch: repulsion pushes the "
                "samples of one prompt apart and needs a group (num_images_per_prompt >= 2); it does nothing here",
                stacklevel=2,
            )

    def __repr__(self):
        return (f"ContextRepulsion(eta={self.eta:g}, tau={self.tau}, inner={self.inner}, loss={self.loss_name!r}, "
                f"blocks={self.blocks!r}, single={self.single!r}, stream={self.stream!r}, norm_invariant={self.norm_invariant}, "
                f"steps={self.steps!r}, branches={self.branches!r})")
