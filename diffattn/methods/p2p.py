"""Prompt-to-prompt attention control (Hertz et al., "Prompt-to-Prompt Image Editing with
Cross Attention Control", ICLR 2023): the word-swap editor UAM's three-branch editing builds on.

    from diffattn.methods.p2p import PromptToPromptReplace
"""
from __future__ import annotations

import torch

from diffattn.controls import AttentionCall, Control, StepWindow
from diffattn.errors import ControlError
from diffattn.kernels import attention


class PromptToPromptReplace(Control):
    """Prompt-to-prompt word swap (Hertz et al. 2023, §3.2 "Word Swap"): the target branch's
    attention maps are the source branch's, exactly and without materialising them,

        O_tgt = A_src·V_tgt = attention(q_src, k_src, v_tgt)       (attention is linear in V)

    cross_steps: steps where cross-attention maps are replaced (UNet ``attn2``; on joint
                 sites the image rows of the joint map);
    self_steps:  steps where self-attention maps are replaced, only at sites with at most
                 ``self_max_tokens`` queries (``None``: every self site; UAM's P2P code, from
                 PnPInversion, replaces the 32×32 and coarser maps of SD's 64×64 latent, i.e.
                 latent tokens / 4; Hertz et al.'s original, 16×16 and coarser);
    source, target: the branch names of the two batch rows (``handle.branches``).

    Equal token counts are needed (the map of token j goes to token j); the caller checks.
    P2P edits only the conditional rows: name the unconditional rows something else.
    """

    order = 70

    def __init__(self, cross_steps=None, self_steps=None, *, self_max_tokens: int | None = None,
                 source: str = "source", target: str = "target", sites="all"):
        super().__init__(sites=sites, branches=(target,))
        self.cross_steps = StepWindow.of(cross_steps)
        self.self_steps = StepWindow.of(self_steps)
        self.self_max_tokens = self_max_tokens
        self.source, self.target = source, target

    def _window(self, call: AttentionCall) -> StepWindow | None:
        if call.site.kind == "self":
            if self.self_max_tokens is not None and call.q.shape[2] > self.self_max_tokens:
                return None
            return self.self_steps
        return self.cross_steps

    def is_active(self, call: AttentionCall) -> bool:
        if call.part != "main" or not (call.has_branch((self.target,)) and call.has_branch((self.source,))):
            return False
        window = self._window(call)
        return window is not None and window.contains(call.step) and super().is_active(call)

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        src, tgt = call.branches[self.source], call.branches[self.target]
        if call.site.kind in ("joint", "single"):
            qrows = call.layout.q("image").slice  # the image rows of the joint map
        else:
            qrows = slice(None)
        bias = call.spec.bias
        if bias is not None and bias.dim() == 4 and bias.shape[0] == call.q.shape[0]:
            bias = bias[src]
        if bias is not None and bias.dim() >= 2 and bias.shape[-2] != 1:
            bias = bias[..., qrows, :]
        q_s, k_s, v_t = call.q[src][:, :, qrows], call.k[src], call.v[tgt]  # [b, H, Nq', D], [b, H, Nk, D]
        if q_s.shape[0] != v_t.shape[0]:
            raise ControlError(f"prompt-to-prompt needs as many {self.source!r} rows as {self.target!r} rows; got "
                               f"{q_s.shape[0]} and {v_t.shape[0]}")
        new = attention(q_s, k_s, v_t, scale=call.scale, bias=bias)  # [b, H, Nq', D]
        out = out.clone()
        sub = out[tgt]  # a view: tgt is a slice
        sub[:, :, qrows] = new.to(out.dtype)
        return out
