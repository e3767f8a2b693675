"""repr() / str() of every public control and pipeline config: short, and never recursing
(SoftPAG's site filter is a bound method of itself; Control.__repr__ once printed it)."""
from __future__ import annotations

import pytest


def _controls():
    import diffattn as da
    from diffattn.controls import StepWindow
    from diffattn.methods.astar import ConceptRecorder

    return [
        da.Control(),
        da.Control(sites=lambda s: True, heads={"transformer_blocks.0.attn": [0]}, steps=(0, 3), branches="cond"),
        da.SoftPAG("all"),
        da.SoftPAG({"transformer_blocks.2.attn": [0, 3]}, strength=0.5, scale=2.0, target="uniform", semantics="image",
                   steps=StepWindow(0, 5), sequential=True),
        da.SoftPAG({"model": "tiny-sd3", "heads": [["transformer_blocks.1.attn", h, 1.0] for h in range(4)] * 2,
                    "scale": 2.0}),
        da.SoftPAG("all", schedule=lambda step: 1.0),
        da.UniformAttention(),
        da.UniformAttention("cross", 0.5),
        da.PromptToPromptReplace(),
        ConceptRecorder("all"),
    ]


def test_repr_of_every_public_control():
    for control in _controls():
        text = repr(control)
        assert text.startswith(type(control).__name__ + "(") and len(text) < 400, text
        assert str(control) == text


def test_softpag_repr_says_what_it_does():
    import diffattn as da

    text = repr(da.SoftPAG({"transformer_blocks.2.attn": [0, 3]}, strength=0.5, scale=2.0, target="uniform"))
    assert text == "SoftPAG(heads={'transformer_blocks.2.attn': [0, 3]}, strength=0.5, scale=2, target='uniform')"
    preset = {"model": "tiny-sd3", "heads": [["transformer_blocks.1.attn", h, 1.0] for h in range(4)] * 3, "scale": 2}
    assert "(12 heads)" in repr(da.SoftPAG(preset)) and "preset='tiny-sd3'" in repr(da.SoftPAG(preset))


def test_control_repr_names_callables_without_recursing():
    import diffattn as da

    class Mine(da.Control):
        def __init__(self):
            super().__init__(sites=self.where)

        def where(self, site):
            return True

    assert repr(Mine()) == "Mine(sites=<self.where>, heads='all', steps=None, branches=None)"


def test_repr_of_the_guidance_wrapper_when_present():
    import diffattn as da

    try:
        cls = da.SoftPAGGuidance
    except (AttributeError, ImportError):
        pytest.skip("no SoftPAGGuidance in this checkout")
    try:
        guider = cls()
    except TypeError:
        pytest.skip("SoftPAGGuidance needs arguments")
    assert isinstance(repr(guider), str)


def test_repr_of_the_pipeline_configs():
    from diffattn.pipelines.astar import AStarConfig
    from diffattn.pipelines.uam import UAMConfig

    for config in (AStarConfig(), AStarConfig.astar(), AStarConfig.attend_and_excite(), UAMConfig()):
        text = repr(config)
        assert text.startswith(type(config).__name__ + "(")


def test_repr_of_the_method_records():
    from diffattn.methods.registry import methods

    for m in methods():
        assert m.name in repr(m)


def test_public_constructors_refuse_values_that_would_do_nothing_or_explode(tiny_pipe):
    """The boundary checks of the Python API (the CLI's are in test_cli_bad_input.py)."""
    import math

    import pytest

    import diffattn as da

    pipe = tiny_pipe("sd3")

    def objective(images, prompts):
        return [0.0] * len(images)

    for kw, words in ((dict(top_k=0), "top_k=0"), (dict(top_k=-1), "top_k=-1"), (dict(rounds=0), "rounds=0"),
                      (dict(batch_size=0), "batch_size=0"), (dict(scale=math.nan), "scale=nan"),
                      (dict(strength=1.5), "strength=1.5"),
                      (dict(candidates=[]), "no candidate heads")):
        with pytest.raises(da.ControlError, match=words):
            da.HeadHunter(pipe, objective, ["a red circle"], [0], **kw)
    for sites in ([], (), "", None):
        with pytest.raises(da.ControlError, match="selects no site"):
            da.UniformAttention(sites)
