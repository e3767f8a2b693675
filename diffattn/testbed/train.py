"""Train the testbed's tiny models on the shapes world (CPU-friendly, resumable).

    python -m diffattn.testbed.train vae      --out runs/vae
    python -m diffattn.testbed.train data     --vae runs/vae --out runs/data
    python -m diffattn.testbed.train decoder  --data runs/data --out runs/decoder
    python -m diffattn.testbed.train tiny-sd  --data runs/data --out runs/tiny-sd --standardize --prediction v_prediction
    python -m diffattn.testbed.train tiny-sd3 --data runs/data --out runs/tiny-sd3
    python -m diffattn.testbed.train export   --run runs/tiny-sd3 --to assets/tiny-sd3

World v2 (``--world 2`` on the vae, data and decoder stages) renders markings and graded
aesthetics and captions them partially; the data folder records its world (``data.json``), and
the denoiser and export stages take the tokenizer of that world from it.

Every stage is deterministic from ``--seed``: scenes come from the world's seeded sampler,
batches and noise from generators seeded by (seed, step), so a resumed run continues
exactly where it stopped. Checkpoints (weights, EMA, optimiser moments) are safetensors
plus a JSON state; nothing is pickled.

Objectives: the VAE is an L1 + tiny-KL autoencoder, whose decoder is then fine-tuned alone
(encoder frozen, so the latent space and the encoded data stay valid) with an extra
image-gradient term that keeps corners sharp; tiny-sd learns v-prediction (Salimans & Ho
2022, as SD 2.x-v; ``--prediction epsilon`` for SD1.x's objective, which at this size drew
unstructured layouts) on the scaled-linear DDPM schedule of Stable Diffusion, from latents
standardised per channel (``--standardize``, folded into the shipped VAE); tiny-sd3 learns rectified flow with
logit-normal timestep sampling (Esser et al. 2024, "Scaling Rectified Flow Transformers",
Sec. 3.1), the objective of SD3. Captions are dropped 10% of the time for CFG.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import models
from .world import caption, caption_v2, render, sample_training_pair_v2, sample_training_scene, sample_training_scene_v2

CAPTION_DROPOUT = 0.1


# ----------------------------------------------------------------------------- helpers


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in [-1, 1] (the VAE's input range)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # [B, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0  # [B, 3, H, W]


def _state_path(out: str) -> str:
    return os.path.join(out, "state.json")


def save_checkpoint(out: str, step: int, modules: dict[str, torch.nn.Module], ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer):
    os.makedirs(out, exist_ok=True)
    for name, module in modules.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, os.path.join(out, f"{name}.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(out, "ema.safetensors"))
    moments = {}
    names = {id(p): n for n, p in _named_trainable(modules)}
    for p, st in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            moments[f"{names[id(p)]}::{key}"] = st[key].contiguous()
    save_file(moments, os.path.join(out, "optimizer.safetensors"))
    tmp = _state_path(out) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step}, f)
    os.replace(tmp, _state_path(out))  # the step is committed only once every file is written


def load_checkpoint(out: str, modules: dict[str, torch.nn.Module], ema: dict[str, torch.Tensor],
                    opt: torch.optim.Optimizer, device: str = "cpu") -> int:
    if not os.path.exists(_state_path(out)):
        return 0
    with open(_state_path(out)) as f:
        step = json.load(f)["step"]
    for name, module in modules.items():
        module.load_state_dict(load_file(os.path.join(out, f"{name}.safetensors")))
    ema.update(load_file(os.path.join(out, "ema.safetensors"), device=str(device)))
    moments = load_file(os.path.join(out, "optimizer.safetensors"), device=str(device))
    for n, p in _named_trainable(modules):
        opt.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": moments[f"{n}::exp_avg"],
            "exp_avg_sq": moments[f"{n}::exp_avg_sq"],
        }
    return step


# Where each trained module lives in an exported (diffusers-layout) model folder.
_EXPORTED_WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "transformer": "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


def warm_start(modules: dict[str, torch.nn.Module], model_dir: str, denoiser_folder: str) -> list[str]:
    """Initialise ``modules`` from an exported model (e.g. the shipped world-v1 ``assets/tiny-sd``).

    World v2 appends words to the v1 vocabulary (``world.py``), so a v1 token embedding is the
    first rows of the v2 one: those rows are copied and the new words keep their fresh init.
    Any other shape mismatch is an error. Returns the names of the partially copied tensors.
    """
    partial = []
    for name, module in modules.items():
        folder = denoiser_folder if name == "denoiser" else name
        path = os.path.join(model_dir, _EXPORTED_WEIGHTS[folder])
        if not os.path.exists(path):
            raise FileNotFoundError(f"--init-from {model_dir}: no {_EXPORTED_WEIGHTS[folder]}; pass an exported model folder")
        source, target = load_file(path), module.state_dict()
        if source.keys() != target.keys():
            raise ValueError(f"--init-from {model_dir}: {folder} has other parameters than this stage's model; "
                             "warm-start only from a model of the same stage")
        for key, value in source.items():
            want = target[key].shape
            if value.shape == want:
                target[key] = value
            elif value.shape[1:] == want[1:] and value.shape[0] < want[0]:  # a vocabulary that grew
                target[key] = torch.cat([value, target[key][value.shape[0]:]])
                partial.append(f"{name}.{key}")
            else:
                raise ValueError(f"--init-from {model_dir}: {folder}.{key} is {tuple(value.shape)}, this model's {tuple(want)}")
        module.load_state_dict(target)
    return partial


def _named_trainable(modules: dict[str, torch.nn.Module]):
    for mname, module in modules.items():
        for n, p in module.named_parameters():
            if p.requires_grad:
                yield f"{mname}.{n}", p


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], step: int, decay: float = 0.999):
    """Exponential moving average of the weights, with the usual warm-up of the decay."""
    d = min(decay, (1 + step) / (10 + step))
    for n, p in _named_trainable(modules):
        ema[n].mul_(d).add_(p.detach(), alpha=1 - d)


def lr_at(step: int, base: float, warmup: int, total: int, schedule: str = "cosine", decay_frac: float = 0.2) -> float:
    """Linear warm-up, then decay to 10% of the base rate.

    ``cosine``: cosine decay over the whole run. ``wsd`` (warm-up, stable, decay; Hu et al.
    2024, "MiniCPM", Sec. 4.1): the base rate held until the last ``decay_frac`` of the steps,
    then a linear decay, so most steps run at the full rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "wsd":
        start = total - decay_frac * total
        progress = min(1.0, max(0.0, (step - start) / max(1.0, total - start)))
        return base * (1.0 - 0.9 * progress)
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use 'cosine' or 'wsd'")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- stages


