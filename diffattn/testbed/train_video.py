"""Train tiny-wan on the moving-shapes world (CPU-friendly, resumable).

    python -m diffattn.testbed.train_video vae      --out runs/wan-vae
    python -m diffattn.testbed.train_video data     --vae runs/wan-vae --out runs/wan-data
    python -m diffattn.testbed.train_video tiny-wan --data runs/wan-data --out runs/tiny-wan
    python -m diffattn.testbed.train_video export   --run runs/tiny-wan --to assets/tiny-wan

The stages follow ``train.py`` and reuse its helpers (checkpoints of safetensors + a JSON step,
EMA, AdamW moments, the warm-up / cosine or WSD rate, seeded batches): every stage is
deterministic from ``--seed`` (clips from the world's seeded sampler, batches and noise from
generators seeded by (seed, step)), so a resumed run continues exactly where it stopped.

Objectives. The VAE (``AutoencoderKLWan``, 4x spatial and 4x temporal: ``video_models``) is an
L1 + MSE + tiny-KL autoencoder, as the image VAE, trained on random windows of 5 frames (the
first frame alone, then one chunk of 4: what its causal encoder sees) cropped to 32x32: the
VAE is convolutional and causal in time, so windows train the same weights 4-7x cheaper than
whole clips. The data stage encodes whole clips (posterior mean and std) and sets the VAE's
per-channel ``latents_mean`` / ``latents_std`` from them (Wan's own standardisation, which
``WanPipeline`` undoes before decoding). tiny-wan learns rectified flow on the standardised
latents with logit-normal timesteps (Esser et al. 2024, "Scaling Rectified Flow
Transformers", Sec. 3.1; the objective Wan is trained with, and tiny-sd3's stage in
``train.py``): ``x_t = (1 - t) x_0 + t ε``, the transformer predicts ``ε - x_0`` at timestep
``1000 t``. Captions are dropped 10% of the time for CFG.

Cost (base preset, 1 torch thread on the 2-core dev box while other training ran): a VAE step
(batch 16) 0.98 s, encoding 0.065 s per clip, a tiny-wan step (batch 8, 768 tokens) 2.44 s.
The defaults (VAE 1000 steps, 6000 clips, tiny-wan 2400 steps) take ~16 + 7 + 98 minutes at
that speed: about two hours. Sampling a clip at 20 steps with CFG takes ~3.3 s.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import PathError, UsageError
from . import video_models
from .train import (CAPTION_DROPOUT, _batches, _fit_autoencoder, _load_ema_into, _named_trainable, autoencoder_loss,
                    denoiser_update, load_checkpoint, lr_at)
from .video import FRAMES, MIN_FRAMES, _check_frames, sample_training_clip, save_gif, video_caption, video_suite_prompts
from .world import SIZE, render

DATA_RECORD = "data.json"  # {"world": "video", "frames": F, "n": clips, "preset": name}
MARKER = "testbed.json"  # written by export: {"model": "tiny-wan", ...}


def clips_to_tensor(frames: list[list]) -> torch.Tensor:
    """Clips of PIL frames -> [B, 3, F, H, W] in [-1, 1] (the Wan VAE's input)."""
    arr = np.stack([np.stack([np.asarray(im, dtype=np.float32) for im in clip]) for clip in frames])  # [B, F, H, W, 3]
    return torch.from_numpy(arr).permute(0, 4, 1, 2, 3) / 127.5 - 1.0  # [B, 3, F, H, W]


def read_data_record(data_dir: str) -> dict:
    """The data folder's record (frames, clips, preset); a PathError when it is not a video data folder."""
    path = os.path.join(data_dir, DATA_RECORD)
    if not os.path.isfile(path):
        raise PathError(f"{data_dir!r} is not a tiny-wan data folder (no {DATA_RECORD}); run the data stage: "
                        "`python -m diffattn.testbed.train_video data --vae RUN --out FOLDER`")
    with open(path) as f:
        record = json.load(f)
    if record.get("world") != "video":
        raise PathError(f"{path} records world {record.get('world')!r}: an image data folder; pass the video data stage's")
    return record


# ----------------------------------------------------------------------------- stages


def train_vae(args):
    """The Wan VAE on random 5-frame windows of training clips, cropped to ``--crop`` px."""
    if args.crop % 16 or not 16 <= args.crop <= SIZE:
        raise UsageError(f"--crop must be a multiple of 16 up to {SIZE}, got {args.crop}")
    vae = video_models.build_wan_vae(args.seed, args.preset)
    modules = {"vae": vae}
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    window = MIN_FRAMES  # 1 + 4: the first frame alone, then one chunk

    def loss_at(step):
        rng = np.random.default_rng([args.seed, step])
        clips = [sample_training_clip(rng, args.frames) for _ in range(args.batch)]
        f0 = int(rng.integers(0, args.frames - window + 1))
        x = clips_to_tensor([[render(c.scene(f)) for f in range(f0, f0 + window)] for c in clips])  # [B, 3, 5, 64, 64]
        ys, xs = (int(v) for v in rng.integers(0, SIZE - args.crop + 1, size=2))
        x = x[..., ys: ys + args.crop, xs: xs + args.crop]  # [B, 3, 5, crop, crop]
        return autoencoder_loss(vae, x, args.seed, step)

    _fit_autoencoder(args, vae, modules, opt, "wan-vae", loss_at)
    print(f"saved the Wan VAE to {os.path.join(args.out, 'final')}")


@torch.no_grad()
def make_data(args):
    """Render ``--n`` training clips, encode them (posterior mean and std, fp16) and set the
    VAE's per-channel ``latents_mean`` / ``latents_std`` from the means."""
    final = os.path.join(args.vae, "final")
    if not os.path.isdir(final):
        raise PathError(f"no trained VAE at {final}; run the vae stage first (--vae names its --out)")
    vae = AutoencoderKLWan.from_pretrained(final).eval().to(args.device)
    vae_args = os.path.join(args.vae, "args.json")
    if os.path.isfile(vae_args):  # the VAE's preset names the denoiser's sizes
        with open(vae_args) as f:
            args.preset = json.load(f).get("preset", args.preset)
    rng = np.random.default_rng([args.seed, 10**6])
    captions, means, stds = [], [], []
    for start in tqdm(range(0, args.n, 32), desc="encode", dynamic_ncols=True):
        clips = [sample_training_clip(rng, args.frames) for _ in range(min(32, args.n - start))]
        captions += [video_caption(c) for c in clips]
        x = clips_to_tensor([[render(c.scene(f)) for f in range(c.frames)] for c in clips]).to(args.device)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.half().cpu())  # [b, C, T, h, w]
        stds.append(dist.std.half().cpu())
    mean, std = torch.cat(means), torch.cat(stds)  # [N, C, T, h, w]
    mu = mean.float().mean(dim=(0, 2, 3, 4))  # [C]
    sigma = mean.float().std(dim=(0, 2, 3, 4))  # [C]
    vae.register_to_config(latents_mean=mu.tolist(), latents_std=sigma.tolist())
    os.makedirs(args.out, exist_ok=True)
    vae.to("cpu").save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, os.path.join(args.out, "latents.safetensors"))
    with open(os.path.join(args.out, "captions.json"), "w") as f:
        json.dump(captions, f)
    with open(os.path.join(args.out, DATA_RECORD), "w") as f:
        json.dump({"world": "video", "frames": args.frames, "n": args.n, "preset": args.preset}, f)
    print(f"{args.n} clips -> latents {tuple(mean.shape[1:])}; channel std {sigma.min():.3f}-{sigma.max():.3f}")


