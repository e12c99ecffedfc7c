"""One streaming request to an OpenAI-compatible endpoint, and its timings."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import httpx

from xpuserve.bench.sse import sse_lines

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class EndpointError(Exception):
    """The endpoint cannot be benchmarked at all (unreachable, no model): one line for the user."""


@dataclass
class RequestSpec:
    """What every request of a run shares."""

    base_url: str
    endpoint: str  # "completions" or "chat"
    model: str
    output_len: int
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + PATHS[self.endpoint]

    def body(self, prompt: str | list[int]) -> dict:
        body = {"model": self.model, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            body.update(messages=[{"role": "user", "content": prompt}], max_completion_tokens=self.output_len)
        else:
            body.update(prompt=prompt, max_tokens=self.output_len)
        if self.ignore_eos:  # vLLM's extra sampling fields: the output is exactly output_len tokens
            body.update(ignore_eos=True, min_tokens=self.output_len)
        return {**body, **self.extra_body}


@dataclass
class RequestResult:
    """Times in seconds; `scheduled` and `start` from the start of the run, the others from `start`."""

    scheduled: float
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None  # first chunk carrying text or reasoning (None: no text came back)
    itl: list[float] = field(default_factory=list)  # gaps between chunks carrying text
    input_tokens: int = 0  # from the server's usage
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """(e2e - ttft) / (output tokens - 1): the mean time of each token after the first."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def first_model(base_url: str) -> str | None:
    """The first id of GET /v1/models; raises EndpointError if the server cannot be reached.
    None when the server answers but lists no model (or has no such route)."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        response = httpx.get(url, headers=headers(), timeout=10.0)
    except httpx.HTTPError as e:
        raise EndpointError(f"cannot reach {url}: {one_line(e)}") from None
    if response.status_code != 200:
        if response.status_code in (401, 403):
            raise EndpointError(f"GET {url}: {error_message(response.status_code, response.content)}")
        return None
    data = response.json().get("data") or []
    return data[0]["id"] if data else None


async def send(client: httpx.AsyncClient, spec: RequestSpec, prompt: str | list[int], result: RequestResult,
               clock_zero: float) -> RequestResult:
    """Sends one request now and fills `result`; a rejection or a broken stream becomes `result.error`."""
    start = time.perf_counter()
    result.start = start - clock_zero
    usage, last = None, start
    try:
        async with client.stream("POST", spec.url, json=spec.body(prompt), headers=headers()) as response:
            if response.status_code != 200:
                result.error = error_message(response.status_code, await response.aread())
            else:
                async for line in sse_lines(response.aiter_bytes()):
                    if not line.startswith("data:") or (payload := line[5:].strip()) == "[DONE]":
                        continue
                    chunk = json.loads(payload, strict=False)  # strict=False: control characters raw in strings
                    if "error" in chunk:
                        result.error = f"error in the stream: {_message(chunk)}"
                        break
                    usage = chunk.get("usage") or usage
                    if _text(chunk):
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {one_line(e)}"
    result.end = time.perf_counter() - clock_zero
    if result.error is None:
        if usage is None:
            result.error = "the stream ended without usage (does the server take stream_options.include_usage?)"
        else:
            result.input_tokens, result.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    return result


def _text(chunk: dict) -> str:
    """The text a chunk adds: completions' `text`, chat's `content` or reasoning."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "") + (delta.get("reasoning") or "")


def error_message(status: int, body: bytes) -> str:
    """'HTTP 400: <the server's message>' from an OpenAI-style or FastAPI-style error body."""
    try:
        message = _message(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        message = body.decode(errors="replace")
    return f"HTTP {status}: {' '.join(str(message).split())[:500]}"


def _message(data: dict) -> str:
    error = data.get("error", data.get("detail", data))
    return error.get("message", error) if isinstance(error, dict) else error


def one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
