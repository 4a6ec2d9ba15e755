"""`make demo-join`: impressions on one topic, their clicks on another seconds later, joined by the daemon.

Starts the embedded broker, produces ad impressions (``request_id``, an ad, a user, a
device, a bid and a position) to ``demo.impressions`` and, for the ones clicked, a click
record ``{"request_id": ..., "clicked": true}`` to ``demo.clicks`` after a random delay
(mean 2 s; one in ten comes after the 8 s window, and is late). The click probability
depends on the ad, the position and the bid. The daemon (config/demo-join.yaml) trains a
logistic model on the joined stream: each impression once, with its click if it came in
time, else as a negative. Prints what the join did and the prequential log loss falling,
then stops the daemon with SIGTERM. Bounded: about 40 s.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.broker import TestProducer, create_topic, start_tansu  # noqa: E402
from demo.run_demo import BROKER_PORT, first_sample, fresh_out, metric, ports_taken, scrape  # noqa: E402

IMPRESSIONS, CLICKS = "demo.impressions", "demo.clicks"


def produce(bootstrap: str, stop: threading.Event, rate: float, sent: dict[str, int]) -> None:
    rng = random.Random(7)
    appeal = {f"ad{i}": rng.gauss(-2.5, 1.0) for i in range(200)}  # each ad's own click-through
    p = TestProducer(bootstrap).producer
    due: list[tuple[float, str, int]] = []  # (when, request id, partition): clicks on their way
    n = 0
    while not stop.is_set():
        t0 = time.monotonic()
        for _ in range(max(1, int(rate / 20))):
            n += 1
            rid, ad, pos, bid = f"req-{n}", f"ad{rng.randrange(200)}", rng.randint(1, 5), rng.uniform(0.1, 2.0)
            part = n % 4  # both topics keyed and partitioned alike: a click goes to its impression's partition
            rec = {"request_id": rid, "ad": ad, "user": f"u{rng.randrange(5000)}", "device": rng.choice(["ios", "android", "web"])}
            p.produce(IMPRESSIONS, json.dumps({**rec, "bid": round(bid, 3), "position": pos}).encode(), partition=part)
            sent["impressions"] += 1
            z = appeal[ad] - 0.4 * (pos - 1) + 0.5 * bid
            if rng.random() < 1 / (1 + math.exp(-z)):
                delay = rng.uniform(9, 12) if rng.random() < 0.1 else rng.expovariate(0.5)
                heapq.heappush(due, (time.monotonic() + delay, rid, part))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, rid, part = heapq.heappop(due)
            p.produce(CLICKS, json.dumps({"request_id": rid, "clicked": True}).encode(), partition=part)
            sent["clicks"] += 1
        p.poll(0)
        time.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))
    p.flush(10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the daemon trains, from its first trained sample")
    ap.add_argument("--rate", type=float, default=2000.0, help="impressions per second")
    args = ap.parse_args()
    out = fresh_out()
    if ports_taken("make demo-join"):
        return 1
    print(f"==> starting the embedded Kafka broker (Tansu) on 127.0.0.1:{BROKER_PORT}")
    broker = start_tansu(BROKER_PORT, log_path=str(out / "broker.log"))
    daemon = producer = None
    stop = threading.Event()
    try:
        create_topic(broker.bootstrap, IMPRESSIONS, 4)
        create_topic(broker.bootstrap, CLICKS, 4)
        sent = {"impressions": 0, "clicks": 0}
        producer = threading.Thread(target=produce, args=(broker.bootstrap, stop, args.rate, sent), daemon=True)
        producer.start()
        print(f"==> producing ~{args.rate:,.0f} impressions/s to {IMPRESSIONS}, their clicks (~2 s later) to {CLICKS}")
        print("==> starting the daemon: streamtrain run --config config/demo-join.yaml")
        daemon = subprocess.Popen([sys.executable, "-m", "streamtrain", "run", "--config", "config/demo-join.yaml"], cwd=ROOT)
        if not first_sample(daemon):
            return 1
        print(f"\n{'t (s)':>6} {'trained':>9} {'joined':>8} {'expired':>8} {'late':>6} {'waiting':>8} {'log loss (1h)':>14}")
        t_start, last = time.monotonic(), (0.0, 0.0)
        while time.monotonic() - t_start < args.seconds:
            time.sleep(3.0)
            if daemon.poll() is not None:
                print(f"daemon exited early with {daemon.returncode}")
                return 1
            text = scrape()
            loss, samples = metric(text, "streamtrain_prequential_loss_total"), metric(text, "streamtrain_prequential_samples_total")
            window = (loss - last[0]) / (samples - last[1]) if loss is not None and samples and samples > last[1] else math.nan
            last = (loss or 0.0, samples or 0.0)
            print(
                f"{time.monotonic() - t_start:6.1f} {metric(text, 'streamtrain_samples_trained_total') or 0:9,.0f}"
                f" {metric(text, 'streamtrain_labels_joined_total') or 0:8,.0f}"
                f" {metric(text, 'streamtrain_labels_expired_total') or 0:8,.0f}"
                f" {metric(text, 'streamtrain_labels_late_total') or 0:6,.0f}"
                f" {metric(text, 'streamtrain_join_pending') or 0:8,.0f} {window:14.4f}"
            )
        print("\n(log loss: prequential, of the last 3 s: each impression scored before it was trained, once its click came or")
        print(" its 8 s window passed; 'expired' impressions were trained as negatives, 'late' clicks came after that)")
        print("==> SIGTERM: the daemon finishes its step, writes a final snapshot (positions and done offsets), exits")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        print(f"==> daemon exited {code}; produced {sent['impressions']:,} impressions and {sent['clicks']:,} clicks")
        snaps = sorted((out / "snapshots").glob("snap-*"))
        if snaps:
            meta = json.loads((snaps[-1] / "meta.json").read_text())
            print(f"==> newest snapshot {snaps[-1].name}: {meta['samples']:,} samples; positions {meta['positions']}")
        return code
    finally:
        stop.set()
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        if producer is not None:
            producer.join(10)
        broker.close()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