def trained_modules(pipe) -> dict[str, torch.nn.Module]:
    """What the tiny-wan stage trains and checkpoints: the transformer and the umT5 encoder stack
    (``text_encoder.encoder``: umT5 ties ``shared`` to ``encoder.embed_tokens``, and safetensors
    stores no tensor twice, so the stack, which holds the embedding once, is checkpointed)."""
    return {"denoiser": pipe.transformer, "text_encoder": pipe.text_encoder.encoder}


def flow_loss(pipe, x0: torch.Tensor, captions: list[str], gen: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss of one batch (module notes): x0 [B, C, T, h, w] standardised latents,
    ``gen`` draws the noise and the logit-normal timesteps."""
    device = x0.device
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.sigmoid(torch.randn(len(captions), generator=gen)).to(device)  # logit-normal(0, 1)
    tt = t[:, None, None, None, None]  # [B, 1, 1, 1, 1]
    xt = (1 - tt) * x0 + tt * noise
    embeds, _ = pipe.encode_prompt(prompt=captions, do_classifier_free_guidance=False,
                                   max_sequence_length=video_models.TEXT_LENGTH, device=device)  # [B, 24, text_dim]
    pred = pipe.transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
    return F.mse_loss(pred, noise - x0)  # the velocity of the straight path


def train_wan(args):
    """tiny-wan (rectified flow) on the encoded clips."""
    record = read_data_record(args.data)
    vae = AutoencoderKLWan.from_pretrained(os.path.join(args.data, "vae"))
    lat = load_file(os.path.join(args.data, "latents.safetensors"))
    with open(os.path.join(args.data, "captions.json")) as f:
        captions = json.load(f)
    if args.batch > len(captions):
        raise UsageError(f"--batch {args.batch} is larger than the data ({len(captions)} clips)")
    pipe = video_models.build_wan(vae, args.seed, record["preset"])
    modules = trained_modules(pipe)
    device = args.device
    for m in (pipe.transformer, pipe.text_encoder):
        m.train().to(device)
    mu = torch.tensor(vae.config.latents_mean)[:, None, None, None]  # [C, 1, 1, 1]
    sigma = torch.tensor(vae.config.latents_std)[:, None, None, None]
    ema = {n: p.detach().clone() for n, p in _named_trainable(modules)}
    opt = torch.optim.AdamW([p for _, p in _named_trainable(modules)], lr=args.lr, weight_decay=0.01)
    step = load_checkpoint(args.out, modules, ema, opt, device)
    bar = tqdm(total=args.steps, initial=step, desc="tiny-wan", dynamic_ncols=True)
    t0, losses = time.time(), []
    while step < args.steps:
        idx = _batches(len(captions), args.batch, args.seed, step)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        mean, std = lat["mean"][idx].float(), lat["std"][idx].float()  # [B, C, T, h, w]
        x0 = ((mean + std * torch.randn(mean.shape, generator=gen)) - mu) / sigma  # a standardised posterior sample
        drop = torch.rand(len(idx), generator=gen) < CAPTION_DROPOUT
        caps = ["" if d else captions[i] for i, d in zip(idx, drop.tolist())]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.steps, args.schedule)
        loss = flow_loss(pipe, x0.to(device), caps, gen)
        step = denoiser_update(loss, step, modules, ema, opt, args, bar, losses)
    bar.close()
    print(f"tiny-wan: {step} steps, {time.time() - t0:.0f}s this run, "
          f"final loss {np.mean(losses[-100:]) if losses else float('nan'):.4f}")


def assemble(run: str):
    """The ``WanPipeline`` of a tiny-wan run folder with its EMA weights (and the data's VAE)."""
    args_file = os.path.join(run, "args.json")
    if not os.path.isfile(args_file) or not os.path.isfile(os.path.join(run, "ema.safetensors")):
        raise PathError(f"{run!r} is not a tiny-wan run folder with a checkpoint (args.json, ema.safetensors)")
    with open(args_file) as f:
        run_args = json.load(f)
    record = read_data_record(run_args["data"])
    pipe = video_models.build_wan(AutoencoderKLWan.from_pretrained(os.path.join(run_args["data"], "vae")),
                                  run_args["seed"], record["preset"])
    _load_ema_into(trained_modules(pipe), load_file(os.path.join(run, "ema.safetensors")))
    return pipe, record


@torch.no_grad()
def save_samples(pipe, path: str, prompts: list[str], seed: int = 0, **call_kwargs) -> None:
    """Generate one clip per prompt (seed ``seed + i``) and save them side by side as a GIF."""
    kwargs = {**video_models.WAN_DEFAULTS, "output_type": "np", **call_kwargs}
    videos = [pipe(prompt=p, generator=torch.Generator().manual_seed(seed + i), **kwargs).frames[0]
              for i, p in enumerate(prompts)]  # each [F, H, W, 3] in [0, 1]
    save_gif(videos, path)


def export(args):
    """Assemble the EMA weights of a run into a diffusers pipeline folder (safetensors), and
    save ``--samples`` sample clips of the suites as a GIF (``<run>/samples.gif``)."""
    if not args.to:
        raise UsageError("export needs --to FOLDER")
    pipe, record = assemble(args.run)
    pipe.save_pretrained(args.to, safe_serialization=True)
    with open(os.path.join(args.to, MARKER), "w") as f:
        json.dump({"model": "tiny-wan", "world": "video", "frames": record["frames"]}, f)
    print(f"exported tiny-wan to {args.to}")
    if args.samples:
        prompts = [p for name in ("single", "two", "change") for p in video_suite_prompts(name)[:args.samples]]
        path = os.path.join(args.run, "samples.gif")
        save_samples(pipe, path, prompts, num_frames=record["frames"], num_inference_steps=args.sample_steps)
        print(f"samples: {path} ({', '.join(prompts)})")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffattn.testbed.train_video", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "data", "tiny-wan", "export"])
    p.add_argument("--out", default=None, help="run folder (checkpoints; resumes from it)")
    p.add_argument("--vae", default="runs/wan-vae", help="VAE run folder (data stage)")
    p.add_argument("--data", default="runs/wan-data", help="encoded data folder (tiny-wan stage)")
    p.add_argument("--run", default="runs/tiny-wan", help="run folder to export")
    p.add_argument("--to", default=None, help="export destination folder")
    p.add_argument("--preset", default="base", choices=list(video_models.PRESETS),
                   help="model sizes (vae and data stages; tiny-wan takes the data's)")
    p.add_argument("--frames", type=int, default=FRAMES, help="frames per clip (1 + 4k, 5-17)")
    p.add_argument("--crop", type=int, default=32, help="vae stage: crop size of the training windows")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--schedule", default="wsd", choices=["cosine", "wsd"], help="tiny-wan: rate schedule after the warm-up")
    p.add_argument("--warmup", type=int, default=100, help="tiny-wan: warm-up steps")
    p.add_argument("--n", type=int, default=6000, help="clips to encode (data stage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device of the data and tiny-wan stages (e.g. cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--samples", type=int, default=2, help="export: sample clips per suite in <run>/samples.gif (0: none)")
    p.add_argument("--sample-steps", type=int, default=20, help="export: sampling steps of the sample clips")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_frames(args.frames)
    # the 2-hour CPU recipe (module notes); tiny-wan's rate: tiny-sd3's 2e-3 at batch 64, scaled by sqrt(8 / 64)
    defaults = {"vae": dict(steps=1000, batch=16, lr=1e-3), "tiny-wan": dict(steps=2400, batch=8, lr=7e-4)}
    for k, v in defaults.get(args.stage, {}).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "batch", "n", "save_every"):
        v = getattr(args, k)
        if v is not None and v < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    if args.stage == "export":
        return export(args)
    args.out = args.out or {"vae": "runs/wan-vae", "data": "runs/wan-data"}.get(args.stage, "runs/tiny-wan")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    {"vae": train_vae, "data": make_data, "tiny-wan": train_wan}[args.stage](args)


if __name__ == "__main__":
    main()
