"""The fused routed-experts op (kernels/gemm.py fused_experts, csrc/moe.cpp) against a float64 oracle:
bf16 and int8 experts, bf16 and float32 activations, the AVX2 and portable tiles, expert-parallel
shards; the model's MoE layer with the op against its per-expert loop; and bad inputs."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from xpuserve.kernels import gemm
from xpuserve.models import moe
from xpuserve.platforms import current_platform


@pytest.fixture(autouse=True)
def kernel_built():
    assert gemm.available(), gemm.status()


def experts(kind: str, num: int, hidden: int, inter: int):
    """(w13, w13_scale, w2, w2_scale, float64 w13, float64 w2)."""
    if kind == "bf16":
        w13, w2 = (torch.randn(num, 2 * inter, hidden) / hidden**0.5).bfloat16(), (torch.randn(num, hidden, inter) / inter**0.5).bfloat16()
        return w13, None, w2, None, w13.double(), w2.double()
    w13, w2 = torch.randint(-127, 128, (num, 2 * inter, hidden), dtype=torch.int8), torch.randint(-127, 128, (num, hidden, inter), dtype=torch.int8)
    s13, s2 = torch.rand(num, 2 * inter) / (127 * hidden**0.5), torch.rand(num, hidden) / (127 * inter**0.5)
    return w13, s13, w2, s2, w13.double() * s13.double()[..., None], w2.double() * s2.double()[..., None]


def oracle(x, topk_weights, topk_ids, w13, w2, first_expert):
    """float64, pair by pair, every rounding after the fact: what the op approximates."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, j in itertools.product(range(topk_ids.shape[0]), range(topk_ids.shape[1])):
        e = int(topk_ids[t, j]) - first_expert
        if 0 <= e < w13.shape[0]:
            gate, up = (w13[e] @ x[t].double()).chunk(2)
            out[t] += float(topk_weights[t, j]) * (w2[e] @ (F.silu(gate) * up))
    return out


def routes(tokens: int, num_experts: int, top_k: int):
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    return torch.rand(tokens, top_k), ids


def assert_near(out, expected, x_dtype):
    assert out.dtype == x_dtype and out.shape == expected.shape
    # float32 sums of a few hundred terms; bf16 output rounding on top.
    tolerance = 1e-5 * expected.abs().max().item() + (2.0**-8 * expected.abs() if x_dtype == torch.bfloat16 else 0)
    error = (out.double() - expected).abs()
    assert (error <= tolerance).all(), f"worst error {error.max().item():.3g}"


