"""What the label join costs, driven directly (no broker): ``python -m bench.join``.

A :class:`streams.join.joiner.Joiner` on a fake clock in ingest time (``labels.time:
ingest``), fed the way the ingest loop feeds it (per consumed batch: each partition's
feature records, then its label records, then ``tick()`` and ``take()``):

1. **Throughput**: a synthetic click stream, ``--impressions`` (200k) over
   ``--partitions`` (4), 8 numeric features and 2 categorical fields, ``--clicked`` (5 %)
   clicked after a delay drawn uniformly inside the window, the rest expire (trained as
   negatives).  Microseconds per impression through the join, beside the same rows with
   their labels inline (no join: the batch's x, y, ids, times and offsets concatenated,
   which is what the ingest does with them before the ring), measured in the same run.
2. **Memory**: ``--pending`` (200k; ``--pending 1000000`` measures 1M) feature records
   waiting, traced with ``tracemalloc`` from before the Joiner is made (numpy's buffers
   are traced), against ``stats.pending_bytes``, the estimate ``/metrics`` reports
   (``slab_bytes`` + ``FEATURE_OVERHEAD`` per waiting feature record + ``LABEL_OVERHEAD``
   per waiting label + ``EXPIRED_KEY_OVERHEAD`` per remembered expired key, joiner.py);
   then once they have expired (their keys are remembered a window, for late labels) and
   a window later; then ``--pending`` label records waiting for their features.  Each
   with the constant's value that would have matched.
3. **The done set at a snapshot**: ``--window-offsets`` (1M) offsets past a partition's
   position of which 5 % (the clicked) and 50 % are done, out of order, noted per batch
   of 256 rows in ``OffsetTracker``; ``done_rows()`` (compact + encode, on the trainer's
   thread at a snapshot) timed, and the JSON it puts in the snapshot's meta.json sized;
   then the restart's side: ``decode`` and the Joiner's skip of done offsets
   (``Joiner._fresh``) per batch of 512 offsets read again, and for the whole window.
4. **The cost of waiting**: ``--learn-impressions`` (200k) impressions at ``--learn-rate``
   (200/s of simulated time), clicked with a logistic probability in 8 features whose
   weights change halfway (half of them flip sign), each click ``--delay`` (exponential,
   mean 60 s) after its impression.  The project's own learner (``daemon/step.py``,
   ``model: logistic``, ``trainer.task: binary``) trained on the same impressions three
   ways: every label inline (known at once: the oracle), and joined with a window of
   ``--windows`` (30 s and 300 s; ``on_expiry: negative``), the join's rows in the order
   it lets them go, cut into batches of 256 as the ring does (its ``max_batch_wait_ms``,
   which closes a batch early at a low rate, left out).  Per run: the prequential
   log loss of the prediction made at training time against the label trained on and
   against the true eventual label, the log loss of the model as it stands when each
   impression arrives (what serving it gets) per quarter of the stream (the change at the
   third), the clicks trained as negatives (after the window) and the mean delay from
   impression to training.

Best of ``--repeat`` for the timings.  The default run takes ~15 s on 2 cores (section 4
~6 s); ``--only memory --pending 1000000`` alone ~25 s (and 1.2 GB resident).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import tracemalloc

import numpy as np
import torch

from bench.common import table
from streamtrain.config.schema import Config, config_from_dict
from streamtrain.daemon.step import Learner
from streamtrain.streams.config import LabelsConfig
from streamtrain.streams.join.done import compact, decode, encode
from streamtrain.streams.join.joiner import EXPIRED_KEY_OVERHEAD, FEATURE_OVERHEAD, LABEL_OVERHEAD, Joiner
from streamtrain.streams.offsets import OffsetTracker
from streamtrain.streams.ring import Batch

FTOPIC, LTOPIC = "impressions", "clicks"
WIDTH, FIELDS = 8, 2
LABEL_INDEX = 1000  # a label partition's index in the marks: LABEL_INDEX + partition (a feature partition's: the partition)


class FakeClock:
    """The Joiner's clock: simulated seconds, advanced by the driver."""

    def __init__(self, t: float = 1.7e9) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def tp_index(tp: tuple[str, int]) -> int:
    return tp[1] if tp[0] == FTOPIC else LABEL_INDEX + tp[1]


