"""The ingest loop: consume, decode, dead-letter the rejects, fill the ring.

One thread runs the whole producer side of the ring (in the ingest process, or in the
daemon with ``ring.ingest: thread``).  A consumed batch is decoded at once; its rows are
copied into ring slots by :class:`~streamtrain.streams.filler.SlotFiller`, each slot
carrying the positions its rows bring their partitions to.  After a restart the rows
of a split Arrow record that were already trained are skipped, so nothing trains twice.
A record that produced no rows (rejected) counts as done only after its
dead-letter copy is acknowledged: its batch, and every batch consumed after it, waits
in a short queue (``MAX_WAITING`` batches) until the broker's ack, while the loop goes
on consuming and decoding -- positions reach the ring in consume order, only past
records that are trained or dead-lettered.

When the ring is full the consumer is paused (librdkafka stops fetching) and resumed
when a slot frees: memory stays bounded by the ring, the decoded batch in hand and
librdkafka's queue bound.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

import numpy as np
from confluent_kafka import Message

from streamtrain.streams.config import DataConfig, KafkaConfig, RingConfig
from streamtrain.streams.deadletter import DeadLetter, DeadLetterQueue, Ticket
from streamtrain.streams.decode import Decoder, LabelRule, Reject, make_decoder
from streamtrain.streams.errors import ConfigError, DeadLetterError, KafkaSourceError
from streamtrain.streams.features import FeatureSpec, is_missing
from streamtrain.streams.filler import Pending, SlotFiller
from streamtrain.streams.join import Joiner, JoinStats
from streamtrain.streams.quarantine import Quarantine
from streamtrain.streams.slots import Position, RingClosed, SlotProducer
from streamtrain.streams.slots import TopicPartition as TP
from streamtrain.streams.source import KafkaSource
from streamtrain.streams.split import pair_topics

log = logging.getLogger("streamtrain.ingest")

# Decoded batches that may wait for their rejects' dead-letter ack before the loop stops
# consuming: enough to cover the broker's round trip at full speed, few enough to bound memory.
MAX_WAITING = 4


@dataclass
class IngestStats:
    """Counters kept by the ingest thread, read at scrape time (plain ints: no locks on the hot path)."""

    messages: int = 0
    bytes: int = 0
    rows: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> records (rows for Arrow)
    batches: int = 0
    decode_seconds: float = 0.0
    consume_calls: int = 0
    consumer_errors: int = 0
    out_of_range: dict[str, int] = field(default_factory=dict)  # "topic|partition" -> times a position was out of range
    missing: dict[str, int] = field(default_factory=dict)  # feature -> numbers read as missing (imputed by the trainer)
    skipped_out_of_range: dict[str, int] = field(default_factory=dict)  # "topic|partition" -> records known to be skipped
    join: JoinStats | None = None  # data.labels: the join's counters


class Ingest:
    """Runs the source -> decoder -> dead-letter -> ring loop on its own thread."""

    @classmethod
    def from_config(
        cls,
        source: KafkaSource,
        dead_letter: DeadLetterQueue,
        ring: SlotProducer,
        kafka: KafkaConfig,
        data: DataConfig,
        ring_config: RingConfig,
        label_rule: LabelRule,
        positions: dict[TP, Position] | None = None,
        stats: IngestStats | None = None,
        markers: str | Path | None = None,
        done: dict[TP, np.ndarray] | None = None,
    ) -> Ingest:
        """The ingest loop as the configuration sets it up (the same in a thread and in the ingest process).

        ``markers``: the directory of the decoder-crash markers (``streams/quarantine.py``); None: none kept.
        ``done``: with ``data.labels``, the offsets past each position that a snapshot says are done.
        """
        thread = ring_config.ingest == "thread"
        lt = data.labels
        side = "features" if lt.enabled else ""
        quarantine = Quarantine(
            make_decoder(data, label_rule, side), data, label_rule, markers, source.share, trust_own_marker=thread, side=side
        )
        ingest = cls(
            source,
            quarantine,
            dead_letter,
            ring,
            max_batch_wait_s=ring_config.max_batch_wait_ms / 1000.0,
            max_messages=kafka.consume_batch,
            consume_timeout_s=kafka.consume_timeout_ms / 1000.0,
            refresh_every_s=kafka.metadata_refresh_s,
            pause_after_s=ring_config.pause_after_ms / 1000.0,
            positions=positions,
            stats=stats,
            on_out_of_range=kafka.on_out_of_range,
        )
        if lt.enabled:
            pair_topics(lt.topic, kafka.topics[0])
            ingest.label_quarantine = Quarantine(
                make_decoder(data, label_rule, "labels"), data, label_rule, markers, source.share, trust_own_marker=thread, side="labels"
            )
            ingest.join = Joiner(lt, data.width, len(data.categorical), kafka.topics[0], lt.topic, ingest._tp_slot, done)
            ingest.stats.join = ingest.stats.join or ingest.join.stats
            ingest.join.stats = ingest.stats.join  # kept across stream restarts, like the rest of the stats
            spec = FeatureSpec((), (lt.key_field,), keys=1)
            ingest.missing_key = spec.missing_row(0)
            for tp, pos in ingest.start_positions.items():
                ingest.join.start(tp, pos[0])
        ingest.missing_names = tuple(data.features) if data.indicators else ()
        for name in ingest.missing_names:  # every imputed feature is on /metrics from the start, at 0
            ingest.stats.missing.setdefault(name, 0)
        return ingest

    def __init__(
        self,
        source: KafkaSource,
        decoder: Decoder | Quarantine,
        dead_letter: DeadLetterQueue,
        ring: SlotProducer,
        *,
        max_batch_wait_s: float,
        max_messages: int,
        consume_timeout_s: float,
        refresh_every_s: float,
        pause_after_s: float = 1.0,
        positions: dict[TP, Position] | None = None,
        stats: IngestStats | None = None,
        on_out_of_range: str = "earliest",
    ) -> None:
        self.source = source
        self._topics = tuple(source.kafka.topics)  # assigned, not subscribed: no message comes from another topic
        self.on_out_of_range = on_out_of_range
        # every decode goes through the quarantine: a record that crashes the decoder is rejected, not fatal
        self.quarantine = decoder if isinstance(decoder, Quarantine) else Quarantine(decoder, None, LabelRule())
        self.missing_names: tuple[str, ...] = ()  # the numeric features, when missing ones are counted (data.missing: impute)
        self.dead_letter = dead_letter
        self.ring = ring
        self.max_messages = max_messages
        # Rows to take per consume(): about a ring's worth.  An Arrow record holds many rows, and
        # decoding 2000 of them at once (2 M rows, ~0.5 s) let the ring run dry meanwhile.
        self.target_rows = ring.slots * ring.batch_size
        self._rows_per_msg = 1.0
        self.consume_timeout_s = consume_timeout_s
        self.refresh_every_s = refresh_every_s
        self.pause_after_s = pause_after_s
        self.start_positions = dict(positions or {})
        self.stats = stats if stats is not None else IngestStats()  # kept across stream restarts
        self.stop_event = dead_letter.stop
        self.opened = threading.Event()
        self.on_opened: Callable[[], None] = lambda: None  # called once the consumer is open, before any batch
        self.filler = SlotFiller(ring, max_batch_wait_s, self.start_positions, self.stats)
        # resume inside a record: skip the rows of it that were already trained
        self._skip = {tp: pos for tp, pos in self.start_positions.items() if pos[1] > 0}
        self._pending: Pending | None = None  # the batch being placed
        self._waiting: deque[Pending] = deque()  # decoded batches behind it, in consume order
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._tp_index: dict[TP, int] = {}
        self._next_range_check = 0.0
        self._tps: list[TP] = []
        self.join: Joiner | None = None  # data.labels: the join between the decoder and the ring
        self.label_quarantine: Quarantine | None = None
        self.missing_key = 0
        self._next_tick = 0.0
        self._sent_bases: dict[TP, int] = {}

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="streamtrain-ingest", daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self._watch, name="streamtrain-metadata", daemon=True)
        self._watcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._watcher is not None:
            self._watcher.join(timeout)

    def close(self) -> None:
        """Stop the threads, then flush the dead-letter producer and close the consumer."""
        self.stop()
        self.dead_letter.close()
        self.source.close()
        self.quarantine.close()

    def pump(self) -> None:
        """Nothing to take in: a thread shares its state (the ingest process's handle reads its status)."""

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ threads
    def _run(self) -> None:
        try:
            self._open()
            while not self.stop_event.is_set():
                self._step()
        except RingClosed:
            pass
        except DeadLetterError as exc:
            # Asked to stop while records waited for the dead-letter topic: they were not
            # counted as handled and are read again after a restart, so that is a clean stop.
            if not self.stop_event.is_set():
                log.error("ingest stopped: %s", exc)
                self.ring.close(exc)
        except BaseException as exc:  # surfaced to the trainer through the ring
            log.error("ingest stopped: %s", exc)
            self.ring.close(exc)
        finally:
            self.filler.give_back_unused()

    def _open(self) -> None:
        delay = 0.5
        while not self.stop_event.is_set():
            try:
                self.source.open(self.start_positions)
                if self.join is not None:
                    self._check_pairs()
                self._note_starts(list(self.source.assigned))
                self.opened.set()
                self.on_opened()
                return
            except KafkaSourceError as exc:
                self.source.close()
                log.warning("%s; retrying in %.0f s", exc, delay)
                if self.stop_event.wait(delay):
                    return
                delay = min(delay * 2, 10.0)

    def _check_pairs(self) -> None:
        """Partition p of the feature topic pairs with partition p of the label topic: they need as many partitions."""
        counts = self.source.partition_counts
        f, lt = self.join.ftopic, self.join.ltopic
        if f in counts and lt in counts and counts[f] != counts[lt]:
            raise ConfigError(
                [
                    f"data.labels.topic: {lt!r} has {counts[lt]} partition(s) and the feature topic {f!r} {counts[f]}; partition p "
                    "of one joins partition p of the other, so both need as many (and the same key on both sides)"
                ]
            )

    def _watch(self) -> None:
        """Metadata refresh off the ingest thread: new partitions, broker reachability, listed watermarks."""
        while not self.stop_event.wait(self.refresh_every_s):
            if self.opened.is_set():
                self.source.refresh(timeout=min(5.0, self.refresh_every_s))

    # ------------------------------------------------------------------ one turn of the loop
    def _step(self) -> None:
        if self._pending is not None or self._waiting:
            state = self._advance()
            if state == "dead_letter" and len(self._waiting) >= MAX_WAITING:
                self.dead_letter.wait(self._waiting[0].ticket, 0.05)
                self.filler.flush_if_due()
                return
            if state == "ring_full":
                # Ring full.  Pausing purges librdkafka's prefetched records (a refetch on
                # resume: 830k -> 155k msg/s measured when done often), so only a trainer that
                # has freed no slot for pause_after_ms (stalled, or minutes per step) pauses
                # fetching; otherwise librdkafka's queue bound caps what waits.
                if time.monotonic() - self.filler.last_slot_at >= self.pause_after_s:
                    self.source.pause()
                self.ring.wait_free(0.05)
                self.filler.flush_if_due()
                return
        self.filler.flush_if_due()
        if self.join is not None and time.monotonic() >= self._next_tick:
            self._tick()
        if self.source.paused:
            self.source.resume()
        new = self.source.apply_new_partitions(self.start_positions)
        if new:
            log.info("picked up %d new partition(s): %s", len(new), ", ".join(f"{t}[{p}]" for t, p in new))
            self._note_starts(new)
        timeout = self.consume_timeout_s
        if self.filler.open:
            timeout = max(0.0, min(timeout, self.filler.deadline - time.monotonic()))
        if self._waiting:  # back soon to place it once its ack is in
            timeout = min(timeout, 0.005)
        msgs = self.source.consume(self._consume_size(), timeout)
        self.stats.consume_calls += 1
        if time.monotonic() >= self._next_range_check and not self._waiting:
            self._check_ranges()  # against positions of everything consumed: nothing waits
        if msgs:
            self._ingest(msgs)

    def _advance(self) -> str:
        """Place queued batches in order: "placed" (all), "ring_full", or "dead_letter" (the head awaits its ack)."""
        while True:
            if self._pending is None:
                if not self._waiting:
                    return "placed"
                ticket = self._waiting[0].ticket
                if ticket is not None and not ticket.done:
                    self.dead_letter.service(0)
                    if not ticket.done:
                        return "dead_letter"
                self._pending = self._waiting.popleft()
            if not self.filler.place(self._pending):
                return "ring_full"
            self._pending = None

    def _consume_size(self) -> int:
        """Messages to ask for: ``kafka.consume_batch``, fewer when each record holds many rows."""
        return max(1, min(self.max_messages, int(self.target_rows / max(1.0, self._rows_per_msg))))

    def _ingest(self, msgs: list) -> None:
        good = msgs
        if any(map(Message.error, msgs)):  # rare: count and report each error, keep the rest
            good = []
            for m in msgs:
                err = m.error()
                if err is not None:
                    self.stats.consumer_errors += 1
                    self.source.message_error(err)
                else:
                    good.append(m)
        if not good:
            return
        if self.join is not None:
            self._ingest_joined(good)
            return
        # one C-level pass per field, not a Python loop per message (docs/BENCHMARKS.md)
        values = list(map(Message.value, good))
        parts = self._partition_indices(good)
        offsets = np.fromiter(map(Message.offset, good), np.int64, len(good))
        stamps = np.fromiter(map(itemgetter(1), map(Message.timestamp, good)), np.float64, len(good))
        self.source.note_fetched()
        n = len(good)
        self.stats.messages += n
        part = np.asarray(parts, np.int32)
        offset = np.asarray(offsets, np.int64)
        t0 = time.perf_counter()
        decoded = self.quarantine.decode(values, part, offset, self._tps, lambda i: _where(good[i]))
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.bytes += decoded.nbytes
        if self.missing_names and decoded.x.size:
            self._count_missing(decoded.x)
        ts = np.asarray(stamps, np.float64) / 1000.0
        ts[ts <= 0] = np.nan
        x, y, ids, msg_of_row = decoded.x, decoded.y, decoded.ids, decoded.msg_index
        row_base = np.zeros(n, np.int64)
        if self._skip:
            x, y, ids, msg_of_row = self._skip_trained_rows(part, offset, x, y, ids, msg_of_row, row_base)
        ticket = self._reject(decoded.rejects, good) if decoded.rejects else None
        counts = np.bincount(msg_of_row, minlength=n) if len(msg_of_row) else np.zeros(n, np.int64)
        row_end = np.cumsum(counts)
        self.stats.rows += len(y)
        self._rows_per_msg = 0.8 * self._rows_per_msg + 0.2 * (len(y) / n)
        has_ts = not np.isnan(ts).all()
        self._waiting.append(
            Pending(x, y, ids, part, offset, ts, row_end - counts, row_end, row_base, msg_of_row, self._tps, has_ts, ticket)
        )
        self._advance()

    # ------------------------------------------------------------------ data.labels: the join
    def _ingest_joined(self, good: list) -> None:
        """Feature and label records decoded apart, handed to the join; what leaves it goes to the ring."""
        join = self.join
        values = list(map(Message.value, good))
        part = np.asarray(self._partition_indices(good), np.int32)
        offset = np.fromiter(map(Message.offset, good), np.int64, len(good))
        ts = np.fromiter(map(itemgetter(1), map(Message.timestamp, good)), np.float64, len(good)) / 1000.0
        ts[ts <= 0] = np.nan
        self.source.note_fetched()
        self.stats.messages += len(good)
        labels = np.asarray([tp[0] == join.ltopic for tp in self._tps], bool)[part]
        rejects: list = []
        t0 = time.perf_counter()
        for is_label, quarantine in ((False, self.quarantine), (True, self.label_quarantine)):
            idx = np.flatnonzero(labels == is_label)
            if not len(idx):
                continue
            sub = [values[i] for i in idx]
            decoded = quarantine.decode(sub, part[idx], offset[idx], self._tps, lambda i, idx=idx: _where(good[idx[i]]))
            self.stats.bytes += decoded.nbytes
            rejects.extend(dataclasses.replace(r, index=int(idx[r.index])) for r in decoded.rejects)
            keys = decoded.ids[:, -1]
            msg = idx[decoded.msg_index]
            keyless = keys == self.missing_key
            if keyless.any():
                what = "label" if is_label else "feature"
                why = f"the {what} record has no {join.cfg.key_field!r} to join on"
                rejects.extend(Reject(int(m), "missing_key", why) for m in msg[keyless])
                keep = ~keyless
                decoded.x, decoded.y, decoded.ids, keys, msg = decoded.x[keep], decoded.y[keep], decoded.ids[keep], keys[keep], msg[keep]
            if not is_label and self.missing_names and decoded.x.size:
                self._count_missing(decoded.x)
            self.stats.rows += len(msg)
            mp = part[msg]
            for i in np.unique(mp).tolist():
                rows = np.flatnonzero(mp == i)
                tp = self._tps[i]
                m = msg[rows]
                if is_label:
                    join.add_labels(tp[1], offset[m], ts[m], keys[rows], decoded.y[rows])
                else:
                    join.add_features(tp[1], offset[m], ts[m], keys[rows], decoded.x[rows], decoded.ids[rows, :-1])
        self.stats.decode_seconds += time.perf_counter() - t0
        read = np.unique(part).tolist()
        for i in read:
            join.note_read(self._tps[i], int(offset[part == i].max()) + 1)
        self.source.note_watermarks([self._tps[i] for i in read])  # the ends the caught-up test below compares with
        ticket = None
        if rejects:
            rejects.sort(key=lambda r: r.index)
            ticket = self._reject(rejects, good)
            for r in rejects:
                join.reject(self._tps[part[r.index]], int(offset[r.index]))
        self._tick(ticket)

    def _tick(self, ticket: Ticket | None = None) -> None:
        """Let the join expire what is due; queue what left it (rows, done offsets, positions) behind the batches waiting."""
        join = self.join
        self._next_tick = time.monotonic() + 0.02
        join.tick(self.source.high_watermarks())
        if join.full and not self.source.held:
            log.warning("%d feature record(s) wait for labels (data.labels.max_pending): pausing the feature topic", join.alive_count)
            self.source.hold(join.ftopic)
        elif not join.full and self.source.held:
            self.source.release()
        out = join.take()
        bases = join.bases()
        moved = {tp: (o, 0) for tp, o in bases.items() if self._sent_bases.get(tp) != o}
        if out is None and not moved and ticket is None:
            return
        self._sent_bases.update(bases)
        if out is None:
            out = _empty_joined(self.filler.ring)
        n = len(out.y)
        self._waiting.append(
            Pending(
                out.x,
                out.y,
                out.ids,
                np.empty(0, np.int32),
                np.empty(0, np.int64),
                out.ts,
                np.empty(0, np.int64),
                np.empty(0, np.int64),
                np.empty(0, np.int64),
                np.arange(n, dtype=np.int64),
                self._tps,
                bool(n) and not np.isnan(out.ts).all(),
                ticket,
                marks=(out.marks_tp, out.marks_off, out.extra_tp, out.extra_off),
                after=moved,
            )
        )
        self._advance()

    def _count_missing(self, x: np.ndarray) -> None:
        counts = is_missing(x).sum(axis=0)
        if counts.any():
            for name, n in zip(self.missing_names, counts.tolist()):
                if n:
                    self.stats.missing[name] = self.stats.missing.get(name, 0) + n

    def _partition_indices(self, msgs: list) -> np.ndarray:
        """Each message's index into ``self._tps`` (partitions get an index when first seen)."""
        partitions = np.fromiter(map(Message.partition, msgs), np.int64, len(msgs))
        topics = self._topics
        names = set(topics) if len(topics) == 1 else set(topics := list(map(Message.topic, msgs)))
        if len(names) == 1:  # one topic: a lookup table over the few partition numbers
            (topic,) = names
            seen = np.unique(partitions).tolist()
            table = np.zeros(max(seen) + 1, np.int32)
            for p in seen:
                table[p] = self._tp_slot((topic, p))
            return table[partitions]
        return np.fromiter(map(self._tp_slot, zip(topics, partitions.tolist())), np.int32, len(msgs))

    def _tp_slot(self, tp: TP) -> int:
        i = self._tp_index.get(tp)
        if i is None:
            i = self._tp_index[tp] = len(self._tps)
            self._tps.append(tp)
        return i

    def _skip_trained_rows(self, part, offset, x, y, ids, msg_of_row, row_base):
        """Drop the rows of a record that the snapshot says were already trained."""
        keep = np.ones(len(y), bool)
        for tp, (off, rows) in list(self._skip.items()):
            i = self._tp_index.get(tp)
            hit = np.flatnonzero((part == i) & (offset == off)) if i is not None else []
            if len(hit):
                m = int(hit[0])
                mine = np.flatnonzero(msg_of_row == m)
                keep[mine[:rows]] = False
                row_base[m] = rows
                del self._skip[tp]
            elif i is not None and (part == i).any():
                del self._skip[tp]  # the record is gone (retention); nothing to skip
        return x[keep], y[keep], ids[keep], msg_of_row[keep]

    def _reject(self, rejects: list, msgs: list) -> Ticket:
        letters = []
        for r in rejects:
            m = msgs[r.index]
            letters.append(DeadLetter(m.topic(), m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value(), r))
            n = len(r.rows) or 1
            self.stats.rejected[r.reason] = self.stats.rejected.get(r.reason, 0) + n
        first = letters[0]
        log.debug(
            "rejected %d record(s); first at %s[%d]@%d: %s", len(letters), first.topic, first.partition, first.offset, first.reject.error
        )
        return self.dead_letter.submit(letters)

    def _check_ranges(self) -> None:
        """Once a second: a position outside the offsets the last fetches reported for its partition.

        Past the end: the topic was deleted and recreated (Tansu answers such a fetch with
        nothing, Kafka with OFFSET_OUT_OF_RANGE, which librdkafka resets silently).  Before
        the start: retention deleted records not yet read.  Either is handled per
        ``kafka.on_out_of_range``, loudly.
        """
        self._next_range_check = time.monotonic() + 1.0
        for tp, (offset, _rows) in list(self.filler.positions.items()):
            low, high = self.source.cached_watermarks(tp)
            if tp not in self.source.assigned:
                continue
            if 0 <= high < offset:
                self._out_of_range(tp, low, high, f"the partition ends at offset {high}")
            elif offset < low:
                self._out_of_range(tp, low, high, f"the partition starts at offset {low}")

    def _out_of_range(self, tp: TP, low: int, high: int, why: str) -> None:
        """Read on per ``kafka.on_out_of_range`` (or stop), loudly, counting what is known to be skipped."""
        pos = self.filler.positions.get(tp, (self.source.assigned.get(tp, -1), 0))[0]
        where = f"{tp[0]}[{tp[1]}]: position {pos} is outside the partition's offsets {low}..{high} ({why})"
        cause = "records deleted (retention) before they were trained" if pos < low else "the topic deleted and recreated?"
        if self.on_out_of_range == "stop":
            raise KafkaSourceError(
                f"{where}: {cause}; stopping (kafka.on_out_of_range=stop). Set kafka.on_out_of_range to earliest or "
                "latest to read on from there (the skipped records are logged and counted)"
            )
        new = low if self.on_out_of_range == "earliest" else high
        skipped = max(0, new - pos) if pos >= 0 else 0
        key = f"{tp[0]}|{tp[1]}"
        self.stats.out_of_range[key] = self.stats.out_of_range.get(key, 0) + 1
        self.stats.skipped_out_of_range[key] = self.stats.skipped_out_of_range.get(key, 0) + skipped
        log.error(
            "%s: %s; reading on from offset %d (kafka.on_out_of_range=%s): %d record(s) known to be skipped",
            where,
            cause,
            new,
            self.on_out_of_range,
            skipped,
        )
        self.source.seek(tp, new)
        self._skip.pop(tp, None)
        self.filler.set_position(tp, (new, 0))

    def _note_starts(self, tps: list[TP]) -> None:
        """Partitions not started from a snapshot position: their start offset is a position from now on.

        It travels to the trainer with the next slot (alone if no record comes), so the
        snapshot holds it: a restart then reads on from there instead of resolving
        ``auto.offset.reset`` (or "a new partition starts at the beginning") again.
        """
        for tp in tps:
            offset = self.source.assigned.get(tp, -1)
            if tp not in self.filler.positions and offset >= 0:
                self.filler.set_position(tp, (offset, 0))
            if self.join is not None and offset >= 0:
                self.join.start(tp, offset)


def _empty_joined(ring: SlotProducer):
    from streamtrain.streams.join import Joined

    z = np.empty(0, np.int64)
    return Joined(
        np.empty((0, ring.x_np.shape[2]), np.float32),
        np.empty(0, np.float32),
        np.empty((0, ring.ids_np.shape[2]), np.int64),
        np.empty(0, np.float64),
        np.empty((0, 2), np.int32),
        np.empty((0, 2), np.int64),
        z.astype(np.int32),
        z,
    )


def _where(m: Message) -> str:
    return f"{m.topic()}[{m.partition()}]@{m.offset()}"
