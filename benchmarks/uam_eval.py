"""UAM on the testbed: reconstruction fidelity and mask-guided editing (95% intervals).

    python benchmarks/uam_eval.py --n 64 --threads 2 --json benchmarks/uam_eval.json

**Reconstruction.** For every evaluation seed (``diffattn.testbed.evaluate.eval_seeds``) a
scene is sampled (``world.sample_scene``: 1-3 objects, random styles), rendered and
captioned; the render is encoded with the VAE, inverted and reconstructed unguided (w = 1)
with the source caption, the empty prompt, and uniform attention maps (UAM, the paper: ""
under the uniform maps; on SD3 the segment-uniform mode), plus the extra row
"uniform-source" (uniform maps under the source caption), and, since a real image's caption
is never complete, the source and uniform-source rows again under a partial caption
(``partial_caption``: one object and the style words left out). PSNR and SSIM against the render,
mean with a Student-t 95% interval over images; the paired differences (``PAIRED``) with their
intervals; and the VAE's own encode-decode PSNR, the ceiling of every row.

**Editing.** Per seed a two-object scene; object 0 gets a colour swap (even seeds) or a shape
swap (odd seeds), "a red circle" -> "a blue circle", in its caption and in a truth render of
the edited scene. The prompt-to-prompt word swap runs without UAM blending, and with it under
both mask conventions ("code": the official code's dilated edit mask, the default; "paper":
Algorithm 1's dilated preserve mask), from one shared inversion (``UAMPipeline.edit``). On
tiny-sd3 the uniform branch runs under the source caption (its "" prediction diverges under
inversion; the reconstruction table shows it), on tiny-sd under "" as the paper. Judged by
the oracle (``oracle.score(image, target caption)``):
*applied* = the edited object is found with its new colour and shape; *colour applied* = its
new colour is found on some object; *others kept* = every other object is found. *Preserved
PSNR* = PSNR against the input render over the pixels outside the edited object (its
footprint before and after the edit, from the renderer, dilated by 2 px).

Writes a JSON summary with per-image records (``--json``), and sample grids under
``benchmarks/uam_grids/`` (first 8 images of the run: input | source | empty | uniform |
uniform-source, and input | truth | p2p | +UAM code mask | +UAM paper mask | uniform branch).
Per-image records are appended to
``<json>.partial.jsonl`` as they finish, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from diffattn import testbed
from diffattn.pipelines import UAMPipeline
from diffattn.pipelines.uam import psnr, ssim
from diffattn.testbed import oracle, world
from diffattn.testbed.evaluate import eval_seeds, mean_interval, rate_metric

CONDITIONINGS = ("source", "empty", "uniform", "uniform-source")
# A captioner's caption misses details: the same rows under a partial caption (see partial_caption)
PARTIAL_ROWS = {"partial caption": "source", "uniform-partial": "uniform-source"}
ROWS = CONDITIONINGS + tuple(PARTIAL_ROWS)
PAIRED = (("uniform", "source"), ("uniform-source", "source"), ("uniform", "partial caption"),
          ("uniform-partial", "partial caption"))  # (row, reference) differences reported per image
EDITORS = ("p2p", "p2p+uam code", "p2p+uam paper")  # base editor; UAM with either mask convention
GRID_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "uam_grids")
GRID_IMAGES = 8


# ----------------------------------------------------------------------------- scenes


def edit_pair(seed: int) -> tuple[world.Scene, world.Scene, str]:
    """A two-object scene and the same scene with object 0's colour (even seeds) or shape
    (odd seeds) swapped for another drawn from the seed; returns (source, target, kind)."""
    rng = np.random.default_rng([seed, 7])
    src = world.sample_scene(rng, n_objects=2)
    o = src.objects[0]
    taken = {(p.color, p.shape) for p in src.objects}
    if seed % 2 == 0:
        options = [c for c in world.COLORS if c != o.color and (c, o.shape) not in taken]
        new = replace(o, color=options[int(rng.integers(len(options)))])
        kind = "colour"
    else:
        options = [s for s in world.SHAPES if s != o.shape and (o.color, s) not in taken]
        new = replace(o, shape=options[int(rng.integers(len(options)))])
        kind = "shape"
    return src, replace(src, objects=(new,) + src.objects[1:]), kind


def partial_caption(scene: world.Scene) -> str:
    """The caption of ``scene`` as an imperfect captioner might write it: the last object
    (of two or three) and the style words left out, no relation. Single-object scenes keep
    their object, so without styles their partial caption is the full one."""
    keep = scene.objects[: max(1, len(scene.objects) - 1)]
    return world.caption(world.Scene(keep))


def object_footprint(obj: world.SceneObject, background: str) -> np.ndarray:
    """Pixels [64, 64] bool the object covers, from the renderer (anti-aliased edge included)."""
    alone = np.asarray(world.render(world.Scene((obj,), background)), dtype=np.int16)
    empty = np.asarray(Image.new("RGB", (world.SIZE, world.SIZE), world.BACKGROUNDS[background]), dtype=np.int16)
    return np.abs(alone - empty).sum(-1) > 0


def outside_mask(src: world.Scene, tgt: world.Scene, dilation: int = 2) -> np.ndarray:
    """[64, 64] bool: pixels outside the edited object before and after the edit, dilated."""
    inside = object_footprint(src.objects[0], src.background) | object_footprint(tgt.objects[0], tgt.background)
    if src.outline:
        dilation += 2  # outlines reach 2 px beyond the fill
    return ~ndimage.binary_dilation(inside, iterations=dilation)


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR over the pixels where ``mask`` [H, W] holds; a, b [H, W, 3] in [0, 1]."""
    return psnr(a[mask], b[mask])


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0  # [H, W, 3]


# ----------------------------------------------------------------------------- runs


def reconstruct_chunk(uam: UAMPipeline, seeds: list[int], steps) -> list[dict]:
    """Reconstruction records of one batch of seeds."""
    scenes = [world.sample_scene(s) for s in seeds]
    images = [world.render(s) for s in scenes]
    captions = [world.caption(s) for s in scenes]
    t0 = time.time()
    recs = uam.reconstruct_all(images, captions, CONDITIONINGS, num_inference_steps=steps)
    partial = uam.reconstruct_all(images, [partial_caption(s) for s in scenes], tuple(PARTIAL_ROWS.values()),
                                  num_inference_steps=steps)
    for rec, part in zip(recs, partial):
        rec.update({row: part[cond] for row, cond in PARTIAL_ROWS.items()})
    vae = uam.decode(uam.encode(torch.cat([uam.load_image(im) for im in images]))).permute(0, 2, 3, 1).numpy()
    per_image = (time.time() - t0) / len(seeds)
    out = []
    for seed, im, cap, rec, v in zip(seeds, images, captions, recs, vae):
        ref = as_array(im)
        out.append(dict(task="reconstruction", seed=seed, caption=cap, seconds=per_image,
                        vae_psnr=psnr(v, ref), vae_ssim=ssim(v, ref),
                        psnr={c: r.psnr for c, r in rec.items()}, ssim={c: r.ssim for c, r in rec.items()},
                        _images={c: r.image for c, r in rec.items()}, _input=im))
    return out


def replace_config(uam: UAMPipeline, **changes) -> UAMPipeline:
    """A UAMPipeline sharing ``uam``'s pipeline and text cache with some settings changed."""
    other = UAMPipeline(uam.pipe, replace(uam.config, **changes), progress=uam.progress)
    other._embeds = uam._embeds
    return other


def edit_one(uam: UAMPipeline, seed: int, steps, guidance=None) -> dict:
    """Editing record of one seed: base editor and UAM blending."""
    src, tgt, kind = edit_pair(seed)
    image, truth = world.render(src), world.render(tgt)
    source, target = world.caption(src), world.caption(tgt)
    mask = outside_mask(src, tgt)
    ref = as_array(image)
    t0 = time.time()
    rec = dict(task="editing", seed=seed, kind=kind, source=source, target=target, results={}, _images={})
    inversions = None
    for name in EDITORS:
        use = name != "p2p"
        editor = replace_config(uam, mask_convention=name.split()[-1]) if use else uam
        out = editor.edit(image, source, target, uam=use, num_inference_steps=steps, guidance_scale=guidance,
                          inversions=inversions)
        inversions = out.inversions if use else inversions
        score = oracle.score(out.target, target)
        rec["results"][name] = dict(
            applied=bool(score.found[0]), colour_applied=bool(score.color_found[0]),
            others_kept=bool(all(score.found[1:])), preserved_psnr=masked_psnr(as_array(out.target), ref, mask),
            truth_psnr=psnr(as_array(out.target), as_array(truth)))
        rec["_images"][name] = out.target
        if out.aux is not None:
            rec["_images"]["uniform branch"] = out.aux
    rec["seconds"] = time.time() - t0
    rec["_input"], rec["_truth"] = image, truth
    return rec


# ----------------------------------------------------------------------------- summaries


def interval(values) -> dict:
    m, lo, hi = mean_interval([v for v in values if math.isfinite(v)])
    return {"mean": m, "low": lo, "high": hi, "n": len(values)}


def rate(values) -> dict:
    metric = rate_metric(values)
    return {"rate": metric.value, "low": metric.low, "high": metric.high, "n": metric.n}


def summarise_reconstruction(records: list[dict]) -> dict:
    rows = [c for c in ROWS if all(c in r["psnr"] for r in records)]  # records of older runs lack the partial rows
    out = {c: {"psnr": interval([r["psnr"][c] for r in records]), "ssim": interval([r["ssim"][c] for r in records])}
           for c in rows}
    out["vae ceiling"] = {"psnr": interval([r["vae_psnr"] for r in records]),
                          "ssim": interval([r["vae_ssim"] for r in records])}
    for c, ref in PAIRED:
        if c in rows and ref in rows:
            out[f"{c} - {ref}"] = {
                "psnr": interval([r["psnr"][c] - r["psnr"][ref] for r in records]),
                "ssim": interval([r["ssim"][c] - r["ssim"][ref] for r in records]),
                "wins": rate([r["psnr"][c] > r["psnr"][ref] for r in records]),
            }
    for kind in ("colour", "shape"):  # edit applied, per kind of swap
        sub = [r for r in records if r["kind"] == kind]
        if sub:
            out[f"{kind} swaps applied"] = {name: rate([r["results"][name]["applied"] for r in sub]) for name in EDITORS}
    out["seconds_per_image"] = float(np.mean([r["seconds"] for r in records]))
    return out


def summarise_editing(records: list[dict]) -> dict:
    out = {}
    for name in EDITORS:
        res = [r["results"][name] for r in records]
        out[name] = {k: rate([x[k] for x in res]) for k in ("applied", "colour_applied", "others_kept")}
        out[name]["preserved_psnr"] = interval([x["preserved_psnr"] for x in res])
        out[name]["truth_psnr"] = interval([x["truth_psnr"] for x in res])
    for name in EDITORS[1:]:
        out[f"{name} - p2p preserved_psnr"] = interval(
            [r["results"][name]["preserved_psnr"] - r["results"]["p2p"]["preserved_psnr"] for r in records])
    for kind in ("colour", "shape"):  # edit applied, per kind of swap
        sub = [r for r in records if r["kind"] == kind]
        if sub:
            out[f"{kind} swaps applied"] = {name: rate([r["results"][name]["applied"] for r in sub]) for name in EDITORS}
    out["seconds_per_image"] = float(np.mean([r["seconds"] for r in records]))
    return out


