"""``streamtrain produce``: load CSV, JSON-lines or Parquet files into a topic, in the daemon's formats.

The transport step from files and object storage into the stream.  With ``--config``
the bootstrap servers, the topic, the record format (``data.*``) and the Kafka
security settings are the daemon's own, so what is produced is exactly what that
daemon trains on; flags override them (:mod:`streamtrain.tools.produce_plan`).  Rows are read in record batches
(:mod:`streams.loader`), encoded by :mod:`streams.encode` and produced with delivery
reports; the summary counts what the broker acknowledged, and the exit code is 1 when
any record was not delivered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Producer

from streamtrain.streams.encode import FORMATS, encode, records
from streamtrain.streams.errors import ConfigError, StreamtrainError
from streamtrain.streams.loader import INPUT_FORMATS, InputError
from streamtrain.tools.produce_plan import Plan, make_plan
from streamtrain.tools.progress import ProgressLine, RateLimiter, human_bytes

__all__ = ["add_parser", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_parser(sub: Any) -> None:
    from streamtrain.config.args import add_set_argument

    p = sub.add_parser(
        "produce",
        help="load CSV / JSON-lines / Parquet files (local or s3://, gs://, file://) into a topic",
        description="Load rows from files into a Kafka topic as records in one of the daemon's formats. "
        "With --config, everything the daemon reads (bootstrap servers, topic, data.*, kafka.settings) "
        "comes from its config; the flags override it.",
    )
    p.add_argument(
        "sources", nargs="+", metavar="FILE_OR_URI", help="a file, a directory of files, or a URI pyarrow opens (s3://bucket/key)"
    )
    p.add_argument("--config", "-c", help="take bootstrap servers, topic, data.* and kafka.settings from this daemon config")
    add_set_argument(p)
    p.add_argument("--bootstrap-servers", "-b", help="host:port[,host:port] (default: kafka.bootstrap_servers, else 127.0.0.1:9092)")
    p.add_argument("--topic", "-t", help="topic to write (default: the config's only kafka.topics entry)")
    p.add_argument("--format", "-f", choices=(*FORMATS, "avro", "protobuf"), help="record format, as data.format (default json)")
    p.add_argument(
        "--schema",
        help="avro/protobuf: the writer's schema, an .avsc or a protobuf FileDescriptorSet (default: data.schema); with a "
        "registry it is registered under <topic>-value and each record framed with its id",
    )
    p.add_argument("--schema-message", help="protobuf: the message of --schema to write, package.Message (default: the first)")
    p.add_argument("--schema-registry", metavar="URL", help="avro/protobuf: Confluent-framed records, as data.schema_registry.url")
    p.add_argument("--features", help="feature field names in the records, comma-separated, as data.features")
    p.add_argument("--feature-field", help="json/arrow: one field holding the whole feature vector, as data.feature_field")
    p.add_argument("--label", help="label field name, as data.label (default y)")
    p.add_argument("--num-features", type=int, help="feature vector length, as data.num_features (default: from the input)")
    p.add_argument("--delimiter", help="csv records: field delimiter, as data.csv.delimiter")
    p.add_argument("--rows-per-message", type=int, default=1000, help="arrow: rows per record (default 1000)")
    p.add_argument("--input-format", choices=INPUT_FORMATS, help="input file format (default: from the file name)")
    p.add_argument(
        "--input-features",
        help="input columns that make the feature vector, comma-separated (default: the record's feature names, "
        "or the list column named by the feature field, or every numeric column but the label)",
    )
    p.add_argument("--input-label", help="input column holding the label (default: the label name)")
    p.add_argument("--key", metavar="COLUMN", help="json/csv/raw: use this input column as the record key (partitioning)")
    p.add_argument(
        "--labels",
        action="store_true",
        help="with --config naming data.labels.topic: write the input as label records (data.labels.key_field and .field) to "
        "the label topic; without it the input goes to the feature topic as feature records (the key, no label). Both "
        "are keyed by data.labels.key_field, so a record and its label land in the same partition",
    )
    p.add_argument("--rate", type=float, help="at most this many rows a second")
    p.add_argument("--limit", type=int, help="stop after this many rows")
    p.add_argument(
        "-X", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="extra librdkafka producer setting (repeatable)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a record may take to be delivered (default 60)")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress line on stderr (default: when a terminal)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


@dataclass
class Summary:
    topic: str
    format: str
    sources: int = 0
    rows_read: int = 0
    rows_skipped: int = 0
    rows_delivered: int = 0
    messages_delivered: int = 0
    messages_failed: int = 0
    bytes_delivered: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    stopped_by: str | None = None  # an input that failed part-way (what was read before is still sent)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows_delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def failed(self, reason: str, n: int = 1) -> None:
        self.messages_failed += n
        self.errors[reason] = self.errors.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "elapsed_s": round(self.elapsed_s, 3), "rows_per_s": round(self.rows_per_s, 1)}

    def text(self) -> str:
        lines = [
            f"produced to {self.topic} ({self.format}) from {self.sources} source(s) in {self.elapsed_s:.2f} s"
            + (" (interrupted)" if self.interrupted else ""),
            f"  rows read       {self.rows_read:,}",
            f"  rows skipped    {self.rows_skipped:,}"
            + ("  (a null or non-finite value, or a vector of another length)" if self.rows_skipped else ""),
            f"  rows delivered  {self.rows_delivered:,}  ({self.rows_per_s:,.0f} rows/s)",
            f"  messages        {self.messages_delivered:,} delivered, {self.messages_failed:,} failed",
            f"  bytes           {human_bytes(self.bytes_delivered)}  ({human_bytes(self.bytes_delivered / max(self.elapsed_s, 1e-9))}/s)",
        ]
        lines += [f"  failed: {n:,} x {reason}" for reason, n in self.errors.items()]
        return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except ConfigError as exc:
        print(f"streamtrain produce: {len(exc.problems)} problem(s):", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as exc:
        print(f"streamtrain produce: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = run(plan, args)
    except (InputError, StreamtrainError) as exc:
        print(f"streamtrain produce: {exc}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(json.dumps(summary.to_dict()) + "\n" if args.json else summary.text())
    if summary.stopped_by:
        print(f"streamtrain produce: stopped early: {summary.stopped_by}", file=sys.stderr)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.messages_failed or summary.stopped_by else EXIT_OK


def run(plan: Plan, args: argparse.Namespace) -> Summary:
    """Produce every usable row of the plan's sources; returns the summary once everything is acknowledged or failed."""
    data = plan.data
    summary = Summary(plan.topic, data.format)
    opened = plan.sources
    totals = [s.total_rows() for s in opened]
    total = sum(totals) if all(t is not None for t in totals) else None  # type: ignore[misc]
    if args.limit:
        total = min(total, args.limit) if total is not None else args.limit
    limiter = RateLimiter(args.rate) if args.rate else None
    progress = ProgressLine(enabled=args.progress)
    kafka_log = _KafkaLog()
    try:
        producer = Producer(plan.settings, logger=kafka_log.logger)
    except KafkaException as exc:
        raise StreamtrainError(f"librdkafka refused the producer settings: {exc.args[0].str() if exc.args else exc}") from exc
    started = time.monotonic()
    try:
        _check_topic(producer, plan, kafka_log)

        def delivered(err: KafkaError | None, msg: Any, rows: int) -> None:
            if err is not None:
                summary.failed(err.str())
            else:
                summary.messages_delivered += 1
                summary.rows_delivered += rows
                summary.bytes_delivered += len(msg.value())

        def limit_reached() -> bool:
            return bool(args.limit) and summary.rows_read - summary.rows_skipped >= args.limit

        try:
            for i, src in enumerate(opened, 1):
                summary.sources = i
                for rows in src.batches(plan.columns, batch_rows=_batch_rows(plan)):
                    taken = summary.rows_read - summary.rows_skipped  # usable rows before this batch
                    summary.rows_read += len(rows.y) + rows.skipped
                    summary.rows_skipped += rows.skipped
                    x, y, keys, cats, labels = rows.x, rows.y, rows.keys, rows.categorical, rows.labels
                    if args.limit and taken + len(y) > args.limit:
                        keep = args.limit - taken
                        summary.rows_read -= len(y) - keep  # rows past the limit count as not read
                        x, y, keys = x[:keep], y[:keep], keys[:keep] if keys is not None else None
                        cats = {c: v[:keep] for c, v in cats.items()} if cats else None
                        labels = labels[:keep] if labels is not None else None
                    for value, key, n in _messages(plan, x, y, keys, cats, labels):
                        if len(value) > data.max_record_bytes:
                            summary.failed(f"record over data.max_record_bytes ({data.max_record_bytes:,}); lower --rows-per-message")
                            continue
                        if limiter is not None:
                            limiter.acquire(n)
                        _produce(producer, plan.topic, value, key, lambda e, m, n=n: delivered(e, m, n), summary)
                    producer.poll(0)
                    progress.update(_progress_text(summary, total, i, len(opened), started))
                    if limit_reached():
                        break
                if limit_reached():
                    break
        except KeyboardInterrupt:
            summary.interrupted = True
        except InputError as exc:
            summary.stopped_by = str(exc)
        _flush(producer, plan, summary)
    finally:
        summary.elapsed_s = time.monotonic() - started
        progress.close(_progress_text(summary, total, summary.sources, len(opened), started))
    return summary


