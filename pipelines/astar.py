"""A-STAR (and Attend-and-Excite) sampling around a diffusers pipeline.

    from diffattn.pipelines import AStarPipeline
    astar = AStarPipeline(pipe)                                   # SD1.5 / SD2 / SDXL / SD3 / FLUX.1 pipeline
    out = astar("a red circle and a blue square", concepts=["circle", "square"],
                return_attention_maps=True)
    out.images[0].save("astar.png"); out.attention_maps[0]["circle"].save("circle.png")

    AStarPipeline(pipe, AStarConfig.attend_and_excite())          # Attend-and-Excite

The loop is Attend-and-Excite's (Chefer et al. 2023; diffusers'
``StableDiffusionAttendAndExcitePipeline``) with the loss made configurable
(``diffattn.methods.astar``): at every step i of the window ``i < max_iter_to_alter`` and for
every sample of the batch *separately* (so the autograd graph of one sample is held at a time):

1. a gradient-enabled forward of the denoiser on the sample's latent and its conditional
   prompt only; an engine control (:class:`~diffattn.methods.astar.ConceptRecorder`) taps the
   image-query × text-key probabilities of the selected sites exactly from the row LSE,
   keeping the graph; the forward stops as soon as every site has reported;
2. concept maps (sites × heads mean at one resolution, ``softmax(100·A)`` over the text tokens,
   3×3 Gaussian) and the loss: A-STAR's segregation + retention (Agarwal et al. 2023, Eqs. 2-3),
   A&E's max-activation loss, or any weighted combination;
3. optional iterative refinement at threshold steps (A&E): while some concept's peak
   attention is below the threshold, repeat forward → loss → step (at most 20 times);
4. the update z ← z − α_i ∇_z L with α_i = scale_factor · sqrt(linspace(1, 0.5, T)[i]).

Then the ordinary classifier-free-guided forward and scheduler step run without gradients.
A-STAR's retention target B for step i is the binarised concept map of step i−1, read from
that step's ordinary forward (so it is taken *after* step i−1's latent update), or a user
layout mask (``layout_masks``), which turns A-STAR into layout-guided generation.

MMDiT (SD3): the maps are the image-query × text-key block of joint attention, each head's
row re-normalised over the text keys (``joint_text_norm``) before the A&E steps. Concepts
are located among the CLIP tokens (the first 77 text keys) by default, as the papers' losses
are defined on CLIP-conditioned UNets; ``text_keys="t5"`` locates them in the T5 block after
them instead (for prompts longer than CLIP's 77 tokens).

FLUX.1: the same joint-attention maps from the double-stream *and* single-stream blocks, whose
text keys are T5's (CLIP gives only a pooled vector), so concepts are located among the T5
tokens (no start token: the prompt's tokens are positions 0..EOS-1). FLUX is
guidance-distilled: there are no unconditional rows, ``guidance_scale`` is the transformer's
guidance embedding, and the latents the updates move are FluxPipeline's packed 2×2 patches.

``AStarConfig.attend_and_excite()`` is the original A&E; to reproduce diffusers'
``StableDiffusionAttendAndExcitePipeline`` output, also pass ``text_tokens="diffusers"``
(diffusers re-normalises over keys 1..N-2, end and padding tokens included).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from diffattn.engine import refuse_if_attached
from diffattn.families import RunState, adapter_for
from diffattn.pipelines import configure, frozen_weights
from diffattn.methods.astar import (
    LOSSES,
    ConceptError,
    ConceptRecorder,
    MapsComplete,
    aggregate_attention,
    attend_excite_loss,
    binarize,
    combined_loss,
    concept_maps,
    concept_token_indices,
    heatmap_image,
    max_activations,
    prompt_ids,
    rescale_to_norm,
    text_positions,
)

# A&E's refinement thresholds {0: 0.05, 10: 0.5, 20: 0.8} of 50 steps, as fractions of the run
AE_THRESHOLDS = {0.0: 0.05, 0.2: 0.5, 0.4: 0.8}


@dataclass
class AStarConfig:
    """What A-STAR optimises and how (defaults: A-STAR with A&E's step sizes, every step).

    losses:             weights of ``"segregation"``, ``"retention"``, ``"attend_excite"``.
    scale_factor:       α_0 of the step size α_i = scale_factor·sqrt(linspace(1, 0.5, T)[i]) (A&E: 20).
    max_iter_to_alter:  latent updates at steps i < this; an int is a step count, a float in
                        [0, 1] a fraction of the run. A-STAR default 1.0, every step: its
                        retention loss targets the *late* loss of concepts and the paper's ablation
                        finds early-only updates leave concepts missing; A&E preset 0.5 (25 of 50).
    refine:             iterative refinement ``{step: threshold}`` (int keys: step indices,
                        float keys in [0, 1): fractions of the run); ``None`` turns it off.
                        At such a step, while some concept's peak attention is below the
                        threshold, A&E repeats forward/loss/update (A&E's test ``L > 1 - thr``).
    max_refinement_steps: cap of those repeats (A&E: 20).
    sites:              selector of the attention sites the maps come from (``diffattn.sites``
                        grammar); ``None``: UNet cross-attention at the default resolution
                        (:func:`default_unet_factor`), every joint site on SD3.
    heads:              heads averaged (``"all"`` or a ``diffattn`` head spec).
    resolution:         ``(h, w)`` of the maps; ``None``: the resolution of the default sites
                        (SD1.x 512 px: 16×16, SDXL 1024 px: 32×32, tiny-sd: 8×8, SD3: latent/patch).
                        Maps of other sites are resized to it bilinearly.
    text_tokens:        ``"prompt"`` re-normalises over the prompt's own tokens (no start, end
                        or padding tokens); ``"diffusers"`` over keys 1..N-2 as diffusers'
                        A&E pipeline (which keeps the end and padding tokens), N counted within
                        the chosen ``text_keys`` block (on SD3 with CLIP: its 77 keys).
    text_keys:          whose tokens the concepts are: ``"clip"``, ``"t5"`` or ``"auto"`` (CLIP on
                        UNets and SD3, T5 on FLUX, whose keys are T5's). On SD3 ``"t5"`` takes the
                        T5 block of the joint keys (after CLIP's 77): concepts past CLIP's 77 tokens
                        of a long prompt are found there. Token positions given as concepts count
                        within the chosen tokenizer's tokens.
    temperature:        the 100 of softmax(100·A). It sets how peaked the maps are, which depends
                        on how much raw attention varies over the image: the tiny testbed models'
                        attention is flatter than SD's: tiny-sd3 needs 1000, tiny-sd keeps 100
                        (``diffattn.testbed.defaults.TESTBED_OVERRIDES``, chosen on training seeds).
    smooth_size, smooth_sigma: A&E's Gaussian (3, 0.5); ``smooth_size=0`` turns it off.
    subtoken:           ``"mean"`` or ``"max"`` over the tokens of a multi-token concept.
    center_tokens:      subtract each text token's mean attention over the image before the
                        softmax (off in the papers): on models where one token draws more
                        attention everywhere, softmax(T·A) hands it every pixel and the other
                        concepts' maps (and A&E's gradient) vanish.
    retention_threshold: binarisation of the previous map: min-max normalise, then ``>=`` this
                        number, or ``"otsu"`` (:func:`diffattn.methods.astar.binarize`).
    joint_text_norm:    MMDiT: divide each head's image→text probabilities by their sum over
                        the text keys before averaging.
    keep_norm:          rescale each updated latent to its norm before the update (off in the
                        papers): a step along the attention gradient also changes the latent's
                        norm, which moves an early, noise-like latent off the shell the model
                        was trained on (:func:`rescale_to_norm`).
    early_exit:         stop the gradient forward once every selected site has reported.
    eps:                denominator guard of the soft IoUs.
    """

    losses: dict[str, float] = field(default_factory=lambda: {"segregation": 1.0, "retention": 1.0})
    scale_factor: float = 20.0
    max_iter_to_alter: int | float = 1.0
    refine: dict | None = None
    max_refinement_steps: int = 20
    sites: object = None
    heads: object = "all"
    resolution: tuple[int, int] | None = None
    text_tokens: str = "prompt"
    text_keys: str = "auto"
    temperature: float = 100.0
    smooth_size: int = 3
    smooth_sigma: float = 0.5
    subtoken: str = "mean"
    center_tokens: bool = False
    retention_threshold: float | str = 0.5
    joint_text_norm: bool = True
    keep_norm: bool = False
    early_exit: bool = True
    eps: float = 1e-8

    # ------------------------------------------------------------------ presets
    @classmethod
    def astar(cls, **kw) -> "AStarConfig":
        """A-STAR: segregation + retention, A&E's step-size schedule, over the whole run."""
        return cls(**kw)

    @classmethod
    def attend_and_excite(cls, **kw) -> "AStarConfig":
        """Attend-and-Excite: the max-activation loss over the first half of the run, refinement at
        0 %, 20 %, 40 % of the run (A&E's steps 0, 10, 20 of 50) with thresholds 0.05, 0.5, 0.8."""
        kw.setdefault("losses", {"attend_excite": 1.0})
        kw.setdefault("max_iter_to_alter", 0.5)
        kw.setdefault("refine", dict(AE_THRESHOLDS))
        return cls(**kw)

    @classmethod
    def segregation_only(cls, **kw) -> "AStarConfig":
        """Ablation: A-STAR's segregation loss alone."""
        return cls(losses={"segregation": 1.0}, **kw)

    @classmethod
    def retention_only(cls, **kw) -> "AStarConfig":
        """Ablation: A-STAR's retention loss alone."""
        return cls(losses={"retention": 1.0}, **kw)

    def validate(self) -> "AStarConfig":
        unknown = set(self.losses) - set(LOSSES)
        if unknown or not any(self.losses.values()):
            raise ConceptError(f"losses={self.losses!r}: give a positive weight to at least one of {LOSSES}")
        if self.text_keys not in ("auto", "clip", "t5"):
            raise ConceptError(f"text_keys={self.text_keys!r}: use 'auto', 'clip' or 't5'")
        if self.text_tokens not in ("prompt", "diffusers"):
            raise ConceptError(f"text_tokens={self.text_tokens!r}: use 'prompt' or 'diffusers'")
        if self.subtoken not in ("mean", "max"):
            raise ConceptError(f"subtoken={self.subtoken!r}: use 'mean' or 'max'")
        negative = {k: v for k, v in self.losses.items() if v < 0}
        if negative:
            raise ConceptError(f"losses={self.losses!r}: weights must be >= 0 (a negative weight rewards overlap "
                               f"or neglect); got {negative}")
        thr = self.retention_threshold
        if not (thr == "otsu" or (isinstance(thr, (int, float)) and 0.0 < float(thr) < 1.0)):
            raise ConceptError(f"retention_threshold={thr!r}: use a number in (0, 1) (on the min-max normalised map) "
                               f"or 'otsu'")
        for key, value in (self.refine or {}).items():
            if isinstance(key, float) and not 0.0 <= key < 1.0 or isinstance(key, int) and key < 0:
                raise ConceptError(f"refine key {key!r}: use a step index (int >= 0) or a fraction of the run in [0, 1)")
            if not 0.0 < float(value) <= 1.0:
                raise ConceptError(f"refine threshold {value!r} at {key!r}: use a peak attention in (0, 1]")
        return self


@dataclass
class AStarOutput:
    """images: PIL images / array / tensor as ``output_type``;
    attention_maps: per image ``{concept label: PIL heat map}`` (``return_attention_maps``);
    concept_maps: per image ``[C, h, w]`` fp32 maps averaged over the steps (``return_attention_maps``);
    losses: per image, one dict per optimised step (step, loss, its parts, peak attention per concept)."""

    images: object
    attention_maps: list[dict] | None = None
    concept_maps: list[torch.Tensor] | None = None
    losses: list[list[dict]] = field(default_factory=list)


# ----------------------------------------------------------------------------- families

# Family knowledge (prompt encoding, latents, timesteps, one forward, decoding, the sites that
# localise concepts) lives in each family's PipelineAdapter (diffattn.families).


# ----------------------------------------------------------------------------- the pipeline


class AStarPipeline:
    """A-STAR / Attend-and-Excite sampling with a diffusers pipeline's own components.

    pipe:    a ``StableDiffusionPipeline`` (SD1.x/SD2), ``StableDiffusionXLPipeline``,
             ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (subclasses included); its modules are
             shared, not copied.
    config:  an :class:`AStarConfig` (default: A-STAR); keyword ``overrides`` replace its fields.

    Calling it generates images (see :meth:`__call__`); ``.pipe`` is the wrapped pipeline.
    """

    def __init__(self, pipe, config: AStarConfig | None = None, **overrides):
        self.adapter = adapter_for(pipe, method="AStarPipeline")
        self.pipe = pipe
        self.config = configure(config, AStarConfig, overrides, ConceptError, "A-STAR")

    @property
    def family(self) -> str:
        """The adapter's name: ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"``."""
        return self.adapter.name

    @classmethod
    def from_pipe(cls, pipe, config: AStarConfig | None = None, **overrides) -> "AStarPipeline":
        """Same as ``AStarPipeline(pipe, config, **overrides)`` (diffusers' naming)."""
        return cls(pipe, config, **overrides)

    def __repr__(self):
        return f"AStarPipeline({type(self.pipe).__name__}, losses={self.config.losses})"

    # ------------------------------------------------------------------ sites
    def _sites(self):
        """(site selector for the recorder, default map resolution factor or None)."""
        from diffattn.sites import sites

        if self.config.sites is not None:
            return self.config.sites, None
        return self.adapter.text_attention_sites(sites(self.pipe))

    # ------------------------------------------------------------------ concepts
    def _text_keys(self) -> str:
        """``"clip"`` or ``"t5"``: whose tokens the concepts are (``AStarConfig.text_keys``)."""
        keys = self.config.text_keys
        if keys == "auto":
            return self.adapter.default_text_keys
        if keys not in self.adapter.text_blocks():
            raise ConceptError(self.adapter.missing_text_block(keys))
        return keys

    def _block(self):
        """The :class:`~diffattn.families.base.TextBlock` the concepts are located in."""
        return self.adapter.text_blocks()[self._text_keys()]

    def _text_length(self, max_sequence_length: int | None) -> int | None:
        """How many T5 tokens the text keys hold (``max_sequence_length``); CLIP: ``None``,
        the tokenizer's own 77."""
        if not self._block().truncated:
            return None
        return int(max_sequence_length or self.adapter.call_defaults().get("max_sequence_length", 256))

    def _eot(self, prompt: str, max_sequence_length: int | None = None) -> int:
        """Key position of the end token (CLIP's EOT; T5's EOS, after truncation to the text
        keys): the prompt's tokens end before it."""
        block = self._block()
        return block.offset + len(prompt_ids(block.tokenizer, prompt, self._text_length(max_sequence_length))) - 1

    def _positions(self, n_keys: int, eot: int) -> torch.Tensor:
        """Key positions the maps are re-normalised over (``text_tokens``), within the chosen
        block of the ``n_keys`` text keys (SD3 with CLIP: its first 77, not the T5 keys after)."""
        block = self._block()
        if block.span is not None:
            n_keys = block.offset + block.span
        return text_positions(n_keys, eot, self.config.text_tokens, first=self._first_key())

    def _first_key(self) -> int:
        """Key position of the prompt's first token (after CLIP's start token)."""
        block = self._block()
        return block.offset + int(block.start_token)

    def _concepts_for(self, prompt: str, concepts, max_sequence_length: int | None = None
                      ) -> tuple[list[list[int]], list[str]]:
        if callable(concepts):
            concepts = concepts(prompt)
        elif isinstance(concepts, dict):
            if prompt not in concepts:
                raise ConceptError(f"concepts is a dict without an entry for the prompt {prompt!r}")
            concepts = concepts[prompt]
        elif concepts is None:
            raise ConceptError(f"no concepts given for {prompt!r}: pass concepts=['word', ...] (the subject nouns of "
                               f"the prompt), token positions, a dict {{prompt: concepts}} or a callable prompt -> "
                               f"concepts (for shapes-world captions: diffattn.testbed.defaults.default_concepts)")
        if isinstance(concepts, (str, int)):
            concepts = [concepts]
        block = self._block()
        offset = block.offset
        try:
            tokens = concept_token_indices(block.tokenizer, prompt, concepts, start_token=block.start_token,
                                           max_length=self._text_length(max_sequence_length))
        except ConceptError as e:
            if self._text_keys() == "clip" and "t5" in self.adapter.text_blocks() and "not in the prompt" in str(e):
                raise ConceptError(f"{e} (text_keys='t5' finds words past CLIP's 77 tokens)") from None
            raise
        labels = []
        for c, g in zip(concepts, tokens):
            label = c if isinstance(c, str) else "tokens " + ",".join(map(str, g))
            labels.append(label if label not in labels else f"{label} ({len(labels)})")
        return [[offset + i for i in g] for g in tokens], labels  # token positions -> key positions

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _rows(cond, uncond, rows, cfg: bool) -> dict:
        """Denoiser tensors for batch ``rows`` ([uncond; cond] when ``cfg``)."""
        if cfg:
            return {k: torch.cat([uncond[k][rows], cond[k][rows]]) for k in cond}
        return {k: v[rows] for k, v in cond.items()}

    def _denoise(self, run: RunState, x, t, emb: dict) -> torch.Tensor:
        """One denoiser forward on latents ``x`` [b, C, h, w] (FLUX: packed [b, N, 4C])."""
        adapter = self.adapter
        return adapter.predict(run, adapter.scale_model_input(x, t), t, emb, run.guidance)

    # ------------------------------------------------------------------ maps
    def _maps_of(self, records, row: int, groups, eot: int, resolution) -> torch.Tensor:
        cfg = self.config
        res = resolution or records[0][2]
        attn = aggregate_attention([(p[row], grid) for _, p, grid in records], res,
                                   renorm_text=self.adapter.joint_attention and cfg.joint_text_norm)  # [h, w, T]
        positions = self._positions(attn.shape[-1], eot)
        return concept_maps(attn, groups, positions, temperature=cfg.temperature, smooth_size=cfg.smooth_size,
                            smooth_sigma=cfg.smooth_sigma, subtoken=cfg.subtoken,
                            center_tokens=cfg.center_tokens)  # [C, h, w]

    def _grad_maps(self, run, rec, z, t, emb, groups, eot, resolution) -> torch.Tensor:
        """Concept maps of one sample's latent ``z`` [1, C, h, w] (FLUX: [1, N, 4C]), differentiable in ``z``."""
        rec.start("grad", early_exit=self.config.early_exit)
        try:
            self._denoise(run, z, t, emb)
        except MapsComplete:
            pass
        finally:
            rec.mode = None
        records, rec.records = rec.records, []
        return self._maps_of(records, 0, groups, eot, resolution)

    # ------------------------------------------------------------------ one sample's update
    def _step(self, z: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """z − delta, rescaled to z's norm when ``keep_norm`` is set."""
        stepped = z.detach() - delta
        return rescale_to_norm(stepped, z.detach()) if self.config.keep_norm else stepped

    def _optimise(self, run, rec, z, t, emb, groups, eot, resolution, target, step_size, threshold, update):
        """A&E's per-sample step (with refinement when ``threshold`` is set) on ``z`` [1, C, h, w] (FLUX: [1, N, 4C])."""
        cfg = self.config
        z = z.detach().requires_grad_(True)
        maps = self._grad_maps(run, rec, z, t, emb, groups, eot, resolution)
        loss, parts = combined_loss(maps, cfg.losses, target, cfg.eps)
        refined = 0
        if threshold is not None and float(attend_excite_loss(maps.detach())) > max(0.0, 1.0 - threshold):
            goal = max(0.0, 1.0 - threshold)
            crit = float(attend_excite_loss(maps.detach()))
            while crit > goal:
                refined += 1
                z = z.detach().requires_grad_(True)
                maps = self._grad_maps(run, rec, z, t, emb, groups, eot, resolution)
                loss, _ = combined_loss(maps, cfg.losses, target, cfg.eps)
                crit = float(attend_excite_loss(maps.detach()))
                if not loss.requires_grad or float(loss.detach()) == 0:
                    break  # nothing to follow (e.g. one concept's segregation): more forwards change nothing
                z = self._step(z, step_size * torch.autograd.grad(loss, [z])[0])
                if refined >= cfg.max_refinement_steps:
                    break
            z = z.detach().requires_grad_(True)  # A&E: one more forward for the loss of the refined latent
            maps = self._grad_maps(run, rec, z, t, emb, groups, eot, resolution)
            loss, parts = combined_loss(maps, cfg.losses, target, cfg.eps)
        if update and loss.requires_grad and float(loss.detach()) != 0:
            z = self._step(z, step_size * torch.autograd.grad(loss, [z])[0])
        info = {"loss": float(loss.detach()), **parts, "refinements": refined,
                "max_attention": [round(float(v), 4) for v in max_activations(maps.detach())]}
        return z.detach(), info

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], concepts=None, *, negative_prompt=None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 generator=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 layout_masks=None, return_attention_maps: bool = False, callback=None,
                 progress: bool | None = None, **kwargs) -> AStarOutput:
        """Generate with A-STAR.

        prompt:     a prompt or a list of prompts.
        concepts:   the concepts of every prompt: words (``["circle", "square"]``), token
                    positions, lists of positions (one multi-token concept); a callable
                    ``prompt -> concepts`` or a dict ``{prompt: concepts}`` for per-prompt
                    concepts. Required (``None`` is a :class:`ConceptError`).
        layout_masks: retention targets replacing the previous-step maps (layout guidance):
                    ``[C, H, W]`` (any resolution, values in [0, 1]) for every prompt, or a list
                    of them per prompt.
        return_attention_maps: also return the concept maps averaged over the steps and
                    PNG-ready heat maps (``out.attention_maps[i][label]``).
        callback:   ``callback(info: dict)`` after every step (``diffattn.families.RunState.report``:
                    step, timestep, latents, x0 = None, total, stage; ``attention_maps``
                    ``[B, C, h, w]`` of the step when the maps were computed).
        progress:   show a tqdm bar (default: follow the pipeline's progress-bar config).
        Other arguments as the wrapped pipeline (``max_sequence_length`` for SD3 and FLUX, ``eta``,
        ``clip_skip``); the defaults are the pipeline's own (the testbed's for testbed models).
        """
        pipe, cfg, adapter = self.pipe, self.config, self.adapter
        refuse_if_attached(pipe, "AStarPipeline")
        unknown = set(kwargs) - {"max_sequence_length", "eta", "clip_skip"}
        if unknown:
            raise ConceptError(f"AStarPipeline does not take {sorted(unknown)}")
        defaults = adapter.call_defaults()
        steps = num_inference_steps or defaults.get("num_inference_steps", 50)
        w = guidance_scale if guidance_scale is not None else defaults.get("guidance_scale", 7.5)
        opts = {"max_sequence_length": defaults.get("max_sequence_length", 256), "eta": defaults.get("eta", 0.0)}
        opts.update(kwargs)
        cfg_on = w > 1.0 and not adapter.distilled  # a distilled model takes w as its guidance embedding
        if progress is None:
            progress = not getattr(pipe, "_progress_bar_config", {}).get("disable", False)
        run = RunState(callback=callback, progress=progress, desc="A-STAR",
                       guidance=float(w) if adapter.distilled else None)
        size_h, size_w = adapter.native_size()
        height, width = adapter.fit_size(height or size_h, width or size_w)
        if adapter.distilled and negative_prompt is not None:
            raise ConceptError(f"{type(pipe).__name__} is guidance-distilled and runs no unconditional branch here, so "
                               f"a negative_prompt would be ignored: leave it out (guidance_scale sets its guidance "
                               f"embedding)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConceptError("AStarPipeline needs at least one prompt")

        # concepts per row (prompts repeated num_images_per_prompt times, as encode_prompt does)
        per_prompt = [self._concepts_for(p, concepts, opts["max_sequence_length"]) for p in prompts]
        eots = [self._eot(p, opts["max_sequence_length"]) for p in prompts]
        rows_prompt = [k for k in range(len(prompts)) for _ in range(num_images_per_prompt)]
        B = len(rows_prompt)

        cond, uncond = adapter.encode_prompt(prompts, negative_prompt, num_images_per_prompt=num_images_per_prompt,
                                             cfg=cfg_on, max_sequence_length=opts["max_sequence_length"],
                                             clip_skip=opts.get("clip_skip"))
        timesteps = adapter.timesteps(steps, height, width)
        T = len(timesteps)
        latents = adapter.prepare_latents(run, B, height, width, cond["encoder_hidden_states"].dtype, generator, latents)
        extra = adapter.step_kwargs(generator, opts["eta"])

        selector, factor = self._sites()
        resolution = tuple(cfg.resolution) if cfg.resolution is not None else None
        if resolution is None and factor is not None:
            resolution = (-(-latents.shape[-2] // factor), -(-latents.shape[-1] // factor))
        if resolution is None:  # the image-token grid (SD3 patches, FLUX's packed tokens)
            resolution = adapter.token_grid(height, width)
        masks = self._layout_targets(layout_masks, per_prompt, rows_prompt, resolution)

        step_sizes = cfg.scale_factor * np.sqrt(np.linspace(1.0, 0.5, T))
        stop = _as_step(cfg.max_iter_to_alter, T, "max_iter_to_alter")
        refine = {_as_step(k, T, "refine", key=True): float(v) for k, v in (cfg.refine or {}).items()}
        if any(k >= T for k in refine):
            raise ConceptError(f"refine={cfg.refine!r}: step {max(refine)} is past the run's {T} steps (0..{T - 1}); "
                               f"use earlier steps or fractions of the run")
        want_prev = bool(cfg.losses.get("retention")) and masks is None
        targets: list[torch.Tensor | None] = list(masks) if masks is not None else [None] * B
        sums: list[torch.Tensor | None] = [None] * B
        counts = [0] * B
        history: list[list[dict]] = [[] for _ in range(B)]

        from diffattn.engine import attach

        rec = ConceptRecorder(selector, heads=cfg.heads)

        def branches(batch):
            if cfg_on and batch == 2 * B:
                return {"uncond": slice(0, B), "cond": slice(B, 2 * B)}
            return {"cond": slice(0, batch)}

        run.start(T)
        with attach(pipe, rec, run=run) as handle, handle.branches(branches), frozen_weights(adapter.denoiser):
            for i, t in enumerate(timesteps):
                if i < stop or i in refine:
                    new = []
                    with torch.enable_grad():
                        for b in range(B):
                            k = rows_prompt[b]
                            emb = self._rows(cond, uncond, slice(b, b + 1), False)
                            z, info = self._optimise(run, rec, latents[b : b + 1], t, emb, per_prompt[k][0], eots[k],
                                                     resolution, targets[b], float(step_sizes[i]), refine.get(i),
                                                     i < stop)
                            history[b].append({"step": i, **info})
                            new.append(z)
                    latents = torch.cat(new)
                record = want_prev or return_attention_maps
                rec.start("main" if record else None)
                x = torch.cat([latents] * 2) if cfg_on else latents
                noise = self._denoise(run, x, t, self._rows(cond, uncond, slice(0, B), cfg_on))
                rec.mode = None
                step_maps = []
                if record:
                    records, rec.records = rec.records, []
                    for b in range(B):
                        k = rows_prompt[b]
                        m = self._maps_of(records, b, per_prompt[k][0], eots[k], resolution).detach()
                        step_maps.append(m)
                        if want_prev:
                            targets[b] = binarize(m, cfg.retention_threshold)
                        if return_attention_maps:
                            sums[b] = m if sums[b] is None else sums[b] + m
                            counts[b] += 1
                if cfg_on:
                    u, c = noise.chunk(2)
                    noise = u + w * (c - u)
                latents = pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
                run.report(i, t, latents, None, **({"attention_maps": step_maps} if step_maps else {}))
        run.close()

        images = self._decode(latents, output_type, height, width)
        out = AStarOutput(images=images, losses=history)
        if return_attention_maps:
            out.concept_maps = [s / max(n, 1) for s, n in zip(sums, counts)]
            # one scale per image, the brightest concept's maximum: a neglected concept shows dark
            out.attention_maps = [
                {label: heatmap_image(m, size=(width, height), vmax=float(out.concept_maps[b].max()))
                 for label, m in zip(per_prompt[rows_prompt[b]][1], out.concept_maps[b])}
                for b in range(B)
            ]
        return out

    # ------------------------------------------------------------------ pieces of the loop
    def _layout_targets(self, layout_masks, per_prompt, rows_prompt, resolution):
        """User layout masks -> binary retention targets ``[C, h, w]`` per row (or ``None``)."""
        if layout_masks is None:
            return None
        if not self.config.losses.get("retention"):
            raise ConceptError(
                f"layout masks are retention targets, but losses={self.config.losses} gives retention no weight "
                f"(e.g. the Attend-and-Excite preset); use AStarConfig.astar() or add 'retention' to losses"
            )
        if resolution is None:
            raise ConceptError("layout masks need a map resolution: pass AStarConfig(resolution=(h, w))")
        per = layout_masks if isinstance(layout_masks, (list, tuple)) else [layout_masks] * len(per_prompt)
        if len(per) != len(per_prompt):
            raise ConceptError(f"layout_masks: give one [C, H, W] mask per prompt ({len(per_prompt)}), got {len(per)}")
        out = []
        for k in rows_prompt:
            m = torch.as_tensor(np.asarray(per[k]), dtype=torch.float32)
            n_concepts = len(per_prompt[k][0])
            if m.dim() != 3 or m.shape[0] != n_concepts:
                raise ConceptError(
                    f"layout mask of shape {tuple(m.shape)} for the prompt with concepts {per_prompt[k][1]}: "
                    f"expected [C={n_concepts}, H, W]"
                )
            m = torch.nn.functional.interpolate(m[:, None], size=resolution, mode="area")[:, 0]  # [C, h, w]
            out.append((m >= 0.5).float())
        return out

    def _decode(self, latents, output_type, height: int, width: int):
        if output_type == "latent":
            return latents
        adapter = self.adapter
        image = adapter.decode(adapter.unpack(latents, height, width))
        return adapter.postprocess(image, output_type, self.pipe.vae.dtype)

def _as_step(value, T: int, what: str, key: bool = False) -> int:
    """A step index from an int (index / count) or a float fraction of the ``T`` steps."""
    if isinstance(value, bool):
        raise ConceptError(f"{what}: {value!r} is not a step")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and (0.0 <= value < 1.0 if key else 0.0 <= value <= 1.0):
        return int(round(value * T))
    raise ConceptError(f"{what}: {value!r} must be a step index (int) or a fraction of the run (float in [0, 1])")
