"""`make demo`: the embedded broker, a producer, the daemon training, metrics and a snapshot.

Starts the Tansu broker on 127.0.0.1:19092, produces a learnable JSON stream (with a
little garbage, to show the dead-letter path) while the daemon trains from
config/demo.yaml, samples its /metrics as it learns, then stops it with SIGTERM and
shows the snapshot it left.  Bounded: about half a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.broker import TestProducer, create_topic, start_tansu  # noqa: E402
from demo.synthetic import SyntheticStream  # noqa: E402
from streamtrain.streams.encode import encode  # noqa: E402

BROKER_PORT, METRICS_PORT = 19092, 19100
TOPIC = "demo.samples"
FEATURES = [f"f{i}" for i in range(16)]


def scrape(path: str = "/metrics") -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}{path}", timeout=2) as r:
            return r.read().decode()
    except OSError as exc:
        return getattr(exc, "read", lambda: b"")().decode() if hasattr(exc, "read") else ""


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def first_sample(daemon: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Wait for the daemon's first trained sample: a demo's window counts from there, so a slow start shortens nothing."""
    t0 = time.monotonic()
    while not metric(scrape(), "streamtrain_samples_trained_total"):
        if daemon.poll() is not None:
            print(f"daemon exited early with {daemon.returncode}")
            return False
        if time.monotonic() - t0 > timeout:
            print(f"the daemon trained nothing within {timeout:.0f} s of its start; see its log above")
            return False
        time.sleep(0.2)
    print(f"==> training: first sample {time.monotonic() - t0:.1f} s after the start")
    return True


def fresh_out() -> Path:
    """demo-out/, emptied: the broker's log and the snapshots of this run."""
    out = ROOT / "demo-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    return out


def ports_taken(command: str) -> bool:
    """Whether the broker's or the metrics port is in use (said, with what to do)."""
    import socket

    for port in (BROKER_PORT, METRICS_PORT):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                print(f"port {port} is in use; stop what listens there and run `{command}` again")
                return True
    return False


def produce(bootstrap: str, stop: threading.Event, rate: float, sent: list[int]) -> None:
    stream = SyntheticStream(16, seed=7)
    producer = TestProducer(bootstrap)
    chunk = max(1, int(rate / 20))
    while not stop.is_set():
        t0 = time.monotonic()
        x, y = stream.batch(chunk)
        values = encode("json", x, y, FEATURES)
        values[0] = b"not json {" if sent[0] % (chunk * 25) == 0 else values[0]  # ~1 in 500 is garbage
        producer.send_all(TOPIC, values, partitions=4)
        producer.producer.poll(0)
        sent[0] += len(values)
        time.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))
    producer.flush()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=25.0, help="how long the daemon trains, from its first trained sample")
    ap.add_argument("--rate", type=float, default=20000.0, help="records per second produced")
    args = ap.parse_args()
    out = fresh_out()
    if ports_taken("make demo"):
        return 1
    print(f"==> starting the embedded Kafka broker (Tansu) on 127.0.0.1:{BROKER_PORT}")
    broker = start_tansu(BROKER_PORT, log_path=str(out / "broker.log"))
    daemon = producer = None
    stop = threading.Event()
    try:
        create_topic(broker.bootstrap, TOPIC, 4)
        sent = [0]
        producer = threading.Thread(target=produce, args=(broker.bootstrap, stop, args.rate, sent), daemon=True)
        producer.start()
        print(f"==> producing ~{args.rate:,.0f} JSON records/s to {TOPIC} (4 partitions), 1 in 500 garbage")
        print("==> starting the daemon: streamtrain run --config config/demo.yaml")
        daemon = subprocess.Popen([sys.executable, "-m", "streamtrain", "run", "--config", "config/demo.yaml"], cwd=ROOT)
        trend = []
        t_start = time.monotonic()
        if not first_sample(daemon):
            return 1
        t_start = time.monotonic()
        while time.monotonic() - t_start < args.seconds:
            time.sleep(2.5)
            if daemon.poll() is not None:
                print(f"daemon exited early with {daemon.returncode}")
                return 1
            text = scrape()
            loss = metric(text, "streamtrain_train_loss_ewma")
            trained = metric(text, "streamtrain_samples_trained_total")
            if loss is not None and trained:
                trend.append((time.monotonic() - t_start, trained, loss, metric(text, 'streamtrain_prequential_metric{metric="mae"}')))
        text = scrape()
        print("\n==> the loss falling (prequential: measured on each batch before training on it)")
        print(f"{'t (s)':>7} {'samples':>10} {'loss (ewma)':>12} {'MAE':>8}")
        for t, n, loss, mae in trend:
            print(f"{t:7.1f} {n:10,.0f} {loss:12.4f} {mae or 0:8.4f}")
        print("\n==> a few lines of /metrics")
        keep = (
            "streamtrain_samples_trained_total",
            "streamtrain_records_consumed_total",
            'streamtrain_records_rejected_total{reason="undecodable"}',
            "streamtrain_dead_letter_records_total",
            "streamtrain_consumer_lag",
            "streamtrain_data_wait_seconds_sum",
            "streamtrain_record_freshness_seconds_count",
            "streamtrain_last_snapshot_timestamp_seconds",
            "streamtrain_learning_rate",
        )
        for line in text.splitlines():
            if line.startswith(keep):
                print("   ", line)
        print("\n==> /readyz:", scrape("/readyz").strip())
        print("==> SIGTERM: the daemon finishes its step, writes a final snapshot, commits, exits")
        t0 = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        print(f"==> daemon exited {code} in {time.monotonic() - t0:.1f} s")
        snaps = sorted((out / "snapshots").glob("snap-*"))
        print(f"\n==> snapshots in {out / 'snapshots'}:")
        for s in snaps:
            files = ", ".join(f"{f.name} ({f.stat().st_size:,} B)" for f in sorted(s.iterdir()))
            print(f"    {s.name}: {files}")
        if snaps:
            meta = json.loads((snaps[-1] / "meta.json").read_text())
            print(f"    newest: step {meta['step']}, {meta['samples']:,} samples, loss ewma {meta['loss_ewma']:.4f}")
            print(f"    trained offsets: {meta['positions']}")
        print(f"\nproduced {sent[0]:,} records; broker log in {out / 'broker.log'}")
        return code
    finally:
        stop.set()
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        if producer is not None:
            producer.join(10)  # it flushes; then the broker can go
        broker.close()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
