"""The loop: batches from the stream through the step, snapshots on a schedule, roll-back, the final stop.

Read top to bottom: :meth:`Trainer.setup` builds the :class:`~streamtrain.daemon.step.Learner`
(the step and its state), restores the newest valid snapshot and starts reading;
:meth:`Trainer.train` drains the ring until asked to stop; :meth:`Trainer.step` runs
one step and keeps the books (metrics, a skipped batch's records, roll-back);
:meth:`Trainer.snapshot` hands a copy of the state to the writer thread;
:meth:`Trainer.close` drains and writes the final one.

The positions (read, trained, durable, committed) are the dataset's
:class:`~streamtrain.streams.offsets.OffsetTracker`: a batch's positions count as
trained once its step is done, and a snapshot records them with the state they produced.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from streamtrain.config.schema import Config, config_to_dict
from streamtrain.daemon.candidates import make_learner, served_meta
from streamtrain.daemon.committer import Committer
from streamtrain.daemon.errors import TrainingError
from streamtrain.daemon.metrics import LearningTotals, Metrics
from streamtrain.daemon.publisher import Publisher
from streamtrain.daemon.ranks import ALONE, Collectives, Turn, World, control
from streamtrain.daemon.skipped import SkippedBatches
from streamtrain.daemon.snapshot import SnapshotInfo, SnapshotStore
from streamtrain.daemon.snapshot_writer import SnapshotWriter, state_to_host, tensors_finite
from streamtrain.daemon.step import Learner, StepResult, rank_device
from streamtrain.daemon.tensorboard import TensorBoard, step_scalars
from streamtrain.streams.dataset import KafkaIterableDataset
from streamtrain.streams.decode import LabelRule
from streamtrain.streams.errors import DeadLetterError
from streamtrain.streams.offsets import OffsetTracker, describe_positions, positions_from_rows, positions_to_rows
from streamtrain.streams.quarantine import DECODER_MARKERS
from streamtrain.streams.ring import Batch, Position
from streamtrain.streams.ring import TopicPartition as TP
from streamtrain.streams.split import Share, owner

log = logging.getLogger("streamtrain.trainer")

VERSION = "0.1.0"


class Trainer:
    """Trains ``cfg.model`` on the stream ``cfg.kafka`` describes; see the module docstring.

    ``on_beat`` is called once per turn of the loop (the service feeds /healthz and the
    systemd watchdog with it); ``on_step(batch, result)`` after every step.
    """

    def __init__(
        self,
        cfg: Config,
        metrics: Metrics,
        stop: threading.Event | None = None,
        on_beat: Callable[[], None] | None = None,
        on_step: Callable[[Batch, StepResult], None] | None = None,
        world: World = ALONE,
    ) -> None:
        self.cfg = cfg
        self.world = world  # several ranks under torchrun (daemon/ranks.py); one otherwise
        self.coll: Collectives | None = None
        self.agreed_stop = False  # every rank left the loop at the same turn: a final snapshot can be agreed on
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.on_beat = on_beat or (lambda: None)
        self.on_step = on_step
        self.snapshot_requested = threading.Event()
        self.ready = False
        self.learner: Learner | None = None
        self.dataset: KafkaIterableDataset | None = None
        self.offsets = OffsetTracker()  # the dataset's once set up
        self.store: SnapshotStore | None = None
        self.writer: SnapshotWriter | None = None
        self.skipped_batches: SkippedBatches | None = None
        self.committer: Committer | None = None
        self.publisher: Publisher | None = None
        self.closing = False  # close() is writing the final snapshot
        self.tensorboard: TensorBoard | None = None
        self.consecutive_nonfinite = 0
        self.rollbacks_in_a_row = 0  # reset by every new durable snapshot
        self.stream_epoch = 0  # bumped when a roll-back re-reads the stream
        self.last_loss = math.nan
        self.last_snapshot_time = 0.0
        self.last_snapshot_step = 0
        self.last_progress: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, stream: bool = True) -> None:
        """Restore the newest valid snapshot's positions, start reading, build the learner, restore it.

        Reading starts before the learner is built: the ingest process starts its
        interpreter, connects and fetches while this one builds the model and the
        optimizer (whose first use imports ``torch._dynamo``, about a second), so the
        ring holds batches by the first step.  ``stream=False`` leaves Kafka out (tests
        and tools feed :meth:`step` themselves).
        """
        cfg, tc, world = self.cfg, self.cfg.trainer, self.world
        device = rank_device(tc.device, world)
        if world.ranked:
            self.coll = Collectives(world, device, tc.rank_timeout_s)
        self.tensorboard = TensorBoard(cfg.logging.tensorboard_dir) if cfg.logging.tensorboard_dir and world.leader else None
        self.dataset = KafkaIterableDataset(
            cfg.kafka,
            cfg.data,
            cfg.ring,
            cfg.dead_letter,
            LabelRule.of(tc),
            pin_memory=device.type == "cuda",
            yield_empty=True,
            client_id=f"streamtrain-{world.rank}" if world.ranked else "streamtrain",
            share=Share(rank=world.rank, world=world.size),
            markers=str(Path(cfg.snapshot.dir) / DECODER_MARKERS),
        )
        self.offsets = self.dataset.offsets
        restored = None
        if world.leader:  # the snapshots are rank 0's: it writes them (and publishes), and restores the others from them
            self.store = SnapshotStore(cfg.snapshot.dir, keep=cfg.snapshot.keep)
            self.store.lock()
            self.store.cleanup_debris()
            if cfg.publish.dir is not None:
                about = {"model": cfg.model.name, "task": tc.task, "format": cfg.data.format, "version": VERSION}
                settings = {k: v for k, v in config_to_dict(cfg).items() if k in ("model", "trainer", "data")}  # secrets redacted
                self.publisher = Publisher(cfg.publish, cfg.kafka, self.metrics, about, settings)
            self.writer = SnapshotWriter(self.store, on_durable=self._on_durable, on_error=self._on_snapshot_error, on_state=self._on_state)
            # on the CPU: several ranks send it to the others; one moves it to its device as it loads it
            restored = self.store.load_latest(map_location="cpu")
        if world.ranked:  # rank 0's snapshot on every rank: they all start from the same state
            restored = self.coll.broadcast(restored)
        if restored is not None:
            self._resume_positions(*restored)
        if stream:
            # a skipped step's records go to the dead-letter topic (only when reading a stream: they are records then)
            self.skipped_batches = SkippedBatches(cfg.kafka, cfg.data, cfg.dead_letter, stop=self.stop)
            if world.leader:
                self.committer = Committer(cfg.kafka, self.offsets, self._on_commit_error)
            self.dataset.start()
        self.learner = make_learner(cfg, world)
        if restored is not None:
            self._resume_learner(*restored)
        elif world.ranked:  # no snapshot: rank 0's initial weights, whatever each rank's RNG
            self.learner.load_initial_weights(self.coll.broadcast(self.learner.initial_weights() if world.leader else None))
        else:
            log.info("no snapshot in %s: starting fresh", cfg.snapshot.dir)
        was = restored[0].meta.get("world_size", 1) if restored is not None else world.size
        if world.leader and was != world.size:
            log.info("snapshot %s was written by %d rank(s); now split over %d", restored[0].name, was, world.size)
        self.last_snapshot_time = time.monotonic()
        self.last_snapshot_step = self.step_count
        log.info("model %s: %s", cfg.model.name, self.learner.describe())
        amp = str(self.learner.amp_dtype).removeprefix("torch.") if self.learner.amp_dtype else "off"
        self.metrics.info.labels(VERSION, cfg.model.name, str(self.learner.device), amp, cfg.data.format).set(1)
        self.metrics.rank_info.labels(str(world.rank), str(world.size), str(world.local_rank)).set(1)
        self.metrics.learning_rate.set(self.learner.lr)
        self.metrics.embedding_rows.set(self.learner.embedding_rows())
        self.metrics.embedding_bytes.set(self.learner.embedding_bytes())
        self.ready = True

    def _load_latest(self) -> tuple[SnapshotInfo, dict[str, Any]] | None:
        # several ranks: on the CPU, to be sent to the others (each moves it to its device)
        return self.store.load_latest(map_location="cpu" if self.world.ranked else str(self.learner.device))

    # ------------------------------------------------------------------ what the step holds
    @property
    def model(self) -> torch.nn.Module:
        return self.learner.model

    @property
    def step_count(self) -> int:
        return self.learner.step_count if self.learner is not None else 0

    @property
    def samples(self) -> int:
        return self.learner.samples if self.learner is not None else 0

    @property
    def loss_ewma(self) -> float:
        return self.learner.loss_ewma if self.learner is not None else math.nan

    @property
    def trained(self) -> dict[TP, Position]:
        """Positions of every batch trained so far."""
        return self.offsets.trained

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        """Drain the ring until :attr:`stop` is set (SIGTERM) or the data path fails."""
        if self.world.ranked:
            self._train_ranked()
            return
        progress_every = self.cfg.logging.progress_every_s
        next_progress = time.monotonic() + progress_every if progress_every else math.inf
        while not self.stop.is_set():
            self.on_beat()
            t0 = time.perf_counter()
            batch = self.dataset.next_batch(timeout=0.1)
            waited = time.perf_counter() - t0
            self.metrics.data_wait.observe(waited)
            if batch is not None:
                epoch = self.stream_epoch
                if len(batch):
                    self.step(batch)
                if epoch == self.stream_epoch:  # not when the step rolled back and re-read the stream
                    self.offsets.note_trained(batch.positions, batch.done)
            now = time.monotonic()
            self.snapshot_if_due(now)
            if now >= next_progress:
                self.log_progress()
                next_progress = now + progress_every

    def snapshot_if_due(self, now: float) -> None:
        """Snapshot on the schedule or on request (SIGUSR1); a request made while a write is in flight waits for it."""
        requested = self.snapshot_requested.is_set()
        if self._snapshot_due(now):
            self.snapshot()
            if requested:
                self.snapshot_requested.clear()

    def _snapshot_due(self, now: float) -> bool:
        snap = self.cfg.snapshot
        due = (snap.every_steps and self.step_count - self.last_snapshot_step >= snap.every_steps) or (
            snap.every_seconds and now - self.last_snapshot_time >= snap.every_seconds
        )
        return bool(due or self.snapshot_requested.is_set()) and not self.writer.busy()

    # ------------------------------------------------------------------ several ranks
    def _train_ranked(self) -> None:
        """The loop of one rank of several: every turn one agreement (daemon/ranks.py), then the same decisions everywhere."""
        progress_every = self.cfg.logging.progress_every_s
        next_progress = time.monotonic() + progress_every if progress_every else math.inf
        others_busy = False
        while True:
            self.on_beat()
            t0 = time.perf_counter()
            # While any rank has data, one with none must not hold the step up waiting for its own:
            # it takes what its ring holds now (maybe nothing); only when every rank was idle it waits.
            batch = self.dataset.next_batch(timeout=0.0 if others_busy else 0.1)
            self.metrics.data_wait.observe(time.perf_counter() - t0)
            now = time.monotonic()
            asked = self.snapshot_requested.is_set()
            snapshot = self.world.leader and self._snapshot_due(now)
            n = len(batch) if batch is not None else 0
            turn = control(self.coll, n, self.stop.is_set(), snapshot, asked, self.learner.batch_moments(batch))
            if not self.world.leader:
                self.snapshot_requested.clear()  # passed on to rank 0
            elif turn.asked and not turn.snapshot:
                self.snapshot_requested.set()  # asked on another rank: written at the next turn the writer is free
            epoch = self.stream_epoch
            others_busy = turn.samples > 0
            if turn.samples:
                self.step(batch if batch is not None else self._empty_batch(), turn)
            if batch is not None and epoch == self.stream_epoch:
                self.offsets.note_trained(batch.positions, batch.done)
            if turn.snapshot:
                self.snapshot_ranked()
                self.snapshot_requested.clear()
            if turn.stop:
                self.agreed_stop = True
                return
            if now >= next_progress:
                self.log_progress()
                next_progress = now + progress_every

    def _empty_batch(self) -> Batch:
        w = self.cfg.data.width
        return Batch(torch.empty(0, w), torch.empty(0))

    def snapshot_ranked(self, final: bool = False) -> SnapshotInfo | None:
        """Every rank's positions at this step, gathered; rank 0 checks they cover every partition and writes one snapshot."""
        ok = True
        if self.skipped_batches is not None and self.skipped_batches.pending:
            try:  # the snapshot's positions go past the skipped records: they must be in the dead-letter topic first
                self._dead_letter_skipped()
            except DeadLetterError as exc:
                log.error("snapshot not written: %s (the records will be read again after a restart)", exc)
                ok = False
        source = self.dataset.source
        assigned = sorted(source.assigned) if source is not None else []
        parts = self.coll.gather((ok, positions_to_rows(self.offsets.trained), assigned, self.offsets.done_rows()))
        if not self.world.leader:
            return None
        self.last_snapshot_time = time.monotonic()
        if not all(p[0] for p in parts):
            return None
        positions: dict[TP, Position] = {}
        done: list[list] = []
        for rank, (_, rows, _, done_rows) in enumerate(parts):  # each partition from the rank that reads it
            positions.update((tp, pos) for tp, pos in positions_from_rows(rows).items() if owner(tp, self.world.size) == rank)
            done += [r for r in done_rows if owner((r[0], r[1]), self.world.size) == rank]
        missing = sorted({tuple(tp) for _, _, a, _ in parts for tp in a} - set(positions))
        if missing:
            self.metrics.snapshots_incomplete.inc()
            names = ", ".join(f"{t}[{p}]" for t, p in missing)
            log.warning("snapshot not written: no position yet for %s (a rank has not reported them)", names)
            return None
        if (self.step_count, positions) == (self.offsets.durable_step, self.offsets.durable):
            return None  # nothing new since the last durable one
        if final:
            self.writer.wait()
        t0 = time.perf_counter()
        state = state_to_host(self.state_dict())
        meta = self.meta(positions, sorted(done))
        self.metrics.snapshot_pause.observe(time.perf_counter() - t0)
        self.last_snapshot_step = self.step_count
        if final:
            return self.writer.write_now(state, meta)
        self.writer.submit(state, meta)
        return None

    def step(self, batch: Batch, turn: Turn | None = None) -> StepResult:
        """One step of the learner, then the books: metrics, a skipped batch's records, a roll-back.

        ``turn``: several ranks -- the step is over every rank's batch (``batch`` may be empty).
        """
        started = time.perf_counter()
        result = self.learner.step(batch, None if turn is None else (turn, self.coll))
        if result.skipped:
            if self.skipped_batches is not None and len(batch):
                self.skipped_batches.hold(batch, self.offsets.trained, result.skipped)
            self._skipped(result)
        else:
            self.consecutive_nonfinite = 0
            if self.skipped_batches is not None and self.skipped_batches.pending:
                self._dead_letter_skipped()
            if result.drift and self.tensorboard is not None:
                self.tensorboard.drift(self.step_count, self.learner.drift.drifts)
            self._record(result, len(batch), batch)
        self.metrics.step_time.observe(time.perf_counter() - started)
        if self.on_step is not None:
            self.on_step(batch, result)
        return result

    def _dead_letter_skipped(self) -> None:
        before = self.skipped_batches.samples
        self.skipped_batches.flush()
        self.metrics.samples_dead_lettered.labels("nonfinite_step").inc(self.skipped_batches.samples - before)

    def _skipped(self, result: StepResult) -> None:
        self.consecutive_nonfinite += 1
        self.metrics.steps_skipped.labels(result.skipped).inc()
        log.warning(
            "step skipped (%s: loss %s, grad norm %s); weights untouched; %d in a row",
            result.skipped,
            result.loss,
            result.grad_norm,
            self.consecutive_nonfinite,
        )
        if self.consecutive_nonfinite >= self.cfg.trainer.max_consecutive_nonfinite:
            self.rollback()

    def _record(self, result: StepResult, n: int, batch: Batch) -> None:
        m, lr = self.metrics, self.learner.lr
        m.steps.inc()
        m.samples_trained.inc(n)
        self.last_loss = result.loss
        m.train_loss.set(result.loss)
        m.train_loss_ewma.set(self.learner.loss_ewma)
        m.prequential_metric.labels(self.learner.metric_name).set(self.learner.metric_ewma)
        m.grad_norm.set(result.grad_norm)
        m.learning_rate.set(lr)
        if self.learner.temperature is not None:
            m.calibration_temperature.set(self.learner.temperature.temperature)
        if not math.isnan(batch.oldest_timestamp):
            m.freshness.observe(max(0.0, time.time() - batch.oldest_timestamp))
        if self.tensorboard is not None and self.step_count % self.cfg.logging.tensorboard_every_steps == 0:
            self.tensorboard.step(self.learner, result)
        mlflow = self.publisher.mlflow if self.publisher is not None else None
        if mlflow is not None and self.step_count % self.cfg.publish.mlflow.every_steps == 0:
            mlflow.scalars(self.step_count, step_scalars(self.learner, result))

    def learning_totals(self) -> LearningTotals:
        """The cumulative prequential totals and drift record, for the scrape-time counters."""
        p, d = self.learner.prequential, self.learner.drift
        task = self.cfg.trainer.task
        totals = (task, p.samples, p.loss, p.correct, p.abs_error, p.squared_error, d.drifts, d.last_drift)
        if task == "regression":
            return LearningTotals(*totals)
        return LearningTotals(*totals, tuple(p.bins))

    def rollback(self) -> None:
        """Repeated non-finite steps: go back to the last good snapshot, as after a crash.

        The whole state returns to the snapshot (weights, optimizer, normalizer, trained
        positions) and the stream is read again from its offsets, so every record is still
        trained exactly once relative to the state that survives.  Transient divergence
        recovers; a deterministic one would loop, so ``max_rollbacks`` in a row without a
        new snapshot stop the daemon.
        """
        tc = self.cfg.trainer
        advice = "lower trainer.lr, set trainer.grad_clip_norm, or check the data"
        restored = None
        if self.world.leader:
            self.writer.wait()
            restored = self._load_latest()
        if self.world.ranked:  # every rank decided alike to roll back: rank 0's snapshot for all
            restored = self.coll.broadcast(restored)
        self.consecutive_nonfinite = 0
        if restored is None:
            raise TrainingError(f"{tc.max_consecutive_nonfinite} non-finite steps in a row and no snapshot to roll back to; {advice}")
        self.rollbacks_in_a_row += 1
        if self.rollbacks_in_a_row > tc.max_rollbacks:
            raise TrainingError(f"training diverged again after {tc.max_rollbacks} roll-back(s) to snapshot {restored[0].name}; {advice}")
        info, state = restored
        if self.skipped_batches is not None:
            self.skipped_batches.drop()  # read and trained again from the snapshot
        self.metrics.rollbacks.inc()
        self.load_state_dict(info, state)
        self.stream_epoch += 1
        if self.dataset.ingest is not None:
            self.dataset.restart(self.offsets.trained)
        log.warning(
            "rolled back to snapshot %s (step %d) after %d non-finite steps in a row; reading again from %s",
            info.name,
            info.step,
            tc.max_consecutive_nonfinite,
            describe_positions(self.trained),
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def meta(self, positions: dict[TP, Position] | None = None, done: list[list] | None = None) -> dict[str, Any]:
        """The snapshot's meta.json; ``positions`` (and ``done``): every rank's, when there are several."""
        learner = self.learner
        extra = {}
        if self.cfg.data.labels.enabled:  # the offsets past the positions already done (streams/join/done.py)
            extra["done"] = self.offsets.done_rows() if done is None else done
        return {
            "step": learner.step_count,
            "samples": learner.samples,
            "positions": positions_to_rows(self.offsets.trained if positions is None else positions),
            **extra,
            "world_size": self.world.size,
            "loss_ewma": None if math.isnan(learner.loss_ewma) else learner.loss_ewma,
            "metric": {self.learner.metric_name: None if math.isnan(learner.metric_ewma) else learner.metric_ewma},
            "prequential": learner.prequential.summary(self.cfg.trainer.task),
            "drift": {"detected": learner.drift.drifts, "last": learner.drift.last_drift or None},
            **served_meta(learner, self.cfg),  # the champion's model and config (daemon/candidates.py)
            "versions": {"streamtrain": VERSION, "torch": torch.__version__},
        }

    def load_state_dict(self, info: SnapshotInfo, state: dict[str, Any]) -> None:
        """The whole state back to a snapshot's: its positions and the learner's (a roll-back)."""
        self._resume_positions(info, state)
        self._resume_learner(info, state)

    def _resume_positions(self, info: SnapshotInfo, _state: dict[str, Any]) -> None:
        positions = positions_from_rows(info.meta["positions"])
        if self.world.ranked:  # every rank gets the whole map and keeps its own partitions (another world size re-splits)
            positions = {tp: pos for tp, pos in positions.items() if self.dataset.share.owns(tp)}
        self.offsets.resume(info.step, positions, info.meta.get("done"))

    def _resume_learner(self, info: SnapshotInfo, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state, f"{info.name} in {self.cfg.snapshot.dir}", info.meta.get("model", "?"))
        self.last_snapshot_step = self.step_count
        self.metrics.snapshot_step.set(info.step)
        self.metrics.last_snapshot.set(info.created)
        log.info(
            "resumed from snapshot %s: step %d, %s samples trained, positions %s",
            info.name,
            self.step_count,
            f"{self.samples:,}",
            describe_positions(self.offsets.trained),
        )

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, final: bool = False) -> SnapshotInfo | None:
        """Copy the state to host memory (the only pause) and write it off-thread; ``final`` waits."""
        if final:
            self.writer.wait()
        elif self.writer.busy():
            return None
        if self.skipped_batches is not None and self.skipped_batches.pending:
            try:  # the snapshot's positions go past the skipped records: they must be in the dead-letter topic first
                self._dead_letter_skipped()
            except DeadLetterError as exc:
                log.error("snapshot not written: %s (the records will be read again after a restart)", exc)
                return None
        if not self.offsets.trained_since_durable(self.step_count):
            self.last_snapshot_time = time.monotonic()
            if self.snapshot_requested.is_set() or final:
                log.info("snapshot not written: nothing trained since the last one (step %d)", self.step_count)
            return None  # nothing new since the last durable one
        t0 = time.perf_counter()
        state = state_to_host(self.state_dict())
        meta = self.meta()
        self.metrics.snapshot_pause.observe(time.perf_counter() - t0)
        if final and not tensors_finite(state):  # a background write is checked on the writer thread, not in the pause
            log.error("not writing a snapshot with non-finite tensors (step %d)", self.step_count)
            self.metrics.snapshot_failures.inc()
            return None
        self.last_snapshot_time = time.monotonic()
        self.last_snapshot_step = self.step_count
        if final:
            return self.writer.write_now(state, meta)
        self.writer.submit(state, meta)
        return None

    def _on_durable(self, info: SnapshotInfo, seconds: float) -> None:
        """Writer thread: the snapshot is on disk; mirror its offsets into the consumer group."""
        self.metrics.snapshots.inc()
        self.metrics.snapshot_duration.observe(seconds)
        self.metrics.last_snapshot.set(info.created)
        self.metrics.snapshot_step.set(info.step)
        positions = positions_from_rows(info.meta["positions"])
        self.offsets.note_durable(info.step, positions)
        self.rollbacks_in_a_row = 0
        log.info("snapshot %s written in %.2f s (step %d, %s samples)", info.name, seconds, info.step, f"{info.meta['samples']:,}")
        if self.committer is not None:
            self.committer.submit(positions)  # on its own thread: a broker outage must not hold up snapshots

    def _on_state(self, info: SnapshotInfo, state: dict[str, Any]) -> None:
        """Writer thread, after :meth:`_on_durable`: hand the state to the publisher (its own thread exports it)."""
        if self.publisher is not None:
            self.publisher.durable(info, state, final=self.closing)

    def _on_commit_error(self, exc: BaseException) -> None:
        self.metrics.commit_failures.inc()
        log.warning("could not commit offsets to the consumer group (the snapshot holds them): %s", exc)

    def _on_snapshot_error(self, exc: BaseException) -> None:
        self.metrics.snapshot_failures.inc()

    # ------------------------------------------------------------------ progress and shutdown
    def log_progress(self) -> None:
        st = self.dataset.stats
        now = time.monotonic()
        prev = self.last_progress
        rate = (self.samples - prev.get("samples", self.samples)) / max(1e-9, now - prev.get("time", now)) if prev else 0.0
        lag = sum(self.lag().values())
        rejected = sum(st.rejected.values())
        log.info(
            "step %d | %s samples (%.0f/s) | loss %.4g (ewma %.4g) | %s %.4g | lag %s | ring %d/%d | rejected %d",
            self.step_count,
            f"{self.samples:,}",
            rate,
            self.last_loss,
            self.loss_ewma,
            self.learner.metric_name,
            self.learner.metric_ewma,
            f"{lag:,}",
            self.dataset.ring.fill(),
            self.dataset.ring.slots,
            rejected,
        )
        self.last_progress = {"samples": self.samples, "time": now}

    def lag(self) -> dict[TP, int]:
        """End offset minus trained offset, per assigned partition."""
        source = self.dataset.source if self.dataset is not None else None
        if source is None:
            return {}
        self.dataset.pump()  # the ingest process's latest status
        assigned = source.assigned
        return self.offsets.lag(source.high_watermarks(), assigned)

    def close(self) -> None:
        """Stop reading, write the final snapshot, commit, release everything."""
        ds = self.dataset
        if ds is not None and ds.ingest is not None:
            ds.ingest.stop()
        self.closing = True
        try:
            if self.world.ranked:
                # only after every rank left the loop at the same turn: otherwise the others are not there to agree
                info = self.snapshot_ranked(final=True) if self.ready and self.agreed_stop and not self.coll.broken else None
            elif self.writer is not None and self.ready:
                info = self.snapshot(final=True)
            else:
                info = None
            if info is not None:
                log.info("final snapshot %s (step %d)", info.name, info.step)
        finally:
            if self.writer is not None:
                self.writer.close(timeout=30)
            if ds is not None:
                ds.close()
            if self.store is not None:
                self.store.unlock()
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.skipped_batches is not None:
                self.skipped_batches.close()
            if self.committer is not None:
                self.committer.close(timeout=5.0)
            if self.publisher is not None:
                self.publisher.close(timeout=30.0)
            if self.coll is not None:
                self.coll.close()
