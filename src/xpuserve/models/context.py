"""Per-step attention metadata, built once by the runner and read by every attention layer.

Tokens of all sequences in a step are packed into one flat batch of N tokens. The KV cache
is a flat array of slots in blocks; each sequence owns a block table. A decode step (every
sequence adds one token) attends in place, through the block tables. Other steps, and decode
steps built with `paged_decode=False` (the reference), use padded [B, Tq] / [B, Lk] views that
let plain PyTorch attention run over any mix of prefills and decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceSlice:
    """One sequence's share of a step: positions [start, start + num_new), cached in `block_table`."""

    start: int
    num_new: int
    block_table: list[int]  # cache block of positions [i * block_size, (i + 1) * block_size)


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [N] position of each token within its sequence
    slot_mapping: torch.Tensor  # [N] cache slot where each token's K/V is written
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with block 0
    context_lens: torch.Tensor  # [B] int32: keys each sequence attends after this step's writes
    block_size: int
    max_query_len: int
    # The padded views; None on a paged decode step.
    query_index: torch.Tensor | None = None  # [B, Tq] index into the N tokens; 0 where padded
    query_valid: torch.Tensor | None = None  # [B, Tq] False where padded
    kv_slots: torch.Tensor | None = None  # [B, Lk] cache slot of each context position; garbage where masked
    attn_mask: torch.Tensor | None = None  # [B, 1, Tq, Lk] True where a query may attend to a key

    @property
    def paged_decode(self) -> bool:
        return self.kv_slots is None

    @classmethod
    def build(cls, seqs: list[SequenceSlice], block_size: int, device: torch.device | str = "cpu",
              paged_decode: bool = True) -> "ForwardContext":
        if any(len(s.block_table) * block_size < s.start + s.num_new for s in seqs):
            raise ValueError("a sequence has fewer cache blocks than positions")
        max_q = max(s.num_new for s in seqs)
        lens = [s.start + s.num_new for s in seqs]
        # At least two columns: a compiled step takes a dimension of size 1 for a constant.
        max_blocks = max(2, -(-max(lens) // block_size))
        tables = torch.tensor([s.block_table[:max_blocks] + [0] * (max_blocks - len(s.block_table)) for s in seqs],
                              dtype=torch.int32)
        if max_q == 1 and paged_decode:
            positions = torch.tensor([s.start for s in seqs])
            slots = tables[torch.arange(len(seqs)), positions // block_size].long() * block_size + positions % block_size
            return cls(positions.to(device), slots.to(device), tables.to(device),
                       torch.tensor(lens, dtype=torch.int32, device=device), block_size, 1)
        starts = torch.tensor([s.start for s in seqs])
        num_new = torch.tensor([s.num_new for s in seqs])
        steps = torch.arange(max_q)
        query_valid = steps[None, :] < num_new[:, None]
        query_pos = torch.where(query_valid, starts[:, None] + steps[None, :], 0)
        offsets = torch.cumsum(num_new, 0) - num_new
        query_index = torch.where(query_valid, offsets[:, None] + steps[None, :], 0)
        kv_pos = torch.arange(max(lens))
        kv_slots = tables[:, kv_pos // block_size].long() * block_size + kv_pos % block_size
        # Causal: a query at position p sees keys 0..p. Padded queries (p = 0) see key 0 only,
        # which keeps their softmax finite; their outputs are dropped.
        attn_mask = kv_pos[None, None, :] <= query_pos[:, :, None]
        return cls(
            positions=query_pos[query_valid].to(device),
            slot_mapping=kv_slots.gather(1, query_pos)[query_valid].to(device),
            block_tables=tables.to(device),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            block_size=block_size,
            max_query_len=max_q,
            query_index=query_index.to(device),
            query_valid=query_valid.to(device),
            kv_slots=kv_slots.to(device),
            attn_mask=attn_mask[:, None].to(device),
        )

    def pad_queries(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, Tq, ...]"""
        return x[self.query_index]

    def unpad_queries(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Tq, ...] -> [N, ...]; sequences are packed in order, so boolean indexing restores it."""
        return x[self.query_valid]