def _scene_sampler(args):
    """The training scenes of ``--world``: v1 (the shipped models') or v2 (markings, partial
    captions, graded aesthetics: ``world.sample_training_scene_v2``)."""
    return sample_training_scene_v2 if getattr(args, "world", 1) == 2 else sample_training_scene


def _training_pair(world: int, rng: np.random.Generator):
    """One training (scene, caption) of a world version: v1's captions state everything; v2's
    are partial (``world.describe``: markings, colours and styles named only sometimes)."""
    if world == 2:
        scene, spec = sample_training_pair_v2(rng)
        return scene, caption_v2(spec)
    scene = sample_training_scene(rng)
    return scene, caption(scene)


DATA_RECORD = "data.json"  # data stage: {"world": version, "n": scenes}; absent in v1-era data folders


def data_world(data_dir: str) -> int:
    """The world version a data folder was encoded from (v1 when it predates the record)."""
    if not os.path.isdir(data_dir):  # never guess: the tokenizer depends on it
        raise FileNotFoundError(f"data folder {data_dir!r} not found; the denoiser and export stages read "
                                f"the world version from it (run the data stage, or pass --data)")
    path = os.path.join(data_dir, DATA_RECORD)
    if not os.path.exists(path):
        return 1
    with open(path) as f:
        return int(json.load(f)["world"])