def _messages(plan: Plan, x: np.ndarray, y: np.ndarray, keys: list[bytes | None] | None, cats=None, labels=None):
    """(value, key, rows) for each record of one batch of rows."""
    d = plan.data
    if d.format in ("avro", "protobuf"):
        rows = records(x, y, d.features, d.label, feature_field=d.feature_field, categorical=cats, labels=labels)
        values = plan.write(rows)
        return zip(values, keys if keys is not None else [None] * len(values), [1] * len(values))
    values = encode(  # a CSV line holds data.csv.columns in order: encode puts each column where it belongs
        d.format,
        x,
        y,
        d.features,
        d.label,
        feature_field=d.feature_field,
        rows_per_message=plan.rows_per_message,
        delimiter=d.csv.delimiter,
        categorical=cats,
        labels=labels,
        columns=d.csv.columns or None,
    )
    if d.format == "arrow":
        sizes = [min(plan.rows_per_message, len(y) - i) for i in range(0, len(y), plan.rows_per_message)]
        return zip(values, [None] * len(values), sizes)
    return zip(values, keys if keys is not None else [None] * len(values), [1] * len(values))


def _produce(producer: Producer, topic: str, value: bytes, key: bytes | None, cb: Any, summary: Summary) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=cb)
            return
        except BufferError:  # the local queue is full: let deliveries drain it
            producer.poll(0.05)
        except KafkaException as exc:
            summary.failed(exc.args[0].str() if exc.args and isinstance(exc.args[0], KafkaError) else str(exc))
            return


