"""UAM: upload an image (or render a testbed sample), invert and reconstruct it with the source
prompt, the empty prompt and uniform attention maps (PSNR shown), and edit it by a word swap
with and without UAM's blending (the blend mask shown).

Endpoints: ``/uam_sample``, ``/uam_reconstruct``, ``/uam_edit``."""
from __future__ import annotations

from ..core import TabSpec, register_tab
from ..serving import AppInputError, endpoint, read_image, whole
from ..widgets import Progress, image_upload, model_name, number_or_none, optional_number

UAM_MODEL = "tiny-sd"  # as the CLI's invert / edit: the UNet testbed model (the paper's architecture)
LABELS = {"source": "source prompt", "empty": "empty prompt", "uniform": "uniform maps (UAM)"}


def _source_prompt(pipe, image, prompt: str) -> str:
    prompt = (prompt or "").strip()
    if prompt:
        return prompt
    from diffattn.testbed.defaults import default_caption, testbed_model

    if testbed_model(pipe) is None:
        raise AppInputError("give the source prompt: only testbed images can be captioned automatically")
    return default_caption(image)


def _mask_image(mask, size):
    """The edit mask M [C, h, w] (1 = edited) as a grey image at the picture's size."""
    import numpy as np
    from PIL import Image

    m = mask.float().mean(0).clamp(0, 1).numpy()
    return Image.fromarray((m * 255 + 0.5).astype(np.uint8), "L").resize(size, Image.NEAREST).convert("RGB")


