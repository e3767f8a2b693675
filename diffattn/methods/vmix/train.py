"""Training a VMix adapter: frozen base, trained AesEmb projection + W_V^a (+ optional LoRA).

VMix §3.4 (``../shared/reference/vmix_repulsion_decontext.md`` §1.4): the base model is
frozen; the projection (F, Z), every W_V^a and, optionally, LoRA on the base's attention
projections train with the base model's own denoising loss at λ = 1, AdamW (lr 1e-4 on
SD1.5). The loss is the model family's:

- MMDiT (``SD3Transformer2DModel``): rectified flow with logit-normal timesteps (Esser et al.
  2024, §3.1), target the velocity ε − x0 of the straight path x_t = (1 − t) x0 + t ε;
- UNet: DDPM noising on the pipeline's β schedule, target ε or v (Salimans & Ho 2022) as the
  scheduler's ``prediction_type`` says;

on latents from the pipeline's own VAE encoder (a posterior sample; SD3: (z − shift)·scale,
UNet: z·scale). Captions are dropped (``caption_dropout``) as in the base model's training; each
image's aesthetic labels are its attributes, whatever its caption says.

The data is a function ``data(step) -> VMixBatch`` (images in [-1, 1], captions, label masks),
deterministic in the step, and the noise, timesteps and dropout come from generators seeded
by (seed, step), so a resumed run continues exactly where it stopped. Checkpoints are
safetensors (adapter, LoRA, AdamW moments) plus a JSON state committed last; nothing is
pickled. The library never imports the testbed: ``diffattn train-vmix`` (the CLI) supplies the
shapes-world data.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, ModelLoadError, PathError
from .adapter import VMixAdapter, load_adapter

LORA_TARGETS = {  # default LoRA targets: the attention projections of each family's blocks
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
    "sd3": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
}
LORA_NAME = "vmix"  # the peft adapter name
STATE = "state.json"


@dataclass
class VMixBatch:
    """One training batch: images [B, 3, H, W] in [-1, 1], captions, label masks [B, N] bool."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor


@dataclass
class TrainConfig:
    """Training settings (the paper: AdamW lr 1e-4, batch 256, 50k steps on SD1.5)."""

    steps: int = 1000
    batch: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 50
    seed: int = 0
    save_every: int = 100
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    lora_rank: int = 0  # 0: no LoRA (the paper's "w/o LoRA")
    value_mix: bool = True  # False: LoRA alone, no adapter (the paper's "w/o value-mixed attention" ablation)
    lora_alpha: float | None = None  # default: the rank
    lora_targets: tuple[str, ...] = ()  # default: LORA_TARGETS of the family
    max_sequence_length: int | None = None  # SD3's T5 tokens (default: the pipeline's call default, else 256)
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        for name in ("steps", "batch", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"VMix training {name}={getattr(self, name)!r}: a whole number >= 1")
        if not self.value_mix and not self.lora_rank:
            raise ConfigError("value_mix=False trains LoRA alone: give lora_rank >= 1 (else nothing trains)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"VMix training lr={self.lr!r}: a finite rate > 0")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"VMix training caption_dropout={self.caption_dropout!r}: in [0, 1)")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"VMix training lora_rank={self.lora_rank!r}: 0 (off) or a rank >= 1")


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up to the base rate, then constant (the paper states no schedule)."""
    return base * min(1.0, (step + 1) / max(1, warmup))


def family_of(pipe) -> str:
    """``"sd3"`` (flow matching) or ``"unet"`` (DDPM) from the pipeline's denoiser."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel):
        return "sd3"
    if isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        return "unet"
    raise ConfigError(f"VMix training supports UNet (StableDiffusionPipeline) and SD3 pipelines; got {type(pipe).__name__}")


def denoiser_of(pipe) -> nn.Module:
    return pipe.transformer if family_of(pipe) == "sd3" else pipe.unet


# ----------------------------------------------------------------------------- losses


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor, generator: torch.Generator, family: str) -> torch.Tensor:
    """A posterior sample of the VAE, in the denoiser's latent units. images [B, 3, H, W] -> [B, C, h, w]."""
    vae = pipe.vae
    x = images.to(vae.device, vae.dtype)
    z = vae.encode(x).latent_dist.sample(generator=generator)
    scale, shift = vae.config.scaling_factor, (getattr(vae.config, "shift_factor", None) or 0.0)
    return ((z - shift) * scale if family == "sd3" else z * scale).float()


