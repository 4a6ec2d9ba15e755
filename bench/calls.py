"""Where the trainer's time between steps goes: ``python -m bench.calls``.

Runs the daemon's path end to end (ingest process, the small MLP) on a pre-filled topic,
with timers around the trainer-side calls of the shared ring: ``next_batch`` (what the
data-wait metric measures), ``get``, ``release`` (giving slots back, which wakes the
ingest process) and ``pump`` (waiting for and reading announcements).  Each
``--give-back-every`` value is a run of its own, side by side (the default is the
ring's own, a quarter of the slots).  ``--step-on private`` trains each step on a
batch of the same size from ordinary process memory instead of the shared slot (the
positions still advance): if the step is slower next to the data path because of the
slots' memory (cache lines written by the other core), it is faster then.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import sys
import time

import torch

from bench.common import MODELS, Broker, daemon_config, fill_topic, machine, print_machine, quiet_logs, records, snapshot_dir, table, unique
from bench.common import samples as make_samples
from bench.loops import end_to_end
from streamtrain.daemon.trainer import Trainer
from streamtrain.streams import dataset as dataset_module
from streamtrain.streams import shared_ring
from streamtrain.streams.encode import FORMATS

TIMED = ((shared_ring.SharedRing, "get"), (shared_ring.SharedRing, "release"), (shared_ring.SharedRing, "pump"))


def private_steps(batch_size: int):
    """A ``Trainer.step`` replacement that trains on in-memory copies of the same size (``--step-on private``)."""
    from streamtrain.streams.ring import Batch

    x, y = make_samples(64 * batch_size, seed=1)
    pool = [(torch.from_numpy(x[i : i + batch_size]), torch.from_numpy(y[i : i + batch_size])) for i in range(0, len(y), batch_size)]
    step, turn = Trainer.step, [0]

    def stepped(self, batch):
        px, py = pool[turn[0] % len(pool)]
        turn[0] += 1
        n = len(batch)
        return step(self, Batch(px[:n], py[:n], batch.positions, batch.oldest_timestamp, batch.slot))

    return stepped


def timed_run(cfg, samples: int, warmup: int, broker_pid: int | None, give_back_every: int, step_on: str = "slot") -> tuple[object, dict]:
    """One e2e run with the calls timed; returns (result, {call: [seconds of each call]})."""
    acc: dict[str, list[float]] = collections.defaultdict(list)
    saved = []

    def wrap(owner, name: str) -> None:
        original = getattr(owner, name)
        saved.append((owner, name, original))

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                acc[name].append(time.perf_counter() - t)

        setattr(owner, name, timed)

    for owner, name in TIMED:
        wrap(owner, name)
    wrap(dataset_module.KafkaIterableDataset, "next_batch")
    init = shared_ring.SharedRing.__init__

    def init_with(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if give_back_every:
            self.give_back_every = give_back_every

    shared_ring.SharedRing.__init__ = init_with
    step = Trainer.step
    if step_on == "private":
        Trainer.step = private_steps(cfg.ring.batch_size)
    try:
        result = end_to_end(cfg, samples, warmup, broker_pid=broker_pid)
    finally:
        Trainer.step = step
        shared_ring.SharedRing.__init__ = init
        for owner, name, original in saved:
            setattr(owner, name, original)
    return result, acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", default="raw", choices=FORMATS)
    ap.add_argument("--samples", type=int, default=300_000, help="samples per measured window")
    ap.add_argument("--give-back-every", default="1,0", help="comma-separated; 0 = the ring's default (slots / 4)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--step-on", default="slot", help="comma-separated: slot (the shared slot, as the daemon) and/or private")
    ap.add_argument("--bootstrap", help="an existing broker instead of the embedded one")
    args = ap.parse_args(argv)
    quiet_logs()
    print_machine(machine())
    spec = MODELS["mlp"]
    warmup = max(spec.batch_size * 20, args.samples // 10)
    rows = []
    with Broker(args.bootstrap) as broker:
        topic = unique(f"bench-calls-{args.format}")
        fill_topic(broker.bootstrap, topic, records(args.format, 2 * (warmup + args.samples)))
        for _ in range(args.repeat):
            for every, step_on in [(int(v), s) for v in args.give_back_every.split(",") if v for s in args.step_on.split(",") if s]:
                d = snapshot_dir()
                cfg = daemon_config(broker.bootstrap, topic, args.format, spec, d, ring={"ingest": "process"})
                result, acc = timed_run(cfg, args.samples, warmup, broker.pid, every, step_on)
                shutil.rmtree(d, ignore_errors=True)
                per = {name: statistics.median(acc[name]) * 1e6 for name in ("next_batch", "get", "release")}
                release_mean = statistics.fmean(acc["release"]) * 1e6
                rows.append(
                    [
                        str(every or f"{cfg.ring.slots // 4} (default)"),
                        step_on,
                        f"{1e6 * result.extra['step_s']:.0f} us",
                        f"{result.rate / 1000:.1f} k",
                        f"{100 * result.wait_fraction:.1f} %",
                        f"{per['next_batch']:.1f} us",
                        f"{per['get']:.1f} us",
                        f"{per['release']:.1f} / {release_mean:.1f} us",
                        f"{len(acc['pump'])} / {len(acc['get'])}",
                    ]
                )
                print(f"give back every {rows[-1][0]}, step on {step_on}: e2e {rows[-1][3]}/s, data-wait {rows[-1][4]}", flush=True)
    print()
    print(
        table(
            [
                "give back every",
                "step on",
                "step",
                "e2e samples/s",
                "data-wait",
                "next_batch median",
                "get median",
                "release median / mean",
                "pumps / gets",
            ],
            rows,
        )
    )
    print(
        f"\n{args.format}, MLP 16-64-1 batch 256, ingest process; calls timed over the whole run, setup included"
        " (medians: the typical call)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
