"""The four loops the pipeline benchmark compares, each measured over a steady-state window.

- :func:`compute_only`: ``Trainer.step`` on batches already in memory, the ceiling;
- :func:`raw_consume`: librdkafka reading the topic with the daemon's consumer settings, no decoding;
- :func:`naive_loop`: the tutorial loop (``poll()`` one message, ``json.loads``, ``torch.tensor``
  per record, ``torch.stack`` per batch) training the same model;
- :func:`end_to_end`: the daemon's own data path and training loop (``Trainer.setup()`` +
  ``Trainer.train()``) reading the topic, with the data-wait read from its metric.

Each returns a :class:`Result`: samples per second over the window that starts once
``warmup`` samples are done (setup, connecting and the first fetch are left out).
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.common import FEATURES, ROWS, CpuMeter, Timer, samples, unique
from streamtrain.config.schema import Config
from streamtrain.daemon.metrics import Metrics
from streamtrain.daemon.trainer import Trainer
from streamtrain.models.registry import build_model
from streamtrain.streams.ring import Batch


@dataclass
class Result:
    samples: int = 0
    seconds: float = math.nan
    data_wait: float = math.nan  # seconds the trainer waited for a batch within the window
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds and self.seconds == self.seconds else math.nan

    @property
    def wait_fraction(self) -> float:
        return self.data_wait / self.seconds if self.seconds else math.nan


# ---------------------------------------------------------------------------- compute only
def compute_only(cfg: Config, n: int, warmup: int, fmt: str = "") -> Result:
    """The same Trainer (model, batch, device, standardizer, torch threads) stepping on in-memory batches.

    For one of bench.common's ROWS formats (categorical fields, or the numbers with their
    missing-value indicators) the batches are that format's records decoded by the
    daemon's decoder: the same columns and table rows as the e2e run trains on.
    """
    trainer = Trainer(cfg, Metrics())
    trainer.setup(stream=False)
    try:
        bs = cfg.ring.batch_size
        if cfg.data.categorical or fmt in ROWS:
            from bench.common import records
            from streamtrain.streams.decode import LabelRule, make_decoder

            out = make_decoder(cfg.data, LabelRule.of(cfg.trainer)).decode(records(fmt, 64 * bs, seed=1))
            x, y, ids = torch.from_numpy(out.x), torch.from_numpy(out.y), torch.from_numpy(out.ids)
            batches = [Batch(x[i : i + bs], y[i : i + bs], ids=ids[i : i + bs]) for i in range(0, len(y), bs)]
        else:
            x, y = samples(64 * bs, seed=1)
            batches = [Batch(torch.from_numpy(x[i : i + bs]), torch.from_numpy(y[i : i + bs])) for i in range(0, len(y), bs)]
        done, i = 0, 0
        while done < warmup:
            trainer.step(batches[i % len(batches)])
            done += bs
            i += 1
        t, cpu = Timer(), CpuMeter()
        done = 0
        while done < n:
            trainer.step(batches[i % len(batches)])
            done += bs
            i += 1
        seconds = t()
        return Result(done, seconds, 0.0, {"step_s": seconds / (done // bs), **cpu.stop()})
    finally:
        trainer.ready = False  # no final snapshot: nothing here is worth keeping
        trainer.close()


# ---------------------------------------------------------------------------- raw consume
def _assigned_consumer(cfg: Config, settings: dict):
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(settings)
    topic = cfg.kafka.topics[0]
    md = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(md.partitions)])
    return c


def raw_consume(cfg: Config, messages: int, rows_per_message: int) -> Result:
    """``consume()`` with the daemon's consumer settings until ``messages`` are read; no decoding."""
    from streamtrain.streams.source import consumer_settings

    c = _assigned_consumer(cfg, consumer_settings(cfg.kafka, "bench-raw"))
    try:
        got = 0
        t = None
        first = 0
        batch, timeout = cfg.kafka.consume_batch, cfg.kafka.consume_timeout_ms / 1000
        deadline = time.monotonic() + 120
        while got < messages and time.monotonic() < deadline:
            msgs = c.consume(num_messages=batch, timeout=timeout)
            ok = sum(1 for m in msgs if m.error() is None)
            if t is None and ok:
                t, first = Timer(), ok  # the window starts after the first batch arrives
            got += ok
        seconds = t() if t else math.nan
        return Result((got - first) * rows_per_message, seconds, extra={"messages_per_s": (got - first) / seconds})
    finally:
        c.close()


