"""The reference path beside the engine: a loaded model over a contiguous per-sequence KV cache, no
scheduler, no paging. Tests check the model against transformers with it, and the engine against it;
`xpuserve generate` and `LLM.generate` run through the engine."""

from __future__ import annotations

import torch

from xpuserve.engine.kv_cache import allocate_kv_cache
from xpuserve.engine.sampler import sample
from xpuserve.models.context import ForwardContext, SequenceSlice
from xpuserve.models.decoder import CausalLM


def _device(model: CausalLM) -> torch.device:
    return model.model.embed_tokens.weight.device


@torch.inference_mode()
def prompt_logits(model: CausalLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits at every position of every prompt, all prompts packed into one forward pass."""
    lengths = [len(p) for p in prompts]
    # A contiguous cache is a paged one with one block per sequence.
    block_size = max(lengths)
    allocate_kv_cache(model, block_size * len(prompts))
    slices = [SequenceSlice(0, n, [i]) for i, n in enumerate(lengths)]
    ids = torch.tensor([t for p in prompts for t in p], device=_device(model))
    logits = model.compute_logits(model(ids, ForwardContext.build(slices, block_size, _device(model)))).float()
    return list(logits.split(lengths))


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    stop_token_ids: list[int] | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """Generates up to max_new_tokens for every prompt; a sequence stops at its first stop token."""
    device = _device(model)
    stop = set(stop_token_ids or [])
    capacity = max(len(p) for p in prompts) + max_new_tokens
    allocate_kv_cache(model, capacity * len(prompts))
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    step = [SequenceSlice(0, len(p), [i]) for i, p in enumerate(prompts)]
    ids = [t for p in prompts for t in p]
    while active:
        hidden = model(torch.tensor(ids, device=device), ForwardContext.build(step, capacity, device))
        last = torch.tensor([s.num_new for s in step], device=device).cumsum(0) - 1
        tokens = sample(model.compute_logits(hidden[last]).float(), temperature, generator).tolist()
        next_active, next_step, ids = [], [], []
        for seq, prev, token in zip(active, step, tokens):
            outputs[seq].append(token)
            if token in stop or len(outputs[seq]) == max_new_tokens:
                continue
            next_active.append(seq)
            next_step.append(SequenceSlice(prev.start + prev.num_new, 1, [seq]))
            ids.append(token)
        active, step = next_active, next_step
    return outputs
