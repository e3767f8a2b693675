"""``diffattn app`` / ``python -m diffattn.app``: the arguments and the server.

Building the parser imports neither torch nor gradio; :func:`serve` does."""
from __future__ import annotations

import argparse
import time

CSS = ".result img, .result button img {image-rendering: pixelated;}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .serving import Limits

    d = Limits()
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: a free port)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless asked)")
    p.add_argument("--model", default=None, help="the default model: tiny-sd3 (default), tiny-sd, a diffusers folder "
                                                 "or a hub id (UAM's tab defaults to tiny-sd)")
    p.add_argument("--models", default=None,
                   help="comma-separated model choices of the picker (default: the default model, tiny-sd3, tiny-sd)")
    p.add_argument("--lock-models", action="store_true", help="serve only the --models choices (refuse other names)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--slots", type=int, default=1,
                   help="pipeline copies per model = concurrent requests per model (default 1: a lock); each "
                        "request runs on a copy of its own")
    p.add_argument("--no-preload", action="store_true", help="load the default model at the first request, not at start")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, help=f"upload size limit (default {d.max_upload_mb:g})")
    p.add_argument("--max-side", type=int, default=d.max_side, help=f"uploaded image side limit, px (default {d.max_side})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"steps per request limit (default {d.max_steps})")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"images per prompt limit (default {d.max_batch})")


def make_context(args):
    from diffattn import testbed

    from .core import AppContext
    from .serving import Limits, PipelinePool

    default = args.model or testbed.DEFAULT_MODEL
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else ()
    models = tuple(dict.fromkeys([default, *(models or testbed.MODELS)]))
    limits = Limits(max_upload_mb=args.max_upload_mb, max_side=args.max_side, max_steps=args.max_steps,
                    max_batch=args.max_batch)
    pool = PipelinePool(args.slots, allowed=models if args.lock_models else None, dtype=args.dtype, device=args.device)
    return AppContext(pool=pool, limits=limits, default_model=default, models=models, lock_models=args.lock_models)


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
          f"models: {', '.join(ctx.models)}; {args.slots} pipeline cop{'y' if args.slots == 1 else 'ies'} per model)",
          flush=True)
    demo.block_thread()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m diffattn.app", description="the diffattn Gradio app")
    add_arguments(p)
    serve(p.parse_args(argv))