@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16_x", "f32_x"])
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_matches_float64_oracle(kind, x_dtype, portable):
    torch.manual_seed(0)
    for tokens, hidden, inter, num, top_k in [(1, 64, 32, 8, 2), (3, 100, 7, 4, 4), (17, 72, 40, 16, 4),
                                              (64, 256, 96, 8, 3), (5, 8, 1, 1, 1)]:
        w13, s13, w2, s2, w13_64, w2_64 = experts(kind, num, hidden, inter)
        x = torch.randn(tokens, hidden).to(x_dtype)
        topk_weights, topk_ids = routes(tokens, num, top_k)
        out = torch.ops.xpuserve_gemm.fused_experts(x, topk_weights, topk_ids, w13, s13, w2, s2, 0, portable)
        try:
            assert_near(out, oracle(x, topk_weights, topk_ids, w13_64, w2_64, 0), x_dtype)
        except AssertionError as e:
            raise AssertionError(f"M={tokens} K={hidden} I={inter} E={num} top_k={top_k}: {e}") from None


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_the_fallback_reference_matches_float64_oracle(kind):
    """What runs where the op did not build (the wrapper's fallback), a shard of experts 2.. included."""
    torch.manual_seed(4)
    w13, s13, w2, s2, w13_64, w2_64 = experts(kind, 6, 40, 12)
    x = torch.randn(5, 40)
    topk_weights, topk_ids = routes(5, 8, 3)
    out = gemm.fused_experts_reference(x, topk_weights, topk_ids, w13, s13, w2, s2, 2)
    assert_near(out, oracle(x, topk_weights, topk_ids, w13_64, w2_64, 2), torch.float32)


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_an_expert_parallel_shard_adds_only_its_experts(kind):
    """Rank holding experts 4..7 of 12: pairs routed to the others contribute nothing, a token with
    none of its experts here comes out zero, and the shards' sum is the whole layer."""
    torch.manual_seed(1)
    w13, s13, w2, s2, w13_64, w2_64 = experts(kind, 12, 48, 16)
    x = torch.randn(6, 48).bfloat16()
    topk_weights, topk_ids = routes(6, 12, 2)
    topk_ids[0] = torch.tensor([0, 9])  # nothing on the middle shard
    whole = oracle(x, topk_weights, topk_ids, w13_64, w2_64, 0)
    total = torch.zeros_like(whole)
    for first in (0, 4, 8):
        part = gemm.fused_experts(x, topk_weights, topk_ids, w13[first : first + 4], None if s13 is None else s13[first : first + 4],
                                  w2[first : first + 4], None if s2 is None else s2[first : first + 4], first)
        assert_near(part, oracle(x, topk_weights, topk_ids, w13_64[first : first + 4], w2_64[first : first + 4], first), torch.bfloat16)
        if first == 4:
            assert (part[0] == 0).all()
        total += part.double()
    assert torch.allclose(total, whole, rtol=2**-6, atol=1e-3 * whole.abs().max().item())


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_moe_layer_with_the_op_equals_its_expert_loop(kind, monkeypatch):
    """The model's path: run_experts hands the layer to the platform's op (and still counts tokens
    per expert); forcing the loop gives the same answer up to bf16 rounding of its intermediates."""
    torch.manual_seed(2)
    platform = current_platform()
    w13, s13, w2, s2, _, _ = experts(kind, 8, 128, 64)
    x = torch.randn(9, 128).bfloat16()
    topk_weights, topk_ids = routes(9, 8, 3)
    assert platform.fuses_experts(x, w13, False) == (kind == "int8" or not platform.native_bf16)
    calls = []
    monkeypatch.setattr(platform, "fused_experts", lambda *args: calls.append(1) or gemm.fused_experts(*args))
    counts = torch.zeros(8, dtype=torch.int64)
    fused = moe.run_experts(x, topk_weights, topk_ids, w13, s13, w2, s2, counts, 0, False)
    assert calls == ([1] if platform.fuses_experts(x, w13, False) else [])
    assert counts.tolist() == torch.bincount(topk_ids.flatten(), minlength=8).tolist()
    monkeypatch.setattr(platform, "fuses_experts", lambda *args: False)
    loop = moe.run_experts(x, topk_weights, topk_ids, w13, s13, w2, s2, counts, 0, False)
    assert counts.sum() == 2 * topk_ids.numel()
    torch.testing.assert_close(fused.float(), loop.float(), rtol=2**-5, atol=2**-5 * loop.abs().max().item())


def test_more_rows_than_the_gemm_takes_use_the_loop():
    platform = current_platform()
    w13 = torch.zeros(2, 8, 16, dtype=torch.int8)
    assert platform.fuses_experts(torch.zeros(64, 16).bfloat16(), w13, False)
    assert not platform.fuses_experts(torch.zeros(65, 16).bfloat16(), w13, False)
    assert not platform.fuses_experts(torch.zeros(4, 16).bfloat16(), w13, True)  # W8A8 keeps the loop


def test_inside_a_compiled_graph():
    torch.manual_seed(3)
    w13, s13, w2, s2, _, _ = experts("int8", 4, 32, 16)
    topk_weights, topk_ids = routes(3, 4, 2)

    def layer(x):
        return gemm.fused_experts(x, topk_weights, topk_ids, w13, s13, w2, s2).relu()

    x = torch.randn(3, 32).bfloat16()
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=0, atol=0)


def test_bad_inputs_are_errors():
    x = torch.randn(2, 16).bfloat16()
    w13, w2 = torch.zeros(4, 8, 16).bfloat16(), torch.zeros(4, 16, 4).bfloat16()
    weights, ids = torch.rand(2, 2), torch.tensor([[0, 1], [2, 3]])
    op = torch.ops.xpuserve_gemm.fused_experts
    with pytest.raises(RuntimeError, match=r"\[E, 2I, K\]"):
        op(x, weights, ids, w13, None, torch.zeros(4, 16, 5).bfloat16(), None)
    with pytest.raises(RuntimeError, match="top_k"):
        op(x, weights[:, :1], ids, w13, None, w2, None)
    with pytest.raises(RuntimeError, match="need their scales"):
        op(x, weights, ids, w13.to(torch.int8), None, w2.to(torch.int8), None)
    with pytest.raises(RuntimeError, match="bfloat16 or int8"):
        op(x, weights, ids, w13.float(), None, w2.float(), None)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(x, weights, ids, w13, None, w2.to(torch.int8), None)
