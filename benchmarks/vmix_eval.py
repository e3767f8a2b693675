"""VMix on the testbed (issue 23): each aesthetic measure against λ, the disentanglement
matrix, and the baselines in the same harness.

    python benchmarks/vmix_eval.py --model tiny-sd3 --adapter runs/vmix-sd3/adapter.safetensors \
        --lora shadow=runs/lora-shadow/lora.safetensors ... --json runs/bench/vmix.json --grid benchmarks/vmix_grids

Every configuration generates the same (prompt, seed) pairs: the ``aesthetic_none`` suite's 32
contents (one object or a v1 pair, markings open, **no aesthetic named**), cycled over ``--n``
distinct evaluation seeds (no training run ever sees them), 20 steps at the pipeline's CFG.
Each image is read by the world-v2 oracle: the rate of each aesthetic attribute (an
unreadable call counts as not shown), object accuracy and all-present (95% Wilson intervals).

Rows:
- ``base``: the model alone (λ = 0 is the same images bit for bit: checked, reported);
- ``vmix``: ``da.ValueMix(adapter, aesthetics=[a], scale=λ)`` for each attribute a and each λ:
  the targeted measure's curve, and the matrix "asked for a (row) → rate of b (column)";
- ``words``: the attribute's caption phrase appended to the prompt (``"... with shadows"``), the
  strong baseline of a model trained on partly captioned styles;
- ``lora``: LoRA alone (no adapter, no label input: the paper's "w/o value-mixed attention"
  ablation) fine-tuned on renders that all show attribute a (``diffattn train-vmix --lora-only
  --require a``), then prompted without naming it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import numpy as np
import torch
from PIL import Image

import diffattn as da
from diffattn.methods.vmix import load_adapter
from diffattn.methods.vmix.train import apply_lora
from diffattn.testbed import load, world
from diffattn.testbed.evaluate import eval_seeds, evaluate_v2, suite_specs_v2


def prompts_for(aesthetic: str | None) -> list[str]:
    """The ``aesthetic_none`` contents, with ``aesthetic`` named (the words baseline) or not."""
    specs = suite_specs_v2("aesthetic_none")
    if aesthetic is None:
        return [world.caption_v2(s) for s in specs]
    return [world.caption_v2(world.PromptSpecV2(objects=s.objects, relation=s.relation, styles={aesthetic: True}))
            for s in specs]


def measures(report) -> dict:
    """Rate of every attribute (named or not), object accuracy, all-present, as plain dicts."""
    m = report.metrics()
    out = {k: m[k]._asdict() for k in ("object_accuracy", "all_present")}
    for s in world.STYLES_V2:  # a prompt set names an attribute in every prompt or in none
        out[s] = (m.get(f"{s}_named") or m[f"{s}_unnamed"])._asdict()
    return out


def grid(rows: list[tuple[str, list[Image.Image]]], path: str, scale: int = 2) -> None:
    """One row of images per configuration (the same prompts and seeds in every row)."""
    n = max(len(ims) for _, ims in rows)
    side = 64 * scale
    canvas = Image.new("RGB", (n * side, len(rows) * side), "white")
    for r, (_, ims) in enumerate(rows):
        for c, im in enumerate(ims):
            canvas.paste(im.resize((side, side), Image.NEAREST), (c * side, r * side))
    canvas.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd3")
    ap.add_argument("--adapter", required=True, help="a trained VMix adapter (.safetensors)")
    ap.add_argument("--lambdas", default="0.5,1,1.5,2", help="λ values besides 0 (the base)")
    ap.add_argument("--aesthetics", default=",".join(world.STYLES_V2))
    ap.add_argument("--n", type=int, default=128, help="images per configuration (distinct evaluation seeds)")
    ap.add_argument("--uncond", default="positive", choices=("positive", "both", "null"))
    ap.add_argument("--lora", action="append", default=[], metavar="STYLE=PATH",
                    help="LoRA-only baseline for one attribute (repeatable)")
    ap.add_argument("--no-words", action="store_true", help="skip the prompt-words baseline")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", default=None, help="a JSON of an earlier run: keep its rows, add these")
    ap.add_argument("--grid", default=None, help="folder for the sample grids (one PNG per attribute)")
    ap.add_argument("--grid-images", type=int, default=8)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    aesthetics = [a for a in args.aesthetics.split(",") if a]
    lambdas = [float(x) for x in args.lambdas.split(",") if x]
    seeds = eval_seeds(args.n)
    pipe = load(args.model)
    adapter = load_adapter(args.adapter, pipe)
    rows: list[dict] = []
    if args.merge:
        with open(args.merge) as f:
            rows = json.load(f)["rows"]
    images: dict[tuple, list] = {}

    def run(method, aesthetic, knob, prompts, target=pipe, controls=()):
        t0 = time.time()
        with da.attach(target, *controls) if controls else contextlib.nullcontext():
            rep = evaluate_v2(target, prompts=prompts, seeds=seeds, progress=False, return_images=True)
        row = {"method": method, "aesthetic": aesthetic, "knob": knob, "seconds": time.time() - t0, **measures(rep)}
        rows.append(row)
        images[(method, aesthetic, knob)] = rep.images[:args.grid_images]
        asked = f" {aesthetic}" if aesthetic else ""
        shown = f"{row[aesthetic]['value']:.3f}" if aesthetic else "—"
        print(f"{method}{asked} {knob}: rate {shown}, object acc {row['object_accuracy']['value']:.3f}, "
              f"all present {row['all_present']['value']:.3f} ({row['seconds']:.0f}s)", flush=True)
        return rep

    base = run("base", None, "", prompts_for(None))
    zero = run("vmix", aesthetics[0], "λ=0", prompts_for(None),
               controls=[da.ValueMix(adapter, aesthetics=[aesthetics[0]], scale=0.0, uncond=args.uncond)])
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base.images, zero.images))
    print(f"λ = 0 reproduces the base images bit for bit: {same}")
    rows[-1]["bit_exact_with_base"] = same
    for a in aesthetics:
        for lam in lambdas:
            run("vmix", a, f"λ={lam:g}", prompts_for(None),
                controls=[da.ValueMix(adapter, aesthetics=[a], scale=lam, uncond=args.uncond)])
        if not args.no_words:
            run("words", a, "named", prompts_for(a))
    for spec in args.lora:
        a, path = spec.split("=", 1)
        fresh = load(args.model)
        apply_lora(fresh.transformer if hasattr(fresh, "transformer") else fresh.unet, path)
        run("lora", a, os.path.basename(os.path.dirname(path)) or path, prompts_for(None), target=fresh)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "adapter": args.adapter, "n": args.n, "uncond": args.uncond, "rows": rows}, f,
                      indent=1)
    if args.grid:
        os.makedirs(args.grid, exist_ok=True)
        for a in aesthetics:
            sel = [("base", None, "")] + [k for k in images if k[1] == a]
            grid([(str(k), images[k]) for k in sel if k in images], os.path.join(args.grid, f"{a}.png"))
    print_tables(rows, aesthetics)


def print_tables(rows: list[dict], aesthetics: list[str]) -> None:
    """The λ curves with the baselines, then the disentanglement matrix at each λ."""
    base = next(r for r in rows if r["method"] == "base")

    def cell(r, k):
        m = r[k]
        return f"{m['value']:.3f}" + (f" [{m['low']:.3f}, {m['high']:.3f}]" if "low" in m else "")

    print("\n| asked | method | knob | targeted rate | object acc | all present |\n|---|---|---|---|---|---|")
    for a in aesthetics:
        print(f"| {a} | base | — | {cell(base, a)} | {cell(base, 'object_accuracy')} | {cell(base, 'all_present')} |")
        for r in rows:
            if r["aesthetic"] == a:
                print(f"| {a} | {r['method']} | {r['knob']} | {cell(r, a)} | {cell(r, 'object_accuracy')} | "
                      f"{cell(r, 'all_present')} |")
    knobs = sorted({r["knob"] for r in rows if r["method"] == "vmix" and r["knob"] != "λ=0"})
    for knob in knobs:
        print(f"\nDisentanglement, VMix {knob}: asked (row) → rate of each attribute (column); base in the first row")
        print("| asked | " + " | ".join(aesthetics) + " |\n|---|" + "---|" * len(aesthetics))
        print("| (base) | " + " | ".join(f"{base[b]['value']:.3f}" for b in aesthetics) + " |")
        for a in aesthetics:
            r = next((r for r in rows if r["method"] == "vmix" and r["aesthetic"] == a and r["knob"] == knob), None)
            if r:
                print(f"| {a} | " + " | ".join(f"{r[b]['value']:.3f}" for b in aesthetics) + " |")


if __name__ == "__main__":
    main()