def flow_loss(denoiser, x0, noise, t, text: dict) -> torch.Tensor:
    """Rectified flow (Esser et al. 2024, Eq. 1–2 with logit-normal t): ‖v_θ(x_t, t) − (ε − x0)‖²,
    x_t = (1 − t) x0 + t ε. x0, noise [B, C, h, w]; t [B] in (0, 1)."""
    tt = t.view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
    xt = (1 - tt) * x0 + tt * noise
    pred = denoiser(hidden_states=xt, timestep=t * 1000, return_dict=False, **text)[0]
    return F.mse_loss(pred.float(), (noise - x0).float())


def diffusion_loss(denoiser, scheduler, x0, noise, t, text: dict) -> torch.Tensor:
    """DDPM (Ho et al. 2020, Eq. 14): ‖ε_θ(x_t, t) − target‖², target ε or v = √ᾱ ε − √(1−ᾱ) x0
    by the scheduler's ``prediction_type``. t [B] integer timesteps."""
    xt = scheduler.add_noise(x0, noise, t)
    pred = denoiser(xt, t, return_dict=False, **text)[0]
    kind = scheduler.config.get("prediction_type", "epsilon")
    target = scheduler.get_velocity(x0, noise, t) if kind == "v_prediction" else noise
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def encode_text(pipe, captions: list[str], family: str, max_sequence_length: int | None) -> dict:
    """The denoiser's text arguments of ``captions`` (no CFG)."""
    device = denoiser_of(pipe).device
    if family == "sd3":
        if max_sequence_length is None:
            max_sequence_length = getattr(pipe, "default_call_kwargs", {}).get("max_sequence_length", 256)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    embeds, _ = pipe.encode_prompt(captions, device, 1, False)
    return {"encoder_hidden_states": embeds}


def batch_loss(pipe, batch: VMixBatch, control, config: TrainConfig, step: int, scheduler=None) -> torch.Tensor:
    """The family's loss on one batch, the aesthetic labels set on ``control`` (attached)."""
    family = family_of(pipe)
    denoiser = denoiser_of(pipe)
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    x0 = encode_latents(pipe, batch.images, gen, family).to(denoiser.device)
    b = x0.shape[0]
    drop = (torch.rand(b, generator=gen) < config.caption_dropout).tolist()
    captions = ["" if d else c for c, d in zip(batch.captions, drop)]
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    text = encode_text(pipe, captions, family, config.max_sequence_length)
    if control is not None:  # LoRA alone: no label input (the paper's ablation)
        control.aesthetics = batch.labels.to(torch.bool)
    if family == "sd3":
        t = torch.sigmoid(torch.randn(b, generator=gen)).to(x0.device)  # logit-normal(0, 1)
        return flow_loss(denoiser, x0, noise, t, text)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen).to(x0.device)
    return diffusion_loss(denoiser, scheduler, x0, noise, t, text)


# ----------------------------------------------------------------------------- LoRA


