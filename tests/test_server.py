"""The OpenAI-compatible server, through the official `openai` client and raw HTTP, on a real uvicorn."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from server_fixture import CHAT_PROMPT, MODEL_NAME, THINK_AFTER, running_server
from xpuserve.reasoning import split_reasoning

MESSAGES = [{"role": "user", "content": CHAT_PROMPT}]


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir) as (url, engine):
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(server[0] + "/health").status_code == 200


def test_chat_separates_reasoning(client):
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=12)
    message = response.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert len(reasoning) == THINK_AFTER and "</think>" not in reasoning
    assert message.content and "</think>" not in message.content
    assert response.usage.completion_tokens == 12 and response.choices[0].finish_reason == "length"
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_streamed_chat_equals_non_streamed(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, temperature=0.8, seed=5, max_tokens=16)
    full = client.chat.completions.create(**kwargs).choices[0].message
    reasoning = content = ""
    usage = None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == (full.model_extra["reasoning_content"], full.content)
    assert usage.completion_tokens == 16


def test_completions_n2_seed_logprobs(client, server):
    kwargs = dict(model=MODEL_NAME, prompt=[5, 6, 7, 8], max_tokens=10, temperature=1.0, seed=3, n=2, logprobs=2)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]  # seeded: reproducible
    assert len(first.choices) == 2 and first.choices[0].text != first.choices[1].text
    logprobs = first.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 10 and all(lp <= 0 for lp in logprobs.token_logprobs)
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == lp  # the chosen token is always there, besides the best two
        assert len(top) == 2 or (len(top) == 3 and lp == min(top.values()))
    assert first.usage.prompt_tokens == 4 and first.usage.completion_tokens == 20
    # text_offset: where each token starts in the text, also across a stream's chunks
    assert "".join(logprobs.tokens) == first.choices[0].text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(10)]
    streamed = [c.choices[0].logprobs for c in client.completions.create(**{**kwargs, "n": 1}, stream=True) if c.choices]
    tokens = [t for lp in streamed for t in lp.tokens]
    assert [o for lp in streamed for o in lp.text_offset] == [len("".join(tokens[:i])) for i in range(10)]


def test_completions_batch_of_prompts_equals_each_alone(client, server):
    """OpenAI's API (and lm-evaluation-harness) sends several prompts in one request: choices come
    numbered prompt by prompt, n each, with what each prompt gives alone; usage is their sum."""
    prompts = ["abc", "hello there", "x"]
    kwargs = dict(model=MODEL_NAME, max_tokens=6, temperature=0.9, seed=4, n=2)
    alone = [client.completions.create(prompt=p, **kwargs) for p in prompts]
    batch = client.completions.create(prompt=prompts, **kwargs)
    assert [c.index for c in batch.choices] == list(range(6))
    assert [c.text for c in batch.choices] == [c.text for r in alone for c in r.choices]
    assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone)
    assert batch.usage.completion_tokens == sum(r.usage.completion_tokens for r in alone) == 36
    ids = client.completions.create(model=MODEL_NAME, prompt=[[5, 6, 7], [8, 9]], max_tokens=4, temperature=0)
    assert [c.text for c in ids.choices] == [
        client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=4, temperature=0).choices[0].text for p in ([5, 6, 7], [8, 9])]
    streamed = {}
    usage = None
    for chunk in client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True}, **kwargs):
        usage = chunk.usage or usage
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(6)] == [c.text for c in batch.choices]
    assert usage.completion_tokens == 36 and usage.prompt_tokens == batch.usage.prompt_tokens


def test_numeric_strings_are_text_prompts_and_echo_only_ignores_min_tokens(client):
    batch = client.completions.create(model=MODEL_NAME, prompt=["1", "2", "3"], max_tokens=2, temperature=0)
    assert len(batch.choices) == 3 and batch.usage.prompt_tokens == 3
    scored = client.completions.create(model=MODEL_NAME, prompt="abc", echo=True, max_tokens=0, logprobs=0, extra_body={"min_tokens": 2})
    assert scored.choices[0].text == "abc" and scored.usage.completion_tokens == 0


def test_a_client_that_hangs_up_stops_its_unstreamed_batch(server):
    url, engine = server
    body = {"model": MODEL_NAME, "prompt": [[3] * 20, [4] * 20, [5] * 20], "max_tokens": 450, "ignore_eos": True}
    computed = engine.worker.runner.num_tokens_computed
    with pytest.raises(httpx.ReadTimeout):  # the whole batch takes seconds here
        httpx.post(url + "/v1/completions", json=body, timeout=0.5)
    for _ in range(100):
        if not engine.output_processor.requests and engine.block_manager.num_free_blocks == len(engine.block_manager.blocks):
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not engine.output_processor.requests and engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)
    assert engine.worker.runner.num_tokens_computed - computed < 3 * 450  # stopped long before max_tokens


def test_a_batch_with_one_bad_prompt_is_refused_whole(server):
    engine = server[1]
    body = {"model": MODEL_NAME, "prompt": [[1, 2], [10**6]], "max_tokens": 2}
    response = httpx.post(server[0] + "/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt[1]" and "token ids" in response.json()["error"]["message"]
    assert not engine.has_unfinished_requests()  # nothing of it started


def test_logit_bias_forces_and_bans_tokens(client, server):
    tokenizer = server[1].tokenizer
    kwargs = dict(model=MODEL_NAME, prompt=[9, 10, 11], max_tokens=6, temperature=0, logprobs=1)
    forced = client.completions.create(logit_bias={"42": 100}, **kwargs).choices[0]
    assert forced.text == tokenizer.decode([42] * 6)
    plain = client.completions.create(**kwargs).choices[0]
    first = tokenizer.encode(plain.logprobs.tokens[0], add_special_tokens=False)[0]
    banned = client.completions.create(logit_bias={str(first): -100}, **kwargs).choices[0]
    assert banned.logprobs.tokens[0] != plain.logprobs.tokens[0]
    # logprobs stay the model's own (vLLM's raw logprobs), bias or not
    assert forced.logprobs.token_logprobs[0] < plain.logprobs.token_logprobs[0]


def test_tokenize_detokenize_version(server):
    url, engine = server
    tokenized = httpx.post(url + "/tokenize", json={"model": MODEL_NAME, "prompt": "hello"}).json()
    assert tokenized["tokens"] == engine.tokenizer.encode("hello") and tokenized["count"] == len(tokenized["tokens"])
    assert tokenized["max_model_len"] == engine.max_model_len
    chat = httpx.post(url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    prompt = engine.tokenizer.apply_chat_template(MESSAGES, True)
    assert chat == engine.tokenizer.encode(prompt, add_special_tokens=False)
    assert httpx.post(url + "/detokenize", json={"tokens": chat}).json()["prompt"] == engine.tokenizer.decode(chat, skip_special_tokens=False)
    assert httpx.post(url + "/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(url + "/tokenize", json={}).status_code == 400
    assert httpx.get(url + "/version").json()["version"]


def test_chat_logprobs(client):
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=5,
                                              logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == 5 and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)  # greedy = best


def test_stop_string(client):
    text = client.completions.create(model=MODEL_NAME, prompt=[9, 10, 11], max_tokens=20, temperature=0).choices[0].text
    stop = text[4:6]
    stopped = client.completions.create(model=MODEL_NAME, prompt=[9, 10, 11], max_tokens=20, temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL_NAME, prompt=[9, 10, 11], max_tokens=20, temperature=0, stop=[stop], stream=True)
        if c.choices
    )
    assert streamed == stopped.choices[0].text


def test_raw_sse(server):
    url = server[0] + "/v1/completions"
    body = {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 12, "temperature": 0.7, "seed": 9}
    full = httpx.post(url, json=body).json()["choices"][0]["text"]
    lines = []
    with httpx.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(line.startswith("data: ") for line in lines)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_64_concurrent_streams_and_metrics(server, client):
    url, engine = server
    prompts = [[(7 * i + j) % 200 + 1 for j in range(3 + i % 9)] for i in range(64)]
    expected = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=8, temperature=0).choices[0].text
                for p in prompts[:8]]
    before = _metric(url, "xpuserve:request_success_total")
    tokens_before = _metric(url, "xpuserve:generation_tokens_total")

    async def one(http: httpx.AsyncClient, prompt):
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
        text = ""
        async with http.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def all_of_them():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, p) for p in prompts))

    texts = asyncio.run(all_of_them())
    assert texts[:8] == expected
    assert all(len(t) > 0 for t in texts)
    assert _metric(url, "xpuserve:request_success_total") == before + 64
    generated = _metric(url, "xpuserve:generation_tokens_total") - tokens_before
    assert 64 <= generated <= 64 * 8
    assert _metric(url, "xpuserve:num_requests_running") == 0
    assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)


@pytest.mark.parametrize("prompt", [[3] * 40, [[3] * 40, [4] * 30]], ids=["one_prompt", "batch"])
def test_disconnect_mid_stream_frees_blocks(server, prompt):
    url, engine = server
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 450, "temperature": 0, "ignore_eos": True, "stream": True}
    computed = engine.worker.runner.num_tokens_computed
    with httpx.stream("POST", url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i == 6:
                break  # leave mid-stream: closing the connection must abort the request
    for _ in range(200):
        if engine.block_manager.num_free_blocks == len(engine.block_manager.blocks) and not engine.output_processor.requests:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not engine.output_processor.requests
    assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)
    assert engine.worker.runner.num_tokens_computed - computed < 450  # aborted, not run to max_tokens


def _metric(url: str, name: str) -> float:
    """The metric's value, summed over its labels."""
    lines = httpx.get(url + "/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith((name + " ", name + "{")))


BAD_REQUESTS = [
    (400, "/v1/chat/completions", {"model": MODEL_NAME, "messages": MESSAGES, "temperature": -1}, "temperature"),
    (400, "/v1/chat/completions", {"model": MODEL_NAME, "messages": MESSAGES, "top_p": 1.5}, "top_p"),
    (400, "/v1/chat/completions", {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    (400, "/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, "messages"),
    (400, "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    (400, "/v1/chat/completions", {"model": MODEL_NAME, "messages": MESSAGES, "temperature": "hot"}, "temperature"),
    (400, "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 10**6}, "max_model_len"),
    (400, "/v1/completions", {"model": MODEL_NAME, "prompt": [10**6]}, "token ids"),
    (404, "/v1/completions", {"model": "gpt-4", "prompt": "x"}, "does not exist"),
    (400, "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
    (400, "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    (400, "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "logit_bias": {"1000000": 1}}, "logit_bias"),
]


@pytest.mark.parametrize("status, path, body, needle", BAD_REQUESTS)
def test_bad_request_then_good_one(server, status, path, body, needle):
    response = httpx.post(server[0] + path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] + str(error["param"]) and error["type"]
    assert httpx.post(server[0] + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("raw, status", [(b"{not json", 400), (b"\xff\xfe\x00garbage", 400), (b"x" * (9 << 20), 413)])
def test_malformed_bodies(server, raw, status):
    response = httpx.post(server[0] + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.json()["error"]["message"]
    assert httpx.post(server[0] + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_api_key(model_dir):
    with running_server(model_dir, api_key="s3cret") as (url, _):
        denied = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret").completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
        assert ok.choices[0].text is not None


def test_hostile_chat_template_is_refused(model_dir):
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with running_server(model_dir, chat_template=hostile) as (url, _):
        response = httpx.post(url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES})
        assert response.status_code == 400 and "refused" in response.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_overload_gives_429_with_retry_after(model_dir):
    with running_server(model_dir, max_waiting=0) as (url, _):
        response = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2})
        assert response.status_code == 429 and response.headers["retry-after"]
    with running_server(model_dir, max_waiting=2) as (url, engine):
        body = {"model": MODEL_NAME, "prompt": ["a", "b", "c"], "max_tokens": 2}
        response = httpx.post(url + "/v1/completions", json=body)  # can never fit: not a "retry later"
        assert response.status_code == 400 and "send smaller batches" in response.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json={**body, "prompt": ["a", "b"]}).status_code == 200


def test_split_reasoning_is_stream_safe():
    from xpuserve.reasoning import ReasoningParser

    text = "<think>\nplan a</thi then </think>\n\nanswer </think"
    whole = split_reasoning(text)
    assert whole == ("\nplan a</thi then ", "answer </think")
    for cut in range(1, len(text)):
        parser = ReasoningParser()
        parts = [parser.feed(text[:cut]), parser.feed(text[cut:]), parser.finish()]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == whole
    assert split_reasoning("unfinished thought") == ("unfinished thought", "")


class CountingBackend:
    """The tokenizers.Tokenizer the server uses, recording every text it encodes."""

    def __init__(self, backend):
        self.backend, self.encoded = backend, []

    def encode(self, text, **kwargs):
        self.encoded.append(text)
        return self.backend.encode(text, **kwargs)

    def encode_batch(self, texts, **kwargs):
        self.encoded.extend(texts)
        return self.backend.encode_batch(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_a_text_prompt_is_tokenized_once(server, monkeypatch):
    url, engine = server
    counting = CountingBackend(engine.tokenizer.backend)
    monkeypatch.setattr(engine.tokenizer, "backend", counting)
    prompt = "12+34="
    for stream in (False, True):
        counting.encoded.clear()
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 3, "temperature": 0, "stream": stream}
        response = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert counting.encoded == [prompt], stream
