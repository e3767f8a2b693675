"""Edits of the shapes world: the instruction grammar, the pair sampler, the held-out split and
the edit oracle (diffattn.testbed.edits)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from diffattn.errors import EditPromptError, UsageError
from diffattn.testbed import edits
from diffattn.testbed.edits import (
    DIRECTIONS,
    EDIT_MIN_RADIUS,
    MOVE_RANGE,
    EditSpec,
    apply_edit,
    edit_instruction,
    parse_instruction,
    sample_edit,
    score_edit,
)
from diffattn.testbed.evaluate import EVAL_SEED_START
from diffattn.testbed.oracle import UNREADABLE, parse_v2
from diffattn.testbed.world import MIN_GAP, SIZE, Scene, SceneObject, render


def _scene(*objects, **kw) -> Scene:
    return Scene(objects=tuple(SceneObject(*o) if isinstance(o, tuple) else o for o in objects), **kw)


RED_CIRCLE = SceneObject("circle", "red", 18.0, 20.0, 10.0)
BLUE_SQUARE = SceneObject("square", "blue", 44.0, 42.0, 10.0, "stripes")
TWO = _scene(RED_CIRCLE, BLUE_SQUARE)


# ----------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("text, spec", [
    ("make the circle blue", EditSpec("recolour", "circle", color="blue")),
    ("make the red circle blue", EditSpec("recolour", "circle", "red", color="blue")),
    ("give the circle stripes", EditSpec("marking", "circle", marking="stripes")),
    ("give the square a dot", EditSpec("marking", "square", marking="dot")),
    ("give the square a shaded half", EditSpec("marking", "square", marking="half")),
    ("make the green triangle halved", EditSpec("marking", "triangle", "green", marking="half")),
    ("make the circle plain", EditSpec("marking", "circle", marking="none")),
    ("move the square to the left", EditSpec("move", "square", direction="left")),
    ("move the yellow triangle up", EditSpec("move", "triangle", "yellow", direction="up")),
    ("add a yellow triangle", EditSpec("add", color="yellow", shape="triangle")),
    ("add a dotted red square", EditSpec("add", color="red", shape="square", marking="dot")),
    ("remove the square", EditSpec("remove", "square")),
    ("  Remove   the Blue SQUARE. ", EditSpec("remove", "square", "blue")),
])
def test_instructions_parse_into_what_they_ask(text, spec):
    assert parse_instruction(text) == spec
    again = edit_instruction(spec, give_form=text.startswith("give"))
    assert parse_instruction(again) == spec  # the writer and the parser agree


@pytest.mark.parametrize("bad", ["make the circle purple", "move the circle sideways", "add a circle",
                                 "remove a square", "paint the circle blue", "make everything purple", "", 3])
def test_instructions_outside_the_grammar_are_usage_errors_naming_it(bad):
    with pytest.raises(UsageError, match="instructions: 'make the"):
        parse_instruction(bad)


def test_edit_words_extend_the_v2_vocabulary_and_instructions_are_short():
    from diffattn.testbed.world import vocabulary

    words = edits.edit_vocabulary()
    assert words == sorted(words) and not set(words) & set(vocabulary(2))
    assert {"make", "give", "move", "add", "remove", "stripes", "dot"} <= set(words)
    assert edits.max_instruction_words() == 7


# ----------------------------------------------------------------------------- sampling


def _inside_and_apart(scene: Scene) -> bool:
    objs = scene.objects
    inside = all(o.size + 1 - 1e-9 <= c <= SIZE - o.size - 1 + 1e-9 for o in objs for c in (o.cx, o.cy))
    apart = all(np.hypot(a.cx - b.cx, a.cy - b.cy) > a.size + b.size + MIN_GAP
                for i, a in enumerate(objs) for b in objs[:i])
    return inside and apart


def test_pairs_change_only_what_the_instruction_asks():
    pairs = edits.edit_pairs(range(300))
    assert sample_edit(7) == pairs[7]  # deterministic from the seed
    kinds = {p.spec.kind for p in pairs}
    assert kinds == set(edits.EDIT_KINDS)
    for p in pairs:
        s, t = p.source, p.target
        assert parse_instruction(p.instruction) == p.spec
        assert (s.background, s.outline, s.shadow, s.light) == (t.background, t.outline, t.shadow, t.light)
        assert min(o.size for o in s.objects + t.objects) >= EDIT_MIN_RADIUS
        assert 1 <= len(t.objects) <= 3 and _inside_and_apart(t)
        assert len({(o.color, o.shape) for o in t.objects}) == len(t.objects)
        if p.spec.kind == "add":
            assert t.objects[:-1] == s.objects and len(t.objects) == len(s.objects) + 1
            new = t.objects[-1]
            assert (new.color, new.shape) == (p.spec.color, p.spec.shape)
            assert p.spec.marking in (None, new.marking)
            continue
        i = p.referent
        assert i == edits.resolve_referent(parse_instruction(p.instruction), s.objects)
        if p.spec.kind == "remove":
            assert t.objects == s.objects[:i] + s.objects[i + 1:]
            continue
        assert t.objects[:i] + t.objects[i + 1:] == s.objects[:i] + s.objects[i + 1:]  # untouched: identical
        a, b = s.objects[i], t.objects[i]
        if p.spec.kind == "recolour":
            assert b == replace(a, color=p.spec.color) and a.color != b.color
        elif p.spec.kind == "marking":
            assert b == replace(a, marking=p.spec.marking) and a.marking != b.marking
        else:
            dx, dy = DIRECTIONS[p.spec.direction]
            along = (b.cx - a.cx) * dx + (b.cy - a.cy) * dy
            assert MOVE_RANGE[0] <= along <= MOVE_RANGE[1]
            assert b == replace(a, cx=b.cx, cy=b.cy) and abs((b.cx - a.cx) * dy - (b.cy - a.cy) * dx) < 1e-9


def test_the_referent_names_its_colour_when_the_shape_is_shared():
    for p in edits.edit_pairs(range(200)):
        if p.spec.ref_shape is not None and sum(o.shape == p.spec.ref_shape for o in p.source.objects) > 1:
            assert p.spec.ref_color is not None, p.instruction


def test_training_and_evaluation_pairs_come_from_disjoint_seed_ranges():
    train = edits.train_edit_seeds(1000, offset=EVAL_SEED_START - 1000)
    held = edits.eval_edit_seeds(1000)
    assert max(train) < EVAL_SEED_START <= min(held) and not set(train) & set(held)
    with pytest.raises(UsageError, match="evaluation seeds start"):
        edits.train_edit_seeds(10, offset=EVAL_SEED_START - 5)
    with pytest.raises(UsageError):
        sample_edit(-1)
    assert [p.seed for p in edits.eval_edit_pairs(3)] == held[:3]


def test_edits_that_cannot_be_made_are_edit_prompt_errors():
    two_circles = _scene(RED_CIRCLE, SceneObject("circle", "blue", 46.0, 44.0, 10.0))
    with pytest.raises(EditPromptError, match="ambiguous.*'the red circle' or 'the blue circle'"):
        apply_edit(two_circles, "make the circle green")
    with pytest.raises(EditPromptError, match="holds the red circle, the blue square"):
        apply_edit(TWO, "remove the triangle")
    with pytest.raises(EditPromptError, match="already red"):
        apply_edit(TWO, "make the circle red")
    with pytest.raises(EditPromptError, match="already holds one"):
        apply_edit(TWO, "add a blue square")
    with pytest.raises(EditPromptError, match="already striped"):
        apply_edit(TWO, "give the square stripes")
    with pytest.raises(EditPromptError, match="leave no object"):
        apply_edit(_scene(RED_CIRCLE), "remove the circle")
    edge = _scene(SceneObject("circle", "red", 11.5, 30.0, 10.0))
    with pytest.raises(EditPromptError, match="no room to move"):
        apply_edit(edge, "move the circle to the left")
    assert apply_edit(edge, "move the circle to the right", seed=3).objects[0].cx > 21


# ----------------------------------------------------------------------------- the edit oracle


def test_oracle_grades_clean_renders_of_500_held_out_pairs():
    """The acceptance check: the exact answer succeeds on >= 99% and the unedited image is never
    an edit (``changed is False``)."""
    r = edits.oracle_edit_accuracy(500)
    assert r["success"] >= 0.99, r["failed"]
    assert r["unchanged"] == 1.0, r["failed"]


def _grade(instruction, target_scene, source=TWO):
    return score_edit(source, instruction, render(target_scene))


def test_oracle_fails_edits_that_did_not_happen_or_touched_other_objects():
    blue = replace(RED_CIRCLE, color="blue")
    ok = _grade("make the circle blue", _scene(blue, BLUE_SQUARE))
    assert ok.success and ok.changed and ok.preserved and ok.readable
    wrong_object = _grade("make the circle blue", _scene(RED_CIRCLE, replace(BLUE_SQUARE, color="green")))
    assert wrong_object.changed is False and wrong_object.preserved is False and wrong_object.leftover == 1
    shifted = _grade("make the circle blue", _scene(blue, replace(BLUE_SQUARE, cx=BLUE_SQUARE.cx - 5)))
    assert shifted.changed and shifted.preserved is False  # 5 px > POSITION_TOLERANCE
    nudged = _grade("make the circle blue", _scene(blue, replace(BLUE_SQUARE, cx=BLUE_SQUARE.cx - 1.5)))
    assert nudged.success  # within the tolerance
    remarked = _grade("make the circle blue", _scene(replace(blue, marking="dot"), BLUE_SQUARE))
    assert remarked.changed is False  # the referent changed more than asked
    lost_marking = _grade("make the circle blue", _scene(blue, replace(BLUE_SQUARE, marking="none")))
    assert lost_marking.changed and lost_marking.preserved is False
    extra = _grade("make the circle blue", _scene(blue, BLUE_SQUARE, SceneObject("triangle", "yellow", 48, 14, 9)))
    assert extra.changed and extra.preserved is False and extra.extra_objects == 1


def test_oracle_grades_moves_adds_and_removals():
    left = _grade("move the square to the left", _scene(RED_CIRCLE, replace(BLUE_SQUARE, cx=BLUE_SQUARE.cx - 12)))
    assert left.success
    short = _grade("move the square to the left", _scene(RED_CIRCLE, replace(BLUE_SQUARE, cx=BLUE_SQUARE.cx - 4)))
    assert short.changed is False  # under MOVE_MIN_SHIFT
    wrong_way = _grade("move the square up", _scene(RED_CIRCLE, replace(BLUE_SQUARE, cx=BLUE_SQUARE.cx - 12)))
    assert wrong_way.changed is False
    added = _scene(RED_CIRCLE, BLUE_SQUARE, SceneObject("triangle", "yellow", 48, 14, 9, "dot"))
    assert _grade("add a yellow triangle", added).success
    assert _grade("add a dotted yellow triangle", added).success
    assert _grade("add a striped yellow triangle", added).changed is False
    assert _grade("add a green triangle", added).changed is False
    assert _grade("remove the circle", _scene(BLUE_SQUARE)).success
    kept = _grade("remove the circle", TWO)
    assert kept.changed is False and kept.leftover == 1 and kept.preserved is True


def test_unreadable_markings_are_reported_never_guessed():
    target = _scene(RED_CIRCLE, replace(BLUE_SQUARE, marking="dot"))
    parsed = parse_v2(render(target))
    square = next(o for o in parsed.objects if o.shape == "square")
    square.marking = UNREADABLE  # as a blurred generated image leaves it
    s = score_edit(TWO, "give the square a dot", None, parsed=parsed)
    assert s.changed is None and s.preserved is True and not s.success
    assert s.unreadable == ["marking of the blue square"]
    circle = next(o for o in parsed.objects if o.shape == "circle")
    circle.marking = UNREADABLE
    square.marking = "stripes"
    s = score_edit(TWO, "give the square a dot", None, parsed=parsed)
    assert s.changed is False and s.preserved is None  # a read failure beats an unreadable doubt
    m = edits.edit_metrics([s])
    assert m["unreadable_rate"].value == 1.0 and m["success"].value == 0.0


def test_an_image_source_grades_like_its_scene():
    for p in edits.eval_edit_pairs(20, offset=500):
        a = score_edit(p.source, p.instruction, render(p.target))
        b = score_edit(render(p.source), p.instruction, render(p.target))
        assert a.success and b.success, p.instruction
    with pytest.raises(EditPromptError):
        score_edit(TWO, "remove the triangle", render(TWO))


def test_suite_metrics_carry_wilson_intervals():
    pairs = edits.eval_edit_pairs(4)
    scores = [score_edit(p.source, p.instruction, render(p.target)) for p in pairs[:3]]
    scores.append(score_edit(pairs[3].source, pairs[3].instruction, render(pairs[3].source)))
    m = edits.edit_metrics(scores)
    assert m["success"].value == 0.75 and m["success"].n == 4
    assert 0 < m["success"].low < 0.75 < m["success"].high <= 1
    assert sum(m[f"success/{k}"].n for k in edits.EDIT_KINDS if f"success/{k}" in m) == 4
    assert "| success | 0.750 |" in edits.metrics_markdown(m)
    d = scores[0].as_dict()
    assert d["success"] is True and "parsed" not in d
