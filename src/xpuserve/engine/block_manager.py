"""Paged KV cache bookkeeping: fixed-size blocks, reference counts and a prefix cache.

A full block is identified by a hash of its tokens and of the hash of the block before it,
so equal hashes mean equal prefixes. Blocks whose last user finished stay in the cache with
reference count 0 and are reused by a later request with the same prefix, or evicted
least-recently-used when a fresh block is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from xpuserve.engine.sequence import Sequence


def block_hash(previous: int | None, tokens: list[int]) -> int:
    return hash((previous, tuple(tokens)))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its contents final


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks in eviction order (least recently used first); hashed ones can still be hit.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.hit_tokens = 0
        self.queried_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_prompt(self, seq: Sequence, token_budget: int) -> int:
        """Give a waiting sequence its cached prefix blocks plus fresh blocks for up to
        `token_budget` more tokens. Sets seq.num_computed_tokens to the cached length and returns
        how many tokens to compute now; 0 (and nothing changed) if there are not enough free blocks."""
        hits = self._prefix_hits(seq)
        cached = len(hits) * self.block_size
        num_new = min(len(seq) - cached, token_budget)
        needed = self.blocks_needed(cached + num_new) - len(hits)
        hits_in_free_list = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if num_new <= 0 or needed > self.num_free_blocks - hits_in_free_list:
            return 0
        for block_id in hits:
            self._take(block_id)
        seq.block_table = hits + [self._take_fresh() for _ in range(needed)]
        seq.num_computed_tokens = seq.num_cached_tokens = cached
        self.queried_tokens += len(seq)
        self.hit_tokens += cached
        return num_new

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching or seq.num_unscored_prompt_tokens:
            return []  # a prompt being scored must be computed, not looked up
        tokens = seq.token_ids
        # At least one token must be computed to produce logits, so never hit the whole sequence.
        hits, previous = [], None
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            previous = block_hash(previous, tokens[start : start + self.block_size])
            block_id = self.cached.get(previous)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for the sequence to hold `num_tokens` tokens in all. False if out of blocks."""
        extra = self.blocks_needed(num_tokens) - len(seq.block_table)
        if extra > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take_fresh() for _ in range(extra))
        return True

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Hash the sequence's blocks that are now full of computed tokens, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        tokens, previous = seq.token_ids, None
        for i in range(seq.num_computed_tokens // self.block_size):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash = block_hash(previous, tokens[i * self.block_size : (i + 1) * self.block_size])
                self.cached.setdefault(block.hash, block.block_id)
            previous = block.hash

    def free_sequence(self, seq: Sequence) -> None:
        # Release the tail first so that, among equally old blocks, a prefix's later blocks are evicted first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached contents
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id
