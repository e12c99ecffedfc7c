"""Per-request sampling settings, with vLLM's names, defaults and allowed ranges."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = disabled
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0  # in [0, 1]; 0 = disabled
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence of the token in the output
    repetition_penalty: float = 1.0  # divides/multiplies logits of tokens in prompt or output
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0  # eos and stop_token_ids are masked until this many tokens are out
    stop: list[str] = field(default_factory=list)  # a single str is accepted too
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    logprobs: int | None = None  # number of top alternatives returned besides the chosen token
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (scoring a text)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(t): float(b) for t, b in (self.logit_bias or {}).items()}
        self._validate()

    def _validate(self) -> None:
        _check(self.n >= 1, f"n must be at least 1, got {self.n}")
        _check(self.temperature >= 0, f"temperature must be non-negative, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, f"top_k must be 0 or -1 (disabled) or at least 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
        _check(self.repetition_penalty > 0, f"repetition_penalty must be greater than 0, got {self.repetition_penalty}")
        _check(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens must be at most max_tokens={self.max_tokens}, got {self.min_tokens}",
        )
        _check(all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or 0 <= value <= MAX_LOGPROBS, f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
