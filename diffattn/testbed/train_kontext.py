"""Train tiny-kontext, the testbed's in-context editor and FLUX text-to-image model (CPU-friendly,
resumable).

    python -m diffattn.testbed.train_kontext data        --out runs/kontext-data
    python -m diffattn.testbed.train_kontext tiny-kontext --data runs/kontext-data --out runs/tiny-kontext
    python -m diffattn.testbed.train_kontext export      --run runs/tiny-kontext --to assets/tiny-kontext

The stages follow ``train.py`` and reuse its helpers (checkpoints of safetensors + a JSON step,
EMA, AdamW moments, the warm-up / WSD rate, seeded batches): every stage is deterministic from
``--seed``, so a resumed run continues exactly where it stopped.

**Data.** No VAE is trained: the world-v2 VAE of tiny-sd3 (``assets/tiny-sd3/vae``, or
``--vae``) encodes (1) ``--n-t2i`` captioned world-v2 scenes, the very stream of tiny-sd3's v2
data stage (``train._training_pair(2, ...)`` from the generator seeded ``[seed, 10**6]``:
partial captions), posterior mean and std; (2) ``--n-edit`` edit pairs (``edits.sample_edit``)
of the training seeds ``[--pair-offset, --pair-offset + n)``, all below the evaluation seeds
(``edits.train_edit_seeds``): the source's posterior mean (the context the pipeline encodes:
``FluxKontextPipeline._encode_vae_image`` takes the mode) and the target's mean and std.

**Objective** (the tiny-kontext stage): rectified flow on packed latents with logit-normal
timesteps (Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 3.1; FLUX's
objective; tiny-sd3's in ``train.py``): ``x_t = (1 - t) x_0 + t ε`` on the target's packed
tokens [B, 64, 16] (``(z - shift) * scale`` of a posterior sample, packed 2x2 by the pipeline's
own ``_pack_latents``), and the transformer predicts ``ε - x_0`` at timestep ``t`` (the
pipeline passes scheduler timestep / 1000). Each batch mixes ``--t2i-fraction`` text-to-image
samples (no context: ``[text | target]``) and edit samples, whose clean context tokens are
appended after the noisy target as ``FluxKontextPipeline.__call__`` does (``[text | target |
context]``, the context's position ids with first coordinate 1, the loss on the target tokens
only). The two kinds have different lengths, so they run as two forwards and their losses are
averaged per sample. Captions and instructions are dropped 10% of the time, the empty prompt
being the negative prompt of the pipeline's ``true_cfg_scale`` guidance (the context image
stays in both branches, as in ``FluxKontextPipeline``).

**Cost** (measured: base preset, batch 64 at ``--t2i-fraction 0.3`` = 19 text-to-image + 45 edit
samples, 1 torch thread on the 2-core dev box while another training job ran, load average ~4):
a step took 3.36 s wall (mean of steps 5-20 of a 20-step run; ~2.5 s of CPU time per step);
the data stage took 19 ms per image (render + VAE encode; a pair is two images).

**Recipe** (an estimate, not yet run): the defaults, ``--n-t2i 40000 --n-edit 40000`` (120k
images: ~40 min) and 6000 steps of batch 64 (384k samples: 115k text-to-image, 270k edits,
~6.7 epochs of the edit pairs) at lr 1e-3, WSD after 100 warm-up steps, take ~5.6 h at the
measured 3.36 s per step (~4.2 h on an unshared core). For scale, tiny-sd3's 60-minute recipe
saw 5300 x 64 = 339k samples of 88 tokens; an edit sample here is 160 tokens (32 text + 64
target + 64 context), which is why a step costs ~4x tiny-sd3's. The rate is half of tiny-sd3's
2e-3 for a deeper stack (3 double + 6 single blocks against 6 joint ones); both it and the step
count are untuned. Checkpoints every ``--save-every`` steps, so the run resumes in pieces.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import PathError, UsageError
from . import kontext_models
from .edits import edit_pairs, eval_edit_pairs, train_edit_seeds
from .train import (CAPTION_DROPOUT, _batches, _load_ema_into, _named_trainable, _training_pair, denoiser_update,
                    images_to_tensor, load_checkpoint, lr_at)
from .world import render

DATA_RECORD = "data.json"  # {"world": "kontext", "n_t2i": ..., "n_edit": ..., "pair_seeds": [start, stop], ...}
MARKER = "testbed.json"  # written by export: {"model": "tiny-kontext", ...}
ENCODE_BATCH = 256


def read_data_record(data_dir: str) -> dict:
    """The data folder's record; a PathError when it is not a tiny-kontext data folder."""
    path = os.path.join(data_dir, DATA_RECORD)
    if not os.path.isfile(path):
        raise PathError(f"{data_dir!r} is not a tiny-kontext data folder (no {DATA_RECORD}); run the data stage: "
                        "`python -m diffattn.testbed.train_kontext data --out FOLDER`")
    with open(path) as f:
        record = json.load(f)
    if record.get("world") != "kontext":
        raise PathError(f"{path} records world {record.get('world')!r}, not a tiny-kontext data folder; pass the "
                        "train_kontext data stage's --out")
    return record