def train_vae(args):
    """Autoencoder on random 32x32 crops of rendered scenes (fully convolutional, so the
    crops train the same weights 4x cheaper than whole images)."""
    torch.manual_seed(args.seed)
    vae = models.build_vae(args.seed)
    modules = {"vae": vae}
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)

    def loss_at(step):
        rng = np.random.default_rng([args.seed, step])
        sample = _scene_sampler(args)
        scenes = [sample(rng) for _ in range(args.batch)]
        x = images_to_tensor([render(s) for s in scenes])  # [B, 3, 64, 64]
        ys, xs = rng.integers(0, 33, size=2)
        x = x[:, :, ys : ys + 32, xs : xs + 32]  # [B, 3, 32, 32] crop
        return autoencoder_loss(vae, x, args.seed, step)

    _fit_autoencoder(args, vae, modules, opt, "vae", loss_at)
    print(f"saved VAE to {os.path.join(args.out, 'final')}")


def autoencoder_loss(vae, x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """The autoencoder objective on pixels ``x`` in [-1, 1] (images or clips): L1 + 0.5·MSE of the
    reconstruction of one posterior sample, seeded by (seed, step), + 1e-6·KL."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=torch.Generator().manual_seed(seed * 7919 + step))
    recon = vae.decode(z).sample
    return F.l1_loss(recon, x) + 0.5 * F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()


def _fit_autoencoder(args, vae, modules, opt, desc, loss_at) -> None:
    """The VAE stages' loop: ``loss_at(step)`` → AdamW step with warm-up/cosine rate, EMA,
    checkpoints every ``--save-every``; then the EMA weights are saved to ``<out>/final``."""
    ema = {n: p.detach().clone() for n, p in _named_trainable(modules)}
    step = load_checkpoint(args.out, modules, ema, opt)
    bar = tqdm(total=args.steps, initial=step, desc=desc, dynamic_ncols=True)
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, 50, args.steps)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema_update(ema, modules, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(args.out, step, modules, ema, opt)
    bar.close()
    _load_ema_into(modules, ema)
    vae.save_pretrained(os.path.join(args.out, "final"), safe_serialization=True)


def _image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the finite-difference gradients of two image batches (edges, corners)."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(a), dx(b)) + F.l1_loss(dy(a), dy(b))


def train_decoder(args):
    """Fine-tune the decoder of the data's VAE with its encoder frozen.

    The denoisers learn the frozen encoder's latents, so a sharper decoder improves every
    generated image without retraining them. Latent crops of 8x8 decode to 32x32 patches."""
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(os.path.join(args.data, "vae"))
    vae.requires_grad_(False)
    decoder = torch.nn.ModuleDict({"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder})
    decoder.requires_grad_(True)
    modules = {"decoder": decoder}
    opt = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=0.0)

    def loss_at(step):
        rng = np.random.default_rng([args.seed, 7, step])
        sample = _scene_sampler(args)
        x = images_to_tensor([render(sample(rng)) for _ in range(args.batch)])  # [B, 3, 64, 64]
        gen = torch.Generator().manual_seed(args.seed * 7919 + step)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)  # [B, 4, 16, 16]
        ys, xs = (int(v) for v in rng.integers(0, 9, size=2))
        z = z[:, :, ys : ys + 8, xs : xs + 8]  # [B, 4, 8, 8] latent crop
        x = x[:, :, 4 * ys : 4 * ys + 32, 4 * xs : 4 * xs + 32]  # [B, 3, 32, 32] matching pixels
        recon = vae.decode(z).sample
        return F.l1_loss(recon, x) + 0.5 * F.mse_loss(recon, x) + _image_gradient_l1(recon, x)

    _fit_autoencoder(args, vae, modules, opt, "decoder", loss_at)
    print(f"saved VAE with the fine-tuned decoder to {os.path.join(args.out, 'final')}")


def _load_ema_into(modules, ema):
    with torch.no_grad():
        for n, p in _named_trainable(modules):
            p.copy_(ema[n])


@torch.no_grad()
def latent_channel_stats(latents: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the encoded scenes' posterior means, shapes [C]."""
    mean = latents["mean"].float()  # [N, C, h, w]
    return mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3))


