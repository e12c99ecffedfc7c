"""The serving engine: continuous batching, chunked prefill, preemption and prefix caching leave
greedy outputs unchanged (equal to transformers'), and every KV block comes back."""

from __future__ import annotations

import random

import pytest
import torch

from oracle import make_checkpoint, write_char_tokenizer
from xpuserve import LLM, SamplingParams
from xpuserve.models.mla import MLAttention

NUM_REQUESTS = 32


@pytest.fixture(scope="module", params=["v3_grouped", "qwen2"])
def case(request, tmp_path_factory):
    """A checkpoint, 32 prompts of mixed lengths with mixed output lengths, and transformers' greedy outputs."""
    path = tmp_path_factory.mktemp(request.param)
    reference = make_checkpoint(request.param, path, seed=7)
    write_char_tokenizer(path, reference.config.vocab_size)
    rng = random.Random(0)
    vocab = reference.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(2, 60))] for _ in range(NUM_REQUESTS)]
    max_tokens = [rng.randint(1, 24) for _ in range(NUM_REQUESTS)]
    eos = reference.config.eos_token_id
    expected = []
    for prompt, n in zip(prompts, max_tokens):
        out = reference.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0,
        )
        expected.append(out[0, len(prompt):].tolist())
    return path, prompts, max_tokens, expected


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def run_batch(llm: LLM, prompts, max_tokens) -> list[list[int]]:
    outputs = llm.generate(prompts, [greedy(n) for n in max_tokens])
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_blocks_free(llm: LLM) -> None:
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == len(manager.blocks)
    assert all(b.ref_count == 0 for b in manager.blocks)


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(),
        dict(max_num_batched_tokens=16),  # prompts of up to 60 tokens are split across steps
        dict(enable_prefix_caching=False),
        dict(max_num_seqs=5),
    ],
    ids=["default", "chunked_prefill", "no_prefix_cache", "few_seqs"],
)
def test_batch_equals_transformers(case, engine_args):
    path, prompts, max_tokens, expected = case
    llm = LLM(path, dtype="float32", device="cpu", **engine_args)
    assert run_batch(llm, prompts, max_tokens) == expected
    assert_all_blocks_free(llm)


def test_preemption_keeps_outputs(case):
    path, prompts, max_tokens, expected = case
    per_token = LLM(path, dtype="float32", device="cpu").engine.worker.kv_bytes_per_token
    # 24 blocks of 4 tokens: far less than the 32 requests need at once.
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, kv_cache_memory=24 * 4 * per_token)
    assert llm.engine.num_cache_tokens == 96
    assert run_batch(llm, prompts, max_tokens) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


def test_a_kv_budget_without_one_block_is_refused_with_the_numbers(case):
    path = case[0]
    per_token = LLM(path, dtype="float32", device="cpu").engine.worker.kv_bytes_per_token
    budget = 4 * per_token - 1  # one byte short of a block of 4 tokens
    with pytest.raises(ValueError, match=f"KV cache budget of {budget} bytes holds no block of 4 tokens"):
        LLM(path, dtype="float32", device="cpu", block_size=4, kv_cache_memory=budget)


def test_each_request_alone_equals_transformers(case):
    path, prompts, max_tokens, expected = case
    llm = LLM(path, dtype="float32", device="cpu")
    for prompt, n, want in zip(prompts[:8], max_tokens, expected):
        assert run_batch(llm, [prompt], [n]) == [want]


def test_prefix_cache_computes_only_the_suffix(case):
    path, prompts, _, _ = case
    llm = LLM(path, dtype="float32", device="cpu", block_size=4)
    shared = prompts[0] + prompts[1] + prompts[2]  # a long "system prompt"
    first = shared + [5, 6, 7]
    second = shared + [9, 8, 7, 6, 5]
    llm.generate([first], greedy(4))
    before = llm.engine.worker.runner.num_tokens_computed
    [cached] = llm.generate([second], greedy(4))
    computed = llm.engine.worker.runner.num_tokens_computed - before
    hit = cached.metrics.num_cached_tokens
    assert hit == len(shared) // 4 * 4
    assert computed == len(second) - hit + 3  # the suffix, then one token per decode step
    uncached = LLM(path, dtype="float32", device="cpu", block_size=4, enable_prefix_caching=False)
    [plain] = uncached.generate([second], greedy(4))
    assert cached.outputs[0].token_ids == plain.outputs[0].token_ids
    assert plain.metrics.num_cached_tokens == 0


