"""IR-Diffusion: consistent subjects in a multi-subject scene (isolation + reposition attention).

    from diffattn.pipelines import IRDiffusionPipeline
    ir = IRDiffusionPipeline(pipe)                      # SD1.5 / SDXL / SD3 / FLUX pipeline (or a testbed model)
    out = ir("a circle left of a square", subjects=["a striped red circle", "a dotted blue square"],
             return_masks=True)
    out.references[0].save("ref0.png"); out.images[0].save("scene.png"); out.scene_mask_images[0].save("m0.png")

He et al., "Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation
and Reposition Attention" (2024); the official pipeline is summarised in
../shared/reference/astar_ir_uam.md §2.1. The loop:

1. **Rehearsal**: one stock call of the pipeline with the batch ``[ref_1 … ref_S, scene] ×
   CFG``: the S references from one shared noise, the scene from its own, every attention
   stock. A recorder reads each row's cross-attention to its subject word (every step, the
   sites that localise concepts), so masks come from attention instead of the official
   GroundingDINO + SAM: a reference's map is Otsu-binarised; the scene's maps are binarised,
   closed, grown to a minimum box and made disjoint (``postprocess_masks``, the official
   128 / 256 px at 1280×768 as fractions of the shorter side). User masks replace either.
2. **Retry**: if a subject is missing from the rehearsal scene (its mask is empty after the
   clean-up, or the optional ``segmenter`` finds none), the scene noise is redrawn and the
   rehearsal repeated, at most ``max_retries`` times; the attempts are reported.
3. **Final run**: the same batch, the same noises, with isolation at every image self /
   joint site, reposition (extended K/V from the references, moved onto the scene subjects'
   boxes, key mask moved alike, query mask with a fresh per-step dropout) at the back
   ``1 − reposition_from`` of the blocks (the paper's layers 36-69 of SDXL's 70), and the masked mutual
   cross-attention to each reference's prompt (λ = 0.9).

Why the final batch equals the rehearsal's: every per-row operation of a denoiser is
independent of the other rows, the reference rows' attention stays the stock call (the IR
controls compute only the scene rows, ``diffattn.methods.ir.scene_attention``) and the same
recorder runs in both, so the references regenerate bit-exactly (tested) and their masks stay
valid. The vanilla scene of the last rehearsal is returned too: it is the baseline of the
same noise.

Rows by role: in every call the engine names the rows ``ref0`` … ``ref{S-1}`` and ``scene``
(:func:`row_groups`, one row of each CFG branch each, on top of ``uncond`` / ``cond``), so other
controls given to the final run (``final(..., controls=[...])``) can act on the scene alone
(``branches="scene"``) and leave the references as they are.

Families: UNet (SD1.x / SD2 / SDXL), SD3 and FLUX.1 (guidance-distilled: one branch; its RoPE
is applied inside attention, so the moved reference keys are re-rotated to their new places,
``FluxRope.relocate``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from diffattn.controls import Control, StepWindow
from diffattn.engine import attach, refuse_if_attached
from diffattn.errors import ConceptError, ControlError
from diffattn.families import RunState, adapter_for
from diffattn.methods.astar import ConceptRecorder, aggregate_attention, concept_token_indices
from diffattn.methods.ir import (ISOLATED_KINDS, IsolationAttention, MutualCrossAttention, RepositionAttention,
                                 ConsistentSelfAttention, postprocess_masks, resize_mask)
from diffattn.pipelines import configure

IR_FAMILIES = ("sd", "sdxl", "sd3", "flux")  # adapters whose reposition is exact (FLUX: keys re-rotated)


@dataclass
class IRConfig:
    """What the final run applies (defaults: the paper's IR-Diffusion).

    isolation:       −inf between different subjects inside the scene's own image attention.
    reposition:      the scene also attends to each reference subject's tokens (extended K/V).
    move:            reposition moves the reference subject onto the scene subject's box
                     (False: the tokens stay in place, ConsiStory-style "extended K/V only").
    mutual:          λ of the masked mutual cross-attention to each reference's prompt (0: off).
    dropout:         p of the per-step Bernoulli dropout of the scene masks (ConsiStory's 0.5).
    reposition_from: reposition at blocks with index ≥ this fraction of the block count
                     (official: layers 36-69 of SDXL's 70 transformer blocks → 36/70).
    share:           ``"ir"`` (the above) or ``"storydiffusion"``: StoryDiffusion's consistent
                     self-attention over the batch (random token share ``share_rate``, no masks)
                     as a baseline; the references then change as well.
    share_rate:      StoryDiffusion's sa32 / sa64 (0.5).
    share_warmup:    the leading share of the steps StoryDiffusion keeps plain (official: the
                     first 5 of 50); it acts on the UNet's up-block self-attention (official),
                     on an MMDiT's back half of the blocks in forward order (our mapping: no up
                     blocks there). Its random plain calls after the warm-up (probability 0.3
                     before step 20, 0.1 after) are left out: a baseline drawn at every call.
    max_retries:     rehearsals redrawn when a subject is missing (official: up to 20).
    close_frac, min_box_frac: the scene-mask clean-up (``postprocess_masks``).
    """

    isolation: bool = True
    reposition: bool = True
    move: bool = True
    mutual: float = 0.9
    dropout: float = 0.5
    reposition_from: float = 36 / 70
    share: str = "ir"
    share_rate: float = 0.5
    share_warmup: float = 0.1
    max_retries: int = 3
    close_frac: float = 128 / 768
    min_box_frac: float = 256 / 768

    def validate(self) -> "IRConfig":
        if not 0.0 <= self.mutual <= 1.0:
            raise ControlError(f"IRConfig.mutual={self.mutual!r}: λ in [0, 1] (0 turns it off)")
        if not 0.0 <= self.dropout < 1.0:
            raise ControlError(f"IRConfig.dropout={self.dropout!r}: in [0, 1)")
        if not 0.0 <= self.reposition_from <= 1.0:
            raise ControlError(f"IRConfig.reposition_from={self.reposition_from!r}: a fraction of the blocks in [0, 1]")
        if not 0.0 <= self.share_warmup < 1.0:
            raise ControlError(f"IRConfig.share_warmup={self.share_warmup!r}: a fraction of the steps in [0, 1)")
        if self.share not in ("ir", "storydiffusion"):
            raise ControlError(f"IRConfig.share={self.share!r}: 'ir' or 'storydiffusion'")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ControlError(f"IRConfig.max_retries={self.max_retries!r}: a count >= 0")
        return self

    @classmethod
    def baseline(cls, name: str) -> "IRConfig":
        """The named baselines and ablations of the evaluation (``BASELINES``)."""
        if name not in BASELINES:
            raise ControlError(f"unknown IR baseline {name!r}; choose from {sorted(BASELINES)}")
        return cls(**BASELINES[name])


# The same harness for every row of the evaluation table. "vanilla" is the rehearsal itself.
BASELINES = {
    "extended-kv": dict(isolation=False, reposition=True, move=False, mutual=0.0),
    "storydiffusion": dict(share="storydiffusion", isolation=False, reposition=False, mutual=0.0),
    "+isolation": dict(isolation=True, reposition=True, move=False, mutual=0.0),
    "+reposition": dict(isolation=False, reposition=True, move=True, mutual=0.0),
    "mutual": dict(isolation=False, reposition=False, mutual=0.9),
    "ir-no-mutual": dict(mutual=0.0),
    "ir": dict(),
}


@dataclass
class IRDiffusionOutput:
    """images: the IR scene per call (as ``output_type``); references: the S reference images;
    vanilla: the rehearsal scene (same noise, stock attention); reference_masks / scene_masks:
    bool ``[S, h, w]`` at the map resolution, and as PIL images at pixel size when
    ``return_masks``; attempts: rehearsals run (1 + retries); missing: per attempt, the
    subjects found missing."""

    images: list
    references: list
    vanilla: list
    reference_masks: torch.Tensor
    scene_masks: torch.Tensor
    reference_mask_images: list | None = None
    scene_mask_images: list | None = None
    attempts: int = 1
    missing: list = field(default_factory=list)


def assign_contested(masks: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Attention masks [S, h, w] whose cells several subjects claim, each such cell given to the
    subject whose map [S, h, w] is highest there.

    Why: the official clean-up removes overlaps, which is right for detector masks (they rarely
    overlap), but two words' cross-attention maps often light up both objects (on the testbed's
    tiny models nearly always: benchmarks/RESULTS.md), and removal would leave a cell or none."""
    contested = masks.sum(0) > 1  # [h, w]
    winner = F.one_hot(maps.argmax(0), masks.shape[0]).permute(2, 0, 1).bool()  # [S, h, w]
    return torch.where(contested[None], masks & winner, masks)


def strongest_component(masks: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Each attention mask [S, h, w] reduced to its 4-connected component of the largest map
    mass: one object per subject, as the official detector + SAM masks are."""
    from scipy import ndimage

    out = torch.zeros_like(masks)
    for i in range(masks.shape[0]):
        labels, n = ndimage.label(masks[i].cpu().numpy())  # 4-connected: diagonal touches split objects
        if n == 0:
            continue
        mass = ndimage.sum(maps[i].cpu().numpy(), labels, index=np.arange(1, n + 1))
        out[i] = torch.from_numpy(labels == 1 + int(np.argmax(mass)))
    return out


@dataclass
class IRRehearsal:
    """What the final run needs from the rehearsal: the call (prompts, steps, size...), the
    latents of the batch ``[ref_1 … ref_S, scene]``, its images ``[S + 1, 3, H, W]`` in [0, 1]
    (the vanilla scene last), the masks and the attempts; seed: the scene seed (the final run's
    mask dropout and token sharing draw from it, so scenes of different seeds drop differently)."""

    call: dict
    latents: torch.Tensor
    images: torch.Tensor
    reference_masks: torch.Tensor
    scene_masks: torch.Tensor
    attempts: int
    missing: list
    seed: int = 0


def row_groups(references: int):
    """The engine's row groups of an IR batch ``[ref_0 … ref_{S-1}, scene] × CFG`` (S =
    ``references``): a function ``batch -> {"ref0": rows, …, "scene": rows}``, each name one row
    of every CFG branch in the forward (two with CFG in the batch, one in a separate true-CFG
    forward); ``{}`` for a forward of another size."""
    per = references + 1

    def groups(batch: int) -> dict[str, list[int]]:
        if batch % per:
            return {}
        names = [f"ref{i}" for i in range(references)] + ["scene"]
        return {name: list(range(i, batch, per)) for i, name in enumerate(names)}

    return groups


def back_sites(image_sites, start: float) -> list[str]:
    """Names of the sites in the back ``1 - start`` of the blocks, counted in forward order over
    every stack of the denoiser (the paper's layers 36-69 of SDXL's 70 at ``start = 36/70``):
    FLUX's joint and single stacks each number their blocks from 0, so blocks are keyed by
    (stack, index), never by the index alone."""
    def block(x):  # (denoiser, stack, index in the stack)
        return x.denoiser, x.name.split(".")[0], x.block

    order = {key: i for i, key in enumerate(dict.fromkeys(block(x) for x in image_sites))}  # forward order
    first = round(start * len(order))
    return [x.name for x in image_sites if order[block(x)] >= first]


# tints of subjects 1, 2, 3, ... in mask overlays: saturated hues that read on light, dark and
# coloured regions alike
OVERLAY_COLORS = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 128, 0), (128, 0, 255))


def mask_overlay(image, masks, alpha: float = 0.5, first: int = 0):
    """``image`` (PIL RGB) with each subject's mask (PIL L or bool arrays, the image's size) tinted
    in its :data:`OVERLAY_COLORS` colour and its border drawn opaque: which region of the
    image each subject was given. ``first``: the subject index of ``masks[0]`` (its colour)."""
    from PIL import Image

    rgb = np.asarray(image.convert("RGB"), dtype=np.float64).copy()  # [H, W, 3]
    for i, m in enumerate(masks):
        inside = np.asarray(m) > (127 if isinstance(m, Image.Image) else 0)  # [H, W]
        if inside.shape != rgb.shape[:2]:
            raise ControlError(f"mask {i} is {inside.shape[::-1]} px; the image is {image.size}")
        color = np.array(OVERLAY_COLORS[(first + i) % len(OVERLAY_COLORS)], dtype=np.float64)
        rgb[inside] = (1 - alpha) * rgb[inside] + alpha * color
        padded = np.pad(inside, 1)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        rgb[inside & ~interior] = color  # the border: cells of the mask with a neighbour outside it
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")


def storydiffusion_sites(image_sites) -> list[str]:
    """Where the StoryDiffusion baseline shares tokens: the UNet's up-block self-attention
    (official ``SpatialAttnProcessor2_0`` on ``up_blocks`` attn1; the sites' ``u`` aliases), or,
    on a denoiser without up blocks (MMDiT), the back half of the blocks in forward order."""
    up = [x.name for x in image_sites if x.alias is not None and x.alias.startswith("u")]
    return up or back_sites(image_sites, 0.5)


class IRDiffusionPipeline:
    """IR-Diffusion around a diffusers pipeline's own components (module docstring).

    pipe:    ``StableDiffusionPipeline`` (SD1.x / SD2), ``StableDiffusionXLPipeline`` or
             ``StableDiffusion3Pipeline`` (subclasses included); modules are shared, not copied.
    config:  an :class:`IRConfig`; keyword ``overrides`` replace its fields.
    """

    def __init__(self, pipe, config: IRConfig | None = None, **overrides):
        self.adapter = adapter_for(pipe, method="IRDiffusionPipeline")
        if self.adapter.name not in IR_FAMILIES:
            raise ControlError(f"IRDiffusionPipeline on {type(pipe).__name__} ({self.adapter.name}): supported are "
                               f"{', '.join(IR_FAMILIES)} pipelines (an in-context editor such as FLUX Kontext "
                               f"conditions on its own context image instead)")
        self.pipe = pipe
        self.config = configure(config, IRConfig, overrides, ControlError, "IR-Diffusion")

    def __repr__(self):
        return f"IRDiffusionPipeline({type(self.pipe).__name__}, {self.config})"

    # ------------------------------------------------------------------ words and maps
    def _block(self):
        return self.adapter.text_blocks()[self.adapter.default_text_keys]

    def _word_keys(self, prompt: str, word: str, what: str) -> list[int]:
        """Key positions of ``word``'s tokens in ``prompt`` (among the denoiser's text keys)."""
        block = self._block()
        try:
            tokens = concept_token_indices(block.tokenizer, prompt, [word], start_token=block.start_token)[0]
        except ConceptError as e:
            raise ConceptError(f"{what}: the subject word {word!r} is not in {prompt!r} ({e}); give subject_words= "
                               f"naming a word of both the subject prompt and the scene prompt") from None
        return [block.offset + t for t in tokens]

    @staticmethod
    def _default_word(subject: str, scene: str) -> str:
        """The subject prompt's last word (the head noun of an English noun phrase), which the
        scene prompt must also have."""
        words = subject.lower().replace(",", " ").split()
        if not words or words[-1] not in scene.lower().replace(",", " ").split():
            raise ConceptError(f"no word of the subject {subject!r} names it in the scene prompt {scene!r} (its last "
                               f"word is taken as its noun): name the subject in the scene (e.g. 'a circle left of "
                               f"a square') or pass subject_words=")
        return words[-1]

    def _resolution(self, height: int, width: int, factor: int | None) -> tuple[int, int]:
        if factor is None:
            return tuple(self.adapter.token_grid(height, width))
        f = self.adapter.vae_factor * factor
        return -(-height // f), -(-width // f)

    # ------------------------------------------------------------------ one batched call
    def _call(self, call: dict, latents, controls, run, stage):
        """One stock pipeline call on ``prompts`` with ``controls`` attached; returns (images
        tensor [B, 3, H, W] in [0, 1], the cond rows' image × text attention at ``resolution``
        summed over steps [B, h, w, T], folded at every step so memory stays one step's)."""
        pipe, resolution = self.pipe, call["resolution"]
        rec = ConceptRecorder(call["selector"])  # the same recorder in every call: identical kernels for the references
        total: list = []

        def on_step(_pipe, i, t, kwargs):
            if rec.records:
                rows = rec.records[0][1].shape[0]
                attn = torch.stack([aggregate_attention([(p[r], grid) for _, p, grid in rec.records], resolution)
                                    for r in range(rows)])  # [B, h, w, T]
                total[:] = [attn if not total else total[0] + attn]
            rec.records = []
            run.report(i, t, kwargs["latents"], stage=stage)
            return kwargs

        rec.start("main")
        run.start(call["steps"], desc=f"IR-Diffusion {stage}")
        try:
            with attach(pipe, rec, *controls, run=run) as handle, handle.row_groups(row_groups(len(call["prompts"]) - 1)):
                out = pipe(prompt=call["prompts"], negative_prompt=call["negative"], latents=latents,
                           num_inference_steps=call["steps"], guidance_scale=call["guidance"], height=call["height"],
                           width=call["width"], output_type="pt", callback_on_step_end=on_step, **call["extra"])
        finally:
            rec.start(None)
            run.close()
        if not total:
            raise ConceptError("no cross-attention was recorded in the rehearsal: the pipeline's sites saw no "
                               "image-query x text-key attention; pass reference_masks= and scene_masks=")
        return out.images, total[0]

    @staticmethod
    def word_map(attn: torch.Tensor, keys: list[int]) -> torch.Tensor:
        """One word's map from a row's attention ``[h, w, T]``: the mean over its keys,
        min-max normalised (ConsiStory) -> [h, w]."""
        m = attn[..., keys].mean(-1)
        return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)

    # ------------------------------------------------------------------ call
    def __call__(self, prompt: str, subjects: list[str], *, output_type: str = "pil", return_masks: bool = False,
                 config: IRConfig | None = None, controls=(), **kwargs) -> IRDiffusionOutput:
        """Generate the references and the scene with IR-Diffusion: :meth:`rehearse`, then
        :meth:`final` (arguments as :meth:`rehearse`; ``config`` overrides the pipeline's for
        the final run; ``controls`` join the final run, as :meth:`final`)."""
        return self.final(self.rehearse(prompt, subjects, **kwargs), config=config, output_type=output_type,
                          return_masks=return_masks, controls=controls)

    @torch.no_grad()
    def rehearse(self, prompt: str, subjects: list[str], *, subject_words: list[str] | None = None,
                 reference_masks=None, scene_masks=None, negative_prompt=None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 seed: int = 0, reference_seed: int | None = None, segmenter=None, callback=None,
                 progress: bool | None = None, **kwargs) -> "IRRehearsal":
        """Steps 1-2 of the module docstring: references, vanilla scene and masks.

        prompt:        the scene prompt, naming every subject once ("a circle left of a square").
        subjects:      S reference prompts ("a striped red circle", "a dotted blue square").
        subject_words: the word of subject i in both prompts (default: the subject prompt's
                       last word, its noun).
        reference_masks, scene_masks: user masks ``[S, H, W]`` (any resolution) replacing the
                       attention masks; user scene masks skip the presence retries.
        seed / reference_seed: the scene noise (retry k draws the next stream) and the shared
                       reference noise (default ``seed``; the streams differ).
        segmenter:     optional ``segmenter(image [3, H, W] in [0, 1], i, role) -> bool [H, W] or
                       None`` (role ``"reference"`` / ``"scene"``; None: subject i is missing),
                       the official pipeline's detector + SAM slot (e.g. the testbed's oracle);
                       default: masks from the words' cross-attention.
        callback:      ``callback(info)`` after every step (``RunState.report``; ``stage`` is
                       ``"rehearsal"`` or ``"final"``).
        Other keywords go to the pipeline (``max_sequence_length``, ``clip_skip``).
        """
        pipe, cfg, adapter = self.pipe, self.config, self.adapter
        refuse_if_attached(pipe, "IRDiffusionPipeline")
        subjects = [subjects] if isinstance(subjects, str) else list(subjects)
        s = len(subjects)
        if s < 1:
            raise ConceptError("IRDiffusionPipeline needs at least one subject prompt")
        if subject_words is not None and len(subject_words) != s:
            raise ConceptError(f"{s} subjects but {len(subject_words)} subject_words: give one word per subject")
        words = list(subject_words) if subject_words is not None else [self._default_word(x, prompt) for x in subjects]
        masks_in = {name: self._user_masks(m, name, s) for name, m in
                    (("reference_masks", reference_masks), ("scene_masks", scene_masks)) if m is not None}
        defaults = adapter.call_defaults()
        steps = num_inference_steps or defaults.get("num_inference_steps", 50)
        w = guidance_scale if guidance_scale is not None else defaults.get("guidance_scale", 7.5)
        size_h, size_w = adapter.native_size()
        height, width = adapter.fit_size(height or size_h, width or size_w)
        if progress is None:
            progress = not getattr(pipe, "_progress_bar_config", {}).get("disable", False)
        run = RunState(callback=callback, progress=progress, desc="IR-Diffusion")
        ref_keys = [self._word_keys(x, wd, f"subject {i}") for i, (x, wd) in enumerate(zip(subjects, words))]
        scene_keys = [self._word_keys(prompt, wd, "the scene prompt") for wd in words]

        from diffattn.sites import sites as list_sites

        selector, factor = adapter.text_attention_sites(list_sites(pipe))
        resolution = self._resolution(height, width, factor)
        call = dict(prompts=subjects + [prompt], steps=steps, guidance=w, height=height, width=width,
                    negative=self._negatives(negative_prompt, s), extra=kwargs, resolution=resolution,
                    selector=selector, callback=callback, progress=progress)
        noise_ref = self._noise(height, width, reference_seed if reference_seed is not None else seed, stream=0)
        missing_log, attempt = [], 0
        while True:
            latents = torch.cat([noise_ref.expand(s, *noise_ref.shape[1:]),
                                 self._noise(height, width, seed, stream=1 + attempt)])  # [S + 1, ...]
            images, attn = self._call(call, latents, [], run, "rehearsal")
            attempt += 1
            ref_masks = masks_in.get("reference_masks")
            if ref_masks is None:
                ref_masks = self._masks(images[:s], segmenter, "reference", resolution,
                                        [self.word_map(attn[i], ref_keys[i]) for i in range(s)])
            if "scene_masks" in masks_in:
                scene = masks_in["scene_masks"]
                break
            maps = [self.word_map(attn[s], keys) for keys in scene_keys]
            raw = self._masks([images[s]] * s, segmenter, "scene", resolution, maps)
            if segmenter is None:
                raw = strongest_component(assign_contested(raw, torch.stack(maps)), torch.stack(maps))
            scene = postprocess_masks(raw, cfg.close_frac, cfg.min_box_frac)
            gone = [i for i in range(s) if not bool(scene[i].any())]
            missing_log.append(gone)
            if not gone or attempt > cfg.max_retries:
                break
        empty = [i for i in range(s) if not bool(ref_masks[i].any())]
        if empty:
            raise ConceptError(f"the reference masks of subjects {empty} are empty (the reference does not show its "
                               f"subject, or its word's attention found no region); pass reference_masks=")
        return IRRehearsal(call=call, latents=latents, images=images, reference_masks=ref_masks, scene_masks=scene,
                           attempts=attempt, missing=missing_log, seed=int(seed))

    @torch.no_grad()
    def final(self, rehearsal: "IRRehearsal", *, config: IRConfig | None = None, output_type: str = "pil",
              return_masks: bool = False, controls=()) -> IRDiffusionOutput:
        """Step 3: the final run of a rehearsal (same batch, same noises) with ``config``'s
        controls (default the pipeline's); one rehearsal serves every baseline.

        controls: other diffattn controls attached with IR's in the final run; they select the
                  rows by role like branches (``branches="scene"``, ``"ref0"``: module notes), so
                  ``branches="scene"`` keeps the references exact. A control that adds its own
                  guidance branch is refused (the final run's CFG is the pipeline's)."""
        cfg = (config or self.config).validate()
        refuse_if_attached(self.pipe, "IRDiffusionPipeline")
        r, adapter = rehearsal, self.adapter
        s = r.reference_masks.shape[0]
        run = RunState(callback=r.call["callback"], progress=r.call["progress"], desc="IR-Diffusion")
        from diffattn.sites import sites as list_sites

        extra = [controls] if isinstance(controls, Control) else list(controls)
        for c in extra:
            if not isinstance(c, Control):
                raise ControlError(f"controls: diffattn controls (da.SoftPAG(...), ...); got {type(c).__name__}")
            if c.extra_branches:
                raise ControlError(f"{type(c).__name__} adds its own guidance branch {c.extra_branches[0]!r}; the final "
                                   f"IR run keeps the pipeline's CFG only: attach it to a plain pipeline call instead")
        ir_controls = self._controls(cfg, r.reference_masks, r.scene_masks, s, list_sites(self.pipe), r.seed)
        final, _ = self._call(r.call, r.latents, ir_controls + extra, run, "final")
        as_out = lambda x: adapter.postprocess(x * 2 - 1, output_type, x.dtype) if output_type != "pt" else x  # noqa: E731
        out = IRDiffusionOutput(images=as_out(final[s:]), references=as_out(final[:s]), vanilla=as_out(r.images[s:]),
                                reference_masks=r.reference_masks, scene_masks=r.scene_masks, attempts=r.attempts,
                                missing=r.missing)
        if return_masks:
            h, w = r.call["height"], r.call["width"]
            out.reference_mask_images = [self._mask_image(m, h, w) for m in r.reference_masks]
            out.scene_mask_images = [self._mask_image(m, h, w) for m in r.scene_masks]
        return out

    @staticmethod
    def _user_masks(m, name: str, s: int) -> torch.Tensor:
        m = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).float()
        if m.dim() != 3 or m.shape[0] != s:
            raise ControlError(f"{name} of shape {tuple(m.shape)}: give [S={s}, H, W], one mask per subject")
        empty = [i for i in range(s) if not bool((m[i] > 0.5).any())]
        if empty:
            raise ControlError(f"{name}: the masks of subjects {empty} are empty; every subject needs a region")
        return m > 0.5

    @staticmethod
    def _masks(images, segmenter, role: str, resolution, maps) -> torch.Tensor:
        """Masks [S, h, w] at the map resolution: the segmenter's (resized, Otsu) or the maps' (Otsu)."""
        out = []
        for i, (image, m) in enumerate(zip(images, maps)):
            if segmenter is not None:
                seg = segmenter(image, i, role)
                m = torch.zeros(resolution) if seg is None else torch.as_tensor(np.asarray(seg)).float()
            out.append(resize_mask(m, resolution) if bool((m > 0).any()) else torch.zeros(resolution, dtype=torch.bool))
        return torch.stack(out)

    def _negatives(self, negative_prompt, s):
        if negative_prompt is None:
            return None
        return [negative_prompt] * (s + 1) if isinstance(negative_prompt, str) else list(negative_prompt)

    def _noise(self, height: int, width: int, seed: int, stream: int) -> torch.Tensor:
        """Initial latents of one image in the sampling layout (FLUX: packed) from a seed and a
        stream (references 0, scene attempt k: 1 + k), unscaled: the stock pipeline scales them
        by its scheduler's ``init_noise_sigma`` itself."""
        gen = torch.Generator(self.adapter.device).manual_seed(int(seed) * 1_000_003 + stream)
        noise = self.adapter.prepare_latents(RunState(), 1, height, width, self.adapter.denoiser.dtype, gen)
        return noise / getattr(self.pipe.scheduler, "init_noise_sigma", 1.0)  # flow schedulers have none: 1

    def _controls(self, cfg: IRConfig, ref_masks, scene_masks, s, all_sites, seed: int = 0) -> list:
        image_sites = [x for x in all_sites if x.kind in ISOLATED_KINDS]  # in forward order
        if cfg.share == "storydiffusion":
            chosen = set(storydiffusion_sites(image_sites))
            return [ConsistentSelfAttention(cfg.share_rate, seed=seed, sites=lambda site: site.name in chosen,
                                            steps=StepWindow(start_frac=cfg.share_warmup))]
        back = set(back_sites(image_sites, cfg.reposition_from))
        controls = []
        if cfg.isolation and s > 1:
            controls.append(IsolationAttention(scene_masks, references=s))
        mmdit = self.adapter.joint_attention
        if cfg.reposition or (mmdit and cfg.mutual):  # on MMDiT the mutual cross-attention rides on it
            controls.append(RepositionAttention(ref_masks, scene_masks, dropout=cfg.dropout, seed=seed, move=cfg.move,
                                                mutual=cfg.mutual if mmdit else 0.0, extend=cfg.reposition,
                                                sites=lambda site: site.name in back))
        if cfg.mutual and not self.adapter.joint_attention:
            controls.append(MutualCrossAttention(scene_masks, weight=cfg.mutual))
        return controls

    @staticmethod
    def _mask_image(mask: torch.Tensor, height: int, width: int):
        from PIL import Image

        m = F.interpolate(mask.float()[None, None], size=(height, width), mode="nearest")[0, 0]
        return Image.fromarray((m.numpy() * 255).astype(np.uint8))
