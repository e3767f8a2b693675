"""The video oracle on rendered clips of the moving-shapes world: how often it reads objects,
directions and colour changes right, says "unreadable", or is wrong.

    python benchmarks/video_oracle.py                 # 300 clean clips, 300 per perturbation strength, suites
    python benchmarks/video_oracle.py --n 100 --strengths 1 --suite-clips 32

Clips: ``video.sample_training_clip`` of the first n evaluation seeds (``evaluate.eval_seeds``;
the oracle's thresholds were set from the world's numbers, not fitted on any clip). Each
perturbed frame is ``oracle.perturb`` at the given strength, independently per frame (blur,
colour drift, noise and jitter that differ from frame to frame: harder than a generated clip
whose frames drift together). The suite tables grade rendered clips of each evaluation
suite's prompts (``video.sample_clip(seed, prompt)``) with ``video_metrics``: 95% Wilson
intervals over clips.
"""
from __future__ import annotations

import argparse
import time

from diffattn.testbed import video, video_oracle
from diffattn.testbed.evaluate import eval_seeds

ROWS = ("object_accuracy", "direction_accuracy", "direction_unreadable", "direction_wrong", "color_accuracy",
        "color_unreadable", "color_wrong", "change_accuracy", "smooth_rate", "correct", "unreadable_rate",
        "max_velocity_error")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="clips per strength")
    p.add_argument("--strengths", type=float, nargs="*", default=[0.0, 0.5, 1.0])
    p.add_argument("--suite-clips", type=int, default=64, help="clean clips per suite (0: skip the suite tables)")
    args = p.parse_args(argv)
    t0 = time.time()
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
