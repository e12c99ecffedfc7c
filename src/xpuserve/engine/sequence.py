"""A request's state as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from xpuserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One of a request's n completions."""

    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None  # per-sequence RNG of a seeded request
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many the prefix cache supplied
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    output_logprobs: list = field(default_factory=list)  # TokenLogprob per output token, if asked
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob of prompt tokens 1.., if asked
    finish_time: float | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def num_unscored_prompt_tokens(self) -> int:
        """Prompt tokens still to be scored for prompt_logprobs (the request's first completion scores them)."""
        if self.params.prompt_logprobs is None or self.index > 0:
            return 0
        return len(self.prompt_token_ids) - 1 - len(self.prompt_logprobs)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
