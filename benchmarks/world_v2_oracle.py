"""Oracle v2 on world v2: per-attribute accuracy on held-out clean renders, and what it says
on degraded ones (right, "unreadable", or wrong).

    python benchmarks/world_v2_oracle.py            # 1,000 clean renders + 300 per perturbation strength
    python benchmarks/world_v2_oracle.py --n 200 --n-perturbed 100

Scenes: ``world.sample_training_pair_v2(seed)`` for the first n evaluation seeds
(``evaluate.eval_seeds``: never used to tune the oracle's thresholds, which were set on
training seeds 0-299). Per object: colour, shape (v1 ``oracle.parse`` and ``parse_v2``, which
must agree) and marking; per image: dark, outline, shadow, light, centred calls, and the
mean absolute error of the graded shadow and light strengths.
"""
from __future__ import annotations

import argparse
import collections

import numpy as np

from diffattn.testbed import oracle
from diffattn.testbed import world as w
from diffattn.testbed.evaluate import eval_seeds


def _nearest(objs, o):
    return min(objs, key=lambda d: np.hypot(d.cx - o.cx, d.cy - o.cy)) if objs else None


def run(n: int, strength: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = collections.Counter()
    err = collections.defaultdict(list)
    for s in eval_seeds(n):
        scene, _ = w.sample_training_pair_v2(s)
        img = w.render(scene)
        if strength:
            img = oracle.perturb(img, rng, strength)
        p1, p2 = oracle.parse(img), oracle.parse_v2(img)
        truth = w.scene_styles_v2(scene)
        for k, v in truth.items():
            got = p2.calls[k]
            c[(k, "ok" if got == v else "unreadable" if got is None else "wrong")] += 1
        for k in ("shadow", "light"):
            m = getattr(p2, k)
            if not np.isnan(m):
                err[k].append(abs(m - getattr(scene, k)))
        same = [(a.color, a.shape, a.cx, a.cy) for a in p1.objects] == [(b.color, b.shape, b.cx, b.cy) for b in p2.objects]
        c[("parse_v2 = parse", "ok" if same else "wrong")] += 1
        c[("object count", "ok" if len(p2.objects) == len(scene.objects) else "wrong")] += len(scene.objects)
        for o in scene.objects:
            d1, d2 = _nearest(p1.objects, o), _nearest(p2.objects, o)
            c[("colour (v1 parse)", "ok" if d1 is not None and d1.color == o.color else "wrong")] += 1
            c[("shape (v1 parse)", "ok" if d1 is not None and d1.shape == o.shape else "wrong")] += 1
            m = d2.marking if d2 is not None else oracle.UNREADABLE
            res = "ok" if m == o.marking else "unreadable" if m == oracle.UNREADABLE else "wrong"
            c[("marking", res)] += 1
            c[(f"marking: {o.marking}", res)] += 1
            c[(f"marking on {o.shape}s", res)] += 1
    return c, err


def table(c, err, title):
    keys = list(dict.fromkeys(k for k, _ in c))
    lines = [f"### {title}", "", "| attribute | n | correct | unreadable | wrong |", "|---|---|---|---|---|"]
    for k in keys:
        tot = sum(c[(k, r)] for r in ("ok", "unreadable", "wrong"))
        lines.append(f"| {k} | {tot} | {c[(k, 'ok')] / tot:.3f} | {c[(k, 'unreadable')] / tot:.3f} | {c[(k, 'wrong')] / tot:.3f} |")
    for k, v in err.items():
        lines.append(f"| {k} strength, mean abs error (max) | {len(v)} | {np.mean(v):.3f} ({np.max(v):.3f}) | | |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="clean held-out renders (default 1000)")
    ap.add_argument("--n-perturbed", type=int, default=300, help="renders per perturbation strength (default 300)")
    ap.add_argument("--strengths", default="0.5,1,2", help="oracle.perturb strengths (default 0.5,1,2)")
    args = ap.parse_args(argv)
    print(table(*run(args.n), f"clean renders, 64 px, n = {args.n} scenes (eval seeds)"), "\n", flush=True)
    for st in [float(x) for x in args.strengths.split(",") if x]:
        print(table(*run(args.n_perturbed, st), f"perturbed, strength {st}, n = {args.n_perturbed} scenes"), "\n", flush=True)


if __name__ == "__main__":
    main()
