"""Decode steps: attention read in place from the paged cache equals the padded reference path, and
the captured (compiled) decode step equals the eager one, on every architecture."""

from __future__ import annotations

import random

import pytest
import torch

from oracle import ARCHITECTURES, make_checkpoint, random_prompts, write_char_tokenizer
from xpuserve import LLM, SamplingParams
from xpuserve.engine.kv_cache import allocate_kv_cache
from xpuserve.models.context import ForwardContext, SequenceSlice
from xpuserve.platforms import current_platform
from xpuserve.weights import load_model

LENGTHS = [1, 5, 16, 17, 40, 130]  # partially filled blocks, exactly full ones, one across 128


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_checkpoint(request.param, path, seed=4)
    return load_model(path, dtype="float32", device="cpu")


def block_tables(lengths: list[int], steps: int, block_size: int, seed: int) -> list[list[int]]:
    """Shuffled, non-contiguous blocks, enough for each prompt plus `steps` decoded tokens."""
    need = [-(-(n + steps) // block_size) for n in lengths]
    blocks = list(range(sum(need)))
    random.Random(seed).shuffle(blocks)
    return [blocks[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(need))]


@torch.inference_mode()
def decode_logits(model, forward, block_size: int, steps: int = 3, paged: bool = True, forced=None) -> list[torch.Tensor]:
    """Prefills LENGTHS prompts (eagerly), then decodes `steps` times through `forward`. Returns the
    prefill's last logits and each step's. Each step's tokens are the argmax of the logits before it,
    this run's or `forced` (another run's result, so that two runs see the same tokens)."""
    prompts = random_prompts(LENGTHS, model.config.vocab_size, seed=5)
    tables = block_tables(LENGTHS, steps, block_size, seed=block_size)
    allocate_kv_cache(model, sum(map(len, tables)) * block_size)
    ctx = ForwardContext.build([SequenceSlice(0, len(p), t) for p, t in zip(prompts, tables)], block_size)
    hidden = model(torch.tensor([t for p in prompts for t in p]), ctx)
    out = [model.compute_logits(hidden[torch.tensor(LENGTHS).cumsum(0) - 1]).float()]
    for step in range(steps):
        tokens = (out if forced is None else forced)[step].argmax(-1)
        slices = [SequenceSlice(n + step, 1, t) for n, t in zip(LENGTHS, tables)]
        out.append(model.compute_logits(forward(tokens, ForwardContext.build(slices, block_size, paged_decode=paged))).float())
    return out


def max_relative_error(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, reference))


@pytest.mark.parametrize("block_size", [16, 128])
def test_paged_decode_equals_reference(model, block_size):
    reference = decode_logits(model, model, block_size, paged=False)
    assert max_relative_error(decode_logits(model, model, block_size), reference) <= 1e-5


def test_captured_decode_equals_eager(model):
    captured = current_platform().capture_decode(model)
    assert captured is not None
    eager = decode_logits(model, model, 16)
    assert max_relative_error(decode_logits(model, captured, 16), eager) <= 1e-5


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_captured_decode_in_bf16(tmp_path_factory, quantization):
    """bf16 and INT8 weights take the CPU's own GEMM inside the captured graph. The compiler rounds
    to bf16 at other points than eager does, so the two differ by a few bf16 steps (these spread
    random weights amplify them, and a near-tie in the router can flip an expert: bf16 against float32
    differs by more than 0.5 at worst here; the cache entries each step writes differ too, so the gap
    grows with steps: measured 1.5-5.8% mean, 83-100% same argmax with INT8). The float32 test above
    is the exact one; this checks the bf16/INT8 graph computes the same thing. Tokens are forced from
    the eager run, so both runs see the same inputs."""
    path = tmp_path_factory.mktemp("v3_bf16")
    make_checkpoint("v3_grouped", path, seed=8)
    model = load_model(path, dtype="bfloat16", device="cpu", quantization=quantization)
    eager = decode_logits(model, model, 16)
    captured = decode_logits(model, current_platform().capture_decode(model), 16, forced=eager)
    for ours, theirs in zip(captured, eager):
        assert ((ours - theirs).abs().mean() / theirs.abs().mean()).item() <= 0.1
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.75


def test_engine_captured_equals_eager(tmp_path):
    """Continuous batching through the runner: batch sizes change every few steps (requests of
    different lengths finish at different times), so the captured step runs at several sizes."""
    make_checkpoint("v3_grouped", tmp_path, seed=6)
    write_char_tokenizer(tmp_path, 256)
    prompts = random_prompts([3, 9, 20, 33, 2], 256, seed=7)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (4, 9, 14, 20, 25)]
    results = {}
    for eager in (True, False):
        llm = LLM(str(tmp_path), device="cpu", dtype="float32", enforce_eager=eager)
        assert (llm.engine.worker.runner.decode_forward is None) == eager
        results[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if not eager:  # batches of 5 down to 1, and block tables of 1 to 3 blocks: no recompiles
            # (dense and MoE layers x batch 1, 2-64 and the 65 the warm-up ran for max_num_seqs 256)
            assert sorted(region_sizes(llm.engine.worker.runner.decode_forward)) == [1] * 6
    assert results[False] == results[True]
    assert [len(t) for t in results[False]] == [4, 9, 14, 20, 25]


def region_sizes(captured) -> list[int]:
    """Graphs held by each of the captured step's cache regions."""
    from torch._dynamo.eval_frame import _get_cache_entries_for_region
    from xpuserve.platforms.compiled_layers import _run_layer
    return [len(_get_cache_entries_for_region(_run_layer, g._isolate_recompiles_id)) for g in captured.graphs.values()]


@torch.inference_mode()
def test_captured_decode_recompiles_for_an_unseen_layout(model):
    """Once compiled, a region runs without guard evaluation; Dynamo still checks each input tensor's
    layout, and an input unlike the compiled one (here a strided block table) runs the step again with
    guards, compiling for it, instead of running a graph traced for other strides."""
    captured = current_platform().capture_decode(model)
    decode_logits(model, captured, 16)
    assert region_sizes(captured) and all(n == 1 for n in region_sizes(captured))
    tables = block_tables(LENGTHS, 4, 16, seed=16)
    ctx = ForwardContext.build([SequenceSlice(n + 3, 1, t) for n, t in zip(LENGTHS, tables)], 16)
    ctx.block_tables = torch.cat([ctx.block_tables, ctx.block_tables], 1)[:, ::2]  # same values, stride 2
    tokens = torch.arange(len(LENGTHS))
    ours = captured(tokens, ctx)
    assert any(n == 2 for n in region_sizes(captured))
    torch.testing.assert_close(ours, model(tokens, ctx), rtol=1e-5, atol=1e-5)


def test_engine_captured_above_gemm_rows(tmp_path):
    """More sequences than the CPU's GEMM takes (64 rows): the third batch class, compiled at start-up
    (not in the middle of serving), gives the eager step's tokens. All 66 prompts fit one step, so two
    decode steps run at 66 sequences (checked once by recording the batch sizes: 66, 66, 49, 32, 16)."""
    make_checkpoint("v3_grouped", tmp_path, seed=9)
    write_char_tokenizer(tmp_path, 256)
    prompts = random_prompts([2 + i % 7 for i in range(66)], 256, seed=10)
    params = [SamplingParams(temperature=0, max_tokens=3 + i % 4, ignore_eos=True) for i in range(66)]
    results = {}
    for eager in (True, False):
        llm = LLM(str(tmp_path), device="cpu", dtype="float32", enforce_eager=eager, max_num_seqs=66)
        if not eager:
            assert llm.engine.worker.runner.decode_forward.compiled == {0, 1, 2}
        results[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if not eager:
            assert sorted(region_sizes(llm.engine.worker.runner.decode_forward)) == [1] * 6
    assert results[False] == results[True]
