"""Reference fingerprints of the v1 shapes world, for tests/test_world_v2.py.

``fingerprints(world)`` renders, captions and parses the v1 suites' scenes (each suite's
prompts with the seeds the oracle tests use, 1000 + i, and with the harness's first 64
evaluation seeds, image i pairing prompt i % len with seed 1_000_000 + i), 300 training scenes
and a few styled sample_scene draws, and returns SHA-256 digests of the pixels, of the scene
numbers, of the captions and the vocabulary. ``world_v1_hashes.json`` holds them as computed
by the world at git commit 60b1e18 (before v2):

    python tests/data/world_v1_reference.py --commit 60b1e18 > tests/data/world_v1_hashes.json
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile

import numpy as np

EVAL_SEED_START = 1_000_000


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def v1_suite_specs() -> dict[str, list[tuple[tuple, str | None, dict]]]:
    """The v1 suites as (objects, relation, styles), from the harness."""
    from diffattn.testbed.evaluate import SUITE_SPECS

    return {name: [(tuple(s.objects), s.relation, dict(s.styles)) for s in specs] for name, specs in SUITE_SPECS.items()}


def scenes(world, suites) -> dict[str, list]:
    out = {}
    for name, specs in suites.items():
        out[f"suite:{name}:oracle"] = [
            world.sample_scene(1000 + i, objects=list(o), relation=r, background="dark" if st["dark"] else "light",
                               outline=st["outline"]) for i, (o, r, st) in enumerate(specs)]
        out[f"suite:{name}:eval64"] = [
            world.sample_scene(EVAL_SEED_START + i, objects=list(specs[i % len(specs)][0]), relation=specs[i % len(specs)][1],
                               background="dark" if specs[i % len(specs)][2]["dark"] else "light",
                               outline=specs[i % len(specs)][2]["outline"]) for i in range(64)]
    out["training:0-299"] = [world.sample_training_scene(i) for i in range(300)]
    out["sample_scene:styled"] = [world.sample_scene(10_000 + i, n_objects=1 + i % 3, relation=(i % 3 == 1) or False,
                                                     background=("light", "dark")[i % 2], outline=i % 4 >= 2)
                                  for i in range(48)]
    return out


def fingerprints(world, suites=None) -> dict[str, dict[str, str]]:
    suites = suites if suites is not None else v1_suite_specs()
    fp = {}
    for key, group in scenes(world, suites).items():
        pixels = hashlib.sha256()
        numbers = hashlib.sha256()
        captions = hashlib.sha256()
        for sc in group:
            pixels.update(np.ascontiguousarray(np.asarray(world.render(sc), dtype=np.uint8)).tobytes())
            numbers.update(repr([(o.shape, o.color, o.cx, o.cy, o.size) for o in sc.objects]
                                + [sc.background, sc.outline, sc.relation]).encode())
            text = world.caption(sc)
            spec = world.parse_prompt(text)
            captions.update((text + repr((spec.objects, spec.relation, sorted(spec.styles.items())))).encode())
        fp[key] = {"n": len(group), "pixels": pixels.hexdigest(), "numbers": numbers.hexdigest(),
                   "captions": captions.hexdigest()}
    fp["vocabulary"] = {"words": world.vocabulary()}
    return fp


def load_world_at(commit: str, repo: str = "."):
    """The world module as it was at ``commit`` (imported from ``git show``)."""
    src = subprocess.run(["git", "-C", repo, "show", f"{commit}:diffattn/testbed/world.py"], check=True,
                         capture_output=True, text=True).stdout
    f = tempfile.NamedTemporaryFile("w", suffix=f"_world_{commit}.py", delete=False)
    f.write(src)
    f.close()
    spec = importlib.util.spec_from_file_location(f"world_{commit}", f.name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", default="60b1e18")
    args = ap.parse_args()
    print(json.dumps({"commit": args.commit, "fingerprints": fingerprints(load_world_at(args.commit))}, indent=1))
