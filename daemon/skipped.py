"""The records of a skipped step go to the dead-letter topic, so every record is trained or dead-lettered.

A step whose loss or gradient is not finite leaves the weights untouched, and its
records' offsets move on with the stream.  They are held here until that is final --
the next good step, or the next snapshot, which records positions past them -- and then
written to the dead-letter topic (reason ``nonfinite_step``): one record per skipped
batch, its value the batch's rows as an Arrow IPC stream (the features by name and the
label), its headers the source ranges, ``topic[partition]:from-to`` with positions as
``offset`` or ``offset+rows``.  A roll-back drops what is held: those records are read
and trained again from the snapshot it returns to.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from streamtrain.streams.config import DataConfig, DeadLetterConfig, KafkaConfig
from streamtrain.streams.deadletter import HEADER_PREFIX, DeadLetter, DeadLetterQueue
from streamtrain.streams.decode import Reject
from streamtrain.streams.encode import encode
from streamtrain.streams.ring import Batch, Position
from streamtrain.streams.ring import TopicPartition as TP

log = logging.getLogger("streamtrain.trainer")

REASON = "nonfinite_step"


def _pos(p: Position | None) -> str:
    if p is None:
        return "start"
    return f"{p[0]}+{p[1]}" if p[1] else str(p[0])


class SkippedBatches:
    def __init__(self, kafka: KafkaConfig, data: DataConfig, dead_letter: DeadLetterConfig, stop: threading.Event | None = None) -> None:
        self.features = list(data.features) if data.features else [f"f{i}" for i in range(data.width)]
        self.label = data.label or "y"
        self.dlq = DeadLetterQueue(kafka, dead_letter, stop)
        self.pending: list[tuple[DeadLetter, int]] = []
        self.samples = 0  # samples written to the dead-letter topic

    def hold(self, batch: Batch, before: dict[TP, Position], why: str) -> None:
        """Keep a skipped batch's rows and where they came from (``before``: the positions before it)."""
        ranges = [(tp, before.get(tp), pos) for tp, pos in sorted(batch.positions.items())]
        text = ",".join(f"{t}[{p}]:{_pos(a)}-{_pos(b)}" for (t, p), a, b in ranges)
        x = np.ascontiguousarray(batch.x.detach().cpu().numpy(), dtype=np.float32)
        y = np.ascontiguousarray(batch.y.detach().cpu().numpy(), dtype=np.float32).reshape(-1)
        value = encode("arrow", x, y, self.features, self.label, rows_per_message=max(1, len(y)))[0]
        (topic, partition), start, _ = ranges[0] if ranges else (("", -1), None, None)
        letter = DeadLetter(
            topic,
            partition,
            start[0] if start else -1,
            int(time.time() * 1000),
            None,
            value,
            Reject(0, REASON, f"{why}: the step was skipped with the weights untouched; {len(y)} rows from {text}"),
            ((HEADER_PREFIX + "source.ranges", text.encode()),),
        )
        self.pending.append((letter, len(y)))

    def flush(self) -> None:
        """The held batches are final: write them (returns once the broker has them, or raises DeadLetterError)."""
        if not self.pending:
            return
        letters, self.pending = self.pending, []
        self.dlq.send([letter for letter, _ in letters])
        n = sum(rows for _, rows in letters)
        self.samples += n
        log.warning("%d sample(s) of %d skipped step(s) written to dead-letter topic %s", n, len(letters), self.dlq.dl.topic)

    def drop(self) -> None:
        """A roll-back: the held batches will be read again."""
        self.pending = []

    def close(self) -> None:
        self.dlq.close()
