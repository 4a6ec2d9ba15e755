"""The join: feature records wait for their label, labels for their features, each at most a window.

Partition ``p`` of the feature topic pairs with partition ``p`` of the label topic (both
keyed and partitioned alike by the producers; ``streams/split.py`` keeps a pair with one
reader).  A record's key is the 64-bit hash of its ``data.labels.key_field`` value
(``features/hashing.py``, the hash of the categorical fields without the modulo).

Per pair, in the order the ingest loop hands records over:

- a feature record whose label is waiting is trained at once with it (**joined**); else it
  waits, in a slab of preallocated arrays (its numbers, its table rows, offset, time);
- a label record takes the oldest waiting feature record of its key (**joined**); if the
  key's feature record expired within the last window the label is **late** (done, not
  trained: that record was trained already); else it waits for its features;
- a feature record still waiting when the window has passed **expires**: trained with
  ``on_expiry``'s label (0 for negative, ``labels.default``) or dropped; a label still
  waiting is **unmatched** (done, not trained).

Time is the records' (``time: event``: Kafka timestamps) or the reading's (``ingest``).
In event time a pair's clock is the smaller of its two partitions' clocks; a partition's
clock is the newest timestamp read from it, or the wall clock once it has nothing left
to read -- so a lagging label partition holds the expiries back instead of expiring
records whose labels are merely unread.

**The guard.**  When, over the last ``guard_seconds`` of wall time, at least
``guard_min_expired`` records came due and the joined fraction is at or below
``min_join_rate``, the label topic has most likely stopped: expiries are *held* (their
offsets keep the position) instead of training the model that nothing is ever clicked.
Once joins come again the held records expire in order.  The guard changes when an expiry
is trained, never with which label: a label later than its record's window is late,
held or not.  Only records that come due near the wall clock count (in event time, a
stream read again after a restart, or caught up after an outage, is not a broken join).

**Exactly once.**  Every offset leaves the join once: in a row (with its label's offset
beside it when joined), or as *extra* done (a dropped expiry, a late or unmatched label).
:meth:`Joiner.bases` gives each partition's position, the offset of its oldest record
still waiting (or where reading goes on); offsets done past it travel with the rows and
are kept by the trainer (``streams/join/done.py``).  A restart reads every pair again from
its positions and skips the offsets the snapshot says are done (``done`` here).
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from streamtrain.streams.slots import TopicPartition as TP

log = logging.getLogger("streamtrain.join")

# label delay (seconds, label time - feature time; a label before its features counts 0), histogram bounds
DELAY_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 21600.0, 86400.0)
# Python's share of what waits, beyond the slab's arrays (dict entries for keys, deque cells, label objects),
# per record: measured by ``python -m bench.join`` (tracemalloc), so streamtrain_join_pending_bytes is close to what
# the process holds
FEATURE_OVERHEAD = 155
LABEL_OVERHEAD = 250
EXPIRED_KEY_OVERHEAD = 150
_M = 0xFFFFFFFF


@dataclass
class JoinStats:
    """The join's counters, in the ingest loop's stats (plain numbers: they travel in the status frames)."""

    joined: int = 0
    expired: dict[str, int] = field(default_factory=lambda: {"negative": 0, "default": 0, "drop": 0})
    early: int = 0  # of the expired, those that left before their window (labels.max_pending)
    early_labels: int = 0  # of the unmatched, those that left before their window (labels.max_pending)
    late: int = 0
    unmatched: int = 0
    pending_features: int = 0
    pending_labels: int = 0
    pending_bytes: int = 0
    held: int = 0  # expiries the guard holds now
    guard: int = 0  # 1 while the guard holds expiries
    guard_trips: int = 0
    paused: int = 0  # 1 while the feature topic is paused (max_pending, at_max_pending: pause)
    delay_counts: list[int] = field(default_factory=lambda: [0] * (len(DELAY_BUCKETS) + 1))
    delay_sum: float = 0.0


@dataclass
class Joined:
    """Rows the join let go since the last :meth:`Joiner.take`, with the offsets each makes done."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    ts: np.ndarray  # per row: the feature record's time
    marks_tp: np.ndarray  # (rows, 2) int32: the feature's and (joined) the label's partition index; -1: none
    marks_off: np.ndarray  # (rows, 2) int64
    extra_tp: np.ndarray  # int32: offsets done without a row (dropped expiry, late or unmatched label, a reject)
    extra_off: np.ndarray  # int64


