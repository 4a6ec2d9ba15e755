"""What ``fetch.wait.max.ms`` costs on a long topic of small batches: ``python -m bench.fetchwait``.

The freshness a daemon sees on a broker that answers an empty fetch only after a sleep
(Tansu: half the remaining wait, repeatedly) falls with a shorter ``fetch.wait.max.ms``;
but a broker that takes longer than that wait to serve a fetch may then answer with
nothing.  This fills one topic with records in small produce batches (as a paced
producer writes them), then reads it from the start with the daemon's consumer
settings and each wait in turn, for a fixed time each, and prints messages/s.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import PARTITIONS, Broker, fill_topic, machine, print_machine, quiet_logs, records, table, unique
from streamtrain.streams.config import KafkaConfig
from streamtrain.streams.source import consumer_settings


def fill_small_batches(bootstrap: str, topic: str, n: int, per_batch: int) -> float:
    """Produce ``n`` JSON records, at most ``per_batch`` per produce batch; returns seconds taken."""
    pool = records("json", 50_000)
    values = [pool[i % len(pool)] for i in range(n)]  # references to the pool, not copies
    t0 = time.perf_counter()
    fill_topic(bootstrap, topic, values, flush_s=300, **{"linger.ms": 0, "batch.num.messages": per_batch})
    return time.perf_counter() - t0


def read_rate(bootstrap: str, topic: str, wait_ms: int | None, seconds: float) -> tuple[float, int]:
    """(messages/s over ``seconds``, messages) read from the beginning with the daemon's settings."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    settings = {} if wait_ms is None else {"fetch.wait.max.ms": wait_ms}
    kafka = KafkaConfig(bootstrap_servers=bootstrap, topics=[topic], group_id=unique("fetchwait"), settings=settings)
    c = Consumer(consumer_settings(kafka, "bench-fetchwait"))
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        got = 0
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            got += sum(1 for m in c.consume(2000, 0.1) if m.error() is None)
        return got / elapsed, got
    finally:
        c.close()


def default_wait() -> int:
    """The daemon's fetch.wait.max.ms (librdkafka's 500 when the daemon sets none)."""
    return int(consumer_settings(KafkaConfig(bootstrap_servers="127.0.0.1:9", topics=("t",))).get("fetch.wait.max.ms", 500))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fetchwait", description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_800_000)
    ap.add_argument("--per-batch", type=int, default=6, help="records per produce batch (batch.num.messages)")
    ap.add_argument("--waits", default="default,500,300,200,100,50", help="fetch.wait.max.ms values; 'default' = the daemon's")
    ap.add_argument("--seconds", type=float, default=10.0, help="read time per wait")
    ap.add_argument("--bootstrap", help="an existing broker instead of the embedded one")
    args = ap.parse_args(argv)
    quiet_logs()
    print_machine(machine())
    with Broker(args.bootstrap) as broker:
        topic = unique("bench-fetchwait")
        took = fill_small_batches(broker.bootstrap, topic, args.records, args.per_batch)
        print(f"filled {topic}: {args.records:,} records, <= {args.per_batch} per batch, in {took:.1f} s", flush=True)
        rows = []
        for w in args.waits.split(","):
            wait = None if w == "default" else int(w)
            rate, got = read_rate(broker.bootstrap, topic, wait, args.seconds)
            rows.append([f"default ({default_wait()})" if wait is None else str(wait), f"{rate:,.0f}", f"{got:,}"])
            print(f"fetch.wait.max.ms {rows[-1][0]}: {rows[-1][1]} msg/s", flush=True)
    print()
    print(table(["fetch.wait.max.ms", "messages/s", "read in the window"], rows))
    print(f"\n{args.records:,} JSON records in batches of <= {args.per_batch}, {PARTITIONS} partitions,", end=" ")
    print(f"read from the start for {args.seconds:.0f} s each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
