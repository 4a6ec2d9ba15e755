"""Several ingest processes at once: each reads its share of the partitions into a ring of its own.

With ``ring.ingest_workers: N`` the dataset starts N ingest children. Worker ``i`` reads
the partitions :func:`streamtrain.streams.split.owner` gives it (found at start or
later: the same function decides), decodes them and fills its own shared-memory ring,
with its own pipes. The trainer takes batches from all of them: :class:`MultiRing`
hands out whichever ring has one, in turn. Positions are per partition and the shares
are disjoint, so positions from different workers compose as they are, and exactly
once holds as with one worker. A worker that ends when it was not asked to is the
daemon's failure: its ring's error ends the others' reading too.
"""

from __future__ import annotations

import select
import threading
import time
from bisect import bisect_right
from typing import Any

from streamtrain.streams.ingest_process import IngestProcess, SourceMirror
from streamtrain.streams.shared_ring import SharedRing
from streamtrain.streams.slots import Position, RingClosed
from streamtrain.streams.slots import TopicPartition as TP
from streamtrain.streams.split import EVERYTHING, Share


class MultiRing:
    """The consumer side over the workers' rings (``SlotConsumer``); a batch's slot numbers the rings' slots in a row."""

    def __init__(self, rings: list[SharedRing]) -> None:
        from streamtrain.streams.ring import Batch  # torch: not at module level (the child imports this package)

        self._batch = Batch
        self.rings = rings
        self.slots = sum(r.slots for r in rings)
        self._base = [sum(r.slots for r in rings[:i]) for i in range(len(rings))]
        self._next = 0  # the ring asked first next time: each in turn

    @property
    def error(self) -> BaseException | None:
        return next((r.error for r in self.rings if r.error is not None), None)

    def get(self, timeout: float | None = None):
        deadline = time.monotonic() + (0.1 if timeout is None else timeout)
        while True:
            batch = self._take()
            if batch is not None:
                return batch
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            for r in self.rings:
                r.flush_give_back()  # never wait while holding slots a worker could fill
            fds = [fd for fd in (r.announcements_fd() for r in self.rings) if fd is not None]
            if fds:
                select.select(fds, [], [], left)
            else:
                time.sleep(min(left, 0.01))

    def _take(self):
        """A batch from the next ring that has one; RingClosed once every ring is drained, or at once on a worker's error."""
        n, drained = len(self.rings), 0
        for k in range(n):
            i = (self._next + k) % n
            try:
                b = self.rings[i].take()
            except RingClosed:
                if self.rings[i].error is not None:
                    self.close(self.rings[i].error)
                    raise
                drained += 1
                continue
            if b is not None:
                self._next = (i + 1) % n
                return self._batch(b.x, b.y, b.positions, b.oldest_timestamp, self._base[i] + b.slot, ids=b.ids)
        if drained == n:
            raise RingClosed
        return None

    def release(self, slot: int) -> None:
        i = bisect_right(self._base, slot) - 1
        self.rings[i].release(slot - self._base[i])

    def fill(self) -> int:
        return sum(r.fill() for r in self.rings)

    def pump(self, timeout: float = 0.0) -> None:
        for r in self.rings:
            r.pump(timeout)

    def close(self, error: BaseException | None = None) -> None:
        for r in self.rings:
            r.close(error)


class AllOpened:
    """Set once every worker's consumer is open (what ``IngestHandle.opened`` answers for several)."""

    def __init__(self, events: list[threading.Event]) -> None:
        self._events = events

    def is_set(self) -> bool:
        return all(e.is_set() for e in self._events)


class MultiIngest:
    """The workers as one ``IngestHandle``."""

    def __init__(self, workers: list[IngestProcess]) -> None:
        self.workers = workers
        self.opened = AllOpened([w.opened for w in workers])
        self.stats = workers[0].stats  # one object: each worker folds its child's counters into it

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self, timeout: float = 10.0) -> None:
        for w in self.workers:
            w.stop(timeout)

    def close(self) -> None:
        self.stop()

    def pump(self) -> None:
        for w in self.workers:
            w.pump()

    @property
    def alive(self) -> bool:
        return all(w.alive for w in self.workers)


class MultiMirror:
    """The workers' consumers as one (``SourceMirror``'s surface): what metrics, lag and /readyz read."""

    def __init__(self, mirrors: list[SourceMirror]) -> None:
        self.mirrors = mirrors

    @property
    def assigned(self) -> dict[TP, int]:
        return {tp: o for m in self.mirrors for tp, o in m.assigned.items()}

    @property
    def paused(self) -> bool:
        return any(m.paused for m in self.mirrors)

    @property
    def pauses(self) -> int:
        return sum(m.pauses for m in self.mirrors)

    @property
    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.mirrors:
            for k, v in m.errors.items():
                out[k] = out.get(k, 0) + v
        return out

    def high_watermarks(self) -> dict[TP, int]:
        return {tp: h for m in self.mirrors for tp, h in m.high_watermarks().items()}

    def reachable(self, within: float) -> bool:
        return any(m.reachable(within) for m in self.mirrors)

    def commit(self, positions: dict[TP, Position], timeout: float = 10.0) -> None:
        self.mirrors[0].commit(positions, timeout)

    def close(self) -> None:
        for m in self.mirrors:
            m.close()


def build_workers(count: int, make_ring: Any, make_worker: Any, share: Share = EVERYTHING) -> tuple[MultiRing, MultiIngest, MultiMirror]:
    """``count`` rings and workers (``make_ring()``, ``make_worker(ring, share of worker i, lock)``), not started.

    ``share`` is this rank's (its ``worker`` and ``workers`` are replaced).
    """
    lock = threading.Lock()
    rings = [make_ring() for _ in range(count)]
    workers = [make_worker(ring, share._replace(worker=i, workers=count), lock) for i, ring in enumerate(rings)]
    return MultiRing(rings), MultiIngest(workers), MultiMirror([w.source for w in workers])
