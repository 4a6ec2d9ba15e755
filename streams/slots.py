"""What both sides of a ring share, without torch: position types, the producer's interface.

The ingest process imports only this, so it starts without loading torch.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

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

    def acquire(self, timeout: float | None) -> int | None: ...

    def publish(self, slot: int, n: int, positions: dict[TopicPartition, Position], oldest_timestamp: float) -> None: ...

    def give_back(self, slot: int) -> None: ...

    def wait_free(self, timeout: float) -> bool: ...

    def close(self, error: BaseException | None = None) -> None: ...
