"""The method registry (diffattn.methods.registry), the objective registry and the error classes."""
from __future__ import annotations

import pytest
import torch

import diffattn as da
from diffattn import errors
from diffattn.errors import DiffattnError, MethodError, UnknownMethodError
from diffattn.methods.registry import Method, MethodRun, Param, get_method, methods, register_method


def test_builtin_methods_are_registered_with_their_parameters():
    names = [m.name for m in methods()]
    assert names[:2] == ["softpag", "astar"]
    softpag, astar = get_method("softpag"), get_method("astar")
    assert softpag.kind == "control" and astar.kind == "pipeline"
    assert [p.name for p in softpag.params] == ["heads", "scale", "strength", "target", "semantics"]
    assert [p.name for p in astar.params] == ["concepts", "loss", "temperature", "text_keys", "center_tokens"]
    assert astar.param("text_keys").cli_flag == "--astar-text-keys" and astar.param("center_tokens").type is bool
    assert astar.param("loss").choices == ("astar", "ae", "segregation", "retention")
    assert astar.param("loss").cli_flag == "--astar-loss" and softpag.param("heads").cli_flag == "--heads"
    assert softpag.defaults() == {"heads": "mid", "scale": None, "strength": None, "target": "identity",
                                  "semantics": "joint"}
    assert da.get_method is get_method and da.Param is Param and da.Method is Method


def test_unknown_names_and_bad_values_are_method_errors():
    with pytest.raises(UnknownMethodError, match="unknown method 'nope'.*softpag, astar") as e:
        get_method("nope")
    assert isinstance(e.value, KeyError) and isinstance(e.value, DiffattnError) and "'" not in str(e.value)[:1]
    softpag, astar = get_method("softpag"), get_method("astar")
    with pytest.raises(MethodError, match="no parameter.*'concepts'.*heads, scale, strength"):
        softpag.resolve(concepts="cat")
    with pytest.raises(MethodError, match=r"strength=1.5: must lie in \[0.0, 1.0\]"):
        softpag.resolve(strength=1.5)
    with pytest.raises(MethodError, match="loss='nope': choose one of astar, ae"):
        astar.resolve(loss="nope")
    assert softpag.resolve(scale="3") == {"heads": "mid", "scale": 3.0, "strength": None, "target": "identity",
                                          "semantics": "joint"}
    with pytest.raises(MethodError, match="center_tokens='maybe': expected true or false"):
        astar.resolve(center_tokens="maybe")
    assert astar.resolve(center_tokens="true")["center_tokens"] is True
    assert isinstance(MethodError("x"), ValueError)


def test_register_method_checks_the_record():
    def factory(pipe, *, k=1):
        return MethodRun(f"k={k}", lambda prompt, generator=None, **kw: None)

    m = Method("tmp-method", "Tmp", "a test method", "control", (Param("k", int, 1, "k", range=(0, 3)),), factory)
    try:
        assert register_method(m) is m and get_method("tmp-method").build(None, k="2").label == "k=2"
        with pytest.raises(MethodError, match="registered already"):
            register_method(Method("tmp-method", "Other", "", "control", (), factory))
        with pytest.raises(MethodError, match="kind"):
            register_method(Method("tmp-2", "T", "", "sampler", (), factory))
        with pytest.raises(MethodError, match="twice"):
            register_method(Method("tmp-2", "T", "", "control", (Param("a"), Param("a")), factory))
    finally:
        from diffattn.methods import registry

        registry._METHODS.pop("tmp-method", None)


def test_softpag_record_builds_the_control_the_cli_runs(tiny_pipe):
    from diffattn.methods.softpag import SoftPAG, middle_layer

    pipe = tiny_pipe("sd3")
    run = get_method("softpag").build(pipe, scale=3.0, strength=0.5)
    assert isinstance(run.control, SoftPAG) and run.label == "softpag s=3 u=0.5" and run.pipeline is None
    kw = dict(num_inference_steps=2, height=16, width=16, max_sequence_length=8, output_type="pt")
    out = run("a red circle", generator=torch.Generator().manual_seed(0), **kw)
    with da.attach(pipe, SoftPAG(middle_layer(pipe), strength=0.5, scale=3.0)):
        ref = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(out.images, ref) and out.maps == []


def test_objective_registry():
    import diffattn.testbed  # noqa: F401  (registers fidelity, dark, outline)
    from diffattn.errors import ObjectiveError
    from diffattn.methods.objectives import objective_names, register_objective
    from diffattn.testbed.objectives import oracle_fidelity

    assert {"clip", "pickscore", "fidelity", "dark", "outline"} <= set(objective_names())
    assert da.make_objective("fidelity") is oracle_fidelity
    assert da.make_objective("dark").name == "oracle_style('dark', wanted=True)"
    mine = lambda images, prompts: [0.0] * len(images)  # noqa: E731
    assert da.make_objective(mine) is mine
    with pytest.raises(ObjectiveError, match="unknown objective 'nope'; choose one of .*pickscore"):
        da.make_objective("nope")
    with pytest.raises(ObjectiveError, match="registered already"):
        register_objective("clip", lambda **_: mine)


def test_every_error_lives_in_diffattn_errors_with_its_category():
    from diffattn.kernels import KernelError
    from diffattn.methods.astar import ConceptError
    from diffattn.methods.headhunter import ObjectiveError
    from diffattn.pipelines import EditPromptError, ImageInputError
    from diffattn.pipelines.uam import UAMConfig

    assert ConceptError is errors.ConceptError and ObjectiveError is errors.ObjectiveError
    assert ImageInputError is errors.ImageInputError and EditPromptError is errors.EditPromptError
    assert KernelError is errors.KernelError
    categories = {"SelectorError": KeyError, "UnsupportedModelError": TypeError, "ControlError": ValueError,
                  "ConfigError": ValueError, "LayoutError": ValueError, "ConceptError": ValueError,
                  "ObjectiveError": ValueError, "ImageInputError": ValueError, "EditPromptError": ValueError,
                  "KernelError": ValueError, "MethodError": ValueError, "UnknownMethodError": KeyError,
                  "UsageError": ValueError, "LimitError": ValueError, "PathError": OSError, "ModelLoadError": OSError,
                  "WorkflowError": ValueError}
    for name, category in categories.items():
        cls = getattr(errors, name)
        assert issubclass(cls, DiffattnError) and issubclass(cls, category), name
        assert getattr(da, name) is cls, name  # exported
    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert defined == set(categories) | {"DiffattnError"}
    with pytest.raises(errors.ConfigError, match="quantile"):
        UAMConfig(quantile=2.0).validate()
    assert issubclass(errors.ConfigError, errors.ControlError)  # code catching ControlError keeps working


def test_a_parameter_may_not_shadow_a_frontend_input():
    from diffattn.app.tabs.generic import STANDARD
    from diffattn.methods.registry import RESERVED_PARAMS

    assert set(STANDARD) <= set(RESERVED_PARAMS)  # the app's standard inputs are all reserved
    bad = Method(name="shadowing", label="x", summary="x", kind="control", params=(Param("seed", int, 0, "x"),),
                 factory=lambda pipe, **kw: None)
    with pytest.raises(MethodError, match="shadow"):
        register_method(bad)
