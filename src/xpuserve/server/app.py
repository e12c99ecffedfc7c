"""The OpenAI-compatible HTTP API over the async engine."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from xpuserve.detokenizer import StopChecker
from xpuserve.engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from xpuserve.engine.outputs import CompletionOutput, RequestOutput
from xpuserve.reasoning import ReasoningParser
from xpuserve.sampling_params import SamplingParams
from xpuserve.server.errors import APIError, error_body, error_response
from xpuserve.server.metrics import Metrics
from xpuserve.server.middleware import RequestGuard
from xpuserve.server.protocol import ChatCompletionRequest, CompletionRequest
from xpuserve.tokenizer import ChatTemplateError


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    reasoning: bool = False  # split <think> ... </think> into reasoning_content
    chat_template: str | None = None
    max_body_bytes: int = 8 << 20


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="xpuserve")
    app.state.engine, app.state.config, app.state.metrics = engine, config, Metrics()
    app.add_middleware(RequestGuard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    app.add_exception_handler(APIError, lambda request, e: error_response(e))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    return app


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = f"{first.get('msg', 'invalid request')}" + (f" (at '{param}')" if param else "")
    return JSONResponse(error_body(400, message, param), 400)


async def health(request: Request) -> Response:
    engine: AsyncEngine = request.app.state.engine
    if engine.error is not None:
        return JSONResponse(error_body(503, f"the engine stopped: {engine.error!r}"), 503)
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    body = request.app.state.metrics.render(request.app.state.engine.engine.stats())
    return Response(body, media_type="text/plain; version=0.0.4")


async def models(request: Request) -> dict:
    engine = request.app.state.engine.engine
    return {
        "object": "list",
        "data": [{"id": request.app.state.config.served_model_name, "object": "model", "created": 0,
                  "owned_by": "xpuserve", "max_model_len": engine.max_model_len}],
    }


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = request.app.state
    _check_model(body.model, state.config)
    params = _sampling_params(body)
    tokenizer = state.engine.engine.tokenizer
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        prompt = tokenizer.apply_chat_template(messages, body.add_generation_prompt, state.config.chat_template)
    except ChatTemplateError as e:
        raise APIError(400, str(e), "messages") from None
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    stream = Stream(request, "chatcmpl", prompt_ids, params, reasoning=state.config.reasoning)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await stream.respond(stream.chat_chunks(include_usage))
    return JSONResponse(await stream.chat_response())


async def completions(body: CompletionRequest, request: Request) -> Response:
    state = request.app.state
    _check_model(body.model, state.config)
    params = _sampling_params(body)
    tokenizer = state.engine.engine.tokenizer
    prompt_ids = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
    stream = Stream(request, "cmpl", prompt_ids, params, prompt_text=body.prompt if isinstance(body.prompt, str) else None)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await stream.respond(stream.completion_chunks(include_usage))
    return JSONResponse(await stream.completion_response())


def _check_model(name: str | None, config: ServerConfig) -> None:
    if name is not None and name != config.served_model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{config.served_model_name}'", "model", "model_not_found")


def _sampling_params(body) -> SamplingParams:
    try:
        return body.to_sampling_params()
    except ValueError as e:
        raise APIError(400, str(e), str(e).split(" ", 1)[0]) from None


class Stream:
    """One request's run through the engine, shaped into OpenAI responses or SSE chunks."""

    def __init__(self, request: Request, prefix: str, prompt_ids: list[int], params: SamplingParams,
                 reasoning: bool = False, prompt_text: str | None = None):
        self.state = request.app.state
        self.engine: AsyncEngine = self.state.engine
        try:
            self.engine.engine.check_request(prompt_ids, params)
        except ValueError as e:
            raise APIError(400, str(e), "messages" if prefix == "chatcmpl" else "prompt") from None
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = self.state.config.served_model_name
        self.prompt_ids, self.params, self.reasoning = prompt_ids, params, reasoning
        self.prompt_text = prompt_text
        self.tokenizer = self.engine.engine.tokenizer

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            async for output in self.engine.generate(self.id, self.prompt_text or self.prompt_ids, self.params):
                if output.finished:
                    self.state.metrics.record_finished(output)
                yield output
        except EngineOverloaded as e:
            raise APIError(429, f"the server is busy: {e}; retry later", code="overloaded", headers={"Retry-After": "1"}) from None
        except EngineDead as e:
            raise APIError(503, str(e), code="engine_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def final(self) -> RequestOutput:
        async for output in self.outputs():
            if output.finished:
                return output
        raise APIError(503, "the request ended without output", code="engine_unavailable")

    async def respond(self, chunks: AsyncIterator[str]) -> StreamingResponse:
        """Starts the stream only once the first chunk exists, so errors before it are real HTTP errors."""
        first = await anext(chunks)

        async def body():
            yield first
            async for chunk in chunks:
                yield chunk

        return StreamingResponse(body(), media_type="text/event-stream")

    def usage(self, output: RequestOutput) -> dict:
        completion = sum(len(c.token_ids) for c in output.outputs)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion,
                "prompt_tokens_details": {"cached_tokens": output.metrics.num_cached_tokens}}

    # ---- chat ----
    async def chat_response(self) -> dict:
        output = await self.final()
        choices = []
        for c in output.outputs:
            message = {"role": "assistant", "content": c.text}
            if self.reasoning:
                parser = ReasoningParser()
                r1, c1 = parser.feed(c.text)
                r2, c2 = parser.finish()
                message = {"role": "assistant", "content": c1 + c2, "reasoning_content": r1 + r2}
            choices.append({"index": c.index, "message": message, "logprobs": self._chat_logprobs(c, 0),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(output)}

    async def chat_chunks(self, include_usage: bool) -> AsyncIterator[str]:
        n = self.params.n
        parsers = [ReasoningParser() if self.reasoning else None for _ in range(n)]
        yield self._sse("chat.completion.chunk", [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None} for i in range(n)])
        async for output, choice, delta, new_tokens in self._deltas():
            parser = parsers[choice.index]
            message = {"content": delta}
            if parser is not None:
                reasoning, content = parser.feed(delta)
                if choice.finish_reason is not None:
                    r, c = parser.finish()
                    reasoning, content = reasoning + r, content + c
                message = {"content": content, "reasoning_content": reasoning}
            message = {k: v for k, v in message.items() if v} if choice.finish_reason is None else message
            if not message and choice.finish_reason is None and not new_tokens:
                continue
            yield self._sse("chat.completion.chunk", [{
                "index": choice.index, "delta": message,
                "logprobs": self._chat_logprobs(choice, len(choice.token_ids) - new_tokens),
                "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}])
        if include_usage:
            yield self._sse("chat.completion.chunk", [], usage=self.usage(output))
        yield "data: [DONE]\n\n"

    def _chat_logprobs(self, c: CompletionOutput, start: int) -> dict | None:
        if c.logprobs is None:
            return None
        entries = []
        for entry in c.logprobs[start:]:
            token = self.tokenizer.decode([entry.token_id], skip_special_tokens=False)
            entries.append({"token": token, "logprob": entry.logprob, "bytes": list(token.encode()),
                            "top_logprobs": [self._top(t, lp) for t, lp in entry.top]})
        return {"content": entries}

    def _top(self, token_id: int, logprob: float) -> dict:
        token = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    # ---- completions ----
    async def completion_response(self) -> dict:
        output = await self.final()
        choices = [{"index": c.index, "text": c.text, "logprobs": self._completion_logprobs(c, 0),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in output.outputs]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(output)}

    async def completion_chunks(self, include_usage: bool) -> AsyncIterator[str]:
        output = None
        async for output, choice, delta, new_tokens in self._deltas():
            yield self._sse("text_completion", [{
                "index": choice.index, "text": delta,
                "logprobs": self._completion_logprobs(choice, len(choice.token_ids) - new_tokens),
                "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}])
        if include_usage and output is not None:
            yield self._sse("text_completion", [], usage=self.usage(output))
        yield "data: [DONE]\n\n"

    def _completion_logprobs(self, c: CompletionOutput, start: int) -> dict | None:
        if c.logprobs is None:
            return None
        entries = c.logprobs[start:]
        tokens = [self.tokenizer.decode([e.token_id], skip_special_tokens=False) for e in entries]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._top(t, lp)["token"]: lp for t, lp in e.top} for e in entries]}

    # ---- shared ----
    async def _deltas(self) -> AsyncIterator[tuple[RequestOutput, CompletionOutput, str, int]]:
        """Per update and choice: the text not sent yet (holding back what may become a stop string)
        and how many tokens are new."""
        sent_chars = [0] * self.params.n
        sent_tokens = [0] * self.params.n
        done = [False] * self.params.n
        stop = StopChecker(self.params.stop)
        async for output in self.outputs():
            for choice in output.outputs:
                i = choice.index
                if done[i]:
                    continue
                finished = choice.finish_reason is not None
                visible = len(choice.text) if finished else len(choice.text) - stop.hold_back(choice.text)
                new_tokens = len(choice.token_ids) - sent_tokens[i]
                if visible <= sent_chars[i] and not finished and not new_tokens:
                    continue
                delta = choice.text[sent_chars[i] : max(visible, sent_chars[i])]
                sent_chars[i] = max(visible, sent_chars[i])
                sent_tokens[i] = len(choice.token_ids)
                done[i] = finished
                yield output, choice, delta, new_tokens

    def _sse(self, kind: str, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"
