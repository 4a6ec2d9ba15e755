"""Integration tests for streams.dataset.KafkaIterableDataset against a real Kafka-protocol broker.

Every record carries a ``seq`` feature that names it, so "each record exactly once" is
checked by seq.  End offsets come from the producer's delivery reports (TestProducer).
"""

from __future__ import annotations

import collections
import json
import threading
import time

import pyarrow as pa
import pytest
from torch.utils.data import DataLoader

from streamtrain.streams.dataset import KafkaIterableDataset
from streamtrain.streams.errors import StreamtrainError
from tests.kafka_util import TestProducer, committed_offsets, create_topic, read_topic, unique_name

pytestmark = pytest.mark.integration

JSON = {"format": "json", "features": ["seq", "f"], "label": "y"}
ARROW = {"format": "arrow", "features": ["seq", "f"], "label": "y"}
IDLE = 1.5  # idle_timeout_s: a stream that has been fully read ends after this long
DEADLINE = 30.0  # bound on waiting for records that were produced
INGEST_MODES = ["process", "thread"]  # ring.ingest: the default and the in-process alternative


def record(i: int) -> bytes:
    return json.dumps({"seq": i, "f": i / 2, "y": i % 2}).encode()


def arrow_message(start: int, rows: int) -> bytes:
    seq = list(range(start, start + rows))
    table = pa.table({"seq": [float(i) for i in seq], "f": [i / 2 for i in seq], "y": [float(i % 2) for i in seq]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def produce(producer: TestProducer, topic: str, values: list[bytes], partitions: int) -> None:
    producer.send_all(topic, values, partitions=partitions)
    producer.flush()


def seqs(batch) -> list[int]:
    assert len(batch.x) == len(batch.y)
    return [int(v) for v in batch.x[:, 0].tolist()]


def offsets(positions: dict) -> dict:
    """Positions of whole records as plain offsets (fails on a position inside a record)."""
    assert all(rows == 0 for _, rows in positions.values()), positions
    return {tp: off for tp, (off, _) in positions.items()}


def take(ds: KafkaIterableDataset, n: int, timeout: float = DEADLINE) -> list[int]:
    """Seqs of the next ``n`` records, bounded in time."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        batch = ds.next_batch(0.2)
        if batch is not None:
            got += seqs(batch)
    assert len(got) == n, f"expected {n} records within {timeout} s, got {len(got)}"
    return got


def assert_nothing_more(ds: KafkaIterableDataset) -> None:
    assert ds.next_batch(0.5) is None


def assert_once(seen: list[int], expected: range | set | list) -> None:
    dup = [s for s, c in collections.Counter(seen).items() if c > 1]
    assert not dup, f"seen twice: {dup[:10]}"
    assert set(seen) == set(expected)


def within(fn, timeout: float = DEADLINE):
    """``fn()`` run in a helper thread; fails (instead of hanging) if it is still blocked after ``timeout`` s."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} still blocked after {timeout} s"
    return out[0]


@pytest.fixture
def dataset(bootstrap, make_topic):
    """Factory: a KafkaIterableDataset on the test broker, with its own dead-letter topic and group; closed at the end."""
    made: list[KafkaIterableDataset] = []

    def make(topics: list[str], data: dict = JSON, ring: dict | None = None, kafka: dict | None = None, **kwargs) -> KafkaIterableDataset:
        raw = {
            "kafka": {"bootstrap_servers": bootstrap, "topics": topics, "group_id": unique_name("st-group"), **(kafka or {})},
            "data": data,
            "ring": {"batch_size": 64, **(ring or {})},
            "dead_letter": {"topic": make_topic(1, prefix="dead-letter"), "timeout_s": 10},
        }
        kwargs.setdefault("idle_timeout_s", IDLE)
        ds = KafkaIterableDataset.from_dict(raw, **kwargs)
        made.append(ds)
        return ds

    yield make
    for ds in made:
        ds.close()


@pytest.fixture
def producer(bootstrap) -> TestProducer:
    return TestProducer(bootstrap)


@pytest.mark.parametrize("ingest", INGEST_MODES)
def test_every_record_once_positions_and_commit(bootstrap, make_topic, dataset, producer, ingest):
    topic = make_topic(4)
    n = 3000
    produce(producer, topic, [record(i) for i in range(n)], partitions=4)
    ds = dataset([topic], ring={"ingest": ingest})
    seen = []
    for batch in DataLoader(ds, batch_size=None):
        assert 0 < len(batch) <= 64
        seen += seqs(batch)
        assert batch.y.tolist() == [float(s % 2) for s in seqs(batch)]
        assert batch.x[:, 1].tolist() == [s / 2 for s in seqs(batch)]
    assert_once(seen, range(n))
    assert offsets(ds.positions) == producer.end
    assert ds.stats.rows == n and ds.stats.rejected == {}
    ds.commit()  # after the loop ended (the consumer is closed by then)
    assert committed_offsets(bootstrap, ds.kafka.group_id, list(producer.end)) == producer.end


def test_commit_and_lag_from_another_thread_while_the_stream_is_idle(bootstrap, make_topic, dataset, producer):
    """The ingest thread polls the consumer back to back: calls from other threads must not wait behind it."""
    topic = make_topic(2)
    produce(producer, topic, [record(i) for i in range(100)], partitions=2)
    ds = dataset([topic])
    assert_once(take(ds, 100), range(100))
    time.sleep(0.3)  # the ingest thread is now polling an idle stream
    within(ds.commit)
    assert committed_offsets(bootstrap, ds.kafka.group_id, list(producer.end)) == producer.end
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        ds.pump()  # the ingest process's latest status
        if within(ds.source.high_watermarks) == producer.end:
            break
        time.sleep(0.1)
    assert within(ds.source.high_watermarks) == producer.end


@pytest.mark.parametrize("ingest", INGEST_MODES)
def test_garbage_goes_to_the_dead_letter_topic(bootstrap, make_topic, dataset, producer, ingest):
    topic = make_topic(4)
    n = 2000
    bad = {i: kind for i, kind in zip(range(7, n, 100), ["undecodable", "missing_label", "non_finite", "wrong_shape"] * 5)}
    garbage = {
        "undecodable": lambda i: b"\xffgarbage %d" % i,
        "missing_label": lambda i: json.dumps({"seq": i, "f": 1}).encode(),
        "non_finite": lambda i: b'{"seq": %d, "f": NaN, "y": 1}' % i,
        "wrong_shape": lambda i: json.dumps({"seq": i, "f": "x", "y": 1}).encode(),  # (an absent f: missing, imputed)
    }
    values = [garbage[bad[i]](i) if i in bad else record(i) for i in range(n)]
    produce(producer, topic, values, partitions=4)
    ds = dataset([topic], ring={"ingest": ingest})
    seen = [s for batch in DataLoader(ds, batch_size=None) for s in seqs(batch)]
    assert_once(seen, set(range(n)) - set(bad))
    assert offsets(ds.positions) == producer.end  # rejected records count as done too
    assert ds.stats.rejected == dict(collections.Counter(bad.values()))

    source = {(m.partition(), m.offset()): m.value() for m in read_topic(bootstrap, topic, n)}
    letters = read_topic(bootstrap, ds.dead_letter_config.topic, len(bad))
    assert len(letters) == len(bad)
    reason_of = {values[i]: kind for i, kind in bad.items()}
    for m in letters:
        h = {k: v.decode() for k, v in m.headers()}
        assert h["streamtrain.source.topic"] == topic
        assert source[(int(h["streamtrain.source.partition"]), int(h["streamtrain.source.offset"]))] == m.value()
        assert h["streamtrain.error.class"] == reason_of[m.value()]
        assert h["streamtrain.error.message"]
    assert {m.value() for m in letters} == set(reason_of)


def test_resume_from_state_dict_has_no_gap_and_no_overlap(make_topic, dataset, producer):
    topic = make_topic(4)
    produce(producer, topic, [record(i) for i in range(1000)], partitions=4)
    first = dataset([topic], ring={"batch_size": 32})
    seen = []
    for batch in DataLoader(first, batch_size=None):
        seen += seqs(batch)
        if len(seen) >= 300:
            break
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would keep it
    first.close()
    assert 300 <= len(seen) < 1000

    produce(producer, topic, [record(i) for i in range(1000, 1500)], partitions=4)
    second = dataset([topic], ring={"batch_size": 32})  # a fresh group: only the state says where to start
    second.load_state_dict(state)
    rest = take(second, 1500 - len(seen))
    assert_nothing_more(second)
    assert_once(seen + rest, range(1500))
    assert offsets(second.positions) == producer.end


def test_resume_inside_arrow_records(make_topic, dataset, producer):
    """100 rows per message, 64 per batch: the state falls inside a record; its trained rows are skipped."""
    topic = make_topic(3)
    messages, rows = 30, 100
    produce(producer, topic, [arrow_message(m * rows, rows) for m in range(messages)], partitions=3)
    first = dataset([topic], data=ARROW)
    seen: list[int] = []
    state = first.state_dict()
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        batch = first.next_batch(0.2)
        if batch is not None:
            seen += seqs(batch)
            state = first.state_dict()
            if len(seen) >= 500 and any(r > 0 for *_, r in state["positions"]):
                break
    first.close()
    assert any(r > 0 for *_, r in state["positions"]), "no batch ended inside a record"
    total = messages * rows

    second = dataset([topic], data=ARROW)
    second.load_state_dict(state)
    rest = take(second, total - len(seen))
    assert_nothing_more(second)
    assert_once(seen + rest, range(total))
    assert offsets(second.positions) == producer.end


def test_a_slow_trickle_is_batched_by_max_wait(make_topic, dataset, producer):
    topic = make_topic(1)
    ds = dataset([topic], ring={"batch_size": 1000, "max_batch_wait_ms": 100}, idle_timeout_s=DEADLINE)
    ds.start()
    for i in range(5):
        producer.send(topic, record(i))
        producer.flush()
        time.sleep(0.05)
    # a batch far from full closes after max_batch_wait_ms, long before the idle timeout
    seen: list[int] = []
    deadline = time.monotonic() + DEADLINE
    while len(seen) < 5 and time.monotonic() < deadline:
        batch = ds.next_batch(DEADLINE)
        assert batch is not None and 0 < len(batch) < 1000
        seen += seqs(batch)
    assert seen == list(range(5))


def test_batch_size_one(make_topic, dataset, producer):
    topic = make_topic(2)
    produce(producer, topic, [record(i) for i in range(20)], partitions=2)
    ds = dataset([topic], ring={"batch_size": 1})
    seen = []
    for batch in DataLoader(ds, batch_size=None):  # a batch is valid until the next one is asked for
        assert len(batch) == 1
        seen += seqs(batch)
    assert_once(seen, range(20))
    assert offsets(ds.positions) == producer.end


def test_a_topic_created_later_is_picked_up(bootstrap, make_topic, dataset, producer):
    early = make_topic(2)
    late = unique_name("st-late-topic")
    ds = dataset([early, late], kafka={"metadata_refresh_s": 0.5})
    produce(producer, early, [record(i) for i in range(10)], partitions=2)
    assert_once(take(ds, 10), range(10))

    create_topic(bootstrap, late, 2)
    produce(producer, late, [record(i) for i in range(100, 120)], partitions=2)
    assert_once(take(ds, 20), range(100, 120))
    assert offsets(ds.positions) == producer.end


@pytest.mark.parametrize("workers", [1, 2])
def test_partitions_added_later_are_picked_up(bootstrap, make_topic, dataset, producer, workers):
    """Needs CreatePartitions: Apache Kafka has it (STREAMTRAIN_TEST_BOOTSTRAP), the embedded Tansu does not."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewPartitions

    topic = make_topic(2)
    ds = dataset([topic], kafka={"metadata_refresh_s": 0.5}, ring={"ingest_workers": workers})
    produce(producer, topic, [record(i) for i in range(10)], partitions=2)
    assert_once(take(ds, 10), range(10))
    try:
        admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the futures resolve
        for fut in admin.create_partitions([NewPartitions(topic, 4)]).values():
            fut.result(30)
    except KafkaException as exc:
        if exc.args[0].code() == KafkaError._UNSUPPORTED_FEATURE:
            pytest.skip(f"the broker does not support CreatePartitions: {exc.args[0].str()}")
        raise
    within(lambda: _wait_partitions(bootstrap, topic, 4))
    values = [record(i) for i in range(100, 140)]
    for i, v in enumerate(values):
        producer.send(topic, v, partition=2 + i % 2)  # only the new partitions
    producer.flush()
    assert_once(take(ds, 40), range(100, 140))
    assert offsets(ds.positions) == producer.end


def _wait_partitions(bootstrap: str, topic: str, n: int) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    while len(admin.list_topics(topic, timeout=5).topics[topic].partitions) < n:
        time.sleep(0.1)


@pytest.mark.parametrize("workers", [1, 2])
def test_dataloader_workers_are_refused(workers):
    """Even one worker: state_dict() and commit() in the main process would see no position at all."""
    ds = KafkaIterableDataset.from_dict({"kafka": {"bootstrap_servers": "127.0.0.1:1", "topics": ["t"]}, "data": JSON}, idle_timeout_s=0.1)
    # spawn: forked workers of a process with live librdkafka threads can hang on shutdown
    loader = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context="spawn")
    with pytest.raises(StreamtrainError, match=r"num_workers=0"):
        next(iter(loader))


@pytest.mark.parametrize("ingest", INGEST_MODES)
def test_a_full_ring_pauses_the_consumer_and_nothing_is_lost(make_topic, dataset, producer, ingest):
    topic = make_topic(4)
    n = 20000
    produce(producer, topic, [record(i) for i in range(n)], partitions=4)
    ds = dataset([topic], ring={"slots": 2, "batch_size": 16, "ingest": ingest})
    ds.start()
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        ds.pump()
        if ds.source.pauses >= 1:
            break
        time.sleep(0.05)  # nobody takes batches: the ring fills up
    assert ds.source.pauses >= 1
    assert ds.ring.fill() == 2
    assert_once(take(ds, n), range(n))
    assert_nothing_more(ds)
    assert offsets(ds.positions) == producer.end


@pytest.mark.parametrize("ingest", INGEST_MODES)
def test_connected_and_assigned_as_soon_as_a_batch_comes(make_topic, dataset, producer, ingest):
    """Readiness (/readyz) must not say "connecting" while batches already train (seen once in CI)."""
    topic = make_topic(4)
    produce(producer, topic, [record(i) for i in range(1000)], partitions=4)
    ds = dataset([topic], ring={"ingest": ingest})
    batch = ds.next_batch(timeout=DEADLINE)
    assert batch is not None
    assert ds.connected and sorted(ds.source.assigned) == [(topic, p) for p in range(4)]


@pytest.mark.integration
def test_a_commit_that_fails_for_one_partition_raises(bootstrap, make_topic):
    """A commit the broker refuses raises (the trainer counts it in streamtrain_commit_failures_total), never passes as done."""
    from streamtrain.streams.config import KafkaConfig
    from streamtrain.streams.errors import KafkaSourceError
    from streamtrain.streams.source import KafkaSource

    topic = make_topic(2)
    source = KafkaSource(KafkaConfig(bootstrap_servers=bootstrap, topics=(topic,), group_id=unique_name("g")))
    source.open_for_commits()
    try:
        source.commit({(topic, 0): (5, 0)})
        assert committed_offsets(bootstrap, source.kafka.group_id, [(topic, 0)])[(topic, 0)] == 5
        with pytest.raises(KafkaSourceError, match="could not commit"):
            # a topic that does not exist (Tansu stores a commit for an unknown partition of a known topic)
            source.commit({(topic, 0): (6, 0), (unique_name("gone"), 0): (1, 0)})
    finally:
        source.close()


@pytest.mark.integration
def test_end_offsets_are_listed_in_one_request_and_a_failing_partition_leaves_the_others(bootstrap, make_topic, producer):
    """The metadata thread lists every partition's end at once; one that cannot be listed does not hide the rest."""
    from streamtrain.streams.config import KafkaConfig
    from streamtrain.streams.source import KafkaSource

    topic = make_topic(3)
    for p in range(3):
        for _ in range(p + 1):
            producer.send(topic, b"x", partition=p)
    producer.flush(30)
    source = KafkaSource(KafkaConfig(bootstrap_servers=bootstrap, topics=(topic,), group_id=unique_name("g")))
    try:
        # a partition that does not exist, listed first: it fails alone
        source._list_watermarks([(unique_name("gone"), 0), (topic, 0), (topic, 1), (topic, 2)], timeout=10)
        listed = {tp: hi for tp, hi in source._listed_hwm.items() if tp[0] == topic}
        assert sorted(listed) == [(topic, 0), (topic, 1), (topic, 2)], listed
        assert all(hi >= 1 for hi in listed.values()), listed
    finally:
        source.close()


@pytest.mark.integration
def test_two_ingest_workers_split_the_partitions_and_every_record_comes_once(bootstrap, make_topic, dataset, producer):
    """Each worker reads the partitions split.owner gives it; together they read each record once, rejects included."""
    from streamtrain.streams.split import owner

    topic, later = make_topic(4), unique_name("later")
    n = 4000
    values = [record(i) if i % 97 else b"{garbage" for i in range(n)]
    produce(producer, topic, values, partitions=4)
    ds = dataset([topic, later], ring={"ingest_workers": 2, "slots": 8}, kafka={"metadata_refresh_s": 0.5})
    good = [i for i in range(n) if i % 97]
    assert_once(take(ds, len(good)), good)
    shares = [set(w.source.assigned) for w in ds.ingest.workers]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == {(topic, p) for p in range(4)}
    assert all(owner(tp, 2) == i for i, share in enumerate(shares) for tp in share)
    create_topic(bootstrap, later, 3)  # found at runtime: each partition goes to its owner
    for i in range(60):
        producer.send(later, record(10_000 + i), partition=i % 3)
    producer.flush()
    assert_once(take(ds, 60), range(10_000, 10_060))
    assert offsets(ds.positions) == producer.end  # the rejected records count as done too
    assert sum(ds.stats.rejected.values()) == n - len(good)
    ds.commit()
    assert committed_offsets(bootstrap, ds.kafka.group_id, list(producer.end)) == producer.end


@pytest.mark.integration
def test_an_ingest_worker_that_dies_ends_the_stream_with_an_error(make_topic, dataset, producer):
    """Never a silent stall: the other workers' batches stop and the error names what happened."""
    import os
    import signal

    topic = make_topic(4)
    produce(producer, topic, [record(i) for i in range(200)], partitions=4)
    ds = dataset([topic], ring={"ingest_workers": 2})
    take(ds, 200)
    os.kill(ds.ingest.workers[1].proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + DEADLINE
    with pytest.raises(StreamtrainError, match="exited unexpectedly"):
        while time.monotonic() < deadline:
            ds.next_batch(timeout=0.2)


# ----------------------------------------------------------------------------- records that only fail themselves


@pytest.mark.parametrize("max_value_bytes", [None, 4 << 20], ids=["default", "over-the-producer-limit"])
def test_a_record_too_large_for_the_dead_letter_topic_goes_cut_to_fit(bootstrap, make_topic, producer, max_value_bytes):
    """Found by trying: a 2 MiB record's letter was refused (Message size too large) and retried forever; training stopped.

    With a limit over the producer's own (1,000,000 bytes), the refusal is permanent and the letter is cut again by half
    until it fits, instead of being retried as it is.
    """
    import hashlib

    from confluent_kafka import Producer

    topic, dlq = make_topic(1), make_topic(1, prefix="dead-letter")
    big = b'{"seq": 5, "f": 1, "y": 0, "pad": "' + b"x" * (2 << 20) + b'"}'
    p = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 8 << 20})
    for i in range(10):
        p.produce(topic, value=big if i == 5 else record(i), partition=0)
    assert p.flush(30) == 0
    raw = {
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": unique_name("st-group")},
        "data": JSON,
        "ring": {"batch_size": 4},
        "dead_letter": {"topic": dlq, "timeout_s": 10, **({"max_value_bytes": max_value_bytes} if max_value_bytes else {})},
    }
    ds = KafkaIterableDataset.from_dict(raw, idle_timeout_s=IDLE)
    try:
        seen = within(lambda: [s for batch in DataLoader(ds, batch_size=None) for s in seqs(batch)])
        assert_once(seen, set(range(10)) - {5})
        assert offsets(ds.positions) == {(topic, 0): 10}, "training went past it"
        assert ds.stats.rejected == {"oversized": 1}
        sent, _failures, truncated, dropped = ds.dead_letter_counts
        assert (sent, truncated, dropped) == (1, 1, 0)
    finally:
        ds.close()
    (letter,) = read_topic(bootstrap, dlq, 1)
    h = {k: v.decode() for k, v in letter.headers()}
    assert h["streamtrain.error.class"] == "oversized" and h["streamtrain.value.truncated"] == "true"
    assert int(h["streamtrain.value.bytes"]) == len(big) and h["streamtrain.value.sha256"] == hashlib.sha256(big).hexdigest()
    assert big.startswith(letter.value()) and len(letter.value()) <= min(max_value_bytes or 524288, 1_000_000)


@pytest.mark.parametrize("ingest", INGEST_MODES)
def test_a_record_that_raises_out_of_the_decoder_is_dead_lettered_and_the_rest_read_once(
    bootstrap, make_topic, dataset, producer, ingest, monkeypatch
):
    monkeypatch.setenv("STREAMTRAIN_FAILPOINTS", "decode=raise:POISON")
    topic = make_topic(4)
    n, poison = 1000, {17, 500, 501}
    values = [b'{"seq": %d, "f": 1, "y": 0, "POISON": 1}' % i if i in poison else record(i) for i in range(n)]
    produce(producer, topic, values, partitions=4)
    ds = dataset([topic], ring={"ingest": ingest})
    seen = within(lambda: [s for batch in DataLoader(ds, batch_size=None) for s in seqs(batch)])
    assert_once(seen, set(range(n)) - poison)
    assert offsets(ds.positions) == producer.end and ds.stats.rejected == {"decoder_crash": 3}
    letters = read_topic(bootstrap, ds.dead_letter_config.topic, len(poison))
    assert sorted(m.value() for m in letters) == sorted(values[i] for i in poison)
    for m in letters:
        h = {k: v.decode() for k, v in m.headers()}
        assert h["streamtrain.error.class"] == "decoder_crash" and h["streamtrain.error.exception"] == "RuntimeError"


def test_a_record_that_crashes_the_ingest_process_is_found_at_the_next_start(tmp_path, bootstrap, make_topic, producer, monkeypatch):
    """A segfault while decoding ends the stream; the next start finds the record in a child process and dead-letters it."""
    monkeypatch.setenv("STREAMTRAIN_FAILPOINTS", "decode=segv:POISON")
    topic, dlq = make_topic(2), make_topic(1, prefix="dead-letter")
    n, poison = 600, 301
    values = [b'{"seq": %d, "f": 1, "y": 0, "POISON": 1}' % i if i == poison else record(i) for i in range(n)]
    produce(producer, topic, values, partitions=2)
    raw = {
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": unique_name("st-group")},
        "data": JSON,
        "ring": {"batch_size": 16},
        "dead_letter": {"topic": dlq, "timeout_s": 10},
    }
    first = KafkaIterableDataset.from_dict(raw, idle_timeout_s=IDLE, markers=str(tmp_path))
    seen: list[int] = []
    with pytest.raises(StreamtrainError, match="exited unexpectedly"):
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            batch = first.next_batch(0.2)
            if batch is not None:
                seen += seqs(batch)
    state = first.state_dict()  # what was handed out: as if trained and snapshotted
    first.close()
    assert list(tmp_path.glob("*.crashed")), "the parent kept the crashed batch's marker"
    again = KafkaIterableDataset.from_dict(raw, markers=str(tmp_path))
    again.load_state_dict(state)
    try:
        seen += take(again, n - 1 - len(seen))
        assert_nothing_more(again)
        assert_once(seen, set(range(n)) - {poison})
        assert again.stats.rejected == {"decoder_crash": 1}
    finally:
        again.close()
    (letter,) = read_topic(bootstrap, dlq, 1)
    h = {k: v.decode() for k, v in letter.headers()}
    assert (
        letter.value() == values[poison] and h["streamtrain.error.class"] == "decoder_crash" and "SIGSEGV" in h["streamtrain.error.message"]
    )


def test_the_end_of_a_partition_just_read_is_the_one_its_fetches_saw(bootstrap, make_topic, producer):
    """A join takes a side whose next offset has reached the partition's end for caught up, and its clock for the wall's.
    So the ends it compares with must not be older than the records just read: here a partition empty when reading
    began (its end noted as 0), then filled.  Without the ingest's note_watermarks after each batch the end stayed 0
    for up to a second (Tansu's listing says 1 for any non-empty partition), and a join of 2 ranks x 2 ingest workers
    counted 9 of 392 clicks late (tests/test_join.py, 3 failures in 12 runs)."""
    from streamtrain.streams.config import KafkaConfig, parse
    from streamtrain.streams.source import KafkaSource

    topic = make_topic(1)
    tp = (topic, 0)
    src = KafkaSource(parse(KafkaConfig, {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": unique_name("g")}, "kafka"))
    src.open()
    try:
        src.consume(10, 0.5)  # nothing there yet: the first note says the end is 0
        produce(producer, topic, [record(i) for i in range(500)], partitions=1)
        deadline, read = time.monotonic() + DEADLINE, 0
        while read < 500 and time.monotonic() < deadline:
            msgs = src.consume(7, 0.5)
            if not msgs:
                continue
            read = msgs[-1].offset() + 1
            src.note_watermarks([tp])
            assert src.high_watermarks().get(tp) == 500, (read, src.high_watermarks())
        assert read == 500
    finally:
        src.close()
