"""SoftPAG: heads by selector text or preset (shipped or uploaded), strength and scale,
target and semantics; baseline | SoftPAG side by side and a per-head heat map of the heads.

Endpoints: ``/softpag`` (generate), ``/softpag_heads`` (the heat map of a heads choice)."""
from __future__ import annotations

from ..core import TabSpec, register_tab
from ..serving import AppInputError, endpoint
from ..widgets import Progress, call_kwargs, generator, model_name, pick_seed, results, standard_inputs

PRESET = "preset:"


def shipped_presets() -> list[str]:
    """The presets in the testbed's ``assets/presets/`` as ``preset:<name>`` choices."""
    from diffattn import testbed

    folder = testbed.assets_dir() / "presets"
    return [PRESET + p.stem for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _preset_file(choice: str):
    from diffattn import testbed

    name = choice[len(PRESET):].strip()
    path = testbed.assets_dir() / "presets" / f"{name}.json"
    if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
        raise AppInputError(f"no shipped preset {name!r}; shipped: {', '.join(shipped_presets()) or 'none'}")
    return path


def heads_spec(pipe, heads: str, preset_upload=None, limits=None):
    """The ``SoftPAG(heads=...)`` value of the tab's inputs: an uploaded preset (JSON), a shipped
    preset, ``mid``, ``all``, or a site selector with optional heads (``transformer_blocks.2:0,3``)."""
    from diffattn.methods.softpag import PERTURBABLE_KINDS, load_preset, middle_layer
    from diffattn.sites import select

    if preset_upload is not None:
        from ..serving import read_json

        return read_json(preset_upload, limits, "uploaded preset")  # SoftPAG checks what it holds
    heads = (heads or "mid").strip()
    if heads == "mid":
        return middle_layer(pipe)
    if heads == "all":
        return "all"
    if heads.startswith(PRESET):
        return load_preset(str(_preset_file(heads)))
    selector, head_list = heads, "all"
    if ":" in heads:
        selector, head_list = (part.strip() for part in heads.rsplit(":", 1))
    chosen = [s for s in select(pipe, selector) if s.kind in PERTURBABLE_KINDS]
    if not chosen:
        raise AppInputError(f"selector {selector!r} names no self, joint or single-stream site (SoftPAG perturbs those)")
    return {s.name: head_list for s in chosen}


def build_control(pipe, heads, preset_upload, strength, scale, target, semantics, preset_values, limits):
    from diffattn.methods.softpag import SoftPAG, is_preset

    spec = heads_spec(pipe, heads, preset_upload, limits)
    own = bool(preset_values) and is_preset(spec)
    from diffattn.methods.registry import get_method

    method = get_method("softpag")
    given = {k: v for k, v in (("target", target), ("semantics", semantics)) if v}
    values = method.resolve(**given)  # the registry's choices and defaults
    return SoftPAG(spec, strength=None if own else float(strength), scale=None if own else float(scale),
                   target=values["target"], semantics=values["semantics"])


def heads_heatmap(pipe, control, cell: int = 20):
    """Layers (rows) × heads (columns) of the perturbable sites, each cell the head's u
    (white 0 .. red 1), site names on the left."""
    import numpy as np
    from PIL import Image, ImageDraw

    from diffattn.methods.softpag import PERTURBABLE_KINDS, resolve_heads
    from diffattn.sites import sites

    all_sites = sites(pipe)
    u = resolve_heads(all_sites, control.head_spec, control.strength)
    rows = [s for s in all_sites if s.kind in PERTURBABLE_KINDS]
    width = max(s.heads for s in rows)
    label_w = 7 * max(len(s.alias or s.name) for s in rows) // 1 + 8
    img = Image.new("RGB", (label_w + cell * width, cell * len(rows) + 16), "white")
    draw = ImageDraw.Draw(img)
    for h in range(width):
        draw.text((label_w + h * cell + cell // 3, 2), str(h), fill="black")
    for r, s in enumerate(rows):
        y = 16 + r * cell
        draw.text((2, y + cell // 4), s.alias or s.name, fill="black")
        vec = u.get(s.name)
        for h in range(s.heads):
            v = float(vec[h]) if vec is not None else 0.0
            colour = tuple(int(c) for c in np.array([255, 255 * (1 - v), 255 * (1 - v)]))
            draw.rectangle([label_w + h * cell, y, label_w + (h + 1) * cell - 2, y + cell - 2], fill=colour,
                           outline="gray")
    return img


def build(ctx):
    import gradio as gr

    from diffattn.methods.registry import get_method

    method = get_method("softpag")
    with gr.Row():
        with gr.Column():
            std = standard_inputs(ctx)
            heads = gr.Dropdown(["mid", "all", *shipped_presets()], value="mid", label="heads",
                                allow_custom_value=True,
                                info="mid, all, a shipped preset, or a site selector[:heads] "
                                     "(e.g. transformer_blocks.2:0,3)")
            preset = gr.File(label="or upload a preset JSON (HeadHunter)", file_types=[".json"], type="filepath")
            with gr.Row():
                strength = gr.Slider(0, 1, value=1.0, step=0.05, label="strength u", info=method.param("strength").help)
                scale = gr.Slider(0, 10, value=2.0, step=0.1, label="scale s", info=method.param("scale").help)
            preset_values = gr.Checkbox(True, label="a preset's own u and s (uncheck to use the sliders)")
            with gr.Row():
                tp, sp = method.param("target"), method.param("semantics")
                target = gr.Dropdown(list(tp.choices), value=tp.default, label="target", info=tp.help)
                semantics = gr.Dropdown(list(sp.choices), value=sp.default, label="semantics", info=sp.help)
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="softpag-generate")
                show = gr.Button("Show heads")
        with gr.Column():
            gallery, _, info = results("softpag", "baseline | SoftPAG", maps=False)
            heatmap = gr.Image(label="heads (u per head)", type="pil", format="png", elem_id="softpag-heads")

    control_inputs = [heads, preset, strength, scale, target, semantics, preset_values]

    @endpoint
    def run(model, prompt, seed, randomize, steps, guidance, images, heads, preset, strength, scale, target,
            semantics, preset_values, progress=gr.Progress()):
        from diffattn.engine import attach

        seed = pick_seed(seed, randomize)
        kw = call_kwargs(ctx, steps, guidance, images)
        with ctx.pool.acquire(model_name(ctx, model)) as pipe:
            control = build_control(pipe, heads, preset, strength, scale, target, semantics, preset_values,
                                    ctx.limits)
            bar = Progress(progress, loops=2)
            base = pipe(prompt, generator=generator(seed, pipe), callback_on_step_end=bar.diffusers("baseline"),
                        **kw).images
            with attach(pipe, control):
                out = pipe(prompt, generator=generator(seed, pipe), callback_on_step_end=bar.diffusers("SoftPAG"),
                           **kw).images
            hm = heads_heatmap(pipe, control)
        label = f"SoftPAG s={control.scale:g}"
        pairs = [x for b, c in zip(base, out) for x in ((b, "baseline"), (c, label))]
        text = f"seed **{seed}** · {label} · target {control.target} · semantics {control.semantics}"
        return pairs, hm, text, seed

    @endpoint
    def heads_only(model, heads, preset, strength, scale, target, semantics, preset_values):
        with ctx.pool.acquire(model_name(ctx, model)) as pipe:
            control = build_control(pipe, heads, preset, strength, scale, target, semantics, preset_values,
                                    ctx.limits)
            return heads_heatmap(pipe, control)

    go.click(run, std.inputs() + control_inputs, [gallery, heatmap, info, std.seed], api_name="softpag")
    show.click(heads_only, [std.model] + control_inputs, heatmap, api_name="softpag_heads")


register_tab(TabSpec("softpag", "SoftPAG", build, methods=("softpag",), endpoints=("softpag", "softpag_heads"),
                     order=10))
