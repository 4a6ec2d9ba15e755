"""What the benchmarks share: the broker, pre-filled topics, the daemon's config, the machine.

Every benchmark runs on the embedded broker (Tansu, from the ``test`` extra) unless
``--bootstrap`` names another one, with the synthetic stream of the demo: 16 float
features and a label (``demo/synthetic.py``).
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from demo.synthetic import SyntheticStream
from streamtrain.config.schema import Config, config_from_dict
from streamtrain.streams.encode import encode

WIDTH = 16
FEATURES = [f"f{i}" for i in range(WIDTH)]
PARTITIONS = 4
ROWS_PER_ARROW_MESSAGE = 1000


@dataclass(frozen=True)
class ModelSpec:
    """A model as the daemon's config names it, with the batch size it is benchmarked at."""

    key: str
    name: str
    params: dict[str, Any]
    batch_size: int


MODELS = {
    # the data path is the bottleneck: a step is well under a millisecond
    "mlp": ModelSpec("mlp", "mlp", {"hidden": [64]}, 256),
    # compute is: 16 steps of 1 feature, d_model 32, 2 layers
    "transformer": ModelSpec(
        "transformer", "transformer", {"seq_len": 16, "d_in": 1, "d_model": 32, "nhead": 4, "num_layers": 2, "dim_feedforward": 64}, 64
    ),
}


class Broker:
    """The embedded Tansu broker on loopback, or an external one (nothing started)."""

    def __init__(self, bootstrap: str | None = None) -> None:
        self._tansu = None
        if bootstrap:
            self.bootstrap = bootstrap
        else:
            from demo.broker import start_tansu  # the test extra ships the broker binary

            self._tansu = start_tansu()
            self.bootstrap = self._tansu.bootstrap

    @property
    def pid(self) -> int | None:
        return self._tansu.proc.pid if self._tansu else None

    def close(self) -> None:
        if self._tansu is not None:
            self._tansu.close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def samples(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return SyntheticStream(WIDTH, seed=seed).batch(n)


def records(fmt: str, n: int, seed: int = 0) -> list[bytes]:
    """Record values holding ``n`` samples (arrow packs ROWS_PER_ARROW_MESSAGE per record)."""
    if fmt in ROWS:
        return ROWS[fmt][1](n, seed)
    x, y = samples(n, seed)
    return encode(fmt, x, y, FEATURES, "y", rows_per_message=ROWS_PER_ARROW_MESSAGE)


def _numbers8(n: int, seed: int) -> list[bytes]:
    x, y = samples(n, seed)
    return encode("json", x[:, :8], y, FEATURES[:8], "y")


def _numbers4_ids4(n: int, seed: int) -> list[bytes]:
    """4 numbers and 4 string ids (Zipf users of 50,000 and items of 20,000, a device, a country): as wide as json-8."""
    x, y = samples(n, seed)
    rng = np.random.default_rng(seed)

    def zipf(count: int) -> np.ndarray:
        p = 1.0 / np.arange(1, count + 1) ** 1.05
        return rng.choice(count, size=n, p=p / p.sum())

    cats = {
        "user": [f"user-{u}" for u in zipf(50_000).tolist()],
        "item": [f"item-{i}" for i in zipf(20_000).tolist()],
        "device": [["ios", "android", "web", "tv"][d] for d in rng.integers(0, 4, n).tolist()],
        "country": [f"c{c}" for c in rng.integers(0, 20, n).tolist()],
    }
    return encode("json", x[:, :4], y, FEATURES[:4], "y", categorical=cats)


# Pseudo-formats of bench.ingest and bench.pipeline: JSON rows of the same width, with and without string ids.
ROWS: dict[str, tuple[dict[str, Any], Any]] = {
    "json-8": ({"features": FEATURES[:8]}, _numbers8),
    "json-4+4ids": ({"features": FEATURES[:4], "categorical": ["user", "item", "device", "country"]}, _numbers4_ids4),
}


def rows_per_message(fmt: str) -> int:
    return ROWS_PER_ARROW_MESSAGE if fmt == "arrow" else 1


def producer(bootstrap: str, **settings: Any):
    from confluent_kafka import Producer

    base = {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000, "queue.buffering.max.messages": 1_000_000}
    return Producer({**base, **settings})


def fill_topic(
    bootstrap: str, topic: str, values: Sequence[bytes], partitions: int = PARTITIONS, flush_s: float = 120.0, **settings: Any
) -> None:
    """Create ``topic`` and produce ``values`` round-robin over its partitions; returns when all are acknowledged.

    ``settings`` override the producer's (e.g. ``batch.num.messages`` for small produce batches).
    """
    from demo.broker import create_topic

    create_topic(bootstrap, topic, partitions)
    p = producer(bootstrap, **settings)
    failed: list[str] = []

    def on_delivery(err, _msg) -> None:
        if err is not None:
            failed.append(err.str())

    for i, v in enumerate(values):
        while True:
            try:
                p.produce(topic, v, partition=i % partitions, on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.05)
        if i % 10000 == 0:
            p.poll(0)
    left = p.flush(flush_s)
    if left or failed:
        raise RuntimeError(f"filling {topic}: {left} record(s) undelivered, errors {failed[:3]}")


def paced_produce(bootstrap: str, topic: str, fmt: str, rate: float, seconds: float, seed: int = 7) -> None:
    """Produce samples at ``rate`` per second for ``seconds`` (run it in its own process).

    Record timestamps are the produce time (CreateTime), so record-timestamp -> trained
    is the freshness a producer sees.
    """
    rpm = rows_per_message(fmt)
    pool = records(fmt, min(int(rate * seconds) + rpm, 50_000 * rpm), seed)
    p = producer(bootstrap, **{"linger.ms": 5})
    t0 = time.perf_counter()
    sent = 0
    total = int(rate * seconds / rpm)
    msg_rate = rate / rpm
    while sent < total:
        due = min(total, int(msg_rate * (time.perf_counter() - t0)) + 1)
        while sent < due:
            try:
                p.produce(topic, pool[sent % len(pool)], partition=sent % PARTITIONS)
                sent += 1
            except BufferError:
                p.poll(0.01)
        p.poll(0)
        time.sleep(0.001)
    p.flush(60)


def start_producer(bootstrap: str, topic: str, fmt: str, rate: float, seconds: float):
    """:func:`paced_produce` in a child process (spawned: it shares neither the GIL nor the cores' scheduling with us)."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=paced_produce, args=(bootstrap, topic, fmt, rate, seconds), daemon=True)
    proc.start()
    return proc


def daemon_config(
    bootstrap: str,
    topic: str,
    fmt: str,
    model: ModelSpec,
    snapshot_dir: str,
    *,
    kafka: dict[str, Any] | None = None,
    ring: dict[str, Any] | None = None,
    snapshot: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
) -> Config:
    """The daemon's config for a benchmark run: snapshots off the timer unless asked, no metrics server."""
    data: dict[str, Any] = {"format": fmt, "label": "y"}
    if fmt in ROWS:
        data = {"format": "json", "label": "y", **ROWS[fmt][0]}
    elif fmt == "raw":
        data["num_features"] = WIDTH
    else:
        data["features"] = FEATURES
    return config_from_dict(
        {
            "kafka": {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": unique("bench"), **(kafka or {})},
            "dead_letter": {"topic": f"{topic}.dlq"},
            "data": data,
            "ring": {"batch_size": model.batch_size, **(ring or {})},
            "model": {"name": model.name, "params": model.params},
            "trainer": {"task": "regression", "lr": 1e-3, **(trainer or {})},
            "snapshot": {"dir": snapshot_dir, "every_seconds": 0, "every_steps": 0, **(snapshot or {})},
            "metrics": {"enabled": False, **(metrics or {})},
            "logging": {"progress_every_s": 0, "level": "WARNING"},
        }
    )


def snapshot_dir() -> str:
    return tempfile.mkdtemp(prefix="streamtrain-bench-")


def quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("streamtrain").setLevel(logging.WARNING)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    import confluent_kafka
    import pyarrow
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyarrow": pyarrow.__version__,
        "confluent-kafka": f"{confluent_kafka.version()[0]} (librdkafka {confluent_kafka.libversion()[0]})",
        "numpy": np.__version__,
        "load average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def print_machine(info: dict[str, str]) -> None:
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))


