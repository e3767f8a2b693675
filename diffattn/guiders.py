"""SoftPAG as a Modular Diffusers guider: ``diffusers.guiders`` with per-head strengths.

diffusers 0.36+ runs guidance in Modular Diffusers through *guiders*
(``diffusers.guiders``: ``ClassifierFreeGuidance``, ``PerturbedAttentionGuidance``,
``SkipLayerGuidance``...). A denoise step asks the guider to split its inputs into batches
(``prepare_inputs``), runs one denoiser forward per batch between ``prepare_models`` and
``cleanup_models``, and hands the predictions to the guider (``guider(batches)``), which
combines them. :class:`SoftPAGGuidance` is such a guider: pass it wherever you would pass
``PerturbedAttentionGuidance``::

    from diffusers.modular_pipelines import StableDiffusion3AutoBlocks
    import diffattn as da

    pipe = StableDiffusion3AutoBlocks().init_pipeline(repo_id)   # or blocks.init_pipeline()
    pipe.load_components(...)                                    # or update_components(**components)
    pipe.update_components(guider=da.SoftPAGGuidance(
        heads={"transformer_blocks.7.attn": [0, 3], "transformer_blocks.9.attn": {5: 0.5}},
        strength=0.7, guidance_scale=7.0, perturbed_guidance_scale=3.0))
    latents = pipe(prompt="...", negative_prompt="", output="latents")

The guided prediction is PAG's (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance", arXiv 2403.17377, Eq. 11, with CFG added as diffusers does):

    ε = ε_u + w·(ε_c - ε_u) + s·(ε_c - ε_pert)

(without CFG: ε = ε_c + s·(ε_c - ε_pert) with ``use_original_formulation=True``; by default
diffusers' guiders centre on the negative prediction, ε = ε_pert + s·(ε_c - ε_pert), as CFG's
ε_u + w·(ε_c - ε_u), and this guider does the same), where ε_pert is the conditional prediction with
the selected heads perturbed by SoftPAG (Ahn et al. 2025, "Fine-Grained Perturbation
Guidance via Attention Head Selection", arXiv 2506.10978, Eq. 7): head h of a selected site
uses A' = (1 - u_h)·A + u_h·P, P the target map (identity for PAG). u_h = 1 on every head of
the chosen layers with ``target="identity"`` is diffusers' ``PerturbedAttentionGuidance``
on the same layers; u = 0 everywhere is plain CFG.

How the perturbation is installed: for the perturbed batch only, ``prepare_models`` attaches a
diffattn control (SoftPAG's head blend, ``diffattn.methods.softpag`` /
``diffattn.methods.perturbation``) with :func:`diffattn.attach` and names every row of that
forward the ``"perturbed"`` branch; ``cleanup_models`` detaches it, which restores the exact
original processor objects and removes every hook. The conditional and unconditional forwards
run the model untouched. No layer-skip hook or ``TorchFunctionMode`` is used, so the
perturbation is exact in output space (``(1-u)·O + u·V`` for the identity target; the L×L
map is never built) and works on every family diffattn supports.

Where it departs from diffusers' ``PerturbedAttentionGuidance`` (0.42.1), on purpose:

- diffusers' layer-skip hooks look up the processor's class in ``AttentionProcessorRegistry``,
  which lacks SD3's ``JointAttnProcessor2_0``: its PAG raises "not registered" on SD3. This
  guider needs no registry.
- Without CFG (``guidance_scale=1``) diffusers' PAG prepares its ``pred_cond_skip`` batch from
  the *negative* inputs (tuple index 1) and installs no hook for it (``is_conditional`` is
  false at the second batch), so it computes plain CFG with scale s. Here the perturbed batch
  takes the conditional inputs and is perturbed.
- ``fqn="auto"`` in diffusers picks the first stack of an unordered set (per-process order on
  models with two stacks, FLUX); ``perturbed_guidance_fqn="auto"`` asks for the stack instead.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg

from .errors import ControlError, SelectorError
from .methods.softpag import PERTURBABLE_KINDS, SoftPAG, is_preset, load_preset

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

# Block stacks ``perturbed_guidance_fqn="auto"`` looks for, in this order (diffusers' own list;
# diffusers keeps it in a set, whose order changes with PYTHONHASHSEED: a model with two stacks,
# such as FLUX, would get a different stack per process; here that case asks for the fqn).
_BLOCK_STACKS = ("blocks", "transformer_blocks", "single_transformer_blocks", "layers",
                 "visual_transformer_blocks", "temporal_transformer_blocks")

_PERTURBED = "pred_cond_skip"  # diffusers' name of the perturbed prediction (PAG, SLG)


class _PerturbedForward(SoftPAG):
    """SoftPAG's head blend on the ``"perturbed"`` rows, without an extra branch of its own:
    the guider runs the perturbed forward itself and names all of its rows ``"perturbed"``."""

    extra_branches = ()


def _all_rows_perturbed(batch: int) -> dict[str, slice]:
    return {"perturbed": slice(0, batch)}


class SoftPAGGuidance(BaseGuidance):
    """Head-level (soft) perturbed-attention guidance as a ``diffusers.guiders`` guider.

    A drop-in for ``diffusers.guiders.PerturbedAttentionGuidance`` (same predictions
    ``pred_cond``, ``pred_uncond``, ``pred_cond_skip``, same combination, same step windows)
    whose perturbed branch is SoftPAG's (module docstring):

        ε = ε_u + w·(ε_c - ε_u) + s·(ε_c - ε_pert)         (PAG, Ahn et al. 2024, Eq. 11)
        A'_h = (1 - u_h)·A_h + u_h·P  on the selected heads (SoftPAG, Ahn et al. 2025, Eq. 7)

    heads:      which heads to perturb, in :class:`diffattn.SoftPAG`'s language: ``"all"``
                (every head of every self/joint/single-stream site), ``{site name: head list |
                "all" | {head: u}}``, a list of ``(site, head)`` / ``(site, head, u)``, or a
                HeadHunter preset (dict or JSON path). Site names are those of
                ``da.sites(denoiser)`` (``"transformer_blocks.2.attn"``). Default: ``"all"``,
                unless ``perturbed_guidance_layers`` is given.
    perturbed_guidance_layers: instead of ``heads``, whole layers as diffusers' PAG takes them:
                block indices of the stack ``perturbed_guidance_fqn``; every head of every
                non-cross attention in those blocks is perturbed (diffusers' ``LayerSkipConfig``
                with ``skip_attention_scores=True`` selects the same modules).
    perturbed_guidance_fqn: the block stack of ``perturbed_guidance_layers`` (``"auto"``: the
                model's one stack among ``blocks``, ``transformer_blocks``...; a UNet needs it,
                e.g. ``"mid_block.attentions.0.transformer_blocks"``).
    strength:   SoftPAG's u in [0, 1] for heads given without their own u (default 1 = PAG);
                given with a preset, it replaces the preset's u of every head.
    guidance_scale:           w, the CFG scale (diffusers' default 7.5; 1 turns CFG off).
    perturbed_guidance_scale: s, the scale of the perturbed term (SoftPAG's ``scale``; default:
                the preset's ``scale``, else 2.8 as diffusers' PAG).
    perturbed_guidance_start, perturbed_guidance_stop: the fractions of the steps between which
                the perturbed branch runs, exactly as diffusers' PAG reads them (step i runs it
                when ``int(start·N) < i < int(stop·N)``; note the strict lower bound: step 0
                never does). Defaults 0.01 and 0.2, as diffusers'.
    target:     ``"identity"`` (PAG), ``"uniform"`` or ``"meanquery"`` (SEG at sigma -> inf).
    semantics:  joint-attention semantics (MMDiT): ``"joint"`` (the target spans the whole
                joint sequence: what diffusers' PAG guider does, since its identity replaces the
                joint attention's output by V), ``"image"`` or ``"image-self"`` (diffusers' legacy
                SD3 PAG pipeline); see ``diffattn.methods.perturbation``.
    guidance_rescale:  rescale factor (Lin et al. 2024, Sec. 3.4), applied as diffusers does.
    use_original_formulation: CFG around ε_c instead of ε_u (as diffusers' guiders).
    start, stop, enabled: the CFG window and switch of every diffusers guider.

    The model is changed only during the perturbed forward (``prepare_models`` attaches a
    diffattn control with :func:`diffattn.attach`, ``cleanup_models`` detaches it, restoring
    the original processor objects). A bad selector raises :class:`diffattn.SelectorError`
    at the first perturbed forward, with the model left as it was. diffattn must not already be
    attached to the same denoiser (attach all controls in one place).
    """

    _input_predictions = ["pred_cond", "pred_uncond", _PERTURBED]

    @register_to_config
    def __init__(
        self,
        heads: Any = None,
        strength: float | None = None,
        guidance_scale: float = 7.5,
        perturbed_guidance_scale: float | None = None,
        perturbed_guidance_start: float = 0.01,
        perturbed_guidance_stop: float = 0.2,
        perturbed_guidance_layers: int | list[int] | None = None,
        perturbed_guidance_fqn: str = "auto",
        target: str = "identity",
        semantics: str = "joint",
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        layers = perturbed_guidance_layers
        if heads is not None and layers is not None:
            raise ControlError("give either heads (SoftPAG's selector) or perturbed_guidance_layers (whole layers), "
                               "not both")
        if layers is not None:
            layers = [layers] if isinstance(layers, int) else list(layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ControlError(f"perturbed_guidance_layers must be block indices (ints >= 0); "
                                   f"got {perturbed_guidance_layers!r}")
            self.layers: list[int] | None = layers
            heads = "all"  # replaced by the layers' sites at the first forward
        else:
            self.layers = None
            heads = "all" if heads is None else heads
        if isinstance(heads, str) and heads != "all" and heads.endswith(".json"):
            heads = load_preset(heads)
        if perturbed_guidance_scale is None:
            perturbed_guidance_scale = heads.get("scale", 2.8) if is_preset(heads) else 2.8
        # SoftPAG validates the selector's form, u, the scale, target and semantics now; the
        # site names are resolved against the denoiser at its first perturbed forward.
        self.control = _PerturbedForward(heads, strength, perturbed_guidance_scale, target=target, semantics=semantics)
        self.guidance_scale = float(guidance_scale)
        self.perturbed_guidance_scale = float(perturbed_guidance_scale)
        self.perturbed_guidance_start = float(perturbed_guidance_start)
        self.perturbed_guidance_stop = float(perturbed_guidance_stop)
        self.guidance_rescale = float(guidance_rescale)
        self.use_original_formulation = bool(use_original_formulation)
        self._perturbs = _any_positive_u(heads if self.layers is None else "all", strength)
        self._installed: tuple[torch.nn.Module, contextlib.ExitStack] | None = None
        self._layer_heads: dict[int, dict[str, str]] = {}  # id(denoiser) -> the layers' sites

    # ------------------------------------------------------------------ batches
    def _predictions(self) -> list[str]:
        """The prediction of each batch of this step, in the order the denoise loop runs them
        (diffusers' order: cond, uncond, perturbed cond)."""
        cfg, pag = self._is_cfg_enabled(), self._is_pag_enabled()
        return ["pred_cond"] + (["pred_uncond"] if cfg else []) + ([_PERTURBED] if pag else [])

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list["BlockState"]:
        """Split the loop's inputs (``{name: (cond, uncond)}`` or a shared tensor) into one
        batch per prediction; the perturbed batch takes the conditional inputs."""
        return [self._prepare_batch(data, 1 if name == "pred_uncond" else 0, name) for name in self._predictions()]

    def prepare_inputs_from_block_state(self, data: "BlockState", input_fields: dict[str, str | tuple[str, str]]
                                        ) -> list["BlockState"]:
        return [self._prepare_batch_from_block_state(input_fields, data, 1 if name == "pred_uncond" else 0, name)
                for name in self._predictions()]

    # ------------------------------------------------------------------ the perturbed forward
    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        """Before the forward of the next batch: on the perturbed batch, attach SoftPAG's
        head blend to ``denoiser`` with every row in the ``"perturbed"`` branch."""
        self._count_prepared += 1
        self._uninstall()  # a forward that raised before its cleanup leaves nothing behind
        names = self._predictions()
        if self._count_prepared > len(names) or names[self._count_prepared - 1] != _PERTURBED:
            return
        import diffattn as da

        if self.layers is not None:
            self.control.head_spec = self._heads_of_layers(denoiser)
        stack = contextlib.ExitStack()
        try:
            handle = stack.enter_context(da.attach(denoiser, self.control))
            stack.enter_context(handle.branches(_all_rows_perturbed))
        except BaseException:
            stack.close()
            raise
        self._installed = (denoiser, stack)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        """After the forward: detach what :meth:`prepare_models` attached (original processors
        and forwards back, bit-exact)."""
        self._uninstall()

    def _uninstall(self) -> None:
        installed, self._installed = self._installed, None
        if installed is not None:
            installed[1].close()

    def _heads_of_layers(self, denoiser) -> dict[str, str]:
        """``{site: "all"}`` of every perturbable site inside the blocks ``self.layers`` of the
        stack ``perturbed_guidance_fqn`` (diffusers' LayerSkipConfig selection)."""
        got = self._layer_heads.get(id(denoiser))
        if got is not None:
            return got
        from .sites import sites

        fqn = self.config.perturbed_guidance_fqn
        if fqn == "auto":
            stacks = [name for name in _BLOCK_STACKS if isinstance(getattr(denoiser, name, None), torch.nn.ModuleList)]
            if len(stacks) != 1:
                raise ControlError(
                    f"perturbed_guidance_fqn='auto' needs exactly one block stack on this {type(denoiser).__name__}; "
                    f"found {stacks or 'none'}: pass perturbed_guidance_fqn= (e.g. 'transformer_blocks', or a UNet's "
                    f"'mid_block.attentions.0.transformer_blocks'), or select heads with heads="
                )
            fqn = stacks[0]
        all_sites = [s for s in sites(denoiser) if s.kind in PERTURBABLE_KINDS]
        heads: dict[str, str] = {}
        for i in self.layers:
            prefix = f"{fqn}.{i}."
            hits = [s.name for s in all_sites if s.name.startswith(prefix)]
            if not hits:
                raise SelectorError(
                    f"block {i} of {fqn!r} holds no self/joint/single-stream attention site of this "
                    f"{type(denoiser).__name__}; perturbable sites: {[s.name for s in all_sites][:12]}"
                )
            heads.update({name: "all" for name in hits})
        self._layer_heads[id(denoiser)] = heads
        return heads

    # ------------------------------------------------------------------ combination
    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None,
                pred_cond_skip: torch.Tensor | None = None) -> GuiderOutput:
        """ε = ε_u + w(ε_c - ε_u) + s(ε_c - ε_pert) (PAG Eq. 11 with CFG), exactly as
        diffusers' ``PerturbedAttentionGuidance.forward``, then ``guidance_rescale``."""
        cfg, pag = self._is_cfg_enabled(), self._is_pag_enabled()
        if not cfg and not pag:
            pred = pred_cond
        elif not cfg:
            shift = pred_cond - pred_cond_skip
            pred = pred_cond if self.use_original_formulation else pred_cond_skip
            pred = pred + self.perturbed_guidance_scale * shift
        elif not pag:
            shift = pred_cond - pred_uncond
            pred = pred_cond if self.use_original_formulation else pred_uncond
            pred = pred + self.guidance_scale * shift
        else:
            shift = pred_cond - pred_uncond
            shift_skip = pred_cond - pred_cond_skip
            pred = pred_cond if self.use_original_formulation else pred_uncond
            pred = pred + self.guidance_scale * shift + self.perturbed_guidance_scale * shift_skip
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    # ------------------------------------------------------------------ state
    @property
    def is_conditional(self) -> bool:
        """Whether the batch being prepared is a conditional one (cond or perturbed cond)."""
        names = self._predictions()
        i = self._count_prepared - 1
        return not (0 <= i < len(names) and names[i] == "pred_uncond")

    @property
    def num_conditions(self) -> int:
        return len(self._predictions())

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled:
            return False
        in_range = True
        if self._num_inference_steps is not None:
            first, last = int(self._start * self._num_inference_steps), int(self._stop * self._num_inference_steps)
            in_range = first <= self._step < last
        one = 0.0 if self.use_original_formulation else 1.0
        return in_range and not math.isclose(self.guidance_scale, one)

    def _is_pag_enabled(self) -> bool:
        if not self._enabled or not self._perturbs:
            return False
        in_range = True
        if self._num_inference_steps is not None:
            first = int(self.perturbed_guidance_start * self._num_inference_steps)
            last = int(self.perturbed_guidance_stop * self._num_inference_steps)
            in_range = first < self._step < last  # diffusers' PAG/SLG window, strict at both ends
        return in_range and not math.isclose(self.perturbed_guidance_scale, 0.0)

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        state["perturbed_installed"] = self._installed is not None
        return state


def _any_positive_u(heads, strength: float | None) -> bool:
    """Whether the selector perturbs anything (some u > 0), read without the model: with every
    u = 0 the guider runs no perturbed forward and equals CFG exactly."""
    if strength is not None:
        return float(strength) > 0
    if is_preset(heads):
        return any(len(h) < 3 or float(h[2]) > 0 for h in heads["heads"])
    if isinstance(heads, Mapping):
        return any(any(float(u) > 0 for u in v.values()) if isinstance(v, Mapping) else True for v in heads.values())
    if isinstance(heads, str):
        return True
    return any(len(item) < 3 or float(item[2]) > 0 for item in heads)
