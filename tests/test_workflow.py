"""Workflow files (diffattn.workflow, ``diffattn run``): each example equals the same controls
attached by hand; malformed workflows give a WorkflowError naming the node and field."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattn import attach
from diffattn.errors import WorkflowError
from diffattn.methods.softpag import SoftPAG
from diffattn.methods.uniform import UniformAttention
from diffattn.workflow import CONTROL_NODES, load_workflow, run_workflow

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.json"))
BY_HAND = {
    "softpag.json": lambda: [SoftPAG({"transformer_blocks.3.attn": "all"}, strength=1.0, scale=2.0)],
    "softpag_uniform.json": lambda: [
        SoftPAG({"transformer_blocks.1.attn": "all", "transformer_blocks.2.attn": [0, 1]}, strength=0.5, scale=2.0),
        UniformAttention("auto", strength=0.3)],
}


@pytest.fixture(scope="module")
def testbed_pipe():
    from diffattn import testbed

    return testbed.load("tiny-sd3")


def test_every_example_is_checked_here():
    assert {p.name for p in EXAMPLES} == set(BY_HAND)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_equals_controls_attached_by_hand(path, testbed_pipe):
    wf = load_workflow(path)
    assert wf.model == "tiny-sd3"
    got = run_workflow(wf, lambda name: testbed_pipe).images[0]
    s = wf.sampling
    with attach(testbed_pipe, *BY_HAND[path.name]()):
        ref = testbed_pipe(s["prompt"], generator=torch.Generator().manual_seed(s["seed"]),
                           num_inference_steps=s["steps"], guidance_scale=s["guidance"]).images[0]
    assert np.array_equal(np.asarray(got), np.asarray(ref))
    plain = testbed_pipe(s["prompt"], generator=torch.Generator().manual_seed(s["seed"]),
                         num_inference_steps=s["steps"], guidance_scale=s["guidance"]).images[0]
    assert not np.array_equal(np.asarray(got), np.asarray(plain))  # the controls did something


def _wf(**over):
    base = {"model": "tiny-sd3", "controls": [{"node": "SoftPAG", "heads": "mid", "strength": 1, "scale": 2}],
            "sampling": {"prompt": "a red circle", "seed": 0, "steps": 2, "guidance": 4.0}}
    base.update(over)
    return base


@pytest.mark.parametrize("workflow, words", [
    (_wf(controls=[{"node": "Isolation"}]), ["controls[0]", "'node'", "Isolation", "SoftPAG"]),
    (_wf(controls=[{"heads": "mid"}]), ["controls[0]", "'node'", "missing"]),
    (_wf(controls=[{"node": "SoftPAG", "strength": 2}]), ["controls[0] (SoftPAG)", "'strength'", "[0"]),
    (_wf(controls=[{"node": "SoftPAG", "strength": "lots"}]), ["controls[0] (SoftPAG)", "'strength'", "number"]),
    (_wf(controls=[{"node": "SoftPAG", "sclae": 2}]), ["controls[0] (SoftPAG)", "'sclae'", "scale"]),
    (_wf(controls=[{"node": "UniformAttention", "mode": "both"}]), ["(UniformAttention)", "'mode'", "share"]),
    (_wf(controls=[{"node": "SoftPAG", "heads": 3}]), ["(SoftPAG)", "'heads'", "text"]),
    ({k: v for k, v in _wf().items() if k != "model"}, ["'model'", "missing"]),
    (_wf(model=""), ["'model'", "missing"]),
    (_wf(sampling={"seed": 0}), ["'prompt'", "missing"]),
    (_wf(sampling={"prompt": "x", "steps": 2.5}), ["'steps'", "int"]),
    (_wf(sampling={"prompt": "x", "stepz": 2}), ["'stepz'", "unknown"]),
    (_wf(controls={"node": "SoftPAG"}), ["'controls'", "list"]),
    (_wf(extra=1), ["'extra'"]),
    (_wf(sampling={"prompt": "x", "guidance": float("nan")}), ["'guidance'", "not finite"]),
    (_wf(sampling={"prompt": "x", "guidance": float("inf")}), ["'guidance'", "not finite"]),
    (_wf(sampling={"prompt": "x", "steps": float("inf")}), ["'steps'", "not finite"]),
    (_wf(sampling={"prompt": "x", "seed": 2**70}), ["'seed'", "2**64 - 1"]),
    (_wf(sampling={"prompt": "x", "seed": 10**400}), ["'seed'", "out of range"]),
    (_wf(sampling={"prompt": "x", "seed": -1}), ["'seed'", "out of range"]),
    (_wf(sampling={"prompt": "x", "height": 0}), ["'height'", "at least 1"]),
    (_wf(sampling={"prompt": "x", "guidance": -1}), ["'guidance'", "at least 0"]),
    (_wf(sampling={"prompt": "   "}), ["'prompt'", "empty"]),
])
def test_malformed_workflow_names_the_node_and_field(workflow, words):
    with pytest.raises(WorkflowError) as e:
        load_workflow(workflow)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert isinstance(e.value, ValueError)


def test_bad_json_and_missing_file(tmp_path):
    p = tmp_path / "w.json"
    p.write_text("{not json")
    with pytest.raises(WorkflowError, match="not valid JSON"):
        load_workflow(p)
    with pytest.raises(WorkflowError, match="cannot read"):
        load_workflow(tmp_path / "absent.json")


def test_selector_matching_nothing_names_the_node(testbed_pipe):
    wf = load_workflow(_wf(controls=[{"node": "SoftPAG", "heads": "transformer_blocks.9"}]))
    with pytest.raises(WorkflowError, match=r"controls\[0\] \(SoftPAG\) field 'heads'"):
        run_workflow(wf, lambda name: testbed_pipe)


def test_nan_in_the_json_text_is_refused():
    """JSON readers take NaN / Infinity: the workflow's numbers must still be finite."""
    text = '{"model": "tiny-sd3", "sampling": {"prompt": "x", "guidance": NaN}}'
    with pytest.raises(WorkflowError, match="'guidance': nan is not finite"):
        load_workflow(text)


