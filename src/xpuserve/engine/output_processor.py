"""Sampled tokens into RequestOutputs: appending, detokenizing, stop strings and finish reasons."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from xpuserve.detokenizer import IncrementalDetokenizer, StopChecker
from xpuserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from xpuserve.engine.sampler import SamplerOutput
from xpuserve.engine.sequence import Sequence
from xpuserve.tokenizer import Tokenizer


@dataclass
class Request:
    request_id: str
    prompt: str | None
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    stop: StopChecker

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: list[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}

    def add(self, request_id: str, prompt: str | None, seqs: list[Sequence]) -> None:
        params = seqs[0].params
        detokenizers = [IncrementalDetokenizer(self.tokenizer, s.prompt_token_ids, params.skip_special_tokens) for s in seqs]
        self.requests[request_id] = Request(request_id, prompt, seqs, detokenizers, StopChecker(params.stop))

    def process(self, sampled: list[Sequence], out: SamplerOutput, finish: Callable[[Sequence, str], None]) -> list[RequestOutput]:
        """Appends each sampled sequence's token; `finish(seq, reason)` ends a sequence. Returns the
        touched requests' outputs and forgets the requests that finished."""
        touched: dict[str, Request] = {}
        for i, seq in enumerate(sampled):
            top = out.top_logprobs[i] if out.top_logprobs is not None else None
            request = touched[seq.request_id] = self.requests[seq.request_id]
            self._append_token(request, seq, out.token_ids[i], out.logprobs[i], top, finish)
        outputs = [self._output(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                del self.requests[r.request_id]
        return outputs

    def _append_token(self, request: Request, seq: Sequence, token: int, logprob: float, top, finish) -> None:
        now = time.monotonic()
        seq.output_token_ids.append(token)
        seq.first_token_time = seq.first_token_time or now
        if seq.params.logprobs is not None:
            seq.output_logprobs.append(TokenLogprob(token, logprob, top or []))
        detokenizer = request.detokenizers[seq.index]
        delta = detokenizer.add([token])
        reason, stop_reason = self._finish_reason(seq, token, request, detokenizer, len(delta))
        if reason is not None and not isinstance(stop_reason, str):
            # Release text held back for an incomplete character; it may still complete a stop string.
            hit = request.stop.find(detokenizer.text, len(detokenizer.finish()))
            if hit is not None:
                detokenizer.truncate(hit.index)
                reason, stop_reason = "stop", hit.stop
        if reason is not None:
            finish(seq, reason)
            seq.stop_reason = stop_reason
            seq.finish_time = now

    def _finish_reason(self, seq: Sequence, token: int, request: Request, detokenizer, delta_len: int):
        params = seq.params
        out_len = len(seq.output_token_ids)
        if out_len >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if token in params.stop_token_ids:
                return "stop", token
        hit = request.stop.find(detokenizer.text, delta_len)
        if hit is not None:
            detokenizer.truncate(hit.index)
            return "stop", hit.stop
        if params.max_tokens is not None and out_len >= params.max_tokens:
            return "length", None
        if len(seq) >= self.max_model_len:
            return "length", None
        return None, None

    @staticmethod
    def _visible(stop: StopChecker, text: str) -> str:
        """An unfinished sequence's text without the end that may still become a stop string, so
        a streamer never sends what a stop string later cuts."""
        return text[: len(text) - stop.hold_back(text)]

    def _output(self, request: Request) -> RequestOutput:
        first = request.seqs[0]
        completions = [
            CompletionOutput(
                index=s.index,
                text=d.text if s.is_finished else self._visible(request.stop, d.text),
                token_ids=list(s.output_token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=list(s.output_logprobs) if s.params.logprobs is not None else None,
            )
            for s, d in zip(request.seqs, request.detokenizers)
        ]
        times = [s.first_token_time for s in request.seqs if s.first_token_time]
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_token_time=min(times) if times else None,
            finish_time=max((s.finish_time or 0) for s in request.seqs) if request.finished else None,
            num_prompt_tokens=len(first.prompt_token_ids),
            num_cached_tokens=first.num_cached_tokens,
        )
        prompt_logprobs = [None, *first.prompt_logprobs] if first.params.prompt_logprobs is not None else None
        return RequestOutput(request.request_id, request.prompt, first.prompt_token_ids, completions, request.finished,
                             metrics, prompt_logprobs)
