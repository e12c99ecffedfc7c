"""Scoring a prompt (SamplingParams.prompt_logprobs; `echo` + `logprobs` on /v1/completions, as
lm-evaluation-harness uses for log-likelihood tasks): every prompt token's log-prob equals
transformers' log_softmax at the position before it, however the engine splits, caches or
preempts the prompt."""

from __future__ import annotations

import openai
import pytest

from oracle import make_checkpoint, random_prompts, reference_logits, write_char_tokenizer
from server_fixture import MODEL_NAME, running_server
from xpuserve import LLM, SamplingParams
from xpuserve.engine import runner

TOP = 3
LENGTHS = [2, 5, 23, 40, 61]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """An MLA MoE checkpoint, prompts of mixed lengths and transformers' log-probs of each prompt token."""
    path = tmp_path_factory.mktemp("v3")
    reference = make_checkpoint("v3_grouped", path, seed=5)
    write_char_tokenizer(path, reference.config.vocab_size)
    prompts = random_prompts(LENGTHS, reference.config.vocab_size, seed=2)
    expected = [reference_logits(reference, p).log_softmax(dim=-1) for p in prompts]
    return path, prompts, expected


def assert_scores_equal_reference(output, prompt, logprobs) -> None:
    scores = output.prompt_logprobs
    assert len(scores) == len(prompt) and scores[0] is None
    for position, entry in enumerate(scores[1:]):
        row = logprobs[position]  # position p's logits score prompt token p + 1
        assert entry.token_id == prompt[position + 1]
        assert entry.logprob == pytest.approx(row[prompt[position + 1]].item(), abs=1e-4)
        values, ids = row.topk(TOP)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(),
        dict(max_num_batched_tokens=8, block_size=4),  # prompts split across many steps
        dict(block_size=4, kv_cache_memory="tiny"),  # preempted and recomputed: no token scored twice
    ],
    ids=["one_step", "chunked", "preempted"],
)
def test_prompt_logprobs_equal_transformers(case, engine_args, monkeypatch):
    path, prompts, expected = case
    monkeypatch.setattr(runner, "SCORE_ROWS", 7)  # several passes of the head per step
    if engine_args.get("kv_cache_memory") == "tiny":
        per_token = LLM(path, dtype="float32", device="cpu").engine.worker.kv_bytes_per_token
        engine_args = dict(engine_args, kv_cache_memory=24 * 4 * per_token)  # 96 tokens for 131 prompt + 150 output tokens
    llm = LLM(path, dtype="float32", device="cpu", **engine_args)
    # Run the prompts once without scoring, so the prefix cache holds them: scoring must still compute them.
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, prompt_logprobs=TOP)
    outputs = llm.generate(prompts, params)
    for output, prompt, logprobs in zip(outputs, prompts, expected):
        assert_scores_equal_reference(output, prompt, logprobs)
    if "kv_cache_memory" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0


def test_prompt_logprobs_with_n_and_without_top(case):
    path, prompts, expected = case
    llm = LLM(path, dtype="float32", device="cpu")
    [output] = llm.generate([prompts[2]], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4, prompt_logprobs=0))
    assert len(output.outputs) == 3 and len(output.prompt_logprobs) == len(prompts[2])
    for position, entry in enumerate(output.prompt_logprobs[1:]):
        assert entry.top == []
        assert entry.logprob == pytest.approx(expected[2][position][prompts[2][position + 1]].item(), abs=1e-4)
    [plain] = llm.generate([prompts[2]], SamplingParams(max_tokens=1))
    assert plain.prompt_logprobs is None


def test_echo_with_logprobs_scores_a_batch_of_token_prompts(case):
    """What lm-evaluation-harness's local-completions sends for log-likelihood: token-id prompts in a
    batch, echo, logprobs=1, max_tokens=1. The prompt comes back as text, its tokens scored (the
    first with None, as OpenAI's API does), then the completion."""
    path, prompts, expected = case
    with running_server(path) as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        response = client.completions.create(model=MODEL_NAME, prompt=prompts[:3], echo=True, logprobs=1, max_tokens=1, temperature=0)
        alone = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=1, temperature=0, logprobs=1) for p in prompts[:3]]
        tokenizer = engine.tokenizer
        text = tokenizer.decode(prompts[3])
        scored = client.completions.create(model=MODEL_NAME, prompt=text, echo=True, logprobs=0, max_tokens=0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL_NAME, prompt=text, echo=True, max_tokens=5, temperature=0, stream=True) if c.choices)
        generated = client.completions.create(model=MODEL_NAME, prompt=text, max_tokens=5, temperature=0).choices[0].text
    # max_tokens 0: the prompt alone, every token after the first scored, nothing generated.
    assert scored.choices[0].text == text and scored.usage.completion_tokens == 0
    token_logprobs = scored.choices[0].logprobs.token_logprobs
    assert token_logprobs[0] is None and len(token_logprobs) == len(tokenizer.encode(text))
    assert streamed == text + generated
    for choice, prompt, logprobs, single in zip(response.choices, prompts, expected, alone):
        lp = choice.logprobs
        assert choice.text == tokenizer.decode(prompt) + single.choices[0].text
        assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for position in range(1, len(prompt)):
            assert lp.token_logprobs[position] == pytest.approx(logprobs[position - 1][prompt[position]].item(), abs=1e-4)
            best = logprobs[position - 1].max().item()
            top = lp.top_logprobs[position]  # the best token and, if another, the prompt's own
            assert max(top.values()) == pytest.approx(best, abs=1e-4) and len(top) <= 2
            assert top[lp.tokens[position]] == lp.token_logprobs[position]
        assert lp.tokens[: len(prompt)] == [tokenizer.decode([t], skip_special_tokens=False) for t in prompt]
        assert lp.token_logprobs[-1] == pytest.approx(single.choices[0].logprobs.token_logprobs[0], abs=1e-5)
    assert response.usage.prompt_tokens == sum(len(p) for p in prompts[:3])