def fmt(d: dict) -> str:
    if "rate" in d:
        return f"{d['rate']:.2f} [{d['low']:.2f}, {d['high']:.2f}]"
    return f"{d['mean']:.2f} [{d['low']:.2f}, {d['high']:.2f}]" if abs(d["mean"]) >= 1 else \
        f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def markdown(summary: dict) -> str:
    lines = []
    for model, s in summary["reconstruction"].items():
        lines += [f"\n### Reconstruction, {model} (n = {s['source']['psnr']['n']}, "
                  f"{s['seconds_per_image']:.1f} s/image)\n",
                  "| conditioning | PSNR dB | SSIM | images where PSNR > reference |", "|---|---:|---:|---:|"]
        for c in ROWS + ("vae ceiling",):
            if c in s:
                lines.append(f"| {c} | {fmt(s[c]['psnr'])} | {fmt(s[c]['ssim'])} | |")
        for c, ref in PAIRED:
            if f"{c} - {ref}" in s:
                d = s[f"{c} - {ref}"]
                lines.append(f"| {c} − {ref} (paired) | {fmt(d['psnr'])} | {fmt(d['ssim'])} | {fmt(d['wins'])} |")
    for model, s in summary["editing"].items():
        lines += [f"\n### Editing, {model} (n = {s['p2p']['applied']['n']}, {s['seconds_per_image']:.1f} s/image)\n",
                  "| editor | applied | colour applied | others kept | preserved PSNR dB | PSNR vs truth dB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in EDITORS:
            d = s[name]
            lines.append(f"| {name} | {fmt(d['applied'])} | {fmt(d['colour_applied'])} | {fmt(d['others_kept'])} | "
                         f"{fmt(d['preserved_psnr'])} | {fmt(d['truth_psnr'])} |")
        for name in EDITORS[1:]:
            lines.append(f"| {name} − p2p (paired) | | | | {fmt(s[f'{name} - p2p preserved_psnr'])} | |")
        kinds = [k for k in ("colour", "shape") if f"{k} swaps applied" in s]
        if kinds:
            lines += ["", "| editor | " + " | ".join(f"{k} swaps applied" for k in kinds) + " |",
                      "|---|" + "---:|" * len(kinds)]
            for name in EDITORS:
                lines.append(f"| {name} | " + " | ".join(fmt(s[f'{k} swaps applied'][name]) for k in kinds) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- grids


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of equal-size tiles, 2 px gaps, no upscaling (keeps the PNG small)."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (w + 2), len(rows) * (h + 2)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas.paste(im, (j * (w + 2), i * (h + 2)))
    return canvas


def save_grids(model: str, recon: list[dict], edits: list[dict]) -> list[str]:
    os.makedirs(GRID_DIR, exist_ok=True)
    paths = []
    if recon:
        rows = [[r["_input"]] + [r["_images"][c] for c in ("source", "empty", "uniform", "uniform-source")]
                for r in recon[:GRID_IMAGES]]
        paths.append(os.path.join(GRID_DIR, f"{model}-reconstruction.png"))
        grid(rows).quantize(colors=128).save(paths[-1], optimize=True)  # palette PNG: small
    if edits:
        rows = [[r["_input"], r["_truth"]] + [r["_images"][e] for e in EDITORS] + [r["_images"]["uniform branch"]]
                for r in edits[:GRID_IMAGES]]
        paths.append(os.path.join(GRID_DIR, f"{model}-editing.png"))
        grid(rows).quantize(colors=128).save(paths[-1], optimize=True)  # palette PNG: small
    return paths


# ----------------------------------------------------------------------------- main


def load_partial(path: str) -> dict:
    """{(model, task, seed): record} from the resume file (images are not kept: grids then
    show the images of this run only)."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[(r["model"], r["task"], r["seed"])] = r
    return done


def public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="images per model and task (evaluation seeds)")
    p.add_argument("--models", default="tiny-sd,tiny-sd3")
    p.add_argument("--tasks", default="reconstruction,editing")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 20)")
    p.add_argument("--guidance", type=float, default=None, help="editing CFG (default: the model's, 5)")
    p.add_argument("--batch", type=int, default=8, help="images per reconstruction batch")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default="benchmarks/uam_eval.json")
    p.add_argument("--fresh", action="store_true", help="ignore the resume file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="UAMConfig field of the editing pipeline, e.g. --set mask_timestep=400 --set quantile=0.7")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{" or value in ("true", "false") else value
    torch.set_num_threads(args.threads)
    partial_path = args.json + ".partial.jsonl"
    done = {} if args.fresh else load_partial(partial_path)
    if args.fresh and os.path.exists(partial_path):
        os.remove(partial_path)
    seeds = eval_seeds(args.n)
    summary = {"config": vars(args), "reconstruction": {}, "editing": {}, "grids": []}
    t_start = time.time()
    for model in args.models.split(","):
        pipe = testbed.load(model)
        # tiny-sd3's unconditional ("") prediction diverges under inversion (see RESULTS.md), so its
        # editing branch takes the uniform maps under the source caption; tiny-sd keeps the paper's ""
        uniform_prompt = None if model == "tiny-sd3" else ""
        uam = UAMPipeline(pipe, progress=False, uniform_prompt=uniform_prompt, **overrides)
        recon_pipe = UAMPipeline(pipe, progress=False)  # the reconstruction rows name their prompts explicitly
        for task in args.tasks.split(","):
            records, fresh = [], []
            todo = [s for s in seeds if (model, task, s) not in done]
            records += [done[(model, task, s)] for s in seeds if (model, task, s) in done]
            with open(partial_path, "a") as log:
                if task == "reconstruction":
                    for i in range(0, len(todo), args.batch):
                        chunk = reconstruct_chunk(recon_pipe, todo[i:i + args.batch], args.steps)
                        for r in chunk:
                            r["model"] = model
                            log.write(json.dumps(public(r)) + "\n")
                        log.flush()
                        fresh += chunk
                        print(f"{model} reconstruction {len(records) + len(fresh)}/{len(seeds)}", flush=True)
                elif task == "editing":
                    for s in todo:
                        r = edit_one(uam, s, args.steps, args.guidance)
                        r["model"] = model
                        log.write(json.dumps(public(r)) + "\n")
                        log.flush()
                        fresh.append(r)
                        print(f"{model} editing {len(records) + len(fresh)}/{len(seeds)}", flush=True)
                else:
                    raise SystemExit(f"unknown task {task!r}: reconstruction, editing")
            records += fresh
            records.sort(key=lambda r: r["seed"])
            fresh.sort(key=lambda r: r["seed"])
            if task == "reconstruction":
                summary["reconstruction"][model] = summarise_reconstruction(records)
                summary["grids"] += save_grids(model, fresh, [])
            else:
                summary["editing"][model] = summarise_editing(records)
                summary["grids"] += save_grids(model, [], fresh)
            summary.setdefault("records", []).extend(public(r) for r in records)
    summary["wall_seconds"] = time.time() - t_start
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)
    print(markdown(summary))
    print(f"\nwrote {args.json} and {', '.join(summary['grids'])} in {summary['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
