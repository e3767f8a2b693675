"""Does a testbed VAE keep world-v2 markings? Encode -> decode v2 training renders and read
the markings back with the v2 oracle.

    python benchmarks/world_v2_vae.py --vae assets/tiny-sd3/vae --scenes 200
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from diffattn.testbed import oracle, world


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", default="assets/tiny-sd3/vae")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=10_000, help="held out of the v2 oracle's tuning seeds")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(args.vae, use_safetensors=True).eval()
    counts: dict[str, list[int]] = {}  # marking -> [correct, unreadable, wrong]
    for seed in range(args.first_seed, args.first_seed + args.scenes):
        scene, _ = world.sample_training_pair_v2(seed)
        x = torch.from_numpy(np.asarray(world.render(scene), np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample  # [1, 3, H, W] in [-1, 1]
        rec = ((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2 * 255 + 0.5).byte().numpy()
        truth = {(o.color, o.shape): o.marking for o in scene.objects}
        for d in oracle.parse_v2(Image.fromarray(rec)).objects:
            if (d.color, d.shape) not in truth:
                continue
            want = truth[(d.color, d.shape)]
            row = counts.setdefault(want, [0, 0, 0])
            row[0 if d.marking == want else 1 if d.marking == oracle.UNREADABLE else 2] += 1
    print(f"VAE {args.vae}, {args.scenes} v2 training scenes (seeds {args.first_seed}..)")
    print("| marking | objects | read back | unreadable | read as another |")
    print("|---|---:|---:|---:|---:|")
    for m, (ok, un, bad) in sorted(counts.items()):
        print(f"| {m} | {ok + un + bad} | {ok} | {un} | {bad} |")


if __name__ == "__main__":
    main()
