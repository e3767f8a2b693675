"""``diffattn train-vmix``: train a VMix aesthetic adapter on the shapes world v2 (resumable).

    diffattn train-vmix --model tiny-sd3 --out runs/vmix-sd3 --steps 2000
    diffattn train-vmix --model tiny-sd  --out runs/vmix-sd  --steps 2000 --lora-rank 4

The aesthetic dimensions are world v2's style attributes (``testbed.world.STYLES_V2``: dark,
outline, shadow, light, centred), each with its caption phrase as the positive label
("with shadows"...) and a rare token as the negative. Every training image is a world-v2
render (``sample_training_pair_v2``) labelled with the attributes it shows
(``scene_styles_v2``); its caption names each shown style only with probability
``--p-style`` (the world's 0.6 by default), so the adapter learns aesthetics the prompt does
not state. Batches, noise and dropout are seeded by (seed, step): rerunning the command with
the same ``--out`` resumes exactly. The result: ``OUT/adapter.safetensors`` (and
``OUT/lora.safetensors`` with ``--lora-rank``).
"""
from __future__ import annotations

from ..errors import UsageError
from .common import add_model_arguments, check_model_args, float_arg, int_arg, load_for


def register(subparsers) -> None:
    p = subparsers.add_parser("train-vmix", help="train a VMix aesthetic adapter on the shapes world v2",
                              description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="run folder: checkpoints, then adapter.safetensors (resumes from it)")
    p.add_argument("--steps", type=int_arg(1, None, "--steps"), default=2000)
    p.add_argument("--batch", type=int_arg(1, 4096, "--batch"), default=32)
    p.add_argument("--lr", type=float_arg(0.0, 1.0, "--lr"), default=1e-4, help="AdamW rate (the paper's SD1.5: 1e-4)")
    p.add_argument("--warmup", type=int_arg(0, None, "--warmup"), default=50)
    p.add_argument("--seed", type=int_arg(0, 2**31 - 1, "--seed"), default=0)
    p.add_argument("--save-every", type=int_arg(1, None, "--save-every"), default=100)
    p.add_argument("--lora-rank", type=int_arg(0, 256, "--lora-rank"), default=0,
                   help="LoRA rank on the base's attention projections (0: none, the paper's 'w/o LoRA'; needs peft)")
    p.add_argument("--lora-only", action="store_true",
                   help="train LoRA alone, no adapter (the paper's 'w/o value-mixed attention' ablation; needs --lora-rank)")
    p.add_argument("--require", default=None, metavar="STYLE",
                   help="keep only renders showing this style (curated data: the supervised fine-tuning baseline)")
    p.add_argument("--p-style", type=float_arg(0.0, 1.0, "--p-style"), default=None,
                   help="probability that a caption names a shown style (default: the world's 0.6)")
    p.add_argument("--caption-dropout", type=float_arg(0.0, 0.99, "--caption-dropout"), default=0.1)
    p.add_argument("--threads", type=int_arg(1, 256, "--threads"), default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=run)


def aesthetic_labels() -> dict[str, str]:
    """World v2's style attributes and their caption phrases: the positive labels."""
    from ..testbed.world import STYLE_SUFFIXES_V2, STYLES_V2

    return {name: STYLE_SUFFIXES_V2[name].strip() for name in STYLES_V2}


def world_batches(labels: list[str], batch: int, seed: int, p_style: float | None = None, require: str | None = None):
    """``data(step) -> VMixBatch`` of world-v2 renders, deterministic in (seed, step).
    ``require``: a style every render must show (others are drawn again), as a curated
    aesthetic dataset would."""
    import numpy as np
    import torch

    from ..methods.vmix.train import VMixBatch
    from ..testbed.world import caption_v2, describe, render, sample_training_pair_v2, scene_styles_v2

    def data(step: int) -> VMixBatch:
        rng = np.random.default_rng([seed, 23, step])
        images, captions, masks = [], [], []
        for _ in range(batch):
            scene, spec = sample_training_pair_v2(rng)
            while require is not None and not scene_styles_v2(scene)[require]:
                scene, spec = sample_training_pair_v2(rng)
            if p_style is not None:
                spec = describe(scene, rng, p_style=p_style)
            shown = scene_styles_v2(scene)
            images.append(np.asarray(render(scene), dtype=np.float32))  # [64, 64, 3]
            captions.append(caption_v2(spec))
            masks.append([bool(shown[name]) for name in labels])
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0  # [B, 3, 64, 64] in [-1, 1]
        return VMixBatch(x, captions, torch.tensor(masks, dtype=torch.bool))

    return data


def run(args):
    import os

    import torch

    from ..methods.vmix import VMixAdapter, load_adapter
    from ..methods.vmix.train import TrainConfig, train_vmix

    check_model_args(args)
    if args.lora_only and not args.lora_rank:
        raise UsageError("train-vmix: --lora-only trains LoRA alone; give --lora-rank R (e.g. 4)")
    if args.require is not None and args.require not in aesthetic_labels():
        raise UsageError(f"train-vmix: --require {args.require!r}: choose one of {sorted(aesthetic_labels())}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_for(args)
    resume = os.path.join(args.out, "checkpoint", "adapter.safetensors")
    if os.path.exists(os.path.join(args.out, "state.json")) and os.path.exists(resume):
        adapter = load_adapter(resume, pipe)  # the run's adapter (its config); the weights come from the checkpoint
    else:
        adapter = VMixAdapter.build(pipe, aesthetic_labels(), seed=args.seed, name=args.model or "tiny-sd3")
    config = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
                         save_every=args.save_every, caption_dropout=args.caption_dropout, lora_rank=args.lora_rank,
                         value_mix=not args.lora_only)
    data = world_batches(adapter.labels, args.batch, args.seed, args.p_style, args.require)
    stats = train_vmix(pipe, adapter, data, config, args.out, progress=not args.no_progress)
    made = os.path.join(args.out, "lora.safetensors" if args.lora_only else "adapter.safetensors")
    print(f"train-vmix: step {stats['step']}/{args.steps}, {stats['seconds_per_step']:.2f} s/step this run, "
          f"loss {stats['loss']:.4f}; {'LoRA' if args.lora_only else 'adapter'}: {made}")
