"""DeContext on the testbed's in-context editor: does protecting an image stop its edits?

    python benchmarks/decontext_eval.py --model assets/tiny-kontext --images 50 --seeds 2 --steps 200 \\
        --json benchmarks/decontext_eval.json --grid benchmarks/decontext_grid.png \\
        --plot benchmarks/decontext_rctx.png --resume

Shen, Cui & Yang, "DeContext as Defense" (arXiv 2512.16625; method note
``reference/vmix_repulsion_decontext.md`` §3). The paper protects a face, edits it with
held-out prompts and seeds, and measures how much identity survives (ISM, CLIP-I, Table 1).
Here the identity is a shapes-world scene and the edit oracle (``testbed.edits.score_edit``)
grades every edit exactly.

**Protocol.**

1. *Images and instructions*: the first ``--images`` held-out edit pairs
   (``edits.eval_edit_pairs``: evaluation seeds from 1,000,000, which no training uses), each a
   source scene rendered at 64 px and its instruction.
2. *EOT pool*: the protection samples instructions from ``POOL_SIZE`` distinct instructions of
   *training* pairs (``eot_pool``), none of them an instruction of the evaluated pairs, so every
   evaluation instruction is held out of the attack (the paper's test prompts are held out of its
   60-prompt pool).
3. *Protection*: for every method of ``--methods`` (``decontext``; the baselines ``encoder``
   = PhotoGuard's encoder attack, ``diffpgd`` = Diff-PGD / AdvDM, ``random`` = ±ε sign noise) and
   every ε of ``--eps`` (in /255), each source image is protected once
   (:class:`~diffattn.pipelines.decontext.DeContextProtector`, the protection's EOT seed = the
   pair's seed, so every method and ε sees the same image with the same seed), with the same
   ``--steps`` and ``--alpha`` for every gradient method. The protected image is **saved as PNG
   and reloaded**: every number below is computed on the file.
4. *Edits*: the clean render and each protected file are edited with the pair's instruction
   under ``--seeds`` edit seeds (seed k of a pair: ``pair.seed + k·EDIT_SEED_STRIDE``; k = 0 is
   ``evaluate_edits``' own seed), the clean and the protected image under the same seed and in the
   same batches. Every edit is saved as PNG, reloaded and graded against the **clean source
   scene** by the edit oracle (``changed``: the asked change happened; ``preserved``: every other
   object kept; ``success`` = both; an unreadable marking is no success).

**Columns** (one row per (method, ε); intervals are 95%):

- ``success clean`` / ``success prot.``: edit success on the clean / protected image, the mean
  over images of the per-image success fraction (over its seeds) with its Wilson interval
  (``evaluate.rate_metric``; the image is the sampled unit, n = images).
- ``Δ success``: the paired change protected − clean (negative: the protection stopped edits),
  mean over images and a percentile bootstrap over images (``evaluate.paired_bootstrap``).
  The issue's goal: DeContext makes this the most negative at equal ε.
- ``preserved clean`` / ``preserved prot.``: context preservation (the ``preserved`` rate),
  as success. ``changed prot.``: the rate at which the asked change happened on the protected image.
- ``PSNR``: of the protected file vs the clean render, mean over images (dB; higher: less visible).
- ``‖δ‖∞``: the largest |protected − clean| on any file, in 8-bit levels (≤ ⌊255·ε⌋ exactly).
- ``r_ctx``: the editor's context share (the target queries' attention mass on the context
  tokens, softmax over all keys; ``DeContextProtector.shares``), averaged over every block and
  over images, on the clean vs the protected files: what DeContext lowers.

The JSON (``--json``) holds, per row, these figures, the full suite metrics of the edits
(``edits.edit_metrics``, per edit), the per-block r_ctx, and every edit's verdicts; it is
rewritten after each row, so a stopped run keeps its finished rows, and ``--resume`` skips them
(and reuses the PNGs already written under ``--out-dir`` for the same settings). ``--grid``
draws, for the first ``--grid-images`` images at ``--grid-eps``: source | its edit | per method:
protected | its edit (edit seed 0; a green frame: success, red: failure, grey: unreadable).
``--plot`` draws DeContext's per-block r_ctx, clean vs protected, at ``--grid-eps``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffattn.errors import UsageError
from diffattn.testbed import edits
from diffattn.testbed.evaluate import EVAL_SEED_START, paired_bootstrap, rate_metric
from diffattn.testbed.world import render

METHODS = ("decontext", "encoder", "diffpgd", "random")  # diffattn.pipelines.decontext.METHODS
EPS_255 = (4.0, 8.0, 12.75)  # the budgets, in /255 (12.75/255: the paper's 0.1 in [-1, 1])
DEFAULT_ALPHA = 0.0025  # the paper's 0.005 in [-1, 1] units
EDIT_SEED_STRIDE = 10_000_000  # edit seed k of a pair = pair.seed + k * stride: no two (pair, k) share one
POOL_SIZE = 60  # EOT instructions (the paper's pool has 60)
SHARE_SAMPLES = 4  # EOT draws per image for r_ctx (DeContextProtector.shares)
GRID_SCALE = 3
VERDICT_COLOURS = {True: (40, 170, 60), False: (210, 40, 40), None: (150, 150, 150)}
EDIT_FIELDS = ("changed", "preserved", "success", "unreadable")


# ----------------------------------------------------------------------------- arguments


def parse_methods(text: str) -> list[str]:
    """``"decontext,encoder"`` -> the methods, in order, deduplicated; a :class:`UsageError`
    naming the known ones otherwise."""
    names = list(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    bad = [n for n in names if n not in METHODS]
    if not names or bad:
        raise UsageError(f"--methods {text!r}: give a comma-separated list of {', '.join(METHODS)}"
                         + (f" (unknown: {', '.join(bad)})" if bad else ""))
    return names


def parse_eps_list(text: str) -> list[float]:
    """``"4,8,12.75"`` (budgets in /255) -> the floats, in order, deduplicated; each at least one
    8-bit level and at most 255."""
    try:
        values = list(dict.fromkeys(float(t) for t in str(text).split(",") if t.strip()))
    except ValueError:
        raise UsageError(f"--eps {text!r}: give budgets in /255 separated by commas, e.g. 4,8,12.75") from None
    if not values or any(not 1.0 <= v <= 255.0 for v in values):
        raise UsageError(f"--eps {text!r}: every budget is in /255 and within [1, 255] (one 8-bit level at least), "
                         "e.g. 4,8,12.75")
    return values


def edit_seed(pair_seed: int, k: int) -> int:
    """Noise seed of edit k of a pair: ``pair_seed + k·EDIT_SEED_STRIDE`` (k = 0: the pair's own
    seed, as ``edits.evaluate_edits``)."""
    return int(pair_seed) + int(k) * EDIT_SEED_STRIDE


def eot_pool(held_out, n: int = POOL_SIZE, max_seeds: int = 100_000) -> list[str]:
    """``n`` distinct instructions of training pairs (seeds 0, 1, ..., all below
    ``EVAL_SEED_START``), none of them in ``held_out`` (the evaluated instructions), in the
    order first drawn: the protection's EOT pool, disjoint from the test instructions."""
    held = {" ".join(t.lower().split()) for t in held_out}
    pool: dict[str, None] = {}
    for seed in range(min(max_seeds, EVAL_SEED_START)):
        text = edits.sample_edit(seed).instruction
        if " ".join(text.lower().split()) not in held:
            pool.setdefault(text)
            if len(pool) == n:
                return list(pool)
    raise UsageError(f"only {len(pool)} training instructions outside the {len(held)} held-out ones in "
                     f"{max_seeds} training pairs; ask for a smaller pool")


