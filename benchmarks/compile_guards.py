"""What the compiled engine still costs on a host-bound step: dynamo's guard checks.

    python benchmarks/compile_guards.py

Five copies of a 12-layer tiny SD3 transformer (4 heads of 16, 64 image + 77 text tokens,
3-row batch), each compiled once: stock processors, the engine with a do-nothing control,
SoftPAG on every head (u = 0.5), and stock / SoftPAG compiled with
``guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe`` (no guards on module
state: the graph is not re-checked against the processors, so re-compile after changing
controls). Median of 201 interleaved steps, 1 thread; extra vs stock.
"""
import contextlib
import copy
import statistics
import time

import torch

import diffattn as da
from diffattn.controls import Control
from diffattn.tiny import tiny_sd3
from softpag import BRANCHES, sd3_inputs  # the sibling benchmark (benchmarks/ is on sys.path when run as a script)


def main(reps: int = 201):
    torch.set_num_threads(1)
    torch._dynamo.config.cache_size_limit = 64  # five copies share code objects
    base = tiny_sd3(num_layers=12, heads=4, head_dim=16, patch_size=2, sample_size=16).transformer.eval()
    kw = sd3_inputs(base.config, batch=3, side=8)
    no_module_guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    rows = [("stock", None, None), ("engine + do-nothing control", Control(), None),
            ("SoftPAG", da.SoftPAG("all", strength=0.5, scale=0.0), None),
            ("stock, no module guards", None, no_module_guards),
            ("SoftPAG, no module guards", da.SoftPAG("all", strength=0.5, scale=0.0), no_module_guards)]
    models = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for name, control, options in rows:
            model = models[name] = copy.deepcopy(base)
            if control is not None:
                handle = stack.enter_context(da.attach(model, control))
                stack.enter_context(handle.branches(BRANCHES))
            model.compile(dynamic=False, options=options)
            for _ in range(3):  # compile and warm up
                model(**kw)
        times = {name: [] for name in models}
        for _ in range(reps):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(**kw)
                times[name].append(time.perf_counter() - t0)
    stock = statistics.median(times["stock"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med * 1e3:.2f} ms | {med / stock - 1:+.1%} |")


if __name__ == "__main__":
    main()