def fmt_rate(v: float) -> str:
    if v != v:  # nan
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    return f"{v:.0f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (it reads in a terminal too)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far; 0 if it cannot be read."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """CPU seconds every process on the machine has used so far (busy time in /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Child processes of ``pid`` (e.g. the daemon's ingest process), from /proc."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children (the daemon's ingest process), MiB."""
    total = 0.0
    for p in (pid, *children(pid)):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0) / 1024
        except OSError:
            pass
    return total


class CpuMeter:
    """CPU used over a window: by this process, by the broker, and by everything else on the machine.

    "Everything else" is the other work on a shared machine: a window where it is high
    (0.5 = half a core) competed for the cores and its ratios are pessimistic.
    """

    def __init__(self, broker_pid: int | None = None) -> None:
        self.broker_pid = broker_pid
        self.start()

    def _read(self) -> tuple[float, float, float, float]:
        me = os.getpid()
        own = proc_cpu(me) + sum(proc_cpu(c) for c in children(me))  # the ingest process is the daemon's too
        return time.perf_counter(), own, proc_cpu(self.broker_pid), machine_cpu()

    def start(self) -> None:
        self._t0 = self._read()

    def stop(self) -> dict[str, float]:
        t1 = self._read()
        wall, me, broker, total = (b - a for a, b in zip(self._t0, t1))
        return {"wall": wall, "self_cpu": me, "broker_cpu": broker, "other_cores": max(0.0, total - me - broker) / max(wall, 1e-9)}


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