def _flush(producer: Producer, plan: Plan, summary: Summary) -> None:
    """Wait for every delivery report (bounded by message.timeout.ms); count what never came as failed."""
    deadline = time.monotonic() + plan.settings["message.timeout.ms"] / 1000 + 10
    left = len(producer)
    while left and time.monotonic() < deadline:
        left = producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
    if left:
        summary.failed("no delivery report before the timeout", left)


class _KafkaLog(logging.Handler):
    """librdkafka's log, kept (the last few distinct lines) to explain a failure instead of flooding the terminal."""

    def __init__(self, keep: int = 3) -> None:
        super().__init__(logging.DEBUG)
        self.keep = keep
        self.lines: list[str] = []
        self.logger = logging.getLogger(f"streamtrain.produce.kafka.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.WARNING)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage().split("]: ", 1)[-1]
        if line not in self.lines:
            self.lines = [*self.lines, line][-self.keep :]


def _check_topic(producer: Producer, plan: Plan, kafka_log: _KafkaLog) -> None:
    """Fail fast, with the reason, when the broker cannot be reached or the topic does not exist."""
    try:
        md = producer.list_topics(plan.topic, timeout=min(15.0, plan.settings["message.timeout.ms"] / 1000))
    except KafkaException as exc:
        producer.poll(0)  # serves the queued log lines
        said = f" (librdkafka: {' | '.join(kafka_log.lines)})" if kafka_log.lines else ""
        raise StreamtrainError(
            f"cannot reach Kafka at {plan.kafka.bootstrap_servers}: {exc.args[0].str() if exc.args else exc}{said}; "
            "check the address and kafka.settings (security.protocol, ssl.*, sasl.*)"
        ) from exc
    t = md.topics.get(plan.topic)
    if t is None or t.error is not None or not t.partitions:
        why = t.error.str() if t is not None and t.error is not None else "no partitions"
        raise StreamtrainError(f"topic {plan.topic} is not available on {plan.kafka.bootstrap_servers} ({why}); create it first")


def _progress_text(s: Summary, total: int | None, i: int, n: int, started: float) -> str:
    elapsed = max(time.monotonic() - started, 1e-9)
    sent = s.rows_read - s.rows_skipped
    done = f"{sent:,}/{total:,} rows ({100 * sent / total:.0f}%)" if total else f"{sent:,} rows"
    bar = ""
    if total:
        filled = min(20, int(20 * sent / total))
        bar = "[" + "#" * filled + "." * (20 - filled) + "] "
    failed = f" | {s.messages_failed:,} failed" if s.messages_failed else ""
    rate = f"{sent / elapsed:,.0f} rows/s"
    return f"{bar}{done} | {s.rows_delivered:,} acked | {human_bytes(s.bytes_delivered)} | {rate} | source {i}/{n}{failed}"


def _batch_rows(plan: Plan) -> int:
    """Read whole Arrow messages per batch so only a source's last message is short."""
    if plan.data.format == "arrow":
        return plan.rows_per_message * max(1, math.ceil(65536 / plan.rows_per_message))
    return 65536
