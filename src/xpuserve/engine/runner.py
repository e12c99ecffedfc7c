"""Turns a scheduled step into batch tensors, runs the model over the paged cache and samples."""

from __future__ import annotations

import torch

from xpuserve.engine.kv_cache import allocate_kv_cache
from xpuserve.engine.sampler import Sampler, SamplerOutput, SamplingRequest
from xpuserve.engine.scheduler import ScheduledSeq
from xpuserve.models.context import ForwardContext, SequenceSlice
from xpuserve.models.decoder import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, kv_dtype: torch.dtype | None = None):
        self.model = model
        self.block_size = block_size
        self.device = model.model.embed_tokens.weight.device
        allocate_kv_cache(model, num_blocks * block_size, kv_dtype)
        self.sampler = Sampler()
        self.num_tokens_computed = 0

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq], requests: list[SamplingRequest]) -> SamplerOutput | None:
        """One forward pass over the batch; samples for the sequences whose prompt it completes
        (in batch order; `requests` holds their sampling state)."""
        ids, slices, last = [], [], []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + item.num_new_tokens])
            slices.append(SequenceSlice(start, item.num_new_tokens, seq.block_table))
            if item.completes_prompt:
                last.append(len(ids) - 1)
        self.num_tokens_computed += len(ids)
        ctx = ForwardContext.build(slices, self.block_size, self.device)
        hidden = self.model(torch.tensor(ids, device=self.device), ctx)
        if not last:
            return None
        logits = self.model.compute_logits(hidden[torch.tensor(last, device=self.device)]).float()
        return self.sampler(logits, requests)
