"""UAM: faithful inversion and reconstruction, and mask-guided editing, around a diffusers pipeline.

Mo et al., "Uniform Attention Maps: Boosting Image Fidelity in Reconstruction and Editing"
(WACV 2025, arXiv 2411.19652).

    from diffattn.pipelines import UAMPipeline
    uam = UAMPipeline(pipe)                                   # SD1.x/2.x, SDXL, SD3 or FLUX.1 pipeline
    rec = uam.reconstruct(image, "a red circle", conditioning="uniform")
    rec.image, rec.psnr, rec.ssim
    out = uam.edit(image, "a red circle", "a blue circle")    # P2P word swap + UAM blending
    out.target.save("edit.png")

**Inversion and reconstruction** (§3.1). The image is encoded with the VAE (posterior mean),
inverted to z_T and denoised back, both *unguided* (w = 1, one prediction per step) as in
the paper, with one of three conditionings:

- ``"source"``:  the source prompt (DDIM's usual inversion);
- ``"empty"``:   the empty prompt "";
- ``"uniform"``: uniform attention maps (:class:`~diffattn.methods.uniform.UniformAttention`)
  under the empty prompt (official code: ``ddim_loop_uam`` with the unconditional embedding),
  in both directions.

UNet pipelines use DDIM (η = 0, the paper's scheduler: scaled-linear betas, no clipping,
``set_alpha_to_one=False``, "leading" spacing). Inversion takes MasaCtrl's ``next_step``:
ε is predicted at the *next* timestep from the current latent, and
z_next = sqrt(ᾱ_next)·x̂0 + sqrt(1-ᾱ_next)·ε. SD3 (rectified flow) inverts by running the
Euler ODE backwards: x_{σ_i} = x_{σ_{i+1}} + (σ_i - σ_{i+1})·v(x_{σ_{i+1}}, t_i), the velocity
taken at the step's own timestep, the mirror of the sampler's step. On SD3 "uniform" is the
segment-uniform mode (the text keys' share spread uniformly over them). Images may have any
size whose sides are multiples of ``UAMPipeline.size_unit``. SDXL runs the UNet
path with the pipeline's own pooled text and micro-conditioning (an uncropped image at its
own size); the "" of the uniform branch is the encoded empty prompt, while CFG's
unconditional row is zeros where the pipeline's ``force_zeros_for_empty_prompt`` says so.
FLUX.1 inverts like SD3 (its own σ grid and dynamic shift, latents packed into 2×2 patches
inside each forward) with segment-uniform maps on its joint and single-stream sites; being
guidance-distilled it has no CFG: "unguided" means the guidance embedding
``distilled_guidance`` (1.0) both ways, and editing feeds ``guidance_scale`` (3.5) to the
source and target branches' embedding instead of running unconditional rows.

**Editing** (§3.2, Algorithm 1). The base editor is prompt-to-prompt's word swap (Hertz et
al. 2023): the source and target branches start from the source-prompt inversion and run with
CFG; for the first ``cross_replace`` of the steps the target's cross-attention maps are the
source's, for the first ``self_replace`` its (small) self-attention maps too. The replacement
is exact and never builds a map: A_src·V_tgt = attention(q_src, k_src, v_tgt), computed by an
engine control (:class:`PromptToPromptReplace`). UAM adds an auxiliary branch (uniform maps,
"" prompt, no CFG, from the uniform inversion) and, at the steps with t < T_mask, blends in
predicted-x0 space (for latent elements, per channel):

    Δ = x̂0_src - x̂0_tgt,  λ_i = quantile(|Δ|, linspace(0, q, T)[i]),  M = dilate(|Δ| > λ_i)
    x̂0_tgt ← M·x̂0_tgt + (1 - M)·x̂0_u      (and x̂0_src ← (1-M)·x̂0_src + M·x̂0_u with blend="both")
    z_{t-1} = sqrt(ᾱ_{t-1})·x̂0 + sqrt(1 - ᾱ_{t-1})·ε          (ε unchanged; flow: (1-σ')x̂0 + σ'ε̂)

Defaults follow the official CLI: T_mask = 200 (of 1000), q = 0.5, dilation radius 1, blend
the target only (the P2P path), and the *code's* mask convention, which dilates the edit mask
(the paper's Algorithm 1 dilates the preserve mask; ``mask_convention="paper"``). The
auxiliary branch runs as its own forward, so it never touches the editor's state.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffattn.controls import Control
from diffattn.errors import ConfigError, ControlError, EditPromptError, ImageInputError, UnsupportedModelError  # noqa: F401
from diffattn.families import RunState, adapter_for
from diffattn.families.base import flow_timestep_kwargs, vae_upcast
from diffattn.pipelines import configure
from diffattn.methods.p2p import PromptToPromptReplace
from diffattn.methods.uniform import MASK_CONVENTIONS, UniformAttention, blend_x0, edit_mask, quantile_schedule

CONDITIONINGS = ("source", "empty", "uniform")  # the paper's three; "uniform-source" also accepted
BLENDS = ("target", "both", "source")


# ----------------------------------------------------------------------------- metrics


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio 10·log10(L² / MSE) in dB of two images of equal shape
    (values in [0, L]); ``inf`` for identical images."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ImageInputError(f"psnr needs images of one shape; got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised 1-D Gaussian of SSIM's window (Wang et al. 2004: 11 taps, σ = 1.5)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [H, W] by the 1-D window w (w ⊗ w) -> [H-s+1, W-s+1]."""
    rows = np.lib.stride_tricks.sliding_window_view(x, len(w), axis=0) @ w  # [H-s+1, W]
    return np.lib.stride_tricks.sliding_window_view(rows, len(w), axis=1) @ w  # [H-s+1, W-s+1]


