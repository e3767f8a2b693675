"""``diffattn run WORKFLOW.json --out result.png``: run a workflow file (diffattn.workflow)."""
from __future__ import annotations

from .common import check_output


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a workflow file: a model, controls and sampling settings (see diffattn.workflow)")
    p.add_argument("workflow", help="the workflow JSON file")
    p.add_argument("--out", required=True, help="where to write the image (.png / .jpg)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run)


def run(args):
    from ..workflow import load_workflow, run_workflow
    from .common import check_device, load_model

    check_output(args.out, "--out")
    check_device(args.device)
    wf = load_workflow(args.workflow)  # every mistake of the file before any model loads
    out = run_workflow(wf, lambda name: load_model(name, device=args.device))
    out.images[0].save(args.out)
    print(f"wrote {args.out} ({wf.model}, {', '.join(n.name for n, _ in wf.controls) or 'no controls'})")
