"""Which worker reads which partition: one function, for the ingest workers (and for ranks).

``owner(tp, count)`` is stable: a partition keeps its owner when partitions or topics are
added (it depends on the topic's name and the partition's number only), so no two
workers ever read the same partition, and a partition found at runtime goes to the
worker the function names without anyone else agreeing to it.  The partitions of one
topic are spread round-robin: with as many partitions as workers, each gets one.
"""

from __future__ import annotations

import os
import zlib

from streamtrain.streams.slots import TopicPartition as TP


def owner(tp: TP, count: int) -> int:
    """The index (0..count-1) of the worker that reads ``tp``."""
    return (zlib.crc32(tp[0].encode()) + tp[1]) % count


def default_workers(cpus: int | None = None) -> int:
    """``ring.ingest_workers: 0``: half the cores the trainer leaves over, at least one, at most 8.

    2 cores: 1 (the trainer needs the other); 4: 1; 8: 3; 16 and more: 7-8.
    """
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(8, (cpus - 1) // 2))
