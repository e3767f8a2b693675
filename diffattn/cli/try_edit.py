"""``diffattn try-edit``: edit an image and its protected copy with the same instruction, side by side.

    diffattn try-edit photo.png --instruction "make the circle blue" --model tiny-random-kontext --steps 20
    diffattn try-edit photo.png --protected protected.png --instruction "..." --model KONTEXT

Without ``--protected`` the image is protected first (the ``protect`` flags apply). Both images are
edited by the pipeline's own ``FluxKontextPipeline.__call__`` at their own size
(``max_area = H·W``, ``_auto_resize=False``: the protected pixels reach the editor as saved), with
one seed, and written as one PNG: input | protected | edit of the input | edit of the protected.

When the input is a shapes-world render (the testbed's 64 px world) and the instruction is of
the edit grammar ("make the circle blue", "remove the square", ...), the testbed's edit oracle
grades both edits against the input (``testbed.edits.score_edit``: did the asked change happen,
were the other objects kept) and the verdicts are printed; otherwise one line says why there are
none (an instruction outside the grammar, an image that is not a world render).
"""
from __future__ import annotations

from .common import SEED, STEPS, add_limit_arguments, float_arg, nonempty
from .protect import add_editor_arguments, add_protect_arguments, check_paths, load_editor, protector_for


def register(subparsers) -> None:
    p = subparsers.add_parser("try-edit", help="edit an image and its protected copy (DeContext) with one instruction, "
                                               "side by side")
    p.add_argument("image", help="the clean image (RGB; sides multiples of 2 x the VAE factor)")
    p.add_argument("--instruction", required=True, type=nonempty("--instruction"), help="the edit, e.g. 'make the circle blue'")
    p.add_argument("--protected", default=None, help="an already protected copy (default: protect the image now)")
    p.add_argument("--out", default="try_edit.png", help="PNG: input | protected | edit(input) | edit(protected)")
    p.add_argument("--save-protected", default=None, help="also write the protected image made here (.png)")
    p.add_argument("--edit-steps", type=STEPS, default=None, help="editing steps (default: the pipeline's, 28)")
    p.add_argument("--guidance", type=float_arg(0.0, None, "the guidance embedding"), default=None,
                   help="the editor's guidance_scale (default: the pipeline's)")
    p.add_argument("--edit-seed", type=SEED, default=0, help="seed of both edits")
    add_editor_arguments(p)
    add_protect_arguments(p)
    add_limit_arguments(p)
    p.set_defaults(func=run)


def edit(pipe, image, instruction: str, *, steps=None, guidance=None, seed: int = 0):
    """One ``FluxKontextPipeline`` edit of a PIL image at its own size (no resampling)."""
    import torch

    w, h = image.size
    kw = {"num_inference_steps": steps} if steps is not None else {}
    if guidance is not None:
        kw["guidance_scale"] = guidance
    return pipe(image=image, prompt=instruction, height=h, width=w, max_area=h * w, _auto_resize=False,
                generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0]


def _word(value) -> str:
    return {True: "yes", False: "no", None: "unreadable"}[value]


def oracle_verdicts(source, instruction: str, edited: list) -> tuple[list[dict] | None, str]:
    """The edit oracle's grade of each image of ``edited`` as an edit of ``source`` with
    ``instruction`` -> (one dict per image: changed / preserved / success / unreadable, or None,
    the reason there are none)."""
    from ..errors import EditPromptError, UsageError
    from ..testbed import edits as world_edits
    from ..testbed.world import SIZE

    if source.size != (SIZE, SIZE):
        return None, f"the input is {source.size[0]}x{source.size[1]}, not a {SIZE} px shapes-world render"
    try:
        world_edits.parse_instruction(instruction)
    except UsageError:
        return None, "the instruction is outside the testbed's edit grammar (e.g. 'make the circle blue')"
    try:
        scores = [world_edits.score_edit(source, instruction, im) for im in edited]
    except EditPromptError as e:
        return None, f"the oracle does not read the input as a scene this instruction applies to ({e})"
    return [{"changed": s.changed, "preserved": s.preserved, "success": s.success,
             "unreadable": list(s.unreadable)} for s in scores], ""


def run(args):
    """Protect (unless given), edit both, write the four panels; print ‖δ‖∞ and PSNR."""
    import numpy as np

    from ..errors import ImageInputError, UsageError
    from ..pipelines.uam import psnr
    from .common import open_image, side_by_side

    if args.protected and args.save_protected:
        raise UsageError("--save-protected writes the protected image made here, but --protected gives one: "
                         "drop one of the two flags")
    outputs = [("--out", args.out), ("--save-protected", args.save_protected)]
    check_paths(args, outputs, [("--protected", args.protected)])
    clean = open_image(args, args.image)
    protected = open_image(args, args.protected, "protected image") if args.protected else None
    if protected is not None and protected.size != clean.size:
        raise ImageInputError(f"--protected {args.protected} is {protected.size[0]}x{protected.size[1]} pixels but the "
                              f"image is {clean.size[0]}x{clean.size[1]}: give the protected copy of this image")
    pipe = load_editor(args)
    if protected is None:
        protector = protector_for(args, pipe)
        result = protector.protect(clean, diagnostics=False)
        protected = result.image
        if args.save_protected:
            result.save(args.save_protected)
            print(f"wrote {args.save_protected}")
    else:
        from ..pipelines.decontext import DeContextProtector

        DeContextProtector(pipe, progress=False).check_size(clean.size[1], clean.size[0], args.image)
    a, b = (np.asarray(im, dtype=np.int32) for im in (clean, protected))
    edits = [edit(pipe, im, args.instruction, steps=args.edit_steps, guidance=args.guidance, seed=args.edit_seed)
             for im in (clean, protected)]
    side_by_side([clean, protected] + edits, ["input", "protected", "edit(input)", "edit(protected)"]).save(args.out)
    e0, e1 = (np.asarray(im, dtype=np.float64) / 255 for im in edits)
    print(f"‖δ‖∞ = {int(np.abs(a - b).max())}/255, PSNR protected vs input {psnr(a / 255, b / 255):.2f} dB")
    print(f"PSNR of the two edits {psnr(e0, e1):.2f} dB (lower: the protection changed the edit more)")
    verdicts, why = oracle_verdicts(clean, args.instruction, edits)
    if verdicts is None:
        print(f"edit oracle: no verdicts: {why}")
    for name, v in zip(("edit(input)", "edit(protected)"), verdicts or ()):
        extra = f" (unreadable: {', '.join(v['unreadable'])})" if v["unreadable"] else ""
        print(f"edit oracle, {name}: changed {_word(v['changed'])}, others kept {_word(v['preserved'])}"
              f" -> {'success' if v['success'] else 'no success'}{extra}")
    print(f"wrote {args.out}")
    return {"clean": clean, "protected": protected, "edits": edits, "verdicts": verdicts}
