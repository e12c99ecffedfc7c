"""POST /v1/completions: one prompt or a batch (text or token ids), run concurrently, with echo
and logprobs as OpenAI's legacy API and vLLM give them, whole or streamed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from itertools import accumulate

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from xpuserve.engine.outputs import CompletionOutput, RequestOutput
from xpuserve.server.concurrency import gather_or_cancel, merge, respond
from xpuserve.server.prompts import encode_prompts
from xpuserve.server.protocol import CompletionRequest
from xpuserve.server.stream import Stream
from xpuserve.server.validate import check_model, check_queue, sampling_params


async def completions(body: CompletionRequest, request: Request) -> Response:
    """A batch's prompts run concurrently; their choices are numbered prompt by prompt, `n` each."""
    state = request.app.state
    check_model(body.model, state.config)
    params = sampling_params(body)
    prompts = body.prompts()
    check_queue(state.engine, len(prompts), params.n)
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(await encode_prompts(state.engine.info.tokenizer, texts, "prompt") if texts else [])
    response_id = f"cmpl-{uuid.uuid4().hex}"
    streams = [
        CompletionStream(request, next(encoded) if isinstance(p, str) else p, params, prompt_text=p if isinstance(p, str) else None,
                         response_id=response_id, part=i, echo=body.echo, prompt_only=body.prompt_only)
        for i, p in enumerate(prompts)
    ]
    if body.stream:
        return await respond(completion_chunks(streams, bool(body.stream_options and body.stream_options.include_usage)))
    responses = await gather_or_cancel(request, [s.response() for s in streams])
    return JSONResponse({**responses[0], "choices": [c for r in responses for c in r["choices"]],
                         "usage": sum_usage([r["usage"] for r in responses])})


async def completion_chunks(streams: list[CompletionStream], include_usage: bool) -> AsyncIterator[str]:
    async for chunk in merge([s.chunks() for s in streams]):
        yield chunk
    if include_usage:
        yield streams[0].sse("text_completion", [], usage=sum_usage([s.usage(s.last_output) for s in streams]))
    yield "data: [DONE]\n\n"


def sum_usage(usages: list[dict]) -> dict:
    total = {key: sum(u[key] for u in usages) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    return {**total, "prompt_tokens_details": {"cached_tokens": cached}}


class CompletionStream(Stream):
    def __init__(self, request: Request, prompt_ids: list[int], params, prompt_text: str | None, response_id: str,
                 part: int, echo: bool, prompt_only: bool):
        """`echo`: the text starts with the prompt; `prompt_only`: and ends there (max_tokens 0: the
        one token the engine generates is dropped, as vLLM does)."""
        super().__init__(request, "cmpl", prompt_ids, params, "prompt" if part == 0 else f"prompt[{part}]",
                         prompt_text, response_id, part)
        self.first_choice = part * params.n  # OpenAI numbers a batch's choices prompt by prompt
        self.echo, self.prompt_only = echo or prompt_only, prompt_only

    def usage(self, output: RequestOutput) -> dict:
        return super().usage(output, 0 if self.prompt_only else None)

    async def response(self) -> dict:
        output = await self.final()
        choices = [self._choice(output, c, c.text, 0, self.echo) for c in output.outputs]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(output)}

    async def chunks(self) -> AsyncIterator[str]:
        """The SSE chunks of this prompt's choices (the caller adds usage and [DONE]); with echo,
        each choice's first chunk starts with the prompt."""
        sent: dict[int, int] = {}  # characters of text sent so far, per choice
        async for output, choice, delta, new_tokens in self.deltas():
            first = self.echo and choice.index not in sent
            offset = sent.get(choice.index, 0)
            chunk = self._choice(output, choice, delta, len(choice.token_ids) - new_tokens, first, offset)
            sent[choice.index] = offset + len(chunk["text"])
            yield self.sse("text_completion", [chunk])

    def _choice(self, output: RequestOutput, c: CompletionOutput, text: str, start: int, with_prompt: bool,
                offset: int = 0) -> dict:
        """`offset`: where `text` starts in the choice's whole text (streaming), for text_offset."""
        logprobs = self._logprobs(c.logprobs[start:] if c.logprobs is not None else None)
        if self.prompt_only:
            text, logprobs = "", logprobs and {key: [] for key in logprobs}
        if with_prompt:
            prompt = self.prompt_text if self.prompt_text is not None else self.tokenizer.decode(self.prompt_ids, skip_special_tokens=False)
            text = prompt + text
            if logprobs is not None:
                prompt = self._logprobs(output.prompt_logprobs)  # asked for with echo + logprobs
                prompt["tokens"] = [self.token(t) for t in self.prompt_ids]  # the first one too
                logprobs = {key: prompt[key] + logprobs[key] for key in logprobs}
        if logprobs is not None:  # each token's character offset in the text, as its decoded pieces add up
            logprobs["text_offset"] = list(accumulate((len(t) for t in logprobs["tokens"]), initial=offset))[:-1]
        return {"index": self.first_choice + c.index, "text": text, "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def _logprobs(self, entries: list | None) -> dict | None:
        """OpenAI's completions logprobs; an entry of None (the first prompt token) scores null.
        Each top_logprobs entry holds the best `logprobs` tokens and always the chosen one (so up
        to logprobs + 1), as OpenAI's legacy API and vLLM give them."""
        if entries is None:
            return None
        return {"tokens": [self.token(e.token_id) if e else None for e in entries],
                "token_logprobs": [e.logprob if e else None for e in entries],
                "top_logprobs": [{**{self.token(t): lp for t, lp in e.top}, self.token(e.token_id): e.logprob} if e else None
                                 for e in entries]}
