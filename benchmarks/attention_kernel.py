"""Decode attention over the paged cache, one layer: the C++ kernel against today's gather path.

The gather path (decode before the kernel) gathers cache[kv_slots] padded to the longest sequence,
widens it to float32 and runs SDPA with a mask over the padding (models/attention.py `attend`, the
reference path).
Shapes are MLA's absorbed form (one latent KV head, values = the latent's first v_dim columns),
bf16 cache, block size 16. Prints ms per call (median of repeats) and the cache read in GB/s.

    python benchmarks/attention_kernel.py [--repeats 21] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from xpuserve.kernels.build import kernel_status
from xpuserve.kernels.paged_attention import paged_decode_attention

BLOCK = 16
# (label, heads, key width D, v_dim, batch, length)
CASES = [("benchmark model", 16, 288, 256, b, n) for b, n in ((1, 128), (16, 128), (64, 128), (8, 2048), (1, 8192))]
CASES.append(("R1 latent", 16, 576, 512, 8, 2048))


def problem(heads: int, dim: int, batch: int, length: int):
    """A shuffled block table per sequence over a bf16 cache with room for all of them."""
    blocks = -(-length // BLOCK)
    tables = torch.randperm(batch * blocks, dtype=torch.int32).view(batch, blocks)
    cache = torch.randn(batch * blocks * BLOCK, 1, dim).to(torch.bfloat16)
    q = torch.randn(batch, heads, dim).to(torch.bfloat16)
    lens = torch.full((batch,), length, dtype=torch.int32)
    return q, cache, tables, lens


def gather_path(q, cache, tables, lens, scale, v_dim):
    pos = torch.arange(int(lens.max()))
    slots = tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK
    k = cache[slots].float()  # [B, L, 1, D]
    mask = (pos[None, :] < lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k.transpose(1, 2), k.transpose(1, 2), attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out[:, :, 0, :v_dim].to(q.dtype)


def median_ms(fns, repeats: int) -> list[float]:
    """Each function's median time in ms, the functions taking turns so both see the same machine."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) * 1e3 for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"kernel: {kernel_status()}; {torch.get_num_threads()} threads; bf16 cache, block size {BLOCK}")
    print(f"{'shape':<16} {'H':>3} {'D':>4} {'Dv':>4} {'B x L':>9} {'C++ ms':>8} {'GB/s':>6} {'gather ms':>10} {'GB/s':>6} {'speed-up':>8}")
    for label, heads, dim, v_dim, batch, length in CASES:
        torch.manual_seed(0)
        q, cache, tables, lens = problem(heads, dim, batch, length)
        scale = dim ** -0.5
        kernel, gather = median_ms([lambda: paged_decode_attention(q, cache, None, tables, lens, BLOCK, scale, v_dim),
                                    lambda: gather_path(q, cache, tables, lens, scale, v_dim)], args.repeats)
        gb = batch * length * dim * cache.element_size() / 1e9
        print(f"{label:<16} {heads:>3} {dim:>4} {v_dim:>4} {f'{batch}x{length}':>9} {kernel:>8.3f} {gb / kernel * 1e3:>6.1f} "
              f"{gather:>10.3f} {gb / gather * 1e3:>6.1f} {gather / kernel:>7.1f}x")


if __name__ == "__main__":
    main()
