"""Helpers for the fault suite: a concurrent ledger producer, reading the ledger back, RSS, a results table."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from confluent_kafka import Producer

from streamtrain.daemon.snapshot import SnapshotStore
from tests.daemon_util import daemon_config

LEDGER = "tests.ledger_model:Ledger"
RESULTS: list[dict[str, Any]] = []  # one row per fault test, printed at the end of the session


LEDGER_DATA = {  # the ledger's (partition, sequence, f) as features a, b, c (bench/hostile.py's names) in each format
    "raw": {"format": "raw", "num_features": 3, "features": []},
    "json": {"format": "json", "features": ["a", "b", "c"], "label": "y"},
    "csv": {"format": "csv", "features": ["a", "b", "c"], "label": "y"},
    "arrow": {"format": "arrow", "features": ["a", "b", "c"], "label": "y"},
}
TOMBSTONE = b"<tombstone>"  # what a value() hook returns for a record with a null value
LEDGER_CATEGORICAL = {**LEDGER_DATA["json"], "categorical": ["user", "item"], "hash_buckets": 4096}


def categories(partition: int, seq: int) -> tuple[str | None, int]:
    """The ledger's categorical values for a record: a user (missing for one in 11) and an integer item id."""
    return (None if seq % 11 == 0 else f"user-{(partition * 7919 + seq) % 997}"), seq % 13


def categorical_record(partition: int, seq: int, rng: random.Random) -> bytes:
    f = float(np.float32(rng.uniform(-1, 1)))
    user, item = categories(partition, seq)
    return json.dumps({"a": partition, "b": seq, "c": f, "user": user, "item": item, "y": 2 * f + 1}).encode()


def expected_idsum(producer: LedgerProducer) -> list[float]:
    """Per partition: the sum of the table rows of every record the producer delivered (sequences 1..n)."""
    from streamtrain.streams.features import FeatureSpec

    spec = FeatureSpec(categorical=("user", "item"), buckets=LEDGER_CATEGORICAL["hash_buckets"])
    out = []
    for p in range(producer.partitions):
        seqs = range(1, producer.next_seq[p])
        users, items = zip(*(categories(p, s) for s in seqs)) if len(seqs) else ((), ())
        out.append(float(spec.rows(0, list(users)).sum() + spec.rows(1, list(items)).sum()) if len(seqs) else 0.0)
    return out


def ledger_config(
    tmp_path: Path, bootstrap: str, topic: str, partitions: int = 4, fmt: str = "raw", **sections: dict[str, Any]
) -> dict[str, Any]:
    """A daemon config training the ledger model on (partition, sequence, f) records (raw by default)."""
    model = {"name": LEDGER, "params": {"partitions": partitions, **sections.pop("ledger", {})}}
    cfg = daemon_config(
        tmp_path,
        bootstrap,
        [topic],
        data=dict(LEDGER_CATEGORICAL if fmt == "categorical" else LEDGER_DATA[fmt]),
        model=model,
        trainer={"standardize": False, "lr": 0.01, "optimizer": "sgd"},
        ring={"batch_size": 64, "slots": 4, "max_batch_wait_ms": 20},
        snapshot={"every_seconds": 0.5, "keep": 3},
    )
    cfg["model"] = model
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def ledger_record(partition: int, seq: int, rng: random.Random, fmt: str = "raw") -> bytes:
    if fmt == "categorical":
        return categorical_record(partition, seq, rng)
    f = float(np.float32(rng.uniform(-1, 1)))
    if fmt == "raw":
        return np.array([partition, seq, f, 2 * f + 1], dtype="<f4").tobytes()
    if fmt == "json":
        return json.dumps({"a": partition, "b": seq, "c": f, "y": 2 * f + 1}).encode()
    if fmt == "csv":
        return f"{partition},{seq},{f!r},{2 * f + 1!r}".encode()
    from bench.hostile import ipc

    return ipc(pa.table({"a": [float(partition)], "b": [float(seq)], "c": [f], "y": [2 * f + 1]}))