def build(ctx):
    import gradio as gr

    from diffattn.cli.edit import BLENDS, DEFAULTS, MASK_CONVENTIONS

    lim = ctx.limits
    with gr.Row():
        with gr.Column():
            model = ctx.model_picker(UAM_MODEL)
            image = image_upload(label=f"image (sides multiples of the model's unit; tiny-sd: 16 px, native 64x64; "
                                       f"at most {lim.max_upload_mb:g} MB, {lim.max_side} px)",
                                 sources=["upload", "clipboard"], image_mode=None, format="png", height=220,
                                 elem_id="uam-image")
            with gr.Row():
                sample_seed = gr.Number(0, label="sample seed", precision=0, minimum=0)
                sample = gr.Button("Testbed sample image", elem_id="uam-sample")
            source = gr.Textbox("", label="source prompt (empty on a testbed model: the oracle's caption)",
                                elem_classes=["prompt"], elem_id="uam-source")
            target = gr.Textbox("", label="target prompt (the source with one word swapped)", elem_id="uam-target")
            with gr.Accordion("Advanced", open=False):
                steps = gr.Number(min(10, lim.max_steps), label=f"steps (at most {lim.max_steps})", precision=0)
                guidance = optional_number(None, "CFG of the edit's branches (empty: the model's default)")
                with gr.Row():
                    blend = gr.Dropdown(list(BLENDS), value=DEFAULTS["blend"], label="blend")
                    convention = gr.Dropdown(list(MASK_CONVENTIONS), value=DEFAULTS["mask_convention"],
                                             label="mask convention")
                with gr.Row():
                    mask_t = gr.Slider(0, 1000, value=DEFAULTS["mask_timestep"], step=10, label="T_mask")
                    quantile = gr.Slider(0, 1, value=DEFAULTS["quantile"], step=0.05, label="quantile q")
                    dilation = gr.Slider(0, 4, value=DEFAULTS["dilation"], step=1, label="dilation")
            with gr.Row():
                recon = gr.Button("Invert + reconstruct", variant="primary", elem_id="uam-reconstruct")
                edit = gr.Button("Edit", variant="primary", elem_id="uam-edit")
        with gr.Column():
            gallery = gr.Gallery(label="input | reconstructions / edits", columns=4, height="auto", format="png",
                                 elem_classes=["result"], object_fit="contain", elem_id="uam-gallery")
            mask = gr.Image(label="blend mask (white: edited)", type="pil", format="png")
            info = gr.Markdown()
            psnr = gr.JSON(visible=False)  # the API's {conditioning: PSNR}

    @endpoint
    def make_sample(seed):
        from diffattn.testbed import world

        scene = world.sample_scene(0 if seed is None or seed == "" else whole(seed, "sample seed"), n_objects=2, background="light", outline=False)
        return world.render(scene), world.caption(scene)

    @endpoint
    def reconstruct(model, upload, prompt, steps, progress=gr.Progress()):
        from diffattn.pipelines.uam import CONDITIONINGS, UAMPipeline

        picture = read_image(upload, lim)
        if picture is None:
            raise AppInputError("upload an image first (or take a testbed sample)")
        n = lim.steps(steps)
        with ctx.pool.acquire(model_name(ctx, model)) as pipe:
            uam = UAMPipeline(pipe, progress=False)
            x = uam.load_image(picture)  # the library checks the size (its unit, its largest side)
            text = _source_prompt(pipe, picture, prompt)
            bar = Progress(progress, loops=2 * len(CONDITIONINGS))
            rec = uam.reconstruct_all(x[0], text, num_inference_steps=n, callback=bar.callback)[0]
        items = [(picture, "input")] + [(rec[c].image, f"{LABELS[c]} · PSNR {rec[c].psnr:.2f} dB") for c in CONDITIONINGS]
        rows = "\n".join(f"| {LABELS[c]} | {rec[c].psnr:.2f} | {rec[c].ssim:.4f} |" for c in CONDITIONINGS)
        table = f"prompt: *{text}*\n\n| reconstruction | PSNR (dB) | SSIM |\n|---|---|---|\n{rows}"
        return items, None, table, {c: round(rec[c].psnr, 3) for c in CONDITIONINGS}

    @endpoint
    def run_edit(model, upload, prompt, target_prompt, steps, guidance, blend, convention, mask_t, quantile, dilation,
                 progress=gr.Progress()):
        from diffattn.pipelines.uam import UAMPipeline

        picture = read_image(upload, lim)
        if picture is None:
            raise AppInputError("upload an image first (or take a testbed sample)")
        n = lim.steps(steps)
        w = number_or_none(guidance, "guidance")
        with ctx.pool.acquire(model_name(ctx, model)) as pipe:
            uam = UAMPipeline(pipe, progress=False, mask_convention=convention, blend=blend,
                              mask_timestep=float(mask_t), quantile=float(quantile), dilation=whole(dilation, "dilation"))
            uam.load_image(picture)
            text = _source_prompt(pipe, picture, prompt)
            bar = Progress(progress, loops=5)
            with_uam = uam.edit(picture, text, target_prompt or "", uam=True, num_inference_steps=n,
                                guidance_scale=w, callback=bar.callback)
            base = uam.edit(picture, text, target_prompt or "", uam=False, num_inference_steps=n, guidance_scale=w,
                            inversions=with_uam.inversions, callback=bar.callback)
        items = [(picture, "input"), (base.target, "prompt-to-prompt"), (with_uam.target, "p2p + UAM"),
                 (with_uam.aux, "uniform branch")]
        m = _mask_image(with_uam.masks[-1][2], picture.size) if with_uam.masks else None
        return items, m, f"*{text}* → *{target_prompt}* · {len(with_uam.masks)} blended steps", None

    sample.click(make_sample, sample_seed, [image, source], api_name="uam_sample")
    recon.click(reconstruct, [model, image, source, steps], [gallery, mask, info, psnr],
                api_name="uam_reconstruct")
    edit.click(run_edit, [model, image, source, target, steps, guidance, blend, convention, mask_t, quantile, dilation],
               [gallery, mask, info, psnr], api_name="uam_edit")


register_tab(TabSpec("uam", "UAM inversion + editing", build, endpoints=("uam_sample", "uam_reconstruct", "uam_edit"),
                     order=40))