def add_lora(denoiser: nn.Module, rank: int, alpha: float | None, targets, seed: int = 0) -> list[str]:
    """Inject peft LoRA layers (B = 0 at init: the model is unchanged) into ``denoiser``;
    returns the names of the LoRA parameters. Needs ``pip install diffattn[vmix]`` (peft)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'diffattn[vmix]' (or pip install peft)") from None
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, denoiser, adapter_name=LORA_NAME)
    names = [n for n, _ in denoiser.named_parameters() if "lora_" in n]
    for n, p in denoiser.named_parameters():
        p.requires_grad_(n in set(names))
    return names


def lora_state(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in denoiser.named_parameters() if "lora_" in n}


def save_lora(denoiser: nn.Module, path: str, rank: int, alpha: float | None, targets) -> None:
    """The LoRA weights alone (safetensors; rank, alpha, targets in the metadata), kept apart
    from the adapter so inference can leave LoRA out (the paper's "w/o LoRA" variant)."""
    from safetensors.torch import save_file

    meta = {"diffattn.vmix.lora": json.dumps({"rank": rank, "alpha": alpha or rank, "targets": list(targets)})}
    save_file(lora_state(denoiser), path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def apply_lora(denoiser: nn.Module, path: str) -> None:
    """Inject and load a LoRA file :func:`save_lora` wrote (for inference with LoRA)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise PathError(f"LoRA file {path!r} not found")
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("diffattn.vmix.lora", "null") or "null")
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{path} is not a VMix LoRA file (no diffattn.vmix.lora metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = add_lora(denoiser, int(meta["rank"]), float(meta["alpha"]), meta["targets"])
    if set(names) != set(tensors):
        raise ModelLoadError(f"{path}: its LoRA tensors do not match this model's LoRA layers")
    params = dict(denoiser.named_parameters())
    with torch.no_grad():
        for n, v in tensors.items():
            params[n].copy_(v)
    denoiser.requires_grad_(False)


# ----------------------------------------------------------------------------- checkpoints


def _trainable(adapter: VMixAdapter, denoiser: nn.Module, lora: list[str], value_mix: bool = True) -> dict[str, nn.Parameter]:
    named = {f"adapter.{n}": p for n, p in adapter.named_parameters()} if value_mix else {}
    params = dict(denoiser.named_parameters())
    named.update({f"lora.{n}": params[n] for n in lora})
    return named


def save_checkpoint(out: str, step: int, adapter, denoiser, named: dict, opt, config: TrainConfig, lora) -> None:
    """Adapter, LoRA and AdamW moments as safetensors, then ``state.json`` (the commit)."""
    from safetensors.torch import save_file

    folder = os.path.join(out, "checkpoint")
    os.makedirs(folder, exist_ok=True)
    adapter.save(os.path.join(folder, "adapter.safetensors"))
    if lora:
        save_lora(denoiser, os.path.join(folder, "lora.safetensors"), config.lora_rank, config.lora_alpha,
                  config.lora_targets)
    moments = {}
    for name, p in named.items():
        st = opt.state.get(p)
        if st:
            moments[f"{name}::exp_avg"] = st["exp_avg"].contiguous().cpu()
            moments[f"{name}::exp_avg_sq"] = st["exp_avg_sq"].contiguous().cpu()
            moments[f"{name}::step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(()).cpu()  # a scalar []
    save_file(moments, os.path.join(folder, "optimizer.safetensors.tmp"))
    os.replace(os.path.join(folder, "optimizer.safetensors.tmp"), os.path.join(folder, "optimizer.safetensors"))
    record = {"step": step, "config": asdict(config)}
    with open(os.path.join(out, STATE + ".tmp"), "w") as f:
        json.dump(record, f, indent=1, default=list)
    os.replace(os.path.join(out, STATE + ".tmp"), os.path.join(out, STATE))


def load_checkpoint(out: str, adapter, denoiser, named: dict, opt, lora) -> int:
    """Restore a checkpoint into the live modules and optimiser; returns its step (0: none)."""
    from safetensors.torch import load_file

    state_path = os.path.join(out, STATE)
    if not os.path.exists(state_path):
        return 0
    with open(state_path) as f:
        step = int(json.load(f)["step"])
    folder = os.path.join(out, "checkpoint")
    saved = load_adapter(os.path.join(folder, "adapter.safetensors"))
    if saved.config.to_json() != adapter.config.to_json():
        raise ModelLoadError(f"{out} holds a checkpoint of another adapter (sites, labels or base model differ); "
                             f"use a new --out folder")
    with torch.no_grad():
        adapter.load_state_dict(saved.state_dict())
        if lora:
            tensors = load_file(os.path.join(folder, "lora.safetensors"))
            params = dict(denoiser.named_parameters())
            for n in lora:
                params[n].copy_(tensors[n])
    moments = load_file(os.path.join(folder, "optimizer.safetensors"))
    for name, p in named.items():
        if f"{name}::exp_avg" in moments:
            opt.state[p] = {"step": moments[f"{name}::step"].clone(),
                            "exp_avg": moments[f"{name}::exp_avg"].to(p.device),
                            "exp_avg_sq": moments[f"{name}::exp_avg_sq"].to(p.device)}
    return step


# ----------------------------------------------------------------------------- the loop


def train_vmix(pipe, adapter: VMixAdapter, data: Callable[[int], VMixBatch], config: TrainConfig, out: str, *,
               progress: bool = True, stop_at: int | None = None) -> dict:
    """Train ``adapter`` on ``pipe`` (its base frozen) and write ``out/adapter.safetensors``
    (and ``out/lora.safetensors`` with LoRA). Resumes from ``out/state.json`` when present.

    ``stop_at``: end after that step (a checkpoint is written), as an interruption would.
    Returns ``{"step", "seconds", "seconds_per_step", "loss"}`` of this run."""
    from tqdm.auto import tqdm

    from ...engine import attach
    from .mix import ValueMix

    config.check()
    family = family_of(pipe)
    denoiser = denoiser_of(pipe)
    os.makedirs(out, exist_ok=True)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    denoiser.requires_grad_(False)
    lora: list[str] = []
    if config.lora_rank:
        config.lora_targets = tuple(config.lora_targets or LORA_TARGETS[family])
        lora = add_lora(denoiser, config.lora_rank, config.lora_alpha, config.lora_targets, config.seed)
    denoiser.train()
    adapter.to(denoiser.device).train()
    named = _trainable(adapter, denoiser, lora, config.value_mix)
    opt = torch.optim.AdamW(list(named.values()), lr=config.lr, weight_decay=config.weight_decay)
    step = load_checkpoint(out, adapter, denoiser, named, opt, lora)
    scheduler = None
    if family == "unet":
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # λ = 1 in training (§1.4); LoRA alone trains the base's own attention, nothing attached
    control = ValueMix(adapter, scale=1.0, uncond="both") if config.value_mix else None
    last = min(config.steps, stop_at) if stop_at is not None else config.steps
    bar = tqdm(total=config.steps, initial=step, desc="vmix", dynamic_ncols=True, disable=not progress)
    t0, losses, first = time.time(), [], step
    try:
        with attach(denoiser, control) if control is not None else contextlib.nullcontext():
            while step < last:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, config.lr, config.warmup)
                loss = batch_loss(pipe, data(step), control, config, step, scheduler)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(list(named.values()), config.grad_clip)
                opt.step()
                step += 1
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
                if step % config.save_every == 0 or step == last:
                    save_checkpoint(out, step, adapter, denoiser, named, opt, config, lora)
    finally:
        bar.close()
        denoiser.eval()
        adapter.eval()
    if step >= config.steps:
        if config.value_mix:  # LoRA alone leaves the adapter at its zero init: no file to mislead
            adapter.save(os.path.join(out, "adapter.safetensors"))
        if lora:
            save_lora(denoiser, os.path.join(out, "lora.safetensors"), config.lora_rank, config.lora_alpha,
                      config.lora_targets)
    seconds = time.time() - t0
    ran = step - first
    return {"step": step, "seconds": seconds, "seconds_per_step": seconds / ran if ran else float("nan"),
            "loss": sum(losses[-50:]) / len(losses[-50:]) if losses else float("nan")}