@torch.no_grad()
def standardize_vae(vae: AutoencoderKL, mu: torch.Tensor, sigma: torch.Tensor) -> AutoencoderKL:
    """Fold a per-channel affine map into the VAE so its latents are zero-mean, unit-std.

    ``z' = (z - mu) / sigma`` is applied to the posterior by rescaling ``quant_conv``'s mean
    rows (and shifting its log-variance rows by ``-2 log sigma``), and undone before decoding
    by folding ``z = sigma z' + mu`` into ``post_quant_conv``: decoding is unchanged exactly.
    ``scaling_factor`` becomes 1 and ``shift_factor`` 0, so the stock ``StableDiffusionPipeline``
    (which ignores the shift) sees centred latents. Why: the tiny-sd UNet trained on latents
    with per-channel offsets and a 6x spread of channel scales drew unstructured backgrounds.
    """
    c = mu.numel()
    qw, qb = vae.quant_conv.weight, vae.quant_conv.bias  # [2C, 2C, 1, 1], [2C]
    qw[:c] /= sigma[:, None, None, None]
    qb[:c] = (qb[:c] - mu) / sigma
    qb[c:] -= 2 * torch.log(sigma)
    pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias  # [C, C, 1, 1], [C]
    pb += (pw[:, :, 0, 0] @ mu)
    pw *= sigma[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    return vae


def make_data(args):
    """Render ``--n`` training scenes, encode them with the VAE (posterior mean and std),
    and set the VAE's scaling (and SD3 shift) factor from the latents' statistics."""
    device = getattr(args, "device", "cpu")
    vae = AutoencoderKL.from_pretrained(os.path.join(args.vae, "final")).eval().to(device)
    os.makedirs(args.out, exist_ok=True)
    captions, means, stds = [], [], []
    rng = np.random.default_rng([args.seed, 10**6])
    world = getattr(args, "world", 1)
    for start in tqdm(range(0, args.n, 256), desc="encode", dynamic_ncols=True):
        pairs = [_training_pair(world, rng) for _ in range(min(256, args.n - start))]
        scenes = [s for s, _ in pairs]
        captions += [c for _, c in pairs]
        with torch.no_grad():
            dist = vae.encode(images_to_tensor([render(s) for s in scenes]).to(device)).latent_dist
        means.append(dist.mean.half().cpu())  # [b, 4, 16, 16]
        stds.append(dist.std.half().cpu())
    mean, std = torch.cat(means), torch.cat(stds)  # [N, 4, 16, 16]
    shift = mean.float().mean().item()
    scale = 1.0 / mean.float().std().item()
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    vae.to("cpu").save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, os.path.join(args.out, "latents.safetensors"))
    with open(os.path.join(args.out, "captions.json"), "w") as f:
        json.dump(captions, f)
    with open(os.path.join(args.out, DATA_RECORD), "w") as f:  # the denoisers build this world's tokenizer
        json.dump({"world": world, "n": args.n}, f)
    print(f"{args.n} latents; scaling_factor={scale:.4f} shift_factor={shift:.4f}")


def _batches(n_items: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Indices of the batch at ``step``: epochs are seeded permutations of the data."""
    per_epoch = n_items // batch
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_items)
    return perm[i * batch : (i + 1) * batch]


def denoiser_update(loss, step: int, modules, ema, opt, args, bar, losses: list) -> int:
    """One optimiser step of a denoiser stage: backward, gradient clipping at 1, AdamW, EMA,
    progress, and a checkpoint every ``args.save_every`` steps and at the end; the new step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in _named_trainable(modules)], 1.0)
    opt.step()
    step += 1
    ema_update(ema, modules, step, decay=args.ema)
    losses.append(loss.item())
    bar.update(1)
    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    if step % args.save_every == 0 or step == args.steps:
        save_checkpoint(args.out, step, modules, ema, opt)
    return step


