"""Dead letters the topic refuses: what a retry cannot fix is not retried (streams/deadletter.py).

The refusals are the broker's error codes as librdkafka reports them in delivery reports;
a stand-in producer answers each produce with the code under test, so every class of
refusal is checked without a broker that can be made to refuse it (the too-large case runs
against the real broker in tests/test_dataset.py).
"""

from __future__ import annotations

import hashlib

import pytest
from confluent_kafka import KafkaError

from streamtrain.streams.config import DeadLetterConfig, KafkaConfig, parse
from streamtrain.streams.deadletter import DeadLetter, DeadLetterQueue
from streamtrain.streams.decode import Reject
from streamtrain.streams.errors import DeadLetterError


class Refusing:
    """A producer whose deliveries fail with ``refuse(letter value)`` (a code, or None: delivered)."""

    def __init__(self, refuse) -> None:
        self.refuse = refuse
        self.produced: list[tuple[bytes | None, list]] = []
        self._reports: list = []

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None) -> None:
        self.produced.append((value, headers))
        code = self.refuse(value)
        self._reports.append((on_delivery, None if code is None else KafkaError(code)))

    def poll(self, _timeout: float = 0) -> int:
        reports, self._reports = self._reports, []
        for cb, err in reports:
            cb(err, None)
        return len(reports)

    def flush(self, _timeout: float = 0) -> int:
        return self.poll()


def queue(refuse, **dl) -> tuple[DeadLetterQueue, Refusing]:
    q = DeadLetterQueue(KafkaConfig(topics=("t",)), parse(DeadLetterConfig, dl, "dead_letter"))
    q.producer = Refusing(refuse)
    return q, q.producer


def letter(value: bytes | None, key: bytes | None = b"k", offset: int = 5) -> DeadLetter:
    return DeadLetter("t", 0, offset, 0, key, value, Reject(0, "oversized", "record is too large"))


def drive(q: DeadLetterQueue, ticket, rounds: int = 50) -> None:
    for _ in range(rounds):
        if ticket.done:
            return
        q.service(0)
        for t in q._open:  # no back-off waits in a unit test
            t.retry_at = min(t.retry_at, 1e-9) if t.retry_at else 0.0


def headers(produced) -> dict[str, bytes]:
    return dict(produced[1])


def test_a_value_over_max_value_bytes_goes_cut_with_its_size_and_digest():
    q, p = queue(lambda v: None, max_value_bytes=100)
    big = bytes(range(256)) * 4
    ticket = q.submit([letter(big), letter(b"small")])
    drive(q, ticket)
    assert ticket.done and q.counts() == (2, 0, 1, 0)
    (cut, h), (small, h2) = ((v, dict(hs)) for v, hs in p.produced)
    assert cut == big[:100] and small == b"small"
    assert h["streamtrain.value.truncated"] == b"true" and h["streamtrain.value.bytes"] == b"1024"
    assert h["streamtrain.value.sha256"] == hashlib.sha256(big).hexdigest().encode()
    assert "streamtrain.value.truncated" not in h2


@pytest.mark.parametrize("code", [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE])
def test_a_size_refusal_cuts_by_half_until_it_fits_keeping_the_original_size(code):
    q, p = queue(lambda v: code if v is not None and len(v) > 300 else None, max_value_bytes=4096)
    big = b"x" * 5000
    ticket = q.submit([letter(big)])
    drive(q, ticket)
    assert ticket.done and q.counts()[0] == 1 and q.counts()[3] == 0
    sizes = [len(v) for v, _ in p.produced]
    assert sizes == [4096, 2048, 1024, 512, 256], "cut by half per refusal, never retried as it was"
    final = headers(p.produced[-1])
    assert final["streamtrain.value.bytes"] == b"5000" and final["streamtrain.value.sha256"] == hashlib.sha256(big).hexdigest().encode()


def test_a_size_refusal_of_an_empty_value_drops_the_letter():
    q, p = queue(lambda v: KafkaError.MSG_SIZE_TOO_LARGE)
    ticket = q.submit([letter(b"")])
    drive(q, ticket)
    assert ticket.done and q.counts() == (0, 0, 0, 1) and len(p.produced) == 1


@pytest.mark.parametrize("code", [KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG, KafkaError.INVALID_TIMESTAMP])
def test_a_letter_refused_for_itself_is_dropped_loudly_and_the_others_delivered(code, caplog):
    q, p = queue(lambda v: code if v == b"bad" else None)
    ticket = q.submit([letter(b"good"), letter(b"bad", offset=9), letter(b"good too")])
    drive(q, ticket)
    assert ticket.done and q.counts() == (2, 0, 0, 1)
    assert len(p.produced) == 3, "not retried"
    assert "refused the letter for t[0]@9 for good" in caplog.text


@pytest.mark.parametrize(
    "code", [KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.TOPIC_EXCEPTION]
)
@pytest.mark.parametrize("on_failure", ["block", "stop"])
def test_a_refusal_of_the_topic_itself_stops_whatever_on_failure_says(code, on_failure):
    q, _p = queue(lambda v: code, on_failure=on_failure)
    ticket = q.submit([letter(b"x")])
    with pytest.raises(DeadLetterError, match="a retry cannot fix that"):
        drive(q, ticket)


def test_a_transient_refusal_is_retried_as_on_failure_block_says():
    failures = iter([KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT])
    q, p = queue(lambda v: next(failures, None), on_failure="block")
    ticket = q.submit([letter(b"x")])
    drive(q, ticket)
    assert ticket.done and q.counts()[:2] == (1, 2) and [v for v, _ in p.produced] == [b"x"] * 3


def test_a_long_key_is_cut_too():
    q, p = queue(lambda v: None)
    ticket = q.submit([letter(b"v", key=b"k" * 10_000)])
    drive(q, ticket)
    assert ticket.done
    h = headers(p.produced[0])
    assert h["streamtrain.key.truncated"] == b"true" and h["streamtrain.key.bytes"] == b"10000"
