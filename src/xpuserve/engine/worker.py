"""One rank's device, model and KV cache: picks the device, joins the other ranks, loads the
model, sizes and allocates the paged cache, and on ranks other than 0 follows rank 0's steps."""

from __future__ import annotations

import logging
import weakref

from xpuserve.config import EngineConfig
from xpuserve.distributed import comm_device, init_distributed, liveness, min_over_ranks, rank_device
from xpuserve.engine.expert_load import ExpertLoad, expert_load
from xpuserve.engine.kv_cache import bytes_per_token
from xpuserve.engine.lockstep import StepChannel, follow, stop_followers
from xpuserve.engine.runner import ModelRunner
from xpuserve.platforms import resolve_device
from xpuserve.weights import load_model

log = logging.getLogger(__name__)
CPU_KV_CACHE_BYTES = 2 << 30


class Worker:
    def __init__(self, config: EngineConfig):
        platform, _ = resolve_device(config.device)
        self.parallel = init_distributed(platform, config.tensor_parallel_size, config.enable_expert_parallel)
        self.model = load_model(config.model, config.dtype, rank_device(platform, config.device), config.quantization)
        self.device = self.model.model.embed_tokens.weight.device
        self.max_model_len = config.max_model_len or self.model.config.max_position_embeddings
        self.kv_bytes_per_token = bytes_per_token(self.model, self.model.model.embed_tokens.weight.dtype)
        self.num_blocks = self._num_blocks(config, platform.memory_info(self.device))
        self.channel = StepChannel(comm_device(self.device), self.parallel.is_driver) if self.parallel.distributed else None
        driving = self.channel if self.parallel.is_driver else None
        self.runner = ModelRunner(self.model, self.num_blocks, config.block_size, channel=driving,
                                  enforce_eager=config.enforce_eager, max_num_seqs=config.max_num_seqs)
        # Followers wait for STOP however rank 0's engine ends: shutdown(), collected, or at exit.
        self._finalizer = weakref.finalize(self, stop_followers, driving) if driving is not None else None
        log.info("KV cache: %d blocks of %d tokens = %d tokens", self.num_blocks, config.block_size,
                 self.num_blocks * config.block_size)

    def _num_blocks(self, cfg: EngineConfig, memory: tuple[int, int] | None) -> int:
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
        num_blocks = min_over_ranks(local, comm_device(self.device))
        if num_blocks < 1:
            where = f"of {budget} bytes" if local < 1 else f"of another rank (this rank's {budget} bytes hold {local} blocks)"
            raise ValueError(f"KV cache budget {where} holds no block of {cfg.block_size} tokens")
        return num_blocks

    def run_follower(self) -> None:
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