# ----------------------------------------------------------------------------- data


@torch.no_grad()
def _encode(vae, scenes, device, desc: str = "encode") -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N, 4, 16, 16] (fp16) of the renders of ``scenes``."""
    means, stds = [], []
    for start in tqdm(range(0, len(scenes), ENCODE_BATCH), desc=desc, dynamic_ncols=True):
        x = images_to_tensor([render(s) for s in scenes[start: start + ENCODE_BATCH]]).to(device)  # [b, 3, 64, 64]
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.half().cpu())  # [b, 4, 16, 16]
        stds.append(dist.std.half().cpu())
    if not means:
        return torch.zeros(0, 4, 16, 16, dtype=torch.float16), torch.zeros(0, 4, 16, 16, dtype=torch.float16)
    return torch.cat(means), torch.cat(stds)


def make_data(args):
    """Encode ``--n-t2i`` captioned scenes and ``--n-edit`` training edit pairs (module notes)."""
    vae = kontext_models.load_world_vae(args.vae).to(args.device)
    seeds = train_edit_seeds(args.n_edit, args.pair_offset)  # a UsageError past the evaluation seeds
    t0 = time.time()
    rng = np.random.default_rng([args.seed, 10**6])  # tiny-sd3's v2 data stream
    pairs_t2i = [_training_pair(2, rng) for _ in range(args.n_t2i)]
    captions = [c for _, c in pairs_t2i]
    edits = edit_pairs(seeds)
    t2i_mean, t2i_std = _encode(vae, [s for s, _ in pairs_t2i], args.device, "encode scenes")
    src_mean, _ = _encode(vae, [p.source for p in edits], args.device, "encode sources")
    tgt_mean, tgt_std = _encode(vae, [p.target for p in edits], args.device, "encode targets")
    os.makedirs(args.out, exist_ok=True)
    vae.to("cpu").save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    save_file({"t2i_mean": t2i_mean.contiguous(), "t2i_std": t2i_std.contiguous(), "source_mean": src_mean.contiguous(),
               "target_mean": tgt_mean.contiguous(), "target_std": tgt_std.contiguous()},
              os.path.join(args.out, "latents.safetensors"))
    with open(os.path.join(args.out, "captions.json"), "w") as f:
        json.dump(captions, f)
    with open(os.path.join(args.out, "instructions.json"), "w") as f:
        json.dump([p.instruction for p in edits], f)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    every = torch.cat([t2i_mean, tgt_mean]).float()
    std = float(((every - shift) * scale).std()) if len(every) else float("nan")
    seconds = time.time() - t0
    n_images = args.n_t2i + 2 * args.n_edit
    record = {"world": "kontext", "n_t2i": args.n_t2i, "n_edit": args.n_edit,
              "pair_seeds": [args.pair_offset, args.pair_offset + args.n_edit],
              "vae": str(args.vae or kontext_models.shipped_vae_path()), "latent_std": std, "seconds": seconds}
    with open(os.path.join(args.out, DATA_RECORD), "w") as f:
        json.dump(record, f)
    print(f"{args.n_t2i} scenes + {args.n_edit} edit pairs -> latents (4, 16, 16); scaled latent std {std:.3f}; "
          f"{1000 * seconds / max(1, n_images):.1f} ms per image")


# ----------------------------------------------------------------------------- tiny-kontext


def trained_modules(pipe) -> dict[str, torch.nn.Module]:
    """What the tiny-kontext stage trains and checkpoints: the transformer, the CLIP encoder and
    the T5 encoder stack (``text_encoder_2.encoder``: T5 ties ``shared`` to
    ``encoder.embed_tokens`` and safetensors stores no tensor twice, so the stack, which holds
    the embedding once, is checkpointed)."""
    return {"denoiser": pipe.transformer, "text_encoder": pipe.text_encoder,
            "text_encoder_2": pipe.text_encoder_2.encoder}


def pack(pipe, z: torch.Tensor, context: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [B, C, h, w] -> (tokens [B, (h/2)(w/2), 4C], position ids [(h/2)(w/2), 3]) with the
    pipeline's own ``_pack_latents`` / ``_prepare_latent_image_ids``; ``context``: first id 1,
    as ``FluxKontextPipeline.prepare_latents`` marks the context image."""
    b, c, h, w = z.shape
    ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)  # [(h/2)(w/2), 3]
    if context:
        ids[..., 0] = 1
    return pipe._pack_latents(z, b, c, h, w), ids  # [B, (h/2)(w/2), 4C]


