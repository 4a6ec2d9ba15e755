"""A standalone demo producer: the learnable synthetic stream, written to Kafka at a steady rate.

``python -m demo.producer --bootstrap kafka:9092 --topic demo.samples --rate 2000``
is the ``producer`` service of docker-compose.yml.  Records are encoded through
:mod:`streams.encode` (16 features ``f0..f15`` and the label ``y``, as config/compose.yaml
reads them); ``--bad-every N`` makes every N-th record undecodable, to show the
dead-letter path.  SIGTERM/SIGINT flush what was produced and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from confluent_kafka import Producer

from demo.synthetic import SyntheticStream
from streamtrain.streams.encode import FORMATS, encode

log = logging.getLogger("streamtrain.demo.producer")

FEATURES = [f"f{i}" for i in range(16)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.producer", description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers (default %(default)s)")
    ap.add_argument("--topic", default="demo.samples", help="topic to write (default %(default)s)")
    ap.add_argument("--rate", type=float, default=1000.0, help="records per second (default %(default)s)")
    ap.add_argument("--format", choices=FORMATS, default="json", help="record format (default %(default)s)")
    ap.add_argument("--bad-every", type=int, default=0, help="make every N-th record undecodable; 0: none")
    ap.add_argument("--seconds", type=float, default=0.0, help="stop after this long; 0: run until SIGTERM")
    ap.add_argument("--seed", type=int, default=7, help="seed of the synthetic stream (the target function)")
    args = ap.parse_args(argv)
    if args.rate <= 0:
        ap.error("--rate must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    errors = {"count": 0, "last": ""}

    def on_delivery(err, _msg) -> None:
        if err is not None:
            errors["count"] += 1
            errors["last"] = err.str()

    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 20, "client.id": "streamtrain-demo-producer"})
    stream = SyntheticStream(16, seed=args.seed)
    tick = 0.1
    sent = 0
    started = last_log = time.monotonic()
    log.info("producing %s records to %s at %s at ~%.0f/s", args.format, args.topic, args.bootstrap, args.rate)
    while not stop.is_set() and not (args.seconds and time.monotonic() - started >= args.seconds):
        t0 = time.monotonic()
        due = int(args.rate * (t0 - started + tick)) - sent  # keeps the long-run rate exact
        if due > 0:
            x, y = stream.batch(due)
            values = encode(args.format, x, y, FEATURES)
            if args.format == "arrow":
                due = len(y)  # one message holds many rows; the rate counts samples
            for i, value in enumerate(values):
                if args.bad_every and (sent + i + 1) % args.bad_every == 0:
                    value = b"\x00not a record"
                _produce(producer, args.topic, value, on_delivery)
            sent += due
        producer.poll(0)
        if t0 - last_log >= 10:
            log.info("%s records produced", f"{sent:,}")
            if errors["count"]:
                log.warning("%d record(s) not delivered so far; last error: %s", errors["count"], errors["last"])
            last_log = t0
        stop.wait(max(0.0, tick - (time.monotonic() - t0)))
    left = producer.flush(30)
    if errors["count"] or left:
        log.error("%d record(s) not delivered; last error: %s", errors["count"] + left, errors["last"] or "flush timed out")
        return 1
    log.info("done: %s records produced", f"{sent:,}")
    print(sent, flush=True)
    return 0


def _produce(producer: Producer, topic: str, value: bytes, on_delivery) -> None:
    while True:
        try:
            producer.produce(topic, value=value, on_delivery=on_delivery)
            return
        except BufferError:  # the local queue is full: let deliveries drain it
            producer.poll(0.05)


if __name__ == "__main__":
    sys.exit(main())
