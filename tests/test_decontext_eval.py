"""benchmarks/decontext_eval.py on an untrained tiny-kontext ("tiny" preset): the protocol's
bookkeeping (files saved and reloaded, budgets held on the files, resume, typed errors), not the
effect (that needs the trained editor; RESULTS.md)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffattn.errors import UsageError
from diffattn.testbed import edits, kontext_models

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module():
    spec = importlib.util.spec_from_file_location("decontext_eval", BENCHMARKS / "decontext_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ev():
    return _module()


@pytest.fixture(scope="module")
def editor():
    return kontext_models.build_kontext("tiny")


RUN = dict(images=2, seeds=1, methods=["decontext", "random"], eps=[8.0], steps=2, edit_steps=2, batch=2,
           progress=False)


def test_edit_seeds_are_distinct_and_seed_zero_is_the_pairs_own(ev):
    pairs = edits.eval_edit_pairs(3)
    seeds = {ev.edit_seed(p.seed, k) for p in pairs for k in range(3)}
    assert len(seeds) == 9
    assert all(ev.edit_seed(p.seed, 0) == p.seed for p in pairs)


def test_the_eot_pool_holds_no_evaluated_instruction(ev):
    held_out = [p.instruction for p in edits.eval_edit_pairs(20)]
    pool = ev.eot_pool(held_out, n=30)
    assert len(pool) == len(set(pool)) == 30
    assert not set(pool) & set(held_out)


def test_parsers_reject_bad_lists(ev):
    assert ev.parse_eps_list("4,8,12.75") == [4.0, 8.0, 12.75]
    assert ev.parse_methods("decontext,random") == ["decontext", "random"]
    for bad in ("", "0", "-4", "nan", "x"):
        with pytest.raises(Exception):
            ev.parse_eps_list(bad)
    with pytest.raises(Exception):
        ev.parse_methods("decontext,photoguard")


def test_a_run_saves_reloads_holds_the_budget_and_resumes(ev, editor, tmp_path):
    out, path = tmp_path / "out", tmp_path / "rows.json"
    doc = ev.run_eval(editor, out_dir=out, json_path=path, **RUN)
    assert [(r["method"], r["eps_255"]) for r in doc["rows"]] == [("decontext", 8.0), ("random", 8.0)]
    pairs = edits.eval_edit_pairs(2)
    for row in doc["rows"]:
        folder = ev.row_dir(out, row["method"], row["eps_255"])
        assert row["n_edits"] == 2 and len(row["edits"]) == 2
        # the budget holds on the saved files, measured against the saved clean render
        for p in pairs:
            clean = np.asarray(Image.open(out / "clean" / f"{p.seed}.png"), dtype=np.int32)
            prot = np.asarray(Image.open(folder / "protected" / f"{p.seed}.png"), dtype=np.int32)
            assert prot.shape == clean.shape == (64, 64, 3)
            assert np.abs(prot - clean).max() <= row["eps_levels"]
            assert (folder / "edits" / f"{p.seed}_s0.png").is_file()
        assert row["linf_levels_max"] <= row["eps_levels"] == 8
        assert 0 <= row["success_protected"]["value"] <= 1
        assert set(row["r_ctx"]) == {"clean", "protected"} and row["r_ctx"]["clean"]
        for e in row["edits"]:
            assert set(e["clean"]) == {"changed", "preserved", "success", "unreadable"}
    assert doc["rows"][1]["steps"] == 0  # random sign noise takes no gradient steps
    # random ±ε noise is exactly at the budget wherever the clean pixel leaves room
    assert doc["rows"][1]["linf_levels_max"] == 8

    saved = json.loads(path.read_text())
    assert len(saved["rows"]) == 2
    again = ev.run_eval(editor, out_dir=out, json_path=path, resume=True, **RUN)  # nothing left to do
    assert [r["psnr"] for r in again["rows"]] == [r["psnr"] for r in doc["rows"]]

    with pytest.raises(UsageError, match="other settings"):
        ev.run_eval(editor, out_dir=out, json_path=path, resume=True, **{**RUN, "steps": 3})
    with pytest.raises(UsageError, match="--resume"):
        ev.run_eval(editor, out_dir=out, json_path=path, **RUN)  # would silently replace finished rows

    table = ev.markdown_table(doc["rows"])
    assert table.count("\n") >= 3 and "decontext" in table
    grid = ev.grid(doc, out, 8.0, n_images=2)
    assert grid.size[0] > 64 and grid.size[1] >= 2 * 64
    assert ev.plot_rctx(doc, tmp_path / "rctx.png", 8.0).is_file()


def test_bad_arguments_are_usage_errors(ev, editor, tmp_path):
    with pytest.raises(UsageError, match="at least 1"):
        ev.run_eval(editor, out_dir=tmp_path, **{**RUN, "images": 0})
    with pytest.raises(UsageError, match="--json"):
        ev.run_eval(editor, out_dir=tmp_path, resume=True, **RUN)