def make_joiner(window: float, max_pending: int, clock: FakeClock, done: dict | None = None) -> Joiner:
    cfg = LabelsConfig(topic=LTOPIC, window_seconds=window, time="ingest", guard=False, max_pending=max_pending)
    return Joiner(cfg, WIDTH, FIELDS, FTOPIC, LTOPIC, tp_index, done, clock=clock)


def consumed_batches(
    t_f: np.ndarray,
    partitions: int,
    keys: np.ndarray,
    x: np.ndarray,
    ids: np.ndarray,
    y_inline: np.ndarray,
    c: np.ndarray,
    t_l: np.ndarray,
    batch: int,
    span: float,
) -> dict:
    """Impressions (read at ``t_f``, impression ``i`` on partition ``i % partitions``) and the labels of ``c`` (read at
    ``t_l``, on the same partition of the label topic), cut into consumed batches: ``[(clock, features, labels)]``.

    A batch is at most ``batch`` messages of both topics in the order they were produced and at most ``span`` s of them;
    the clock reads the time of its newest message.  ``features``: per partition ``(p, off, ts, keys, x, ids,
    y_inline)``, ``labels``: per partition ``(p, off, ts, keys, y)``.
    """
    n = len(t_f)
    part = np.arange(n) % partitions
    f_off = np.arange(n) // partitions
    lorder = np.argsort(t_l, kind="stable")
    c, t_l = c[lorder], t_l[lorder]
    l_part = part[c]
    l_off = np.empty(len(c), np.int64)
    for p in range(partitions):
        m = l_part == p
        l_off[m] = np.arange(int(m.sum()))
    # merge both topics by time (features first on a tie), then cut into batches
    t_all = np.concatenate([t_f, t_l])
    is_label = np.concatenate([np.zeros(n, bool), np.ones(len(c), bool)])
    src = np.concatenate([np.arange(n), np.arange(len(c))])
    order = np.lexsort((is_label, t_all))
    t_sorted = t_all[order]
    batches = []
    lo = 0
    while lo < len(order):
        hi = max(lo + 1, min(lo + batch, int(np.searchsorted(t_sorted, t_sorted[lo] + span))))
        sel = order[lo:hi]
        lo = hi
        fi = np.sort(src[sel[~is_label[sel]]])
        li = np.sort(src[sel[is_label[sel]]])
        feats, labs = [], []
        for p in range(partitions):
            r = fi[part[fi] == p]
            if len(r):
                feats.append((p, f_off[r], t_f[r], keys[r], x[r], ids[r], y_inline[r]))
            q = li[l_part[li] == p]
            if len(q):
                labs.append((p, l_off[q], t_l[q], keys[c[q]], np.ones(len(q), np.float32)))
        batches.append((float(t_all[sel].max()), feats, labs))
    return {"batches": batches, "n": n, "clicks": len(c), "end": float(t_all.max()), "partitions": partitions}


def feed(j: Joiner, feats: list, labs: list) -> None:
    """One consumed batch into the join, as the ingest loop hands it over."""
    for p, off, ts, keys, x, ids, _y in feats:
        j.add_features(p, off, ts, keys, x, ids)
    for p, off, ts, keys, y in labs:
        j.add_labels(p, off, ts, keys, y)
    j.tick()


# ---------------------------------------------------------------------- 1. throughput
def click_stream(n: int, partitions: int, clicked: float, rate: float, window: float, batch: int, seed: int = 0) -> dict:
    """Impression ``i`` read at ``i / rate`` s; a clicked one's label ``U(0, window - span)`` s later (``span = batch /
    rate``: a record's time is late by up to a batch's span, so every click joins)."""
    rng = np.random.default_rng(seed)
    t_f = np.arange(n) / rate
    keys = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)  # the 64-bit hash of the request id
    x = rng.standard_normal((n, WIDTH)).astype(np.float32)
    ids = np.stack([rng.integers(0, 1 << 20, n), rng.integers(0, 50, n)], 1).astype(np.int64)  # e.g. item, country rows
    hit = rng.random(n) < clicked
    c = np.flatnonzero(hit)
    span = batch / rate
    t_l = t_f[c] + rng.uniform(0.0, window - span, len(c))
    return consumed_batches(t_f, partitions, keys, x, ids, hit.astype(np.float32), c, t_l, batch, span)


