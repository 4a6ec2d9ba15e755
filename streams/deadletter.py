"""The dead-letter producer: every rejected record is written, with why, before it counts as handled.

A rejected record's offset may only move past once its dead-letter copy is
acknowledged by the broker (``acks=all``); otherwise a crash would lose it silently.
:meth:`DeadLetterQueue.submit` produces without waiting and returns a :class:`Ticket`;
the ingest loop keeps the batch (and everything consumed after it) out of the ring
until the ticket is done, and goes on consuming and decoding meanwhile, so the broker's
round trip overlaps the next batches instead of stalling the loop once per batch.
:meth:`DeadLetterQueue.send` is the blocking form.  When the topic cannot be written,
failed letters are produced again: forever with ``on_failure=block`` (training stops
advancing past the record, which shows in the metrics and logs), or until ``timeout_s``
with ``on_failure=stop``, then :class:`DeadLetterError` is raised.

Some refusals no retry can fix, and they are not retried.  A record too large for the
dead-letter topic (the source topic may allow more than the producer's or the broker's
limit) goes with its value cut to ``dead_letter.max_value_bytes`` and, if the broker
still refuses the size, cut by half again until it fits; headers give the original size,
its sha256 and ``truncated: true``.  A letter the broker refuses for itself (an invalid
record) is dropped, counted and logged as an error with the record's coordinates: the
record is not trained, and waiting would stop training for good.  A refusal that is the
deployment's (no authorization on the topic, an invalid topic name) is a
:class:`DeadLetterError` at once, whatever ``on_failure`` says: it names what to fix.
``on_failure`` (block or stop) is for the refusals that may pass: the broker unreachable,
a leader moving, a timeout.

Delivery is at least once: a record rejected again after a crash and replay is sent
again.  Headers name the source topic, partition, offset, the error class and message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from streamtrain.streams.config import DeadLetterConfig, KafkaConfig
from streamtrain.streams.decode import Reject
from streamtrain.streams.errors import DeadLetterError
from streamtrain.streams.source import CONSUMER_ONLY, make_client

log = logging.getLogger("streamtrain.deadletter")

HEADER_PREFIX = "streamtrain."
MAX_KEY_BYTES = 4096  # a key longer than this is cut too (it only spreads letters over partitions)

# Refusals a retry cannot fix (librdkafka's codes; the broker's and its own local checks alike).
TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
LETTER_REFUSED = frozenset(
    {
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError._INVALID_ARG,
    }
)
DEPLOYMENT_REFUSED = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.POLICY_VIOLATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError._FATAL,
    }
)


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
    cut: tuple[tuple[str, bytes], ...] = ()  # what was cut to fit: original sizes and digests

    def headers(self) -> list[tuple[str, bytes]]:
        h = [
            (HEADER_PREFIX + "source.topic", self.topic.encode()),
            (HEADER_PREFIX + "source.partition", str(self.partition).encode()),
            (HEADER_PREFIX + "source.offset", str(self.offset).encode()),
            (HEADER_PREFIX + "source.timestamp", str(self.timestamp_ms).encode()),
            (HEADER_PREFIX + "error.class", self.reject.reason.encode()),
            (HEADER_PREFIX + "error.message", self.reject.error.encode("utf-8", "replace")[:4096]),
        ]
        if self.reject.exception:
            h.append((HEADER_PREFIX + "error.exception", self.reject.exception.encode()))
        if self.reject.rows:
            h.append((HEADER_PREFIX + "error.rows", ",".join(map(str, self.reject.rows)).encode()))
        return h + list(self.cut) + list(self.extra)

    def fitted(self, max_value: int) -> DeadLetter:
        """This letter with its value cut to ``max_value`` bytes (and a long key cut), the originals described in headers."""
        letter = self
        for field, limit in (("value", max_value), ("key", MAX_KEY_BYTES)):
            data = getattr(letter, field)
            if data is None or len(data) <= limit:
                continue
            cut = dict(letter.cut)
            described = HEADER_PREFIX + f"{field}.truncated" in cut
            if not described:  # the first cut: the original's size and digest (a later, smaller cut keeps them)
                cut[HEADER_PREFIX + f"{field}.truncated"] = b"true"
                cut[HEADER_PREFIX + f"{field}.bytes"] = str(len(data)).encode()
                cut[HEADER_PREFIX + f"{field}.sha256"] = hashlib.sha256(data).hexdigest().encode()
            letter = dataclasses.replace(letter, **{field: data[:limit]}, cut=tuple(cut.items()))
        return letter

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def producer_settings(kafka: KafkaConfig, dl: DeadLetterConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "bootstrap.servers": dl.bootstrap_servers or kafka.bootstrap_servers,
        "client.id": "streamtrain-dead-letter",
        "acks": "all",
        "linger.ms": 5,
        # a delivery that cannot finish in time fails and is retried by send()
        "message.timeout.ms": max(1000, int(dl.timeout_s * 1000)),
    }
    settings.update({k: v for k, v in kafka.settings.items() if not k.startswith(CONSUMER_ONLY)})
    return settings


class Ticket:
    """The letters of one submit: done once the broker acknowledged every one of them."""

    def __init__(self, letters: list[DeadLetter]) -> None:
        self.letters = letters
        self.outstanding = 0  # produced, no delivery report yet
        self.failed: list[tuple[DeadLetter, KafkaError]] = []
        self.dropped = 0  # letters refused for good: done, but not written
        self.started = time.monotonic()
        self.attempt = 0
        self.retry_at = 0.0

    @property
    def done(self) -> bool:
        return self.outstanding == 0 and not self.failed


class DeadLetterQueue:
    """Writes rejected records to the dead-letter topic; opens lazily."""

    def __init__(self, kafka: KafkaConfig, dl: DeadLetterConfig, stop: threading.Event | None = None) -> None:
        self.kafka = kafka
        self.dl = dl
        self.stop = stop or threading.Event()
        self.producer: Producer | None = None
        self.sent = 0
        self.failures = 0  # failed delivery attempts (each was retried)
        self.truncated = 0  # letters sent with their value cut to fit
        self.dropped = 0  # letters the broker refused for good (logged with the record's coordinates)
        self.blocked_since: float | None = None  # monotonic time the current outage began
        self._open: list[Ticket] = []  # submitted, not yet done

    def counts(self) -> tuple[int, int, int, int]:
        """(letters written, failed attempts, letters cut to fit, letters refused for good)."""
        return (self.sent, self.failures, self.truncated, self.dropped)

    def submit(self, letters: list[DeadLetter]) -> Ticket:
        """Produce ``letters`` without waiting; :meth:`service` (or :meth:`wait`) moves the ticket on."""
        ticket = Ticket(letters)
        if letters:
            if self.producer is None:
                self.producer = make_client(Producer, producer_settings(self.kafka, self.dl), "kafka.settings", logger=log)
            for letter in letters:
                self._produce(ticket, self._fit(letter, self.dl.max_value_bytes))
            self._open.append(ticket)
        return ticket

    def send(self, letters: list[DeadLetter]) -> None:
        """Deliver every letter or raise DeadLetterError (policy ``stop``, or asked to stop meanwhile)."""
        ticket = self.submit(letters)
        while not ticket.done:
            self.wait(ticket, 1.0)

    def wait(self, ticket: Ticket, timeout: float) -> bool:
        """Serve delivery reports and retries for up to ``timeout`` s or until ``ticket`` is done."""
        deadline = time.monotonic() + timeout
        while not ticket.done:
            if self.stop.is_set():
                raise DeadLetterError(f"shutdown while rejected records were still being written to {self.dl.topic!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.service(min(left, 0.1))
        return ticket.done

    def service(self, timeout: float = 0.0) -> None:
        """Take delivery reports; produce failed letters again when their back-off is over."""
        if self.producer is None:
            return
        self.producer.poll(timeout)
        if not self._open:
            return
        now = time.monotonic()
        still = []
        for t in self._open:
            if t.failed and t.outstanding == 0 and now >= t.retry_at:
                self._retry(t, now)  # may settle it: each letter cut and produced again, or dropped
            if t.done:
                self.sent += len(t.letters) - t.dropped
                if t.attempt and self.blocked_since is not None and not any(o.failed for o in self._open if o is not t):
                    log.info("dead-letter topic %s writable again after %.1f s", self.dl.topic, now - self.blocked_since)
                    self.blocked_since = None
                continue
            still.append(t)
        self._open = still

    def _fit(self, letter: DeadLetter, limit: int) -> DeadLetter:
        fitted = letter.fitted(limit)
        if fitted.value is not letter.value and not any(k == HEADER_PREFIX + "value.truncated" for k, _ in letter.cut):
            self.truncated += 1
        return fitted

    def _settle_permanent(self, t: Ticket) -> None:
        """Refusals no retry fixes: cut the too large letters again, drop the refused ones, stop on the deployment's."""
        transient = []
        for letter, err in t.failed:
            code = err.code()
            if code in DEPLOYMENT_REFUSED:
                raise DeadLetterError(
                    f"dead-letter topic {self.dl.topic!r} refuses writes ({err.str()}): a retry cannot fix that. Grant this "
                    "client write access to the topic (or set dead_letter.topic to one it may write); the rejected records "
                    "are not lost: their offsets are not committed and they are read again after a restart"
                )
            if code in TOO_LARGE:
                size = len(letter.value or b"")
                if size > 0:
                    smaller = self._fit(letter, size // 2)
                    log.warning(
                        "dead letter for %s is too large for the topic (%s) with a %d-byte value; sending it cut to %d bytes",
                        letter.where(),
                        err.str(),
                        size,
                        len(smaller.value or b""),
                    )
                    self._produce(t, smaller)
                    continue
            if code in TOO_LARGE or code in LETTER_REFUSED:
                self.dropped += 1
                t.dropped += 1
                log.error(
                    "dead-letter topic %r refused the letter for %s for good (%s); it is dropped, not retried (the record "
                    "is not trained: %s)",
                    self.dl.topic,
                    letter.where(),
                    err.str(),
                    letter.reject.error,
                )
                continue
            transient.append((letter, err))
        t.failed = transient

    def _retry(self, t: Ticket, now: float) -> None:
        if t.retry_at == 0.0:
            self._settle_permanent(t)
            if not t.failed:  # each was cut and produced again, or dropped: nothing waits for a back-off
                return
        if t.retry_at == 0.0:  # the failure was just reported: count it, decide, schedule the retry
            self.failures += 1
            if self.blocked_since is None:
                self.blocked_since = t.started
            waited = now - t.started
            reason = t.failed[0][1].str()
            if self.dl.on_failure == "stop" and waited >= self.dl.timeout_s:
                raise DeadLetterError(
                    f"could not write {len(t.failed)} rejected record(s) to dead-letter topic {self.dl.topic!r} for {waited:.0f} s "
                    f"({reason}); stopping (dead_letter.on_failure=stop) so they are not lost: their offsets are not committed "
                    "and they will be read again after a restart"
                )
            t.attempt += 1
            log.warning(
                "cannot write %d rejected record(s) to dead-letter topic %r (%s); retrying (attempt %d, %s)",
                len(t.failed),
                self.dl.topic,
                reason,
                t.attempt,
                "blocking until it works" if self.dl.on_failure == "block" else f"stopping after {self.dl.timeout_s:.0f} s",
            )
            t.retry_at = now + min(5.0, 0.2 * 2**t.attempt)
            return
        again, t.failed = [letter for letter, _ in t.failed], []
        t.retry_at = 0.0
        for letter in again:
            self._produce(t, letter)

    def _produce(self, ticket: Ticket, letter: DeadLetter) -> None:
        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            ticket.outstanding -= 1
            if err is not None:
                ticket.failed.append((letter, err))

        while True:
            try:
                self.producer.produce(self.dl.topic, value=letter.value, key=letter.key, headers=letter.headers(), on_delivery=on_delivery)
                ticket.outstanding += 1
                return
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:
                ticket.failed.append((letter, exc.args[0]))
                return

    def close(self, timeout: float = 10.0) -> None:
        if self.producer is not None:
            self.producer.flush(timeout)
            self.producer = None
        self._open = []
