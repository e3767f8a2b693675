"""Benchmark of diffattn's fused Triton attention against PyTorch SDPA (flash), and taps memory.
(Named kernel_speed, not kernels: a benchmarks/kernels.py would shadow the PyPI ``kernels``
package that transformers imports, for every script run as ``python benchmarks/<script>.py``.)

    python benchmarks/kernel_speed.py            # full table (CUDA required)
    python benchmarks/kernel_speed.py --quick    # L in {1024, 4096}, fp16 only
    python benchmarks/kernel_speed.py --backward # also forward+backward times

Forward rows, per sequence length L (batch·L = 16k tokens, hidden 2048 = H·D, as the
flash-attention benchmarks), head dim D and dtype:

- ``sdpa-flash``: ``F.scaled_dot_product_attention`` restricted to the flash backend (no mask);
- ``sdpa-mask``:  SDPA with a boolean [1, 1, L, L] mask (what a stock masked call costs);
- ``ours``:       ``diffattn.kernels.attention(backend="triton")``, no extras;
- ``ours+blend+mask``: per-head identity blend and the same boolean mask;
- ``ours+blend+bias``: per-head identity blend and an additive [1, 1, L, L] bias.

TFLOP/s count ``4·B·H·L²·D`` (forward), ×2.5 for forward+backward. ``vs flash`` is
sdpa-flash time / our time (the issue's target: >= 0.9 with blend and bias on).

Taps table: peak extra memory of ``attention_probs`` for all queries × a 77-key subset (a text
segment) against materialising softmax(QKᵀ) and slicing it.

On a machine without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def _bench(fn) -> float:
    """Median milliseconds of ``fn`` (after one call that triggers compilation/autotuning)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def forward_rows(lengths, dims, dtypes, backward=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffattn.kernels import attention

    rows = []
    for dtype in dtypes:
        for d in dims:
            for L in lengths:
                b, h = max(1, 16384 // L), 2048 // d
                gen = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(b, h, L, d, device="cuda", dtype=dtype, generator=gen, requires_grad=backward)
                           for _ in range(3))
                u = torch.rand(h, device="cuda", dtype=torch.float32)
                mask = torch.rand(1, 1, L, L, device="cuda", generator=gen) > 0.1  # [1, 1, L, L]
                bias = torch.randn(1, 1, L, L, device="cuda", dtype=dtype, generator=gen)

                def flash():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v)

                variants = {
                    "sdpa-flash": flash,
                    "sdpa-mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                    "ours": lambda: attention(q, k, v, backend="triton"),
                    "ours+blend+mask": lambda: attention(q, k, v, head_blend=u, bias=mask, backend="triton"),
                    "ours+blend+bias": lambda: attention(q, k, v, head_blend=u, bias=bias, backend="triton"),
                }
                flops = 4.0 * b * h * L * L * d
                times = {}
                for name, fn in variants.items():
                    if backward:
                        grad = torch.randn_like(q)
                        run = (lambda fn=fn: fn().backward(grad))
                        mult = 3.5  # forward + backward (2.5x forward)
                    else:
                        run = (lambda fn=fn: torch.no_grad()(fn)())
                        mult = 1.0
                    try:
                        times[name] = _bench(run)
                    except Exception as exc:  # an unsupported SDPA backend, out of memory...
                        print(f"<!-- {name} L={L} D={d} {dtype}: {type(exc).__name__}: {exc} -->", file=sys.stderr)
                        times[name] = float("nan")
                    torch.cuda.empty_cache()
                for name, ms in times.items():
                    rows.append((str(dtype).replace("torch.", ""), d, L, b, h, name, ms,
                                 mult * flops / (ms * 1e-3) / 1e12, times["sdpa-flash"] / ms))
                del q, k, v, mask, bias
                torch.cuda.empty_cache()
    return rows


def taps_rows(lengths, d=64, h=8, subset=77, dtype=torch.float16):
    from diffattn.kernels import attention, attention_probs

    rows = []
    for L in lengths:
        q, k, v = (torch.randn(1, h, L, d, device="cuda", dtype=dtype) for _ in range(3))
        idx = torch.arange(subset, device="cuda")
        _, lse = attention(q, k, v, return_lse=True, backend="triton")
        ks = k[:, :, idx].contiguous()

        def peak(fn):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            used = torch.cuda.max_memory_allocated() - base
            del out
            return used / 2**20

        def materialised():
            p = torch.softmax((q @ k.transpose(-1, -2)).float() * d ** -0.5, dim=-1)  # [1, H, L, L]
            return p[..., idx]

        try:
            mat = peak(materialised)
        except torch.OutOfMemoryError:
            mat = float("nan")
        ours = peak(lambda: attention_probs(q, ks, lse, backend="triton"))
        rows.append((L, h, subset, ours, mat))
        del q, k, v, lse, ks
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L in {1024, 4096}, fp16 only")
    ap.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: CUDA is required (the Triton kernels are timed on a GPU); "
              "GPU figures are pending on this machine.")
        return 0
    lengths = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16]
    print(f"## Fused attention {'forward+backward' if args.backward else 'forward'} on "
          f"{torch.cuda.get_device_name()} (torch {torch.__version__})\n")
    print("| dtype | D | L | B | H | kernel | ms | TFLOP/s | vs flash |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in forward_rows(lengths, [64, 128], dtypes, backward=args.backward):
        print("| {} | {} | {} | {} | {} | {} | {:.3f} | {:.1f} | {:.2f} |".format(*r))
    print("\n## Taps memory: all queries x 77 keys, H=8, D=64, fp16\n")
    print("| L | H | subset | attention_probs MiB | materialised softmax MiB |")
    print("|---|---|---|---|---|")
    for r in taps_rows(lengths):
        print("| {} | {} | {} | {:.1f} | {:.1f} |".format(*r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
