"""What a model family is (:class:`Family`), what diffattn's loops ask of a pipeline
(:class:`PipelineAdapter`), and the state of one pipeline call (:class:`RunState`).

The three are the seam between the family-free core (engine, controls, guidance, sites,
pipelines' loops) and the per-family files beside this one.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------- per call


@dataclass
class RunState:
    """Everything one pipeline call needs and nothing outlives it (created per call).

    Nothing per call lives on a pipeline, an engine or a control: two requests run side by
    side on two copies of a model (one pipeline per request) with a run state each.

    num_steps:  steps of the run (what step windows' fractions divide by).
    step:       the pinned step index (loops whose timesteps the engine cannot follow, such as
                inversion, whose timesteps rise); ``None``: the engine counts steps itself.
    image_ids:  FLUX: position ids of the packed image tokens (from ``prepare_latents``).
    guidance:   a guidance-distilled model's embedding value (FLUX's ``guidance_scale``), or ``None``.
    callback:   ``callback(info: dict)`` after every step (k-diffusion style), see :meth:`report`.
    progress:   show a tqdm bar (one consumer of the same reports).
    """

    num_steps: int | None = None
    step: int | None = None
    image_ids: torch.Tensor | None = None
    guidance: float | None = None
    callback: Callable[[dict], None] | None = None
    progress: bool = False
    desc: str = ""
    _bar: object = field(default=None, repr=False)

    def start(self, total: int, desc: str | None = None) -> "RunState":
        """Begin a loop of ``total`` steps (opens the tqdm bar when ``progress``)."""
        self.close()
        self.num_steps = int(total) if self.num_steps is None else self.num_steps
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=int(total), desc=desc or self.desc or None, leave=False, dynamic_ncols=True)
        return self

    def report(self, step: int, timestep, latents: torch.Tensor, x0: torch.Tensor | None = None, **more) -> None:
        """One finished step: ``callback({"step", "timestep", "latents", "x0", ...})``.

        Documented keys: ``step`` (index from 0), ``timestep`` (model units), ``latents``
        (after the step), ``x0`` (the step's prediction of the clean latents, or ``None``),
        ``total`` (steps of this loop), ``stage`` (the loop's name, e.g. ``"invert"``) and,
        when a loop was asked for them, ``attention_maps``.
        """
        if self._bar is not None:
            self._bar.update()
        if self.callback is not None:
            t = float(timestep) if timestep is not None else None
            total = self._bar.total if self._bar is not None else self.num_steps
            self.callback({"step": int(step), "timestep": t, "latents": latents, "x0": x0, "total": total,
                           "stage": self.desc, **more})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ----------------------------------------------------------------------------- families


class Family:
    """One denoiser family. Subclasses set the class attributes and override what differs.

    name:        registry key, also ``Site.family``;
    description: the denoisers it covers, for error messages;
    mirrored:    class names of the stock diffusers processors whose computation its processor
                 reproduces (anything else on a site, e.g. IP-Adapter, is refused by attach);
    processor:   its :class:`~diffattn.processors.base.DiffattnProcessor` subclass;
    not_batched: denoiser arguments the guidance wrapper must never stack on the batch axis;
    condition_arguments: denoiser arguments carrying the text condition, batch first (what
                 condition-annealed sampling noises).
    """

    name: str = ""
    description: str = ""
    mirrored: tuple[str, ...] = ()
    processor: type | None = None
    not_batched: frozenset[str] = frozenset()
    condition_arguments: tuple[str, ...] = ("encoder_hidden_states",)

    def owns(self, model, module) -> bool:
        """Whether attention ``module`` of denoiser ``model`` belongs to this family."""
        raise NotImplementedError

    def kind(self, module) -> str:
        """``"self" | "cross" | "joint" | "single"`` of one attention module."""
        raise NotImplementedError

    def blocks(self, entries: list[tuple[str, object]]) -> list[tuple[str, object, int, str | None]]:
        """``(name, module, block index, alias)`` of the model's attention modules in forward
        order. Default (DiTs): ``attn_processors`` order, block = first integer of the path."""
        return [(name, module, _first_int(name), None) for name, module in entries]

    def forward_info(self, config, arguments: dict, cache: dict):
        """The family's per-forward record (``ForwardContext.info``) from the denoiser's
        config and the forward's arguments by name. ``cache`` lives as long as the attach
        (e.g. FLUX's analysis of ``img_ids``, which pipelines pass unchanged every step)."""
        return None

    def auxiliary_branch(self, arguments: dict) -> str | None:
        """The branch name of a forward a pipeline runs *beside* its guided one in the same
        step, recognised from its arguments (SD3's skip-layer forward: ``"skip"``), else
        ``None``. Such a forward gets no extra guidance branch (``diffattn.guidance``)."""
        return None

    def text_stream_blocks(self, model) -> list[tuple[str, tuple[int, ...], str]]:
        """``(block name, positions of the text stream in its outputs, block kind)`` of every
        block that passes a text stream to the next, in execution order (MMDiTs); ``[]`` for a
        family without one (UNet cross attention reads fixed text states)."""
        return []

    def adapters(self) -> tuple[type["PipelineAdapter"], ...]:
        """Pipeline adapters of this family's text-to-image pipelines, most specific first."""
        return ()

    def editor_adapters(self) -> tuple[type["PipelineAdapter"], ...]:
        """Adapters of this family's in-context editors (a context image beside the target), most
        specific first; kept apart so text-to-image loops never receive an editor."""
        return ()

    def __repr__(self):
        return f"<diffattn family {self.name!r}>"


def _first_int(name: str) -> int:
    for c in name.split("."):
        if c.isdigit():
            return int(c)
    return 0


@dataclass
class TextBlock:
    """One block of the denoiser's text keys that a concept can be located in.

    tokenizer:   the tokenizer of that encoder;
    start_token: whether its ids begin with a start token (CLIP's BOS; T5 has none);
    offset:      position of its first key among the denoiser's text keys;
    span:        keys in the block (``None``: every text key from ``offset``);
    truncated:   whether it holds the prompt's first ``max_sequence_length`` tokens (T5)
                 rather than the tokenizer's own maximum (CLIP's 77).
    """

    tokenizer: object
    start_token: bool
    offset: int = 0
    span: int | None = None
    truncated: bool = False


class PipelineAdapter:
    """What diffattn's sampling loops ask of one diffusers pipeline class.

    One subclass per pipeline class (``StableDiffusionPipeline``, ``...XLPipeline``, ...), in
    its family's file; a loop calls ``adapter_for(pipe)`` and then only these methods. Every
    method reproduces the pipeline's own ``__call__`` for its part exactly (same calls, same
    dtypes, same order), so a loop built on them with nothing changed equals the pipeline.

    Class attributes: ``name`` (``"sd"``, ``"sdxl"``, ...); ``family``; ``pipeline_names``
    (diffusers classes served, for messages); ``solver`` (``"ddim"`` or ``"flow"``);
    ``distilled`` (guidance-distilled: ``guidance_scale`` is an embedding, no CFG rows);
    ``default_max_sequence_length`` (T5 tokens when the pipeline has a T5 encoder);
    ``flux_sigmas`` (FLUX's σ grid for flow schedulers).
    """

    name: str = ""
    family: str = ""
    pipeline_names: tuple[str, ...] = ()
    solver: str = "ddim"
    distilled: bool = False
    default_max_sequence_length: int | None = None
    denoiser_attr: str = "unet"
    flux_sigmas: bool = False  # FLUX's σ grid linspace(1, 1/n, n) unless the scheduler makes its own
    joint_attention: bool = False  # text keys share the image queries' softmax with image keys (MMDiT)
    upcast_vae: bool = False  # decode an fp16 VAE in fp32 where its config says force_upcast (SD, SDXL)

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        """The diffusers classes served (imported lazily)."""
        raise NotImplementedError

    @classmethod
    def serves(cls, pipe) -> bool:
        return isinstance(pipe, cls.pipeline_classes())

    def __repr__(self):
        return f"<{type(self).__name__} for {type(self.pipe).__name__}>"

    # ------------------------------------------------------------------ the model
    @property
    def denoiser(self):
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def device(self):
        return self.pipe._execution_device

    @property
    def vae_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def call_defaults(self) -> dict:
        """Defaults of the pipeline's ``__call__``: the stock class's signature, overlaid with a
        subclass's ``default_call_kwargs`` (a dict a pipeline subclass may declare, as the
        testbed's do)."""
        base = self.pipeline_classes()[0]
        for cls in type(self.pipe).__mro__:
            if cls in self.pipeline_classes():
                base = cls
                break
        keys = ("num_inference_steps", "guidance_scale", "true_cfg_scale", "max_sequence_length", "eta")
        out = {k: p.default for k, p in inspect.signature(base.__call__).parameters.items() if k in keys}
        out.update(getattr(self.pipe, "default_call_kwargs", None) or {})
        return out

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: ``"epsilon"``, ``"v_prediction"`` or ``"flow"`` (velocity)."""
        return "flow"

    def native_size(self) -> tuple[int, int]:
        """(height, width) in pixels the pipeline generates by default."""
        s = int(self.pipe.default_sample_size) * self.vae_factor
        return s, s

    @property
    def patch(self) -> int:
        """Latent pixels per image token side (UNet: 1; SD3: its patch; FLUX: 2, the packing)."""
        return 1

    @property
    def size_unit(self) -> int:
        """Image sides must be multiples of this many pixels."""
        return self.vae_factor * self.patch

    @property
    def max_side(self) -> int | None:
        """The longest side in pixels the model can embed (``None``: no limit)."""
        return None

    def fit_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the pipeline actually generates for a requested one (FLUX floors)."""
        return height, width

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the image tokens of a ``height × width`` image."""
        f = self.vae_factor * self.patch
        return height // f, width // f

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompts: list[str], negative_prompt=None, *, num_images_per_prompt: int = 1,
                      cfg: bool = False, max_sequence_length: int | None = None, clip_skip: int | None = None,
                      ) -> tuple[dict, dict | None]:
        """(conditional, unconditional or ``None``) denoiser keyword tensors ``{name: [B, ...]}``."""
        raise NotImplementedError

    def null_conditioning(self, empty: dict) -> dict:
        """The unconditional row of CFG given ``""`` encoded (SDXL may zero it)."""
        return empty

    def text_blocks(self) -> dict[str, TextBlock]:
        """Blocks of text keys by encoder name (``"clip"``, ``"t5"``) that concepts can be found in."""
        return {}

    def missing_text_block(self, keys: str) -> str:
        """Why ``keys`` is not among :meth:`text_blocks` and what to use instead."""
        return f"this {type(self.pipe).__name__} has {sorted(self.text_blocks())} text keys only; use one of them or 'auto'"

    @property
    def default_text_keys(self) -> str:
        return "clip"

    def word_swap_tokenizers(self) -> list:
        """Tokenizers whose token counts a prompt-to-prompt word swap must keep."""
        return [t for t in (getattr(self.pipe, "tokenizer", None),) if t is not None]

    def text_attention_sites(self, all_sites) -> tuple[list[str], int | None]:
        """(names of the sites whose image queries attend to text keys and localise concepts,
        the UNet downsampling factor they run at or ``None``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ latents and steps
    def timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The scheduler's timesteps for a run (``set_timesteps`` as the pipeline calls it)."""
        raise NotImplementedError

    def image_seq_len(self, latent_hw: tuple[int, int]) -> int:
        """Image tokens of a latent ``(h, w)`` (flow schedulers' dynamic shift reads it)."""
        h, w = latent_hw
        return (h // self.patch) * (w // self.patch)

    def prepare_latents(self, run: RunState, batch: int, height: int, width: int, dtype, generator=None,
                        latents=None) -> torch.Tensor:
        """Initial noise in the sampling layout (FLUX: packed tokens; sets ``run.image_ids``)."""
        channels = self.denoiser.config.in_channels
        return self.pipe.prepare_latents(batch, channels, height, width, dtype, self.device, generator, latents)

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return x

    def step_kwargs(self, generator=None, eta: float = 0.0) -> dict:
        """Extra keywords of ``scheduler.step`` (DDIM's eta and generator where it takes them)."""
        return {}

    def pack(self, run: RunState, z: torch.Tensor) -> torch.Tensor:
        """Spatial latents ``[B, C, h, w]`` -> the sampling layout (identity but for FLUX)."""
        return z

    def unpack(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The sampling layout -> spatial latents ``[B, C, h, w]`` of a ``height × width`` image."""
        return x

    def predict(self, run: RunState, x: torch.Tensor, t, cond: dict, guidance: float | None = None) -> torch.Tensor:
        """One denoiser forward on model-ready latents ``x`` (sampling layout) at scheduler
        timestep ``t`` (a scalar tensor) -> the raw prediction (ε, v or velocity)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the VAE
    def latent_shift(self, like: torch.Tensor):
        """(mean, std) that standardise this VAE's latents (or (None, None))."""
        return None, None

    def to_latents(self, moments: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean -> the latents the denoiser sees."""
        cfg = self.pipe.vae.config
        mu, sigma = self.latent_shift(moments)
        if mu is not None:
            return (moments - mu) * cfg.scaling_factor / sigma
        return (moments - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents -> what the VAE decoder takes."""
        cfg = self.pipe.vae.config
        mu, sigma = self.latent_shift(latents)
        if mu is not None:
            return latents * sigma / cfg.scaling_factor + mu
        return latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Spatial latents ``[B, C, h, w]`` -> decoded images ``[B, 3, H, W]`` in [-1, 1], in the
        pipeline's own order of casts (SD / SDXL: the VAE's dtype, upcast where it says so)."""
        vae = self.pipe.vae
        if not self.upcast_vae:
            return vae.decode(self.from_latents(latents), return_dict=False)[0]
        with vae_upcast(vae):
            return vae.decode(self.from_latents(latents.to(vae.dtype)), return_dict=False)[0]

    def postprocess(self, image: torch.Tensor, output_type: str, dtype) -> object:
        """Decoded images ``[B, 3, H, W]`` in [-1, 1] -> the pipeline's output (PIL, np, pt)."""
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


# ----------------------------------------------------------------------------- shared glue


def flow_timestep_kwargs(scheduler_config, num_steps: int, image_seq_len: int, *, flux: bool = False) -> dict:
    """``set_timesteps`` keywords of a flow-matching pipeline, as SD3's and FLUX's pipelines
    compute them: FLUX's σ = linspace(1, 1/n, n) (``flux``, unless the scheduler makes its own
    flow sigmas) and, with dynamic shifting, μ from the image's token count (max_shift default
    1.15 on FLUX, 1.16 on SD3)."""
    import numpy as np
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    c = scheduler_config
    kw = {}
    if flux and not c.get("use_flow_sigmas", False):
        kw["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
    if c.get("use_dynamic_shifting", False):
        kw["mu"] = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                   c.get("base_shift", 0.5), c.get("max_shift", 1.15 if flux else 1.16))
    return kw


def latent_stats(vae, like):
    """(mean, std) ``[1, C, 1, 1]`` like ``like`` of a VAE that standardises its latents per
    channel (``latents_mean`` / ``latents_std`` in its config, some SDXL VAEs), else (None, None)."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None, None
    return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)


@contextlib.contextmanager
def vae_upcast(vae):
    """Run an fp16 VAE in fp32 where its config asks (``force_upcast``: SDXL's VAE overflows in
    fp16), as the diffusers pipelines do; its dtype is restored after."""
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(torch.float16)
