"""The dead-letter producer: every rejected record is written, with why, before it counts as handled.

A rejected record's offset may only move past once its dead-letter copy is
acknowledged by the broker (``acks=all``); otherwise a crash would lose it silently.
So :meth:`DeadLetterQueue.send` returns only when every record is delivered.  When the
topic cannot be written, it retries: forever with ``on_failure=block`` (training
stops advancing past the record, which shows in the metrics and logs), or until
``timeout_s`` with ``on_failure=stop``, then raises :class:`DeadLetterError`.

Delivery is at least once: a record rejected again after a crash and replay is sent
again.  Headers name the source topic, partition, offset, the error class and message.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from streams.config import DeadLetterConfig, KafkaConfig
from streams.decode import Reject
from streams.errors import DeadLetterError

log = logging.getLogger("streamtrain.deadletter")

HEADER_PREFIX = "streamtrain."


@dataclass(frozen=True)
class DeadLetter:
    """One record to send: where it came from and why it was rejected."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    reject: Reject
    extra: tuple[tuple[str, bytes], ...] = ()  # more headers (a skipped step's source ranges)

    def headers(self) -> list[tuple[str, bytes]]:
        h = [
            (HEADER_PREFIX + "source.topic", self.topic.encode()),
            (HEADER_PREFIX + "source.partition", str(self.partition).encode()),
            (HEADER_PREFIX + "source.offset", str(self.offset).encode()),
            (HEADER_PREFIX + "source.timestamp", str(self.timestamp_ms).encode()),
            (HEADER_PREFIX + "error.class", self.reject.reason.encode()),
            (HEADER_PREFIX + "error.message", self.reject.error.encode("utf-8", "replace")[:4096]),
        ]
        if self.reject.rows:
            h.append((HEADER_PREFIX + "error.rows", ",".join(map(str, self.reject.rows)).encode()))
        return h + list(self.extra)


def producer_settings(kafka: KafkaConfig, dl: DeadLetterConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "bootstrap.servers": dl.bootstrap_servers or kafka.bootstrap_servers,
        "client.id": "streamtrain-dead-letter",
        "acks": "all",
        "linger.ms": 5,
        # a delivery that cannot finish in time fails and is retried by send()
        "message.timeout.ms": max(1000, int(dl.timeout_s * 1000)),
    }
    settings.update({k: v for k, v in kafka.settings.items() if not k.startswith(_CONSUMER_ONLY)})
    return settings


_CONSUMER_ONLY = ("fetch.", "queued.", "session.", "heartbeat.", "max.poll", "partition.assignment", "group.", "isolation.", "check.crcs")


class DeadLetterQueue:
    """Writes rejected records to the dead-letter topic; opens lazily."""

    def __init__(self, kafka: KafkaConfig, dl: DeadLetterConfig, stop: threading.Event | None = None) -> None:
        self.kafka = kafka
        self.dl = dl
        self.stop = stop or threading.Event()
        self.producer: Producer | None = None
        self.sent = 0
        self.failures = 0  # failed delivery attempts (each was retried)
        self.blocked_since: float | None = None  # monotonic time the current outage began

    def send(self, letters: list[DeadLetter]) -> None:
        """Deliver every letter or raise DeadLetterError (policy ``stop``) / return early on shutdown."""
        if not letters:
            return
        if self.producer is None:
            from streams.source import make_client

            self.producer = make_client(Producer, producer_settings(self.kafka, self.dl), "kafka.settings", logger=log)
        pending = letters
        started = time.monotonic()
        attempt = 0
        while pending:
            failed: list[tuple[DeadLetter, KafkaError]] = []
            for letter in pending:
                self._produce(letter, failed)
            # message.timeout.ms bounds every delivery, so this ends with each letter delivered or failed
            while self.producer.flush(1.0) > 0:
                if self.stop.is_set():
                    raise DeadLetterError(f"shutdown while rejected records were still being written to {self.dl.topic!r}")
            self.sent += len(pending) - len(failed)
            if not failed:
                if self.blocked_since is not None:
                    log.info("dead-letter topic %s writable again after %.1f s", self.dl.topic, time.monotonic() - self.blocked_since)
                    self.blocked_since = None
                return
            self.failures += 1
            pending = [letter for letter, _ in failed]
            reason = failed[0][1].str()
            if self.blocked_since is None:
                self.blocked_since = started
            waited = time.monotonic() - started
            if self.dl.on_failure == "stop" and waited >= self.dl.timeout_s:
                raise DeadLetterError(
                    f"could not write {len(pending)} rejected record(s) to dead-letter topic {self.dl.topic!r} for {waited:.0f} s "
                    f"({reason}); stopping (dead_letter.on_failure=stop) so they are not lost: their offsets are not committed "
                    "and they will be read again after a restart"
                )
            attempt += 1
            log.warning(
                "cannot write %d rejected record(s) to dead-letter topic %r (%s); retrying (attempt %d, %s)",
                len(pending),
                self.dl.topic,
                reason,
                attempt,
                "blocking until it works" if self.dl.on_failure == "block" else f"stopping after {self.dl.timeout_s:.0f} s",
            )
            if self.stop.wait(min(5.0, 0.2 * 2**attempt)):
                raise DeadLetterError(f"shutdown while {len(pending)} rejected record(s) were not yet in the dead-letter topic")

    def _produce(self, letter: DeadLetter, failed: list) -> None:
        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                failed.append((letter, err))

        while True:
            try:
                self.producer.produce(self.dl.topic, value=letter.value, key=letter.key, headers=letter.headers(), on_delivery=on_delivery)
                return
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:
                failed.append((letter, exc.args[0]))
                return

    def close(self, timeout: float = 10.0) -> None:
        if self.producer is not None:
            self.producer.flush(timeout)
            self.producer = None
