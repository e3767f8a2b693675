"""``diffattn run WORKFLOW.json --out result.png``: run a workflow file (diffattn.workflow).

The workflow's sampling settings get the checks ``diffattn generate`` gives its flags: the file
itself is validated first (types, finite numbers, the seed's 64 bits: a WorkflowError naming
the field), then ``steps`` / ``height`` / ``width`` against ``--max-steps`` / ``--max-side``
before the model loads, then the sizes against what the loaded model can generate (a multiple
of its unit, within its position embedding) and the prompts against its tokenizer, before
anything is sampled. Every refusal is one line and exit status 2.
"""
from __future__ import annotations

from .common import add_limit_arguments, check_output


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a workflow file: a model, controls and sampling settings (see diffattn.workflow)")
    p.add_argument("workflow", help="the workflow JSON file (or the workflow's JSON text itself)")
    p.add_argument("--out", required=True, help="where to write the image (.png / .jpg)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_limit_arguments(p)
    p.set_defaults(func=run)


def _field(wf, name: str) -> str:
    return f"{wf.source}: sampling field {name!r}"


def check_limits(args, wf) -> None:
    """``steps``, ``height``, ``width`` against the command's limits (before the model loads)."""
    from .common import check_side, check_steps

    s = wf.sampling
    check_steps(args, s.get("steps"), f"{_field(wf, 'steps')}:")
    for name in ("height", "width"):
        if name in s:
            check_side(args, s[name], f"{_field(wf, name)}: {s[name]}")


def check_for_model(args, pipe, wf) -> None:
    """``height`` / ``width`` against what ``pipe`` can generate, the prompts against its tokenizer."""
    from .common import check_side_for, check_text

    s = wf.sampling
    for name in ("height", "width"):
        if name in s:
            check_side_for(pipe, args, s[name], f"{_field(wf, name)}: {s[name]}")
    check_text(pipe, s["prompt"], f"{_field(wf, 'prompt')}:")
    if s.get("negative_prompt"):
        check_text(pipe, s["negative_prompt"], f"{_field(wf, 'negative_prompt')}:")


def run(args):
    from ..workflow import load_workflow, run_workflow
    from .common import check_device, load_model

    check_output(args.out, "--out")
    check_device(args.device)
    wf = load_workflow(args.workflow)  # every mistake of the file before any model loads
    args.model = wf.model  # the limits' defaults and the messages follow the workflow's model
    check_limits(args, wf)
    out = run_workflow(wf, lambda name: load_model(name, device=args.device),
                       check=lambda pipe, w: check_for_model(args, pipe, w))
    out.images[0].save(args.out)
    print(f"wrote {args.out} ({wf.model}, {', '.join(n.name for n, _ in wf.controls) or 'no controls'})")