# ---------------------------------------------------------------------------- the naive loop
def naive_loop(cfg: Config, n: int, warmup: int) -> Result:
    """The loop the tutorials write, training the same model (JSON records).

    One ``poll()`` per message, ``json.loads``, a tensor per record, ``torch.stack`` per
    batch, then forward/backward/step with the same model and optimizer settings.
    Plain consumer settings, as a tutorial has them; ``assign()`` instead of
    ``subscribe()`` only so that no group join is timed.
    """
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model.name, dict(cfg.model.params), cfg.data.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr)
    settings = {"bootstrap.servers": cfg.kafka.bootstrap_servers, "group.id": unique("naive"), "enable.auto.commit": False}
    c = _assigned_consumer(cfg, settings)
    bs = cfg.ring.batch_size
    try:
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        done = 0
        t = None
        deadline = time.monotonic() + 300
        while done < warmup + n and time.monotonic() < deadline:
            msg = c.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            record = json.loads(msg.value())
            xs.append(torch.tensor([record[f] for f in FEATURES], dtype=torch.float32))
            ys.append(torch.tensor(record["y"], dtype=torch.float32))
            if len(xs) == bs:
                x, y = torch.stack(xs), torch.stack(ys)
                xs, ys = [], []
                loss = torch.nn.functional.mse_loss(model(x).reshape(-1), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += bs
                if t is None and done >= warmup:
                    t, start = Timer(), done
        return Result(done - start, t()) if t else Result()
    finally:
        c.close()


# ---------------------------------------------------------------------------- end to end
def end_to_end(
    cfg: Config,
    n: int,
    warmup: int,
    timeout: float = 300.0,
    on_batch=None,
    broker_pid: int | None = None,
    max_seconds: float = 0.0,
) -> Result:
    """The daemon's data path and training loop on the topic, in this process.

    ``Trainer.train()`` runs as the daemon runs it; the window is read through its
    ``on_beat`` hook (called once per turn of the loop, as the service does for
    /healthz), from the turn where ``warmup`` samples are trained to the one where
    ``warmup + n`` are (or ``max_seconds`` have passed).  The data-wait comes from the daemon's own
    ``streamtrain_data_wait_seconds`` histogram.  ``on_batch(batch)`` is called after each
    step (the freshness benchmark times batches with it).
    """
    metrics = Metrics()
    trainer = Trainer(cfg, metrics)
    mark: dict[str, float] = {}
    cpu = CpuMeter(broker_pid)

    def wait_sum() -> float:
        return metrics.registry.get_sample_value("streamtrain_data_wait_seconds_sum") or 0.0

    def step_sum() -> float:
        return metrics.registry.get_sample_value("streamtrain_step_seconds_sum") or 0.0

    def beat() -> None:
        s = trainer.samples - mark["base"]  # a snapshot in the directory would start the count above 0
        if "t0" not in mark:
            if s >= warmup:
                mark.update(t0=time.perf_counter(), s0=s, w0=wait_sum(), st0=step_sum(), n0=trainer.step_count)
                cpu.start()
        elif s >= warmup + n or (max_seconds and time.perf_counter() - mark["t0"] >= max_seconds):
            mark.update(t1=time.perf_counter(), s1=s, w1=wait_sum(), st1=step_sum(), n1=trainer.step_count, **cpu.stop())
            trainer.stop.set()

    trainer.on_beat = beat
    if on_batch is not None:
        trainer.on_step = lambda batch, _result: on_batch(batch)
    watchdog = threading.Timer(timeout, trainer.stop.set)
    watchdog.daemon = True
    try:
        trainer.setup()
        mark["base"] = trainer.samples
        watchdog.start()
        trainer.train()
        stats = trainer.dataset.stats
    finally:
        watchdog.cancel()
        trainer.stop.set()
        trainer.close()
    if "t1" not in mark:
        done = trainer.samples - mark.get("base", 0)
        raise RuntimeError(f"end to end: only {done} of {warmup + n} samples trained within {timeout:.0f} s")
    seconds = mark["t1"] - mark["t0"]
    extra = {
        "decode_s_per_record": stats.decode_seconds / max(1, stats.messages),
        "step_s": (mark["st1"] - mark["st0"]) / max(1, mark["n1"] - mark["n0"]),  # Trainer.step, by its own histogram
        **{k: mark[k] for k in ("self_cpu", "broker_cpu", "other_cores", "t0", "t1")},  # t0/t1: the window, in perf_counter time
        "batches": stats.batches,
        "pauses": trainer.dataset.source.pauses if trainer.dataset.source else 0,
    }
    return Result(int(mark["s1"] - mark["s0"]), seconds, mark["w1"] - mark["w0"], extra)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan
