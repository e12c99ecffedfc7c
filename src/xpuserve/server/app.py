"""The OpenAI-compatible HTTP API over the async engine."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from xpuserve.engine.async_engine import AsyncEngine
from xpuserve.sampling_params import SamplingParams
from xpuserve.server.errors import APIError, ErrorResponse, error_body, error_response, http_error, internal_error
from xpuserve.server.metrics import Metrics
from xpuserve.server.middleware import RequestGuard
from xpuserve import __version__
from xpuserve.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from xpuserve.reasoning import THINK_END
from xpuserve.server.concurrency import gather_or_cancel, merge, respond
from xpuserve.server.prompts import encode_prompts, render_chat
from xpuserve.server.stream import Stream


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
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/version", version, methods=["GET"])
    return app


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = f"{first.get('msg', 'invalid request')}" + (f" (at '{param}')" if param else "")
    return ErrorResponse(error_body(400, message, param), 400)


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


async def version(request: Request) -> dict:
    return {"version": __version__}


async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = request.app.state
    _check_model(body.model, state.config)
    engine = state.engine.engine
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either 'prompt' or 'messages'", "prompt")
    if body.prompt is not None:
        [tokens] = await encode_prompts(engine.tokenizer, [body.prompt], "prompt", body.add_special_tokens)
    else:
        prompt = await render_chat(state, body.messages, body.add_generation_prompt)
        [tokens] = await encode_prompts(engine.tokenizer, [prompt], "messages", add_special_tokens=False)
    return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}


async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = request.app.state
    _check_model(body.model, state.config)
    vocab = state.engine.engine.model_config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
    text = await run_in_threadpool(state.engine.engine.tokenizer.decode, body.tokens, skip_special_tokens=False)
    return {"prompt": text}


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = request.app.state
    _check_model(body.model, state.config)
    params = _sampling_params(body)
    if params.n > 1 and params.n > state.engine.max_waiting:
        raise APIError(400, f"n={params.n} is more sequences than this server queues ({state.engine.max_waiting})", "n")
    prompt = await render_chat(state, body.messages, body.add_generation_prompt, body.tools, body.chat_template_kwargs)
    [prompt_ids] = await encode_prompts(state.engine.engine.tokenizer, [prompt], "messages", add_special_tokens=False)
    # A prompt that already closed the thought (V3.1's non-thinking mode) gets an answer only.
    thinking = state.config.reasoning and not prompt.rstrip().endswith(THINK_END)
    stream = Stream(request, "chatcmpl", prompt_ids, params, reasoning=state.config.reasoning, thinking=thinking,
                    tools=bool(body.tools) and body.tool_choice == "auto")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond(stream.chat_chunks(include_usage))
    [response] = await gather_or_cancel(request, [stream.chat_response()])
    return JSONResponse(response)


async def completions(body: CompletionRequest, request: Request) -> Response:
    """One prompt or a batch of them (OpenAI's API allows both); a batch's prompts run concurrently
    and their choices are numbered prompt by prompt, `n` each."""
    state = request.app.state
    _check_model(body.model, state.config)
    params = _sampling_params(body)
    prompts = body.prompts()
    sequences, most = len(prompts) * params.n, state.engine.max_waiting
    if 1 < sequences > most:  # would be refused with 429 however long the client waited
        raise APIError(400, f"{len(prompts)} prompt(s) with n={params.n} are {sequences} sequences, more than this server "
                            f"queues ({most}); send smaller batches", "prompt" if params.n == 1 else "n")
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(await encode_prompts(state.engine.engine.tokenizer, texts, "prompt") if texts else [])
    response_id = f"cmpl-{uuid.uuid4().hex}"
    streams = [
        Stream(request, "cmpl", next(encoded) if isinstance(p, str) else p, params,
               prompt_text=p if isinstance(p, str) else None, response_id=response_id, part=i,
               echo=body.echo, prompt_only=body.prompt_only)
        for i, p in enumerate(prompts)
    ]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond(completion_chunks(streams, include_usage))
    responses = await gather_or_cancel(request, [s.completion_response() for s in streams])
    return JSONResponse({**responses[0], "choices": [c for r in responses for c in r["choices"]],
                         "usage": sum_usage([r["usage"] for r in responses])})


async def completion_chunks(streams: list[Stream], include_usage: bool) -> AsyncIterator[str]:
    async for chunk in merge([s.completion_deltas() for s in streams]):
        yield chunk
    if include_usage:
        yield streams[0].sse("text_completion", [], usage=sum_usage([s.usage(s.last_output) for s in streams]))
    yield "data: [DONE]\n\n"


def sum_usage(usages: list[dict]) -> dict:
    total = {key: sum(u[key] for u in usages) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    return {**total, "prompt_tokens_details": {"cached_tokens": cached}}


def _check_model(name: str | None, config: ServerConfig) -> None:
    if name is not None and name != config.served_model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{config.served_model_name}'", "model", "model_not_found")


def _sampling_params(body) -> SamplingParams:
    try:
        return body.to_sampling_params()
    except ValueError as e:
        raise APIError(400, str(e), str(e).split(" ", 1)[0]) from None
