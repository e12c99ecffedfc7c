"""Decode attention read in place from the paged KV cache: the C++ op against the reference, the
reference against dense attention over gathered keys, and the op inside a compiled graph."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from xpuserve.kernels import build
from xpuserve.kernels.paged_attention import paged_decode_attention, paged_decode_reference

LENS = [1, 2, 15, 16, 17, 129, 1000, 4096]
# name: (query heads, KV heads, key width, v_dim, separate values)
SHAPES = {"mla": (16, 1, 288, 256, False), "gqa": (8, 2, 64, 64, True), "odd": (6, 3, 37, 13, True),
          "odd_mla": (7, 1, 37, 13, False)}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # bf16: one rounding of the output


def problem(lens, shape, block_size, dtype, q_dtype=None, seed=0):
    """Shuffled block ids with spare blocks; every slot no attended key uses holds NaN, so reading one shows."""
    heads, kv_heads, dim, v_dim, separate = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in lens]
    ids = torch.randperm(sum(blocks) + 5, generator=gen, dtype=torch.int32)
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    for b, start in enumerate(torch.tensor([0] + blocks).cumsum(0)[:-1].tolist()):
        tables[b, : blocks[b]] = ids[start : start + blocks[b]]
    slots = len(ids) * block_size
    k = torch.full((slots, kv_heads, dim), float("nan"))
    v = torch.full((slots, kv_heads, v_dim), float("nan")) if separate else None
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        used = tables[b, pos // block_size].long() * block_size + pos % block_size
        k[used] = torch.randn(n, kv_heads, dim, generator=gen)
        if separate:
            v[used] = torch.randn(n, kv_heads, v_dim, generator=gen)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    v = None if v is None else v.to(dtype)
    return q.to(q_dtype or dtype), k.to(dtype), v, tables, torch.tensor(lens, dtype=torch.int32), dim ** -0.5, v_dim


def kernel(*args, block_size):
    q, k, v, tables, lens, scale, v_dim = args
    return torch.ops.xpuserve_kernels.paged_decode(q, k, v, tables, lens, block_size, scale, v_dim)


def reference(*args, block_size):
    q, k, v, tables, lens, scale, v_dim = args
    return paged_decode_reference(q, k, v, tables, lens, block_size, scale, v_dim)


def assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOLERANCE[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_kernel_built():
    """CI machines have a compiler: a build that silently fell back to the reference fails here."""
    assert build.load(), build.kernel_status()
    assert build.kernel_status().startswith("C++")
    assert hasattr(torch.ops.xpuserve_kernels, "paged_decode")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("shape", ["mla", "gqa"])
def test_kernel_matches_reference(shape, block_size, dtype):
    args = problem(LENS, shape, block_size, dtype)
    got = kernel(*args, block_size=block_size)
    assert not got.isnan().any()
    assert_close(got, reference(*args, block_size=block_size))
    torch.testing.assert_close(paged_decode_attention(*args[:5], block_size, *args[5:]), got, atol=0, rtol=0)


@pytest.mark.parametrize("shape", ["odd", "odd_mla"])
@pytest.mark.parametrize("q_dtype,dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float32)])
def test_kernel_odd_sizes_and_mixed_dtypes(shape, q_dtype, dtype):
    """Widths that are no multiple of the 8 lanes, odd head groups, q and cache in different dtypes."""
    args = problem([1, 7, 33, 300], shape, 16, dtype, q_dtype=q_dtype)
    assert_close(kernel(*args, block_size=16), reference(*args, block_size=16))


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_kernel_splits_one_long_sequence(threads):
    """One sequence cut across threads (flash-decoding): the pieces merge to the same result."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = problem([4096], "mla", 16, torch.float32)
        got = kernel(*args, block_size=16)
    finally:
        torch.set_num_threads(before)
    assert_close(got, reference(*args, block_size=16))


def test_kernel_rejects_a_block_outside_the_cache():
    q, k, v, tables, lens, scale, v_dim = problem([20], "mla", 16, torch.float32)
    tables[0, 1] = k.shape[0] // 16
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel(q, k, v, tables, lens, scale, v_dim, block_size=16)


