"""Record timestamp -> trained, on a live stream: ``python -m bench.freshness``.

A producer in its own process writes at a steady rate (record timestamps are the
produce time); the daemon's data path and trainer (in this process, as in
``bench.pipeline``) train it.  First a sweep of rates finds the highest one the daemon
keeps up with (trained rate >= 97 % of the offered rate, no growing delay); then a run
at half of it measures the freshness of every batch: now - the timestamp of its oldest
record, taken right after the step, exactly as the daemon's
``streamtrain_record_freshness_seconds`` histogram does (whose share under 250 ms is
printed too).  The producer shares the machine's cores with the broker and the daemon.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time

from bench.common import (
    MODELS,
    Broker,
    daemon_config,
    fmt_rate,
    machine,
    print_machine,
    quiet_logs,
    snapshot_dir,
    start_producer,
    table,
    unique,
)
from bench.loops import end_to_end, percentile
from demo.broker import create_topic

RATES = (25_000, 50_000, 100_000, 150_000, 200_000, 300_000, 400_000)


def run_at(
    bootstrap: str, broker_pid: int | None, fmt: str, rate: float, seconds: float, wait_ms: int, model: str, settings: dict | None = None
) -> dict:
    """Produce at ``rate`` for ``seconds`` + warmup; train it; per-batch freshness over the window."""
    topic = unique(f"fresh-{fmt}")
    create_topic(bootstrap, topic, 4)
    warm_s = 2.0
    producer = start_producer(bootstrap, topic, fmt, rate, seconds + warm_s + 2)
    seen: list[tuple[float, float]] = []  # (when, freshness) of every batch

    def on_batch(batch) -> None:
        if not math.isnan(batch.oldest_timestamp):
            seen.append((time.perf_counter(), time.time() - batch.oldest_timestamp))

    d = snapshot_dir()
    cfg = daemon_config(bootstrap, topic, fmt, MODELS[model], d, ring={"max_batch_wait_ms": wait_ms}, kafka={"settings": settings or {}})
    try:
        result = end_to_end(
            cfg,
            int(rate * seconds),
            int(rate * warm_s),
            timeout=seconds * 3 + 30,
            on_batch=on_batch,
            broker_pid=broker_pid,
            max_seconds=seconds * 1.5,
        )
    finally:
        producer.terminate()
        producer.join(10)
        shutil.rmtree(d, ignore_errors=True)
    fresh = [f for when, f in seen if result.extra["t0"] <= when <= result.extra["t1"]]
    return {
        "rate": rate,
        "trained": result.rate,
        "kept_up": result.rate >= 0.97 * rate and percentile(fresh, 50) < 1.0,
        "p50": percentile(fresh, 50),
        "p99": percentile(fresh, 99),
        "max": max(fresh) if fresh else math.nan,
        "under_250ms": sum(f <= 0.25 for f in fresh) / max(1, len(fresh)),
        "batches": len(fresh),
        "wait": result.wait_fraction,
        "other_cores": result.extra.get("other_cores", math.nan),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", default="json", choices=("json", "csv", "arrow", "raw"))
    ap.add_argument("--model", default="mlp", choices=tuple(MODELS))
    ap.add_argument("--max-batch-wait-ms", type=int, default=50, help="ring.max_batch_wait_ms (the target asks for <= 50)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window at half the maximum rate")
    ap.add_argument("--sweep-seconds", type=float, default=5.0, help="window per rate of the sweep")
    ap.add_argument("--rate", type=float, default=0.0, help="skip the sweep: measure at this rate (samples/s)")
    ap.add_argument("--fetch-wait-ms", type=int, default=0, help="set librdkafka's fetch.wait.max.ms (kafka.settings pass-through)")
    ap.add_argument("--bootstrap", help="an existing broker instead of the embedded one")
    args = ap.parse_args(argv)
    quiet_logs()
    info = machine()
    print_machine(info)
    settings = {"fetch.wait.max.ms": args.fetch_wait_ms} if args.fetch_wait_ms else {}
    rows = []
    with Broker(args.bootstrap) as broker:
        if args.rate:
            best = 2 * args.rate
        else:
            best = 0.0
            for rate in RATES:
                r = run_at(
                    broker.bootstrap, broker.pid, args.format, rate, args.sweep_seconds, args.max_batch_wait_ms, args.model, settings
                )
                verdict = "kept up" if r["kept_up"] else "fell behind"
                print(
                    f"sweep {fmt_rate(rate)}/s: trained {fmt_rate(r['trained'])}/s, p50 {1e3 * r['p50']:.0f} ms,"
                    f" p99 {1e3 * r['p99']:.0f} ms, other load {r['other_cores']:.2f} cores -> {verdict}",
                    flush=True,
                )
                rows.append(_row("sweep", r))
                if not r["kept_up"]:
                    break
                best = rate
            if not best:
                print("the daemon kept up with none of the rates")
                return 1
        half = best / 2
        r = run_at(broker.bootstrap, broker.pid, args.format, half, args.seconds, args.max_batch_wait_ms, args.model, settings)
        rows.append(_row("half of max", r))
    print()
    print(table(["run", "offered/s", "trained/s", "p50", "p99", "max", "<= 250 ms", "data-wait", "other load"], rows))
    print(
        f"\nformat {args.format}, model {args.model}, ring.max_batch_wait_ms {args.max_batch_wait_ms}, kafka.settings {settings};"
        f" maximum kept up with: "
        f"{fmt_rate(best)}/s; freshness at {fmt_rate(half)}/s: p99 {1e3 * r['p99']:.0f} ms (target < 250 ms)"
    )
    print_machine(info)
    return 0


def _row(name: str, r: dict) -> list[str]:
    ms = lambda v: "-" if math.isnan(v) else f"{1e3 * v:.0f} ms"  # noqa: E731
    return [
        name,
        fmt_rate(r["rate"]),
        fmt_rate(r["trained"]),
        ms(r["p50"]),
        ms(r["p99"]),
        ms(r["max"]),
        f"{100 * r['under_250ms']:.1f} %",
        f"{100 * r['wait']:.0f} %",
        f"{r['other_cores']:.2f} cores",
    ]


if __name__ == "__main__":
    sys.exit(main())
