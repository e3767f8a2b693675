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
