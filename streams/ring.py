"""A bounded ring of preallocated batch slots between the ingest thread and the trainer.

Slots are allocated once (pinned host memory when CUDA is available, so host-to-device
copies can be asynchronous) and reused; the ring's size therefore bounds the memory
of the data path.  Each published slot carries the Kafka positions reached by the
records inside it, so whoever trains a batch knows exactly which offsets it covers.

One producer thread fills slots (:meth:`acquire` / :meth:`publish`); one consumer
takes them (:meth:`get`) and gives them back (:meth:`release`) when it no longer
reads the slot's memory.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from streamtrain.streams.slots import Position, RingClosed, TopicPartition

__all__ = ["Batch", "Position", "Ring", "RingClosed", "TopicPartition"]


@dataclass
class Batch:
    """A batch of samples and the Kafka positions it brings the stream to.

    ``x``/``y`` are views of a ring slot: valid until the slot is released (the dataset
    releases it when the next batch is asked for).  A batch may hold zero samples when
    it only advances positions (every record in it was rejected).

    Whoever copies ``x``/``y`` out asynchronously (``.to("cuda", non_blocking=True)``)
    sets ``copy_done`` to an event recorded after the copy (``torch.cuda.Event``: its
    ``query()`` and ``synchronize()``); the dataset then gives the slot back to the ring
    only once the event has completed.
    """

    x: torch.Tensor  # (n, width) float32; NaN where a number was missing (data.missing: impute)
    y: torch.Tensor  # (n,) float32
    positions: dict[TopicPartition, Position] = field(default_factory=dict)
    oldest_timestamp: float = math.nan  # unix seconds of the oldest record inside
    slot: int = -1
    copy_done: Any = None
    ids: torch.Tensor | None = None  # (n, categorical fields) int64: rows of the hashed table; None: no categorical field
    done: dict[TopicPartition, Any] | None = None  # data.labels: offsets past the positions these rows make done (numpy int64)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def pin_memory(self) -> Batch:
        """Lets ``DataLoader(pin_memory=True)`` pin a batch (slots are already pinned on CUDA)."""
        if self.x.is_pinned():
            return self
        ids = self.ids.pin_memory() if self.ids is not None else None
        return Batch(self.x.pin_memory(), self.y.pin_memory(), dict(self.positions), self.oldest_timestamp, -1, ids=ids, done=self.done)


class Ring:
    """``slots`` preallocated slots of ``batch_size`` x ``width`` float32 features, labels and ``fields`` int64 table rows."""

    def __init__(self, slots: int, batch_size: int, width: int, pin_memory: bool = False, fields: int = 0) -> None:
        self.slots = slots
        self.batch_size = batch_size
        self.width = width
        self.fields = fields
        self.x = torch.empty((slots, batch_size, width), dtype=torch.float32, pin_memory=pin_memory)
        self.y = torch.empty((slots, batch_size), dtype=torch.float32, pin_memory=pin_memory)
        self.ids = torch.empty((slots, batch_size, fields), dtype=torch.int64, pin_memory=pin_memory and fields > 0)
        # numpy views of the same memory: the producer writes through these
        self.x_np = self.x.numpy()
        self.y_np = self.y.numpy()
        self.ids_np = self.ids.numpy()
        self.views = slot_views(self.x, self.y, self.ids if fields else None)
        self._free: deque[int] = deque(range(slots))
        self._ready: deque[tuple[int, int, dict, float]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.error: BaseException | None = None

    @property
    def nbytes(self) -> int:
        return self.x.numel() * 4 + self.y.numel() * 4 + self.ids.numel() * 8

    def fill(self) -> int:
        """Slots published and not yet taken by the consumer."""
        return len(self._ready)

    def free(self) -> int:
        return len(self._free)

    # ------------------------------------------------------------------ producer side
    def acquire(self, timeout: float) -> int | None:
        """A free slot to fill, or None if none frees up within ``timeout`` seconds."""
        with self._cond:
            if not self._free and not self._closed:
                self._cond.wait_for(lambda: self._free or self._closed, timeout)
            if self._closed:
                raise RingClosed
            return self._free.popleft() if self._free else None

    def publish(
        self, slot: int, n: int, positions: dict[TopicPartition, Position], oldest_timestamp: float, done: dict | None = None
    ) -> None:
        with self._cond:
            self._ready.append((slot, n, positions, oldest_timestamp) if done is None else (slot, n, positions, oldest_timestamp, done))
            self._cond.notify_all()

    def give_back(self, slot: int) -> None:
        """Return an acquired slot unused (the producer is stopping)."""
        self.release(slot)

    # ------------------------------------------------------------------ consumer side
    def get(self, timeout: float | None = None) -> Batch | None:
        """The next published batch, or None after ``timeout`` seconds with none ready."""
        with self._cond:
            if not self._ready and not self._closed:
                self._cond.wait_for(lambda: self._ready or self._closed, timeout)
            return next_ready(self._ready, self.views, self._closed)

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify_all()

    # ------------------------------------------------------------------ both
    def close(self, error: BaseException | None = None) -> None:
        """Wake every waiter; batches already published can still be taken."""
        with self._cond:
            if error is not None and self.error is None:
                self.error = error
            self._closed = True
            self._cond.notify_all()

    def wait_free(self, timeout: float) -> bool:
        """Wait until a slot is free (used to decide when to resume fetching)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            return self._cond.wait_for(lambda: self._free or self._closed, max(0.0, deadline - time.monotonic()))


def slot_views(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Each slot's (x, y[, ids]) as ready-made views: a full batch is handed out without indexing (2.2 -> 0.4 us, bench.frames)."""
    return (x.unbind(0), y.unbind(0)) if ids is None else (x.unbind(0), y.unbind(0), ids.unbind(0))


def next_ready(ready: deque, views: tuple[tuple[torch.Tensor, ...], ...], closed: bool) -> Batch | None:
    """The oldest announced batch as views of its slot; None if there is none; RingClosed once closed and drained."""
    if ready:
        slot, n, positions, ts, *done = ready.popleft()
        x, y = views[0][slot], views[1][slot]
        ids = views[2][slot] if len(views) > 2 else None
        if n != len(y):
            x, y = x[:n], y[:n]
            ids = ids[:n] if ids is not None else None
        return Batch(x, y, positions, ts, slot, ids=ids, done=done[0] if done else None)
    if closed:
        raise RingClosed
    return None