def test_abort_mid_prefill_frees_blocks(case):
    path, prompts, _, _ = case
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=8)
    engine = llm.engine
    engine.add_request("long", prompts[0] + prompts[1], greedy(8))
    engine.add_request("short", prompts[2], greedy(3))
    engine.step()  # the long prompt is only partly computed
    assert engine.block_manager.num_used_blocks > 0
    engine.abort_request("long")
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(llm)


def test_latent_cache_holds_only_latent_and_rope_key(case):
    path, *_ = case
    llm = LLM(path, dtype="bfloat16", device="cpu")
    config = llm.engine.model_config
    layers = llm.engine.model.attention_layers()
    slots = llm.engine.num_cache_tokens
    total = sum(getattr(a, name).nbytes for a in layers for name in a.cache_shapes())
    if isinstance(layers[0], MLAttention):
        per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * 2
    else:
        per_token = 2 * config.num_key_value_heads * config.head_dim * config.num_hidden_layers * 2
    assert total == per_token * (slots + llm.engine.config.block_size)  # + the runner's scratch block
    assert llm.engine.worker.kv_bytes_per_token == per_token


def test_sampling_features(case):
    path, prompts, _, _ = case
    llm = LLM(path, dtype="float32", device="cpu")
    seeded = SamplingParams(temperature=1.0, seed=123, max_tokens=12)
    alone = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    crowd = llm.generate(prompts[:6] + [prompts[0]], [SamplingParams(temperature=1.0, max_tokens=12)] * 6 + [seeded])
    assert crowd[-1].outputs[0].token_ids == alone
    [multi] = llm.generate([prompts[3]], SamplingParams(temperature=1.0, n=4, max_tokens=10, seed=1))
    assert sorted(o.index for o in multi.outputs) == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in multi.outputs}) > 1
    assert_all_blocks_free(llm)


def test_stop_string_across_tokens(case):
    """The character tokenizer makes every character a token, so a 3-character stop string spans 3 tokens."""
    path, prompts, _, _ = case
    llm = LLM(path, dtype="float32", device="cpu")
    [free] = llm.generate([prompts[4]], greedy(24))
    text = free.outputs[0].text
    stop = text[5:8]
    assert len(stop) == 3
    [stopped] = llm.generate([prompts[4]], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    out = stopped.outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_engine_stats_and_request_metrics(case):
    path, prompts, _, _ = case
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=32)
    engine = llm.engine
    for i in range(4):
        engine.add_request(str(i), prompts[i], greedy(5))
    engine.step()
    stats = engine.stats()
    assert stats.num_running + stats.num_waiting == 4 and stats.num_waiting > 0  # the budget admits only some
    assert 0 < stats.kv_blocks_used <= stats.kv_blocks_total
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    metrics = finished["0"].metrics
    assert metrics.arrival_time <= metrics.first_token_time <= metrics.finish_time
    assert metrics.num_prompt_tokens == len(prompts[0])
    assert engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0


def test_logprobs_are_the_models(case):
    """Greedy logprobs equal log_softmax of the model's logits at each generated position."""
    from xpuserve.generate import prompt_logits

    path, prompts, _, _ = case
    llm = LLM(path, dtype="float32", device="cpu")
    [out] = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=6, logprobs=3))
    completion = out.outputs[0]
    logits = prompt_logits(llm.engine.model, [prompts[1] + completion.token_ids[:-1]])[0]
    expected = logits[len(prompts[1]) - 1 :].log_softmax(-1)
    for step, entry in enumerate(completion.logprobs):
        assert entry.token_id == completion.token_ids[step] == expected[step].argmax().item()
        assert entry.logprob == pytest.approx(expected[step, entry.token_id].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == expected[step].topk(3).indices.tolist()


def test_chat_renders_the_template(case):
    path, prompts, _, _ = case
    llm = LLM(path, dtype="float32", device="cpu")
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    llm.engine.tokenizer.chat_template = template
    messages = [{"role": "user", "content": "abc"}]
    [chat] = llm.chat(messages, greedy(5))
    [plain] = llm.generate(["[user]abc>"], greedy(5))
    assert chat.prompt_token_ids == plain.prompt_token_ids == llm.engine.tokenizer.encode("[user]abc>")
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids
