"""``diffattn app`` / ``python -m diffattn.app``: the arguments and the server.

Building the parser imports neither torch nor gradio; :func:`serve` does."""
from __future__ import annotations

import argparse
import time

CSS = ".result img, .result button img {image-rendering: pixelated;}"


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` binds this machine only (127.x.x.x, ::1, localhost)."""
    import ipaddress

    host = (host or "").strip().strip("[]")
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    from diffattn.cli.common import float_arg, int_arg

    from .serving import DEFAULT_MAX_MODELS, Limits

    d = Limits()
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int_arg(0, 65535, "--port"), default=7860, help="port (default 7860; 0: a free port)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless asked)")
    p.add_argument("--model", default=None, help="the default model: tiny-sd3 (default), tiny-sd, a diffusers folder "
                                                 "or a hub id (UAM's tab defaults to tiny-sd)")
    p.add_argument("--models", default=None,
                   help="comma-separated model choices of the picker (default: the default model, tiny-sd3, tiny-sd)")
    p.add_argument("--lock-models", action=argparse.BooleanOptionalAction, default=None,
                   help="serve only the --models choices and the default model (refuse other names); default: "
                        "locked unless --host is a loopback address (127.0.0.1) and there is no --share")
    p.add_argument("--max-models", type=int_arg(1, None, "--max-models"), default=DEFAULT_MAX_MODELS, metavar="N",
                   help=f"models held in memory at once; one more evicts the least recently used idle one "
                        f"(default {DEFAULT_MAX_MODELS})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--slots", type=int_arg(1, None, "--slots"), default=1,
                   help="pipeline copies per model = concurrent requests per model (default 1: a lock); each "
                        "request runs on a copy of its own")
    p.add_argument("--no-preload", action="store_true", help="load the default model at the first request, not at start")
    p.add_argument("--max-upload-mb", type=float_arg(0.001, None, "--max-upload-mb"), default=d.max_upload_mb,
                   metavar="MB", help=f"upload size limit (default {d.max_upload_mb:g})")
    p.add_argument("--max-side", type=int_arg(1, None, "--max-side"), default=d.max_side, metavar="PX",
                   help=f"uploaded image side limit, px (default {d.max_side})")
    p.add_argument("--max-steps", type=int_arg(1, None, "--max-steps"), default=d.max_steps, metavar="N",
                   help=f"steps per request limit (default {d.max_steps})")
    p.add_argument("--max-batch", type=int_arg(1, None, "--max-batch"), default=d.max_batch, metavar="N",
                   help=f"images per prompt limit (default {d.max_batch})")


def locked(args) -> bool:
    """Whether requests may load only the listed models: ``--lock-models`` / ``--no-lock-models``
    if given, else locked whenever the server is reachable from elsewhere (a non-loopback
    ``--host`` or ``--share``)."""
    lock = getattr(args, "lock_models", None)
    if lock is not None:
        return bool(lock)
    return bool(getattr(args, "share", False)) or not is_loopback(getattr(args, "host", "127.0.0.1"))


def make_context(args):
    from diffattn import testbed
    from diffattn.cli.common import check_device, check_model

    from .core import AppContext
    from .serving import Limits, PipelinePool

    default = args.model or testbed.DEFAULT_MODEL
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else ()
    models = tuple(dict.fromkeys([default, *(models or testbed.MODELS)]))
    for name in models:  # a name that cannot be a model: refused before anything loads
        check_model(name)
    check_device(args.device)
    limits = Limits(max_upload_mb=args.max_upload_mb, max_side=args.max_side, max_steps=args.max_steps,
                    max_batch=args.max_batch)
    lock = locked(args)
    pool = PipelinePool(args.slots, allowed=models if lock else None, dtype=args.dtype, device=args.device,
                        max_models=getattr(args, "max_models", None))
    return AppContext(pool=pool, limits=limits, default_model=default, models=models, lock_models=lock)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(ctx, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, block: bool = True,
           quiet: bool = False):
    """Build and serve the app; returns ``(demo, url)`` (``block=False``: the server runs in a thread)."""
    from .core import build_app

    demo = build_app(ctx)
    if not port:
        port = free_port(host)
    limit_mb = max(1, int(ctx.limits.max_upload_mb * 4))  # a hard cap; the endpoints say the real limit
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, show_error=True,
                            max_file_size=f"{limit_mb}mb", prevent_thread_lock=True, quiet=quiet, css=CSS,
                            ssr_mode=False, footer_links=["api"])
    if block:
        demo.block_thread()
    return demo, url


def serve(args) -> None:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    t0 = time.perf_counter()
    ctx = make_context(args)
    if not args.no_preload:
        ctx.pool.model(ctx.default_model)
    demo, url = launch(ctx, host=args.host, port=args.port, share=args.share, block=False)
    print(f"diffattn app: serving {url} on {args.host} (ready in {time.perf_counter() - t0:.1f} s; "
          f"models: {', '.join(ctx.models)}{' (locked)' if ctx.lock_models else ''}; {args.slots} pipeline cop{'y' if args.slots == 1 else 'ies'} per model)",
          flush=True)
    demo.block_thread()


def main(argv=None) -> None:
    """``python -m diffattn.app ARGS``: ``diffattn app ARGS`` (bad input: one line, exit status 2)."""
    import sys

    from diffattn.cli import main as cli_main

    cli_main(["app", *(sys.argv[1:] if argv is None else argv)])
