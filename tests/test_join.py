"""Labels that come later (data.labels): the join alone, then the daemon joining two topics under kill -9.

The join's promise is exactly once: every feature record is trained once (with its label if
it came within the window, else as ``on_expiry`` says), every label record leaves once, and a
restart from any cut (positions + done offsets) decides the same.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtrain.daemon.snapshot import SnapshotStore
from streamtrain.streams.config import LabelsConfig
from streamtrain.streams.join import Joiner, decode, encode
from streamtrain.streams.join.done import compact
from streamtrain.streams.offsets import OffsetTracker
from tests.daemon_util import Daemon, write_config
from tests.fault_util import ledger_config, read_ledger, record
from tests.test_packaging import TASK_ONLY, query_problems

F, L = "imp", "clicks"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def joiner(clock: Clock, done=None, **cfg) -> tuple[Joiner, dict]:
    index: dict = {}
    c = LabelsConfig(topic=L, **{"window_seconds": 10.0, "time": "ingest", "guard": False, **cfg})
    return Joiner(c, 1, 0, F, L, lambda tp: index.setdefault(tp, len(index)), done, clock=clock), index


def feats(j: Joiner, part: int, offsets: list[int], keys: list[int]) -> None:
    n = len(offsets)
    x = np.asarray(offsets, np.float32).reshape(n, 1)  # the row says which record it is
    j.add_features(part, np.asarray(offsets, np.int64), np.full(n, np.nan), np.asarray(keys, np.int64), x, np.zeros((n, 0), np.int64))


def labels(j: Joiner, part: int, offsets: list[int], keys: list[int], y: list[float]) -> None:
    n = len(offsets)
    j.add_labels(part, np.asarray(offsets, np.int64), np.full(n, np.nan), np.asarray(keys, np.int64), np.asarray(y, np.float32))


def drain(j: Joiner, index: dict, parts: bool = False) -> tuple[dict, set, set]:
    """What left: feature offset -> label trained; feature offsets done without a row; label offsets done.

    ``parts``: keyed by (partition, offset) instead.
    """
    out = j.take()
    trained, dropped, label_done = {}, set(), set()
    if out is None:
        return trained, dropped, label_done
    names = {v: k for k, v in index.items()}

    def key(tp_index: int, offset: int):
        return (names[tp_index][1], offset) if parts else offset

    for (ft, lt), (fo, lo), y in zip(out.marks_tp.tolist(), out.marks_off.tolist(), out.y.tolist()):
        assert names[ft][0] == F
        trained[key(ft, fo)] = y
        if lt >= 0:
            assert names[lt][0] == L and names[lt][1] == names[ft][1], "a label joins in its own pair"
            label_done.add(key(lt, lo))
    for t, o in zip(out.extra_tp.tolist(), out.extra_off.tolist()):
        (dropped if names[t][0] == F else label_done).add(key(t, o))
    assert np.array_equal(out.x[:, 0], out.marks_off[:, 0].astype(np.float32)), "a row went out with another's marks"
    return trained, dropped, label_done


def test_a_label_joins_its_record_before_or_after_it_and_the_rest_expire():
    clock = Clock()
    j, index = joiner(clock)
    labels(j, 0, [0], [12], [1.0])  # before its features
    feats(j, 0, [0, 1, 2, 3, 4], [10, 11, 12, 13, 14])
    labels(j, 0, [1, 2], [10, 99], [1.0, 1.0])  # 99: no such record (yet)
    j.tick()
    trained, _, ldone = drain(j, index)
    assert trained == {2: 1.0, 0: 1.0} and ldone == {0, 1}
    assert j.bases() == {(F, 0): 1, (L, 0): 2}, "each position: the oldest record still waiting"
    clock.t += 10.5
    j.tick()
    trained, _, ldone = drain(j, index)
    assert trained == {1: 0.0, 3: 0.0, 4: 0.0} and ldone == {2}, "expired as negatives; the label for 99 unmatched"
    labels(j, 0, [3], [11], [1.0])
    j.tick()
    assert drain(j, index)[2] == {3} and j.stats.late == 1, "a label after its record expired: late, not trained again"
    assert (j.stats.joined, j.stats.expired["negative"], j.stats.unmatched) == (2, 3, 1)
    assert j.bases() == {(F, 0): 5, (L, 0): 4}


def test_on_expiry_drop_and_default():
    clock = Clock()
    j, index = joiner(clock, on_expiry="drop")
    feats(j, 0, [0, 1], [1, 2])
    clock.t += 11
    j.tick()
    trained, dropped, _ = drain(j, index)
    assert trained == {} and dropped == {0, 1} and j.stats.expired["drop"] == 2
    j, index = joiner(clock, on_expiry="default", default=0.25)
    feats(j, 0, [0], [1])
    clock.t += 11
    j.tick()
    assert drain(j, index)[0] == {0: 0.25}


def test_max_pending_expires_the_oldest_early_or_asks_for_a_pause():
    clock = Clock()
    j, index = joiner(clock, max_pending=3)
    feats(j, 0, [0, 1], [1, 2])
    feats(j, 1, [0, 1], [3, 4])
    j.tick()
    assert j.stats.early == 1 and j.alive_count == 3 and not j.full
    assert drain(j, index)[0] == {0: 0.0}
    j, index = joiner(clock, max_pending=3, at_max_pending="pause")
    feats(j, 0, [0, 1, 2], [1, 2, 3])
    j.tick()
    assert j.full and j.stats.paused == 1, "at the bound: pause the feature topic"
    labels(j, 0, [0], [2], [1.0])  # labels are read on while paused: the join cannot deadlock
    j.tick()
    assert not j.full and drain(j, index)[0] == {1: 1.0}


def test_the_guard_holds_expiries_while_nothing_joins_and_releases_them_when_labels_come():
    clock = Clock()
    j, index = joiner(clock, guard=True, guard_min_expired=5, guard_seconds=30.0, window_seconds=1.0)
    feats(j, 0, list(range(10)), list(range(10)))
    clock.t += 1.5
    j.tick()  # 10 came due, 0 joined: the first 10 expire (the window counts them), then the guard trips
    assert drain(j, index)[0] == {o: 0.0 for o in range(10)}
    j.tick()
    assert j.stats.guard == 1 and j.stats.guard_trips == 1
    feats(j, 0, list(range(10, 20)), list(range(10, 20)))
    clock.t += 1.5
    j.tick()
    assert drain(j, index)[0] == {} and j.stats.held == 10, "held, not trained as negatives"
    assert j.bases()[(F, 0)] == 10, "held records keep the position: a restart reads them again"
    labels(j, 0, [0], [15], [1.0])  # a label past its record's window: late, held or not (the guard never changes a label)
    feats(j, 0, [20], [21])
    labels(j, 0, [1], [21], [1.0])  # labels join again
    j.tick()
    trained = drain(j, index)[0]
    assert j.stats.late == 1 and j.stats.guard == 0
    assert trained == {20: 1.0, **{o: 0.0 for o in range(10, 20)}}, "released in order, as negatives"


def test_a_key_waiting_twice_leaves_in_order_when_the_guard_lets_go():
    """The held record of a key is older than its record that comes due in the tick the guard lets go: it leaves first,
    and the key's index never names a slot that another record took since (found by bench.join's author)."""
    clock = Clock(0.0)
    j, index = joiner(clock, guard=True, guard_min_expired=2, guard_seconds=60.0)
    feats(j, 0, [0, 1, 2], [1, 2, 3])
    clock.t = 11
    j.tick()
    clock.t = 12
    feats(j, 0, [3, 4], [777, 4])
    clock.t = 14
    feats(j, 0, [5], [777])  # 777 waits twice
    clock.t = 23
    j.tick()
    assert j.stats.guard == 1 and j.stats.held == 2
    clock.t = 24
    feats(j, 0, [6], [5])
    labels(j, 0, [0], [5], [1.0])
    j.tick()
    clock.t = 26
    j.tick()
    assert j.stats.guard == 0 and j.alive_count == 0 and not j.pairs[0].head
    drain(j, index)
    clock.t = 27
    feats(j, 0, [7, 8, 9], [6, 7, 8])  # they take the freed slots
    labels(j, 0, [1], [777], [1.0])  # both of 777's records expired: the label is late, it joins nothing
    j.tick()
    trained, _, ldone = drain(j, index)
    assert trained == {} and ldone == {1} and j.stats.late == 1


def test_done_offsets_travel_as_a_bitmap_and_compact_past_the_position():
    a = np.array([3, 4, 5, 9, 11, 12], np.int64)
    first, bits = encode(a)
    assert first == 3 and np.array_equal(decode(first, bits), a)
    assert np.array_equal(decode(*encode(np.arange(10**6, 2 * 10**6, 7))), np.arange(10**6, 2 * 10**6, 7))
    assert np.array_equal(compact([np.array([9, 3]), np.array([12, 5, 1])], 4), [5, 9, 12])
    t = OffsetTracker()
    t.note_trained({(F, 0): (4, 0)}, {(F, 0): np.array([7, 9, 10])})
    t.note_trained({(F, 0): (9, 0)}, {(F, 0): np.array([8, 12])})
    assert t.done_rows() == [[F, 0, *encode(np.array([9, 10, 12]))]], "7 and 8 are below the new position: dropped"
    t.resume(3, {(F, 0): (9, 0)}, t.done_rows())
    assert np.array_equal(t.done_offsets()[(F, 0)], [9, 10, 12])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 30), st.floats(-3, 15), st.booleans()), min_size=1, max_size=60),
    st.integers(0, 200),
    st.sampled_from(["negative", "drop"]),
)
def test_every_record_leaves_once_and_a_restart_from_any_cut_decides_alike(events, cut, on_expiry):
    """Random impressions (key, label delay) over two pairs, consumed in random batches; cut at a random batch and
    restarted from (positions, done offsets) as a snapshot would hold them: what is trained, and with which label, is
    what an uncut run trains; every feature and label offset leaves exactly once."""
    rng = random.Random(cut)
    # the streams: per partition, impressions at t = offset, labels at t + delay (in time order), keys unique per record
    recs = {p: [] for p in (0, 1)}
    labs = {p: [] for p in (0, 1)}
    for i, (p, _, delay, clicked) in enumerate(events):
        o = len(recs[p])
        recs[p].append((o, 1000 + i, float(o)))
        if clicked:
            labs[p].append((float(o) + delay, 1000 + i, float(i % 3 + 1)))
    for p in labs:
        labs[p].sort()
    batches = []  # (side, partition, start, end) in a consumption order that keeps each partition in offset order
    pos = {(s, p): 0 for s in "fl" for p in (0, 1)}
    lens = {("f", p): len(recs[p]) for p in (0, 1)} | {("l", p): len(labs[p]) for p in (0, 1)}
    while any(pos[k] < lens[k] for k in pos):
        k = rng.choice([k for k in pos if pos[k] < lens[k]])
        n = rng.randint(1, 4)
        batches.append((*k, pos[k], min(lens[k], pos[k] + n)))
        pos[k] = min(lens[k], pos[k] + n)

    def run(from_batch: int, positions: dict, done: dict, stop: int | None) -> tuple[dict, set, set, Joiner]:
        clock = Clock(0.0)
        j, index = joiner(clock, done={tp: np.asarray(sorted(v), np.int64) for tp, v in done.items()}, on_expiry=on_expiry)
        j.cfg = LabelsConfig(topic=L, window_seconds=10.0, time="event", guard=False, on_expiry=on_expiry)
        j.event_time = True
        for tp in [(t, p) for t in (F, L) for p in (0, 1)]:  # as the ingest loop does once the partitions are assigned
            j.start(tp, positions.get(tp, 0))
        trained, dropped, ldone = {}, set(), set()
        for b, (side, p, a, e) in enumerate(batches):
            if stop is not None and b >= stop:
                break
            tp = (F if side == "f" else L, p)
            lo = positions.get(tp, 0)
            rows = list(range(max(a, lo), e)) if b >= from_batch else []
            if not rows:
                continue
            if side == "f":
                offs = rows
                feats_t(j, p, offs, [recs[p][o][1] for o in offs], [recs[p][o][2] for o in offs])
            else:
                j.add_labels(
                    p,
                    np.asarray(rows, np.int64),
                    np.asarray([labs[p][o][0] for o in rows]),
                    np.asarray([labs[p][o][1] for o in rows], np.int64),
                    np.asarray([labs[p][o][2] for o in rows], np.float32),
                )
            j.tick({})
            t, d, ld = drain(j, index, parts=True)
            trained.update(t)
            dropped |= d
            ldone |= ld
        if stop is None:  # the end: both sides have nothing left to read, the clock is the wall's
            clock.t = 1e9
            j.tick({(F, p): len(recs[p]) for p in (0, 1)} | {(L, p): len(labs[p]) for p in (0, 1)})
            t, d, ld = drain(j, index, parts=True)
            trained.update(t)
            dropped |= d
            ldone |= ld
        return trained, dropped, ldone, j

    whole, wdrop, wlab, _ = run(0, {}, {}, None)
    n_f = sum(len(v) for v in recs.values())
    n_l = sum(len(v) for v in labs.values())
    assert len(whole) + len(wdrop) == n_f and not set(whole) & wdrop, "every feature record leaves once"
    assert len(wlab) == n_l, "every label record leaves once"
    # cut: the first part's output and its positions, as a snapshot after the last trained batch holds them
    stop = cut % (len(batches) + 1)
    first, fdrop, flab, j1 = run(0, {}, {}, stop)
    bases = j1.bases()
    done = {}
    for p, o in list(first) + list(fdrop):
        if o >= bases.get((F, p), 0):
            done.setdefault((F, p), set()).add(o)
    for p, o in flab:
        if o >= bases.get((L, p), 0):
            done.setdefault((L, p), set()).add(o)
    rest, rdrop, rlab, _ = run(0, bases, done, None)
    assert not set(first) & set(rest) and not fdrop & rdrop, "nothing trained twice across the restart"
    assert {**first, **rest} == whole and fdrop | rdrop == wdrop, "the same records trained, with the same labels"
    assert flab | rlab == wlab and not flab & rlab


def feats_t(j: Joiner, part: int, offsets: list[int], keys: list[int], ts: list[float]) -> None:
    n = len(offsets)
    x = np.asarray(offsets, np.float32).reshape(n, 1)
    j.add_features(part, np.asarray(offsets, np.int64), np.asarray(ts), np.asarray(keys, np.int64), x, np.zeros((n, 0), np.int64))


# ---------------------------------------------------------------------------- the daemon, two topics
WINDOW = 30.0


class ClickStream:
    """Impressions ``{request_id, a: partition, b: seq, c}`` and clicks ``{request_id, clicked}``, with event timestamps.

    Seq ``s`` of partition ``p`` happens at ``t0 + s / 50``; a click comes for 40 % of them, 60 % of those within
    the window (some before their impression), the rest well after it (late).  Its label is ``1 + seq % 3``; an
    impression without a click in time is trained with ``on_expiry: default`` (0).
    """

    def __init__(self, bootstrap: str, n: int, partitions: int = 2, seed: int = 3) -> None:
        self.n, self.partitions = n, partitions
        rng = random.Random(seed)
        self.t0 = time.time() - 7200
        self.label = {}  # (p, seq) -> the label it must be trained with
        self.imps: list[list] = [[] for _ in range(partitions)]
        self.clicks: list[list] = [[] for _ in range(partitions)]
        for p in range(partitions):
            for s in range(1, n + 1):
                t = self.t0 + s / 50
                rid = f"r{p}-{s}"
                self.imps[p].append((t, json.dumps({"request_id": rid, "a": p, "b": s, "c": 0.5}).encode()))
                y = 0.0
                if rng.random() < 0.4:
                    inside = rng.random() < 0.6
                    delay = rng.uniform(-5, 20) if inside else rng.uniform(45, 80)
                    lab = float(1 + s % 3)
                    self.clicks[p].append((t + delay, json.dumps({"request_id": rid, "clicked": lab}).encode()))
                    y = lab if inside else 0.0
                self.label[(p, s)] = y
            self.clicks[p].sort()
        self.bootstrap = bootstrap

    def produce(self, imp_topic: str, click_topic: str) -> None:
        prod = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "acks": "all"})
        for topic, streams in ((imp_topic, self.imps), (click_topic, self.clicks)):
            for p, recs in enumerate(streams):
                for t, v in recs:
                    prod.produce(topic, v, partition=p, timestamp=int(t * 1000))
                    prod.poll(0)
        assert prod.flush(60) == 0

    def abs_error(self) -> float:
        """The oracle ledger predicts seq % 2: the prequential |error| every record must add, with its right label."""
        return float(sum(abs(y - s % 2) for (_, s), y in self.label.items()))

    def expected(self) -> dict[str, list[int]]:
        return {
            "count": [self.n] * self.partitions,
            "seqsum": [self.n * (self.n + 1) // 2] * self.partitions,
        }


def join_config(tmp_path: Path, bootstrap: str, imp: str, clicks: str, **labels) -> dict:
    cfg = ledger_config(tmp_path, bootstrap, imp, partitions=2, fmt="json", ledger={"oracle": True, "slow_ms": 8})
    cfg["data"] = {
        "format": "json",
        "features": ["a", "b", "c"],
        "labels": {"topic": clicks, "label_field": "clicked", "window_seconds": WINDOW, "on_expiry": "default", "time": "event", **labels},
    }
    cfg["trainer"]["standardize_target"] = False
    cfg["ring"].update(batch_size=16, max_batch_wait_ms=5)
    return cfg


@pytest.mark.integration
@pytest.mark.fault
def test_kill_9_while_joining_trains_every_impression_once_with_its_label(tmp_path, bootstrap, make_topic):
    """Impressions and clicks (some before, some long after their impression) on two co-partitioned topics; the daemon
    killed -9 at random moments, some during snapshot writes; after the last restart drains both topics every impression
    was trained exactly once (the ledger) with the label it had to get (the prequential |error| total)."""
    imp, clicks = make_topic(2), make_topic(2, prefix="clicks")
    stream = ClickStream(bootstrap, 2500)
    stream.produce(imp, clicks)
    cfg = join_config(tmp_path, bootstrap, imp, clicks)
    cfg["snapshot"].update(every_seconds=0.3)
    snaps = tmp_path / "snapshots"
    rng = random.Random(5)
    for i in range(4):
        d = Daemon(write_config(tmp_path / f"k{i}.yaml", cfg), tmp_path / f"k{i}.log")
        d.wait_for("reading", lambda m: m.get("streamtrain_records_consumed_total", 0) >= 1, 60)
        time.sleep(rng.uniform(0.1, 0.8))
        d.kill9()
    d = Daemon(write_config(tmp_path / "drain.yaml", cfg), tmp_path / "drain.log")
    d.wait_for(
        "every impression trained",
        lambda m: (
            m.get('streamtrain_join_pending{side="features"}', 1) == 0 and m.get("streamtrain_prequential_samples_total", 0) >= 2 * stream.n
        ),
        120,
    )
    m = d.metrics()
    assert d.terminate()[0] == 0, d.log()[-3000:]
    ledger = read_ledger(snaps)
    want = stream.expected()
    assert [int(c) for c in ledger["count"]] == want["count"], (ledger["count"], want)
    assert [int(c) for c in ledger["seqsum"]] == want["seqsum"]
    state = SnapshotStore(snaps).load_latest()[1]["prequential"]
    assert state["samples"] == 2 * stream.n
    assert state["abs_error"] == pytest.approx(stream.abs_error(), rel=1e-6), "each impression trained with its right label"
    assert "streamtrain_labels_joined_total" in m and 'streamtrain_labels_expired_total{action="default"}' in m
    record(
        "kill -9 x4 while joining a label topic (clicks before, within and long after their impression)",
        trials="4 kills",
        produced=2 * stream.n + sum(map(len, stream.clicks)),
        lost=0,
        duplicated=0,
        recovery="-",
        notes="every impression trained once, with the label it had to get (ledger and prequential |error| exact)",
    )


@pytest.mark.integration
def test_the_guard_stops_training_on_expiries_while_the_labels_stop_and_resumes(tmp_path, bootstrap, make_topic):
    """Live impressions with clicks 0.3 s later (ingest time, a 1 s window); the click producer stops: the guard trips,
    expiries are held (nothing is trained as a negative); it starts again: the guard lets go, training goes on."""
    imp, clicks = make_topic(2), make_topic(2, prefix="clicks")
    cfg = join_config(
        tmp_path, bootstrap, imp, clicks, window_seconds=1.0, time="ingest", on_expiry="negative", guard_seconds=3.0, guard_min_expired=40
    )
    cfg["trainer"]["task"] = "binary"
    cfg["model"]["params"]["oracle"] = False
    prod = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2})
    labels_on = threading.Event()
    labels_on.set()
    stop = threading.Event()
    sent = Counter()

    def run() -> None:
        s = 0
        pending: list[tuple[float, int, str]] = []
        while not stop.is_set():
            s += 1
            p = s % 2
            rid = f"r{s}"
            prod.produce(imp, json.dumps({"request_id": rid, "a": p, "b": s, "c": 0.1}).encode(), partition=p)
            if s % 2 == 0:
                pending.append((time.monotonic() + 0.3, p, rid))
            while pending and pending[0][0] <= time.monotonic():
                _, lp, lrid = pending.pop(0)
                if labels_on.is_set():
                    prod.produce(clicks, json.dumps({"request_id": lrid, "clicked": True}).encode(), partition=lp)
                    sent["clicks"] += 1
            prod.poll(0)
            time.sleep(0.005)
        prod.flush(10)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    d = Daemon(write_config(tmp_path / "g.yaml", cfg), tmp_path / "g.log")
    try:
        d.wait_for(
            "joining",
            lambda m: (
                m.get("streamtrain_labels_joined_total", 0) >= 50 and m.get('streamtrain_labels_expired_total{action="negative"}', 0) >= 20
            ),
            60,
        )
        assert d.value("streamtrain_join_guard") == 0
        labels_on.clear()
        neg = 'streamtrain_labels_expired_total{action="negative"}'
        m = d.wait_for("the guard trips", lambda m: m.get("streamtrain_join_guard", 0) == 1, 30)
        trained, expired = m["streamtrain_samples_trained_total"], m[neg]
        m = d.wait_for("held", lambda m: m.get("streamtrain_join_held", 0) >= 50, 30)
        assert m[neg] == expired and m["streamtrain_join_guard"] == 1, "while held, no expiry is trained (joins may be)"
        labels_on.set()
        m = d.wait_for(
            "the guard lets go",
            lambda m: m.get("streamtrain_join_guard", 1) == 0 and m.get("streamtrain_samples_trained_total", 0) > trained + 100,
            30,
        )
        assert m["streamtrain_join_guard_trips_total"] == 1
        assert "the join looks broken" in d.log()
        code, text = d.get("/metrics")
        assert code == 200
        query_problems(text, "binary+join", only={n for n, kind in TASK_ONLY.items() if kind == "join"})
    finally:
        stop.set()
        t.join(10)
    assert d.terminate()[0] == 0, d.log()[-3000:]


@pytest.mark.integration
def test_two_ranks_with_two_ingest_workers_each_keep_every_pair_together(tmp_path, bootstrap, make_topic):
    """Four partition pairs over 2 ranks x 2 ingest workers: a label partition is read where its feature partition is,
    so every click finds its impression (the |error| total says each got its label), and the ledger is exact."""
    from tests.test_ranks import launch_ranks, stop_ranks

    imp, clicks = make_topic(4), make_topic(4, prefix="clicks")
    stream = ClickStream(bootstrap, 400, partitions=4)
    stream.produce(imp, clicks)
    cfg = join_config(tmp_path, bootstrap, imp, clicks)
    cfg["model"]["params"]["partitions"] = 4
    cfg["ring"]["ingest_workers"] = 2
    d = launch_ranks(tmp_path, cfg, "pairs", 2)
    deadline = time.monotonic() + 120
    while True:
        ms = d.rank_metrics()
        # every impression scored (the prequential totals are summed over the ranks: each rank holds the whole count)
        if len(ms) == 2 and all(m.get("streamtrain_prequential_samples_total", 0) >= 4 * stream.n for m in ms):
            break
        assert d.proc.poll() is None and time.monotonic() < deadline, d.log()[-4000:]
        time.sleep(0.3)
    stop_ranks(d, 2)
    ledger = read_ledger(tmp_path / "snapshots")
    want = stream.expected()
    assert [int(c) for c in ledger["count"]] == want["count"] and [int(c) for c in ledger["seqsum"]] == want["seqsum"]
    state = SnapshotStore(tmp_path / "snapshots").load_latest()[1]["prequential"]
    assert state["samples"] == 4 * stream.n
    assert state["abs_error"] == pytest.approx(stream.abs_error(), rel=1e-6)


@pytest.mark.integration
def test_bad_records_on_either_topic_are_dead_lettered_alone(tmp_path, bootstrap, make_topic):
    """Garbage, a record without its key and a label of the wrong type, on both topics: each dead-lettered with its reason,
    every good impression trained once with its label."""
    imp, clicks = make_topic(2), make_topic(2, prefix="clicks")
    stream = ClickStream(bootstrap, 300)
    bad_imps = [b"\xff{not json", json.dumps({"a": 0, "b": 1, "c": 0.5}).encode(), json.dumps({"request_id": "x", "a": "?"}).encode()]
    bad_clicks = [b"]]", json.dumps({"clicked": 1.0}).encode(), json.dumps({"request_id": "r0-5", "clicked": [1]}).encode()]
    for p in range(2):
        for i, v in enumerate(bad_imps):  # among the impressions, timed like their neighbours
            stream.imps[p].insert(50 + 40 * i, (stream.imps[p][50 + 40 * i][0], v))
        for i, v in enumerate(bad_clicks):
            stream.clicks[p].insert(20 + 10 * i, (stream.clicks[p][20 + 10 * i][0], v))
    stream.produce(imp, clicks)
    cfg = join_config(tmp_path, bootstrap, imp, clicks)
    d = Daemon(write_config(tmp_path / "bad.yaml", cfg), tmp_path / "bad.log")
    m = d.wait_for(
        "every impression trained",
        lambda m: (
            m.get("streamtrain_prequential_samples_total", 0) >= 2 * stream.n and m.get("streamtrain_dead_letter_records_total", 0) >= 12
        ),
        90,
    )
    assert d.terminate()[0] == 0, d.log()[-3000:]
    rejected = {k.split('"')[1]: v for k, v in m.items() if k.startswith("streamtrain_records_rejected_total") and v}
    assert rejected == {"undecodable": 4, "missing_key": 4, "wrong_shape": 2, "missing_label": 2}, rejected
    ledger = read_ledger(tmp_path / "snapshots")
    want = stream.expected()
    assert [int(c) for c in ledger["count"]] == want["count"] and [int(c) for c in ledger["seqsum"]] == want["seqsum"]
    state = SnapshotStore(tmp_path / "snapshots").load_latest()[1]["prequential"]
    assert state["abs_error"] == pytest.approx(stream.abs_error(), rel=1e-6)


@pytest.mark.integration
def test_produce_writes_a_feature_file_and_a_label_file_to_the_two_topics_and_the_daemon_joins_them(tmp_path, bootstrap, make_topic):
    """``streamtrain produce -c join.yaml impressions.csv`` and ``... --labels clicks.csv``: keyed by the join key, so each
    click lands in its impression's partition; the daemon trains every impression once, the clicked ones as positives."""
    from streamtrain.cli import main
    from tests.kafka_util import read_topic

    imp, clicks = make_topic(3), make_topic(3, prefix="clicks")
    n = 300
    rng = random.Random(1)
    (tmp_path / "impressions.csv").write_text(
        "request_id,a,b,c,ad\n" + "".join(f"r{i},{i % 3},{i},{rng.random():.3f},ad{i % 7}\n" for i in range(n))
    )
    clicked = sorted(rng.sample(range(n), 60))
    (tmp_path / "clicks.csv").write_text("request_id,clicked\n" + "".join(f"r{i},1\n" for i in clicked))
    cfg = join_config(tmp_path, bootstrap, imp, clicks, time="ingest", window_seconds=3.0, on_expiry="negative")
    cfg["data"]["categorical"] = ["ad"]
    cfg["trainer"]["task"] = "binary"
    cfg["model"]["params"].update(oracle=False, partitions=3)
    path = write_config(tmp_path / "join.yaml", cfg)
    assert main(["produce", "-c", str(path), "--no-progress", str(tmp_path / "impressions.csv")]) == 0
    assert main(["produce", "-c", str(path), "--no-progress", "--labels", str(tmp_path / "clicks.csv")]) == 0
    recs = read_topic(bootstrap, imp, n)
    labs = read_topic(bootstrap, clicks, len(clicked))
    assert len(recs) == n and len(labs) == len(clicked)
    where = {r.key(): r.partition() for r in recs}
    assert all(where[r.key()] == r.partition() for r in labs), "a click is in its impression's partition"
    first = json.loads(recs[0].value())
    assert set(first) == {"request_id", "a", "b", "c", "ad"}, first
    assert set(json.loads(labs[0].value())) == {"request_id", "clicked"}
    d = Daemon(path, tmp_path / "p.log")
    m = d.wait_for(
        "every impression trained",
        lambda m: m.get("streamtrain_samples_trained_total", 0) >= n and m.get('streamtrain_join_pending{side="features"}', 1) == 0,
        60,
    )
    assert d.terminate()[0] == 0, d.log()[-3000:]
    assert m["streamtrain_labels_joined_total"] == len(clicked)
    assert m['streamtrain_labels_expired_total{action="negative"}'] == n - len(clicked)
    assert m["streamtrain_prequential_samples_total"] == n


@pytest.mark.integration
def test_topics_of_different_partition_counts_are_refused_at_start(tmp_path, bootstrap, make_topic):
    imp, clicks = make_topic(2), make_topic(3, prefix="clicks")
    d = Daemon(write_config(tmp_path / "m.yaml", join_config(tmp_path, bootstrap, imp, clicks)), tmp_path / "m.log")
    assert d.wait_exit(60) == 2, d.log()[-3000:]
    assert "has 3 partition(s) and the feature topic" in d.log()