def flow_loss(pipe, x0: torch.Tensor, prompts: list[str], gen: torch.Generator, context: torch.Tensor | None = None):
    """Rectified-flow loss of one batch (module notes). x0: target latents [B, 4, 16, 16] (scaled);
    context: the context image's latents [B, 4, 16, 16] (scaled) or None for text-to-image;
    ``gen`` draws the noise and the logit-normal timesteps."""
    device = x0.device
    target, target_ids = pack(pipe, x0)  # [B, 64, 16], [64, 3]
    noise = torch.randn(target.shape, generator=gen).to(device)
    t = torch.sigmoid(torch.randn(len(prompts), generator=gen)).to(device)  # logit-normal(0, 1)
    xt = (1 - t[:, None, None]) * target + t[:, None, None] * noise
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                  max_sequence_length=kontext_models.TEXT_LENGTH)  # [B, 32, d], [B, d']
    hidden, ids = xt, target_ids
    if context is not None:
        ctx, ctx_ids = pack(pipe, context, context=True)  # [B, 64, 16], [64, 3]
        hidden, ids = torch.cat([xt, ctx], dim=1), torch.cat([target_ids, ctx_ids], dim=0)  # [B, 128, 16], [128, 3]
    pred = pipe.transformer(hidden_states=hidden, timestep=t, guidance=None, pooled_projections=pooled,
                            encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
    return F.mse_loss(pred[:, : target.shape[1]], noise - target)  # the straight path's velocity, target tokens only


def _drop(texts: list[str], gen: torch.Generator) -> list[str]:
    drop = torch.rand(len(texts), generator=gen) < CAPTION_DROPOUT
    return ["" if d else t for t, d in zip(texts, drop.tolist())]


def split_batch(batch: int, t2i_fraction: float) -> tuple[int, int]:
    """(text-to-image, edit) samples of a batch."""
    n_t2i = int(round(batch * t2i_fraction))
    return n_t2i, batch - n_t2i


def train_kontext(args):
    """tiny-kontext (rectified flow on text-to-image and edit samples) on the encoded data."""
    record = read_data_record(args.data)
    lat = load_file(os.path.join(args.data, "latents.safetensors"))
    with open(os.path.join(args.data, "captions.json")) as f:
        captions = json.load(f)
    with open(os.path.join(args.data, "instructions.json")) as f:
        instructions = json.load(f)
    n_t2i, n_edit = split_batch(args.batch, args.t2i_fraction)
    for n, have, what in ((n_t2i, len(captions), "captioned scenes"), (n_edit, len(instructions), "edit pairs")):
        if n > have:
            raise UsageError(f"a batch takes {n} {what} but the data holds {have}; lower --batch or change "
                             f"--t2i-fraction, or encode more (data stage --n-t2i / --n-edit)")
    vae = kontext_models.load_world_vae(os.path.join(args.data, "vae"))
    pipe = kontext_models.build_kontext(args.preset, vae, args.seed)
    modules = trained_modules(pipe)
    device = args.device
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.train().to(device)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    ema = {n: p.detach().clone() for n, p in _named_trainable(modules)}
    opt = torch.optim.AdamW([p for _, p in _named_trainable(modules)], lr=args.lr, weight_decay=0.01)
    step = load_checkpoint(args.out, modules, ema, opt, device)
    bar = tqdm(total=args.steps, initial=step, desc="tiny-kontext", dynamic_ncols=True)
    t0, losses, times = time.time(), [], []
    print(f"tiny-kontext ({args.preset}, {record['n_t2i']} scenes + {record['n_edit']} edits): "
          f"batch {n_t2i} text-to-image + {n_edit} edit samples")
    while step < args.steps:
        ts = time.time()
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.steps, args.schedule)
        loss = torch.zeros((), device=device)
        if n_t2i:
            idx = _batches(len(captions), n_t2i, args.seed, step)
            mean, std = lat["t2i_mean"][idx].float(), lat["t2i_std"][idx].float()  # [b, 4, 16, 16]
            x0 = ((mean + std * torch.randn(mean.shape, generator=gen)) - shift) * scale  # a scaled posterior sample
            caps = _drop([captions[i] for i in idx], gen)
            loss = loss + flow_loss(pipe, x0.to(device), caps, gen) * (n_t2i / args.batch)
        if n_edit:
            idx = _batches(len(instructions), n_edit, args.seed + 1, step)
            mean, std = lat["target_mean"][idx].float(), lat["target_std"][idx].float()  # [b, 4, 16, 16]
            x0 = ((mean + std * torch.randn(mean.shape, generator=gen)) - shift) * scale
            ctx = (lat["source_mean"][idx].float() - shift) * scale  # the context: the source's posterior mode
            texts = _drop([instructions[i] for i in idx], gen)
            loss = loss + flow_loss(pipe, x0.to(device), texts, gen, context=ctx.to(device)) * (n_edit / args.batch)
        step = denoiser_update(loss, step, modules, ema, opt, args, bar, losses)
        times.append(time.time() - ts)
    bar.close()
    tail = times[min(4, len(times) - 1):] if times else []
    per_step = np.mean(tail) if tail else float("nan")
    print(f"tiny-kontext: {step} steps, {time.time() - t0:.0f}s this run ({per_step:.2f} s/step after the first 4), "
          f"final loss {np.mean(losses[-100:]) if losses else float('nan'):.4f}")


