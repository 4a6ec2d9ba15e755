"""How long training pauses for a snapshot: ``python -m bench.snapshot``.

A ~100 MB model (an MLP 16 -> 5000 -> 5000 -> 1: 25 M float32 parameters; with
AdamW's two moments the state is ~300 MB) is trained a few steps, then compared:

- copy to host: :func:`daemon.snapshot_writer.state_to_host` of the trainer's state,
  the least a consistent snapshot can cost the training thread;
- the pause: how long :meth:`Trainer.snapshot` holds the training thread (the call,
  and the daemon's own ``streamtrain_snapshot_pause_seconds``);
- the write: serialization, fsyncs, manifest, on the writer thread
  (``streamtrain_snapshot_duration_seconds``); and how many steps the trainer took
  meanwhile, against the same steps with no write going on.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time

import torch

from bench.common import ModelSpec, daemon_config, machine, print_machine, quiet_logs, samples, snapshot_dir, table
from streamtrain.daemon.metrics import Metrics
from streamtrain.daemon.snapshot_writer import state_to_host
from streamtrain.daemon.trainer import Trainer
from streamtrain.streams.ring import Batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.snapshot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=5000, help="width of the two hidden layers (5000: ~100 MB of weights)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", help="snapshot directory (default: a new one under the temp dir)")
    args = ap.parse_args(argv)
    quiet_logs()
    info = machine()
    print_machine(info)
    spec = ModelSpec("big-mlp", "mlp", {"hidden": [args.hidden, args.hidden]}, 64)
    directory = args.dir or snapshot_dir()
    cfg = daemon_config("127.0.0.1:9", "unused", "raw", spec, directory)
    metrics = Metrics()
    trainer = Trainer(cfg, metrics)
    trainer.setup(stream=False)
    try:
        x, y = samples(spec.batch_size * 8)
        batches = [Batch(torch.from_numpy(x[i : i + 64]), torch.from_numpy(y[i : i + 64])) for i in range(0, len(y), 64)]
        for b in batches[:3]:
            trainer.step(b)  # the optimizer's moments exist from the first step
        weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        state_bytes = _tensor_bytes(trainer.state_dict())
        print(f"model {weights / 2**20:.0f} MiB of weights, {state_bytes / 2**20:.0f} MiB of state (with the optimizer)", flush=True)

        copy_s, pause_s, metric_s, write_s, steps_during, step_alone, step_during = [], [], [], [], [], [], []
        for i in range(args.repeat):
            t0 = time.perf_counter()
            state_to_host(trainer.state_dict())
            copy_s.append(time.perf_counter() - t0)

            # steps with no write going on, for comparison
            t0 = time.perf_counter()
            for b in batches[:4]:
                trainer.step(b)
            step_alone.append((time.perf_counter() - t0) / 4)

            trainer.step(batches[i % len(batches)])  # something new to snapshot
            before = metrics.registry.get_sample_value("streamtrain_snapshot_pause_seconds_sum") or 0.0
            t0 = time.perf_counter()
            trainer.snapshot()
            pause_s.append(time.perf_counter() - t0)
            metric_s.append((metrics.registry.get_sample_value("streamtrain_snapshot_pause_seconds_sum") or 0.0) - before)
            written = metrics.registry.get_sample_value("streamtrain_snapshot_duration_seconds_sum") or 0.0
            k, t0 = 0, time.perf_counter()
            while trainer.writer.busy():
                trainer.step(batches[k % len(batches)])
                k += 1
            if k:
                step_during.append((time.perf_counter() - t0) / k)
            steps_during.append(k)
            write_s.append((metrics.registry.get_sample_value("streamtrain_snapshot_duration_seconds_sum") or 0.0) - written)
    finally:
        trainer.ready = False
        trainer.close()
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)

    med = statistics.median
    ms = lambda v: f"{1e3 * v:.0f} ms"  # noqa: E731
    rows = [
        ["copy to host (state_to_host)", ms(med(copy_s)), ms(min(copy_s)), ms(max(copy_s))],
        ["Trainer.snapshot() on the training thread", ms(med(pause_s)), ms(min(pause_s)), ms(max(pause_s))],
        ["  of which streamtrain_snapshot_pause_seconds", ms(med(metric_s)), ms(min(metric_s)), ms(max(metric_s))],
        ["write (writer thread: torch.save, fsync, sha256)", ms(med(write_s)), ms(min(write_s)), ms(max(write_s))],
        ["a training step, no write going on", ms(med(step_alone)), ms(min(step_alone)), ms(max(step_alone))],
        ["a training step while the write goes on", ms(med(step_during)) if step_during else "-", "", ""],
    ]
    print()
    print(table(["what", "median", "min", "max"], rows))
    print(
        f"\npause / copy = {med(pause_s) / med(copy_s):.2f}; the trainer took {med(steps_during):.0f} steps (median) during each write;"
        f" {args.repeat} snapshots of {state_bytes / 2**20:.0f} MiB to {directory if args.dir else 'the temp dir'}"
    )
    print_machine(info)
    return 0


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


if __name__ == "__main__":
    sys.exit(main())
