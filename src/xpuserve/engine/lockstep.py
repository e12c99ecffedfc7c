"""Rank 0 drives, the other ranks follow: each step's batch is broadcast before the forward pass.

The driver (rank 0) schedules, then broadcasts the step's token ids, positions (as sequence
slices) and block tables as one int64 tensor; every rank builds the same ForwardContext from
it and runs the same forward, so the collectives inside the model line up. Logits reach every
rank (the vocab-parallel head all-gathers them) but only the driver samples.

Message = header [kind, payload length], then the payload when there is one. An idle driver
sends a HEARTBEAT at least every HEARTBEAT_S, so a follower that waits longer than the
collective timeout knows the driver is gone. STOP ends the followers' loop.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from xpuserve.distributed import liveness
from xpuserve.engine.step import StepInput
from xpuserve.models.context import SequenceSlice

STEP, HEARTBEAT, STOP = 0, 1, 2
HEARTBEAT_S = 2.0


def encode(step: StepInput) -> list[int]:
    out = [len(step.token_ids), len(step.slices), len(step.sample_rows), len(step.prompt_rows), *step.token_ids]
    for s in step.slices:
        out += [s.start, s.num_new, len(s.block_table), *s.block_table]
    return out + list(step.sample_rows) + list(step.prompt_rows)


def decode(values: list[int]) -> StepInput:
    n_ids, n_seqs, n_rows, n_prompt_rows = values[:4]
    pos = 4 + n_ids
    ids = values[4:pos]
    slices = []
    for _ in range(n_seqs):
        start, num_new, n_blocks = values[pos : pos + 3]
        slices.append(SequenceSlice(start, num_new, values[pos + 3 : pos + 3 + n_blocks]))
        pos += 3 + n_blocks
    return StepInput(ids, slices, values[pos : pos + n_rows], values[pos + n_rows : pos + n_rows + n_prompt_rows])


class StepChannel:
    """The driver's `send` holds a lock for the whole step, so a heartbeat never interleaves
    with the collectives of a forward pass."""

    def __init__(self, device: torch.device, is_driver: bool):
        self.device = device
        self.lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._closed = threading.Event()
        if is_driver:
            threading.Thread(target=self._heartbeats, name="xpuserve-step-heartbeat", daemon=True).start()

    @contextmanager
    def send(self, step: StepInput):
        """Broadcast the step, then run the body (the driver's forward) still holding the lock.
        Any failure leaves the ranks out of step: the server stops."""
        with self.lock:
            try:
                self._broadcast(STEP, encode(step))
                yield
            except Exception as e:  # noqa: BLE001
                liveness.collective_failed(e)

    def receive(self) -> StepInput | None:
        """The next step to run, or None when the driver stops."""
        while True:
            header = torch.empty(2, dtype=torch.int64, device=self.device)
            dist.broadcast(header, src=0)
            kind, length = header.tolist()
            if kind == STOP:
                return None
            if kind == STEP:
                payload = torch.empty(length, dtype=torch.int64, device=self.device)
                dist.broadcast(payload, src=0)
                return decode(payload.tolist())

    def close(self) -> None:
        """Tell the followers to stop (driver), after the step in flight however long it takes: a
        step stuck on a dead or frozen peer ends the process through the watchdogs instead."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self.lock:
            try:
                self._broadcast(STOP, [])
            except Exception as e:  # noqa: BLE001 - a follower already gone; this rank is stopping anyway
                print(f"xpuserve: {liveness.who_stopped()}; rank 0 could not tell it to stop ({e})", file=sys.stderr, flush=True)

    def _broadcast(self, kind: int, payload: list[int]) -> None:
        dist.broadcast(torch.tensor([kind, len(payload)], dtype=torch.int64, device=self.device), src=0)
        if payload:
            dist.broadcast(torch.tensor(payload, dtype=torch.int64, device=self.device), src=0)
        self._last_sent = time.monotonic()

    def _heartbeats(self) -> None:
        while not self._closed.wait(HEARTBEAT_S / 4):
            if time.monotonic() - self._last_sent < HEARTBEAT_S or not self.lock.acquire(blocking=False):
                continue
            try:
                if not self._closed.is_set():
                    self._broadcast(HEARTBEAT, [])
            except Exception as e:  # noqa: BLE001 - a follower is gone
                liveness.collective_failed(e)
            finally:
                self.lock.release()


def stop_followers(channel: StepChannel) -> None:
    """Driver: send STOP, then stop watching the followers (they stop beating once they have it).
    Not the other way round: during a long last step rank 0 must still beat, or the followers,
    waiting for STOP, would take it for dead."""
    channel.close()
    liveness.stop()


def follow(channel: StepChannel, execute) -> None:
    """A follower's loop: run every step the driver sends until it says stop."""
    try:
        while (step := channel.receive()) is not None:
            execute(step)
    except Exception as e:  # noqa: BLE001 - out of step with the driver: the server cannot go on
        liveness.collective_failed(e)