def run_join(stream: dict, window: float, t0: float) -> tuple[float, Joiner, list]:
    clock = FakeClock(t0)
    j = make_joiner(window, 10 * stream["n"], clock)
    outs = []
    start = time.perf_counter()
    for t, feats, labs in stream["batches"]:
        clock.t = t0 + t
        feed(j, feats, labs)
        out = j.take()
        if out is not None:
            outs.append(out)
    clock.t = t0 + stream["end"] + window + 1.0  # the last window passes: every impression left
    j.tick()
    out = j.take()
    if out is not None:
        outs.append(out)
    return time.perf_counter() - start, j, outs


def run_inline(stream: dict) -> float:
    """The same rows with the label in the record: the batch's arrays concatenated, nothing waits."""
    start = time.perf_counter()
    sink = 0
    for _t, feats, _labs in stream["batches"]:
        if not feats:
            continue
        x = np.concatenate([f[4] for f in feats])
        y = np.concatenate([f[6] for f in feats])
        ids = np.concatenate([f[5] for f in feats])
        ts = np.concatenate([f[2] for f in feats])
        off = np.concatenate([f[1] for f in feats])
        sink += len(x) + len(y) + len(ids) + len(ts) + len(off)
    assert sink
    return time.perf_counter() - start


def throughput(args: argparse.Namespace) -> None:
    stream = click_stream(args.impressions, args.partitions, args.clicked, args.rate, args.window, args.batch)
    n = stream["n"]
    join_s, inline_s = [], []
    for r in range(args.repeat):
        s, j, outs = run_join(stream, args.window, 1.7e9 + r * 1e6)
        join_s.append(s)
        inline_s.append(run_inline(stream))
    # every impression left once, as a row; the clicked ones with label 1
    rows = sum(len(o.y) for o in outs)
    offs = np.concatenate([o.marks_tp[:, 0].astype(np.int64) << 40 | o.marks_off[:, 0] for o in outs])
    positives = int(sum(float(o.y.sum()) for o in outs))
    st = j.stats
    assert rows == n and len(np.unique(offs)) == n, (rows, len(np.unique(offs)), n)
    assert positives == st.joined == stream["clicks"], (positives, st.joined, stream["clicks"])
    j_us, i_us = 1e6 * min(join_s) / n, 1e6 * min(inline_s) / n
    print(
        f"\n## 1. Join throughput: {n:,} impressions over {args.partitions} partitions, {args.clicked:.0%} clicked "
        f"within a {args.window:g} s window, {args.rate:g} impressions/s of simulated time, batches of {args.batch} messages"
    )
    print()
    print(
        table(
            ["path", "us / impression", "impressions / s", "ratio"],
            [
                ["labels inline (concatenate x, y, ids, ts, offsets per batch)", f"{i_us:.3f}", f"{1e6 / i_us:,.0f}", "1.0"],
                ["join (add_features + add_labels + tick + take)", f"{j_us:.2f}", f"{1e6 / j_us:,.0f}", f"{j_us / i_us:.0f}x"],
            ],
        )
    )
    print(
        f"\njoined {st.joined:,} of {stream['clicks']:,} clicks, late {st.late:,}, unmatched {st.unmatched:,}, "
        f"expired {st.expired['negative']:,} (negatives); {rows:,} rows out, each impression once; "
        f"{len(stream['batches']):,} batches, best of {args.repeat} ({', '.join(f'{s:.2f}' for s in join_s)} s)"
    )