class _Label:
    __slots__ = ("alive", "key", "nxt", "offset", "ts", "y")

    def __init__(self, offset: int, ts: float, y: float, key: int) -> None:
        self.offset, self.ts, self.y, self.key, self.alive, self.nxt = offset, ts, y, key, True, None


class _Pair:
    """One partition pair's waiting records and clocks."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.order: deque[int] = deque()  # waiting feature records' tags in offset order (joined ones skipped lazily)
        self.held: deque[int] = deque()  # tags of due records the guard holds, in offset order (older than ``order``)
        self.head: dict[int, int] = {}  # key -> its oldest waiting feature slot
        self.more: dict[int, int] = {}  # slot -> the next waiting slot of the same key (keys waiting twice only)
        self.tail: dict[int, int] = {}  # key -> its newest slot (keys waiting twice only)
        self.labels: dict[int, _Label] = {}  # key -> its oldest waiting label (chained by ``nxt``)
        self.label_tail: dict[int, _Label] = {}  # key -> its newest (keys waiting twice only)
        self.label_order: deque[_Label] = deque()
        self.expired_keys: dict[int, float] = {}  # key -> when its record expired (a later label is late)
        self.expired_order: deque[tuple[float, list[int]]] = deque()  # (when, keys) per expiry, oldest first
        self.wm_f = -math.inf  # newest timestamp read from each side
        self.wm_l = -math.inf
        self.next_f = -1  # where reading goes on, per side (-1: nothing read yet)
        self.next_l = -1
        self.clock = -math.inf  # the pair's clock at the last tick
        self.peak = 0  # the most keys waiting since the dicts were last rebuilt (a dict never shrinks)


class _Guard:
    """Joined and due counts over the last ``seconds`` (one-second buckets, wall time)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.buckets: deque[list[float]] = deque()  # [second, joined, due]

    def add(self, now: float, joined: int = 0, due: int = 0) -> None:
        sec = math.floor(now)
        if not self.buckets or self.buckets[-1][0] != sec:
            self.buckets.append([sec, 0, 0])
        b = self.buckets[-1]
        b[1] += joined
        b[2] += due

    def counts(self, now: float) -> tuple[int, int]:
        while self.buckets and self.buckets[0][0] <= now - self.seconds:
            self.buckets.popleft()
        return int(sum(b[1] for b in self.buckets)), int(sum(b[2] for b in self.buckets))


