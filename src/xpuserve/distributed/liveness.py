"""Every rank proves it is alive through the rendezvous store; a silent rank stops the whole server.

Each rank bumps its own counter in the store every HEARTBEAT_S seconds (a thread, so a rank deep
in a collective keeps beating) and watches everyone else's counters. A counter that has not
moved for DEAD_AFTER_S seconds means that rank died or lost the network: this rank prints a
message naming it and exits non-zero, and torchrun then stops the rest. The store lives in
torchrun's agent, so it outlives any rank; losing the store itself is fatal too.
"""

from __future__ import annotations

import os
import sys
import threading
import time

HEARTBEAT_S = 1.0
DEAD_AFTER_S = float(os.environ.get("XPUSERVE_DEAD_AFTER", "10"))
KEY = "xpuserve/alive/{}"

_watcher: "Liveness | None" = None


def fatal(message: str) -> None:
    """Exit this rank at once, whatever other threads are blocked in: a clean exit could hang."""
    print(f"xpuserve: {message}", file=sys.stderr, flush=True)
    os._exit(1)


class Liveness:
    def __init__(self, store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size
        self._stop = threading.Event()
        self._counts = [-1] * world_size
        self._changed = [time.monotonic()] * world_size
        self._thread = threading.Thread(target=self._run, name="xpuserve-liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """A clean shutdown: peers stop beating too, so stop watching them first."""
        self._stop.set()

    def counts(self) -> list[int]:
        return [self.store.add(KEY.format(r), 1 if r == self.rank else 0) for r in range(self.world_size)]

    def silent_ranks(self, wait_s: float = 3 * HEARTBEAT_S) -> list[int]:
        """Ranks whose counter does not move within `wait_s`: dead or cut off."""
        before = self.counts()
        time.sleep(wait_s)
        after = self.counts()
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                counts = self.counts()
            except Exception as e:  # noqa: BLE001 - the store is gone: its host stopped
                if not self._stop.is_set():
                    fatal(f"rank {self.rank}: lost the rendezvous store ({e}); the launcher or its node stopped")
                return
            now = time.monotonic()
            for r, count in enumerate(counts):
                if count != self._counts[r]:
                    self._counts[r], self._changed[r] = count, now
            silent = [r for r in range(self.world_size) if now - self._changed[r] > DEAD_AFTER_S]
            if silent and not self._stop.is_set():
                fatal(f"rank {_names(silent)} stopped responding (no heartbeat for {DEAD_AFTER_S:.0f}s); "
                      f"rank {self.rank} stops the server")


def _names(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def start(store, rank: int, world_size: int) -> None:
    global _watcher
    _watcher = Liveness(store, rank, world_size)
    _watcher.start()


def resume() -> None:
    """Watch again after a clean stop, when the same processes build another engine."""
    if _watcher is not None and _watcher._stop.is_set():
        start(_watcher.store, _watcher.rank, _watcher.world_size)


def stop() -> None:
    if _watcher is not None:
        _watcher.stop()


def silent_ranks() -> list[int]:
    """The ranks whose heartbeat stopped (takes a few seconds to tell)."""
    try:
        return _watcher.silent_ranks() if _watcher else []
    except Exception:  # noqa: BLE001 - the store is gone too
        return []


def who_stopped() -> str:
    silent = silent_ranks()
    return f"rank {_names(silent)} stopped" if silent else "a peer rank failed or hung"


def collective_failed(error: BaseException) -> None:
    """A step raised or a collective timed out: name the ranks that went silent, or say that this
    rank's own step failed (an out-of-memory, say), then exit: the ranks are out of step."""
    rank = _watcher.rank if _watcher else "?"
    cause = f"{type(error).__name__}: {error}"
    silent = silent_ranks()
    if silent:
        fatal(f"rank {_names(silent)} stopped: a collective on rank {rank} failed ({cause}); stopping the server")
    fatal(f"a step failed on rank {rank} ({cause}); the ranks are out of step: stopping the server")