class LedgerProducer:
    """Writes (partition, sequence) records; knows exactly what was delivered, per partition."""

    def __init__(
        self, bootstrap: str, topic: str, partitions: int = 4, silent: tuple[int, ...] = (), fmt: str = "raw", **settings: Any
    ) -> None:
        """``silent``: partitions of the topic that get no record; ``fmt``: the records' format; ``settings``: the producer's."""
        self.topic = topic
        self.partitions = partitions
        self.fmt = fmt
        self.targets = [p for p in range(partitions) if p not in silent]
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", "message.timeout.ms": 120_000, **settings})
        self.next_seq = [1] * partitions
        self.count = [0] * partitions
        self.seqsum = [0] * partitions
        self.end = [0] * partitions  # next offset per partition, from delivery reports
        self.errors: list[str] = []
        self.rng = random.Random(7)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _delivered(self, err, msg, seq: int) -> None:
        if err is not None:
            self.errors.append(err.str())
            return
        p = msg.partition()
        with self._lock:
            self.count[p] += 1
            self.seqsum[p] += seq
            self.end[p] = max(self.end[p], msg.offset() + 1)

    def send(self, n: int, value: Callable[[int, int], bytes] | None = None) -> list[tuple[int, int]]:
        """Send n records round-robin; ``value(p, seq)`` may replace a record (returns (p, seq) of each)."""
        sent = []
        for i in range(n):
            p = self.targets[i % len(self.targets)]
            seq = self.next_seq[p]
            self.next_seq[p] += 1
            body = value(p, seq) if value else None
            body = body if body is not None else ledger_record(p, seq, self.rng, self.fmt)
            self._produce(p, seq, None if body is TOMBSTONE else body)
            sent.append((p, seq))
            if i % 1000 == 0:
                self.producer.poll(0)
        return sent

    def _produce(self, p: int, seq: int, body: bytes | None) -> None:
        def delivered(err, msg) -> None:
            self._delivered(err, msg, seq)

        while True:
            try:
                self.producer.produce(self.topic, value=body, partition=p, on_delivery=delivered)
                return
            except BufferError:
                self.producer.poll(0.05)

    def start(self, rate: float, value: Callable[[int, int], bytes] | None = None) -> None:
        """Produce ``rate`` records/s in the background until :meth:`stop` (``value`` as for :meth:`send`)."""

        def run() -> None:
            chunk = max(1, int(rate / 50))
            while not self._stop.is_set():
                t0 = time.monotonic()
                self.send(chunk, value)
                self.producer.poll(0)
                self._stop.wait(max(0.0, 0.02 - (time.monotonic() - t0)))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        left = self.producer.flush(timeout)
        assert left == 0 and not self.errors, f"{left} undelivered, errors {self.errors[:3]}"

    @property
    def total(self) -> int:
        return sum(self.count)

    def expected(self) -> dict[str, list[int]]:
        return {"count": list(self.count), "seqsum": list(self.seqsum)}


def read_ledger(snapshot_dir: Path) -> dict[str, Any]:
    """The ledger buffers of the newest valid snapshot."""
    restored = SnapshotStore(snapshot_dir).load_latest()
    assert restored is not None, f"no valid snapshot in {snapshot_dir}"
    info, state = restored
    m = state["model"]
    as_ints = lambda t: [int(v) for v in t.tolist()]  # noqa: E731
    return {
        "count": as_ints(m["count"]),
        "seqsum": as_ints(m["seqsum"]),
        "skipped": as_ints(m["skipped"]),
        "skipped_seqsum": as_ints(m["skipped_seqsum"]),
        "skipped_steps": int(m["skipped_steps"]),
        "idsum": [float(v) for v in m["idsum"].tolist()] if "idsum" in m else [],
        "meta": info.meta,
    }


def assert_exact(ledger: dict[str, Any], producer: LedgerProducer, excluded: dict[str, list[int]] | None = None) -> tuple[int, int]:
    """ledger (+ skipped) == produced (- excluded), per partition; returns (lost, duplicated) records."""
    want = producer.expected()
    if excluded:
        want = {k: [a - b for a, b in zip(want[k], excluded[k])] for k in want}
    got_count = [a + b for a, b in zip(ledger["count"], ledger["skipped"])]
    got_sum = [a + b for a, b in zip(ledger["seqsum"], ledger["skipped_seqsum"])]
    lost = sum(max(0, w - g) for w, g in zip(want["count"], got_count))
    dup = sum(max(0, g - w) for w, g in zip(want["count"], got_count))
    assert got_count == want["count"] and got_sum == want["seqsum"], (
        f"ledger != produced: counts {got_count} vs {want['count']}, seq sums {got_sum} vs {want['seqsum']}"
    )
    return lost, dup


def in_flight_snapshot(snapshot_dir: Path) -> bool:
    """A snapshot write is under way (or was cut off): a temp dir or a snapshot without its manifest."""
    d = Path(snapshot_dir)
    if not d.exists():
        return False
    for p in d.iterdir():
        if p.name.startswith(".tmp-") and not p.name.endswith("-pruned"):
            return True
        if p.name.startswith("snap-") and not (p / "MANIFEST.json").exists():
            return True
    return False


def snapshots_finite(snapshot_dir: Path) -> int:
    """Load every snapshot in the directory; assert each is free of NaN/Inf; return how many."""
    from streamtrain.daemon.snapshot_writer import tensors_finite

    store = SnapshotStore(snapshot_dir)
    n = 0
    for info in store.list():
        state = torch.load(info.path / "state.pt", weights_only=True)
        assert tensors_finite(state), f"{info.name} holds a non-finite tensor"
        n += 1
    return n


def record(fault: str, **row: Any) -> None:
    """Add a row to the reliability table printed at the end of the session."""
    RESULTS.append({"fault": fault, **row})


def results_table() -> str:
    if not RESULTS:
        return ""
    cols = ["fault", "trials", "produced", "lost", "duplicated", "recovery", "notes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in RESULTS:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def dump_results(path: Path) -> None:
    path.write_text("\n".join(json.dumps(r) for r in RESULTS) + "\n")
