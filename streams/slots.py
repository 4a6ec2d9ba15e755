"""What both sides of a ring share, without torch: position types and the two sides' interfaces.

A ring is a fixed set of batch slots between the ingest loop (the producer side:
:class:`SlotProducer`) and the training loop (the consumer side: :class:`SlotConsumer`).
The product is the shared-memory ring between the ingest process and the daemon
(``streams/shared_ring.py``: ``ChildRing`` is its producer side, ``SharedRing`` its consumer
side); ``streams/ring.py``'s in-process ``Ring`` (``ring.ingest: thread``) is both sides of
the same protocol in one object.  The dataset drives either through :class:`IngestHandle`.
The ingest process imports only this, so it starts without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import threading

    from streamtrain.streams.ring import Batch

Position = tuple[int, int]  # (next offset to read, rows of that record already taken)
TopicPartition = tuple[str, int]


class RingClosed(Exception):
    """The ring was closed (shutdown, or the producer failed: see the ring's ``error``)."""


class SlotProducer(Protocol):
    """The producer side of a ring, as the ingest loop uses it (in a thread or in its own process)."""

    slots: int
    batch_size: int
    x_np: np.ndarray  # (slots, batch_size, width) float32, written in place
    y_np: np.ndarray  # (slots, batch_size) float32
    ids_np: np.ndarray  # (slots, batch_size, fields) int64: rows of the hashed table

    def acquire(self, timeout: float | None) -> int | None: ...

    def publish(
        self, slot: int, n: int, positions: dict[TopicPartition, Position], oldest_timestamp: float, done: dict | None = None
    ) -> None: ...

    def give_back(self, slot: int) -> None: ...

    def wait_free(self, timeout: float) -> bool: ...

    def close(self, error: BaseException | None = None) -> None: ...


class SlotConsumer(Protocol):
    """The consumer side of a ring, as the dataset uses it."""

    slots: int
    error: BaseException | None  # why the producer closed it, if it failed

    def get(self, timeout: float | None = None) -> Batch | None: ...

    def release(self, slot: int) -> None: ...

    def fill(self) -> int: ...

    def close(self, error: BaseException | None = None) -> None: ...


class IngestHandle(Protocol):
    """What the dataset holds of the ingest loop, whether it runs in a thread or in its own process."""

    opened: threading.Event  # the consumer is open and has its assignment
    stats: Any  # streams.ingest.IngestStats, cumulative

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def close(self) -> None: ...

    def pump(self) -> None: ...

    @property
    def alive(self) -> bool: ...
