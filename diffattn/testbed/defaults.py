"""The testbed's defaults for the methods, which the frontends (the CLI, benchmarks) pass in.

The library never reads these: ``AStarPipeline`` needs its concepts given and takes its
temperature from its config; ``UAMPipeline`` needs a source prompt. On the shapes-world models
the frontends fill them in from here:

- :data:`TESTBED_OVERRIDES`: ``AStarConfig`` fields per testbed model (:func:`testbed_overrides`);
- :data:`TINY_WAN_SPARSE`: Rectified SpaAttn's block settings on tiny-wan's short clips;
- :func:`default_concepts`: the shape nouns of a shapes-world caption (A-STAR's concepts);
- :func:`default_caption`: the oracle's caption of a shapes-world image (UAM's source prompt).
"""
from __future__ import annotations

from ..errors import ConceptError, EditPromptError

# Settings for the tiny testbed models, chosen on training seeds (never the evaluation seeds;
# benchmarks/RESULTS.md): tiny-sd3's attention varies far less over the image than SD1.x's, so
# softmax(100·A) gives almost flat maps and 1000 restores A&E's contrast; tiny-sd keeps A&E's 100.
TESTBED_OVERRIDES = {"tiny-sd3": {"temperature": 1000.0}, "tiny-sd": {}}


# Rectified SpaAttn on tiny-wan (benchmarks/sparse_quality.py, notes "Settings"): the official
# blocks of 128 tokens make a 768-token clip 6 key blocks, every one a grid neighbour of every
# other, so the neighbour rule alone keeps them all and --drop would change nothing. Blocks of 64
# (12 key blocks, a 3 x 2 x 2 grid), no neighbour blocks and no cumulative-mass floor make the
# drop rate the density (the first latent frame's blocks still attend to each other).
TINY_WAN_SPARSE = {"block_size": 64, "neighbours": False, "p_remain": 0.0}


def testbed_model(pipe) -> str | None:
    """``"tiny-sd3"`` / ``"tiny-sd"`` for a testbed pipeline (:func:`diffattn.testbed.load`),
    ``None`` for any other model."""
    from .pipelines import ShapesSD3Pipeline, ShapesSDPipeline

    if isinstance(pipe, ShapesSD3Pipeline):
        return "tiny-sd3"
    if isinstance(pipe, ShapesSDPipeline):
        return "tiny-sd"
    return None


def testbed_overrides(pipe) -> dict:
    """:data:`TESTBED_OVERRIDES` of a testbed pipeline (``{}`` for any other model)."""
    kind = testbed_model(pipe)
    return dict(TESTBED_OVERRIDES[kind]) if kind else {}


def default_concepts(prompt: str) -> list[str]:
    """The shape nouns of a shapes-world caption, one per object (the testbed's A-STAR
    concepts); pass it as ``AStarPipeline(...)(prompt, concepts=default_concepts)``."""
    from .world import parse_prompt

    try:
        spec = parse_prompt(prompt)
    except ValueError:
        raise ConceptError(
            f"no concepts given and {prompt!r} is not a shapes-world caption; pass concepts=['word', ...] "
            f"(the subject nouns of the prompt; on the command line --concepts word,word)"
        ) from None
    return [shape for _, shape in spec.objects]


def default_caption(image) -> str:
    """The testbed oracle's caption of a shapes-world image (UAM's source prompt on the CLI)."""
    from . import oracle, world

    parsed = oracle.parse(image)
    if not parsed.objects:
        raise EditPromptError("no --prompt given and the testbed oracle finds no object in the image to caption; "
                              "pass the source prompt with --prompt")
    objs = tuple((o.color, o.shape if o.shape in world.SHAPES else "circle") for o in parsed.objects[:3])
    spec = world.PromptSpec(objects=objs, relation=None, styles=parsed.styles)
    return world.caption(spec)


def method_defaults(method: str, pipe) -> dict:
    """Parameter defaults the frontends pass to a registry method (``diffattn.methods.registry``)
    on ``pipe``: A-STAR's concepts from the caption (any model: a prompt that is no shapes-world
    caption says to give the concepts) and, on testbed models, its temperature; on tiny-wan,
    Rectified SpaAttn's block settings (:data:`TINY_WAN_SPARSE`). Flags the user gives win."""
    if method == "astar":
        return {"concepts": default_concepts, **testbed_overrides(pipe)}
    if method == "sparse":
        from .video_models import ShapesWanPipeline

        return dict(TINY_WAN_SPARSE) if isinstance(pipe, ShapesWanPipeline) else {}
    return {}