# ----------------------------------------------------------------------------- export


def assemble(run: str):
    """The ``ShapesKontextPipeline`` of a tiny-kontext run folder with its EMA weights (and the
    data's VAE), and the run's arguments."""
    args_file = os.path.join(run, "args.json")
    if not os.path.isfile(args_file) or not os.path.isfile(os.path.join(run, "ema.safetensors")):
        raise PathError(f"{run!r} is not a tiny-kontext run folder with a checkpoint (args.json, ema.safetensors)")
    with open(args_file) as f:
        run_args = json.load(f)
    read_data_record(run_args["data"])
    vae = kontext_models.load_world_vae(os.path.join(run_args["data"], "vae"))
    pipe = kontext_models.build_kontext(run_args["preset"], vae, run_args["seed"])
    _load_ema_into(trained_modules(pipe), load_file(os.path.join(run, "ema.safetensors")))
    return pipe, run_args


@torch.no_grad()
def save_samples(pipe, path: str, n: int = 4, steps: int = 20) -> None:
    """A PNG of ``n`` held-out edits (rows: source | edited) beside ``n`` text-to-image samples of
    the edits' target captions, each from the pair's seed."""
    from .world import caption_v2

    pairs = eval_edit_pairs(n)
    rows = []
    for p in pairs:
        gen = torch.Generator().manual_seed(p.seed)
        edited = pipe(image=render(p.source), prompt=p.instruction, generator=gen, num_inference_steps=steps).images[0]
        t2i = pipe(prompt=caption_v2(p.target), generator=torch.Generator().manual_seed(p.seed),
                   num_inference_steps=steps).images[0]
        rows.append([render(p.source), edited, render(p.target), t2i])
    sheet = Image.new("RGB", (64 * 4, 64 * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im.convert("RGB").resize((64, 64)), (64 * c, 64 * r))
    sheet.save(path)


def export(args):
    """Assemble the EMA weights of a run into a diffusers pipeline folder (safetensors) with its
    ``testbed.json`` marker, and save ``--samples`` sample edits (``<run>/samples.png``)."""
    if not args.to:
        raise UsageError("export needs --to FOLDER")
    pipe, run_args = assemble(args.run)
    pipe.save_pretrained(args.to, safe_serialization=True)
    with open(os.path.join(args.to, MARKER), "w") as f:
        json.dump({"model": "tiny-kontext", "world": 2, "preset": run_args["preset"],
                   "text_length": kontext_models.TEXT_LENGTH}, f)
    print(f"exported tiny-kontext to {args.to}")
    if args.samples:
        path = os.path.join(args.run, "samples.png")
        save_samples(pipe, path, args.samples, args.sample_steps)
        print(f"samples: {path} (columns: source, edit, target, text-to-image of the target's caption)")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffattn.testbed.train_kontext", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["data", "tiny-kontext", "export"])
    p.add_argument("--out", default=None, help="run or data folder (checkpoints; resumes from it)")
    p.add_argument("--vae", default=None, help="data stage: the world-v2 VAE folder (default assets/tiny-sd3/vae)")
    p.add_argument("--data", default="runs/kontext-data", help="encoded data folder (tiny-kontext stage)")
    p.add_argument("--run", default="runs/tiny-kontext", help="run folder to export")
    p.add_argument("--to", default=None, help="export destination folder")
    p.add_argument("--preset", default="base", choices=list(kontext_models.PRESETS), help="tiny-kontext: model sizes")
    p.add_argument("--n-t2i", type=int, default=40000, help="data stage: captioned scenes to encode")
    p.add_argument("--n-edit", type=int, default=40000, help="data stage: training edit pairs to encode")
    p.add_argument("--pair-offset", type=int, default=0, help="data stage: first training pair seed")
    p.add_argument("--t2i-fraction", type=float, default=0.3, help="tiny-kontext: share of text-to-image samples")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--schedule", default="wsd", choices=["cosine", "wsd"], help="rate schedule after the warm-up")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device of the data and tiny-kontext stages (e.g. cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--samples", type=int, default=4, help="export: sample edits in <run>/samples.png (0: none)")
    p.add_argument("--sample-steps", type=int, default=20, help="export: sampling steps of the samples")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for k in ("steps", "batch", "save_every", "threads"):
        v = getattr(args, k)
        if v is not None and v < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    for k in ("n_t2i", "n_edit", "pair_offset", "samples", "warmup"):
        if getattr(args, k) < 0:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(args, k)}")
    if not 0.0 <= args.t2i_fraction <= 1.0:
        raise UsageError(f"--t2i-fraction must be in [0, 1], got {args.t2i_fraction}")
    if args.stage == "export":
        return export(args)
    args.out = args.out or {"data": "runs/kontext-data"}.get(args.stage, "runs/tiny-kontext")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    {"data": make_data, "tiny-kontext": train_kontext}[args.stage](args)


if __name__ == "__main__":
    main()