def train_denoiser(args):
    """tiny-sd (epsilon, DDPM) or tiny-sd3 (rectified flow) on the encoded scenes."""
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(os.path.join(args.data, "vae"))
    lat = load_file(os.path.join(args.data, "latents.safetensors"))
    with open(os.path.join(args.data, "captions.json")) as f:
        captions = json.load(f)
    is_sd3 = args.stage == "tiny-sd3"
    if getattr(args, "standardize", False):  # per-channel centred latents, folded into the VAE
        mu, sigma = latent_channel_stats(lat)
        lat = {"mean": (lat["mean"].float() - mu[:, None, None]) / sigma[:, None, None],  # [N, C, h, w]
               "std": lat["std"].float() / sigma[:, None, None]}
        vae = standardize_vae(vae, mu, sigma)
        save_file({"mu": mu, "sigma": sigma}, os.path.join(args.out, "latent_stats.safetensors"))
    prediction = getattr(args, "prediction", "epsilon")
    world = data_world(args.data)
    pipe = models.build_sd3(vae, args.seed, world) if is_sd3 else models.build_sd(vae, args.seed, prediction, world)
    denoiser = pipe.transformer if is_sd3 else pipe.unet
    modules = {"denoiser": denoiser, "text_encoder": pipe.text_encoder}
    if is_sd3:
        modules["text_encoder_2"] = pipe.text_encoder_2
    device = getattr(args, "device", "cpu")
    if getattr(args, "init_from", None) and not os.path.exists(_state_path(args.out)):  # a resume keeps its own weights
        grown = warm_start(modules, args.init_from, "transformer" if is_sd3 else "unet")
        print(f"warm start from {args.init_from}" + (f" (grown: {', '.join(grown)})" if grown else ""))
    for m in modules.values():
        m.train().to(device)
    ema = {n: p.detach().clone() for n, p in _named_trainable(modules)}
    opt = torch.optim.AdamW([p for _, p in _named_trainable(modules)], lr=args.lr, weight_decay=0.01)
    step = load_checkpoint(args.out, modules, ema, opt, device)
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scale, shift = vae.config.scaling_factor, (vae.config.shift_factor or 0.0)
    bar = tqdm(total=args.steps, initial=step, desc=args.stage, dynamic_ncols=True)
    t0, losses = time.time(), []
    while step < args.steps:
        idx = _batches(len(captions), args.batch, args.seed, step)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        mean = lat["mean"][idx].float()  # [B, 4, 16, 16]
        std = lat["std"][idx].float()
        x0 = mean + std * torch.randn(mean.shape, generator=gen)  # a posterior sample
        drop = torch.rand(len(idx), generator=gen) < CAPTION_DROPOUT
        batch_caps = ["" if d else captions[i] for i, d in zip(idx, drop.tolist())]
        noise = torch.randn(x0.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.steps, args.schedule)
        if is_sd3:
            x0 = ((x0 - shift) * scale).to(device)
            noise = noise.to(device)
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=batch_caps, prompt_2=None, prompt_3=None, device=device,
                do_classifier_free_guidance=False, max_sequence_length=0,
            )  # prompt_embeds [B, 24, 128]; pooled [B, 128]
            t = torch.sigmoid(torch.randn(len(idx), generator=gen)).to(device)  # logit-normal(0, 1)
            xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            pred = denoiser(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=prompt_embeds, pooled_projections=pooled).sample
            loss = F.mse_loss(pred, noise - x0)  # velocity of the straight path
        else:
            x0, noise = (x0 * scale).to(device), noise.to(device)
            prompt_embeds, _ = pipe.encode_prompt(batch_caps, device, 1, False)  # [B, 24, 64]
            t = torch.randint(0, 1000, (len(idx),), generator=gen).to(device)
            xt = ddpm.add_noise(x0, noise, t)
            pred = denoiser(xt, t, encoder_hidden_states=prompt_embeds).sample
            # v = sqrt(abar)·eps - sqrt(1 - abar)·x0: an x0-like target at high noise, where an
            # eps-prediction UNet this small draws unstructured layouts
            target = ddpm.get_velocity(x0, noise, t) if prediction == "v_prediction" else noise
            loss = F.mse_loss(pred, target)
        step = denoiser_update(loss, step, modules, ema, opt, args, bar, losses)
    bar.close()
    print(f"{args.stage}: {step} steps, {time.time() - t0:.0f}s this run, final loss {np.mean(losses[-100:]) if losses else float('nan'):.4f}")


