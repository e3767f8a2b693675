"""Why images miss the all-objects-present mark: a breakdown of an astar_eval.py JSON.

    python benchmarks/astar_failures.py runs/s9/sd3-strips-eval.json [more.json ...]

For every (model, suite, method) report, each requested object that the oracle did not find
(colour and shape) is put in one class, from the oracle's matching (``Score.matched``: the
detected object each request was paired with, by colour and shape first, then colour, then
shape):

- *absent*: no detected object was paired with it: the object is missing (neglect);
- *colour leak*: the paired object has another colour (the request's colour went elsewhere
  or was lost);
- *wrong shape*: the paired object has the right colour but another shape, or no clean shape
  (a blob).

The last column is the neglect ceiling: the share of all images that would pass if every
*absent* object were drawn right and nothing else changed (images whose only misses are
absences). A method that cures neglect, A-STAR's and Attend-and-Excite's target, can raise
the all-present rate by at most that much.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter


def classify(image: dict) -> list[str]:
    """The class of each requested object the oracle did not find, for one per-image record."""
    objects = image["parsed"]["objects"]
    out = []
    for k, found in enumerate(image["found"]):
        if found:
            continue
        j = image["matched"][k]
        if j is None:
            out.append("absent")
        elif not image["color_found"][k] or objects[j]["color"] != _requested_colour(image, k):
            out.append("colour leak")
        else:
            out.append("wrong shape")
    return out


def _requested_colour(image: dict, k: int) -> str:
    from diffattn.testbed.world import parse_prompt

    return parse_prompt(image["prompt"]).objects[k][0]


def breakdown(images: list[dict]) -> dict:
    classes: Counter = Counter()
    only_absent = failed = 0
    for im in images:
        if im["all_present"]:
            continue
        failed += 1
        misses = classify(im)
        classes.update(misses)
        only_absent += bool(misses) and all(m == "absent" for m in misses)
    n = len(images)
    return {"images": n, "failed": failed, **classes, "neglect ceiling": only_absent / n if n else float("nan")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="astar_eval.py --json outputs")
    args = p.parse_args(argv)
    print("| model | suite | method | images | failed | absent | colour leak | wrong shape | neglect ceiling |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for path in args.json:
        for model, suites in json.load(open(path))["results"].items():
            for suite, methods in suites.items():
                for method, report in methods.items():
                    b = breakdown(report["images"])
                    print(f"| {model} | {suite} | {method} | {b['images']} | {b['failed']} | {b.get('absent', 0)} | "
                          f"{b.get('colour leak', 0)} | {b.get('wrong shape', 0)} | +{100 * b['neglect ceiling']:.1f} |")


if __name__ == "__main__":
    main()
