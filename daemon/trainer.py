"""The online trainer: Kafka batches in, optimizer steps, snapshots that carry the trained offsets.

Read top to bottom: :meth:`Trainer.setup` builds everything and restores the newest
valid snapshot; :meth:`Trainer.train` drains the ring until asked to stop;
:meth:`Trainer.step` is one prequential step; :meth:`Trainer.snapshot` hands a copy of
the state to the writer thread; :meth:`Trainer.close` drains and writes the final one.

A step's forward pass runs on the batch *before* the update, so its loss and metric are
prequential (test-then-train) estimates of how the model does on unseen data.  A
non-finite loss or gradient skips the step with the weights untouched.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from streamtrain.config.schema import Config, config_to_dict
from streamtrain.daemon.committer import Committer
from streamtrain.daemon.drift_response import DriftMonitor
from streamtrain.daemon.errors import ConfigError, TrainingError
from streamtrain.daemon.metrics import LearningTotals, Metrics
from streamtrain.daemon.normalizer import RunningStandardizer
from streamtrain.daemon.prequential import Prequential
from streamtrain.daemon.skipped import SkippedBatches
from streamtrain.daemon.snapshot import SnapshotInfo, SnapshotStore
from streamtrain.daemon.snapshot_writer import SnapshotWriter, state_to_host, tensors_finite
from streamtrain.daemon.tensorboard import TensorBoard
from streamtrain.models.registry import build_model
from streamtrain.streams.dataset import KafkaIterableDataset
from streamtrain.streams.decode import LabelRule
from streamtrain.streams.errors import DeadLetterError
from streamtrain.streams.ring import Batch, Position
from streamtrain.streams.ring import TopicPartition as TP

log = logging.getLogger("streamtrain.trainer")

VERSION = "0.1.0"


@dataclass
class StepResult:
    loss: float
    metric: float
    grad_norm: float
    skipped: str | None = None  # reason, when the weights were left untouched


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"trainer.device: {name} asked for, but CUDA is not available here; use auto or cpu"])
    return torch.device(name)


def pick_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else None
    if name == "fp16":
        if device.type != "cuda":
            raise ConfigError(["trainer.amp: fp16 needs CUDA; on the CPU use bf16 or off"])
        return torch.float16
    if name == "bf16":
        return torch.bfloat16
    return None


# What learns best at batch size 1 and small batches, measured with `python -m bench.learning` against
# River on the same rows (docs/LEARNING.md): (optimizer, learning rate, gradient clipping norm).
# Linear models: River's own SGD at 0.01 without clipping (convex, standardized inputs and label);
# the MLP: AdamW at 0.01, clipped at 1; other models (not measured): AdamW at 1e-3, clipped at 1.
AUTO = {"linear": ("sgd", 0.01, 0.0), "logistic": ("sgd", 0.01, 0.0), "mlp": ("adamw", 0.01, 1.0)}
AUTO_OTHER = ("adamw", 1e-3, 1.0)
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}


def optimizer_defaults(model: str, optimizer: str, lr: float | None, clip: float | None) -> tuple[str, float, float]:
    """What ``trainer.optimizer: auto``, ``trainer.lr: null`` and ``trainer.grad_clip_norm: null`` stand for."""
    auto_name, auto_lr, auto_clip = AUTO.get(model, AUTO_OTHER)
    name = auto_name if optimizer == "auto" else optimizer
    if lr is None:
        lr = auto_lr if name == auto_name else DEFAULT_LR[name]
    return name, lr, auto_clip if clip is None else clip


class Trainer:
    """Trains ``cfg.model`` on the stream ``cfg.kafka`` describes; see the module docstring."""

    def __init__(self, cfg: Config, metrics: Metrics, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.stop = stop or threading.Event()
        self.snapshot_requested = threading.Event()
        self.step_count = 0
        self.samples = 0
        self.loss_ewma = math.nan
        self.metric_ewma = math.nan
        self.consecutive_nonfinite = 0
        self.rollbacks_in_a_row = 0  # reset by every new durable snapshot
        self.stream_epoch = 0  # bumped when a roll-back re-reads the stream
        self.trained: dict[TP, Position] = {}  # positions of every batch trained so far
        self.durable: tuple[int, dict[TP, Position]] = (0, {})  # step and positions of the last durable snapshot
        self.last_loss = math.nan
        self.ready = False
        self.last_progress: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, stream: bool = True) -> None:
        """Build the model and optimizer, restore the newest valid snapshot, start reading.

        ``stream=False`` leaves Kafka out (tests and tools feed :meth:`step` themselves).
        """
        cfg, tc = self.cfg, self.cfg.trainer
        self.device = pick_device(tc.device)
        self.amp_dtype = pick_amp(tc.amp, self.device)
        torch.manual_seed(tc.seed)
        threads = tc.num_threads or max(1, (os.cpu_count() or 2) - 1)  # leave a core to the data path
        torch.set_num_threads(threads)

        self.model = build_model(cfg.model.name, dict(cfg.model.params), cfg.data.width).to(self.device)
        self._check_output_size()
        if cfg.model.init_weights:
            self._warm_start(cfg.model.init_weights)
        self._freeze(cfg.model.freeze)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip_norm = optimizer_defaults(cfg.model.name, tc.optimizer, tc.lr, tc.grad_clip_norm)[2] or math.inf
        self.trained_params = params  # what the optimizer updates and the step clips
        self.optimizer = self._make_optimizer(params)
        self.scheduler = self._make_scheduler()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.normalizer = RunningStandardizer(cfg.data.width, self.device, enabled=tc.standardize)
        self.target = RunningStandardizer(1, self.device, enabled=tc.task == "regression" and tc.standardize_target)
        self.prequential = Prequential()
        self.drift = DriftMonitor(cfg.drift)
        self.tensorboard = TensorBoard(cfg.logging.tensorboard_dir) if cfg.logging.tensorboard_dir else None
        self._plateau_losses: list[float] = []

        self.store = SnapshotStore(cfg.snapshot.dir, keep=cfg.snapshot.keep)
        self.store.lock()
        self.store.cleanup_debris()
        self.writer = SnapshotWriter(self.store, on_durable=self._on_durable, on_error=self._on_snapshot_error)
        restored = self.store.load_latest(map_location=str(self.device))
        if restored is not None:
            self.load_state_dict(*restored)
        else:
            log.info("no snapshot in %s: starting fresh", cfg.snapshot.dir)
        self.last_snapshot_time = time.monotonic()
        self.last_snapshot_step = self.step_count

        self.dataset = KafkaIterableDataset(
            cfg.kafka,
            cfg.data,
            cfg.ring,
            cfg.dead_letter,
            LabelRule(tc.task, tc.num_classes),
            pin_memory=self.device.type == "cuda",
            yield_empty=True,
        )
        self.dataset.positions = dict(self.trained)
        # a skipped step's records go to the dead-letter topic (only when reading a stream: they are records then)
        self.skipped_batches = SkippedBatches(cfg.kafka, cfg.data, cfg.dead_letter, stop=self.stop) if stream else None
        self.committer = Committer(cfg.kafka, self._on_commit_error) if stream else None
        if stream:
            self.dataset.start()
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in params)
        log.info(
            "model %s: %s parameters (%s trained) on %s, amp %s, %d torch thread(s)",
            cfg.model.name,
            f"{n_params:,}",
            f"{n_train:,}",
            self.device,
            str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off",
            threads,
        )
        amp = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off"
        self.metrics.info.labels(VERSION, cfg.model.name, str(self.device), amp, cfg.data.format).set(1)
        self.metrics.learning_rate.set(self._lr())
        self.ready = True

    def _check_output_size(self) -> None:
        """Probe the model with a zero batch: it must take the data width and give the task's outputs."""
        tc = self.cfg.trainer
        want = {"regression": 1, "binary": 1, "multiclass": tc.num_classes}[tc.task]
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(torch.zeros(2, self.cfg.data.width, device=self.device))
        except Exception as exc:
            raise ConfigError([f"model.name: {self.cfg.model.name} cannot take a batch of {self.cfg.data.width} features: {exc}"]) from exc
        finally:
            self.model.train()
        got = 1 if out.dim() == 1 else out.shape[-1]
        if out.dim() > 2 or out.shape[0] != 2 or got != want:
            key = "num_classes" if self.cfg.model.name == "logistic" else "out_features"
            shape = tuple(out.shape)
            raise ConfigError(
                [f"model.params.{key}: the model gives outputs of shape {shape} for a batch of 2; task {tc.task} needs (2, {want})"]
            )

    def _warm_start(self, path: str) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        result = self.model.load_state_dict(state, strict=False)
        loaded = len(state) - len(result.unexpected_keys)
        if loaded == 0:
            raise ConfigError([f"model.init_weights: {path} has no parameter of this model (its keys: {list(state)[:5]})"])
        log.info(
            "warm start from %s: %d tensor(s) loaded, %d missing %s, %d unexpected %s",
            path,
            loaded,
            len(result.missing_keys),
            result.missing_keys[:5],
            len(result.unexpected_keys),
            result.unexpected_keys[:5],
        )

    def _freeze(self, patterns: tuple[str, ...]) -> None:
        names = [n for n, _ in self.model.named_parameters()]
        problems = []
        for i, pat in enumerate(patterns):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                problems.append(
                    f"model.freeze[{i}]: {pat!r} matches no parameter; parameters are {names[:8]}{' ...' if len(names) > 8 else ''}"
                )
            for n, p in self.model.named_parameters():
                if n in hits:
                    p.requires_grad_(False)
        if problems:
            raise ConfigError(problems)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ConfigError(["model.freeze: every parameter is frozen; nothing would train"])

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        tc = self.cfg.trainer
        name, lr, _ = optimizer_defaults(self.cfg.model.name, tc.optimizer, tc.lr, tc.grad_clip_norm)
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tc.betas, weight_decay=tc.weight_decay)

    def _make_scheduler(self) -> Any:
        s = self.cfg.trainer.schedule
        if s.name == "step":
            return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=s.step_size, gamma=s.gamma)
        if s.name == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=s.t_max, eta_min=s.eta_min)
        if s.name == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=s.factor, patience=s.patience, min_lr=s.min_lr)
        return None

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        """Drain the ring until :attr:`stop` is set (SIGTERM) or the data path fails."""
        progress_every = self.cfg.logging.progress_every_s
        next_progress = time.monotonic() + progress_every if progress_every else math.inf
        while not self.stop.is_set():
            self.health_beat()
            t0 = time.perf_counter()
            batch = self.dataset.next_batch(timeout=0.1)
            waited = time.perf_counter() - t0
            self.metrics.data_wait.observe(waited)
            if batch is not None:
                epoch = self.stream_epoch
                if len(batch):
                    self.step(batch)
                if epoch == self.stream_epoch:  # not when the step rolled back and re-read the stream
                    self.trained.update(batch.positions)
            now = time.monotonic()
            self.snapshot_if_due(now)
            if now >= next_progress:
                self.log_progress()
                next_progress = now + progress_every

    def snapshot_if_due(self, now: float) -> None:
        """Snapshot on the schedule or on request (SIGUSR1); a request made while a write is in flight waits for it."""
        snap = self.cfg.snapshot
        due = (snap.every_steps and self.step_count - self.last_snapshot_step >= snap.every_steps) or (
            snap.every_seconds and now - self.last_snapshot_time >= snap.every_seconds
        )
        requested = self.snapshot_requested.is_set()
        if (due or requested) and not self.writer.busy():
            self.snapshot()
            if requested:
                self.snapshot_requested.clear()

    def health_beat(self) -> None:
        """Overridden by the service to feed /healthz and the systemd watchdog."""

    def step(self, batch: Batch) -> StepResult:
        """One prequential step on ``batch``; the weights stay untouched if anything is non-finite."""
        tc = self.cfg.trainer
        started = time.perf_counter()
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True)
        self.normalizer.update(x)  # features are known before the prediction; a skipped step's records count too
        xn = self.normalizer.transform(x)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = self.model(xn)
        loss, stats = self._loss(out.float(), y)
        # one device sync: the training loss, then the prequential sums
        loss_value, loss_sum, hits_or_abs, sq, scaled_abs = torch.stack([loss.detach(), *stats]).tolist()
        n = len(batch)
        metric = hits_or_abs / n
        result = StepResult(loss_sum / n, metric, math.nan)
        if not math.isfinite(loss_value):
            result.skipped = "loss_nonfinite"
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.trained_params, self.clip_norm)
            result.grad_norm = float(norm)
            if not math.isfinite(result.grad_norm):
                result.skipped = "amp_overflow" if self.scaler.is_enabled() else "grad_nonfinite"
                self.scaler.update()  # fp16: lowers the loss scale; no optimizer step
            else:
                boosted = self.drift.boost(self.optimizer)
                self.scaler.step(self.optimizer)
                self.drift.unboost(self.optimizer, boosted)
                self.scaler.update()
                self._schedule(loss_value)
        self.optimizer.zero_grad(set_to_none=True)
        if result.skipped:
            if self.skipped_batches is not None:
                self.skipped_batches.hold(batch, self.trained, result.skipped)
            self._skipped(result)
        else:
            self.consecutive_nonfinite = 0
            if self.skipped_batches is not None and self.skipped_batches.pending:
                self._dead_letter_skipped()
            self.step_count += 1
            self.samples += n
            if tc.task == "regression":
                self.prequential.add(n, loss_sum, abs_error=hits_or_abs, squared_error=sq)
                error = scaled_abs / n
            else:
                self.prequential.add(n, loss_sum, correct=round(hits_or_abs))
                error = 1.0 - metric
            if self.drift.observe(error, n, self.optimizer) and self.tensorboard is not None:
                self.tensorboard.drift(self.step_count, self.drift.drifts)
            self._record(result, n, batch)
        self.metrics.step_time.observe(time.perf_counter() - started)
        return result

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The training loss, and the batch's prequential sums: loss, hits or |error|, squared error, |error| / label std.

        Regression trains on the label standardized by its running statistics (so a label
        of any scale trains at the same pace); the prediction scored is made with the
        statistics of the labels *before* this batch, in the label's own units.
        """
        tc = self.cfg.trainer
        zero = out.new_zeros(())
        if tc.task == "multiclass":
            labels = y.long()
            loss = F.cross_entropy(out, labels)
            return loss, (loss.detach() * len(y), (out.detach().argmax(1) == labels).sum().float(), zero, zero)
        out = out.reshape(-1)
        if tc.task == "binary":
            loss = F.binary_cross_entropy_with_logits(out, y)
            return loss, (loss.detach() * len(y), ((out.detach() > 0) == (y > 0.5)).sum().float(), zero, zero)
        target = self.target
        err = torch.addcmul(target.shift - y, out.detach(), target.std)  # the prequential prediction's error
        inv_std = target.scale[0]  # the statistics before this batch's labels (update() replaces the tensors)
        target.update(y[:, None])
        sq = torch.dot(err, err)
        abs_sum = err.abs().sum()
        if tc.loss == "huber":
            per_sample = F.huber_loss(out * target.std + target.shift, y, delta=tc.huber_delta, reduction="none")
            loss = per_sample.mean() * target.scale[0] ** 2
            preq = F.huber_loss(err, torch.zeros_like(err), delta=tc.huber_delta, reduction="sum")
        else:
            loss = F.mse_loss(out, (y - target.shift) * target.scale)
            preq = sq
        return loss, (preq, abs_sum, sq, abs_sum * inv_std)

    def _schedule(self, loss: float) -> None:
        s = self.cfg.trainer.schedule
        if self.scheduler is None:
            return
        if s.name == "plateau":
            self._plateau_losses.append(loss)
            if len(self._plateau_losses) >= s.window:
                self.scheduler.step(sum(self._plateau_losses) / len(self._plateau_losses))
                self._plateau_losses = []
        else:
            self.scheduler.step()

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
        m = self.metrics
        a = self.cfg.trainer.ewma_alpha
        self.loss_ewma = result.loss if math.isnan(self.loss_ewma) else (1 - a) * self.loss_ewma + a * result.loss
        self.metric_ewma = result.metric if math.isnan(self.metric_ewma) else (1 - a) * self.metric_ewma + a * result.metric
        m.steps.inc()
        m.samples_trained.inc(n)
        self.last_loss = result.loss
        m.train_loss.set(result.loss)
        m.train_loss_ewma.set(self.loss_ewma)
        m.prequential_metric.labels(self.metric_name).set(self.metric_ewma)
        m.grad_norm.set(result.grad_norm)
        m.learning_rate.set(self._lr())
        if not math.isnan(batch.oldest_timestamp):
            m.freshness.observe(max(0.0, time.time() - batch.oldest_timestamp))
        if self.tensorboard is not None and self.step_count % self.cfg.logging.tensorboard_every_steps == 0:
            summary = self.prequential.summary(self.cfg.trainer.task)
            scalars = {
                "loss/prequential": result.loss,
                "loss/ewma": self.loss_ewma,
                f"{self.metric_name}/ewma": self.metric_ewma,
                "learning_rate": self._lr(),
                "grad_norm": result.grad_norm,
            }
            scalars.update({f"{k}/cumulative": v for k, v in summary.items() if k != "samples" and v is not None})
            self.tensorboard.scalars(self.step_count, scalars)

    def learning_totals(self) -> LearningTotals:
        """The cumulative prequential totals and drift record, for the scrape-time counters."""
        p, d = self.prequential, self.drift
        return LearningTotals(self.cfg.trainer.task, p.samples, p.loss, p.correct, p.abs_error, p.squared_error, d.drifts, d.last_drift)

    @property
    def metric_name(self) -> str:
        return "mae" if self.cfg.trainer.task == "regression" else "accuracy"

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
        self.writer.wait()
        restored = self.store.load_latest(map_location=str(self.device))
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
            self.dataset.restart(self.trained)
        else:
            self.dataset.positions = dict(self.trained)
        log.warning(
            "rolled back to snapshot %s (step %d) after %d non-finite steps in a row; reading again from %s",
            info.name,
            info.step,
            tc.max_consecutive_nonfinite,
            _fmt_positions(self.trained),
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "normalizer": self.normalizer.state_dict(),
            "target": self.target.state_dict(),
            "prequential": self.prequential.state_dict(),
            "drift": self.drift.state_dict(),
            "rng": rng,
            "trainer": {
                "step": self.step_count,
                "samples": self.samples,
                "loss_ewma": self.loss_ewma,
                "metric_ewma": self.metric_ewma,
                "plateau_losses": list(self._plateau_losses),
            },
        }

    def meta(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "samples": self.samples,
            "positions": [[t, p, o, r] for (t, p), (o, r) in sorted(self.trained.items())],
            "loss_ewma": None if math.isnan(self.loss_ewma) else self.loss_ewma,
            "metric": {self.metric_name: None if math.isnan(self.metric_ewma) else self.metric_ewma},
            "prequential": self.prequential.summary(self.cfg.trainer.task),
            "drift": {"detected": self.drift.drifts, "last": self.drift.last_drift or None},
            "model": self.cfg.model.name,
            "config": config_to_dict(self.cfg),
            "versions": {"streamtrain": VERSION, "torch": torch.__version__},
        }

    def load_state_dict(self, info: SnapshotInfo, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # a config problem: restarting would fail the same way
            first = str(exc).splitlines()[1:2] or [str(exc)]
            raise ConfigError(
                [
                    f"model: snapshot {info.name} in {self.cfg.snapshot.dir} was trained with another model "
                    f"({info.meta.get('model', '?')}; {first[0].strip()}); restore the model config it was written with, "
                    "or point snapshot.dir at a new directory to start over"
                ]
            ) from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.normalizer.load_state_dict(state["normalizer"])
        if "target" in state:
            self.target.load_state_dict(state["target"])
        self.prequential.load_state_dict(state.get("prequential", {}))
        self.drift.load_state_dict(state.get("drift", {}))
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        t = state["trainer"]
        self.step_count = int(t["step"])
        self.samples = int(t["samples"])
        self.loss_ewma = float(t["loss_ewma"])
        self.metric_ewma = float(t["metric_ewma"])
        self._plateau_losses = list(t.get("plateau_losses", []))
        self.trained = {(tp, int(p)): (int(o), int(r)) for tp, p, o, r in info.meta["positions"]}
        self.durable = (self.step_count, dict(self.trained))
        self.last_snapshot_step = self.step_count
        self.metrics.snapshot_step.set(info.step)
        self.metrics.last_snapshot.set(info.created)
        log.info(
            "resumed from snapshot %s: step %d, %s samples trained, positions %s",
            info.name,
            self.step_count,
            f"{self.samples:,}",
            _fmt_positions(self.trained),
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
        if (self.step_count, self.trained) == self.durable:
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
        positions = {(t, int(p)): (int(o), int(r)) for t, p, o, r in info.meta["positions"]}
        self.durable = (info.step, positions)
        self.rollbacks_in_a_row = 0
        log.info("snapshot %s written in %.2f s (step %d, %s samples)", info.name, seconds, info.step, f"{info.meta['samples']:,}")
        if self.committer is not None:
            self.committer.submit(positions)  # on its own thread: a broker outage must not hold up snapshots

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
            self.metric_name,
            self.metric_ewma,
            f"{lag:,}",
            self.dataset.ring.fill(),
            self.dataset.ring.slots,
            rejected,
        )
        self.last_progress = {"samples": self.samples, "time": now}

    def lag(self) -> dict[TP, int]:
        """End offset minus trained offset, per assigned partition."""
        if self.dataset.source is None:
            return {}
        out = {}
        trained_now = dict(self.trained)  # the training thread updates it meanwhile
        assigned = self.dataset.source.assigned  # read once: in the process mode each read takes in the child's status
        for tp, hi in self.dataset.source.high_watermarks().items():
            trained = trained_now.get(tp)
            start = assigned.get(tp, 0)
            done = trained[0] if trained else max(start, 0)
            out[tp] = max(0, hi - done)
        return out

    def close(self) -> None:
        """Stop reading, write the final snapshot, commit, release everything."""
        ds = getattr(self, "dataset", None)
        if ds is not None and ds.ingest is not None:
            ds.ingest.stop()
        writer = getattr(self, "writer", None)
        try:
            if writer is not None and self.ready:
                info = self.snapshot(final=True)
                if info is not None:
                    log.info("final snapshot %s (step %d)", info.name, info.step)
        finally:
            if writer is not None:
                writer.close(timeout=30)
            if ds is not None:
                ds.close()
            store = getattr(self, "store", None)
            if store is not None:
                store.unlock()
            if getattr(self, "tensorboard", None) is not None:
                self.tensorboard.close()
            if getattr(self, "skipped_batches", None) is not None:
                self.skipped_batches.close()
            if getattr(self, "committer", None) is not None:
                self.committer.close(timeout=5.0)


def _fmt_positions(positions: dict[TP, Position]) -> str:
    if not positions:
        return "{}"
    parts = [f"{t}[{p}]@{o}" + (f"+{r}" if r else "") for (t, p), (o, r) in sorted(positions.items())]
    return ", ".join(parts[:8]) + (f" ... ({len(parts)} partitions)" if len(parts) > 8 else "")
