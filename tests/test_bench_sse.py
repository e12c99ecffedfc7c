"""`xpuserve bench` reads SSE lines as the spec ends them (CR, LF, CRLF), against a real HTTP
server on 127.0.0.1 that writes Unicode line separators raw inside its JSON, as llama-server does."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from xpuserve.bench.client import RequestResult, RequestSpec, send
from xpuserve.bench.sse import sse_lines

TEXTS = ["a\u2028b", "c\u2029d", "e\u0085f", "g\x1ch\x1di\x1ej\x0bk\x0cl"]
USAGE = {"prompt_tokens": 3, "completion_tokens": len(TEXTS), "total_tokens": 3 + len(TEXTS)}


def raw_json(data: dict) -> str:
    """JSON with U+2028, U+2029, U+0085 and the control characters written raw, not escaped."""
    text = json.dumps(data, ensure_ascii=False)
    for c in "\x0b\x0c\x1c\x1d\x1e":
        text = text.replace(json.dumps(c)[1:-1], c)
    return text


LINES = [f"data: {raw_json({'choices': [{'index': 0, 'text': t}]})}" for t in TEXTS]
LINES += [f"data: {raw_json({'choices': [], 'usage': USAGE})}", "data: [DONE]"]
# Every line ending SSE allows, and a CRLF cut between two writes.
ENDS = [b"\n\n", b"\r\n\r\n", b"\r\r", b"\r", b"\n\n", b"\n\n"]
WRITES = [line.encode() + end for line, end in zip(LINES, ENDS)]
WRITES[3:4] = [WRITES[3], b"\n\r\n"]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for write in WRITES:
            self.wfile.write(write)
            self.wfile.flush()
            time.sleep(0.01)  # separate TCP segments, so the CRLF really arrives cut in two

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_sse_lines_end_only_at_cr_lf_crlf(url):
    async def lines():
        async with httpx.AsyncClient() as client, client.stream("POST", url + "/v1/completions", json={}) as response:
            return [line async for line in sse_lines(response.aiter_bytes())]

    got = asyncio.run(lines())
    assert got == [part for line in LINES for part in (line, "")]
    assert [json.loads(line[6:], strict=False)["choices"][0]["text"] for line in got[:8:2]] == TEXTS


def test_bench_counts_every_chunk_of_such_a_stream(url):
    async def one():
        spec = RequestSpec(base_url=url, endpoint="completions", model="m", output_len=len(TEXTS))
        async with httpx.AsyncClient() as client:
            return await send(client, spec, "x", RequestResult(scheduled=0.0), time.perf_counter())

    result = asyncio.run(one())
    assert result.error is None
    assert result.output_tokens == len(TEXTS) and len(result.itl) == len(TEXTS) - 1
