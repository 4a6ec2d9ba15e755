"""``KafkaIterableDataset``: Kafka topics as a PyTorch ``IterableDataset`` of ready batches.

Usable on its own in a plain training loop::

    ds = KafkaIterableDataset.from_dict({
        "kafka": {"bootstrap_servers": "127.0.0.1:9092", "topics": ["events"]},
        "data": {"format": "json", "features": ["a", "b"], "label": "y"},
        "ring": {"batch_size": 256},
    })
    for batch in DataLoader(ds, batch_size=None):   # batches are already formed
        loss = loss_fn(model(batch.x), batch.y)
        ...
        ds.commit()        # or keep ds.state_dict() with your checkpoint

Batches come from a background ingest thread through a ring of preallocated slots;
``batch.x`` / ``batch.y`` are views of a slot, valid until the next batch is asked for
(the slot is then reused; after ``batch.x.to("cuda", non_blocking=True)``, set
``batch.copy_done`` to a ``torch.cuda.Event`` recorded after the copy, and the slot is
reused only once the copy is done).  Each batch carries the Kafka positions it brings the
stream to; :meth:`state_dict` returns the positions of every batch yielded so far, and
:meth:`load_state_dict` before iterating resumes exactly there.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from streamtrain.streams.config import DataConfig, DeadLetterConfig, KafkaConfig, RingConfig, parse
from streamtrain.streams.deadletter import DeadLetterQueue
from streamtrain.streams.decode import LabelRule
from streamtrain.streams.errors import StreamtrainError
from streamtrain.streams.ingest import Ingest, IngestStats
from streamtrain.streams.ingest_process import IngestProcess, SourceMirror
from streamtrain.streams.offsets import OffsetTracker
from streamtrain.streams.ring import Batch, Position, Ring, RingClosed
from streamtrain.streams.ring import TopicPartition as TP
from streamtrain.streams.shared_ring import SharedRing
from streamtrain.streams.slots import IngestHandle, SlotConsumer
from streamtrain.streams.source import KafkaSource
from streamtrain.streams.split import EVERYTHING, Share, default_workers, pair_topics
from streamtrain.streams.workers import MultiMirror, build_workers


class KafkaIterableDataset(IterableDataset):
    """Batches of ``(x, y)`` with their Kafka positions, read from every partition of the topics."""

    def __init__(
        self,
        kafka: KafkaConfig,
        data: DataConfig,
        ring: RingConfig | None = None,
        dead_letter: DeadLetterConfig | None = None,
        label_rule: LabelRule | None = None,
        *,
        pin_memory: bool = False,
        yield_empty: bool = False,
        idle_timeout_s: float | None = None,
        client_id: str = "streamtrain",
        share: Share = EVERYTHING,
        markers: str | None = None,
    ) -> None:
        super().__init__()
        self.kafka = kafka
        self.data = data
        self.ring_config = ring or RingConfig()
        self.dead_letter_config = dead_letter or DeadLetterConfig()
        self.label_rule = label_rule or LabelRule()
        self.pin_memory = pin_memory
        self.yield_empty = yield_empty
        self.idle_timeout_s = idle_timeout_s
        self.client_id = client_id
        self.share = share  # this rank's partitions, when training on several (streams/split.py)
        self.markers = markers  # where decoder-crash markers are kept (streams/quarantine.py); None: not kept
        # data.labels: the consumer reads the label topic too, its partitions paired with the feature topic's
        labels = getattr(data, "labels", None)
        self.joined = bool(labels is not None and labels.enabled)
        self.source_kafka = dataclasses.replace(kafka, topics=(*kafka.topics, labels.topic)) if self.joined else kafka
        if self.joined:
            pair_topics(labels.topic, kafka.topics[0])
        self.offsets = OffsetTracker()  # read (here), trained and durable (the daemon's trainer), committed
        self.ring: SlotConsumer | None = None
        self.source: KafkaSource | SourceMirror | MultiMirror | None = None
        self.ingest: IngestHandle | None = None
        self._current: Batch | None = None  # the batch handed out last; its slot is released on the next
        self._copying: deque[Batch] = deque()  # released, but an asynchronous copy out of the slot may still run
        self._stats = IngestStats()  # cumulative over restarts of the stream
        self._dlq: DeadLetterQueue | None = None
        self._dl_counts = [0, 0, 0, 0]  # process mode: DeadLetterQueue.counts(), over the dataset's life

    @classmethod
    def from_dict(cls, raw: dict[str, Any], **kwargs: Any) -> KafkaIterableDataset:
        """Build from YAML-shaped sections ``kafka``, ``data``, ``ring``, ``dead_letter`` (and ``task``, ``num_classes``)."""
        raw = dict(raw)
        rule = LabelRule(raw.pop("task", "regression"), raw.pop("num_classes", 0))
        unknown = set(raw) - {"kafka", "data", "ring", "dead_letter"}
        if unknown:
            raise StreamtrainError(f"unknown section(s) {sorted(unknown)}; expected kafka, data, ring, dead_letter, task, num_classes")
        return cls(
            parse(KafkaConfig, raw.get("kafka"), "kafka"),
            parse(DataConfig, raw.get("data"), "data"),
            parse(RingConfig, raw.get("ring"), "ring"),
            parse(DeadLetterConfig, raw.get("dead_letter"), "dead_letter"),
            rule,
            **kwargs,
        )

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        """Positions of every batch yielded so far: ``{"positions": [[topic, partition, offset, rows], ...]}``."""
        return self.offsets.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ingest is not None:
            raise StreamtrainError("load_state_dict() must be called before iterating the dataset")
        self.offsets.load_state_dict(state)

    @property
    def positions(self) -> dict[TP, Position]:
        """Where every batch yielded so far brings each partition (``offsets.read``)."""
        return self.offsets.read

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the ingest process or thread (iterating does this; the daemon calls it to start early)."""
        if self.ingest is not None:
            return
        if get_worker_info() is not None:  # any worker: even one keeps the positions away from the main process
            raise StreamtrainError(
                "KafkaIterableDataset reads every partition in one process: use DataLoader(num_workers=0); "
                "it already prefetches in the background, and in a worker process its positions (state_dict, "
                "commit) would never reach the main one"
            )
        rc = self.ring_config
        pin = self.pin_memory and torch.cuda.is_available()
        if rc.ingest == "process":
            workers = rc.ingest_workers or default_workers()

            def ring(slots: int) -> SharedRing:
                return SharedRing(slots, rc.batch_size, self.data.width, pin_memory=pin, fields=len(self.data.categorical))

            def worker(ring: SharedRing, share: Share = self.share, lock: threading.Lock | None = None) -> IngestProcess:
                positions = dict(self.offsets.read)
                args = (self.source_kafka, self.data, rc, self.dead_letter_config, self.label_rule, ring, positions, self._stats)
                return IngestProcess(
                    *args, self._dl_counts, self.client_id, share=share, lock=lock, markers=self.markers, done=self._done()
                )

            if workers == 1:
                self.ring = ring(rc.slots)
                self.ingest = worker(self.ring)
                self.source = self.ingest.source
            else:  # each worker a share of the partitions and of the slots
                self.ring, self.ingest, self.source = build_workers(workers, lambda: ring(max(2, rc.slots // workers)), worker, self.share)
            self.ingest.start()
            return
        self.ring = Ring(rc.slots, rc.batch_size, self.data.width, pin_memory=pin, fields=len(self.data.categorical))
        self.source = KafkaSource(self.source_kafka, self.client_id, self.share)
        if self._dlq is None:  # one for the dataset's life, so its counters survive restarts
            self._dlq = DeadLetterQueue(self.kafka, self.dead_letter_config)
        dlq = self._dlq
        dlq.stop = threading.Event()
        self.ingest = Ingest.from_config(
            self.source,
            dlq,
            self.ring,
            self.source_kafka,
            self.data,
            rc,
            self.label_rule,
            dict(self.offsets.read),
            self._stats,
            self.markers,
            self._done(),
        )
        self.ingest.start()

    def close(self) -> None:
        """Stop the ingest thread and close the consumer (and the dead-letter producer)."""
        if self.ingest is None:
            return
        self._give_back_copied(wait=True)
        self.ingest.close()
        self.ring.close()
        self.ingest = None  # iterating again starts over from offsets.read

    def __iter__(self) -> Iterator[Batch]:
        self.start()
        try:
            while True:
                batch = self.next_batch(self.idle_timeout_s)
                if batch is None:
                    return
                yield batch
        finally:
            self.close()

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """The next batch (the previous one's slot is released); None after ``timeout`` s idle.

        Raises the ingest thread's error if it failed (e.g. dead-letter topic unwritable
        with ``on_failure=stop``).
        """
        self.start()  # no-op once started; without it a first next_batch() would find no ring
        self.release()
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while True:
            wait = min(0.1, max(0.0, deadline - time.monotonic()))
            try:
                batch = self.ring.get(0.0) if self._copying else None
                if batch is None:
                    self._give_back_copied(wait=True)  # about to wait for the producer: it may need those slots
                    batch = self.ring.get(wait)
            except RingClosed:
                if self.ring.error is not None:
                    raise self.ring.error from None
                return None
            if batch is not None:
                self._current = batch
                self.offsets.note_read(batch.positions)
                if len(batch) or self.yield_empty:
                    return batch
                self.release()
                continue
            if time.monotonic() >= deadline:
                return None

    def release(self) -> None:
        """Give the current batch's slot back to the ring (done automatically on the next batch).

        A slot with an asynchronous copy out of it still running (``batch.copy_done`` not
        yet completed) goes back once the copy is done: when a later release finds it
        done, or, at the latest, before the dataset waits for the producer.  Slots go
        back in the order they came (the shared ring counts them, it does not name them).
        """
        batch = self._current
        if batch is None:
            return
        self._current = None
        if batch.copy_done is None and not self._copying:
            self.ring.release(batch.slot)
            return
        self._copying.append(batch)
        self._give_back_copied(wait=False)

    def _give_back_copied(self, wait: bool) -> None:
        """Give back, oldest first, the slots whose copies are done; ``wait``: wait for every copy first."""
        copying = self._copying
        while copying:
            done = copying[0].copy_done
            if done is not None and not done.query():
                if not wait:
                    return
                done.synchronize()
            self.ring.release(copying.popleft().slot)

    def _done(self) -> dict[TP, Any] | None:
        """data.labels: the done offsets past the positions reading starts from (the snapshot's, or the trained ones)."""
        return self.offsets.done_offsets() if self.joined else None

    def restart(self, positions: dict[TP, Position]) -> None:
        """Read again from ``positions`` (a roll-back): batches in the ring are dropped."""
        self.release()
        self.close()
        self.offsets.read = dict(positions)
        self.start()

    def commit(self, positions: dict[TP, Position] | None = None) -> None:
        """Commit positions (default: every batch yielded so far) to the consumer group."""
        changed = self.offsets.to_commit(dict(self.offsets.read if positions is None else positions))
        if changed and self.source is not None:
            self.source.commit(changed)
            self.offsets.note_committed(changed)

    def pump(self) -> None:
        """Take in the ingest process's latest status (metrics and health call this before reading)."""
        if self.ingest is not None:
            self.ingest.pump()

    @property
    def dead_letter_counts(self) -> tuple[int, int, int, int]:
        """:meth:`DeadLetterQueue.counts` (written, failed attempts, cut to fit, refused for good), over the dataset's life."""
        if self._dlq is not None:
            return self._dlq.counts()
        return tuple(self._dl_counts)

    @property
    def connected(self) -> bool:
        """The consumer is open and has its assignment (False while a restart is under way)."""
        ingest = self.ingest
        return ingest is not None and ingest.opened.is_set()

    @property
    def reading(self) -> bool:
        """The ingest thread runs (False once it stopped on an error)."""
        ingest = self.ingest
        return ingest is not None and ingest.alive

    @property
    def stats(self) -> IngestStats:
        return self._stats
