"""Turns the last-position logits of each running sequence into next tokens.

Order of processing, as in vLLM: min_tokens masking, logit_bias, repetition / frequency / presence
penalties, then greedy rows take the argmax; the others are divided by their temperature,
masked by top_k, top_p and min_p (in that order) and sampled.

Sampling uses the exponential race: argmax(probs / q) with q ~ Exponential(1) per token is
a draw from probs. A seeded request draws its q from its own generator, so its tokens do not
depend on which other requests share the batch.

Logprobs follow vLLM's default ("raw_logprobs"): log_softmax of the logits as the model
produced them, before penalties, temperature and masking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xpuserve.engine.outputs import TokenLogprob
from xpuserve.sampling_params import SamplingParams

_NO_SAMPLING_CHANGES = SamplingParams()  # temperature 1, top_k / top_p / min_p off


@dataclass
class SamplingRequest:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # one per seeded request, kept across steps
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # raw log-prob of each chosen token, for the requests that asked for logprobs
    # Per request, the top params.logprobs (id, logprob) pairs, best first; [] for requests
    # that did not ask; None when no request in the batch asked.
    top_logprobs: list[list[tuple[int, float]]] | None


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> SamplerOutput:
        """logits [B, V] of the last position of each request -> one token per request."""
        raw = logits.float()
        logits = apply_penalties(apply_logit_bias(apply_min_tokens(raw, requests), requests), requests)
        greedy = [r.params.greedy for r in requests]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = _sample(logits, requests, greedy)
        chosen, top = _logprobs(raw, tokens, requests)
        return SamplerOutput(tokens.tolist(), chosen, top)


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]; temperature 0 is greedy. One setting for the whole batch."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return exponential_race(probs, [generator] * probs.shape[0])


def _sample(logits: torch.Tensor, requests: list[SamplingRequest], greedy: list[bool]) -> torch.Tensor:
    # Greedy rows go through unmasked at temperature 1 and are replaced by their argmax at the end.
    params = [_NO_SAMPLING_CHANGES if g else r.params for g, r in zip(greedy, requests)]
    vocab = logits.shape[-1]
    scaled = logits / _column([p.temperature for p in params], logits)
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    scaled = apply_top_k_top_p(
        scaled,
        torch.tensor(top_k, device=logits.device) if min(top_k) < vocab else None,
        _column(top_p, logits) if min(top_p) < 1 else None,
    )
    probs = scaled.softmax(dim=-1)
    min_p = [p.min_p for p in params]
    if max(min_p) > 0:
        probs = apply_min_p(probs, _column(min_p, logits))
    tokens = exponential_race(probs, [None if g else r.generator for g, r in zip(greedy, requests)])
    if any(greedy):
        tokens = torch.where(torch.tensor(greedy, device=logits.device), logits.argmax(dim=-1), tokens)
    return tokens


def apply_min_tokens(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """Bans eos and stop_token_ids for requests that have produced fewer than min_tokens."""
    rows, cols = [], []
    for i, r in enumerate(requests):
        if len(r.output_token_ids) < r.params.min_tokens:
            banned = {t for t in (*r.eos_token_ids, *r.params.stop_token_ids) if t < logits.shape[-1]}
            rows += [i] * len(banned)
            cols += banned
    if not rows:
        return logits
    logits = logits.clone()
    logits[rows, cols] = float("-inf")
    return logits


def apply_logit_bias(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """Adds each request's logit_bias to its row (OpenAI's semantics: -100 bans a token, 100 all but forces it)."""
    rows, cols, values = [], [], []
    for i, r in enumerate(requests):
        for token, bias in r.params.logit_bias.items():
            rows.append(i)
            cols.append(token)
            values.append(bias)
    if not rows:
        return logits
    logits = logits.clone()
    logits[rows, cols] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
    return logits


def apply_penalties(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """vLLM semantics: repetition over prompt + output tokens, frequency / presence over output tokens."""
    params = [r.params for r in requests]
    use_repetition = any(p.repetition_penalty != 1.0 for p in params)
    use_output = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
    if not (use_repetition or use_output):
        return logits
    counts = token_counts([r.output_token_ids for r in requests], logits)
    if use_repetition:
        penalty = _column([p.repetition_penalty for p in params], logits)
        # Prompts can be long: only rows that use the penalty pay for counting theirs.
        prompts = [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else [] for r in requests]
        seen = (counts > 0) | (token_counts(prompts, logits) > 0)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if use_output:
        frequency = _column([p.frequency_penalty for p in params], logits)
        presence = _column([p.presence_penalty for p in params], logits)
        logits = logits - frequency * counts - presence * (counts > 0).float()
    return logits


def token_counts(token_ids: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    """[B, V] float count of every token id in each row's list."""
    batch, vocab = logits.shape
    width = max((len(t) for t in token_ids), default=0)
    # Pad with an extra bucket `vocab` that is dropped afterwards.
    ids = torch.tensor([t + [vocab] * (width - len(t)) for t in token_ids], dtype=torch.long, device=logits.device)
    counts = torch.zeros(batch, vocab + 1, device=logits.device)
    counts.scatter_add_(1, ids.view(batch, width), torch.ones(batch, width, device=logits.device))
    return counts[:, :vocab]


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """k [B] in 1..V (V = off), p [B, 1] in (0, 1] (1 = off). Masked logits become -inf."""
    if k is None and p is None:
        return logits
    ascending, order = logits.sort(dim=-1)
    if k is not None:
        threshold = ascending.gather(1, (logits.shape[-1] - k).unsqueeze(1))
        ascending = ascending.masked_fill(ascending < threshold, float("-inf"))
    if p is not None:
        # Drop the low tail whose total mass is at most 1 - p; the best token always stays.
        tail = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
        tail[:, -1] = False
        ascending = ascending.masked_fill(tail, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ascending)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zeroes tokens whose probability is below min_p [B, 1] times the row's top probability."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return probs.masked_fill(probs < threshold, 0.0)


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Samples one token per row of probs (need not be normalised); row i draws from generators[i]."""
    q = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        q.exponential_()
    else:
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), probs.shape[-1], device=probs.device).exponential_()
        for i, g in enumerate(generators):
            if g is not None:
                q[i].exponential_(generator=g)
    # A zero q would turn a masked token's 0 / 0 into NaN, which argmax would pick.
    return probs.div(q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def _logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, requests: list[SamplingRequest]
) -> tuple[list[float | None], list[list[tuple[int, float]]] | None]:
    asking = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not asking:  # a log-sum-exp over the vocabulary per step that nobody reads
        return [None] * len(requests), None
    normaliser = raw.logsumexp(dim=-1, keepdim=True)
    chosen = (raw.gather(1, tokens.unsqueeze(1)) - normaliser).squeeze(1).tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in requests]
    k = max(requests[i].params.logprobs for i in asking)
    if k > 0:
        rows = torch.tensor(asking, device=raw.device)
        values, ids = (raw[rows] - normaliser[rows]).topk(k, dim=-1)
        for i, row_ids, row_values in zip(asking, ids.tolist(), values.tolist()):
            n = requests[i].params.logprobs
            top[i] = list(zip(row_ids[:n], row_values[:n]))
    return chosen, top


def score_tokens(logits: torch.Tensor, token_ids: list[int], top: int) -> list[TokenLogprob]:
    """Raw log-prob of token_ids[i] under row i of logits, with the row's `top` best alternatives."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    if top == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    values, ids = logprobs.topk(top, dim=-1)
    return [TokenLogprob(t, lp, list(zip(i, v))) for t, lp, i, v in zip(token_ids, chosen, ids.tolist(), values.tolist())]


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).unsqueeze(1)
