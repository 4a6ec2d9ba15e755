"""Is the daemon's memory bounded? ``python -m bench.memory --minutes 10``.

The real daemon (``python -m streamtrain run``, a subprocess) trains a steady stream that a
producer process writes at ``--rate`` samples/s, with snapshots every 30 s; its
resident set (VmRSS) is sampled every few seconds.  Reported: RSS after warmup, the
maximum, and the slope of a least-squares line over the run after warmup (MiB per
minute: ~0 when flat), next to the bounds the configuration sets (ring slots and
librdkafka's prefetch queue).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from bench.common import FEATURES, Broker, machine, print_machine, quiet_logs, rss_mib, snapshot_dir, start_producer, table, unique
from demo.broker import create_topic, free_port

ROOT = Path(__file__).resolve().parent.parent


def scrape(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=5000.0, help="samples/s the producer writes")
    ap.add_argument("--format", default="json", choices=("json", "csv", "arrow", "raw"))
    ap.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds left out of the slope")
    ap.add_argument("--bootstrap", help="an existing broker instead of the embedded one")
    args = ap.parse_args(argv)
    quiet_logs()
    info = machine()
    print_machine(info)
    seconds = args.minutes * 60
    ring = {"batch_size": 256, "slots": 8, "max_batch_wait_ms": 50}
    queued_kib = 16384
    with Broker(args.bootstrap) as broker:
        topic = unique(f"mem-{args.format}")
        create_topic(broker.bootstrap, topic, 4)
        d = snapshot_dir()
        port = free_port()
        data = {"format": args.format, "label": "y"}
        if args.format == "raw":
            data["num_features"] = len(FEATURES)
        else:
            data["features"] = FEATURES
        cfg = {
            "kafka": {"bootstrap_servers": broker.bootstrap, "topics": [topic], "group_id": unique("mem"), "queued_max_kbytes": queued_kib},
            "dead_letter": {"topic": f"{topic}.dlq"},
            "data": data,
            "ring": ring,
            "model": {"name": "mlp", "params": {"hidden": [64]}},
            "trainer": {"task": "regression"},
            "snapshot": {"dir": str(Path(d) / "snapshots"), "every_seconds": 30, "keep": 3},
            "metrics": {"host": "127.0.0.1", "port": port},
            "logging": {"progress_every_s": 60, "level": "WARNING"},
        }
        config_path = Path(d) / "daemon.yaml"
        config_path.write_text(yaml.safe_dump(cfg))
        producer = start_producer(broker.bootstrap, topic, args.format, args.rate, seconds + 30)
        log = open(Path(d) / "daemon.log", "wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "streamtrain", "run", "--config", str(config_path)], cwd=ROOT, stdout=log, stderr=log
        )
        t0 = time.monotonic()
        points: list[tuple[float, float]] = []
        try:
            while (now := time.monotonic() - t0) < seconds:
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon exited ({daemon.returncode}); log in {d}/daemon.log")
                points.append((now, rss_mib(daemon.pid)))
                if len(points) % max(1, int(60 / args.every)) == 0:
                    trained = scrape(port, "streamtrain_samples_trained_total")
                    print(
                        f"{now / 60:5.1f} min: RSS {points[-1][1]:.0f} MiB, {trained:,.0f} samples trained,"
                        f" producer {'running' if producer.is_alive() else 'stopped'}",
                        flush=True,
                    )
                time.sleep(args.every)
            trained = scrape(port, "streamtrain_samples_trained_total")
        finally:
            daemon.terminate()
            daemon.wait(60)
            log.close()
            producer.terminate()
            producer.join(10)
    t = np.array([p[0] for p in points])
    rss = np.array([p[1] for p in points])
    steady = t >= args.warmup
    slope = float(np.polyfit(t[steady] / 60, rss[steady], 1)[0]) if steady.sum() > 2 else float("nan")
    first = rss[steady][0] if steady.any() else float("nan")
    ring_mib = ring["slots"] * ring["batch_size"] * (len(FEATURES) + 1) * 4 / 2**20
    rows = [
        ["RSS after warmup", f"{first:.0f} MiB"],
        ["RSS max", f"{rss.max():.0f} MiB"],
        ["RSS at the end", f"{rss[-1]:.0f} MiB"],
        ["slope after warmup", f"{slope:+.2f} MiB/min"],
        ["growth after warmup (max - first)", f"{rss[steady].max() - first:+.0f} MiB"],
        ["ring (slots x batch x (features + label) x 4 B)", f"{ring_mib:.2f} MiB"],
        ["librdkafka prefetch bound (kafka.queued_max_kbytes)", f"{queued_kib / 1024:.0f} MiB"],
        ["samples trained", f"{trained:,.0f}"],
    ]
    print()
    print(table(["what", "value"], rows))
    print(f"\n{args.minutes:g} min at {args.rate:,.0f} samples/s ({args.format}), snapshots every 30 s; RSS sampled every {args.every:g} s")
    print_machine(info)
    expected = args.rate * seconds
    if trained < 0.9 * expected:
        print(f"only {trained:,.0f} of ~{expected:,.0f} samples were trained: the daemon's log and config are kept in {d}")
        return 1
    shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
