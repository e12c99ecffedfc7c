"""The engine loop: requests in, one scheduled step at a time, RequestOutputs out."""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import torch

from xpuserve.config import EngineConfig
from xpuserve.engine.block_manager import BlockManager
from xpuserve.engine.kv_cache import bytes_per_token
from xpuserve.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput, TokenLogprob
from xpuserve.engine.runner import ModelRunner
from xpuserve.engine.sampler import SamplingRequest
from xpuserve.engine.scheduler import Scheduler
from xpuserve.engine.sequence import Sequence
from xpuserve.distributed import comm_device, init_distributed, liveness, min_over_ranks, rank_device
from xpuserve.engine.expert_load import ExpertLoad, expert_load
from xpuserve.engine.lockstep import StepChannel, follow, stop_followers
from xpuserve.detokenizer import IncrementalDetokenizer, StopChecker
from xpuserve.platforms import resolve_device
from xpuserve.sampling_params import SamplingParams
from xpuserve.tokenizer import Tokenizer
from xpuserve.weights import load_model

log = logging.getLogger(__name__)
CPU_KV_CACHE_BYTES = 2 << 30


@dataclass
class Request:
    request_id: str
    prompt: str | None
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    stop: StopChecker

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        platform, _ = resolve_device(config.device)
        self.parallel = init_distributed(platform, config.tensor_parallel_size, config.enable_expert_parallel)
        self.model = load_model(config.model, config.dtype, rank_device(platform, config.device), config.quantization)
        device = self.model.model.embed_tokens.weight.device
        self.model_config = self.model.config
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        dtype = self.model.model.embed_tokens.weight.dtype
        self.kv_bytes_per_token = bytes_per_token(self.model, dtype)
        num_blocks = self._num_blocks(platform.memory_info(device))
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.channel = StepChannel(comm_device(device), self.parallel.is_driver) if self.parallel.distributed else None
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, channel=self.channel if self.parallel.is_driver else None)
        self.device = device
        self.eos_token_ids = sorted(set(self.model_config.eos_token_id) | {self.tokenizer.eos_token_id} - {None})
        self.requests: dict[str, Request] = {}
        # Followers wait for STOP however rank 0's engine ends: shutdown(), collected, or at exit.
        self._finalizer = None
        if self.channel is not None and self.parallel.is_driver:
            self._finalizer = weakref.finalize(self, stop_followers, self.channel)
        log.info("KV cache: %d blocks of %d tokens = %d tokens", num_blocks, config.block_size, self.num_cache_tokens)

    def _num_blocks(self, memory: tuple[int, int] | None) -> int:
        cfg = self.config
        if cfg.kv_cache_memory is not None:
            budget = cfg.kv_cache_memory
        elif memory is None:
            budget = CPU_KV_CACHE_BYTES
        else:
            free, total = memory
            budget = int(free - (1 - cfg.gpu_memory_utilization) * total)
        # Never more than every sequence at full length needs.
        most = cfg.max_num_seqs * (-(-self.max_model_len // cfg.block_size) + 1)
        local = min(budget // (self.kv_bytes_per_token * cfg.block_size), most)
        num_blocks = min_over_ranks(local, comm_device(self.model.model.embed_tokens.weight.device))
        if num_blocks < 1:
            where = f"of {budget} bytes" if local < 1 else f"of another rank (this rank's {budget} bytes hold {local} blocks)"
            raise ValueError(f"KV cache budget {where} holds no block of {cfg.block_size} tokens")
        return num_blocks

    def run_worker(self) -> None:
        """On ranks other than 0: run the steps rank 0 sends until it shuts down."""
        follow(self.channel, self.runner.execute)
        liveness.stop()

    def shutdown(self) -> None:
        """On rank 0 when serving across ranks: tell the other ranks to stop. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()

    def expert_load(self) -> ExpertLoad | None:
        """Tokens routed to each expert and each rank so far (None for dense models)."""
        return expert_load(self.model, self.parallel.world_size)

    @property
    def num_cache_tokens(self) -> int:
        return len(self.block_manager.blocks) * self.config.block_size

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id '{request_id}' is already in use")
        text = prompt if isinstance(prompt, str) else None
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_request(prompt_ids, params)
        seqs = [
            Sequence(request_id, i, prompt_ids, params, generator=self._generator(params.seed, i))
            for i in range(params.n)
        ]
        detokenizers = [IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens) for _ in seqs]
        self.requests[request_id] = Request(request_id, text, seqs, detokenizers, StopChecker(params.stop))
        for seq in seqs:
            self.scheduler.add(seq)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError, with a message for the client, if the request cannot be served."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}")
        vocab = self.model_config.vocab_size
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

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(self.device).manual_seed(seed + index)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
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
            num_tokens_computed=self.runner.num_tokens_computed,
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled = [item.seq for item in batch if item.completes_prompt]
        requests = [
            SamplingRequest(s.params, s.prompt_token_ids, s.output_token_ids, s.generator, self.eos_token_ids)
            for s in sampled
        ]
        out, prompt_scores = self.runner.run(batch, requests)
        for scores in prompt_scores:
            scores.seq.prompt_logprobs.extend(scores.entries)
        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit_full_blocks(item.seq)
        touched: dict[str, Request] = {}
        for i, seq in enumerate(sampled):
            top = out.top_logprobs[i] if out.top_logprobs is not None else None
            self._append_token(seq, out.token_ids[i], out.logprobs[i], top)
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = [self._output(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                del self.requests[r.request_id]
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: float, top) -> None:
        now = time.monotonic()
        seq.output_token_ids.append(token)
        seq.first_token_time = seq.first_token_time or now
        if seq.params.logprobs is not None:
            seq.output_logprobs.append(TokenLogprob(token, logprob, top or []))
        request = self.requests[seq.request_id]
        detokenizer = request.detokenizers[seq.index]
        delta = detokenizer.add([token])
        reason, stop_reason = self._finish_reason(seq, token, request, detokenizer, len(delta))
        if reason is not None and not isinstance(stop_reason, str):
            # Release text held back for an incomplete character; it may still complete a stop string.
            hit = request.stop.find(detokenizer.text, len(detokenizer.finish()))
            if hit is not None:
                detokenizer.truncate(hit.index)
                reason, stop_reason = "stop", hit.stop
        if reason is not None:
            self.scheduler.finish(seq, reason)
            seq.stop_reason = stop_reason
            seq.finish_time = now

    def _finish_reason(self, seq: Sequence, token: int, request: Request, detokenizer, delta_len: int):
        params = seq.params
        out_len = len(seq.output_token_ids)
        if out_len >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if token in params.stop_token_ids:
                return "stop", token
        hit = request.stop.find(detokenizer.text, delta_len)
        if hit is not None:
            detokenizer.truncate(hit.index)
            return "stop", hit.stop
        if params.max_tokens is not None and out_len >= params.max_tokens:
            return "length", None
        if len(seq) >= self.max_model_len:
            return "length", None
        return None, None

    def _output(self, request: Request) -> RequestOutput:
        first = request.seqs[0]
        completions = [
            CompletionOutput(
                index=s.index,
                text=d.text,
                token_ids=list(s.output_token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=list(s.output_logprobs) if s.params.logprobs is not None else None,
            )
            for s, d in zip(request.seqs, request.detokenizers)
        ]
        times = [s.first_token_time for s in request.seqs if s.first_token_time]
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_token_time=min(times) if times else None,
            finish_time=max((s.finish_time or 0) for s in request.seqs) if request.finished else None,
            num_prompt_tokens=len(first.prompt_token_ids),
            num_cached_tokens=first.num_cached_tokens,
        )
        prompt_logprobs = [None, *first.prompt_logprobs] if first.params.prompt_logprobs is not None else None
        return RequestOutput(request.request_id, request.prompt, first.prompt_token_ids, completions, request.finished,
                             metrics, prompt_logprobs)