def row_key(method: str, eps255: float) -> str:
    return f"{method}@{eps255:g}/255"


def row_dir(out_dir: Path, method: str, eps255: float) -> Path:
    return Path(out_dir) / f"{method}_eps{eps255:g}"


# ----------------------------------------------------------------------------- files


def save_png(image, path: Path) -> np.ndarray:
    """Write a uint8 [H, W, 3] array or PIL image as PNG (atomically) and return the file's
    pixels as read back: what every metric is computed on."""
    from diffattn.pipelines.decontext import write_png_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
    write_png_atomic(im.convert("RGB"), path)
    return load_png(path)


def load_png(path) -> np.ndarray:
    """The RGB pixels of a PNG, uint8 [H, W, 3]."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def reusable(path: Path, size: tuple[int, int], reuse: bool) -> bool:
    """Whether an existing output may stand in for recomputing it (a complete PNG of ``size``,
    and the run allows reuse)."""
    from diffattn.pipelines.decontext import finished_output

    return reuse and finished_output(Path(path), size)


def write_json(doc: dict, path) -> None:
    """Write ``doc`` to ``path`` all at once (a temporary file, then ``os.replace``): a run
    killed mid-write keeps the previous rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- editing and grading


def edit_batch(pipe, images: list[np.ndarray], instructions: list[str], seeds: list[int], *,
               steps: int | None = None) -> list[np.ndarray]:
    """One batched call of the editor: each uint8 image [H, W, 3] edited with its instruction,
    its noise from ``torch.Generator().manual_seed(seed)``, at its own size (``max_area = H·W``,
    no auto-resize, so the protected pixels reach the editor as saved) -> uint8 [H, W, 3] each."""
    import torch

    h, w = images[0].shape[:2]
    kw = {"num_inference_steps": steps} if steps is not None else {}
    out = pipe(image=[Image.fromarray(im, "RGB") for im in images], prompt=list(instructions),
               generator=[torch.Generator().manual_seed(int(s)) for s in seeds], height=h, width=w, max_area=h * w,
               _auto_resize=False, output_type="np", **kw).images  # [B, H, W, 3] in [0, 1]
    return [(np.clip(np.asarray(im, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8) for im in out]


def edit_all(pipe, pairs, images: list[np.ndarray], n_seeds: int, folder: Path, *, steps=None, batch: int = 8,
             reuse: bool = False, desc: str = "edits") -> dict[tuple[int, int], np.ndarray]:
    """Edit image i with pair i's instruction under each of ``n_seeds`` edit seeds, in batches
    of ``batch`` consecutive pairs (the same chunks for clean and protected images), save each
    edit as ``folder/<pair seed>_s<k>.png`` and return ``{(i, k): the reloaded file}``. With
    ``reuse`` an edit already on disk is read instead (its batch still runs if any is missing)."""
    from tqdm.auto import tqdm

    out: dict[tuple[int, int], np.ndarray] = {}
    size = images[0].shape[1], images[0].shape[0]
    bar = tqdm(total=len(pairs) * n_seeds, desc=desc, dynamic_ncols=True, leave=False)
    for k in range(n_seeds):
        for start in range(0, len(pairs), batch):
            idx = list(range(start, min(start + batch, len(pairs))))
            paths = {i: Path(folder) / f"{pairs[i].seed}_s{k}.png" for i in idx}
            if all(reusable(paths[i], size, reuse) for i in idx):
                out.update({(i, k): load_png(paths[i]) for i in idx})
            else:
                edited = edit_batch(pipe, [images[i] for i in idx], [pairs[i].instruction for i in idx],
                                    [edit_seed(pairs[i].seed, k) for i in idx], steps=steps)
                out.update({(i, k): save_png(e, paths[i]) for i, e in zip(idx, edited)})
            bar.update(len(idx))
    bar.close()
    return out


def grade(pairs, edited: dict[tuple[int, int], np.ndarray], n_seeds: int) -> dict[tuple[int, int], "edits.EditScore"]:
    """The edit oracle's grade of every edit against its pair's clean source scene."""
    return {(i, k): edits.score_edit(pairs[i].source, pairs[i].instruction, edited[(i, k)])
            for i in range(len(pairs)) for k in range(n_seeds)}


def verdict(score) -> dict:
    """The JSON record of one grade: changed / preserved (True, False or None: unreadable),
    success, and what could not be read."""
    return {"changed": score.changed, "preserved": score.preserved, "success": score.success,
            "unreadable": list(score.unreadable)}


def per_image(scores: dict, n_images: int, n_seeds: int, field: str) -> np.ndarray:
    """Per-image fraction of its edits with ``field`` true (``is True``: unreadable counts as
    not) -> [n_images]."""
    v = np.array([[getattr(scores[(i, k)], field) is True for k in range(n_seeds)]
                  for i in range(n_images)], dtype=np.float64)  # [images, seeds]
    return v.mean(axis=1)


# ----------------------------------------------------------------------------- one row


def mean_shares(share_list: list[dict]) -> dict[str, float]:
    """Per-block r_ctx averaged over images (the blocks of the first record, in forward order)."""
    if not share_list:
        return {}
    return {name: float(np.mean([s[name] for s in share_list])) for name in share_list[0]}


def summarize(method: str, eps255: float, pairs, n_seeds: int, clean_scores: dict, prot_scores: dict,
              clean_images: list[np.ndarray], prot_images: list[np.ndarray], *, shares=None,
              settings: dict | None = None, seconds: list[float] | None = None) -> dict:
    """The JSON row of one (method, ε) from the graded edits and the reloaded files (module
    notes, "Columns")."""
    from diffattn.pipelines import psnr
    from diffattn.pipelines.decontext import eps_levels

    n = len(pairs)
    row = {"method": method, "eps_255": float(eps255), "eps": eps255 / 255, "eps_levels": eps_levels(eps255 / 255),
           "n_images": n, "n_seeds": n_seeds, "n_edits": n * n_seeds}
    row.update(settings or {})
    for field in ("success", "preserved", "changed"):
        c, p = per_image(clean_scores, n, n_seeds, field), per_image(prot_scores, n, n_seeds, field)
        row[f"{field}_clean"] = rate_metric(c)._asdict()
        row[f"{field}_protected"] = rate_metric(p)._asdict()
        if field != "changed":
            mean, low, high = paired_bootstrap(p, c)
            row[f"drop_{field}"] = {"mean": mean, "low": low, "high": high}
    for tag, scores in (("clean", clean_scores), ("protected", prot_scores)):
        row[f"unreadable_{tag}"] = rate_metric([not s.readable for s in scores.values()])._asdict()
        row[f"metrics_{tag}"] = {k: m._asdict() for k, m in edits.edit_metrics(list(scores.values())).items()}
    ps = [psnr(c / 255.0, p / 255.0) for c, p in zip(clean_images, prot_images)]
    linf = [int(np.abs(c.astype(np.int32) - p.astype(np.int32)).max()) for c, p in zip(clean_images, prot_images)]
    row["psnr"] = {"mean": float(np.mean(ps)), "min": float(np.min(ps)), "max": float(np.max(ps))}
    row["linf_levels"] = linf
    row["linf_levels_max"] = max(linf)
    if shares is not None:
        row["r_ctx"] = shares
        row["r_ctx_mean"] = {k: float(np.mean(list(v.values()))) if v else float("nan") for k, v in shares.items()}
    fresh = [s for s in (seconds or []) if s is not None]
    row["seconds_per_image"] = float(np.mean(fresh)) if fresh else None
    row["edits"] = [{"pair_seed": pairs[i].seed, "edit_seed": edit_seed(pairs[i].seed, k), "k": k,
                     "instruction": pairs[i].instruction, "kind": pairs[i].spec.kind,
                     "clean": verdict(clean_scores[(i, k)]), "protected": verdict(prot_scores[(i, k)])}
                    for i in range(n) for k in range(n_seeds)]
    return row


def protect_all(protector, pairs, clean_images: list[np.ndarray], folder: Path, *, reuse: bool,
                desc: str) -> tuple[list[np.ndarray], list[float | None]]:
    """Protect every clean image (EOT seed = its pair's seed), save it as
    ``folder/<pair seed>.png`` and reload it -> (the files' pixels, the seconds of each
    protection, None where a file was reused: with ``reuse``, a file whose provenance is this
    protection's own, ``DeContextProtector.provenance``)."""
    from tqdm.auto import tqdm

    from diffattn.pipelines.decontext import finished_output

    images, seconds = [], []
    Path(folder).mkdir(parents=True, exist_ok=True)
    for pair, clean in tqdm(list(zip(pairs, clean_images)), desc=desc, dynamic_ncols=True, leave=False):
        path = Path(folder) / f"{pair.seed}.png"
        if reuse and finished_output(path, (clean.shape[1], clean.shape[0]), protector.provenance(clean, pair.seed)):
            images.append(load_png(path))
            seconds.append(None)
            continue
        result = protector.protect(clean, diagnostics=False, seed=pair.seed)
        result.save(path)
        images.append(load_png(path))
        seconds.append(result.seconds)
    return images, seconds


# ----------------------------------------------------------------------------- the run


def run_eval(pipe, *, model: str = "tiny-kontext", images: int = 50, seeds: int = 2, methods=METHODS,
             eps=EPS_255, steps: int = 200, alpha: float = DEFAULT_ALPHA, edit_steps: int | None = None,
             batch: int = 8, out_dir="runs/decontext_eval", json_path=None, resume: bool = False,
             overwrite: bool = False, progress: bool = True) -> dict:
    """The whole protocol (module notes) on the editor ``pipe`` -> the JSON document
    ``{"settings", "rows"}``; rows already in ``json_path`` are skipped with ``resume``."""
    from tqdm.auto import tqdm

    from diffattn.pipelines import DeContextProtector

    if images < 1 or seeds < 1 or steps < 1 or batch < 1:
        raise UsageError(f"images, seeds, steps and batch are at least 1 (got {images}, {seeds}, {steps}, {batch})")
    if resume and json_path is None:
        raise UsageError("--resume continues the rows of a --json file; give --json PATH")
    methods, eps = list(methods), [float(e) for e in eps]
    pairs = edits.eval_edit_pairs(images)
    pool = eot_pool([p.instruction for p in pairs])
    settings = {"model": str(model), "images": images, "seeds": seeds, "steps": steps, "alpha": alpha,
                "edit_steps": edit_steps, "edit_batch": batch, "pool": pool, "share_samples": SHARE_SAMPLES,
                "pair_seeds": [pairs[0].seed, pairs[-1].seed]}
    doc = {"protocol": "benchmarks/decontext_eval.py", "settings": settings, "rows": []}
    if json_path is not None and Path(json_path).is_file():
        old = json.loads(Path(json_path).read_text())
        if resume:
            if old.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(old.get("settings", {}))
                              if settings.get(k) != old.get("settings", {}).get(k))
                raise UsageError(f"--resume: {json_path} was made with other settings ({', '.join(diff)} differ); "
                                 f"rerun with its settings, or write another --json")
            doc["rows"] = list(old.get("rows", []))
        elif old.get("rows") and not overwrite:
            raise UsageError(f"{json_path} already holds {len(old['rows'])} rows; continue it with --resume, or "
                             f"replace it with --overwrite")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / "settings.json"
    reuse = resume and marker.is_file() and json.loads(marker.read_text()) == settings  # files of these settings
    marker.write_text(json.dumps(settings, indent=1))
    done = {row_key(r["method"], r["eps_255"]) for r in doc["rows"]}
    todo = [(m, e) for m in methods for e in eps if row_key(m, e) not in done]

    clean = [save_png(render(p.source), out_dir / "clean" / f"{p.seed}.png") for p in pairs]
    if todo:
        clean_edits = edit_all(pipe, pairs, clean, seeds, out_dir / "clean_edits", steps=edit_steps, batch=batch,
                               reuse=reuse, desc="clean edits")
        clean_scores = grade(pairs, clean_edits, seeds)
    clean_shares = None
    for method, e in tqdm(todo, desc="rows", dynamic_ncols=True, disable=not progress):
        protector = DeContextProtector(pipe, progress=False, method=method, eps=e / 255, alpha=alpha, steps=steps,
                                       instructions=pool, seed=0)
        folder = row_dir(out_dir, method, e)
        prot, seconds = protect_all(protector, pairs, clean, folder / "protected", reuse=reuse, desc=row_key(method, e))
        if clean_shares is None:  # the same EOT draws for every image and row (shares' fixed seed)
            clean_shares = [protector.shares(c, samples=SHARE_SAMPLES) for c in clean]
        prot_shares = [protector.shares(p, samples=SHARE_SAMPLES) for p in prot]
        prot_edits = edit_all(pipe, pairs, prot, seeds, folder / "edits", steps=edit_steps, batch=batch, reuse=reuse,
                              desc=f"{row_key(method, e)} edits")
        row = summarize(method, e, pairs, seeds, clean_scores, grade(pairs, prot_edits, seeds), clean, prot,
                        shares={"clean": mean_shares(clean_shares), "protected": mean_shares(prot_shares)},
                        settings={"steps": 0 if method == "random" else steps, "alpha": alpha,
                                  "attacked_blocks": list(protector.blocks)},
                        seconds=seconds)
        doc["rows"].append(row)
        if json_path is not None:
            write_json(doc, json_path)
    doc["rows"].sort(key=lambda r: (METHODS.index(r["method"]), r["eps_255"]))
    if json_path is not None:
        write_json(doc, json_path)
    return doc


# ----------------------------------------------------------------------------- reports


def _ci(m: dict) -> str:
    return f"{m['value']:.2f} [{m['low']:.2f}, {m['high']:.2f}]"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (module notes, "Columns")."""
    head = ("| method | ε | success clean | success prot. | Δ success [95% CI] | preserved clean | preserved prot. | "
            "Δ preserved | changed prot. | PSNR dB | ‖δ‖∞ | r_ctx clean → prot. | s/image | n |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d, dp = r["drop_success"], r["drop_preserved"]
        rc = r.get("r_ctx_mean", {})
        sec = "–" if r.get("seconds_per_image") is None else f"{r['seconds_per_image']:.1f}"
        lines.append(f"| {r['method']} | {r['eps_255']:g}/255 | {_ci(r['success_clean'])} | "
                     f"{_ci(r['success_protected'])} | {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] | "
                     f"{_ci(r['preserved_clean'])} | {_ci(r['preserved_protected'])} | "
                     f"{dp['mean']:+.2f} [{dp['low']:+.2f}, {dp['high']:+.2f}] | {_ci(r['changed_protected'])} | "
                     f"{r['psnr']['mean']:.1f} | {r['linf_levels_max']}/255 | "
                     f"{rc.get('clean', float('nan')):.3f} → {rc.get('protected', float('nan')):.3f} | {sec} | "
                     f"{r['n_images']}×{r['n_seeds']} |")
    return "\n".join(lines)


def _cell(arr: np.ndarray, ok, scale: int) -> Image.Image:
    """An image upscaled (nearest), framed by its verdict's colour (``ok`` True / False / None;
    the string "none": no frame)."""
    im = Image.fromarray(arr, "RGB").resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    if ok != "none":
        ImageDraw.Draw(im).rectangle([0, 0, im.width - 1, im.height - 1], outline=VERDICT_COLOURS[ok], width=3)
    return im


def _ok(record: dict):
    """True / False for a graded edit, None when it was unreadable."""
    return None if record["unreadable"] else bool(record["success"])


def grid(doc: dict, out_dir, eps255: float, n_images: int = 4, scale: int = GRID_SCALE) -> Image.Image:
    """Rows: the first ``n_images`` images; columns: source | its edit | per method of ``doc``
    (at ``eps255``): protected | its edit; edit seed 0, frames by verdict (module notes)."""
    out_dir = Path(out_dir)
    rows = [r for r in doc["rows"] if r["eps_255"] == float(eps255)]
    if not rows:
        raise UsageError(f"no rows at ε = {eps255:g}/255 to draw; pick --grid-eps among the rows' budgets")
    seeds = [e["pair_seed"] for e in rows[0]["edits"] if e["k"] == 0][:n_images]
    labels = ["source", "edit"] + [t for r in rows for t in (f"{r['method']} {eps255:g}", "edit")]
    side = 64 * scale
    label_h = 14
    sheet = Image.new("RGB", (side * len(labels), label_h + side * len(seeds)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(labels):
        draw.text((c * side + 3, 1), text, fill="black")
    for r, seed in enumerate(seeds):
        verdicts = {row["method"]: next(e for e in row["edits"] if e["pair_seed"] == seed and e["k"] == 0)
                    for row in rows}
        first = verdicts[rows[0]["method"]]
        cells = [_cell(load_png(out_dir / "clean" / f"{seed}.png"), "none", scale),
                 _cell(load_png(out_dir / "clean_edits" / f"{seed}_s0.png"), _ok(first["clean"]), scale)]
        for row in rows:
            folder = row_dir(out_dir, row["method"], row["eps_255"])
            cells += [_cell(load_png(folder / "protected" / f"{seed}.png"), "none", scale),
                      _cell(load_png(folder / "edits" / f"{seed}_s0.png"), _ok(verdicts[row["method"]]["protected"]),
                            scale)]
        for c, im in enumerate(cells):
            sheet.paste(im, (c * side, label_h + r * side))
    return sheet


def plot_rctx(doc: dict, path, eps255: float) -> Path:
    """DeContext's per-block r_ctx, clean vs protected, at ``eps255`` (``decontext.plot_shares``)."""
    from diffattn.pipelines.decontext import plot_shares

    row = next((r for r in doc["rows"] if r["method"] == "decontext" and r["eps_255"] == float(eps255)), None)
    if row is None or not row.get("r_ctx"):
        raise UsageError(f"no DeContext row at ε = {eps255:g}/255 with r_ctx to plot; run --methods decontext there")
    plot_shares(row["r_ctx"], path)
    return Path(path)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="DeContext and its baselines on the testbed's in-context editor: edit "
                                             "success and context preservation on clean vs protected images.")
    ap.add_argument("--model", default="tiny-kontext",
                    help="the editor: tiny-kontext or an exported tiny-kontext folder (diffattn.testbed.load)")
    ap.add_argument("--images", type=int, default=50, help="held-out source images, each with its instruction")
    ap.add_argument("--seeds", type=int, default=2, help="edit seeds per (image, instruction)")
    ap.add_argument("--methods", type=parse_methods, default=list(METHODS), help="comma-separated, of "
                                                                                 + ",".join(METHODS))
    ap.add_argument("--eps", type=parse_eps_list, default=list(EPS_255), help="budgets in /255, e.g. 4,8,12.75")
    ap.add_argument("--steps", type=int, default=200, help="PGD steps, the same for every gradient method")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                    help="PGD step in [0, 1] pixel units (default 0.0025 = the paper's)")
    ap.add_argument("--edit-steps", type=int, default=None, help="editing steps (default: the editor's)")
    ap.add_argument("--batch", type=int, default=8, help="edits per editor call")
    ap.add_argument("--out-dir", default="runs/decontext_eval", help="folder of the saved PNGs")
    ap.add_argument("--json", default=None, help="results JSON, rewritten after every row")
    ap.add_argument("--resume", action="store_true", help="skip the rows already in --json (same settings)")
    ap.add_argument("--overwrite", action="store_true", help="replace a --json that already holds rows")
    ap.add_argument("--grid", default=None, help="grid PNG of the first --grid-images images")
    ap.add_argument("--grid-images", type=int, default=4)
    ap.add_argument("--grid-eps", type=float, default=None, help="the budget (/255) of the grid and plot (default "
                                                                 "the largest)")
    ap.add_argument("--plot", default=None, help="PNG of DeContext's per-block r_ctx, clean vs protected")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import torch

    from diffattn import testbed

    grid_eps = max(args.eps) if args.grid_eps is None else args.grid_eps
    if (args.grid or args.plot) and grid_eps not in args.eps:
        raise UsageError(f"--grid-eps {grid_eps:g} is not among --eps {args.eps}")
    if args.plot and "decontext" not in args.methods:
        raise UsageError("--plot draws DeContext's r_ctx: include decontext in --methods")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = testbed.load(args.model).to(args.device)
    doc = run_eval(pipe, model=args.model, images=args.images, seeds=args.seeds, methods=args.methods, eps=args.eps,
                   steps=args.steps, alpha=args.alpha, edit_steps=args.edit_steps, batch=args.batch,
                   out_dir=args.out_dir, json_path=args.json, resume=args.resume, overwrite=args.overwrite)
    print(markdown_table(doc["rows"]))
    if args.grid:
        grid(doc, args.out_dir, grid_eps, args.grid_images).save(args.grid)
        print(f"wrote {args.grid}")
    if args.plot:
        plot_rctx(doc, args.plot, grid_eps)
        print(f"wrote {args.plot}")
    if args.json:
        print(f"wrote {args.json}")
    print(f"{len(doc['rows'])} rows in {time.perf_counter() - start:.1f} s")
    return doc


if __name__ == "__main__":
    main()
