"""What one engine step asks of the model: plain lists, so the driver can broadcast it to other ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

from xpuserve.models.context import SequenceSlice


@dataclass
class StepInput:
    token_ids: list[int]  # the new tokens of every sequence, packed in batch order
    slices: list[SequenceSlice]  # per sequence: positions and cache blocks
    sample_rows: list[int]  # rows of token_ids whose logits are sampled (prompts this step completes)
    prompt_rows: list[int] = field(default_factory=list)  # rows whose logits score the next prompt token
