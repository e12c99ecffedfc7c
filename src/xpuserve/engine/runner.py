"""Turns a scheduled step into batch tensors, runs the model over the paged cache and samples."""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from xpuserve.distributed import parallel_state
from xpuserve.engine.kv_cache import allocate_kv_cache
from xpuserve.engine.outputs import TokenLogprob
from xpuserve.engine.sampler import Sampler, SamplerOutput, SamplingRequest, score_tokens
from xpuserve.engine.scheduler import ScheduledSeq
from xpuserve.engine.sequence import Sequence
from xpuserve.engine.step import StepInput
from xpuserve.models.context import ForwardContext, SequenceSlice
from xpuserve.models.decoder import CausalLM
from xpuserve.platforms import current_platform

log = logging.getLogger(__name__)


# Prompt rows scored per pass of the head: [512, vocab] float32 logits are 265 MB for R1's 129,280 tokens.
SCORE_ROWS = 512


class ModelRunner:
    """`channel`, when serving across ranks, carries each step from the driver to the other ranks."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_num_seqs: int,
                 kv_dtype: torch.dtype | None = None, channel=None, enforce_eager: bool | None = None):
        self.model = model
        self.block_size = block_size
        self.device = model.model.embed_tokens.weight.device
        # One block more than the scheduler hands out: warm-up steps write there.
        self.scratch_block = num_blocks
        allocate_kv_cache(model, (num_blocks + 1) * block_size, kv_dtype)
        self.sampler = Sampler()
        self.channel = channel
        self.num_tokens_computed = 0
        self.max_num_seqs = max_num_seqs
        platform = current_platform()
        # The platform's default on one rank; across ranks (collectives inside the graph) only when asked.
        # XPUSERVE_ENFORCE_EAGER=1 makes eager the default (the tests: hundreds of engines, each compiling).
        default = enforce_eager is None
        eager = enforce_eager if not default else (
            not platform.captures_decode or parallel_state().distributed or os.environ.get("XPUSERVE_ENFORCE_EAGER") == "1")
        self.decode_forward = None if eager else platform.capture_decode(model)
        if self.decode_forward is not None:
            try:
                self._warm_up()
            except Exception as e:  # the compiler's toolchain: the eager step computes the same
                if not default:
                    raise
                log.warning("decode step not compiled, running eagerly: %s", str(e).strip().splitlines()[0][:200])
                self.decode_forward = None

    def _warm_up(self) -> None:
        """Compiles the decode step now, not in the middle of serving: one batch of each of the
        platform's batch classes up to max_num_seqs (1, 2 and, above 64 on CPU, 65)."""
        start = time.perf_counter()
        two_blocks = SequenceSlice(self.block_size, 1, [self.scratch_block] * 2)
        for batch in self.decode_forward.warm_up_batches(self.max_num_seqs):
            self.execute(StepInput([0] * batch, [two_blocks] * batch, []))
        log.info("decode step compiled in %.1f s", time.perf_counter() - start)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq], requests: list[SamplingRequest]) -> tuple[SamplerOutput | None, list[PromptScores]]:
        """One forward pass over the batch; samples for the sequences whose prompt it completes
        (in batch order; `requests` holds their sampling state) and scores the prompt tokens of
        sequences that asked for prompt_logprobs."""
        step, to_score = prepare(batch)
        self.num_tokens_computed += len(step.token_ids)
        next_tokens = [t for _, tokens in to_score for t in tokens]
        top = max((seq.params.prompt_logprobs for seq, _ in to_score), default=0)

        def score(logits: torch.Tensor, first: int) -> list[TokenLogprob]:
            return score_tokens(logits, next_tokens[first : first + len(logits)], top)

        with self.channel.send(step) if self.channel is not None else nullcontext():
            logits, entries = self.execute(step, score)
        out = self.sampler(logits, requests) if logits is not None else None
        scores, first = [], 0
        for seq, tokens in to_score:
            k = seq.params.prompt_logprobs
            scores.append(PromptScores(seq, [TokenLogprob(e.token_id, e.logprob, e.top[:k]) for e in entries[first : first + len(tokens)]]))
            first += len(tokens)
        return out, scores

    @torch.inference_mode()
    def execute(self, step: StepInput, score=None) -> tuple[torch.Tensor | None, list[TokenLogprob]]:
        """The forward pass every rank runs. Returns the float32 logits of the sampled rows (None
        when there are none) and what `score` (the driver's) makes of the prompt-scoring rows'
        logits, SCORE_ROWS at a time: all of them at once could be gigabytes."""
        ctx = ForwardContext.build(step.slices, self.block_size, self.device)
        forward = self.decode_forward if ctx.paged_decode and self.decode_forward is not None else self.model
        hidden = forward(torch.tensor(step.token_ids, device=self.device), ctx)
        logits = None
        if step.sample_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(step.sample_rows, device=self.device)]).float()
        entries = []
        for first in range(0, len(step.prompt_rows), SCORE_ROWS):
            rows = torch.tensor(step.prompt_rows[first : first + SCORE_ROWS], device=self.device)
            chunk = self.model.compute_logits(hidden[rows])  # on every rank: the head's collectives line up
            if score is not None:
                entries += score(chunk, first)
        return logits, entries


@dataclass
class PromptScores:
    seq: Sequence
    entries: list[TokenLogprob]  # for the prompt tokens after those the sequence has scored so far


def prepare(batch: list[ScheduledSeq]) -> tuple[StepInput, list[tuple[Sequence, list[int]]]]:
    """The step's tensors as lists, and per sequence scoring its prompt the prompt tokens its rows predict."""
    ids, slices, rows, prompt_rows, to_score = [], [], [], [], []
    for item in batch:
        seq, start, first_row = item.seq, item.seq.num_computed_tokens, len(ids)
        ids.extend(seq.token_ids[start : start + item.num_new_tokens])
        slices.append(SequenceSlice(start, item.num_new_tokens, seq.block_table))
        if item.completes_prompt:
            rows.append(len(ids) - 1)
        if seq.num_unscored_prompt_tokens:  # position p's logits score prompt token p + 1
            lo = max(start, len(seq.prompt_logprobs))
            hi = min(start + item.num_new_tokens, len(seq.prompt_token_ids) - 1)
            if hi > lo:
                prompt_rows.extend(range(first_row + lo - start, first_row + hi - start))
                to_score.append((seq, seq.prompt_token_ids[lo + 1 : hi + 1]))
    return StepInput(ids, slices, rows, prompt_rows), to_score
