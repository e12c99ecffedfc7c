"""OpenAI request bodies (the fields vLLM accepts) and their translation to SamplingParams."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from xpuserve.sampling_params import MAX_LOGPROBS, SamplingParams

# Upper bounds as OpenAI sets them (vLLM's for the seed: a 64-bit integer); stop_token_ids is
# vLLM's own field, without a bound there: ours keeps the per-token stop check cheap.
MAX_N = 128
MAX_STOP = 4
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300
INT64 = 2**63


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    n: int = Field(1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)  # OpenAI's: token ids as strings
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises ValueError naming the field if a value is out of range."""
        given = {
            k: v
            for k, v in dict(
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
            ).items()
            if v is not None
        }
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} strings, got {len(self.stop)}")
        try:
            logit_bias = {int(t): b for t, b in (self.logit_bias or {}).items()}
        except ValueError:
            raise ValueError("logit_bias keys must be token ids") from None
        return SamplingParams(
            n=self.n, seed=self.seed, logit_bias=logit_bias, stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
            max_tokens=max_tokens, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            **given,
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[dict] | None = None  # rendered by the chat template; calls come back as message.tool_calls
    tool_choice: Literal["auto", "none"] = "auto"  # forcing a call ("required", a named function) is not supported
    chat_template_kwargs: dict | None = None  # extra template variables, e.g. {"thinking": true} for V3.1

    def to_sampling_params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(self.max_completion_tokens or self.max_tokens, logprobs)


class CompletionRequest(SamplingFields):
    # Strict ints: ["1", "2"] is a batch of two text prompts, not the token ids 1 and 2.
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] = Field(union_mode="left_to_right")
    logprobs: int | None = None
    echo: bool = False  # the prompt comes back before the completion; with logprobs, its tokens scored

    def prompts(self) -> list[str | list[int]]:
        """One prompt (text or token ids) or a batch of them."""
        single = isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int)
        return [self.prompt] if single else list(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        prompt_logprobs = self.logprobs if self.echo else None
        if self.prompt_only:  # one token is generated and dropped: nothing for min_tokens to hold back
            return self.model_copy(update={"min_tokens": 0}).sampling_params(1, self.logprobs, prompt_logprobs)
        return self.sampling_params(self.max_tokens if self.max_tokens is not None else 16, self.logprobs, prompt_logprobs)

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens 0: score or return the prompt, generate nothing."""
        return self.echo and self.max_tokens == 0


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
