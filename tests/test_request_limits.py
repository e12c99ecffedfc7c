"""Requests that once hung the server, made it allocate without bound or answered 500 (issue 19):
each is a 4xx in OpenAI's error shape, and the server serves the next request."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from server_fixture import MODEL_NAME, running_server

MESSAGES = [{"role": "user", "content": "hi"}]
COMPLETION = {"model": MODEL_NAME, "prompt": "12+34", "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2}


@pytest.fixture(scope="module")
def url(model_dir):
    with running_server(model_dir) as (url, _):
        yield url


def rss_bytes() -> int:
    """The server's resident memory: it runs in this process, on a thread."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_still_serving(url: str) -> None:
    response = httpx.post(url + "/v1/completions", json=COMPLETION, timeout=30)
    assert response.status_code == 200 and len(response.json()["choices"]) == 1


def test_huge_n_is_refused_at_once_without_memory_growth(url):
    before = rss_bytes()
    # The answer must come within a second (the old server never answered): a client deadline,
    # not a measured speed.
    response = httpx.post(url + "/v1/completions", json={**COMPLETION, "max_tokens": 8, "n": 2147483648}, timeout=1.0)
    assert_openai_error(response, 400, "n")
    assert_still_serving(url)
    assert rss_bytes() - before < 100 << 20


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**COMPLETION, "n": 129}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 129}, "n"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a"] * 9, "n": 128}, "n"),  # 1,152 sequences: more than the queue
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": [1] * 1025}, "stop_token_ids"),
    ("/v1/completions", {**COMPLETION, "seed": 2**63}, "seed"),
    ("/v1/completions", {**COMPLETION, "seed": -(2**63) - 1}, "seed"),
])
def test_parameter_bounds(url, path, body, param):
    assert_openai_error(httpx.post(url + path, json=body), 400, param)
    assert_still_serving(url)


def test_a_64_bit_seed_is_accepted(url):
    for seed in (2**63 - 1, -(2**63)):
        response = httpx.post(url + "/v1/completions", json={**COMPLETION, "seed": seed, "n": 2, "temperature": 1})
        assert response.status_code == 200 and len(response.json()["choices"]) == 2


@pytest.mark.parametrize("raw", [
    b'{"model": "tiny-r1", "prompt": "x", "temperature": Infinity}',
    b'{"model": "tiny-r1", "prompt": "x", "top_p": NaN}',
    b'{"model": "tiny-r1", "prompt": "x", "logit_bias": {"5": -Infinity}}',
])
def test_non_finite_floats_are_refused(url, raw):
    response = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert "finite" in assert_openai_error(response, 400)["message"]


@pytest.mark.parametrize("path, raw", [
    ("/v1/completions", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}"),
    ("/v1/completions", b'{"prompt": "x", "a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
    ("/tokenize", b'{"prompt": "\xff\xfe"}'),
])
def test_unparseable_bodies_get_openai_errors(url, path, raw):
    response = httpx.post(url + path, content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)
    assert_still_serving(url)


def test_unknown_route_gets_an_openai_error(url):
    assert_openai_error(httpx.get(url + "/v1/nothing-here"), 404)


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {**COMPLETION, "model": "\ud800"}, 404, "model"),
    ("/v1/completions", {**COMPLETION, "prompt": "a\ud800b"}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["ok", "\udfff"]}, 400, "prompt[1]"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages"),
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"tools": 3}}, 400, "chat_template_kwargs.tools"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"messages": []}}, 400, "chat_template_kwargs.messages"),
])
def test_input_that_was_a_500(url, path, body, status, param):
    raw = json.dumps(body)  # ASCII, "\ud800" escaped: httpx's json= cannot encode a lone surrogate
    assert_openai_error(httpx.post(url + path, content=raw, headers={"content-type": "application/json"}), status, param)
    assert_still_serving(url)


def test_a_template_that_multiplies_its_input_is_cut_off(model_dir):
    template = "{% for i in range(100000) %}{% for m in messages %}{{ m.content }}{% endfor %}{% endfor %}"
    with running_server(model_dir, chat_template=template) as (url, _):
        response = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "x" * 400}]}, timeout=60)
        assert "exceeds" in assert_openai_error(response, 400, "messages")["message"]
        assert_still_serving(url)


def test_tokenize_and_detokenize_are_guarded(model_dir):
    with running_server(model_dir, api_key="s3cret", max_body_bytes=1 << 20) as (url, _):
        key = {"Authorization": "Bearer s3cret"}
        assert_openai_error(httpx.post(url + "/tokenize", json={"prompt": "hi"}), 401)
        assert_openai_error(httpx.post(url + "/detokenize", json={"tokens": [5]}), 401)
        assert httpx.post(url + "/tokenize", json={"prompt": "hi"}, headers=key).status_code == 200
        assert httpx.post(url + "/detokenize", json={"tokens": [5]}, headers=key).status_code == 200
        assert_openai_error(httpx.post(url + "/tokenize", json={"prompt": "x" * (2 << 20)}, headers=key), 413)
        non_ascii = {"Authorization": "Bearer s3crét".encode()}
        assert_openai_error(httpx.post(url + "/v1/completions", json=COMPLETION, headers=non_ascii), 401)
        assert httpx.post(url + "/v1/completions", json=COMPLETION, headers=key).status_code == 200


def test_tokenizing_a_long_prompt_does_not_stall_other_requests(url):
    """The prompt takes seconds to tokenize (and is then refused as too long): /health keeps answering meanwhile."""
    answers = []
    thread = threading.Thread(target=lambda: answers.append(
        httpx.post(url + "/v1/completions", json={**COMPLETION, "prompt": "x" * (1 << 20)}, timeout=120)))
    thread.start()
    health_checks = 0
    while thread.is_alive():
        assert httpx.get(url + "/health", timeout=120).status_code == 200
        health_checks += 1
    assert "max_model_len" in assert_openai_error(answers[0], 400, "prompt")["message"]
    assert health_checks >= 5