def ssim(a, b, data_range: float = 1.0, *, size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> float:
    """Structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004, Eq. 13) with the
    Gaussian window (11×11, σ = 1.5), K1 = 0.01, K2 = 0.03, population statistics, the mean
    of the SSIM map over the window positions inside the image, averaged over channels
    (the convention of skimage's ``structural_similarity(gaussian_weights=True,
    use_sample_covariance=False)``). a, b: [H, W] or [H, W, C] in [0, data_range]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ImageInputError(f"ssim needs images of one shape; got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]  # [H, W, 1]
    if min(a.shape[:2]) < size:
        raise ImageInputError(f"ssim needs images of at least {size}x{size} pixels; got {a.shape[1]}x{a.shape[0]}")
    w = gaussian_window(size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    values = []
    for c in range(a.shape[-1]):
        x, y = a[..., c], b[..., c]
        mx, my = _filter_valid(x, w), _filter_valid(y, w)
        sxx = _filter_valid(x * x, w) - mx * mx
        syy = _filter_valid(y * y, w) - my * my
        sxy = _filter_valid(x * y, w) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        values.append(m.mean())
    return float(np.mean(values))


# ----------------------------------------------------------------------------- solver math


def ddim_x0(z: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """DDIM's predicted clean latent x̂0 = (z - sqrt(1-ᾱ)·ε) / sqrt(ᾱ) (Song et al. 2021, Eq. 12)."""
    return (z - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def ddim_compose(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """z = sqrt(ᾱ)·x̂0 + sqrt(1-ᾱ)·ε: a DDIM (η = 0) step lands here, forwards or backwards."""
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps


def v_to_eps(z: torch.Tensor, v: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """ε from a v-prediction (Salimans & Ho 2022, §4: v = √ᾱ·ε − √(1−ᾱ)·x0):
    ε = √(1−ᾱ)·z + √ᾱ·v."""
    return (1 - alpha_bar) ** 0.5 * z + alpha_bar**0.5 * v


def flow_x0(z: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Rectified flow x_σ = (1-σ)x0 + σε, velocity v = ε - x0: x̂0 = x_σ - σ·v."""
    return z - sigma * v


def flow_noise(z: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Rectified flow's predicted noise ε̂ = x_σ + (1-σ)·v."""
    return z + (1 - sigma) * v


def flow_compose(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_σ = (1-σ)·x̂0 + σ·ε̂; from level σ this equals the Euler step x + (σ' - σ)·v."""
    return (1 - sigma) * x0 + sigma * noise


@dataclass(frozen=True)
class Step:
    """One denoising step: the model timestep ``t`` and the noise levels it goes between
    (``high`` -> ``low``: ᾱ_t -> ᾱ_prev for DDIM, σ_i -> σ_{i+1} for flow). Inversion walks
    the steps backwards, ``low`` -> ``high``, with the prediction at the same ``t``."""

    t: float
    high: float
    low: float


class Solver:
    """DDIM (η = 0, ε-prediction) or rectified-flow Euler in the x̂0 / noise form both
    share: a step from level a to level b is ``compose(x0(z, pred, a), noise(z, pred, a), b)``."""

    def __init__(self, kind: str):
        if kind not in ("ddim", "flow"):
            raise ControlError(f"solver {kind!r}: 'ddim' or 'flow'")
        self.kind = kind

    def x0(self, z, pred, level):
        return ddim_x0(z, pred, level) if self.kind == "ddim" else flow_x0(z, pred, level)

    def noise(self, z, pred, level):
        return pred if self.kind == "ddim" else flow_noise(z, pred, level)

    def compose(self, x0, noise, level):
        return ddim_compose(x0, noise, level) if self.kind == "ddim" else flow_compose(x0, noise, level)

    def step(self, z, pred, level_from, level_to):
        """Move ``z`` from ``level_from`` to ``level_to`` with the prediction ``pred``."""
        return self.compose(self.x0(z, pred, level_from), self.noise(z, pred, level_from), level_to)


def ddim_steps(scheduler_config, num_steps: int) -> list[Step]:
    """The paper's DDIM grid (leading spacing, the config's ``steps_offset``): steps
    (t_i, ᾱ_{t_i}, ᾱ_{t_{i+1}}), the last one ending at ᾱ_0 (``set_alpha_to_one=False``)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config, clip_sample=False, set_alpha_to_one=False,
                                      timestep_spacing="leading", prediction_type="epsilon")
    sched.set_timesteps(num_steps)
    ts = [int(t) for t in sched.timesteps]
    ab = sched.alphas_cumprod.double()
    final = float(sched.final_alpha_cumprod)
    return [Step(float(t), float(ab[t]), float(ab[ts[i + 1]]) if i + 1 < len(ts) else final) for i, t in enumerate(ts)]


def flow_steps(scheduler_config, num_steps: int, image_seq_len: int, *, flux: bool = False) -> list[Step]:
    """The pipeline's flow-matching grid: steps (t_i = 1000·σ_i, σ_i, σ_{i+1}), σ_T = 0
    (dynamic shifting as the SD3 pipeline computes it, when the scheduler uses it; ``flux``:
    the FLUX pipeline's σ = linspace(1, 1/n, n) before the shift and its max_shift default)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    kw = flow_timestep_kwargs(sched.config, num_steps, image_seq_len, flux=flux)
    sched.set_timesteps(None if "sigmas" in kw else num_steps, **kw)
    sig = sched.sigmas.double()
    return [Step(float(t), float(sig[i]), float(sig[i + 1])) for i, t in enumerate(sched.timesteps)]


# ----------------------------------------------------------------------------- configuration and outputs


@dataclass
class UAMConfig:
    """Settings of :class:`UAMPipeline` (defaults: the official code's CLI).

    num_inference_steps: steps of inversion, reconstruction and editing (``None``: the
                     pipeline's default; the paper: 50 on SD1.4).
    guidance_scale:  CFG of the source and target branches when editing (``None``: the
                     pipeline's default; the paper: 7.5). Inversion, reconstruction and the
                     auxiliary branch are always unguided. On FLUX (guidance-distilled, no
                     CFG) it is the guidance embedding of the two branches (default 3.5).
    distilled_guidance: FLUX's guidance embedding for inversion, reconstruction and the
                     auxiliary branch, the same both ways (1.0: the unguided setting).
    uniform_prompt:  the text under the uniform maps ("" as the official code; ``None``: the
                     source prompt, as conditioning "uniform-source" always does). On the
                     tiny-sd3 testbed model the "" prediction diverges under inversion, so use
                     ``None`` there (benchmarks/uam_eval.py).
    uniform_keys:    ``UniformAttention(keys=...)``: "all" (every key, padding included, the
                     paper) or text-token positions.
    uniform_sites:   ``UniformAttention(sites=...)`` ("auto": all cross / joint sites).
    source_inversion: conditioning of the inversion that the source and target branches
                     start from ("source": the source prompt, DDIM+P2P; or "empty").
    mask_timestep:   T_mask: blend at steps with model timestep t < T_mask (0..1000; the
                     official CLI 200, about the last 10 of 50 steps; function default 400).
    quantile:        q of λ_i = quantile(|Δ|, linspace(0, q, T)[i]) (CLI 0.5; function default 0.7).
    dilation:        radius r of the square dilation (kernel 2r+1; ``dilate_mask=1``).
    mask_convention: "code" (dilate the edit mask, official code, default) or "paper"
                     (dilate the preserve mask, Algorithm 1).
    blend:           "target" (P2P path: the target only), "both" (MasaCtrl path: the
                     source too, the "red line") or "source" (the source only, an ablation).
    cross_replace, self_replace: fractions of the steps, from the start, where the target's
                     cross / self maps are the source's (the official P2P config: 0.4 / 0.6).
    self_max_tokens: self maps replaced only at sites with at most this many queries
                     (``None``: latent tokens / 4, UAM's P2P code: 32×32 of a 64×64 latent).
    """

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    distilled_guidance: float = 1.0
    uniform_prompt: str | None = ""
    uniform_keys: object = "all"
    uniform_sites: object = "auto"
    source_inversion: str = "source"
    mask_timestep: float = 200.0
    quantile: float = 0.5
    dilation: int = 1
    mask_convention: str = "code"
    blend: str = "target"
    cross_replace: float = 0.4
    self_replace: float = 0.6
    self_max_tokens: int | None = None

    def validate(self) -> "UAMConfig":
        if self.mask_convention not in MASK_CONVENTIONS:
            raise ConfigError(f"mask_convention={self.mask_convention!r}: use 'code' (dilate the edit mask, official "
                              f"code) or 'paper' (dilate the preserve mask, Algorithm 1)")
        if self.blend not in BLENDS:
            raise ConfigError(f"blend={self.blend!r}: use 'target' (P2P path), 'both' (MasaCtrl path) or 'source'")
        if self.source_inversion not in ("source", "empty"):
            raise ConfigError(f"source_inversion={self.source_inversion!r}: use 'source' or 'empty'")
        if not self.distilled_guidance >= 0.0:
            raise ConfigError(f"distilled_guidance={self.distilled_guidance}: a guidance embedding is >= 0")
        if not 0.0 <= self.quantile <= 1.0:
            raise ConfigError(f"quantile={self.quantile}: a quantile lies in [0, 1]")
        if not 0.0 <= self.mask_timestep <= 1000.0:
            raise ConfigError(f"mask_timestep={self.mask_timestep}: T_mask is a model timestep in [0, 1000] "
                              f"(blending runs while t < T_mask; 0 turns it off)")
        if self.dilation < 0:
            raise ConfigError(f"dilation={self.dilation}: a radius is >= 0 (0 = no dilation)")
        for name in ("cross_replace", "self_replace"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)}: a fraction of the steps in [0, 1]")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps={self.num_inference_steps}: at least 1")
        return self


@dataclass
class Inversion:
    """latents: z_T [B, C, h, w] (fp32); z0: the encoded image; conditioning and prompt used;
    steps: the :class:`Step` grid; trajectory: z after every inversion step (when asked)."""

    latents: torch.Tensor
    z0: torch.Tensor
    conditioning: str
    prompt: list[str]
    steps: list[Step]
    trajectory: list[torch.Tensor] | None = None


@dataclass
class Reconstruction:
    """image: PIL image; array: [H, W, 3] float in [0, 1]; psnr (dB) and ssim against the input."""

    conditioning: str
    image: Image.Image
    array: np.ndarray
    psnr: float
    ssim: float


@dataclass
class EditOutput:
    """source / target (PIL): the two branches' images; aux: the uniform-map reconstruction
    (``None`` without UAM); masks: per blended step ``(step, t, M [C, h, w])``, M = 1 edited;
    inversions: the inverted latents used, ``{"source": z_T, "uniform": z^u_T}`` (pass them to
    another ``edit`` of the same image, prompt and steps to skip the inversions)."""

    source: Image.Image
    target: Image.Image
    aux: Image.Image | None = None
    masks: list[tuple[int, float, torch.Tensor]] = field(default_factory=list)
    inversions: dict[str, torch.Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the pipeline


def _token_count(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids)


def word_swap_tokenizers(pipe) -> list:
    """The tokenizers whose token counts a word swap must keep: every one the text keys come
    from (SD: CLIP; SDXL: both CLIPs; SD3: both CLIPs and T5 when loaded; FLUX: T5 alone)."""
    return adapter_for(pipe, method="UAMPipeline").word_swap_tokenizers()


def check_word_swap(tokenizers, source: str, target: str) -> None:
    """Prompt-to-prompt word swap maps token j of the source to token j of the target: the
    target must be non-empty and have the source's token count under every tokenizer the
    model's text keys come from (one tokenizer or a list)."""
    if not isinstance(target, str) or not target.strip():
        raise EditPromptError("the target prompt is empty; give the edited caption, e.g. --target 'a blue circle'")
    if not isinstance(source, str):
        raise EditPromptError(f"the source prompt must be a string; got {type(source).__name__}")
    for tokenizer in tokenizers if isinstance(tokenizers, (list, tuple)) else [tokenizers]:
        ns, nt = _token_count(tokenizer, source), _token_count(tokenizer, target)
        if ns != nt:
            raise EditPromptError(
                f"word swap needs prompts of equal token counts: {source!r} has {ns} {type(tokenizer).__name__} "
                f"tokens, {target!r} has {nt}. Swap a word for one with the same number of tokens (e.g. a colour or "
                f"a shape for another), or use prompt-to-prompt refinement (token alignment), which this editor does "
                f"not implement"
            )


class UAMPipeline:
    """UAM inversion / reconstruction / editing with a diffusers pipeline's own components.

    pipe:   a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
            ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (subclasses, e.g. the testbed's,
            included); modules are shared, not copied.
    config: a :class:`UAMConfig`; keyword ``overrides`` replace its fields.
    progress: show tqdm bars (``None``: follow the pipeline's progress-bar config).
    """

    def __init__(self, pipe, config: UAMConfig | None = None, *, progress: bool | None = None, **overrides):
        self.adapter = adapter_for(pipe, method="UAMPipeline")
        self.pipe = pipe
        self.config = configure(config, UAMConfig, overrides, ConfigError, "UAM")
        self.defaults = self.adapter.call_defaults()
        if progress is None:
            progress = not getattr(pipe, "_progress_bar_config", {}).get("disable", False)
        self.progress = bool(progress)
        self.solver = Solver(self.adapter.solver)
        # what the denoiser predicts (SD3 and FLUX predict the flow velocity, the solver's own form)
        self.prediction = self.adapter.prediction_type
        if self.prediction not in ("epsilon", "v_prediction", "flow"):
            raise UnsupportedModelError(f"DDIM inversion supports epsilon and v_prediction UNets; the scheduler says "
                                        f"prediction_type={self.prediction!r}")
        self._embeds: dict[str, dict] = {}  # prompt -> its encoding: the text encoders' output does not change

    @property
    def family(self) -> str:
        """The adapter's name: ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"``."""
        return self.adapter.name

    @classmethod
    def from_pipe(cls, pipe, config: UAMConfig | None = None, **overrides) -> "UAMPipeline":
        return cls(pipe, config, **overrides)

    def __repr__(self):
        return f"UAMPipeline({type(self.pipe).__name__}, {self.solver.kind})"

    # ------------------------------------------------------------------ properties
    @property
    def denoiser(self):
        return self.adapter.denoiser

    @property
    def device(self):
        return self.pipe._execution_device

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the model's native size: its sample size × the VAE factor."""
        return self.adapter.native_size()

    @property
    def size_unit(self) -> int:
        """Image sides must be multiples of this many pixels: the VAE factor times the UNet's
        downsampling (2 per level after the first), SD3's patch or FLUX's 2×2 packing."""
        return self.adapter.size_unit

    @property
    def max_side(self) -> int | None:
        """The longest side in pixels the model can embed (SD3's ``pos_embed_max_size`` patches;
        ``None``: no limit)."""
        return self.adapter.max_side

    def num_steps(self, num_inference_steps: int | None = None) -> int:
        n = num_inference_steps or self.config.num_inference_steps or self.defaults.get("num_inference_steps") or 50
        if int(n) < 1:
            raise ControlError(f"num_inference_steps={n}: at least 1")
        return int(n)

    def steps(self, num_inference_steps: int | None = None, latent_hw: tuple[int, int] | None = None) -> list[Step]:
        """The step grid (DDIM for UNets, flow matching for SD3 and FLUX)."""
        n = self.num_steps(num_inference_steps)
        if self.adapter.solver == "ddim":
            return ddim_steps(self.pipe.scheduler.config, n)
        hw = latent_hw or tuple(s // self.adapter.vae_factor for s in self.image_size)
        return flow_steps(self.pipe.scheduler.config, n, self.adapter.image_seq_len(hw), flux=self.adapter.flux_sigmas)

    # ------------------------------------------------------------------ images
    def load_image(self, image) -> torch.Tensor:
        """A PIL RGB image, a path, an array [H, W, 3] (uint8, or float in [0, 1]) or a tensor
        [3, H, W] / [1, 3, H, W] in [0, 1], sides multiples of :attr:`size_unit` (the native size
        :attr:`image_size` is what the model knows best) -> [1, 3, H, W] fp32 in [0, 1]."""
        if isinstance(image, (str, Path)):
            try:
                image = Image.open(image)
                image.load()
            except (OSError, ValueError) as e:
                raise ImageInputError(f"cannot read the image file: {e}") from None
        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                raise ImageInputError(f"image mode is {image.mode!r}; UAM inverts RGB images: convert it first "
                                      f"(image.convert('RGB'))")
            arr = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ImageInputError(f"an image array must be [H, W, 3] RGB; got shape {image.shape}")
            arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        elif torch.is_tensor(image):
            t = image.detach().float().cpu()
            if t.ndim == 4 and t.shape[0] == 1:
                t = t[0]
            if t.ndim != 3 or t.shape[0] != 3:
                raise ImageInputError(f"an image tensor must be [3, H, W] RGB in [0, 1]; got shape "
                                      f"{tuple(image.shape)}")
            arr = t.permute(1, 2, 0).numpy()  # [H, W, 3]
        else:
            raise ImageInputError(f"cannot read an image from {type(image).__name__}; pass a PIL RGB image, a path, "
                                  f"an array [H, W, 3] or a tensor [3, H, W]")
        if not np.isfinite(arr).all() or arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
            raise ImageInputError(f"image values must lie in [0, 1] (float) or 0..255 (uint8); got "
                                  f"[{float(np.nanmin(arr)):.3g}, {float(np.nanmax(arr)):.3g}]")
        unit, (h, w) = self.size_unit, arr.shape[:2]
        if h % unit or w % unit:
            fit = (max(unit, round(w / unit) * unit), max(unit, round(h / unit) * unit))
            native = self.image_size
            raise ImageInputError(
                f"image is {w}x{h} pixels; this model takes sides that are multiples of {unit} pixels (native "
                f"{native[1]}x{native[0]}): resize or crop it, e.g. image.resize({fit})"
            )
        limit = self.max_side
        if limit is not None and max(h, w) > limit:
            raise ImageInputError(f"image is {w}x{h} pixels; this model's position embedding covers sides up to "
                                  f"{limit} pixels: resize it so that both sides are at most {limit}")
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].clamp(0, 1)  # [1, 3, H, W]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean of images [B, 3, H, W] in [0, 1] -> latents [B, C, h, w] fp32,
        scaled as the pipeline's decoder expects (SD: ·scaling; SD3, FLUX: (· - shift)·scaling;
        a VAE with ``latents_mean``/``latents_std``: (· - mean)·scaling / std)."""
        vae = self.pipe.vae
        with vae_upcast(vae):
            x = (images * 2 - 1).to(self.device, vae.dtype)  # [-1, 1]
            mean = vae.encode(x).latent_dist.mean.float()  # [B, C, h, w]
        return self.adapter.to_latents(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] fp32 in [0, 1] (CPU)."""
        vae = self.pipe.vae
        z = self.adapter.from_latents(latents.float())
        with vae_upcast(vae):
            x = vae.decode(z.to(self.device, vae.dtype), return_dict=False)[0].float()
        return ((x + 1) / 2).clamp(0, 1).cpu()

    # ------------------------------------------------------------------ text
    def embed(self, prompt: str) -> dict:
        """Denoiser keyword tensors of one prompt ([1, ...]), cached."""
        if prompt not in self._embeds:
            self._embeds[prompt] = self.adapter.encode_prompt(
                [prompt], max_sequence_length=self.defaults.get("max_sequence_length"))[0]
        return self._embeds[prompt]

    def null_embed(self) -> dict:
        """The unconditional row of CFG: ``""`` encoded, or zeros where the pipeline does so
        (SDXL's ``force_zeros_for_empty_prompt``)."""
        return self.adapter.null_conditioning(self.embed(""))

    def embed_batch(self, prompts: Sequence[str]) -> dict:
        """Keyword tensors of several prompts, concatenated on the batch ([B, ...])."""
        embs = [self.embed(p) for p in prompts]
        return {k: torch.cat([e[k] for e in embs]) for k in embs[0]}

    # ------------------------------------------------------------------ one forward
    def predict(self, z: torch.Tensor, t: float, emb: dict, guidance: float | None = None) -> torch.Tensor:
        """ε (UNet) or velocity (SD3, FLUX) of latents z [B, C, h, w] at model timestep t -> fp32.

        A v-prediction UNet's output is turned into ε at ᾱ_t, the level the model is told.
        ``guidance``: a distilled model's guidance embedding (``None``: ``distilled_guidance``).
        FLUX's latents are packed into 2×2 patch tokens (with their position ids) and back
        with FluxPipeline's own ``_pack_latents`` / ``_unpack_latents``."""
        adapter, model = self.adapter, self.denoiser
        x = z.to(self.device, model.dtype)
        emb = {k: v.to(self.device) for k, v in emb.items()}
        tt = torch.tensor(t, device=self.device)
        run = RunState()  # this forward's own: FLUX's position ids of this latent grid
        if adapter.distilled and guidance is None:
            guidance = self.config.distilled_guidance
        out = adapter.predict(run, adapter.pack(run, x), tt, emb, guidance)
        out = adapter.unpack(out, z.shape[-2] * adapter.vae_factor, z.shape[-1] * adapter.vae_factor)
        if self.prediction == "v_prediction":
            alpha_bar = float(self.pipe.scheduler.alphas_cumprod.double()[int(t)])
            return v_to_eps(z.float().to(self.device), out.float(), alpha_bar)
        return out.float()

    def _session(self, run: RunState, *extra: Control):
        """attach() with the uniform control (acting on batch rows named "aux") and ``extra``,
        serving the loop's ``run`` (its pinned step and step count)."""
        from diffattn.engine import attach, refuse_if_attached

        refuse_if_attached(self.pipe, "UAMPipeline")
        cfg = self.config
        uniform = UniformAttention(sites=cfg.uniform_sites, keys=cfg.uniform_keys, branches=("aux",))
        return attach(self.pipe, uniform, *extra, run=run)

    def _run(self, steps: int, desc: str, callback) -> RunState:
        """The state of one loop of ``steps`` steps: progress bar and ``callback`` reports."""
        return RunState(num_steps=steps, callback=callback, progress=self.progress, desc=desc).start(steps)

    def _conditioning(self, conditioning: str, prompts: list[str]) -> tuple[list[str], str]:
        """(prompts the forwards see, branch name of the rows)."""
        if conditioning not in CONDITIONINGS + ("uniform-source",):
            raise ControlError(f"conditioning={conditioning!r}: use one of {CONDITIONINGS + ('uniform-source',)} "
                               f"(source prompt, empty prompt, uniform maps, uniform maps under the source prompt)")
        if conditioning == "source":
            return prompts, "cond"
        if conditioning == "empty":
            return [""] * len(prompts), "cond"
        if conditioning == "uniform-source" or self.config.uniform_prompt is None:
            return prompts, "aux"
        return [self.config.uniform_prompt] * len(prompts), "aux"

    # ------------------------------------------------------------------ inversion / sampling
    @torch.no_grad()
    def invert_latents(self, z0: torch.Tensor, prompts: Sequence[str], conditioning: str = "source", *,
                       num_inference_steps: int | None = None, return_trajectory: bool = False,
                       callback=None) -> Inversion:
        """Unguided inversion of latents z0 [B, C, h, w] (DDIM ``next_step`` or backward Euler).

        ``callback(info)`` after every step (``RunState.report``: step, timestep, latents, x0,
        total, stage ``"invert (<conditioning>)"``)."""
        prompts = list(prompts)
        if len(prompts) != z0.shape[0]:
            raise ControlError(f"{z0.shape[0]} latents but {len(prompts)} prompts; give one prompt per image")
        seen, branch = self._conditioning(conditioning, prompts)
        steps = self.steps(num_inference_steps, tuple(z0.shape[-2:]))
        emb = self.embed_batch(seen)
        z = z0.float().to(self.device)
        traj = [z] if return_trajectory else None
        run = self._run(len(steps), f"invert ({conditioning})", callback)
        with self._session(run) as handle, handle.branches({branch: slice(0, z.shape[0])}):
            for i in range(len(steps) - 1, -1, -1):
                s = steps[i]
                run.step = i  # step windows count denoising steps: inversion step i mirrors step i
                pred = self.predict(z, s.t, emb)
                x0 = self.solver.x0(z, pred, s.low)
                z = self.solver.compose(x0, self.solver.noise(z, pred, s.low), s.high)  # = solver.step
                if traj is not None:
                    traj.append(z)
                run.report(i, s.t, z, x0)
        run.close()
        return Inversion(z, z0, conditioning, prompts, steps, traj)

    @torch.no_grad()
    def sample_latents(self, latents: torch.Tensor, prompts: Sequence[str], conditioning: str = "source", *,
                       num_inference_steps: int | None = None, callback=None) -> torch.Tensor:
        """Unguided deterministic sampling from z_T [B, C, h, w] -> z0 (fp32); ``callback`` as
        :meth:`invert_latents` (stage ``"reconstruct (<conditioning>)"``)."""
        prompts = list(prompts)
        seen, branch = self._conditioning(conditioning, prompts)
        steps = self.steps(num_inference_steps, tuple(latents.shape[-2:]))
        emb = self.embed_batch(seen)
        z = latents.float().to(self.device)
        run = self._run(len(steps), f"reconstruct ({conditioning})", callback)
        with self._session(run) as handle, handle.branches({branch: slice(0, z.shape[0])}):
            for i in range(len(steps)):
                s = steps[i]
                run.step = i
                pred = self.predict(z, s.t, emb)
                x0 = self.solver.x0(z, pred, s.high)
                z = self.solver.compose(x0, self.solver.noise(z, pred, s.high), s.low)  # = solver.step
                run.report(i, s.t, z, x0)
        run.close()
        return z

    def _images(self, image) -> torch.Tensor:
        """One image or a list of images -> [B, 3, H, W] in [0, 1]."""
        items = image if isinstance(image, (list, tuple)) else [image]
        if not items:
            raise ImageInputError("no image given")
        images = [self.load_image(im) for im in items]
        sizes = sorted({tuple(x.shape[-2:]) for x in images})
        if len(sizes) > 1:
            raise ImageInputError(f"the images of one call must share a size; got (H, W) {sizes}: invert them in "
                                  f"separate calls, or resize them to one size")
        return torch.cat(images)

    @staticmethod
    def _prompts(prompt, n: int) -> list[str]:
        prompts = [prompt] * n if isinstance(prompt, str) or prompt is None else list(prompt)
        prompts = ["" if p is None else p for p in prompts]
        if len(prompts) != n:
            raise ControlError(f"{n} images but {len(prompts)} prompts; give one prompt, or one per image")
        return prompts

    def invert(self, image, prompt: str | Sequence[str] = "", conditioning: str = "source", *,
               num_inference_steps: int | None = None, return_trajectory: bool = False, callback=None) -> Inversion:
        """Encode ``image`` (one or a list) with the VAE and invert it, unguided."""
        x = self._images(image)
        return self.invert_latents(self.encode(x), self._prompts(prompt, x.shape[0]), conditioning,
                                   num_inference_steps=num_inference_steps, return_trajectory=return_trajectory,
                                   callback=callback)

    def reconstruct(self, image, prompt: str | Sequence[str] = "", conditioning: str = "uniform", *,
                    num_inference_steps: int | None = None, callback=None) -> Reconstruction | list[Reconstruction]:
        """Invert and reconstruct with one conditioning; PSNR / SSIM against the input.
        A list of images gives a list of results."""
        out = self.reconstruct_all(image, prompt, (conditioning,), num_inference_steps=num_inference_steps,
                                   callback=callback)
        res = [r[conditioning] for r in out]
        return res if isinstance(image, (list, tuple)) else res[0]

    def reconstruct_all(self, image, prompt: str | Sequence[str] = "", conditionings: Sequence[str] = CONDITIONINGS,
                        *, num_inference_steps: int | None = None, callback=None) -> list[dict[str, Reconstruction]]:
        """Per image ``{conditioning: Reconstruction}`` (the VAE encodes once). ``callback``
        receives the reports of every inversion and reconstruction loop (their ``stage``)."""
        x = self._images(image)
        prompts = self._prompts(prompt, x.shape[0])
        z0 = self.encode(x)
        target = x.permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
        results: list[dict[str, Reconstruction]] = [{} for _ in range(x.shape[0])]
        for cond in conditionings:
            inv = self.invert_latents(z0, prompts, cond, num_inference_steps=num_inference_steps, callback=callback)
            zr = self.sample_latents(inv.latents, prompts, cond, num_inference_steps=num_inference_steps,
                                     callback=callback)
            imgs = self.decode(zr).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
            for b in range(x.shape[0]):
                results[b][cond] = Reconstruction(cond, _pil(imgs[b]), imgs[b], psnr(imgs[b], target[b]),
                                                  ssim(imgs[b], target[b]))
        return results

    # ------------------------------------------------------------------ editing
    def _p2p(self, n: int, latent_hw) -> PromptToPromptReplace:
        cfg = self.config
        max_tokens = cfg.self_max_tokens
        if max_tokens is None:
            max_tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)  # UAM's P2P code: 32×32 of SD's 64×64 latent
        return PromptToPromptReplace(cross_steps=(0, round(cfg.cross_replace * n)),
                                     self_steps=(0, round(cfg.self_replace * n)), self_max_tokens=max_tokens)

    @torch.no_grad()
    def edit(self, image, source_prompt: str, target_prompt: str, *, uam: bool = True,
             num_inference_steps: int | None = None, guidance_scale: float | None = None,
             edit_steps: int | None = None, inversions: dict[str, torch.Tensor] | None = None,
             callback=None) -> EditOutput:
        """Prompt-to-prompt word swap of ``image`` from ``source_prompt`` to ``target_prompt``,
        with UAM's three-branch blending (``uam=True``) or without (the base editor).

        edit_steps: the target prompt conditions the target branch for its last ``edit_steps``
        steps (``None``: every step, as prompt-to-prompt); before, the target branch follows the
        source prompt, so ``edit_steps=0`` reproduces the source branch.
        inversions: ``EditOutput.inversions`` of an earlier edit of the same image, source
        prompt and steps (the inversions do not depend on the target or the blending).
        callback:   ``callback(info)`` after every step of the inversions and the edit
                    (``RunState.report``; stage ``"edit"`` / ``"edit (uam)"``, whose latents are
                    ``[source, target]`` and x0 their blended predictions; ``mask`` when one was made).
        """
        cfg = self.config
        check_word_swap(word_swap_tokenizers(self.pipe), source_prompt, target_prompt)
        x = self.load_image(image)
        z0 = self.encode(x)
        hw = tuple(z0.shape[-2:])
        steps = self.steps(num_inference_steps, hw)
        n = len(steps)
        if edit_steps is not None and not 0 <= int(edit_steps) <= n:
            raise ControlError(f"edit_steps={edit_steps}: between 0 and the {n} steps of the run")
        first_edit = 0 if edit_steps is None else n - int(edit_steps)
        w = float(guidance_scale if guidance_scale is not None else
                  (cfg.guidance_scale if cfg.guidance_scale is not None else self.defaults.get("guidance_scale", 7.5)))
        src_cond = "source" if cfg.source_inversion == "source" else "empty"
        inv = dict(inversions or {})
        if "source" not in inv:
            inv["source"] = self.invert_latents(z0, [source_prompt], src_cond, num_inference_steps=n,
                                                callback=callback).latents
        if uam and "uniform" not in inv:
            inv["uniform"] = self.invert_latents(z0, [source_prompt], "uniform", num_inference_steps=n,
                                                 callback=callback).latents
        z_src, z_aux = inv["source"], (inv["uniform"] if uam else None)
        e_src, e_tgt, e_null = self.embed(source_prompt), self.embed(target_prompt), self.null_embed()
        e_aux = self.embed(source_prompt if cfg.uniform_prompt is None else cfg.uniform_prompt)
        quantiles = quantile_schedule(n, cfg.quantile)
        cfg_on = w != 1.0
        branch_guidance = None
        if self.adapter.distilled:  # w is the two branches' guidance embedding, no CFG rows
            branch_guidance, cfg_on = w, False
        z = torch.cat([z_src, z_src])  # [2, C, h, w]: source, target
        masks: list[tuple[int, float, torch.Tensor]] = []
        run = self._run(n, "edit (uam)" if uam else "edit", callback)
        with self._session(run, self._p2p(n, hw)) as handle:
            for i in range(n):
                s = steps[i]
                run.step = i
                tgt = e_tgt if i >= first_edit else e_src
                if cfg_on:
                    rows = [e_null, e_null, e_src, tgt]
                    layout = {"uncond": slice(0, 2), "source": slice(2, 3), "target": slice(3, 4)}
                    zz = torch.cat([z, z])  # [4, C, h, w]
                else:
                    rows, layout, zz = [e_src, tgt], {"source": slice(0, 1), "target": slice(1, 2)}, z
                emb = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
                with handle.branches(layout):
                    pred = self.predict(zz, s.t, emb, branch_guidance)
                if cfg_on:
                    pred = pred[:2] + w * (pred[2:] - pred[:2])  # [2, C, h, w] guided
                x0 = self.solver.x0(z, pred, s.high)
                noise = self.solver.noise(z, pred, s.high)
                if uam:
                    with handle.branches({"aux": slice(0, 1)}):
                        pred_u = self.predict(z_aux, s.t, e_aux)
                    if 0 < s.t < cfg.mask_timestep:
                        x0_u = self.solver.x0(z_aux, pred_u, s.high)
                        m = edit_mask(x0[:1], x0[1:], float(quantiles[i]), cfg.dilation, cfg.mask_convention)
                        x0_tgt = blend_x0(x0[1:], x0_u, m) if cfg.blend != "source" else x0[1:]
                        x0_src = blend_x0(x0[:1], x0_u, 1 - m) if cfg.blend != "target" else x0[:1]
                        x0 = torch.cat([x0_src, x0_tgt])
                        masks.append((i, s.t, m[0].cpu()))
                    z_aux = self.solver.step(z_aux, pred_u, s.high, s.low)
                z = self.solver.compose(x0, noise, s.low)
                made = bool(masks) and masks[-1][0] == i
                run.report(i, s.t, z, x0, **({"mask": masks[-1][2]} if made else {}))
        run.close()
        images = self.decode(z if z_aux is None else torch.cat([z, z_aux])).permute(0, 2, 3, 1).numpy()  # [b, H, W, 3]
        return EditOutput(_pil(images[0]), _pil(images[1]), _pil(images[2]) if uam else None, masks, inv)


def _pil(arr: np.ndarray) -> Image.Image:
    """[H, W, 3] float in [0, 1] -> PIL RGB."""
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))

