"""What taking a slot's announcement costs the trainer: ``python -m bench.frames``.

Alone, in one process, over a real pipe: ``--waiting`` announcements (a batch's tuple
with two partitions' positions) are written, then taken the way the trainer took them
before (``multiprocessing.connection``: a ``poll()`` and two reads plus unpickling per
message) and the way it does now (:class:`streams.shared_ring.FrameReader`: every frame
waiting in one read).  Then handing a full slot out by indexing (``x[slot, :n]``)
against the views made once (:func:`streams.ring.slot_views`).  Prints microseconds per
batch, best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing.connection import Connection

import torch

from bench.common import machine, print_machine, table
from streamtrain.streams.ring import slot_views
from streamtrain.streams.shared_ring import FrameReader, send_frame

MESSAGE = ("batch", 5, 256, {("bench-raw", 0): (123456, 0), ("bench-raw", 1): (123400, 0)}, 1.7e9)


def per_message(take, put, waiting: int, total: int) -> float:
    """Seconds per message taken, ``waiting`` written before each round of taking."""
    spent, n = 0.0, 0
    while n < total:
        for _ in range(waiting):
            put()
        t = time.perf_counter()
        n += take()
        spent += time.perf_counter() - t
    return spent / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.frames", description=__doc__.split("\n\n")[0])
    ap.add_argument("--waiting", type=int, default=16, help="announcements waiting in the pipe when the trainer reads")
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    print_machine(machine())

    r, w = os.pipe()
    conn_r, conn_w = Connection(r, writable=False), Connection(w, readable=False)

    def take_connection() -> int:
        got = 0
        while conn_r.poll(0):
            conn_r.recv()
            got += 1
        return got

    r2, w2 = os.pipe()
    reader = FrameReader(r2)

    x, y = torch.zeros(32, 256, 16), torch.zeros(32, 256)
    views = slot_views(x, y)
    n = 256

    def best(f) -> float:
        return min(f() for _ in range(args.repeat)) * 1e6

    def index_slot() -> float:
        t = time.perf_counter()
        for i in range(args.messages):
            x[i % 32, :n], y[i % 32, :n]
        return (time.perf_counter() - t) / args.messages

    def view_slot() -> float:
        t = time.perf_counter()
        for i in range(args.messages):
            xs, ys = views[0][i % 32], views[1][i % 32]
            if n != len(ys):
                xs, ys = xs[:n], ys[:n]
        return (time.perf_counter() - t) / args.messages

    rows = [
        [
            "announcement: poll() + 2 reads + unpickle each (before)",
            f"{best(lambda: per_message(take_connection, lambda: conn_w.send(MESSAGE), args.waiting, args.messages)):.2f}",
        ],
        [
            "announcement: every frame waiting in one read (now)",
            f"{best(lambda: per_message(lambda: len(reader.read(0)), lambda: send_frame(w2, MESSAGE), args.waiting, args.messages)):.2f}",
        ],
        ["full slot: x[slot, :n], y[slot, :n] (before)", f"{best(index_slot):.2f}"],
        ["full slot: views made once (now)", f"{best(view_slot):.2f}"],
    ]
    conn_r.close()
    conn_w.close()
    for fd in (r2, w2):
        os.close(fd)
    print(table(["per batch", "us"], rows))
    print(f"\n{args.waiting} announcements waiting per read, {args.messages:,} per run, best of {args.repeat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