def test_uniform_sites_matching_nothing_names_the_node_and_field(testbed_pipe):
    """A UniformAttention ``sites`` selector resolves while the controls are built, so the error
    names the control and its field (not only at attach)."""
    wf = load_workflow(_wf(controls=[{"node": "UniformAttention", "sites": "transformer_blocks.9"}]))
    with pytest.raises(WorkflowError, match=r"controls\[0\] \(UniformAttention\) field 'sites'.*names no site"):
        run_workflow(wf, lambda name: testbed_pipe)
    from diffattn.sites import sites

    (ctl,) = load_workflow(_wf(controls=[{"node": "UniformAttention", "sites": "transformer_blocks.1"}])) \
        .build_controls(sites(testbed_pipe))
    assert isinstance(ctl, UniformAttention)


def test_unloadable_model_names_the_model_field():
    def loader(name):
        from diffattn.errors import ModelLoadError

        raise ModelLoadError(f"unknown model {name!r}")

    with pytest.raises(WorkflowError, match="field 'model'.*nope"):
        run_workflow(_wf(model="nope"), loader)


def test_node_names_are_shared_with_the_method_registry():
    from diffattn.comfy.nodes import NODE_CLASS_MAPPINGS
    from diffattn.methods.registry import get_method

    sp = CONTROL_NODES["SoftPAG"]
    assert {p.name for p in get_method("softpag").params} <= {p.name for p in sp.params}
    for node in CONTROL_NODES.values():
        req = NODE_CLASS_MAPPINGS["Diffattn" + node.name].INPUT_TYPES()["required"]
        assert list(req)[1:] == [p.name for p in node.params]


def test_cli_run(tmp_path, capsys):
    from diffattn.cli import main

    out = tmp_path / "r.png"
    wf = tmp_path / "w.json"
    wf.write_text(json.dumps(_wf()))
    main(["run", str(wf), "--out", str(out)])
    assert out.is_file() and "wrote" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_wf(controls=[{"node": "Nope"}])))
    fresh = tmp_path / "never.png"  # not the --out written above: "no file written" can be checked
    with pytest.raises(SystemExit) as e:
        main(["run", str(bad), "--out", str(fresh)])
    assert e.value.code == 2 and "'node'" in capsys.readouterr().err
    assert not fresh.exists()
    # the model-dependent checks come before anything is sampled
    bad.write_text(json.dumps(_wf(sampling={"prompt": "a red circle", "steps": 2, "height": 50})))
    with pytest.raises(SystemExit) as e:
        main(["run", str(bad), "--out", str(fresh)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'height'" in err and "multiples of 8" in err and "Traceback" not in err
    assert not fresh.exists()
