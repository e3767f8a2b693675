"""HeadHunter: a small greedy head search with live progress, its per-head heat map and the
preset JSON to download (usable in the SoftPAG tab). Endpoint ``/headhunt``."""
from __future__ import annotations

from ..core import TabSpec, register_tab
from ..serving import endpoint, whole
from ..widgets import model_name, number_or_none

DEFAULT_PROMPTS = "a red circle and a blue square\na green triangle above a yellow circle"
PRESET_TTL_S = 3600  # a written preset is removed this long after (Gradio serves its own copy of it)

_preset_dir = None


def preset_dir():
    """The folder of this process's preset files (made once, removed at exit)."""
    global _preset_dir
    if _preset_dir is None:
        import atexit
        import shutil
        import tempfile
        from pathlib import Path

        _preset_dir = Path(tempfile.mkdtemp(prefix="diffattn-headhunt-"))
        atexit.register(shutil.rmtree, _preset_dir, ignore_errors=True)
    return _preset_dir


def write_preset(preset: dict, ttl_s: float = PRESET_TTL_S):
    """``preset`` as a JSON file of its own (a name per request, so concurrent searches never share
    one) in :func:`preset_dir`; files written more than ``ttl_s`` seconds ago are removed first, so
    the folder does not grow with every request."""
    import json
    import time
    import uuid

    folder = preset_dir()
    now = time.time()
    for old in folder.glob("headhunt-preset-*.json"):
        try:
            if now - old.stat().st_mtime > ttl_s:
                old.unlink()
        except OSError:  # removed meanwhile
            pass
    path = folder / f"headhunt-preset-{uuid.uuid4().hex[:12]}.json"
    path.write_text(json.dumps(preset, indent=1))
    return path


def build(ctx):
    import gradio as gr

    from diffattn import testbed  # noqa: F401  (registers the testbed's oracle objectives)
    from diffattn.methods.objectives import objective_help, objective_names

    lim = ctx.limits
    names = list(objective_names())
    with gr.Row():
        with gr.Column():
            model = ctx.model_picker()
            objective = gr.Dropdown(names, value="fidelity" if "fidelity" in names else names[0], label="objective",
                                    info="; ".join(f"{n}: {objective_help(n)}" for n in names if objective_help(n)))
            prompts = gr.Textbox(DEFAULT_PROMPTS, lines=3, label="prompts (one per line)")
            candidates = gr.Textbox("transformer_blocks.2-3", label="candidate sites (selector; 'all': every head)",
                                    info=f"at most {lim.max_candidates} heads")
            with gr.Row():
                seeds = gr.Number(2, label=f"prompt-seed pairs (at most {lim.max_seeds})", precision=0)
                top_k = gr.Slider(1, 4, value=2, step=1, label="top k")
                rounds = gr.Number(1, label=f"rounds (at most {lim.max_rounds})", precision=0)
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    scale = gr.Slider(0, 10, value=2.0, step=0.1, label="scale s")
                    strength = gr.Slider(0, 1, value=1.0, step=0.05, label="u written into the preset")
                with gr.Row():
                    steps = gr.Number(min(8, lim.max_steps), label=f"steps (at most {lim.max_steps})", precision=0)
                    guidance = gr.Number(0.0, label="CFG of the search's images (the paper: 0)", minimum=0)
            go = gr.Button("Search", variant="primary", elem_id="headhunt-run")
        with gr.Column():
            heatmap = gr.Image(label="per-head objective (round 1; selected heads framed)", type="pil", format="png",
                               elem_id="headhunt-heatmap")
            preset = gr.File(label="preset JSON")
            info = gr.Markdown()

    @endpoint
    def run(model, objective, prompts, candidates, seeds, top_k, rounds, scale, strength, steps, guidance,
            progress=gr.Progress(track_tqdm=True)):
        from diffattn.methods.headhunter import HeadHunter, make_objective
        from diffattn.sites import select
        from diffattn.testbed.evaluate import TRAIN_SEEDS

        lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        if not lines:
            from ..serving import AppInputError

            raise AppInputError("give at least one prompt")
        n_seeds = lim.count(seeds, lim.max_seeds, "prompt-seed pairs")
        n_rounds = lim.count(rounds, lim.max_rounds, "rounds")
        kw = {"num_inference_steps": lim.steps(steps) or 8}
        w = number_or_none(guidance, "guidance")
        if w is not None:
            kw["guidance_scale"] = w
        fn = make_objective(objective)
        with ctx.pool.acquire(model_name(ctx, model)) as pipe:
            from diffattn.methods.softpag import PERTURBABLE_KINDS
            from diffattn.sites import sites

            text = (candidates or "all").strip()
            cands = "all" if text == "all" else [(s.name, h) for s in select(pipe, text) if s.kind in PERTURBABLE_KINDS
                                                 for h in range(s.heads)]

            count = (sum(s.heads for s in sites(pipe) if s.kind in PERTURBABLE_KINDS) if cands == "all"
                     else len(cands))
            lim.count(count, lim.max_candidates, "candidate heads")
            hunt = HeadHunter(pipe, fn, lines, list(TRAIN_SEEDS)[:n_seeds], candidates=cands, top_k=whole(top_k, "top k"),
                              rounds=n_rounds, scale=float(scale), strength=float(strength), progress=True,
                              distributed=False, batch_size=max(1, n_seeds), **kw)
            result = hunt.run()
        path = write_preset(result.preset())
        picked = ", ".join(f"{s}:{h}" for s, h in result.selected) or "none"
        text = (f"selected **{picked}** · baseline objective {result.baseline:.4f} · best "
                f"{max(result.rounds[0].values()):.4f} · {len(result.rounds[0])} candidates, {n_seeds} pairs")
        return result.heatmap(0), str(path), text

    go.click(run, [model, objective, prompts, candidates, seeds, top_k, rounds, scale, strength, steps, guidance],
             [heatmap, preset, info], api_name="headhunt")


register_tab(TabSpec("headhunt", "HeadHunter", build, endpoints=("headhunt",), order=20))
