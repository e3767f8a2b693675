"""DeContext batches (issue 26, item 3): `diffattn protect --out-dir` over 4 tiny images with one
process and with two processes launched by torchrun (CPU, gloo) writes byte-identical PNGs;
a resumed batch keeps complete outputs, redoes damaged ones and writes what an uninterrupted
run writes; a lone process starts no accelerate state. The tiny FLUX Kontext pipeline
(``tiny-random-kontext``, random weights from a fixed seed), 2 PGD steps."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffattn.errors import ImageInputError, PathError

SEQ = 16  # T5 tokens (the pipeline default 512 is slower for nothing)
STEPS = 2
N_IMAGES = 4
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def image(w, h, seed=0):
    """A deterministic RGB test image (smooth colours, so PGD has room in both directions)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, size=(1, 1, 3))
    ramp = np.linspace(-30, 30, w)[None, :, None] + np.linspace(-20, 20, h)[:, None, None]
    return Image.fromarray(np.clip(base + ramp, 0, 255).astype(np.uint8), "RGB")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> str | None:
    return shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")


def protect_cli(cwd, out_dir, processes: int, *extra) -> subprocess.CompletedProcess:
    """`diffattn protect images/ --out-dir OUT` as a fresh process (or `processes` under torchrun),
    one intra-op thread each, offline."""
    args = ["-m", "diffattn.cli", "protect", "images", "--out-dir", str(out_dir), "--model", "tiny-random-kontext",
            "--steps", str(STEPS), "--max-sequence-length", str(SEQ), *extra]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [_torchrun(), "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), *args]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A folder of 4 tiny images and their protection by one plain process (no launcher)."""
    root = tmp_path_factory.mktemp("batch")
    (root / "images").mkdir()
    for i in range(N_IMAGES):
        image(16, 16, seed=i).save(root / "images" / f"img{i}.png")
    proc = protect_cli(root, root / "one", 1)
    return root, proc


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built into this torch")
def test_two_processes_write_the_bytes_one_process_writes(batch):
    """torchrun --nproc_per_node 2 (gloo on the CPU): each process protects its share (2 + 2
    images, split by accelerate's PartialState), the main process lists every output in input
    order, and every PNG equals the one-process run's byte for byte (image k: seed --seed + k)."""
    if _torchrun() is None:
        pytest.skip("torchrun (torch.distributed's launcher) is not on PATH nor beside this python")
    root, one = batch
    two = protect_cli(root, root / "two", 2)
    names = [f"img{i}.png" for i in range(N_IMAGES)]
    assert sorted(p.name for p in (root / "one").iterdir()) == names  # no temporary file left
    assert sorted(p.name for p in (root / "two").iterdir()) == names
    for name in names:
        assert (root / "two" / name).read_bytes() == (root / "one" / name).read_bytes(), name
        clean = np.asarray(Image.open(root / "images" / name), dtype=np.int32)
        diff = np.abs(np.asarray(Image.open(root / "two" / name), dtype=np.int32) - clean)
        assert 0 < diff.max() <= 12  # ⌊255 · 0.05⌋ levels, the default budget
    # both processes worked (two images each), and only the main process lists the outputs, in input order
    done = [line for line in two.stdout.splitlines() if line.startswith("[process")]
    assert sorted(line.split("]")[0] for line in done) == ["[process 1/2"] * 2 + ["[process 2/2"] * 2
    wrote = [line for line in two.stdout.splitlines() if line.startswith("wrote")]
    assert wrote == [f"wrote {root / 'two' / n}" for n in names]
    assert "with 2 processes" in two.stdout and "with 1 process " in one.stdout


def test_a_resumed_batch_keeps_outputs_and_writes_the_missing_ones(batch, tmp_path, monkeypatch):
    """In this (lone) process: a complete earlier output of the same settings is kept byte for
    byte; a truncated one (an old killed write), a missing one, one of another ε and a plain image
    of the right size (unknown origin) are protected with their own seeds, equal to the
    uninterrupted run's files; a stale temporary file is ignored; no accelerate state starts."""
    from diffattn.cli.protect import protector_for
    from diffattn.pipelines.decontext import batch_state, launched_processes
    from diffattn.tiny import tiny_pipeline

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    root, _ = batch
    images = [str(root / "images" / f"img{i}.png") for i in range(N_IMAGES)]
    out = tmp_path / "resume"
    out.mkdir()
    (out / "img1.png").write_bytes((root / "one" / "img1.png").read_bytes())  # an earlier output: kept
    kept_bytes = (out / "img1.png").read_bytes()
    image(16, 16, seed=99).save(out / "img0.png")  # the right size, but not written by a protection: redone
    (out / "img3.png").write_bytes((root / "one" / "img3.png").read_bytes()[:60])  # truncated
    (out / ".img2.png.12345.part").write_bytes(b"stale")  # a killed write's temporary file
    assert launched_processes() == 1 and batch_state() is None  # a lone process: no PartialState, no group

    import argparse

    args = argparse.Namespace(method="decontext", eps=0.05, alpha=0.0025, steps=STEPS, instruction_pool=None,
                              blocks="auto", seed=0, checkpointing=False, max_sequence_length=SEQ)
    protector = protector_for(args, tiny_pipeline("flux_kontext"))  # the CLI's settings
    protector.progress = False
    seen = []
    paths = protector.protect_batch(images, out, on_image=lambda k, path, result: seen.append((k, path.name)))
    assert paths == [out / f"img{i}.png" for i in range(N_IMAGES)]
    assert seen == [(0, "img0.png"), (2, "img2.png"), (3, "img3.png")]
    assert (out / "img1.png").read_bytes() == kept_bytes
    if torch.get_num_threads() == 1:  # as the CLI run (OMP_NUM_THREADS=1): the same float sums
        for k in (0, 2, 3):
            assert paths[k].read_bytes() == (root / "one" / f"img{k}.png").read_bytes()
    assert not torch.distributed.is_initialized()
    seen.clear()
    assert protector.protect_batch(images, out, on_image=lambda k, p, r: seen.append(k)) == paths and seen == []
    protector.protect_batch(images[1:2], out, resume=False)  # image 0 of this list: seed 0, not 1
    assert (out / "img1.png").read_bytes() != kept_bytes
    other = argparse.Namespace(**{**vars(args), "eps": 0.03})
    other_protector = protector_for(other, protector.pipe)
    other_protector.progress = False
    seen.clear()
    other_protector.protect_batch(images, out, on_image=lambda k, p, r: seen.append(k))
    assert seen == [0, 1, 2, 3]  # every file was made with another eps (or seed): all redone
    assert sorted(p.name for p in out.iterdir()) == [".img2.png.12345.part"] + [f"img{i}.png" for i in range(4)]

    with pytest.raises(PathError, match="would both be written to"):
        protector.protect_batch([images[0], images[0]], out)
    with pytest.raises(PathError, match="input image itself"):
        protector.protect_batch(images, root / "images")
    with pytest.raises(PathError, match="no such directory"):
        protector.protect_batch(images, tmp_path / "missing")
    with pytest.raises(ImageInputError, match="image files"):
        protector.protect_batch([image(16, 16)], out)
    odd = tmp_path / "odd.png"
    image(18, 16).save(odd)
    (tmp_path / "fresh").mkdir()
    with pytest.raises(ImageInputError, match="multiples of 4 px"):  # checked before any image is protected
        protector.protect_batch([*images, str(odd)], tmp_path / "fresh")
    assert not any((tmp_path / "fresh").iterdir())


def test_cli_batch_arguments_fail_before_any_work(tmp_path):
    """Flag combinations of the batch mode are refused with exit status 2 and one line."""
    from diffattn.cli import main

    (tmp_path / "images").mkdir()
    image(16, 16).save(tmp_path / "images" / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    base = ["protect", "--model", "tiny-random-kontext", "--steps", "1"]
    for argv in ([str(tmp_path / "images"), "--out", str(tmp_path / "o.png")],  # a folder needs --out-dir
                 [str(tmp_path / "images" / "a.png"), str(tmp_path / "images" / "a.png"), "--out", "o.png"],
                 [str(tmp_path / "images"), "--out-dir", str(tmp_path / "images")],  # out-dir is an input folder
                 [str(tmp_path / "empty"), "--out-dir", str(tmp_path / "o")],  # no images there
                 [str(tmp_path / "images"), "--out-dir", str(tmp_path / "file.txt")],
                 [str(tmp_path / "images"), "--out-dir", str(tmp_path / "no" / "such")],
                 [str(tmp_path / "images"), "--out-dir", str(tmp_path / "o"), "--plot", str(tmp_path / "p.png")],
                 [str(tmp_path / "images"), "--out-dir", str(tmp_path / "o"), "--out", str(tmp_path / "o.png")]):
        with pytest.raises(SystemExit) as e:
            main([*base, *argv])
        assert e.value.code == 2, argv
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
