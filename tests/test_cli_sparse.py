"""`diffattn generate --method sparse`: Rectified SpaAttn from the command line, on a video model.

A tiny ``WanPipeline`` (diffattn.tiny.tiny_wan) saved with ``save_pretrained`` stands in for the
tiny-wan testbed model (the shipped one is tested last) and loads through ``--model FOLDER``, the hub-model
path. At 128 px and 5 frames it has 2 latent frames of 8 x 8 tokens: 8 blocks of 16 tokens.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffattn as da
from diffattn.cli import main

PROMPT = "a red circle moving right"
SPARSE = ["--method", "sparse", "--drop", "0.75", "--sparse-block", "16", "--dense-layers", "0", "--dense-steps", "0"]
CLIP = ["--size", "128", "--frames", "5", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from diffattn.tiny import tiny_wan

    folder = tmp_path_factory.mktemp("models") / "wan"
    tiny_wan().save_pretrained(str(folder))
    return folder


def _gif_frames(path) -> list[np.ndarray]:
    gif = Image.open(path)
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB"), dtype=np.float64))
    return frames


def test_generate_sparse_writes_dense_and_sparse_clips_side_by_side(wan_folder, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    main(["generate", PROMPT, "--model", str(wan_folder), *SPARSE, *CLIP, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "baseline | sparse rectified drop=0.75, 5 frames" in printed
    speed = next(line for line in printed.splitlines() if line.startswith("attention speedup"))
    assert "2 attention modules" in speed and "end-to-end" in speed and "sparse in 2 of 2 layers from step 0" in speed

    frames = _gif_frames(out)
    label_h, panel = 14, 128 * 4  # 128 px frames, upscaled 4x like generate's images
    assert len(frames) == 5 and frames[0].shape == (panel + label_h, 2 * panel, 3)
    # the panels are the dense clip and the sparse clip of the same seed, up to the GIF palette
    from diffattn.cli.common import load_model

    pipe = load_model(str(wan_folder))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=128, width=128, num_frames=5, num_inference_steps=2, output_type="pil")
    dense = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).frames[0]
    with da.attach(pipe, da.RectifiedSparseAttention(0.75, block_size=16, dense_layers=0, dense_steps=0)):
        sparse = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).frames[0]
    for i, f in enumerate(frames):
        left, right = f[label_h:, :panel][::4, ::4], f[label_h:, panel:][::4, ::4]  # nearest upscaling: exact
        assert np.abs(left - np.asarray(dense[i], np.float64)).mean() < 1.0, i
        assert np.abs(right - np.asarray(sparse[i], np.float64)).mean() < 1.0, i


def test_sparse_on_a_unet_model_is_one_typed_line_naming_the_families(tmp_path, capsys):
    out = tmp_path / "never.png"
    with pytest.raises(SystemExit) as e:
        main(["generate", "a red circle", "--model", "tiny-sd", "--method", "sparse", "--drop", "0.75", "--steps", "1",
              "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("diffattn generate: error: RectifiedSparseAttention")
    assert all(w in err for w in ("wan", "flux", "hunyuan_video", "unet")), err
    assert not out.exists()  # refused before the baseline was generated


@pytest.mark.parametrize("argv, words", [
    (["--drop", "1.5"], ["--drop", "must lie in [0.0, 0.999]"]),
    (["--drop", "-0.1"], ["--drop", "must lie in"]),
    (["--drop", "nan"], ["--drop", "not finite"]),
    (["--sparse-block", "24"], ["--sparse-block", "choose one of 16, 32, 64, 128, 256"]),
    (["--sparse-mode", "dense"], ["--sparse-mode", "rectified"]),
    (["--dense-steps", "-1"], ["--dense-steps", "must lie in"]),
])
def test_bad_sparse_flags_are_refused_by_argparse(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(["generate", PROMPT, "--method", "sparse", *argv, "--out", str(tmp_path / "x.gif")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage:" not in err and all(w in err for w in words), err


def test_clip_outputs_match_the_model_kind(wan_folder, tmp_path, capsys):
    from diffattn.cli.common import mp4_writer_missing

    cases = [(["--model", str(wan_folder), "--out", str(tmp_path / "x.png")], [".gif", "video model", "WanPipeline"]),
             (["--model", str(wan_folder), "--frames", "6", "--out", str(tmp_path / "x.gif")],
              ["--frames 6", "5 or 9"]),
             (["--model", str(wan_folder), "--size", "24", "--out", str(tmp_path / "x.gif")], ["--size 24", "16"]),
             (["--out", str(tmp_path / "x.gif")], ["makes images", ".png"]),  # tiny-sd3
             (["--frames", "5", "--out", str(tmp_path / "x.png")], ["--frames 5", "makes images"])]
    if mp4_writer_missing():
        cases.append((["--model", str(wan_folder), "--out", str(tmp_path / "x.mp4")], ["no MP4 writer", ".gif"]))
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            main(["generate", PROMPT, "--steps", "1", *argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), (argv, err)
    assert not list(tmp_path.iterdir())


def test_sparse_record_builds_the_control_and_returns_frames(wan_folder):
    from diffattn.cli.common import load_model
    from diffattn.kernels.sparse import MODES
    from diffattn.methods.registry import SPARSE_MODES, get_method, is_video_pipeline

    m = get_method("sparse")
    assert m.kind == "control" and SPARSE_MODES == MODES
    assert m.param("drop").cli_flag == "--drop" and m.defaults()["drop"] is None  # None: the family's default
    pipe = load_model(str(wan_folder))
    assert is_video_pipeline(pipe) and not is_video_pipeline(load_model(None))
    run = m.build(pipe, drop="0.5", mode="vanilla", block_size=16, dense_layers=1, dense_steps=0)
    c = run.control
    assert isinstance(c, da.RectifiedSparseAttention) and (c.drop, c.mode, c.block_size) == (0.5, "vanilla", 16)
    assert run.label == "sparse vanilla drop=0.5"
    out = run(PROMPT, generator=torch.Generator().manual_seed(0), height=64, width=64, num_frames=5,
              num_inference_steps=1)
    assert out.images == [] and len(out.frames) == 1 and len(out.frames[0]) == 5
    assert out.frames[0][0].size == (64, 64)
    assert out.info["timed_sites"] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert (out.info["sparse_layers"], out.info["layers"], out.info["drop"]) == (1, 2, [0.5])
    default = m.build(pipe)  # Wan's defaults: drop 0.75, the first 2 layers and 5 steps dense
    assert default.label == "sparse rectified drop=0.75"


def test_generate_sparse_on_hunyuan_video(tmp_path, capsys):
    """The other video family: HunyuanVideo's joint and single blocks (text last), its family
    default drop 0.8 and no warm-up."""
    from diffattn.tiny import tiny_pipeline

    folder = tmp_path / "hv"
    tiny_pipeline("hunyuan_video").save_pretrained(str(folder))
    out = tmp_path / "clip.gif"
    main(["generate", PROMPT, "--model", str(folder), "--method", "sparse", "--sparse-block", "16", "--size", "64",
          "--frames", "5", "--steps", "2", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "baseline | sparse rectified drop=0.8, 5 frames" in printed
    assert "drop 0.8 (rectified" in printed and "sparse in 4 of 4 layers from step 0" in printed
    frames = _gif_frames(out)
    assert len(frames) == 5 and frames[0].shape == (64 * 4 + 14, 2 * 64 * 4, 3)


def test_shipped_tiny_wan_runs_sparse_at_the_density_its_drop_rate_sets():
    """The frontends' settings for tiny-wan (testbed.defaults.TINY_WAN_SPARSE): at drop 0.75 the
    plans keep about a quarter of the key blocks (top-3 of 12, plus the first latent frame's
    blocks for its own rows); the official blocks of 128 with neighbours keep every block of so
    small a clip, which is why the testbed changes them."""
    import importlib.util
    from pathlib import Path

    from diffattn import testbed
    from diffattn.methods.registry import get_method
    from diffattn.testbed.defaults import TINY_WAN_SPARSE, method_defaults

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_quality.py"
    spec = importlib.util.spec_from_file_location("sparse_quality", path)
    sparse_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sparse_quality)  # its DensityRecorder: the benchmark's own density column

    pipe = testbed.load("tiny-wan")
    assert method_defaults("sparse", pipe) == TINY_WAN_SPARSE
    assert method_defaults("sparse", testbed.load("tiny-sd3")) == {}
    m = get_method("sparse")
    kw = dict(generator=torch.Generator().manual_seed(0), num_inference_steps=6)  # steps 0-4 dense (Wan)
    run = m.build(pipe, **{**method_defaults("sparse", pipe), "drop": 0.75})
    assert (run.control.block_size, run.control.neighbours, run.control.p_remain) == (64, False, 0.0)
    with sparse_quality.DensityRecorder() as rec:
        run(PROMPT, **kw)
    assert rec.shares and 0.25 <= min(rec.shares) and max(rec.shares) <= 0.45, rec.shares
    with sparse_quality.DensityRecorder() as official:
        m.build(pipe, drop=0.75)(PROMPT, **kw)  # the official block settings
    assert official.shares and min(official.shares) == 1.0
