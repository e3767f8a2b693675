"""Scaling of the distributed DeContext batch: `diffattn protect IMAGES --out-dir` with 1 process
vs N processes (torchrun, or accelerate launch on GPUs) on the same images, timed, and the
outputs checked byte-identical.

    python benchmarks/decontext_scaling.py                                # 4 tiny 32 px images, 20 steps, 1 vs 2
    python benchmarks/decontext_scaling.py --images 8 --size 64 --steps 50 --reps 2
    python benchmarks/decontext_scaling.py --model black-forest-labs/FLUX.1-Kontext-dev --size 512 \\
        --steps 100 --processes 1 8 --launcher accelerate                   # GPUs: one per process

Each run is a fresh command (a plain ``python -m diffattn.cli`` for 1 process, the launcher
otherwise) into a fresh folder; repetitions are interleaved. Reported per process count: the
median wall time of the whole command (start-up and model load included) and of the batch
itself (the command's own ``... in X s`` line: planning, protecting, the final barrier), and
the speed-up of the batch over one process. Every process runs ``--threads`` intra-op threads
(default 1, as torchrun gives each; the same for every run, so the files must be identical).
The machine's load average is printed before and after: on shared cores the figure is only as
good as the load it was taken under.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
BATCH_LINE = re.compile(r"protected images in .* with (\d+) process(?:es)? in ([0-9.]+) s$")


def make_images(folder: Path, n: int, size: int) -> None:
    """n smooth deterministic RGB images of size x size (each of its own colour)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        base = rng.integers(40, 216, size=(1, 1, 3))
        ramp = np.linspace(-30, 30, size)[None, :, None] + np.linspace(-20, 20, size)[:, None, None]
        Image.fromarray(np.clip(base + ramp, 0, 255).astype(np.uint8), "RGB").save(folder / f"img{i:03d}.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args, processes: int, images: Path, out: Path) -> list[str]:
    """The command line of one run."""
    cli = ["-m", "diffattn.cli", "protect", str(images), "--out-dir", str(out), "--model", args.model,
           "--steps", str(args.steps), "--method", args.method, "--seed", "0"]
    if args.max_sequence_length:
        cli += ["--max-sequence-length", str(args.max_sequence_length)]
    if args.dtype:
        cli += ["--dtype", args.dtype]
    if processes == 1:
        return [sys.executable, *cli]
    if args.launcher == "accelerate":
        return [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes",
                str(processes), "--main_process_port", str(free_port()), *cli]
    return [shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun", "--nproc_per_node",
            str(processes), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *cli]


def run_once(args, processes: int, images: Path, out: Path) -> tuple[float, float]:
    """(wall seconds of the command, seconds of the batch as the command reports them)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), PYTHONSAFEPATH="1")
    t0 = time.perf_counter()
    proc = subprocess.run(command(args, processes, images, out), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{processes} process run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines()[::-1]:
        m = BATCH_LINE.search(line.strip())
        if m:
            if int(m.group(1)) != processes:
                raise SystemExit(f"asked for {processes} processes but the command ran with {m.group(1)}")
            return wall, float(m.group(2))
    raise SystemExit(f"no batch timing line in the output of the {processes} process run:\n{proc.stdout[-2000:]}")


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random-kontext")
    ap.add_argument("--method", default="decontext")
    ap.add_argument("--images", type=int, default=4, help="number of images (made here unless --folder)")
    ap.add_argument("--folder", default=None, help="protect this folder's images instead of generated ones")
    ap.add_argument("--size", type=int, default=32, help="side of the generated images (px)")
    ap.add_argument("--steps", type=int, default=20, help="PGD steps per image")
    ap.add_argument("--max-sequence-length", type=int, default=16, help="T5 tokens (0: the pipeline's default)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--keep", default=None, help="keep the outputs in this folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if 1 not in args.processes:
        ap.error("--processes must include 1 (the reference the others are compared with)")

    root = Path(args.keep or tempfile.mkdtemp(prefix="decontext_scaling_"))
    images = Path(args.folder) if args.folder else root / "images"
    if not args.folder:
        make_images(images, args.images, args.size)
    n = sum(1 for p in images.iterdir() if p.is_file() and not p.name.startswith("."))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible; load average before "
          f"{load()}")
    print(f"{args.model}, {args.method}, {n} images of {args.size} px, {args.steps} steps, {args.threads} thread(s) "
          f"per process, launcher {args.launcher}")
    times = {p: ([], []) for p in args.processes}
    outputs: dict[int, Path] = {}
    for r in range(args.reps):
        for p in args.processes:
            out = root / f"out_p{p}_r{r}"
            wall, batch = run_once(args, p, images, out)
            times[p][0].append(wall)
            times[p][1].append(batch)
            outputs.setdefault(p, out)
            print(f"  rep {r + 1}: {p} process{'es' if p > 1 else ''}: command {wall:.1f} s, batch {batch:.2f} s",
                  flush=True)
    ref = outputs[1]
    names = sorted(f.name for f in ref.iterdir() if not f.name.startswith("."))
    identical = all(sorted(f.name for f in out.iterdir() if not f.name.startswith(".")) == names
                    and all((out / f).read_bytes() == (ref / f).read_bytes() for f in names)
                    for out in outputs.values())
    base = statistics.median(times[1][1])
    print(f"load average after {load()}")
    print(f"{'processes':>9} {'command s':>10} {'batch s':>9} {'batch speed-up':>15}")
    for p in args.processes:
        wall, batch = statistics.median(times[p][0]), statistics.median(times[p][1])
        print(f"{p:>9} {wall:>10.1f} {batch:>9.2f} {base / batch:>14.2f}x")
    print(f"outputs of every process count byte-identical to 1 process: {'yes' if identical else 'NO'} "
          f"({len(names)} PNGs, {root})")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
