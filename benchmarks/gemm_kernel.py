"""The C++ GEMM (kernels/gemm.py) against torch on the benchmark model's linear shapes, M = 1..64 rows.

Peers, all in the same run and interleaved with ours: torch's bf16 F.linear, float32 F.linear on a
float32 copy of the weight (float32 x; the conversion not counted), and torch._weight_int8pack_mm
(bf16 x, int8 weight, one scale per output row). Prints ms per call (median of repeats), the weight
read in GB/s and the arithmetic in GFLOP/s. Each call reads its weight from memory, not cache
(copies cycled), unless --warm.

    python benchmarks/gemm_kernel.py [--repeats 21] [--threads N] [--rows 1,2,4,8,16,32,64] [--warm]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import torch
import torch.nn.functional as F

from xpuserve.kernels import gemm

# [N, K] of the benchmark model's linear layers (planner/bench_model.py): dense MLP, experts (gate+up fused,
# down), lm_head, attention projections
SHAPES = [(2816, 1024), (1024, 1408), (1024, 1024), (1024, 512), (32000, 1024), (1536, 384), (288, 1024)]
ROWS = (1, 2, 4, 8, 16, 32, 64)
# Weight copies cycled through, together more than the L3 cache, so that every call reads its weight from
# memory as decode does (each layer's weights once per step); --warm: one copy, as warm as it gets.
COLD_BYTES = 64 << 20


def medians_ms(fns: dict, repeats: int) -> dict:
    """Each function's median time, the functions taking turns so that a busy spell hits all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def contenders(m: int, n: int, k: int, copies: int) -> dict:
    """Each contender's call, cycling through `copies` copies of its weight."""
    x = torch.randn(m, k).to(torch.bfloat16)
    xf = x.float()
    w = torch.randn(n, k).to(torch.bfloat16)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 0.01
    scale_bf16 = scale.to(torch.bfloat16)
    bf16, f32, int8 = (itertools.cycle([t.clone() for _ in range(copies)]) for t in (w, w.float(), w8))
    return {
        "ours bf16": lambda: gemm.bf16_linear(x, next(bf16)),
        "torch bf16": lambda: F.linear(x, next(bf16)),
        "torch f32": lambda: F.linear(xf, next(f32)),
        "ours int8": lambda: gemm.int8_linear(x, next(int8), scale),
        "torch int8": lambda: torch._weight_int8pack_mm(x, next(int8), scale_bf16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated M values")
    parser.add_argument("--warm", action="store_true", help="one copy of each weight, which stays in cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"kernel: {gemm.status()}; {torch.get_num_threads()} threads; ms per call, median of {args.repeats}; "
          f"weights {'warm' if args.warm else 'read from memory'}")
    print(f"{'[N, K]':<12} {'M':>3} | {'bf16 ms':>8} {'GB/s':>5} {'GF/s':>5} | {'torch bf16':>10} {'torch f32':>9} "
          f"{'GF/s':>5} | {'int8 ms':>8} {'GB/s':>5} | {'int8pack':>8} | {'vs bf16':>7} {'vs f32':>6} {'vs int8':>7}")
    for n, k in SHAPES:
        for m in rows:
            torch.manual_seed(0)
            copies = 1 if args.warm else math.ceil(COLD_BYTES / (n * k * 2))
            t = medians_ms(contenders(m, n, k, copies), args.repeats)
            flop, elements = 2 * m * n * k / 1e6, n * k / 1e6  # per ms: GFLOP/s and G elements/s
            print(f"{f'[{n}, {k}]':<12} {m:>3} | {t['ours bf16']:>8.3f} {2 * elements / t['ours bf16']:>5.1f} "
                  f"{flop / t['ours bf16']:>5.0f} | {t['torch bf16']:>10.3f} {t['torch f32']:>9.3f} "
                  f"{flop / t['torch f32']:>5.0f} | {t['ours int8']:>8.3f} {elements / t['ours int8']:>5.1f} | "
                  f"{t['torch int8']:>8.3f} | {t['torch bf16'] / t['ours bf16']:>6.1f}x "
                  f"{t['torch f32'] / t['ours bf16']:>5.1f}x {t['torch int8'] / t['ours int8']:>6.1f}x", flush=True)


if __name__ == "__main__":
    main()
