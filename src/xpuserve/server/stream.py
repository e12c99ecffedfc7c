"""The bridge from one request to the engine and back, shared by chat and completions: checks the
request, runs it, hands out text deltas and usage, and maps engine errors to HTTP."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from xpuserve.engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from xpuserve.engine.outputs import CompletionOutput, RequestOutput
from xpuserve.sampling_params import SamplingParams
from xpuserve.server.errors import APIError


class Stream:
    def __init__(self, request: Request, prefix: str, prompt_ids: list[int], params: SamplingParams,
                 param: str, prompt_text: str | None = None, response_id: str | None = None, part: int = 0):
        """`param`: the request field the prompt came from, named in a 400. `part`: this prompt's
        place in a batch of completion prompts sharing `response_id`."""
        self.state = request.app.state
        self.engine: AsyncEngine = self.state.engine
        try:
            self.engine.info.check_request(prompt_ids, params)
        except ValueError as e:
            raise APIError(400, str(e), param) from None
        self.id = response_id or f"{prefix}-{uuid.uuid4().hex}"
        self.request_id = f"{self.id}-{part}"
        self.last_output: RequestOutput | None = None
        self.created = int(time.time())
        self.model = self.state.config.served_model_name
        self.prompt_ids, self.params, self.prompt_text = prompt_ids, params, prompt_text
        self.tokenizer = self.engine.info.tokenizer

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            async for output in self.engine.generate(self.request_id, self.prompt_ids, self.params, self.prompt_text):
                self.last_output = output
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

    def usage(self, output: RequestOutput, completion_tokens: int | None = None) -> dict:
        completion = sum(len(c.token_ids) for c in output.outputs) if completion_tokens is None else completion_tokens
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion,
                "prompt_tokens_details": {"cached_tokens": output.metrics.num_cached_tokens}}

    async def deltas(self) -> AsyncIterator[tuple[RequestOutput, CompletionOutput, str, int]]:
        """Per update and choice: the text not sent yet and how many tokens are new. The engine
        holds back an unfinished text's end that may still become a stop string."""
        sent_chars = [0] * self.params.n
        sent_tokens = [0] * self.params.n
        done = [False] * self.params.n
        async for output in self.outputs():
            for choice in output.outputs:
                i = choice.index
                if done[i]:
                    continue
                finished = choice.finish_reason is not None
                new_tokens = len(choice.token_ids) - sent_tokens[i]
                if len(choice.text) <= sent_chars[i] and not finished and not new_tokens:
                    continue
                delta = choice.text[sent_chars[i]:]
                sent_chars[i] = max(len(choice.text), sent_chars[i])
                sent_tokens[i] = len(choice.token_ids)
                done[i] = finished
                yield output, choice, delta, new_tokens

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def sse(self, kind: str, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"
