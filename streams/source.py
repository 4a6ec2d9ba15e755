"""The Kafka side of the data path: one consumer that reads every partition of its topics.

The daemon owns partition assignment (``assign()``, like Flink's Kafka source) rather
than joining a consumer group: where to start is decided by the snapshot, not by the
group.  The group only mirrors the trained offsets for lag monitoring, committed
after a snapshot is durable.

Start position of a partition, in order: the snapshot's position, else the group's
committed offset, else ``auto.offset.reset``.  Partitions that appear later (new
partitions, or a configured topic created after start) are found by a metadata
refresh and read from their beginning.

Only the ingest thread calls :meth:`consume`, :meth:`pause`, :meth:`resume` and
:meth:`apply_new_partitions`; :meth:`refresh`, :meth:`commit` and :meth:`high_watermarks`
are safe from other threads.  confluent-kafka serializes calls on one ``Consumer``
across threads, and the ingest thread is nearly always inside ``consume()``: a call
from another thread on that consumer could wait indefinitely.  So other threads use
a second consumer of their own (no assignment, never fetches).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from streamtrain.streams.config import KafkaConfig
from streamtrain.streams.errors import ConfigError, KafkaSourceError
from streamtrain.streams.slots import Position
from streamtrain.streams.slots import TopicPartition as TP
from streamtrain.streams.split import EVERYTHING, Share

log = logging.getLogger("streamtrain.source")

# librdkafka errors that mean the broker cannot be reached right now
_UNREACHABLE = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE, KafkaError._TIMED_OUT}


def consumer_settings(kafka: KafkaConfig, client_id: str = "streamtrain") -> dict[str, Any]:
    """librdkafka settings: the typed core, sensible defaults, then the pass-through."""
    settings: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "group.id": kafka.group_id,
        "client.id": client_id,
        # Start offsets are resolved by the daemon (KafkaSource._assign); this is only librdkafka's
        # own, silent, reset of a fetch out of range.  The ingest checks positions against the
        # partitions' offsets itself (Ingest._check_ranges) and acts per kafka.on_out_of_range.
        "auto.offset.reset": kafka.auto_offset_reset,
        "queued.max.messages.kbytes": kafka.queued_max_kbytes,
        # librdkafka stops fetching for fetch.queue.backoff.ms (1 s by default) whenever its
        # queue passes the threshold; 10 ms keeps a fast stream flowing (~9x measured).
        "fetch.queue.backoff.ms": 10,
        # How long a broker may hold a fetch that finds nothing.  Kafka answers as soon as
        # records arrive, so this only paces empty fetches there; a broker that polls instead
        # (Tansu sleeps half the remaining wait, then looks again) adds up to half of it to
        # every record's freshness: at 50 k/s, p99 253 ms at 300, 188 ms at 200 (librdkafka's
        # 500: ~320 ms; bench.freshness).  Much shorter starves long topics on such a broker
        # (bench.fetchwait: 0 msg/s at 50 ms).
        "fetch.wait.max.ms": 200,
        "allow.auto.create.topics": False,
    }
    # One fetch response may be as large as fetch.max.bytes (50 MiB by default) and is held
    # whole: keep it within the configured queue bound, so that bound is the memory bound.
    fetch_max = max(1 << 20, min(50 << 20, kafka.queued_max_kbytes * 1024))
    settings["fetch.max.bytes"] = fetch_max  # receive.message.max.bytes stays a loose sanity cap (some brokers overshoot)
    settings.update(kafka.settings)
    settings.update({"enable.auto.commit": False, "enable.auto.offset.store": False})
    return settings


# kafka.settings keys that only a consumer knows (other clients would warn about them)
CONSUMER_ONLY = (
    "fetch.",
    "queued.",
    "session.",
    "heartbeat.",
    "max.poll",
    "partition.assignment",
    "group.",
    "isolation.",
    "check.crcs",
    "auto.",
    "enable.auto.",
    "enable.partition.eof",
    "allow.auto.create.topics",
)


def client_settings(kafka: KafkaConfig, client_id: str) -> dict[str, Any]:
    """Settings for a client other than the consumer: the broker, security and the rest of ``kafka.settings``."""
    settings: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap_servers, "client.id": client_id}
    settings.update({k: v for k, v in kafka.settings.items() if not k.startswith(CONSUMER_ONLY)})
    return settings


def make_client(cls: type, settings: dict[str, Any], key: str, **kwargs: Any) -> Any:
    """A librdkafka client; settings it refuses (bad value, unknown key, unreadable key file) are a config error."""
    try:
        return cls(settings, **kwargs)
    except KafkaException as exc:
        err = exc.args[0]
        if err.code() == KafkaError._INVALID_ARG:
            raise ConfigError([f"{key}: librdkafka refused the settings: {err.str().splitlines()[0]}"]) from exc
        raise


class KafkaSource:
    """Reads every partition of ``kafka.topics``; opens lazily (no network in ``__init__``)."""

    def __init__(self, kafka: KafkaConfig, client_id: str = "streamtrain", share: Share = EVERYTHING) -> None:
        self.kafka = kafka
        self.client_id = client_id
        self.share = Share(*share)  # which partitions this reader reads (streams/split.py)
        self.consumer: Consumer | None = None
        self._side: Consumer | None = None  # for the calls made from other threads
        self._admin: AdminClient | None = None  # lists watermarks for the metadata thread
        self.assigned: dict[TP, int] = {}  # partition -> the offset reading started at
        self.paused = False
        self.pauses = 0
        self.held: str | None = None  # a topic paused apart (data.labels.max_pending: the feature topic)
        self.partition_counts: dict[str, int] = {}  # per topic, as the last metadata said
        self._pending_new: list[TopicPartition] = []
        self._lock = threading.Lock()
        self._listed_hwm: dict[TP, int] = {}
        self._fetched_hwm: dict[TP, int] = {}  # cached fetch watermarks, noted by the ingest thread
        self._hwm_noted = 0.0
        self._last_ok = 0.0  # monotonic time of the last successful broker round trip
        self._last_error: str | None = None
        self.errors: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def open(self, positions: dict[TP, Position] | None = None, timeout: float = 30.0) -> dict[TP, str]:
        """Create the consumer and assign every known partition; returns where each started from."""
        settings = consumer_settings(self.kafka, self.client_id)
        self.consumer = make_client(Consumer, settings, "kafka.settings", error_cb=self._on_error, logger=log)
        self._side = Consumer(settings, logger=log)
        partitions = self._discover(self.consumer, timeout)
        self._note_ok()
        origins = self._assign(partitions, positions or {}, timeout, new=False)
        missing = [t for t in self.kafka.topics if not any(tp[0] == t for tp in partitions)]
        if missing and self.share.everything:  # a reader of several may own no partition of a topic that exists
            log.warning("topic(s) %s do not exist yet; they will be read as soon as they appear", ", ".join(missing))
        return origins

    def close(self) -> None:
        consumers, self.consumer, self._side = (self.consumer, self._side), None, None
        self._admin = None
        for consumer in consumers:
            if consumer is not None:
                consumer.close()

    # ------------------------------------------------------------------ reading
    def consume(self, max_messages: int, timeout: float) -> list:
        try:
            msgs = self.consumer.consume(num_messages=max_messages, timeout=timeout)
        except KafkaException as exc:
            err = exc.args[0]
            if err.fatal():
                raise KafkaSourceError(f"fatal Kafka consumer error: {err.str()} (code {err.name()})") from exc
            self._on_error(err)
            return []
        if time.monotonic() - self._hwm_noted >= 1.0:
            self._note_fetched_watermarks()
        return msgs

    def pause(self) -> None:
        if not self.paused and self.assigned:
            self.consumer.pause([TopicPartition(t, p) for t, p in self.assigned])
            self.paused = True
            self.pauses += 1

    def resume(self) -> None:
        if self.paused:
            self.consumer.resume([TopicPartition(t, p) for t, p in self.assigned if t != self.held])
            self.paused = False

    def hold(self, topic: str) -> None:
        """Stop fetching ``topic`` alone (the others are read on) until :meth:`release`."""
        self.held = topic
        if self.consumer is not None:
            self.consumer.pause([TopicPartition(t, p) for t, p in self.assigned if t == topic])
            self.pauses += 1

    def release(self) -> None:
        topic, self.held = self.held, None
        if self.consumer is not None and not self.paused:
            self.consumer.resume([TopicPartition(t, p) for t, p in self.assigned if t == topic])

    def message_error(self, err: KafkaError) -> None:
        """A message-level error from consume(): counted and logged; fatal ones raise."""
        if err.fatal():
            raise KafkaSourceError(f"fatal Kafka error: {err.str()} (code {err.name()})")
        if err.code() == KafkaError._PARTITION_EOF:
            return
        self._on_error(err)

    # ------------------------------------------------------------------ partitions
    def refresh(self, timeout: float = 5.0) -> None:
        """Look up metadata (another thread may call this): finds new partitions, proves the broker is up."""
        side = self._side
        if side is None:
            return
        try:
            partitions = self._discover(side, timeout)
        except KafkaSourceError as exc:
            self._last_error = str(exc)
            return
        self._note_ok()
        with self._lock:
            known = set(self.assigned) | {(tp.topic, tp.partition) for tp in self._pending_new}
            for tp in partitions:
                if tp not in known:
                    self._pending_new.append(TopicPartition(tp[0], tp[1]))
        self._list_watermarks(partitions, timeout)

    def apply_new_partitions(self, positions: dict[TP, Position]) -> list[TP]:
        """Assign partitions found by :meth:`refresh` (ingest thread only)."""
        with self._lock:
            new, self._pending_new = self._pending_new, []
        if not new:
            return []
        tps = [(tp.topic, tp.partition) for tp in new]
        self._assign(tps, positions, timeout=10.0, new=True)
        return tps

    def _discover(self, consumer: Consumer, timeout: float) -> list[TP]:
        found: list[TP] = []
        for topic in self.kafka.topics:
            try:
                md = consumer.list_topics(topic, timeout=timeout)
            except KafkaException as exc:
                raise KafkaSourceError(
                    f"cannot reach Kafka at {self.kafka.bootstrap_servers} to read metadata of topic {topic!r}: {exc.args[0].str()}; "
                    "check kafka.bootstrap_servers and that the broker is up"
                ) from exc
            tmd = md.topics.get(topic)
            if tmd is None or tmd.error is not None:
                continue
            found.extend((topic, p) for p in sorted(tmd.partitions))
            self.partition_counts[topic] = len(tmd.partitions)
        return found if self.share.everything else [tp for tp in found if self.share.owns(tp)]

    def _assign(self, partitions: list[TP], positions: dict[TP, Position], timeout: float, new: bool) -> dict[TP, str]:
        """Assign with start offsets: snapshot position, else committed, else reset (or beginning if new)."""
        if not partitions:
            return {}
        origins: dict[TP, str] = {}
        start: dict[TP, int] = {}
        need_committed = [tp for tp in partitions if tp not in positions]
        committed: dict[TP, int] = {}
        if need_committed:
            try:
                got = self.consumer.committed([TopicPartition(t, p) for t, p in need_committed], timeout=timeout)
                committed = {(tp.topic, tp.partition): tp.offset for tp in got if tp.error is None and tp.offset >= 0}
            except KafkaException as exc:
                raise KafkaSourceError(f"cannot read the committed offsets of group {self.kafka.group_id!r}: {exc.args[0].str()}") from exc
        for tp in partitions:
            if tp in positions:
                start[tp], origins[tp] = positions[tp][0], "snapshot"
            elif tp in committed:
                start[tp], origins[tp] = committed[tp], "committed"
            elif new:
                start[tp], origins[tp] = self._resolve(tp, OFFSET_BEGINNING, timeout), "new partition"
            else:
                reset = OFFSET_BEGINNING if self.kafka.auto_offset_reset == "earliest" else OFFSET_END
                start[tp], origins[tp] = self._resolve(tp, reset, timeout), f"auto.offset.reset={self.kafka.auto_offset_reset}"
        tps = [TopicPartition(t, p, start[(t, p)]) for t, p in partitions]
        if new:
            self.consumer.incremental_assign(tps)
        else:
            self.consumer.assign(tps)
        if self.paused:
            self.consumer.pause([TopicPartition(t, p) for t, p in partitions])
        self.assigned.update(start)
        for tp in partitions:
            where = f"offset {start[tp]}" if start[tp] >= 0 else "the " + ("beginning" if start[tp] == OFFSET_BEGINNING else "end")
            log.info("reading %s[%d] from %s (%s)", tp[0], tp[1], where, origins[tp])
        return origins

    def _resolve(self, tp: TP, logical: int, timeout: float) -> int:
        """The offset "the beginning" or "the end" of ``tp`` is now, so that it can be a trained position.

        A logical start offset would be resolved again after a restart: "latest" then skips
        what was produced meanwhile.  If the broker cannot say, the logical offset is kept.
        """
        try:
            low, high = self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=min(timeout, 10.0), cached=False)
        except (KafkaException, RuntimeError) as exc:
            log.warning(
                "could not look up the offsets of %s[%d] (%s): starting from the %s as it is when reading starts",
                tp[0],
                tp[1],
                exc,
                "beginning" if logical == OFFSET_BEGINNING else "end",
            )
            return logical
        offset = low if logical == OFFSET_BEGINNING else high
        return offset if offset >= 0 else logical

    # ------------------------------------------------------------------ offsets and lag
    def open_for_commits(self) -> None:
        """A consumer for :meth:`commit` only (no assignment), for a process that does not read."""
        if self._side is None:
            self._side = make_client(Consumer, consumer_settings(self.kafka, self.client_id), "kafka.settings", logger=log)

    def commit(self, positions: dict[TP, Position], timeout: float = 10.0) -> None:
        """Mirror trained positions into the consumer group (after a snapshot is durable)."""
        if not positions:
            return
        tps = [TopicPartition(t, p, pos[0]) for (t, p), pos in positions.items()]
        # once closed (e.g. a dataset's loop has ended), commit through a short-lived consumer rather than drop it
        side = self._side
        consumer = side or Consumer(consumer_settings(self.kafka, self.client_id), logger=log)
        try:
            result = consumer.commit(offsets=tps, asynchronous=False) or []
        except KafkaException as exc:
            raise KafkaSourceError(f"could not commit offsets to group {self.kafka.group_id!r}: {exc.args[0].str()}") from exc
        else:  # librdkafka raises the first error; check each partition all the same
            failed = [f"{tp.topic}[{tp.partition}]: {tp.error.str()}" for tp in result if tp.error is not None]
            if failed:
                raise KafkaSourceError(f"could not commit offsets to group {self.kafka.group_id!r}: {'; '.join(failed[:5])}")
        finally:
            if consumer is not side:
                consumer.close()

    def high_watermarks(self) -> dict[TP, int]:
        """Best known end offset per assigned partition (thread-safe, no network).

        The fetch responses' cached watermark (noted by the ingest thread about once a
        second) is fresh while fetching; the listed one (from :meth:`refresh`) covers
        paused partitions.  The larger is taken.
        """
        out: dict[TP, int] = {}
        if self.consumer is None:
            return out
        for tp in list(self.assigned):
            hi = max(self._fetched_hwm.get(tp, -1), self._listed_hwm.get(tp, -1))
            if hi >= 0:
                out[tp] = hi
        return out

    def note_watermarks(self, partitions: list[TP]) -> None:
        """Ingest thread: the ends of ``partitions`` as the fetches that brought their newest records saw them.

        The join calls it for the partitions just read before it asks whether a side is caught
        up: the ends noted once a second (or listed) can be older than the records just read --
        a partition empty at the last note, or Tansu's listing (1 for any non-empty partition)
        -- and a side taken for caught up while it is not expires records whose labels are
        merely unread.
        """
        self._note_fetched_watermarks(partitions)

    def _note_fetched_watermarks(self, partitions: list[TP] | None = None) -> None:
        """Ingest thread: keep the cached fetch watermarks for :meth:`high_watermarks` (local calls)."""
        if partitions is None:
            self._hwm_noted = time.monotonic()
        for t, p in list(self.assigned) if partitions is None else partitions:
            try:
                _, hi = self.consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            except (KafkaException, RuntimeError):
                continue
            if hi >= 0:
                self._fetched_hwm[(t, p)] = hi

    def cached_watermarks(self, tp: TP) -> tuple[int, int]:
        """(low, high) from the last fetch responses (ingest thread, no network); -1 where unknown."""
        try:
            low, high = self.consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
        except (KafkaException, RuntimeError):
            return -1, -1
        return (low if low >= 0 else -1), (high if high >= 0 else -1)

    def seek(self, tp: TP, offset: int) -> None:
        self.consumer.seek(TopicPartition(tp[0], tp[1], offset))

    def _list_watermarks(self, partitions: list[TP], timeout: float) -> None:
        """End offsets of ``partitions``: one ListOffsets request per leader; a partition that fails leaves the rest listed."""
        if not partitions:
            return
        if self._admin is None:
            self._admin = AdminClient(client_settings(self.kafka, f"{self.client_id}-offsets"), logger=log)
        committed = self.kafka.settings.get("isolation.level", "read_committed") == "read_committed"
        level = IsolationLevel.READ_COMMITTED if committed else IsolationLevel.READ_UNCOMMITTED
        try:
            futures = self._admin.list_offsets(
                {TopicPartition(t, p): OffsetSpec.latest() for t, p in partitions}, isolation_level=level, request_timeout=timeout
            )
        except (KafkaException, RuntimeError):
            return
        deadline = time.monotonic() + timeout
        for tp, future in futures.items():
            try:
                hi = future.result(timeout=max(0.0, deadline - time.monotonic())).offset
            except Exception:  # this partition's leader did not answer in time: keep its last value
                continue
            if hi >= 0:
                self._listed_hwm[(tp.topic, tp.partition)] = hi

    # ------------------------------------------------------------------ health
    def reachable(self, within: float) -> bool:
        """Whether the broker answered a metadata or fetch request in the last ``within`` seconds."""
        return time.monotonic() - self._last_ok < within

    def note_fetched(self) -> None:
        self._last_ok = time.monotonic()

    def _note_ok(self) -> None:
        self._last_ok = time.monotonic()
        if self._last_error is not None:
            log.info("Kafka is reachable again")
            self._last_error = None

    def _on_error(self, err: KafkaError) -> None:
        name = err.name()
        self.errors[name] = self.errors.get(name, 0) + 1
        if err.fatal():
            log.error("fatal Kafka error: %s", err.str())
        elif err.code() in _UNREACHABLE:
            if self._last_error is None:
                log.warning("Kafka unreachable: %s", err.str())
            self._last_error = err.str()
        else:
            log.warning("Kafka error: %s", err.str())


__all__ = ["OFFSET_INVALID", "KafkaSource", "consumer_settings", "make_client"]
