"""The engine loop: requests in, one scheduled step at a time, RequestOutputs out."""

from __future__ import annotations

import torch

from xpuserve.config import EngineConfig
from xpuserve.engine.block_manager import BlockManager
from xpuserve.engine.model_info import ModelInfo
from xpuserve.engine.output_processor import OutputProcessor
from xpuserve.engine.outputs import EngineStats, RequestOutput
from xpuserve.engine.sampler import SamplingRequest
from xpuserve.engine.scheduler import Scheduler
from xpuserve.engine.sequence import Sequence
from xpuserve.engine.worker import Worker
from xpuserve.sampling_params import SamplingParams
from xpuserve.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.worker = Worker(config)
        self.model, self.parallel = self.worker.model, self.worker.parallel
        self.model_config = self.model.config
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.max_model_len = self.worker.max_model_len
        self.block_manager = BlockManager(self.worker.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_token_ids = sorted(set(self.model_config.eos_token_id) | {self.tokenizer.eos_token_id} - {None})
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.info = ModelInfo(self.tokenizer, self.model_config.vocab_size, self.max_model_len, self.num_cache_tokens,
                              self._description(), self.model.serving_format.describe())

    def _description(self) -> str:
        weights, parallel = self.model.model.embed_tokens.weight, self.parallel
        ranks = ""
        if parallel.distributed:
            ranks = f"{parallel.world_size} ranks (tensor parallel{', expert parallel' if parallel.expert_parallel else ''}), "
        return f"{weights.device} ({str(weights.dtype).removeprefix('torch.')}), {ranks}KV cache {self.num_cache_tokens} tokens"

    def shutdown(self) -> None:
        """Tells the other ranks, if any, to stop. Idempotent."""
        self.worker.shutdown()

    @property
    def num_cache_tokens(self) -> int:
        return len(self.block_manager.blocks) * self.config.block_size

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    prompt: str | None = None) -> None:
        """`prompt` is the text the ids came from, if any: it is handed back in the outputs."""
        params = params or SamplingParams()
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id '{request_id}' is already in use")
        prompt_token_ids = list(prompt_token_ids)
        self.info.check_request(prompt_token_ids, params)
        seqs = [Sequence(request_id, i, prompt_token_ids, params, generator=self._generator(params.seed, i))
                for i in range(params.n)]
        self.output_processor.add(request_id, prompt, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(self.worker.device).manual_seed(seed + index)

    def abort_request(self, request_id: str) -> None:
        request = self.output_processor.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def stats(self) -> EngineStats:
        manager = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=manager.num_used_blocks,
            kv_blocks_total=len(manager.blocks),
            prefix_cache_queried_tokens=manager.queried_tokens,
            prefix_cache_hit_tokens=manager.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_tokens_computed=self.worker.runner.num_tokens_computed,
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.requests)

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled = [item.seq for item in batch if item.completes_prompt]
        requests = [
            SamplingRequest(s.params, s.prompt_token_ids, s.output_token_ids, s.generator, self.eos_token_ids)
            for s in sampled
        ]
        out, prompt_scores = self.worker.runner.run(batch, requests)
        for scores in prompt_scores:
            scores.seq.prompt_logprobs.extend(scores.entries)
        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit_full_blocks(item.seq)
        return self.output_processor.process(sampled, out, self.scheduler.finish) if sampled else []
