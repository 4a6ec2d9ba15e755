"""What the ingest pays per consumed message in Python: each field read of ``Ingest._ingest`` and the decoder, timed alone.

``python -m bench.fields --format raw --samples 200000``: fills a topic, consumes every record
into memory with one consumer (batches of ``kafka.consume_batch``), then times each C-level
pass the ingest makes over a batch of ``Message`` objects (the same ``map`` calls), and the
format's decoder over the values, in ns per message.  Profile first, then cut: this is the
table the per-message changes are predicted from.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from operator import itemgetter

import numpy as np

from bench.common import MODELS, PARTITIONS, Broker, daemon_config, fill_topic, machine, print_machine, quiet_logs, records, table, unique
from streamtrain.streams.decode import LabelRule, make_decoder
from streamtrain.streams.decode.common import _lengths


def consume_all(bootstrap: str, topic: str, n: int, batch: int, timeout_s: float = 120.0) -> list[list]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("fields"), "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])  # as the daemon reads: no group join
    batches, got, deadline = [], 0, time.monotonic() + timeout_s
    try:
        while got < n and time.monotonic() < deadline:
            msgs = c.consume(batch, 1.0)
            if msgs:
                batches.append(msgs)
                got += len(msgs)
    finally:
        c.close()
    if got < n:
        raise TimeoutError(f"consumed {got} of {n} records in {timeout_s} s")
    return batches


def main(argv: list[str] | None = None) -> int:
    from confluent_kafka import Message

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="raw", choices=["raw", "csv", "json"])
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--bootstrap", default=None, help="an external broker (default: the embedded one)")
    args = ap.parse_args(argv)
    quiet_logs()
    print_machine(machine())
    cfg = daemon_config("127.0.0.1:1", "unused", args.format, MODELS["mlp"], "unused")
    decoder = make_decoder(cfg.data, LabelRule.of(cfg.trainer))
    with Broker(args.bootstrap) as broker:
        topic = unique("bench-fields")
        fill_topic(broker.bootstrap, topic, records(args.format, args.samples))
        batches = consume_all(broker.bootstrap, topic, args.samples, cfg.kafka.consume_batch)
    values = [list(map(Message.value, b)) for b in batches]
    n = sum(map(len, batches))
    passes: dict[str, Callable[[int], object]] = {  # as streams/ingest.py reads them
        "error (any)": lambda i: any(map(Message.error, batches[i])),
        "value": lambda i: list(map(Message.value, batches[i])),
        "topic": lambda i: list(map(Message.topic, batches[i])),
        "partition": lambda i: np.fromiter(map(Message.partition, batches[i]), np.int64, len(batches[i])),
        "offset": lambda i: np.fromiter(map(Message.offset, batches[i]), np.int64, len(batches[i])),
        "timestamp": lambda i: np.fromiter(map(itemgetter(1), map(Message.timestamp, batches[i])), np.float64, len(batches[i])),
        "lengths (of the values)": lambda i: _lengths(values[i]),
        f"decode ({args.format})": lambda i: decoder.decode(values[i]),
    }
    rows = []
    for name, f in passes.items():
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for i in range(len(batches)):
                f(i)
            best = min(best, time.perf_counter() - t0)
        rows.append([name, f"{best / n * 1e9:,.0f}"])
    print()
    print(table(["pass over a consumed batch", f"ns per message (best of {args.repeat}, {n:,} {args.format} messages)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
