"""The video oracle on rendered clips of the moving-shapes world: how often it reads objects,
directions and colour changes right, says "unreadable", or is wrong.

    python benchmarks/video_oracle.py                 # 300 clean clips, 300 per perturbation strength, suites
    python benchmarks/video_oracle.py --n 100 --strengths 1 --suite-clips 32
    python benchmarks/video_oracle.py --reconstruct runs/wan-data --n 64   # the VAE's ceiling (below)

Clips: ``video.sample_training_clip`` of the first n evaluation seeds (``evaluate.eval_seeds``;
the oracle's thresholds were set from the world's numbers, not fitted on any clip). Each
perturbed frame is ``oracle.perturb`` at the given strength, independently per frame (blur,
colour drift, noise and jitter that differ from frame to frame: harder than a generated clip
whose frames drift together). The suite tables grade rendered clips of each evaluation
suite's prompts (``video.sample_clip(seed, prompt)``) with ``video_metrics``: 95% Wilson
intervals over clips.

``--reconstruct DATA`` grades instead what a denoiser trained on a ``train_video data`` folder
can at best draw: its first n encoded training clips (posterior means) decoded by the folder's
VAE, against their captions: the oracle's ceiling for a model whose samples were perfect latents.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from diffattn.testbed import video, video_oracle
from diffattn.testbed.evaluate import eval_seeds

ROWS = ("object_accuracy", "direction_accuracy", "direction_unreadable", "direction_wrong", "color_accuracy",
        "color_unreadable", "color_wrong", "change_accuracy", "smooth_rate", "correct", "unreadable_rate",
        "max_velocity_error")


@torch.no_grad()
def reconstruction_scores(data: str, n: int, batch: int = 8) -> list:
    """Oracle scores of the first ``n`` encoded clips of a ``train_video data`` folder, decoded
    from their posterior means by the folder's VAE, against their training captions."""
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file

    vae = AutoencoderKLWan.from_pretrained(os.path.join(data, "vae")).eval()
    latents = load_file(os.path.join(data, "latents.safetensors"))["mean"]  # [N, C, T, h, w], unstandardised
    with open(os.path.join(data, "captions.json")) as f:
        captions = json.load(f)
    scores = []
    for i in range(0, min(n, len(captions)), batch):
        x = vae.decode(latents[i:i + batch].float()).sample  # [B, 3, F, H, W] in [-1, 1]
        clips = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy()  # [B, F, H, W, 3]
        scores += [video_oracle.score_clip(c, captions[i + j]) for j, c in enumerate(clips)]
    return scores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="clips per strength")
    p.add_argument("--strengths", type=float, nargs="*", default=[0.0, 0.5, 1.0])
    p.add_argument("--suite-clips", type=int, default=64, help="clean clips per suite (0: skip the suite tables)")
    p.add_argument("--reconstruct", default=None, help="a train_video data folder: grade its VAE's reconstructions")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.reconstruct:
        scores = reconstruction_scores(args.reconstruct, args.n)
        print(video_oracle.metrics_markdown(video_oracle.video_metrics(scores),
                                            f"VAE reconstructions of {args.n} training clips of {args.reconstruct}"))
        print(f"\n{time.time() - t0:.0f} s")
        return
    results = [video_oracle.video_oracle_accuracy(args.n, strength=s) for s in args.strengths]
    r0 = results[0]
    print(f"## video oracle on {args.n} rendered training clips ({r0['objects']} objects, "
          f"{r0['changes']} colour changes at strength {args.strengths[0]:g})\n")
    print("| measure | " + " | ".join(f"strength {s:g}" for s in args.strengths) + " |")
    print("|---|" + "---|" * len(args.strengths))
    for row in ROWS:
        print(f"| {row} | " + " | ".join(f"{r[row]:.3f}" for r in results) + " |")
    for name in video.VIDEO_SUITES if args.suite_clips else ():
        prompts = video.video_suite_prompts(name)
        scores = []
        for k, seed in enumerate(eval_seeds(args.suite_clips)):
            prompt = prompts[k % len(prompts)]
            scores.append(video_oracle.score_clip(video.render_clip(video.sample_clip(seed, prompt)), prompt))
        print("\n" + video_oracle.metrics_markdown(video_oracle.video_metrics(scores), f"suite {name}, clean renders"))
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
