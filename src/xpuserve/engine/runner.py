"""Turns a scheduled step into batch tensors, runs the model over the paged cache and samples."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from xpuserve.engine.kv_cache import allocate_kv_cache
from xpuserve.engine.sampler import Sampler, SamplerOutput, SamplingRequest
from xpuserve.engine.scheduler import ScheduledSeq
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
    def run(self, batch: list[ScheduledSeq], requests: list[SamplingRequest]) -> SamplerOutput | None:
        """One forward pass over the batch; samples for the sequences whose prompt it completes
        (in batch order; `requests` holds their sampling state)."""
        step = prepare(batch)
        self.num_tokens_computed += len(step.token_ids)
        with self.channel.send(step) if self.channel is not None else nullcontext():
            logits = self.execute(step)
        return None if logits is None else self.sampler(logits, requests)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor | None:
        """The forward pass every rank runs: float32 logits of the sampled rows, or None."""
        ctx = ForwardContext.build(step.slices, self.block_size, self.device)
        hidden = self.model(torch.tensor(step.token_ids, device=self.device), ctx)
        if not step.sample_rows:
            return None
        return self.model.compute_logits(hidden[torch.tensor(step.sample_rows, device=self.device)]).float()


def prepare(batch: list[ScheduledSeq]) -> StepInput:
    ids, slices, rows = [], [], []
    for item in batch:
        seq, start = item.seq, item.seq.num_computed_tokens
        ids.extend(seq.token_ids[start : start + item.num_new_tokens])
        slices.append(SequenceSlice(start, item.num_new_tokens, seq.block_table))
        if item.completes_prompt:
            rows.append(len(ids) - 1)
    return StepInput(ids, slices, rows)