class Joiner:
    """The waiting records of every pair this ingest loop reads, and what leaves them (:meth:`take`)."""

    def __init__(
        self,
        cfg: object,  # streams.config.LabelsConfig
        width: int,
        fields: int,
        feature_topic: str,
        label_topic: str,
        index: Callable[[TP], int],
        done: dict[TP, np.ndarray] | None = None,
        clock: Callable[[], float] = time.time,
        capacity: int = 1024,
    ) -> None:
        self.cfg = cfg
        self.window = float(cfg.window_seconds)
        self.event_time = cfg.time == "event"
        self.expiry_label = 0.0 if cfg.on_expiry == "negative" else float(cfg.default)
        self.drop = cfg.on_expiry == "drop"
        self.ftopic, self.ltopic = feature_topic, label_topic
        self.index = index
        self.clock = clock
        self.done = {tp: np.asarray(v, np.int64) for tp, v in (done or {}).items() if len(v)}
        self.stats = JoinStats()
        self.pairs: dict[int, _Pair] = {}
        self._guard = _Guard(float(getattr(cfg, "guard_seconds", 60.0)))
        self.width, self.fields = width, fields
        self.cap = 0
        self._top = 0  # free slots: self.free[:self._top]
        self._grow(capacity)
        self.alive_count = 0
        self._seq = 0
        self._next_shrink = 0.0
        self.full = False  # max_pending reached and nothing may leave early: the feature topic should pause
        self._out_batch: list[tuple[np.ndarray, ...]] = []
        self._out_slots: list[int] = []
        self._out_y: list[float] = []
        self._out_ltp: list[int] = []  # per slot row: the label's partition index and offset (-1: expired)
        self._out_loff: list[int] = []
        self._extra_tp: list[int] = []
        self._extra_off: list[int] = []

    # ------------------------------------------------------------------ the slab
    def _grow(self, cap: int) -> None:
        old = self.cap
        self.cap = cap
        for name, dtype, shape in (
            ("x", np.float32, (cap, self.width)),
            ("ids", np.int64, (cap, self.fields)),
            ("key", np.int64, (cap,)),
            ("off", np.int64, (cap,)),
            ("ts", np.float64, (cap,)),
            ("seq", np.int64, (cap,)),
            ("part", np.int32, (cap,)),
            ("alive", np.bool_, (cap,)),
            ("hold", np.bool_, (cap,)),
        ):
            a = np.zeros(shape, dtype)
            if old:
                a[:old] = getattr(self, name)
            setattr(self, name, a)
        free = np.empty(cap, np.int64)
        if old:
            free[: self._top] = self.free[: self._top]
        new = np.arange(cap - 1, old - 1, -1, dtype=np.int64)
        free[self._top : self._top + len(new)] = new
        self._top += len(new)
        self.free = free

    def _take_slots(self, n: int) -> np.ndarray:
        while self._top < n:
            self._grow(self.cap * 2)
        self._top -= n
        return self.free[self._top : self._top + n][::-1].copy()

    def _give_slots(self, slots: np.ndarray | list[int]) -> None:
        n = len(slots)
        if n:
            self.free[self._top : self._top + n] = slots
            self._top += n

    def _live(self, tag: int) -> int:
        """The slot a deque's tag names if that record still waits, else -1 (the slot may hold another by now)."""
        s = tag & _M
        return s if self.alive[s] and self.seq[s] == tag >> 32 else -1

    @property
    def slab_bytes(self) -> int:
        return sum(getattr(self, n).nbytes for n in ("x", "ids", "key", "off", "ts", "seq", "part", "alive", "hold", "free"))

    # ------------------------------------------------------------------ records in
    def pair(self, partition: int) -> _Pair:
        p = self.pairs.get(partition)
        if p is None:
            p = self.pairs[partition] = _Pair(partition)
        return p

    def start(self, tp: TP, offset: int) -> None:
        """Reading ``tp`` starts at ``offset`` (a snapshot's position, or the resolved reset)."""
        p = self.pair(tp[1])
        if tp[0] == self.ftopic and p.next_f < 0:
            p.next_f = offset
        elif tp[0] == self.ltopic and p.next_l < 0:
            p.next_l = offset

    def _fresh(self, tp: TP, off: np.ndarray) -> np.ndarray | None:
        """Mask of the records not done already (a restart reads them again from the position); None: all of them."""
        d = self.done.get(tp)
        if d is None or not len(off):
            return None
        lo, hi = np.searchsorted(d, [off[0], off[-1]], side="left")[0], np.searchsorted(d, off[-1], side="right")
        if off[-1] >= d[-1]:
            del self.done[tp]  # read past every done offset of it
        elif lo:
            self.done[tp] = d[lo:]
        if hi <= lo:
            return None
        return ~np.isin(off, d[lo:hi])

    def _is_done(self, tp: TP, offset: int) -> bool:
        d = self.done.get(tp)
        if d is None:
            return False
        i = int(np.searchsorted(d, offset))
        return i < len(d) and int(d[i]) == offset

    def _arriving(self, topic: str, partition: int, off: np.ndarray, *cols: np.ndarray) -> tuple | None:
        """Records of one partition read: reading goes on past them; those not done already, with their pair (None: none)."""
        if not len(off):
            return None
        tp = (topic, partition)
        self.note_read(tp, int(off[-1]) + 1)
        fresh = self._fresh(tp, off)
        if fresh is not None:
            off, *cols = (a[fresh] for a in (off, *cols))
        return (self.pair(partition), tp, off, *cols) if len(off) else None

    def _times(self, ts: np.ndarray, now: float) -> np.ndarray:
        if not self.event_time:
            return np.full(len(ts), now)
        return np.where(np.isnan(ts), now, ts)

    def add_features(self, partition: int, off: np.ndarray, ts: np.ndarray, keys: np.ndarray, x: np.ndarray, ids: np.ndarray) -> None:
        """Feature records of one partition, in offset order (``ids`` without the key column)."""
        got = self._arriving(self.ftopic, partition, off, ts, keys, x, ids)
        if got is None:
            return
        p, tp, off, ts, keys, x, ids = got
        now = self.clock()
        t = self._times(ts, now)
        p.wm_f = max(p.wm_f, float(t.max()))
        ks = keys.tolist()
        keyset = set(ks)
        if p.labels and not p.labels.keys().isdisjoint(keyset):  # labels that came first: joined on arrival
            self._with_labels(p, tp, ks, off, t, x, ids, now)
            return
        n = len(ks)
        slots = self._take_slots(n)
        self._store(slots, partition, off, t, keys, x, ids)
        sl = slots.tolist()
        if len(keyset) == n and p.head.keys().isdisjoint(keyset):  # the common case: every key new
            p.head.update(zip(ks, sl))
        else:
            for k, s in zip(ks, sl):
                self._link(p, k, s)
        p.order.extend(((self.seq[slots] << 32) | slots).tolist())
        self.alive_count += n
        p.peak = max(p.peak, len(p.head), len(p.expired_keys), len(p.labels))

    def _store(self, slots: np.ndarray, partition: int, off, t, keys, x, ids) -> None:
        n = len(slots)
        self.x[slots] = x
        if self.fields:
            self.ids[slots] = ids
        self.key[slots], self.off[slots], self.ts[slots] = keys, off, t
        self.seq[slots] = np.arange(self._seq + 1, self._seq + n + 1)
        self._seq += n
        self.part[slots], self.alive[slots], self.hold[slots] = partition, True, False

    def _link(self, p: _Pair, k: int, s: int) -> None:
        first = p.head.get(k)
        if first is None:
            p.head[k] = s
            return
        p.more[p.tail.get(k, first)] = s
        p.tail[k] = s

    def _with_labels(self, p: _Pair, tp: TP, ks: list[int], off, t, x, ids, now: float) -> None:
        """One record at a time: a label may wait for it."""
        joined_rows, joined_y, joined_loff = [], [], []
        rest = []
        for i, (k, tt) in enumerate(zip(ks, t.tolist())):
            lab = p.labels.get(k)
            while lab is not None and tt - lab.ts > self.window:  # it waited past its window (read in one batch with us)
                self._pop_label(p, lab)
                self._unmatched(p, lab)
                lab = p.labels.get(k)
            if lab is None:
                rest.append(i)
                continue
            self._pop_label(p, lab)
            lab.alive = False
            self.stats.pending_labels -= 1
            joined_rows.append(i)
            joined_y.append(lab.y)
            joined_loff.append(lab.offset)
            self._joined(0.0, now)  # the label came first: a delay of 0
        if joined_rows:
            r = np.asarray(joined_rows, np.int64)
            n = len(r)
            marks_tp = np.empty((n, 2), np.int32)
            marks_tp[:, 0], marks_tp[:, 1] = self.index(tp), self.index((self.ltopic, p.partition))
            marks_off = np.stack([off[r], np.asarray(joined_loff, np.int64)], 1)
            self._out_batch.append((x[r], np.asarray(joined_y, np.float32), ids[r], t[r], marks_tp, marks_off))
        if rest:
            r = np.asarray(rest, np.int64)
            slots = self._take_slots(len(r))
            self._store(slots, p.partition, off[r], t[r], np.asarray(ks, np.int64)[r], x[r], ids[r])
            for i, s in zip(rest, slots.tolist()):
                self._link(p, ks[i], s)
            p.order.extend(((self.seq[slots] << 32) | slots).tolist())
            self.alive_count += len(r)

    def add_labels(self, partition: int, off: np.ndarray, ts: np.ndarray, keys: np.ndarray, y: np.ndarray) -> None:
        """Label records of one partition, in offset order."""
        got = self._arriving(self.ltopic, partition, off, ts, keys, y)
        if got is None:
            return
        p, tp, off, ts, keys, y = got
        now = self.clock()
        t = self._times(ts, now)
        p.wm_l = max(p.wm_l, float(t.max()))
        li = self.index(tp)
        head, fts, window = p.head, self.ts, self.window
        for k, o, tt, yy in zip(keys.tolist(), off.tolist(), t.tolist(), y.tolist()):
            s = head.get(k)
            if s is not None and not self.alive[s]:
                raise AssertionError(f"join index of {self.ftopic}[{partition}] names a record that left (slot {s})")
            if s is not None and tt - fts[s] > window:
                s = None  # its feature record's window has passed (it expires at the next tick, or is held): late
                self.stats.late += 1
                self._extra(li, o)
                continue
            if s is not None:
                self._unlink(p, k, s)
                self._out_slots.append(s)
                self._out_y.append(yy)
                self._out_ltp.append(li)
                self._out_loff.append(o)
                self._joined(tt - float(fts[s]), now)
            elif k in p.expired_keys:
                self.stats.late += 1
                self._extra(li, o)
            else:
                lab = _Label(o, tt, yy, k)
                first = p.labels.get(k)
                if first is None:
                    p.labels[k] = lab
                else:
                    p.label_tail.get(k, first).nxt = lab
                    p.label_tail[k] = lab
                p.label_order.append(lab)
                self.stats.pending_labels += 1

    def _pop_label(self, p: _Pair, lab: _Label) -> None:
        """``lab``, its key's oldest waiting label, leaves the key's chain."""
        if lab.nxt is None:
            del p.labels[lab.key]
            p.label_tail.pop(lab.key, None)
        else:
            p.labels[lab.key] = lab.nxt
            if p.label_tail.get(lab.key) is lab.nxt:
                del p.label_tail[lab.key]

    def note_read(self, tp: TP, next_offset: int) -> None:
        """Reading ``tp`` went on to ``next_offset`` (records that reached no side: rejected, see ``reject``)."""
        p = self.pair(tp[1])
        if tp[0] == self.ftopic:
            p.next_f = max(p.next_f, next_offset)
        else:
            p.next_l = max(p.next_l, next_offset)

    def reject(self, tp: TP, offset: int) -> None:
        """A record dead-lettered (its batch waits for the ack): done, with no row."""
        if not self._is_done(tp, offset):
            self._extra(self.index(tp), offset)

    # ------------------------------------------------------------------ time
    def tick(self, ends: dict[TP, int] | None = None) -> None:
        """Expire what the window has passed; ``ends``: each partition's end offset (a caught-up side's clock is the wall's)."""
        now = self.clock()
        ends = ends or {}
        joined, due = self._guard.counts(now)
        cfg = self.cfg
        holding = bool(cfg.guard) and due >= cfg.guard_min_expired and joined <= cfg.min_join_rate * (joined + due)
        if holding != bool(self.stats.guard):
            self.stats.guard = int(holding)
            if holding:
                self.stats.guard_trips += 1
                log.error(
                    "the join looks broken: %d record(s) came due in the last %.0f s and %d joined; expiries are held, not "
                    "trained, until labels come again (data.labels.guard)",
                    due,
                    self._guard.seconds,
                    joined,
                )
            else:
                log.warning("labels join again (%d joined in the last %.0f s): held expiries are released", joined, self._guard.seconds)
        for p in self.pairs.values():
            c = p.clock = max(p.clock, self._pair_clock(p, now, ends))
            self._expire_labels(p, c)
            if not holding and p.held:  # first: held records are older than any that comes due now (a key's oldest leaves first)
                self._release_held(p, c)
            self._expire_features(p, c, now, holding)
        self._bound(holding)
        if now >= self._next_shrink:
            self._shrink()
            self._next_shrink = now + 10.0
        st = self.stats
        st.pending_features = self.alive_count
        st.held = sum(len(p.held) for p in self.pairs.values())
        remembered = sum(len(p.expired_keys) for p in self.pairs.values())
        st.pending_bytes = (
            self.slab_bytes + self.alive_count * FEATURE_OVERHEAD + st.pending_labels * LABEL_OVERHEAD + remembered * EXPIRED_KEY_OVERHEAD
        )

    def _pair_clock(self, p: _Pair, now: float, ends: dict[TP, int]) -> float:
        if not self.event_time:
            return now

        def side(wm: float, nxt: int, topic: str) -> float:
            end = ends.get((topic, p.partition), -1)
            caught_up = end >= 0 and max(nxt, 0) >= end
            return max(wm, now) if caught_up else wm

        return min(side(p.wm_f, p.next_f, self.ftopic), side(p.wm_l, p.next_l, self.ltopic))

    def _expire_labels(self, p: _Pair, c: float) -> None:
        q = p.label_order
        while q:
            lab = q[0]
            if not lab.alive:
                q.popleft()
                continue
            if lab.ts + self.window > c:
                break
            q.popleft()
            self._pop_label(p, lab)
            self._unmatched(p, lab)
        eo = p.expired_order
        while eo and eo[0][0] + self.window <= c:
            t, keys = eo.popleft()
            ek = p.expired_keys
            for k in keys:
                if ek.get(k) == t:
                    del ek[k]

    def _unmatched(self, p: _Pair, lab: _Label) -> None:
        """A label whose features did not come within the window: done, not trained."""
        lab.alive = False
        self.stats.pending_labels -= 1
        self.stats.unmatched += 1
        self._extra(self.index((self.ltopic, p.partition)), lab.offset)

    def _expire_features(self, p: _Pair, c: float, now: float, holding: bool) -> None:
        q = p.order
        alive, seq, ts, window = self.alive, self.seq, self.ts, self.window
        due: list[int] = []
        tags: list[int] = []
        while q:
            tag = q[0]
            s = tag & _M
            if not alive[s] or seq[s] != tag >> 32:
                q.popleft()
                continue
            if ts[s] + window > c:
                break
            due.append(s)
            tags.append(q.popleft())
        if not due:
            return
        if c >= now - self._guard.seconds:  # live: an old stream read again (a restart, a catch-up) is not a broken join
            self._guard.add(now, due=len(due))
        if holding:
            self.hold[due] = True
            p.held.extend(tags)
        else:
            self._expire(p, due, c)

    def _release_held(self, p: _Pair, c: float) -> None:
        live = [s for s in map(self._live, p.held) if s >= 0]
        p.held.clear()
        if live:
            self._expire(p, live, c)

    def _bound(self, holding: bool) -> None:
        """Never more than ``max_pending`` waiting on either side: the oldest leave early, or the feature topic pauses."""
        limit = self.cfg.max_pending
        pause = holding or self.cfg.at_max_pending == "pause"
        while self.alive_count > limit and not pause:
            oldest, when = None, math.inf
            for p in self.pairs.values():
                while p.order and self._live(p.order[0]) < 0:
                    p.order.popleft()
                if p.order and self.ts[self._live(p.order[0])] < when:
                    oldest, when = p, float(self.ts[self._live(p.order[0])])
            if oldest is None:
                break
            k = min(self.alive_count - limit, len(oldest.order))
            slots = [s for s in (self._live(oldest.order.popleft()) for _ in range(k)) if s >= 0]
            self.stats.early += len(slots)
            self._expire(oldest, slots, oldest.clock)
        while self.stats.pending_labels > limit:  # labels whose features lag far behind: the oldest go unmatched
            oldest, when = None, math.inf
            for p in self.pairs.values():
                while p.label_order and not p.label_order[0].alive:
                    p.label_order.popleft()
                if p.label_order and p.label_order[0].ts < when:
                    oldest, when = p, p.label_order[0].ts
            if oldest is None:
                break
            lab = oldest.label_order.popleft()
            self._pop_label(oldest, lab)
            self._unmatched(oldest, lab)
            self.stats.early_labels += 1
        self.full = pause and self.alive_count >= limit
        self.stats.paused = int(self.full)

    def _expire(self, p: _Pair, slots: list[int], c: float) -> None:
        """``slots`` (each its key's oldest waiting record, in offset order) leave: trained as on_expiry, or dropped."""
        keys = self.key[slots].tolist()
        for k, s in zip(keys, slots):
            self._unlink(p, k, s)
        p.expired_keys.update(dict.fromkeys(keys, c))
        p.expired_order.append((c, keys))
        n = len(slots)
        if self.drop:
            self.stats.expired["drop"] += n
            fi = self.index((self.ftopic, p.partition))
            self._extra_tp.extend([fi] * n)
            self._extra_off.extend(self.off[slots].tolist())
            self._give_slots(np.asarray(slots, np.int64))
            return
        self.stats.expired["negative" if self.cfg.on_expiry == "negative" else "default"] += n
        self._out_slots.extend(slots)
        self._out_y.extend([self.expiry_label] * n)
        self._out_ltp.extend([-1] * n)
        self._out_loff.extend([-1] * n)

    def _unlink(self, p: _Pair, k: int, s: int) -> None:
        """``s`` (key ``k``'s oldest waiting record) leaves: joined or expired."""
        nxt = p.more.pop(s, None)
        if nxt is None:
            del p.head[k]
        else:
            p.head[k] = nxt
            if p.tail.get(k) == nxt:
                del p.tail[k]
        self.alive[s] = False
        self.alive_count -= 1

    def _shrink(self) -> None:
        """Rebuild a pair's dicts once they hold a quarter of their peak (a dict keeps its size when emptied)."""
        for p in self.pairs.values():
            size = max(len(p.head), len(p.expired_keys), len(p.labels))
            if p.peak > 4096 and size < p.peak // 4:
                p.head, p.more, p.tail = dict(p.head), dict(p.more), dict(p.tail)
                p.expired_keys, p.labels, p.label_tail = dict(p.expired_keys), dict(p.labels), dict(p.label_tail)
                p.peak = size

    def _joined(self, delay: float, now: float) -> None:
        st = self.stats
        st.joined += 1
        d = delay if delay > 0.0 else 0.0
        st.delay_sum += d
        st.delay_counts[bisect_left(DELAY_BUCKETS, d)] += 1
        self._guard.add(now, joined=1)

    def _extra(self, tp_index: int, offset: int) -> None:
        self._extra_tp.append(tp_index)
        self._extra_off.append(offset)

    # ------------------------------------------------------------------ out
    def bases(self) -> dict[TP, int]:
        """Each read partition's position: its oldest waiting record's offset, else where reading goes on."""
        out: dict[TP, int] = {}
        for part, p in self.pairs.items():
            f = self._first_alive(p)
            if f is not None:
                out[(self.ftopic, part)] = f
            elif p.next_f >= 0:
                out[(self.ftopic, part)] = p.next_f
            lq = p.label_order
            while lq and not lq[0].alive:
                lq.popleft()
            if lq:
                out[(self.ltopic, part)] = lq[0].offset
            elif p.next_l >= 0:
                out[(self.ltopic, part)] = p.next_l
        return out

    def _first_alive(self, p: _Pair) -> int | None:
        for q in (p.held, p.order):
            while q and self._live(q[0]) < 0:
                q.popleft()
            if q:
                return int(self.off[self._live(q[0])])
        return None

    def take(self) -> Joined | None:
        """The rows let go since the last call (None if nothing left the join)."""
        if not (self._out_batch or self._out_slots or self._extra_tp):
            return None
        parts = [list(t) for t in self._out_batch]
        if self._out_slots:
            s = np.asarray(self._out_slots, np.int64)
            part = self.part[s]
            fi = np.empty(len(s), np.int32)
            for q in np.unique(part).tolist():
                fi[part == q] = self.index((self.ftopic, q))
            marks_tp = np.stack([fi, np.asarray(self._out_ltp, np.int32)], 1)
            marks_off = np.stack([self.off[s], np.asarray(self._out_loff, np.int64)], 1)
            parts.append([self.x[s], np.asarray(self._out_y, np.float32), self.ids[s], self.ts[s], marks_tp, marks_off])
            self._give_slots(s)  # copied out: the slots may hold new records
        cols = list(zip(*parts)) if parts else []
        empty = (
            np.empty((0, self.width), np.float32),
            np.empty(0, np.float32),
            np.empty((0, self.fields), np.int64),
            np.empty(0, np.float64),
            np.empty((0, 2), np.int32),
            np.empty((0, 2), np.int64),
        )
        arrays = [np.concatenate(c) for c in cols] if cols else list(empty)
        out = Joined(*arrays, np.asarray(self._extra_tp, np.int32), np.asarray(self._extra_off, np.int64))
        self._out_batch, self._out_slots, self._out_y, self._out_ltp, self._out_loff = [], [], [], [], []
        self._extra_tp, self._extra_off = [], []
        return out
