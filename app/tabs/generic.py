"""The tab of a registry method without a tab of its own, built from its ``Param`` list:
a string with choices is a dropdown, a bounded number a slider, another number a number box,
a bool a checkbox, any other string a text box; baseline | method in the gallery and the
method's maps (``MethodOutput.maps``) under it. Endpoint ``/<method name>``."""
from __future__ import annotations

import inspect

from ..core import TabSpec
from ..serving import endpoint
from ..widgets import Progress, call_kwargs, generator, model_name, pick_seed, results, standard_inputs


STANDARD = ("model", "prompt", "seed", "randomize", "steps", "guidance", "images")  # standard_inputs().inputs()


def param_component(p):
    import gradio as gr

    label = p.name.replace("_", " ")
    if p.choices is not None:
        return gr.Dropdown(list(p.choices), value=p.default, label=label, info=p.help)
    if p.type is bool:
        return gr.Checkbox(bool(p.default), label=label, info=p.help)
    if p.type in (int, float):
        lo, hi = p.range or (None, None)
        if p.default is None:  # "the method decides": an empty box (a slider or gr.Number would send a value)
            from ..widgets import optional_number

            return optional_number(None, label, info=p.help)
        if lo is not None and hi is not None:
            return gr.Slider(lo, hi, value=p.default, step=1 if p.type is int else (hi - lo) / 100, label=label,
                             info=p.help)
        return gr.Number(p.default, label=label, info=p.help, precision=0 if p.type is int else None,
                         minimum=lo, maximum=hi)
    if p.repeated:  # one value per line (Param.check splits the lines)
        return gr.Textbox("" if p.default is None else "\n".join(map(str, p.default)), label=label, lines=3,
                          info=f"{p.help} (one per line)")
    return gr.Textbox("" if p.default is None else str(p.default), label=label, info=p.help)


def generic_tab(method) -> TabSpec:
    """A :class:`TabSpec` for ``method`` (a registry ``Method``)."""

    def build(ctx):
        import gradio as gr

        with gr.Row():
            with gr.Column():
                std = standard_inputs(ctx)
                if method.summary:
                    gr.Markdown(method.summary)
                fields = [param_component(p) for p in method.params]
                go = gr.Button("Generate", variant="primary", elem_id=f"{method.name}-generate")
            with gr.Column():
                gallery, maps, info = results(method.name, f"baseline | {method.label}")

        n = len(STANDARD) + len(method.params)

        def run(*args):
            from diffattn.testbed.defaults import method_defaults

            model, prompt, seed, randomize, steps, guidance, images = args[:len(STANDARD)]
            values = args[len(STANDARD):n]
            progress = args[n] if len(args) > n else None

            seed = pick_seed(seed, randomize)
            kw = call_kwargs(ctx, steps, guidance, images)
            given = {p.name: v for p, v in zip(method.params, values) if v not in (None, "")}
            with ctx.pool.acquire(model_name(ctx, model)) as pipe:
                built = method.build(pipe, **{**method_defaults(method.name, pipe), **given})
                built.check(prompt)
                own = method.own_baseline  # e.g. IR-Diffusion: its run makes its own baseline of the same noise
                bar = Progress(progress, loops=1 if own else 2)
                base = [] if own else pipe(prompt, generator=generator(seed, pipe),
                                           callback_on_step_end=bar.diffusers("baseline"), **kw).images
                out = built(prompt, generator=generator(seed, pipe), **kw)
            if out.info.get("own_baseline"):  # its panels, labelled by the method
                pairs = list(zip(out.images, out.info["labels"]))
            else:
                pairs = [x for b, c in zip(base, out.images) for x in ((b, "baseline"), (c, built.label))]
            heat = [(im, f"{built.label}: {k}") for m in out.maps for k, im in m.items()]
            heat += [(im, f"{label}, {out.info.get('overlay_label', 'masks')}")
                     for im, label in zip(out.info.get("overlays", []), out.info.get("labels", []))]
            return pairs, heat, f"seed **{seed}** · {built.label}", seed

        # the endpoint's inputs are named after the method's Params (/<name>'s API shows them, a
        # client may pass them by name); Gradio passes the progress tracker last
        fn = endpoint(run)
        P = inspect.Parameter
        fn.__signature__ = inspect.Signature(
            [P(name, P.POSITIONAL_OR_KEYWORD) for name in (*STANDARD, *(p.name for p in method.params))]
            + [P("progress", P.POSITIONAL_OR_KEYWORD, default=gr.Progress())])
        go.click(fn, std.inputs() + fields, [gallery, maps, info, std.seed], api_name=method.name)

    return TabSpec(method.name, method.label, build, methods=(method.name,), endpoints=(method.name,), order=90)
