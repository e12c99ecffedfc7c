"""Per-step attention metadata, built once by the runner and read by every attention layer.

Tokens of all sequences in a step are packed into one flat batch of N tokens. The KV cache
is a flat array of slots; each sequence owns a list of slots, one per position. The padded
[B, Tq] / [B, Lk] views let plain PyTorch attention run over any mix of prefills and decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceSlice:
    """One sequence's share of a step: tokens [start, start + num_new) with cache slots for 0..end."""

    start: int
    num_new: int
    slots: list[int]  # cache slot of every position 0 .. start + num_new - 1


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [N] position of each token within its sequence
    slot_mapping: torch.Tensor  # [N] cache slot where each token's K/V is written
    query_index: torch.Tensor  # [B, Tq] index into the N tokens; 0 where padded
    query_valid: torch.Tensor  # [B, Tq] False where padded
    kv_slots: torch.Tensor  # [B, Lk] cache slot of each context position; 0 where padded
    attn_mask: torch.Tensor  # [B, 1, Tq, Lk] True where a query may attend to a key
    max_query_len: int

    @classmethod
    def build(cls, seqs: list[SequenceSlice], device: torch.device | str = "cpu") -> "ForwardContext":
        batch = len(seqs)
        max_q = max(s.num_new for s in seqs)
        max_k = max(s.start + s.num_new for s in seqs)
        positions, slot_mapping = [], []
        query_index = torch.zeros(batch, max_q, dtype=torch.long)
        query_pos = torch.zeros(batch, max_q, dtype=torch.long)
        query_valid = torch.zeros(batch, max_q, dtype=torch.bool)
        kv_slots = torch.zeros(batch, max_k, dtype=torch.long)
        offset = 0
        for b, s in enumerate(seqs):
            end = s.start + s.num_new
            if len(s.slots) < end:
                raise ValueError(f"sequence {b} has {len(s.slots)} cache slots for {end} positions")
            pos = torch.arange(s.start, end)
            positions.append(pos)
            slot_mapping.append(torch.tensor(s.slots[s.start:end], dtype=torch.long))
            query_index[b, : s.num_new] = torch.arange(offset, offset + s.num_new)
            query_pos[b, : s.num_new] = pos
            query_valid[b, : s.num_new] = True
            kv_slots[b, :end] = torch.tensor(s.slots[:end], dtype=torch.long)
            offset += s.num_new
        # Causal: a query at position p sees keys 0..p. Padded queries (p = 0) see key 0 only,
        # which keeps their softmax finite; their outputs are dropped.
        attn_mask = torch.arange(max_k)[None, None, :] <= query_pos[:, :, None]
        return cls(
            positions=torch.cat(positions).to(device),
            slot_mapping=torch.cat(slot_mapping).to(device),
            query_index=query_index.to(device),
            query_valid=query_valid.to(device),
            kv_slots=kv_slots.to(device),
            attn_mask=attn_mask[:, None].to(device),
            max_query_len=max_q,
        )

    def pad_queries(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, Tq, ...]"""
        return x[self.query_index]

    def unpad_queries(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Tq, ...] -> [N, ...]; sequences are packed in order, so boolean indexing restores it."""
        return x[self.query_valid]
