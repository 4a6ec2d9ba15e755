"""Which rank and which of its ingest workers reads which partition: one function for both.

A partition's key is ``crc32(topic) + partition``.  Rank ``key % world`` reads it, and
within that rank worker ``(key // world) % workers``.  Both are stable: a partition
keeps its owner when partitions or topics are added (the key depends on the topic's
name and the partition's number only), so no two readers ever read the same
partition, and a partition found at runtime goes to the reader the function names
without anyone agreeing to it.  Consecutive partitions of one topic go round-robin:
with as many partitions as ranks (or workers), each gets one.  A rank's split does not
depend on another rank's worker count, so ranks on different machines may differ in
cores.  With one rank this is ``key % workers``: the split of the ingest workers alone.
"""

from __future__ import annotations

import os
import zlib
from typing import NamedTuple

from streamtrain.streams.slots import TopicPartition as TP

# data.labels: the label topic's partition p is read with the feature topic's partition p (label topic -> feature topic)
PAIRED: dict[str, str] = {}


def pair_topics(label_topic: str, feature_topic: str) -> None:
    """Give ``label_topic``'s partitions the readers of ``feature_topic``'s (set in every process that splits)."""
    PAIRED[label_topic] = feature_topic


def key(tp: TP) -> int:
    return zlib.crc32(PAIRED.get(tp[0], tp[0]).encode()) + tp[1]


def owner(tp: TP, count: int) -> int:
    """The index (0..count-1) of the reader of ``tp`` among ``count`` (ranks; or the workers of one rank)."""
    return key(tp) % count


class Share(NamedTuple):
    """One reader's share of the partitions: worker ``worker`` of ``workers`` on rank ``rank`` of ``world``."""

    worker: int = 0
    workers: int = 1
    rank: int = 0
    world: int = 1

    @property
    def everything(self) -> bool:
        return self.workers == 1 and self.world == 1

    def owns(self, tp: TP) -> bool:
        k = key(tp)
        return k % self.world == self.rank and (k // self.world) % self.workers == self.worker


EVERYTHING = Share()  # one reader of every partition: one rank, one ingest worker


def default_workers(cpus: int | None = None) -> int:
    """``ring.ingest_workers: 0``: half the cores the trainer leaves over, at least one, at most 8.

    2 cores: 1 (the trainer needs the other); 4: 1; 8: 3; 16 and more: 7-8.
    """
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(8, (cpus - 1) // 2))
