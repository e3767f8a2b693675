"""The testbed's HeadHunter objectives, scored by the shapes-world oracle.

``import diffattn.testbed`` registers them with :func:`diffattn.make_objective` (and the CLI's
``headhunt --objective``): ``fidelity`` (:func:`oracle_fidelity`), ``dark`` and ``outline``
(:func:`oracle_style`).
"""
from __future__ import annotations

from collections.abc import Callable

from ..methods.objectives import register_objective


def oracle_fidelity(images, prompts) -> list[float]:
    """Testbed objective: fraction of the prompt's objects present with the right colour and
    shape, minus a quarter per extra object (so noise blobs do not pay)."""
    from . import oracle

    out = []
    for im, p in zip(images, prompts):
        s = oracle.score(im, p)
        out.append(s.object_accuracy - 0.25 * min(s.extra_objects, 2))
    return out


def oracle_style(style: str, wanted: bool = True) -> Callable:
    """Testbed objective: 1 when the image shows ``style`` ("dark" or "outline") as wanted."""
    from . import oracle

    def objective(images, prompts):
        return [float(oracle.parse(im).styles[style] == wanted) for im in images]

    objective.__name__ = f"oracle_style_{style}"
    objective.name = f"oracle_style({style!r}, wanted={wanted})"
    return objective


register_objective("fidelity", lambda **_: oracle_fidelity,
                   help="testbed oracle: the prompt's objects present, with their colours and shapes")
register_objective("dark", lambda **_: oracle_style("dark"), help="testbed oracle: a dark background")
register_objective("outline", lambda **_: oracle_style("outline"), help="testbed oracle: outlined shapes")
