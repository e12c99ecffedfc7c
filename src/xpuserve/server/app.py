"""The OpenAI-compatible HTTP API over the async engine."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from xpuserve import __version__
from xpuserve.engine.async_engine import AsyncEngine
from xpuserve.server.errors import APIError, ErrorResponse, error_body, error_response, http_error, internal_error
from xpuserve.server.metrics import Metrics
from xpuserve.server.middleware import RequestGuard
from xpuserve.server.prompts import encode_prompts, render_chat
from xpuserve.server.protocol import DetokenizeRequest, TokenizeRequest
from xpuserve.server.serving_chat import chat_completions
from xpuserve.server.serving_completion import completions
from xpuserve.server.validate import check_model


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
    body = request.app.state.metrics.render(request.app.state.engine.stats())
    return Response(body, media_type="text/plain; version=0.0.4")


async def models(request: Request) -> dict:
    info = request.app.state.engine.info
    return {
        "object": "list",
        "data": [{"id": request.app.state.config.served_model_name, "object": "model", "created": 0,
                  "owned_by": "xpuserve", "max_model_len": info.max_model_len}],
    }


async def version(request: Request) -> dict:
    return {"version": __version__}


async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = request.app.state
    check_model(body.model, state.config)
    info = state.engine.info
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either 'prompt' or 'messages'", "prompt")
    if body.prompt is not None:
        [tokens] = await encode_prompts(info.tokenizer, [body.prompt], "prompt", body.add_special_tokens)
    else:
        prompt = await render_chat(state, body.messages, body.add_generation_prompt)
        [tokens] = await encode_prompts(info.tokenizer, [prompt], "messages", add_special_tokens=False)
    return {"count": len(tokens), "max_model_len": info.max_model_len, "tokens": tokens}


async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = request.app.state
    check_model(body.model, state.config)
    vocab = state.engine.info.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
    text = await run_in_threadpool(state.engine.info.tokenizer.decode, body.tokens, skip_special_tokens=False)
    return {"prompt": text}