@pytest.mark.parametrize("shape", ["mla", "gqa"])
def test_reference_matches_dense_attention(shape):
    """The oracle itself, against softmax(q k^T) v over keys gathered and padded to the longest, in float64."""
    args = problem([1, 17, 200], shape, 16, torch.float32)
    q, k, v, tables, lens, scale, v_dim = args
    pos = torch.arange(int(lens.max()))
    slots = tables[:, pos // 16].long() * 16 + pos % 16
    keys = k[slots].double()  # [B, L, Hk, D]
    values = keys[..., :v_dim] if v is None else v[slots].double()
    group = q.shape[1] // k.shape[1]
    keys, values = keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.double(), keys) * scale
    scores = scores.masked_fill(~(pos[None, :] < lens[:, None])[:, None, :], float("-inf"))
    dense = torch.einsum("bhl,blhd->bhd", scores.softmax(-1), values.nan_to_num())
    torch.testing.assert_close(reference(*args, block_size=16).double(), dense, atol=1e-5, rtol=1e-5)


def test_compiled_graph_calls_the_op_whole():
    """fullgraph=True: no graph break on the op, the fake gives the shape, the result matches eager."""
    q, k, v, tables, lens, scale, v_dim = problem([5, 40], "mla", 16, torch.bfloat16)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def step(q, k, tables, lens):
        return paged_decode_attention(q, k, None, tables, lens, 16, scale, v_dim) * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(q, k, tables, lens), step(q, k, tables, lens), atol=0, rtol=0)
    targets = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    op = torch.ops.xpuserve_kernels.paged_decode
    assert targets & {op, op.default}, targets


def test_failed_build_falls_back_with_one_warning(tmp_path):
    """No compiler: one warning line, the status says why, and attention still runs (on the reference)."""
    code = (
        "import logging, torch; logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "from xpuserve.kernels.build import kernel_status\n"
        "from xpuserve.kernels.paged_attention import paged_decode_attention\n"
        "q, k = torch.randn(1, 2, 8), torch.randn(16, 1, 8)\n"
        "t, n = torch.zeros(1, 1, dtype=torch.int32), torch.tensor([3], dtype=torch.int32)\n"
        "print(tuple(paged_decode_attention(q, k, None, t, n, 16, 0.3, 4).shape))\n"
        "print(kernel_status())\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["(1, 2, 4)", run.stdout.splitlines()[1]]
    assert run.stdout.splitlines()[1].startswith("reference (")
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "using the PyTorch reference" in warnings[0], run.stderr


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_cache_write_equals_indexing(cache_dtype, values_dtype):
    """The C++ cache write (store_kv) equals cache[slots] = values.to(cache dtype), bf16 rounding included,
    for MLA's [slots, width] and GQA's [slots, heads, dim] caches; other slots are untouched."""
    from xpuserve.kernels.paged_attention import write_cache, writes_cache

    torch.manual_seed(4)
    for shape in ((40, 37), (40, 3, 16)):
        cache = torch.randn(shape).to(cache_dtype)
        expected = cache.clone()
        slots = torch.tensor([7, 0, 39, 12])
        values = (torch.randn(4, *shape[1:]) * 1e3).to(values_dtype)
        values[0, 0] = float("nan")
        expected[slots] = values.to(cache_dtype)
        with torch.inference_mode():
            assert writes_cache(cache, values)
            write_cache(cache, slots, values)
        torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=True)


def test_cache_write_rejects_bad_slots_and_shapes():
    from xpuserve.kernels.paged_attention import write_cache

    cache = torch.zeros(8, 4)
    with pytest.raises(RuntimeError, match="outside the cache"):
        write_cache(cache, torch.tensor([8]), torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="differ in shape"):
        write_cache(cache, torch.tensor([1]), torch.ones(1, 5))
    with pytest.raises(RuntimeError, match="int64"):
        write_cache(cache, torch.tensor([1], dtype=torch.int32), torch.ones(1, 4))
    assert cache.abs().sum() == 0
