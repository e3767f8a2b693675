"""A-STAR / Attend-and-Excite: concepts picked from the prompt's words; the baseline (the same
loop without latent updates) beside A-STAR, with both runs' concept heat maps.

Endpoints: ``/astar`` (generate), ``/astar_concepts`` (the words of a prompt, the picker's choices)."""
from __future__ import annotations

import re

from ..core import TabSpec, register_tab
from ..serving import endpoint
from ..widgets import (DEFAULT_PROMPT, Progress, call_kwargs, generator, model_name, number_or_none, optional_number,
                       pick_seed, results, standard_inputs)

STOP = {"a", "an", "the", "and", "of", "on", "in", "with", "to", "left", "right", "above", "below", "next", "is"}


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words, in order, without repeats and without the small function words."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", prompt or "")
    return list(dict.fromkeys(w for w in words if w.lower() not in STOP))


def default_words(prompt: str) -> list[str]:
    """The testbed's concepts of a shapes-world caption (its shape nouns), else none."""
    from diffattn.errors import ConceptError
    from diffattn.testbed.defaults import default_concepts

    try:
        return default_concepts(prompt)
    except ConceptError:
        return []


def build(ctx):
    import gradio as gr

    from diffattn.methods.registry import get_method

    method = get_method("astar")
    with gr.Row():
        with gr.Column():
            std = standard_inputs(ctx)
            concepts = gr.Dropdown(prompt_words(DEFAULT_PROMPT), value=default_words(DEFAULT_PROMPT), multiselect=True,
                                   allow_custom_value=True, label="concepts (words of the prompt)",
                                   info=method.param("concepts").help + "; empty on a testbed caption: its shapes")
            with gr.Row():
                loss = gr.Radio(list(method.param("loss").choices), value=method.param("loss").default, label="loss",
                                info=method.param("loss").help)
                temperature = optional_number(None, "temperature (empty: the method's / testbed's default)")
            with gr.Row():
                keys = method.param("text_keys")
                text_keys = gr.Radio(list(keys.choices), value=keys.default, label="text keys", info=keys.help)
                centre = method.param("center_tokens")
                center_tokens = gr.Checkbox(bool(centre.default), label="center tokens", info=centre.help)
            go = gr.Button("Generate", variant="primary", elem_id="astar-generate")
        with gr.Column():
            gallery, maps, info = results("astar", "baseline | A-STAR")

    def words(prompt):
        return gr.Dropdown(choices=prompt_words(prompt), value=default_words(prompt))

    @endpoint
    def run(model, prompt, seed, randomize, steps, guidance, images, concepts, loss, temperature, text_keys=None,
            center_tokens=None, progress=gr.Progress()):
        from diffattn.methods.registry import split_concepts
        from diffattn.pipelines.astar import AStarConfig, AStarPipeline
        from diffattn.testbed.defaults import method_defaults

        seed = pick_seed(seed, randomize)
        kw = call_kwargs(ctx, steps, guidance, images)
        chosen = split_concepts(concepts) if isinstance(concepts, str) else list(concepts or [])
        with ctx.pool.acquire(model_name(ctx, model)) as pipe:
            params = method_defaults("astar", pipe)
            if chosen:
                params["concepts"] = chosen
            t = number_or_none(temperature, "temperature")
            if t is not None:
                params["temperature"] = t
            params["loss"] = loss or method.param("loss").default
            params["text_keys"] = text_keys or method.param("text_keys").default
            params["center_tokens"] = method.param("center_tokens").default if center_tokens is None else center_tokens
            built = method.build(pipe, **params)  # the registry checks every value (choices, ranges, types)
            built.check(prompt)  # ConceptError before any image (a word not in the prompt...)
            cfg = built.pipeline.config  # the checked values: the baseline locates the same tokens
            overrides = {"text_keys": cfg.text_keys, "center_tokens": cfg.center_tokens}
            if params.get("temperature") is not None:
                overrides["temperature"] = float(params["temperature"])
            baseline = AStarPipeline(pipe, AStarConfig.astar(max_iter_to_alter=0, **overrides))
            bar = Progress(progress, loops=2)
            base = baseline(prompt, params["concepts"], generator=generator(seed, pipe), return_attention_maps=True,
                            callback=bar.callback, progress=False, **kw)
            out = built(prompt, generator=generator(seed, pipe), callback=bar.callback, progress=False, **kw)
        pairs = [x for b, c in zip(base.images, out.images) for x in ((b, "baseline"), (c, built.label))]
        heat = []
        for b, c in zip(base.attention_maps, out.maps):
            heat += [(im, f"baseline: {k}") for k, im in b.items()] + [(im, f"{built.label}: {k}") for k, im in c.items()]
        concept_names = ", ".join(out.maps[0]) if out.maps else ""
        return pairs, heat, f"seed **{seed}** · {built.label} · concepts {concept_names}", seed

    std.prompt.change(words, std.prompt, concepts, api_name="astar_concepts")
    go.click(run, std.inputs() + [concepts, loss, temperature, text_keys, center_tokens], [gallery, maps, info, std.seed], api_name="astar")


register_tab(TabSpec("astar", "A-STAR", build, methods=("astar",), endpoints=("astar", "astar_concepts"), order=30))