def export(args):
    """Assemble the EMA weights of a run into a diffusers pipeline folder (safetensors)."""
    with open(os.path.join(args.run, "args.json")) as f:
        run_args = json.load(f)
    vae = AutoencoderKL.from_pretrained(args.vae_from or os.path.join(run_args["data"], "vae"))
    stats_file = os.path.join(args.run, "latent_stats.safetensors")
    if os.path.exists(stats_file):  # the run trained on standardised latents: ship that VAE
        stats = load_file(stats_file)
        vae = standardize_vae(vae, stats["mu"], stats["sigma"])
    is_sd3 = run_args["stage"] == "tiny-sd3"
    prediction = run_args.get("prediction", "epsilon")
    world = data_world(run_args["data"])
    pipe = (models.build_sd3(vae, run_args["seed"], world) if is_sd3
            else models.build_sd(vae, run_args["seed"], prediction, world))
    modules = {"denoiser": pipe.transformer if is_sd3 else pipe.unet, "text_encoder": pipe.text_encoder}
    if is_sd3:
        modules["text_encoder_2"] = pipe.text_encoder_2
    _load_ema_into(modules, load_file(os.path.join(args.run, "ema.safetensors")))
    pipe.save_pretrained(args.to, safe_serialization=True)
    with open(os.path.join(args.to, "testbed.json"), "w") as f:  # lets load() pick the call defaults
        json.dump({"model": run_args["stage"], "world": world}, f)
    print(f"exported {run_args['stage']} to {args.to}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffattn.testbed.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "data", "decoder", "tiny-sd", "tiny-sd3", "export"])
    p.add_argument("--out", default=None, help="run folder (checkpoints; resumes from it)")
    p.add_argument("--vae", default="runs/vae", help="VAE run folder (data stage)")
    p.add_argument("--data", default="runs/data", help="encoded data folder (denoiser stages)")
    p.add_argument("--run", default=None, help="run folder to export")
    p.add_argument("--to", default=None, help="export destination folder")
    p.add_argument("--vae-from", default=None, help="export: VAE folder to ship instead of the data's (e.g. runs/decoder/final)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--schedule", default=None, choices=["cosine", "wsd"],
                   help="learning-rate schedule after the warm-up (default: wsd for the denoisers, cosine for the VAE stages)")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps (denoiser stages)")
    p.add_argument("--device", default="cpu", help="torch device of the data and denoiser stages (e.g. cuda)")
    p.add_argument("--n", type=int, default=40000, help="scenes to encode (data stage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", type=int, default=1, choices=[1, 2],
                   help="vae / data / decoder stages: world v1 or v2 scenes (v2: partial captions); "
                        "the denoiser stages take the world their --data was encoded from")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--prediction", default="epsilon", choices=["epsilon", "v_prediction"], help="tiny-sd: what the UNet predicts")
    p.add_argument("--init-from", default=None,
                   help="denoiser stages: start from an exported model of the same stage (e.g. assets/tiny-sd); "
                        "a grown vocabulary keeps the old rows")
    p.add_argument("--standardize", action="store_true", help="denoiser stages: train on per-channel standardised latents (folded into the shipped VAE)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = {
        "vae": dict(steps=1000, batch=32, lr=1e-3),
        "decoder": dict(steps=3000, batch=32, lr=3e-4),
        # the 60-minute recipes (benchmarks/RESULTS.md, "Training recipes"): WSD at a high rate
        "tiny-sd": dict(steps=3600, batch=64, lr=2e-3, schedule="wsd"),
        "tiny-sd3": dict(steps=5300, batch=64, lr=2e-3, schedule="wsd"),
    }.get(args.stage, {})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.stage == "export":
        return export(args)
    args.out = args.out or {"vae": "runs/vae", "data": "runs/data", "decoder": "runs/decoder"}.get(args.stage, f"runs/{args.stage}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    {"vae": train_vae, "data": make_data, "decoder": train_decoder, "tiny-sd": train_denoiser, "tiny-sd3": train_denoiser}[args.stage](args)


if __name__ == "__main__":
    main()
