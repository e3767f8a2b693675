"""Benchmark of block-sparse attention (Rectified SpaAttn) against dense attention, side by side.

    python benchmarks/sparse.py --threads 1                      # CPU: S in {4096, 8192, 16384}
    python benchmarks/sparse.py --lengths 8192 --drops 0.75      # one row
    python benchmarks/sparse.py --device cuda                    # + Triton LUT kernel vs SDPA / dense Triton
    python benchmarks/sparse.py --device cuda --wan-blocks 4     # + step time of a random-weight Wan block stack

One random-weight Wan-sized attention call per row: B=1, H=12 heads of D=128 (Wan2.1-1.3B),
S tokens, blocks of 128. Per drop rate:

- ``dense``:    ``F.scaled_dot_product_attention(q, k, v)`` (CPU: PyTorch's flash kernel; CUDA:
                the flash backend), and on CUDA also ``triton-dense``, diffattn's dense kernel;
- ``sparse``:   ``diffattn.kernels.attention(q, k, v, spec=KernelSpec(sparse=plan))`` with a
                rectified plan at exactly ``1 - drop`` of the key blocks per query block (top-k
                only: no neighbour blocks, ``p_remain = 0``), so the row measures the kernel at
                that density: the gathered-blocks path on CPU, the Triton LUT kernel on CUDA;
- selection, reported separately: ``prepass`` (pooled q / k / v statistics, :func:`block_stats`)
  and ``select`` (pooled scores, IPAR, top-k, GAPR, R and comp, the compact LUT: the rest of
  :func:`block_sparse_plan`); ``p0.3 density`` is the density the official rule (``p_remain =
  0.3``) gives on these inputs (i.i.d. random tokens have flat pooled scores, so it exceeds the
  top-k budget; trained models' peaked scores leave the top-k floor in charge).

``speedup`` = dense / sparse (the kernel); ``with selection`` = dense / (sparse + prepass + select).
Times are medians of ``--repeat`` runs after one warm-up run.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _time(fn, repeat: int, cuda: bool) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up (CUDA: triton's do_bench)."""
    if cuda:
        import triton.testing

        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=5, rep=max(20, 10 * repeat), return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def attention_rows(lengths, drops, heads, dim, block, repeat, device, dtype):
    from diffattn.kernels import KernelSpec, attention
    from diffattn.kernels.sparse import block_sparse_plan, block_stats, density

    cuda = device == "cuda"
    rows = []
    for s in lengths:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, heads, s, dim, generator=gen, device=device, dtype=dtype) for _ in range(3))
        nb = -(-s // block)
        dense_variants = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def flash():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)

            dense_variants = {"sdpa-flash": flash, "triton-dense": lambda: attention(q, k, v, backend="triton")}
        with torch.no_grad():
            dense = {name: _time(fn, repeat, cuda) for name, fn in dense_variants.items()}
            t_dense = min(dense.values()) if cuda else dense["sdpa"]
            for drop in drops:
                top_k = max(1, int((1 - drop) * nb))
                plan = block_sparse_plan(q, k, v, block_q=block, top_k=top_k, p_remain=0.0)
                spec = KernelSpec(sparse=plan)
                t_sparse = _time(lambda: attention(q, k, v, spec=spec), repeat, cuda)
                t_pre = _time(lambda: block_stats(q, k, v, block, block), repeat, cuda)
                t_plan = _time(lambda: block_sparse_plan(q, k, v, block_q=block, top_k=top_k, p_remain=0.0),
                               repeat, cuda)
                full = block_sparse_plan(q, k, v, block_q=block, top_k=top_k, p_remain=0.3)
                dens = density((plan.lut >= 0).sum(-1), nb)
                rows.append(dict(S=s, drop=drop, density=dens, p03=density((full.lut >= 0).sum(-1), nb),
                                 dense=dense, sparse=t_sparse, prepass=t_pre, select=max(t_plan - t_pre, 0.0),
                                 speedup=t_dense / t_sparse, total=t_dense / (t_sparse + t_plan)))
                print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r) -> str:
    dense = "  ".join(f"{n} {t * 1e3:9.1f} ms" for n, t in r["dense"].items())
    return (f"S={r['S']:6d} drop={r['drop']:.2f} density={r['density']:.3f} | {dense} | sparse "
            f"{r['sparse'] * 1e3:9.1f} ms | prepass {r['prepass'] * 1e3:7.1f} ms select {r['select'] * 1e3:7.1f} ms "
            f"| speedup {r['speedup']:5.2f}x  with selection {r['total']:5.2f}x | p0.3 density {r['p03']:.3f}")


def wan_stack(blocks: int, frames: int, height: int, width: int, heads: int, dim: int, drop: float, device, dtype,
              repeat: int):
    """Forward time of a random-weight Wan block stack, dense vs sparse (every layer and step sparse)."""
    import diffattn as da
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim,
                                  in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                                  ffn_dim=4 * heads * dim, num_layers=blocks, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads").to(device=device, dtype=dtype).eval()
    lat = torch.randn(1, 16, frames, height, width, device=device, dtype=dtype)  # [B, C, T, H, W] latents
    text = torch.randn(1, 512, 4096, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    run = lambda: model(hidden_states=lat, timestep=t, encoder_hidden_states=text, return_dict=False)  # noqa: E731
    cuda = device == "cuda"
    with torch.no_grad():
        t_dense = _time(run, repeat, cuda)
        with da.attach(model, da.RectifiedSparseAttention(drop=drop, dense_layers=0, dense_steps=0)):
            t_sparse = _time(run, repeat, cuda)
    tokens = frames * (height // 2) * (width // 2)
    print(f"Wan stack: {blocks} blocks, {heads}x{dim}, {tokens} tokens, drop {drop}: dense {t_dense * 1e3:.1f} ms, "
          f"sparse {t_sparse * 1e3:.1f} ms, speedup {t_dense / t_sparse:.2f}x", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="sequence lengths (default CPU 4096 8192 16384; CUDA 16384 32768 75600)")
    p.add_argument("--drops", type=float, nargs="+", default=None, help="drop rates (CPU 0.5 0.75 0.9; CUDA + 0.8)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (use 1 on a busy machine)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--wan-blocks", type=int, default=0, help="also time a random-weight Wan stack of this many blocks")
    p.add_argument("--wan-drop", type=float, default=None,
                   help="drop rate of the Wan stack (default: CUDA 0.8, the issue's target; CPU 0.75)")
    p.add_argument("--wan-grid", type=int, nargs=3, default=(21, 90, 160), metavar=("T", "H", "W"),
                   help="latent frames, height, width of the Wan stack (default 720p 81 frames: 75,600 tokens)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run the CPU part (--device cpu), or this command on a GPU machine")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    lengths = args.lengths or ([16384, 32768, 75600] if cuda else [4096, 8192, 16384])
    drops = args.drops or ([0.5, 0.75, 0.8, 0.9] if cuda else [0.5, 0.75, 0.9])
    where = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}"
    print(f"# {where}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {dtype}, B=1 H={args.heads} "
          f"D={args.dim}, blocks {args.block}; command: {' '.join(sys.argv)}", flush=True)
    attention_rows(lengths, drops, args.heads, args.dim, args.block, args.repeat, args.device, dtype)
    if args.wan_blocks:
        wan_drop = args.wan_drop if args.wan_drop is not None else (0.8 if cuda else 0.75)
        wan_stack(args.wan_blocks, *args.wan_grid, args.heads, args.dim, wan_drop, args.device, dtype, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
