"""The measurement helpers of benchmark scripts whose figures RESULTS.md records."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(found, color_found, matched, detected, prompt="a red circle and a blue square"):
    objects = [{"shape": s, "color": c} for c, s in detected]
    return {"prompt": prompt, "found": found, "color_found": color_found, "matched": matched,
            "parsed": {"objects": objects}, "all_present": all(found)}


def test_failure_classes_and_neglect_ceiling():
    failures = load("astar_failures")
    ok = record([True, True], [True, True], [0, 1], [("red", "circle"), ("blue", "square")])
    absent = record([True, False], [True, False], [0, None], [("red", "circle")])
    leak = record([True, False], [True, False], [0, 1], [("red", "circle"), ("red", "square")])
    shape = record([True, False], [True, True], [0, 1], [("red", "circle"), ("blue", "blob")])
    assert failures.classify(absent) == ["absent"]
    assert failures.classify(leak) == ["colour leak"]
    assert failures.classify(shape) == ["wrong shape"]
    b = failures.breakdown([ok, absent, leak, shape])
    assert (b["failed"], b["absent"], b["colour leak"], b["wrong shape"]) == (3, 1, 1, 1)
    assert b["neglect ceiling"] == pytest.approx(1 / 4)  # only the image whose miss is an absence


def test_strip_layout_and_rate():
    pytest.importorskip("diffusers")
    from types import SimpleNamespace

    evaluation = load("astar_eval")
    masks = evaluation.strip_layout(3, size=6)
    assert masks.sum(0).eq(1).all() and masks[0, :, :2].all() and masks[2, :, 4:].all()
    objs = [SimpleNamespace(cx=10.0), SimpleNamespace(cx=50.0)]
    inside = SimpleNamespace(all_present=True, matched=[0, 1], parsed=SimpleNamespace(objects=objs))
    swapped = SimpleNamespace(all_present=True, matched=[1, 0], parsed=SimpleNamespace(objects=objs))
    missing = SimpleNamespace(all_present=False, matched=[0, None], parsed=SimpleNamespace(objects=objs))
    assert evaluation.strip_rate([inside, swapped, missing]) == (0.5, 2)


def test_sparse_quality_similarity_and_density_recorder():
    """benchmarks/sparse_quality.py: the clip PSNR is that of the clip's mean squared error,
    SSIM is 1 on identical clips, and the density recorder reads the kept share of each plan
    RectifiedSparseAttention builds and restores the planner."""
    import numpy as np
    import torch

    from diffattn.methods import spaattn
    from diffattn.kernels.sparse import block_sparse_plan

    sq = load("sparse_quality")
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    other = clip.copy()
    other[0, 0, 0, 0] = 255 - other[0, 0, 0, 0]
    p, s = sq.clip_similarity(clip, clip)
    assert p == float("inf") and s == pytest.approx(1.0)
    mse = ((clip.astype(float) - other.astype(float)) / 255) ** 2
    p, _ = sq.clip_similarity(other, clip)
    assert p == pytest.approx(10 * np.log10(1 / mse.mean()))
    q = k = v = torch.randn(1, 2, 64, 8)  # 4 query and key blocks of 16
    with sq.DensityRecorder() as rec:
        spaattn.block_sparse_plan(q, k, v, block_q=16, top_k=1, p_remain=0.0, mode="vanilla")
        spaattn.block_sparse_plan(q, k, v, block_q=16, top_k=2, p_remain=0.0, mode="random",
                                  generator=torch.Generator().manual_seed(0))
    assert rec.shares == [pytest.approx(0.25), pytest.approx(0.5)]
    assert spaattn.block_sparse_plan is block_sparse_plan


def test_sparse_quality_paired_orderings():
    """benchmarks/sparse_quality.py pairs conditions clip by clip: the PSNR difference is the mean
    of per-clip differences, infinite-PSNR clips (equal to dense) leave only the PSNR pairs, the
    win share counts clips where the first is closer, and rows of different clips are refused."""
    sq = load("sparse_quality")

    def row(psnrs, ssims, seeds=(1, 2, 3)):
        return {"per_clip": [dict(seed=s, psnr=p, ssim=q) for s, p, q in zip(seeds, psnrs, ssims)]}

    a = row([40.0, 30.0, float("inf")], [0.99, 0.90, 1.0])
    b = row([38.0, 31.0, 35.0], [0.98, 0.92, 0.97])
    d = sq.paired_similarity(a, b)
    assert d["psnr_pairs"] == 2 and d["psnr"]["value"] == pytest.approx(0.5)
    assert d["psnr_wins"] == pytest.approx(0.5)
    assert d["ssim"]["value"] == pytest.approx((0.01 - 0.02 + 0.03) / 3)
    assert d["psnr"]["low"] <= d["psnr"]["value"] <= d["psnr"]["high"]
    with pytest.raises(ValueError, match="different \(or no\) clips"):
        sq.paired_similarity(a, row([1, 2, 3], [1, 1, 1], seeds=(1, 2, 4)))
    text = sq.paired_table({"dense": {}, "rectified 0.5": a, "vanilla 0.5": b, "random 0.5": b})
    assert "rectified − vanilla @ 0.5 | 0.50 [" in text and "vanilla − random @ 0.5 | 0.00 [" in text
    assert len(text.splitlines()) == 2 + 3  # header + the three orderings of the one drop rate


def test_peak_rss_rise_sees_a_call_after_a_larger_earlier_peak():
    """evaluate.peak_rss_rise_mib resets the peak mark: a 64 MiB call after a freed 256 MiB
    buffer reads about 64 MiB (a rise over ru_maxrss would read 0), a call that allocates
    nothing about 0."""
    import numpy as np

    from diffattn.testbed.evaluate import peak_rss_rise_mib

    try:
        peak_rss_rise_mib(lambda: None)
    except OSError as e:
        pytest.skip(f"no resettable peak-RSS mark here (/proc/self/clear_refs): {e}")
    big = np.ones(256 * 2**20, dtype=np.uint8)  # touched: resident
    del big

    def touch(mib):
        a = np.ones(mib * 2**20, dtype=np.uint8)
        return int(a[::4096].sum())

    value, rise = peak_rss_rise_mib(touch, 64)
    assert value == 64 * 2**20 // 4096 and 56 < rise < 96
    assert peak_rss_rise_mib(lambda: 1)[1] < 8


def test_decontext_cost_times_every_method_on_the_tiny_editor(tmp_path, capsys):
    """benchmarks/decontext_cost.py on the tiny-kontext architecture: one row per method, with
    the step count it ran and positive times (the random baseline has no PGD step)."""
    import json

    cost = load("decontext_cost")
    out = tmp_path / "cost.json"
    cost.main(["--steps", "2", "--size", "32", "--methods", "decontext,random", "--threads", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert "| decontext |" in table and "| random |" in table and "2 PGD steps" in table
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"decontext", "random"} and rows["decontext"]["seconds"][0] > 0
    assert len(rows["decontext"]["peak_rss_mib"]) == 1