# ---------------------------------------------------------------------- 2. memory
def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def memory(args: argparse.Namespace) -> None:
    n, window, chunk = args.pending, 60.0, 1024
    rng = np.random.default_rng(1)
    keys = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    x = rng.standard_normal((n, WIDTH)).astype(np.float32)
    ids = rng.integers(0, 1 << 20, (n, FIELDS), dtype=np.int64)
    off = np.arange(n, dtype=np.int64)
    ts = np.full(n, np.nan)
    y = np.ones(n, np.float32)
    clock = FakeClock()
    parts = args.partitions

    def remembered(j: Joiner) -> int:
        return sum(len(p.expired_keys) for p in j.pairs.values())

    tracemalloc.start()
    base = _traced()
    j = make_joiner(window, 2 * n, clock)
    for lo in range(0, n, chunk):  # partition p gets every parts-th chunk: offsets stay in order per partition
        hi = min(lo + chunk, n)
        j.add_features((lo // chunk) % parts, off[lo:hi], ts[lo:hi], keys[lo:hi], x[lo:hi], ids[lo:hi])
    j.tick()
    assert j.stats.pending_features == n, (j.stats.pending_features, n)
    waiting, peak = _traced() - base, tracemalloc.get_traced_memory()[1] - base
    est_waiting, slab, cap = j.stats.pending_bytes, j.slab_bytes, j.cap
    # they all expire: the slab stays as large, each key is remembered a window (a later label is late, not waiting)
    clock.t += window + 1.0
    j.tick()
    j.take()
    assert j.stats.pending_features == 0 and remembered(j) == n
    expired, est_expired = _traced() - base, j.stats.pending_bytes
    clock.t += window + 1.0
    j.tick()
    later, est_later = _traced() - base, j.stats.pending_bytes
    del j
    gone = _traced() - base
    # label records waiting for their features (read ahead of a lagging feature topic)
    jl = make_joiner(window, 2 * n, clock)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        jl.add_labels((lo // chunk) % parts, off[lo:hi], ts[lo:hi], keys[lo:hi], y[lo:hi])
    jl.tick()
    assert jl.stats.pending_labels == n
    labels, est_labels, slab_l = _traced() - base - gone, jl.stats.pending_bytes, jl.slab_bytes
    del jl
    tracemalloc.stop()

    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731

    def off_by(est: float, measured: float) -> str:
        r = est / measured - 1.0
        return f"{abs(r):.0%} {'low' if r < 0 else 'high'}"

    match_f = (waiting - slab) / n
    match_e = (expired - slab) / n
    match_l = (labels - slab_l) / n
    print(
        f"\n## 2. Memory: {n:,} records waiting ({WIDTH} float32 features, {FIELDS} id fields), "
        f"measured with tracemalloc against stats.pending_bytes"
    )
    print()
    print(
        table(
            ["state", "measured MiB", "estimate MiB", "estimate is", "B / record measured", "constant that would match"],
            [
                [
                    f"{n:,} feature records waiting",
                    mib(waiting),
                    mib(est_waiting),
                    off_by(est_waiting, waiting),
                    f"{waiting / n:.0f}",
                    f"FEATURE_OVERHEAD = {match_f:.0f} (is {FEATURE_OVERHEAD})",
                ],
                [
                    "  of which the slab (slab_bytes)",
                    mib(slab),
                    mib(slab),
                    "",
                    f"{slab / n:.0f}",
                    f"{cap:,} rows of {slab // cap} B: capacity doubles",
                ],
                ["  peak while filling (tracemalloc)", mib(peak), "", "", f"{peak / n:.0f}", ""],
                [
                    "all expired, within the next window (keys remembered)",
                    mib(expired),
                    mib(est_expired),
                    off_by(est_expired, expired),
                    f"{expired / n:.0f}",
                    f"EXPIRED_KEY_OVERHEAD = {match_e:.0f} (is {EXPIRED_KEY_OVERHEAD})",
                ],
                [
                    "one window later (keys forgotten)",
                    mib(later),
                    mib(est_later),
                    off_by(est_later, later),
                    f"{later / n:.0f}",
                    f"{(later - slab) / n:.0f} B / record beyond the slab stay (emptied dicts keep their size)",
                ],
                ["the Joiner deleted", mib(gone), "", "", f"{gone / n:.0f}", ""],
                [
                    f"{n:,} label records waiting for their features",
                    mib(labels),
                    mib(est_labels),
                    off_by(est_labels, labels),
                    f"{labels / n:.0f}",
                    f"LABEL_OVERHEAD = {match_l:.0f} (is {LABEL_OVERHEAD})",
                ],
            ],
        )
    )
    worst = max(abs(est_waiting / waiting - 1), abs(est_expired / expired - 1), abs(est_labels / labels - 1))
    print(
        f"\nat this size: FEATURE_OVERHEAD = {match_f:.0f}, LABEL_OVERHEAD = {match_l:.0f}, EXPIRED_KEY_OVERHEAD = "
        f"{match_e:.0f} would match (set: {FEATURE_OVERHEAD}, {LABEL_OVERHEAD}, {EXPIRED_KEY_OVERHEAD}); the estimate is off "
        f"by at most {worst:.0%} of the three" + ("" if worst <= 0.25 else " -- MORE THAN 25 %")
    )


# ---------------------------------------------------------------------- 3. the done set
def done_set(args: argparse.Namespace) -> None:
    w, rows_per_batch, read_batch = args.window_offsets, 256, 512
    tp = (FTOPIC, 0)
    base = 10_000_000  # the partition's position: its oldest waiting record
    rng = np.random.default_rng(2)
    window = np.arange(base, base + w, dtype=np.int64)
    reads = [window[lo : lo + read_batch] for lo in range(0, w, read_batch)]  # a restart reads the window again
    rows = []
    for frac in (0.05, 0.5):
        done = base + np.flatnonzero(rng.random(w) < frac)
        rng.shuffle(done)  # done as their labels come: out of order
        chunks = [done[i : i + rows_per_batch] for i in range(0, len(done), rows_per_batch)]
        t_rows, t_compact, t_encode, t_decode, t_fresh = [], [], [], [], []
        for _ in range(args.repeat):
            tracker = OffsetTracker()
            for c in chunks:
                tracker.note_trained({tp: (base, 0)}, {tp: c})
            t = time.perf_counter()
            meta = tracker.done_rows()
            t_rows.append(time.perf_counter() - t)
            t = time.perf_counter()
            kept = compact(chunks, base)
            t_compact.append(time.perf_counter() - t)
            t = time.perf_counter()
            encode(kept)
            t_encode.append(time.perf_counter() - t)
            text = json.dumps(meta)
            _t, _p, first, bits = json.loads(text)[0]
            t = time.perf_counter()
            back = decode(first, bits)
            t_decode.append(time.perf_counter() - t)
            # the restart: every offset of the window read again, the done ones skipped (a fresh Joiner: _fresh trims its set)
            j = make_joiner(60.0, 1_000_000, FakeClock(), done={tp: back})
            t = time.perf_counter()
            masks = [j._fresh(tp, b) for b in reads]
            t_fresh.append(time.perf_counter() - t)
        d = np.sort(done)
        assert np.array_equal(back, d)
        kept_read = np.concatenate([b if m is None else b[m] for b, m in zip(reads, masks)])
        assert len(kept_read) == w - len(d) and not np.isin(kept_read, d).any()
        ms = lambda v: f"{1e3 * min(v):.1f}"  # noqa: E731
        rows.append(
            [
                f"{frac:.0%}",
                f"{len(done):,}",
                f"{len(chunks):,}",
                f"{ms(t_rows)} ({ms(t_compact)} + {ms(t_encode)})",
                f"{len(text):,} ({len(text) / 1024:,.0f} KB)",
                ms(t_decode),
                f"{1e6 * min(t_fresh) / len(reads):,.0f}",
                f"{1e3 * min(t_fresh):,.0f}",
            ]
        )
    print(
        f"\n## 3. The done set at a snapshot: {w:,} offsets past the position of one partition, "
        f"done out of order in batches of {rows_per_batch} rows"
    )
    print()
    print(
        table(
            [
                "done",
                "offsets",
                "batches",
                "done_rows() ms (compact + encode)",
                "meta.json bytes",
                "decode ms",
                f"restart skip: _fresh us / {read_batch}",
                f"_fresh ms, the window ({len(reads):,} reads)",
            ],
            rows,
        )
    )
    print(
        f"\nmeta.json: the done_rows() list as json.dumps writes it; the bitmap is {w / 8 / 1024:,.0f} KB before deflate "
        f"({w / 6 / 1024:,.0f} KB as base64), so 50 % done at random does not compress.  restart skip: "
        f"Joiner._fresh on each batch of {read_batch} offsets of the window read again, best of {args.repeat}"
    )


# ---------------------------------------------------------------------- 4. the cost of waiting
def logloss(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of logits ``z`` against labels ``y``, per row."""
    return np.logaddexp(0.0, z) - y * z


def delayed_click_stream(n: int, partitions: int, rate: float, delay: float, batch: int, seed: int = 4) -> dict:
    """Impression ``i`` read at ``i / rate`` s, clicked with probability ``sigmoid(b + x . w)`` where ``w`` changes halfway
    (half of its weights flip sign), the click read ``Exp(delay)`` s later."""
    rng = np.random.default_rng(seed)
    t_f = np.arange(n) / rate
    keys = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    x = rng.standard_normal((n, WIDTH)).astype(np.float32)
    w1 = rng.normal(0.0, 0.8, WIDTH)
    w2 = w1.copy()
    w2[::2] *= -1.0
    after = np.arange(n) >= n // 2
    logit = -2.0 + np.where(after[:, None], x @ w2[:, None], x @ w1[:, None])[:, 0]
    clicked = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    c = np.flatnonzero(clicked)
    t_l = t_f[c] + rng.exponential(delay, len(c))
    span = batch / rate
    ids = np.zeros((n, FIELDS), np.int64)
    s = consumed_batches(t_f, partitions, keys, x, ids, clicked.astype(np.float32), c, t_l, batch, span)
    quarters = [np.arange(n) * 4 // n == q for q in range(4)]  # the change is where the third begins
    s.update(t_f=t_f, y=clicked.astype(np.float64), logit=logit, quarters=quarters, delay=t_l - t_f[c], span=span)
    return s


def learner_config(lr: float) -> Config:
    return config_from_dict(
        {
            "kafka": {"topics": ["imp"]},
            "data": {"format": "json", "features": [f"f{i}" for i in range(WIDTH)]},
            "model": {"name": "logistic"},
            "trainer": {"task": "binary", "lr": lr, "device": "cpu"},
            "ring": {"batch_size": 256},
        }
    )


def run_learning(stream: dict, window: float | None, lr: float, batch_size: int = 256) -> dict:
    """Train a fresh Learner on ``stream``: labels inline (``window`` None) or out of a Joiner with that window."""
    learner = Learner(learner_config(lr))
    n, parts = stream["n"], stream["partitions"]
    logits: list[torch.Tensor] = []
    capture = [False]
    hook = learner.model.register_forward_hook(lambda _m, _i, out: logits.append(out.detach().reshape(-1)) if capture[0] else None)
    serve = np.empty(n)
    trained_id, trained_y, trained_at = [], [], []
    buf_x: list[np.ndarray] = []
    buf_y: list[np.ndarray] = []
    buf_i: list[np.ndarray] = []
    buffered = [0]

    def train(now: float, last: bool = False) -> None:
        while buffered[0] >= batch_size or (last and buffered[0]):
            bx, by, bi = np.concatenate(buf_x), np.concatenate(buf_y), np.concatenate(buf_i)
            k = min(batch_size, len(bx))
            capture[0] = True
            r = learner.step(Batch(torch.from_numpy(bx[:k]), torch.from_numpy(by[:k])))
            capture[0] = False
            assert r.skipped is None, r
            trained_id.append(bi[:k])
            trained_y.append(by[:k])
            trained_at.append(np.full(k, now))
            buf_x[:], buf_y[:], buf_i[:] = [bx[k:]], [by[k:]], [bi[k:]]
            buffered[0] = len(bx) - k

    def add(x: np.ndarray, y: np.ndarray, i: np.ndarray) -> None:
        buf_x.append(x)
        buf_y.append(y.astype(np.float32))
        buf_i.append(i)
        buffered[0] += len(x)

    clock = FakeClock(0.0)
    j = None if window is None else make_joiner(window, 10 * n, clock)
    start = time.perf_counter()
    for t, feats, labs in stream["batches"]:
        clock.t = t
        if feats:  # the model as it stands when these impressions arrive: what serving it predicts for them
            fx = np.concatenate([f[4] for f in feats])
            fi = np.concatenate([f[1] * parts + f[0] for f in feats])
            with torch.no_grad():
                serve[fi] = learner.model(learner.normalizer.inputs(torch.from_numpy(fx))).reshape(-1).numpy()
        if j is None:
            if feats:
                order = np.argsort(fi)
                add(fx[order], stream["y"][fi[order]], fi[order])
        else:
            feed(j, feats, labs)
            out = j.take()
            if out is not None and len(out.y):
                add(out.x, out.y, out.marks_off[:, 0] * parts + out.marks_tp[:, 0])
        train(t)
    if j is not None:  # the last window passes, a second at a time: every impression leaves at its own expiry
        while clock.t < stream["end"] + window + 1.0:
            clock.t += 1.0
            j.tick()
            out = j.take()
            if out is not None and len(out.y):
                add(out.x, out.y, out.marks_off[:, 0] * parts + out.marks_tp[:, 0])
            train(clock.t)
    train(clock.t, last=True)
    seconds = time.perf_counter() - start
    hook.remove()
    ids, y_trained, at = np.concatenate(trained_id), np.concatenate(trained_y).astype(np.float64), np.concatenate(trained_at)
    z = torch.cat(logits).double().numpy()
    assert len(z) == len(ids) == n and len(np.unique(ids)) == n, (len(z), len(ids), n)
    y_true = stream["y"][ids]
    preq = learner.prequential
    own = preq.loss / preq.samples
    mine = float(logloss(z, y_trained).mean())
    assert abs(own - mine) < 1e-3 * max(1.0, own), (own, mine)  # the learner's own totals: the same loss
    serve_loss = logloss(serve, stream["y"])
    clicks = stream["y"].sum()
    return {
        "loss_trained": own,
        "loss_true": float(logloss(z, y_true).mean()),
        "serve": [float(serve_loss[q].mean()) for q in stream["quarters"]],
        "false_neg": float(((y_trained < 0.5) & (y_true > 0.5)).sum() / clicks),
        "delay": float((at - stream["t_f"][ids]).mean()),
        "seconds": seconds,
        "steps": learner.step_count,
        "stats": None if j is None else j.stats,
    }


def cost_of_waiting(args: argparse.Namespace) -> None:
    stream = delayed_click_stream(args.learn_impressions, args.partitions, args.learn_rate, args.delay, args.learn_batch)
    y, z, quarters = stream["y"], stream["logit"], stream["quarters"]
    windows = [float(v) for v in args.windows.split(",")]
    runs = [("labels inline (known at once)", None)] + [(f"joined, window {w:g} s", w) for w in windows]
    rows = []
    took = []
    for name, w in runs:
        r = run_learning(stream, w, args.lr)
        took.append(f"{r['seconds']:.1f}")
        late = "" if r["stats"] is None else f"{(r['stats'].late + r['stats'].unmatched) / stream['clicks']:.1%}"
        rows.append(
            [
                name,
                f"{r['loss_trained']:.4f}",
                f"{r['loss_true']:.4f}",
                *(f"{v:.4f}" for v in r["serve"]),
                f"{r['false_neg']:.1%}",
                late,
                f"{r['delay']:.1f}",
            ]
        )
    bayes = logloss(z, y)
    rows.append(
        [
            "the true probabilities (the best any model does)",
            "",
            f"{bayes.mean():.4f}",
            *(f"{bayes[q].mean():.4f}" for q in quarters),
            "",
            "",
            "",
        ]
    )
    const = []
    for q in quarters:
        p = y[q].mean()
        const.append(f"{float(logloss(np.full(int(q.sum()), np.log(p / (1 - p))), y[q]).mean()):.4f}")
    rows.append(["the quarter's click rate (a constant)", "", "", *const, "", "", ""])
    n, d, span = stream["n"], stream["delay"], stream["span"]
    n_s = n / args.learn_rate
    q_s = n_s / 4
    print(
        f"\n## 4. The cost of waiting: {n:,} impressions over {args.partitions} partitions, {args.learn_rate:g}/s of simulated "
        f"time ({n_s:,.0f} s), {stream['clicks']:,} clicked ({y.mean():.1%}; half the click's weights flip sign at "
        f"{n_s / 2:,.0f} s), each click {d.mean():.0f} s later on average (exponential); model logistic, SGD lr "
        f"{args.lr:g}, batches of 256"
    )
    print()
    print(
        table(
            [
                "run",
                "at training: log loss vs the label trained on",
                "vs the true label",
                *(f"serving, {q * q_s:,.0f}-{(q + 1) * q_s:,.0f} s" for q in range(4)),
                "clicks trained as 0",
                "late + unmatched",
                "s to training",
            ],
            rows,
        )
    )
    fn = {w: float(np.mean(d > w)) for w in windows}
    print(
        "\nat training: the prediction of the step's forward pass (before its update), over every impression; the first "
        "column is the daemon's own prequential loss (Learner.prequential).  serving: the log loss against the click of "
        "the model as it stands when the impression arrives, per quarter of the impressions (the change at the third).  "
        "A joined run's loss at training can beat the true probabilities: its clicks are trained as they come and its "
        "negatives a window later, so the first window trains clicks only (the model then predicts clicks for the clicks, "
        "and for every impression it serves) and the last one negatives only; the daemon's prequential loss under a join "
        "is not what serving gets.  "
        f"Clicks later than the window: {', '.join(f'{fn[w]:.1%} at {w:g} s' for w in windows)} (the exponential's tail; "
        "trained as negatives: false negatives).  s to training: mean time from the impression to the step that trains "
        f"it (the batch of 256 filling included).  Each run {', '.join(took)} s; consumed batches of at most "
        f"{args.learn_batch} messages ({span:g} s)"
    )


def machine() -> str:
    return (
        f"machine: {platform.platform()}; {platform.processor() or platform.machine()}; cpus {os.cpu_count()}; "
        f"python {platform.python_version()}; numpy {np.__version__}; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.join", description=__doc__.split("\n\n")[0])
    ap.add_argument("--impressions", type=int, default=200_000, help="impressions of the click stream (1.)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--clicked", type=float, default=0.05, help="fraction of impressions with a label (1.)")
    ap.add_argument("--window", type=float, default=30.0, help="labels.window_seconds of the click stream (1.)")
    ap.add_argument("--rate", type=float, default=2000.0, help="impressions per second of simulated time (1.)")
    ap.add_argument("--batch", type=int, default=1000, help="messages (of both topics) per consumed batch (1.)")
    ap.add_argument("--pending", type=int, default=200_000, help="records waiting for the memory measure (2.)")
    ap.add_argument("--window-offsets", type=int, default=1_000_000, help="offsets past the position for the done set (3.)")
    ap.add_argument("--learn-impressions", type=int, default=200_000, help="impressions of the delayed click stream (4.)")
    ap.add_argument("--learn-rate", type=float, default=200.0, help="its impressions per second of simulated time (4.)")
    ap.add_argument("--learn-batch", type=int, default=200, help="its messages per consumed batch (4.)")
    ap.add_argument("--delay", type=float, default=60.0, help="mean delay of a click, seconds (4.)")
    ap.add_argument("--windows", default="30,300", help="labels.window_seconds of the joined runs, comma-separated (4.)")
    ap.add_argument("--lr", type=float, default=0.3, help="trainer.lr of the learner (4.)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["throughput", "memory", "done", "waiting"], help="run one of the four")
    args = ap.parse_args(argv)
    print(machine(), flush=True)
    t = time.perf_counter()
    for name, section in (("throughput", throughput), ("memory", memory), ("done", done_set), ("waiting", cost_of_waiting)):
        if args.only in (None, name):
            s = time.perf_counter()
            section(args)
            print(f"({time.perf_counter() - s:.1f} s)", flush=True)
    print(f"\n{time.perf_counter() - t:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
