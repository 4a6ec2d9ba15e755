"""Kafka helpers for tests: the embedded broker, topics and producing (``demo/broker.py``), and reading back.

End offsets come from the producer's delivery reports, not from ListOffsets: they are
exact on any broker (Tansu's ListOffsets(latest) answers the last batch's base offset + 1).
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaException, TopicPartition

from demo.broker import ENV_BOOTSTRAP, Broker, TestProducer, create_topic, free_port, start_tansu, unique_name, wait_port  # noqa: F401 -- the tests' helpers too


def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list:
    """Read ``expect`` records from every partition of ``topic`` (bounded in time)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("reader"), "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + timeout
        while True:
            md = c.list_topics(topic, timeout=5).topics.get(topic)
            if md is not None and md.error is None and md.partitions:
                break
            if time.monotonic() > deadline:
                return []
            time.sleep(0.1)
        c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
        out: list = []
        while len(out) < expect and time.monotonic() < deadline:
            for m in c.consume(1000, 0.2):
                if m.error() is None:
                    out.append(m)
        # a moment more, so that extra records (duplicates) would be seen too
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            out.extend(m for m in c.consume(1000, 0.1) if m.error() is None)
        return out
    finally:
        c.close()


def committed_offsets(bootstrap: str, group: str, tps: list[tuple[str, int]], timeout: float = 10.0) -> dict[tuple[str, int], int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(t, p) for t, p in tps], timeout=timeout)
        return {(tp.topic, tp.partition): tp.offset for tp in got}
    except KafkaException:
        return {}
    finally:
        c.close()
