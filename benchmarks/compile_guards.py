"""What the compiled engine still costs on a host-bound step: dynamo's guard checks.

    python benchmarks/compile_guards.py

Five copies of a 12-layer tiny SD3 transformer (4 heads of 16, 64 image + 77 text tokens,
3-row batch), each compiled once: stock processors, the engine with a do-nothing control,
SoftPAG on every head (u = 0.5), and stock / SoftPAG compiled with
``guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe`` (no guards on module
state: the graph is not re-checked against the processors, so re-compile after changing
controls). Median of 201 interleaved steps, 1 thread; extra vs stock.
"""
import torch, diffattn as da, copy, time, statistics, sys, contextlib
from diffattn.controls import Control
from diffattn.tiny import tiny_sd3
torch.set_num_threads(1)
torch._dynamo.config.cache_size_limit = 64
pipe = tiny_sd3(num_layers=12, heads=4, head_dim=16, patch_size=2, sample_size=16)
base = pipe.transformer.eval(); cfg = base.config
g = torch.Generator().manual_seed(0)
kw = dict(hidden_states=torch.randn(3, cfg.in_channels, 16, 16, generator=g), encoder_hidden_states=torch.randn(3, 77, cfg.joint_attention_dim, generator=g),
          pooled_projections=torch.randn(3, cfg.pooled_projection_dim, generator=g), timestep=torch.full((3,), 500.0))
br = {"uncond": slice(0, 1), "cond": slice(1, 2), "perturbed": slice(2, 3)}
stack = contextlib.ExitStack()
rows = {}
for name, ctrl, opts in [("stock", None, {}), ("do-nothing", Control(), {}), ("softpag", da.SoftPAG("all", strength=0.5, scale=0.0), {}),
                         ("stock, no module guards", None, {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}),
                         ("softpag, no module guards", da.SoftPAG("all", strength=0.5, scale=0.0), {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})]:
    m = copy.deepcopy(base)
    if ctrl is not None:
        h = stack.enter_context(da.attach(m, ctrl)); stack.enter_context(h.branches(br))
    m.compile(dynamic=False, options=opts) if opts else m.compile(dynamic=False)
    rows[name] = m
t = {k: [] for k in rows}
with torch.no_grad():
    for k, m in rows.items():
        for _ in range(3): m(**kw)
    for _ in range(201):
        for k, m in rows.items():
            t0 = time.perf_counter(); m(**kw); t[k].append(time.perf_counter() - t0)
b = statistics.median(t["stock"])
for k, v in t.items(): print(f"{k}: {statistics.median(v)*1e3:.2f} ms {statistics.median(v)/b-1:+.1%}")
