"""What the server knows of the served model: fixed once the engine is built, so the event loop
reads it without reaching into the engine thread's objects."""

from __future__ import annotations

from dataclasses import dataclass

from xpuserve.sampling_params import SamplingParams
from xpuserve.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelInfo:
    tokenizer: Tokenizer  # thread-safe for encoding and decoding
    vocab_size: int
    max_model_len: int
    num_cache_tokens: int
    description: str  # device, dtype, ranks and KV cache, for the start-up line
    serving_format: str  # the weight format and why it was chosen

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError, with a message for the client, if the request cannot be served."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}")
        vocab = self.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: "
                f"together over max_model_len {self.max_model_len}"
            )
        longest = min(len(prompt_ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        if longest > self.num_cache_tokens:
            raise ValueError(f"a sequence of {longest} tokens does not fit the KV cache of {self.num_cache_tokens} tokens")
