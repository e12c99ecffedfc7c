"""Offline batch generation: `LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

import sys
from dataclasses import fields
from itertools import count
from pathlib import Path

from xpuserve.config import EngineConfig
from xpuserve.demo import MODEL_DIR
from xpuserve.engine.llm_engine import LLMEngine
from xpuserve.engine.outputs import RequestOutput
from xpuserve.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | Path | None = None, **engine_args):
        """`model` is a Hugging Face checkpoint folder; None serves the bundled demo model."""
        model = MODEL_DIR if model is None else model
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_args) - known
        if unknown:
            raise TypeError(f"unknown engine argument(s) {sorted(unknown)}; known: {sorted(known - {'model'})}")
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_args))
        if not self.engine.parallel.is_driver:  # under torchrun, ranks > 0 run rank 0's steps and end with it
            self.engine.worker.run_follower()
            sys.exit(0)
        self._ids = count()

    def generate(
        self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Runs every prompt (text or token ids) to completion, all batched together; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = [str(next(self._ids)) for _ in prompts]
        for request_id, prompt, p in zip(ids, prompts, params):
            if isinstance(prompt, str):
                self.engine.add_request(request_id, self.engine.tokenizer.encode(prompt), p, prompt=prompt)
            else:
                self.engine.add_request(request_id, prompt, p)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[i] for i in ids]

    def chat(
        self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """One conversation or several, rendered with the model's chat template (generation prompt added)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate([self.engine.tokenizer.encode(p, add_special_tokens=False) for p in prompts], sampling_params)
