"""Turns a scheduled step into batch tensors, runs the model over the paged cache and samples."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from xpuserve.engine.kv_cache import allocate_kv_cache
from xpuserve.engine.outputs import TokenLogprob
from xpuserve.engine.sampler import Sampler, SamplerOutput, SamplingRequest, score_tokens
from xpuserve.engine.scheduler import ScheduledSeq
from xpuserve.engine.sequence import Sequence
from xpuserve.engine.step import StepInput
from xpuserve.models.context import ForwardContext, SequenceSlice
from xpuserve.models.decoder import CausalLM


class ModelRunner:
    """`channel`, when serving across ranks, carries each step from the driver to the other ranks."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, kv_dtype: torch.dtype | None = None, channel=None):
        self.model = model
        self.block_size = block_size
        self.device = model.model.embed_tokens.weight.device
        allocate_kv_cache(model, num_blocks * block_size, kv_dtype)
        self.sampler = Sampler()
        self.channel = channel
        self.num_tokens_computed = 0

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq], requests: list[SamplingRequest]) -> tuple[SamplerOutput | None, list[PromptScores]]:
        """One forward pass over the batch; samples for the sequences whose prompt it completes
        (in batch order; `requests` holds their sampling state) and scores the prompt tokens of
        sequences that asked for prompt_logprobs."""
        step, to_score = prepare(batch)
        self.num_tokens_computed += len(step.token_ids)
        with self.channel.send(step) if self.channel is not None else nullcontext():
            logits = self.execute(step)
        if logits is None:
            return None, []
        sampled = len(step.sample_rows)
        out = self.sampler(logits[:sampled], requests) if sampled else None
        scores, row = [], sampled
        for seq, next_tokens in to_score:
            entries = score_tokens(logits[row : row + len(next_tokens)], next_tokens, seq.params.prompt_logprobs)
            scores.append(PromptScores(seq, entries))
            row += len(next_tokens)
        return out, scores

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor | None:
        """The forward pass every rank runs: float32 logits of the sampled rows, then of the
        prompt-scoring rows; None when there are neither."""
        ctx = ForwardContext.build(step.slices, self.block_size, self.device)
        hidden = self.model(torch.tensor(step.token_ids, device=self.device), ctx)
        rows = step.sample_rows + step.prompt_rows
        if not rows:
            return None
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)]).float()


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
