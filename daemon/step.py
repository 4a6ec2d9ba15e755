"""The step: one prequential update of the model on a batch, and the state it changes.

:class:`Learner` holds what a step touches -- device, model, optimizer, LR schedule,
AMP loss scaler, the feature and label standardizers, the prequential totals, the drift
monitor -- and nothing about where batches come from or where snapshots go (that is
:mod:`streamtrain.daemon.trainer`, the loop).

A step's forward pass runs on the batch *before* the update, so its loss and metric are
prequential (test-then-train) estimates of how the model does on unseen data.  A
non-finite loss or gradient skips the step with the weights untouched.

On CUDA a step waits for the device once: the ``.tolist()`` of its loss, prequential
sums and gradient norm, after the backward pass.  The host needs those values before
the next step is launched: to skip a non-finite step exactly, and because what it
decides from them shapes the next step (the LR schedule, a drift's optimizer reset or
LR boost, a roll-back).  Nothing else in the step waits: the batch comes in with a
non-blocking copy from pinned memory (its slot is protected by ``batch.copy_done``,
not by this wait), clipping and the loss scaler stay on the device, and the
optimizer's step counts live on the CPU.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from streamtrain.config.schema import Config
from streamtrain.daemon import calibration
from streamtrain.daemon.drift_response import DriftMonitor
from streamtrain.daemon.errors import ConfigError
from streamtrain.daemon.normalizer import RunningStandardizer
from streamtrain.daemon.prequential import Prequential
from streamtrain.daemon.ranks import ALONE, Collectives, Turn, World
from streamtrain.daemon.sparse import Optimizers, clip_all, make_sparse_optimizer, sparse_defaults, sparse_parameters
from streamtrain.daemon.sparse import sum_over_ranks as sparse_sum_over_ranks
from streamtrain.models.registry import Inputs, build_model
from streamtrain.streams.ring import Batch

log = logging.getLogger("streamtrain.trainer")


@dataclass
class StepResult:
    loss: float
    metric: float
    grad_norm: float
    skipped: str | None = None  # reason, when the weights were left untouched
    drift: bool = False  # the step's error rise was detected as a drift


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"trainer.device: {name} asked for, but CUDA is not available here; use auto or cpu"])
    return torch.device(name)


def rank_device(name: str, world: World = ALONE) -> torch.device:
    """``trainer.device`` for this rank: several ranks on a host take one GPU each (by local rank)."""
    device = pick_device(name)
    if world.ranked and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def pick_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision.

    ``auto`` on CUDA is bf16 where the GPU computes in it natively (compute capability 8.0
    and later): it has float32's range, so it needs no loss scaler (none of fp16's skipped
    overflow steps, and no scale to keep).  Older GPUs get fp16 with a loss scaler.
    """
    if name == "auto":
        if device.type != "cuda":
            return None
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
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
# The categorical tables have an optimizer of their own (daemon/sparse.py).
# The fm: its first order is the logistic model's, so the same SGD, unclipped (clipping at 1 cut the tables'
# Adagrad steps at batch 1: 0.599 against 0.568 log loss on bench.learning's clicks, 30k rows).
AUTO = {"linear": ("sgd", 0.01, 0.0), "logistic": ("sgd", 0.01, 0.0), "mlp": ("adamw", 0.01, 1.0), "fm": ("sgd", 0.01, 0.0)}
AUTO_OTHER = ("adamw", 1e-3, 1.0)
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}


# trainer.calibration: auto, by model: where a temperature never made the probabilities worse, by log loss, Brier or
# ECE, on bench.learning's seven classification streams (docs/BENCHMARKS.md, A temperature fitted online): the
# transformer.  The mlp's log loss falls on all seven too, but its Brier rose on two, so it is asked for, not given.
AUTO_CALIBRATION = {"transformer": "temperature"}


def calibration_of(model: str, task: str, setting: str) -> str:
    """What ``trainer.calibration`` stands for: ``temperature`` or ``none`` (always none for regression)."""
    if task == "regression":
        return "none"
    return AUTO_CALIBRATION.get(model, "none") if setting == "auto" else setting


def optimizer_defaults(model: str, optimizer: str, lr: float | None, clip: float | None) -> tuple[str, float, float]:
    """What ``trainer.optimizer: auto``, ``trainer.lr: null`` and ``trainer.grad_clip_norm: null`` stand for."""
    auto_name, auto_lr, auto_clip = AUTO.get(model, AUTO_OTHER)
    name = auto_name if optimizer == "auto" else optimizer
    if lr is None:
        lr = auto_lr if name == auto_name else DEFAULT_LR[name]
    return name, lr, auto_clip if clip is None else clip


def model_inputs_of(cfg: Config) -> Inputs:
    """What the stream gives the model: numbers (and their "was missing" marks), categorical fields, the task's classes."""
    data, tc = cfg.data, cfg.trainer
    marks = data.width if data.indicators else 0
    return Inputs(
        in_features=data.width + marks,
        categorical=len(data.categorical),
        buckets=data.hash_buckets,
        indicators=marks,
        classes=tc.num_classes if tc.task == "multiclass" else 0,
    )


def sum_over_ranks(params: list[torch.Tensor], sums: torch.Tensor, coll: Collectives) -> torch.Tensor:
    """Sum ``params``' gradients (zeros where this rank has none) and ``sums`` over the ranks: one all-reduce; the summed ``sums``."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads] + [sums.reshape(-1).to(torch.float32)])
    coll.all_reduce(flat)
    at = 0
    for p, g in zip(params, grads):
        k = g.numel()
        p.grad = flat[at : at + k].view_as(g).to(g.dtype)
        at += k
    return flat[at:].view_as(sums)


def _per(beta: Any, like: torch.Tensor, stacked: bool) -> Any:
    """``beta`` to multiply ``like`` by: a number, or when stacked one per candidate (k,) shaped to broadcast."""
    return beta.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype) if stacked else beta


class Learner:
    """Model, optimizer and everything else a step updates; built from the config, restored from a snapshot."""

    def __init__(self, cfg: Config, world: World = ALONE) -> None:
        self.cfg = cfg
        tc = cfg.trainer
        self.device = rank_device(tc.device, world)
        self.amp_dtype = pick_amp(tc.amp, self.device)
        torch.manual_seed(tc.seed)
        # leave a core to the data path; ranks on one host share its cores
        self.threads = tc.num_threads or max(1, ((os.cpu_count() or 2) - world.local_size) // world.local_size)
        torch.set_num_threads(self.threads)

        self.inputs = model_inputs_of(cfg)
        self.takes_ids = self.inputs.categorical > 0
        self.model = build_model(cfg.model.name, dict(cfg.model.params), self.inputs).to(self.device)
        self._check_output_size()
        if cfg.model.init_weights:
            self._warm_start(cfg.model.init_weights)
        self._freeze(cfg.model.freeze)
        self.trained_params = [p for p in self.model.parameters() if p.requires_grad]  # what the optimizers update and the step clips
        self.sparse_params = sparse_parameters(self.model)  # the hashed tables: rows updated only where a batch has ids
        sparse_ids = {id(p) for p in self.sparse_params}
        self.dense_params = [p for p in self.trained_params if id(p) not in sparse_ids]
        if not self.dense_params:
            raise ConfigError(["model.freeze: only the categorical tables are left to train; leave a dense parameter (a bias) unfrozen"])
        name, lr, clip = optimizer_defaults(cfg.model.name, tc.optimizer, tc.lr, tc.grad_clip_norm)
        self.clip_norm = clip or math.inf
        self.optimizer = self._make_optimizer(name, lr)
        self.sparse_optimizer = None
        if self.sparse_params:
            torch.sparse.check_sparse_tensor_invariants.disable()  # said explicitly: the checks cost every step
            sparse_name, sparse_lr = sparse_defaults(cfg.model.name, tc.sparse_optimizer, tc.sparse_lr)
            self.sparse_optimizer = make_sparse_optimizer(sparse_name, self.sparse_params, sparse_lr)
        self._drift_target = self.optimizer if self.sparse_optimizer is None else Optimizers(self.optimizer, self.sparse_optimizer)
        self.scheduler = self._make_scheduler()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.normalizer = RunningStandardizer(cfg.data.width, self.device, enabled=tc.standardize, missing=cfg.data.indicators)
        self.target = RunningStandardizer(1, self.device, enabled=tc.task == "regression" and tc.standardize_target)
        self.prequential = Prequential()
        self.calibrated = cfg.trainer.task != "regression"
        fitted = calibration_of(cfg.model.name, tc.task, tc.calibration) == "temperature"
        self.temperature = calibration.Temperature(tc.calibration_half_life) if fitted else None
        self.drift = DriftMonitor(cfg.drift)
        self.step_count = 0
        self.samples = 0
        self.loss_ewma = math.nan
        self.metric_ewma = math.nan
        self._plateau_losses: list[float] = []

    def initial_weights(self) -> dict[str, Any]:
        """The model's weights, for the other ranks to start from (``load_initial_weights``)."""
        return self.model.state_dict()

    def load_initial_weights(self, weights: dict[str, Any]) -> None:
        self.model.load_state_dict(weights)

    @property
    def metric_name(self) -> str:
        return "mae" if self.cfg.trainer.task == "regression" else "accuracy"

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.trained_params)
        amp = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off"
        tables = ""
        if self.sparse_params:
            rows, mib = self.embedding_rows(), self.embedding_bytes() / 2**20
            tables = f"; categorical tables: {rows:,} rows, {mib:,.1f} MiB with their optimizer state"
        return f"{n_params:,} parameters ({n_train:,} trained) on {self.device}, amp {amp}, {self.threads} torch thread(s){tables}"

    def embedding_rows(self) -> int:
        """Rows of the model's sparse tables (every table counted)."""
        return sum(p.shape[0] for p in self.sparse_params)

    def embedding_bytes(self) -> int:
        """Bytes of the sparse tables and of their optimizer's state."""
        tables = sum(p.numel() * p.element_size() for p in self.sparse_params)
        state = 0
        if self.sparse_optimizer is not None:
            for st in self.sparse_optimizer.state.values():
                state += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        return tables + state

    # ------------------------------------------------------------------ the step
    def step(self, batch: Batch, ranked: tuple[Turn, Collectives] | None = None) -> StepResult:
        """One prequential step on ``batch``; the weights stay untouched if anything is non-finite.

        ``ranked``: the step is one over the batches of every rank (``daemon/ranks.py``):
        the standardizers fold in the moments of all of them (``turn``), the loss is this
        rank's sum over the global count, and the gradients and statistics are summed over
        the ranks before anything is decided, so every rank decides alike.  ``batch`` may
        then be empty (this rank had nothing this turn).

        On CUDA the step waits for the device once: one read of its statistics (the loss,
        the prequential sums, the gradient norm) after the backward pass, from which the
        host decides whether to update, exactly.  A non-finite loss therefore still runs
        its backward pass (its gradients are dropped); the optimizer steps only once the
        host knows the gradients are finite, so ``GradScaler.step``'s own read of its
        overflow flag is not needed (a finite norm means no overflow).
        """
        x, y, ids, n, fold_labels = self._inputs(batch, ranked)
        xn = self.normalizer.inputs(x)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = self.model(xn, ids) if self.takes_ids else self.model(xn)
        beta = None if self.temperature is None else self.temperature.beta
        loss, stats = self._loss(out.float(), y, None if ranked is None else n, fold_labels, beta=beta)
        self.scaler.scale(loss).backward()
        sums = torch.cat([torch.stack([loss.detach(), *stats]), *self.calibration_sums(out, y, beta)])
        if ranked is not None:
            sums = self._sum_over_ranks(sums, ranked[1])
        self.scaler.unscale_(self.optimizer)
        if self.sparse_optimizer is None:
            norm = torch.nn.utils.clip_grad_norm_(self.trained_params, self.clip_norm)
        else:
            self.scaler.unscale_(self.sparse_optimizer)
            norm = clip_all(self.dense_params, self.sparse_params, self.clip_norm)
        # the step's one device sync: the training loss, the prequential sums, the gradient norm
        values = torch.cat([sums, norm.reshape(1).to(sums)]).tolist()
        result = self.judge(values, n)
        if result.skipped:
            self.scaler.update()  # fp16: lowers the loss scale, as after any overflow; no optimizer step
        else:
            boosted = self.drift.boost(self._drift_target)
            self.optimizer.step()  # the gradients are finite (unscaled already): what scaler.step would do
            if self.sparse_optimizer is not None:
                self.sparse_optimizer.step()  # the rows this batch holds
            self.drift.unboost(self._drift_target, boosted)
            self.scaler.update()
            self.schedule(values[0])
        self.optimizer.zero_grad(set_to_none=True)
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.zero_grad(set_to_none=True)
        return self.account(result, n, values)

    def calibration_sums(self, out: torch.Tensor, y: torch.Tensor, beta: Any, stacked: bool = False) -> list[torch.Tensor]:
        """What the step adds to its one read for the probabilities: their calibration sums (as served: ``beta``
        times the logits) and, fitting a temperature, the gradient and curvature in ``beta``; nothing for regression."""
        if not self.calibrated:
            return []
        task = self.cfg.trainer.task
        if beta is None:
            return [calibration.batch_sums(out, y, task, stacked)]
        b = beta.reshape(-1, *([1] * (out.dim() - 1))) if stacked else beta
        served = calibration.batch_sums(out.detach() * b, y, task, stacked)
        return [torch.cat([served, calibration.temperature_sums(out, y, task, beta, stacked)], dim=-1)]

    def _inputs(self, batch: Batch, ranked: tuple[Turn, Collectives] | None) -> tuple:
        """The batch on the device, its features folded into the standardizer: ``x, y, ids, n, fold_labels``."""
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True)
        ids = batch.ids.to(self.device, non_blocking=True) if self.takes_ids else None
        if self.device.type == "cuda":  # the ring gets the slot back once this copy is done, whatever the host waits for
            batch.copy_done = torch.cuda.Event()
            batch.copy_done.record(torch.cuda.current_stream(self.device))
        # features are known before the prediction; a skipped step's records count too
        if ranked is None:
            self.normalizer.update(x)
            return x, y, ids, len(batch), None
        turn, coll = ranked
        n = turn.samples
        w = x.shape[1]
        counts = turn.moments[2 * w + 2 :] if self.normalizer.missing else None  # present values per column
        self._fold(self.normalizer, turn.moments[: 2 * w], n, x, coll, counts)
        fold_labels = lambda y2: self._fold(self.target, turn.moments[2 * w : 2 * w + 2], n, y2, coll)  # noqa: E731
        return x, y, ids, n, fold_labels

    def judge(self, values: list[float], n: int) -> StepResult:
        """The step's result from its one read (the loss, the prequential sums, the calibration sums, the gradient norm last):
        ``skipped`` says why the weights must stay untouched."""
        loss_value, loss_sum, hits_or_abs = values[:3]
        result = StepResult(loss_sum / n, hits_or_abs / n, math.nan)
        if not math.isfinite(loss_value):
            result.skipped = "loss_nonfinite"
        else:
            result.grad_norm = values[-1]
            if not math.isfinite(result.grad_norm):
                result.skipped = "amp_overflow" if self.scaler.is_enabled() else "grad_nonfinite"
        return result

    def account(self, result: StepResult, n: int, values: list[float]) -> StepResult:
        """After the update (or its skip): the counts, the prequential totals, the drift monitor, the running averages."""
        if result.skipped:
            return result
        tc = self.cfg.trainer
        _, loss_sum, hits_or_abs, sq, scaled_abs = values[:5]
        self.step_count += 1
        self.samples += n
        if tc.task == "regression":
            self.prequential.add(n, loss_sum, abs_error=hits_or_abs, squared_error=sq)
            error = scaled_abs / n
        else:
            bins = values[5 : 5 + calibration.WIDTH]
            self.prequential.add(n, loss_sum, correct=round(hits_or_abs), calibration=bins)
            if self.temperature is not None:
                self.temperature.update(*values[5 + calibration.WIDTH : 7 + calibration.WIDTH], n)
            error = 1.0 - result.metric
        result.drift = self.drift.observe(error, n, self._drift_target)
        a = tc.ewma_alpha
        self.loss_ewma = result.loss if math.isnan(self.loss_ewma) else (1 - a) * self.loss_ewma + a * result.loss
        self.metric_ewma = result.metric if math.isnan(self.metric_ewma) else (1 - a) * self.metric_ewma + a * result.metric
        return result

    # ------------------------------------------------------------------ several ranks
    def batch_moments(self, batch: Batch | None) -> torch.Tensor:
        """This rank's part of a turn's moments: sums of the features and labels, and of their squares, centred on the running means.

        Every rank holds the same running means, so the sums add up over the ranks
        (``daemon/ranks.py``'s control all-reduce) to the moments of the union of the batches.
        """
        w = self.cfg.data.width
        missing = self.normalizer.missing
        if batch is None or len(batch) == 0:
            return torch.zeros(2 * w + 2 + (w if missing else 0), dtype=torch.float64)
        xs = batch.x.to(torch.float64) - self.normalizer.mean.cpu()
        ys = batch.y.to(torch.float64).reshape(-1, 1) - self.target.mean.cpu()
        if not missing:
            return torch.cat([xs.sum(0), xs.square().sum(0), ys.sum(0), ys.square().sum(0)])
        present = ~torch.isnan(xs)  # a missing number adds to no sum; the counts travel last
        xs = torch.where(present, xs, 0.0)
        return torch.cat([xs.sum(0), xs.square().sum(0), ys.sum(0), ys.square().sum(0), present.sum(0, dtype=torch.float64)])

    @staticmethod
    def _fold(
        norm: RunningStandardizer, moments: torch.Tensor, n: int, local: torch.Tensor, coll: Collectives, counts: torch.Tensor | None = None
    ) -> None:
        """Fold the turn's batch (every rank's) into ``norm`` from its summed centred moments (``counts``: present values)."""
        if not norm.enabled or n == 0:
            return
        width = norm.mean.shape[0]
        s1, s2 = moments[:width].to(norm.mean), moments[width:].to(norm.mean)
        k = counts.to(norm.mean).clamp(min=1.0) if counts is not None else n
        mean_b = norm.mean + s1 / k
        m2_b = (s2 - s1.square() / k).clamp_(min=0.0)
        # every rank holds the same counts: the same branch (and the same collective) on each
        first = (norm.counts == 0) if counts is not None else None
        if first.any() if first is not None else norm.n == 0:
            # a column's first values ever: no running mean to centre on, so sum the squares about the
            # batch's mean in a second pass (a timestamp's square loses its spread in float64)
            dev = (local.reshape(-1, width).to(torch.float64) - mean_b).nan_to_num(0.0)
            m2_first = coll.all_reduce(dev.square().sum(0).cpu()).to(norm.mean)
            m2_b = torch.where(first, m2_first, m2_b) if first is not None else m2_first
        norm.merge(n, mean_b, m2_b, counts)

    def _sum_over_ranks(self, sums: torch.Tensor, coll: Collectives) -> torch.Tensor:
        """Sum the gradients (zeros where this rank has none) and ``sums`` over the ranks: one all-reduce (and the sparse rows)."""
        if self.sparse_params:
            sparse_sum_over_ranks(self.sparse_params, coll)
        return sum_over_ranks(self.dense_params, sums, coll)

    def _loss(
        self,
        out: torch.Tensor,
        y: torch.Tensor,
        total: int | None = None,
        fold_labels: Any = None,
        stacked: bool = False,
        beta: Any = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The training loss, and the batch's prequential sums: loss, hits or |error|, squared error, |error| / label std.

        Regression trains on the label standardized by its running statistics (so a label
        of any scale trains at the same pace); the prediction scored is made with the
        statistics of the labels *before* this batch, in the label's own units.

        ``total``: several ranks -- the loss is this rank's sum over ``total`` (the samples
        of every rank), so the gradients summed over the ranks are those of the mean over
        all of them; ``fold_labels(y)`` folds the labels of every rank into the label's
        statistics instead of this batch's alone.

        ``stacked``: ``out`` leads with the outputs of k stacked candidates
        (``daemon/stack.py``) for the same batch; every loss and sum is then one per
        candidate, of shape (k,), and the labels are folded in once.

        ``beta``: classification with a fitted temperature (``daemon/calibration.py``,
        (k,) when stacked) -- the model trains on its logits, and the prequential loss is
        that of the probabilities served, ``beta`` times them.
        """
        tc = self.cfg.trainer
        zero = out.new_zeros(out.shape[:1] if stacked else ())
        count = len(y) if total is None else total

        def over(per_sample: torch.Tensor) -> torch.Tensor:  # the batch's mean, or this rank's share of every rank's
            return per_sample.mean(-1) if total is None else per_sample.sum(-1) / total

        if tc.task == "multiclass":
            labels = y.long()

            def cross_entropy(logits: torch.Tensor) -> torch.Tensor:  # per sample; the classes along dim 1
                return F.cross_entropy(logits.movedim(-1, 1) if stacked else logits, labels.expand(out.shape[:-1]), reduction="none")

            loss = over(cross_entropy(out))
            served = loss.detach() * count if beta is None else cross_entropy(out.detach() * _per(beta, out, stacked)).sum(-1)
            return loss, (served, (out.detach().argmax(-1) == labels).sum(-1).float(), zero, zero)
        out = out.reshape(len(out), -1) if stacked else out.reshape(-1)
        if tc.task == "binary":
            loss = over(F.binary_cross_entropy_with_logits(out, y.expand_as(out), reduction="none"))
            if beta is None:
                served = loss.detach() * count
            else:
                scaled = out.detach() * _per(beta, out, stacked)
                served = F.binary_cross_entropy_with_logits(scaled, y.expand_as(out), reduction="none").sum(-1)
            return loss, (served, ((out.detach() > 0) == (y > 0.5)).sum(-1).float(), zero, zero)
        target = self.target
        err = torch.addcmul(target.shift - y, out.detach(), target.std)  # the prequential prediction's error
        inv_std = target.scale[0]  # the statistics before this batch's labels (update() replaces the tensors)
        (fold_labels or target.update)(y[:, None])
        sq = err.square().sum(-1)
        abs_sum = err.abs().sum(-1)
        if tc.loss == "huber":
            per_sample = F.huber_loss(out * target.std + target.shift, y.expand_as(out), delta=tc.huber_delta, reduction="none")
            loss = over(per_sample) * target.scale[0] ** 2
            preq = F.huber_loss(err, torch.zeros_like(err), delta=tc.huber_delta, reduction="none").sum(-1)
        else:
            loss = over(F.mse_loss(out, ((y - target.shift) * target.scale).expand_as(out), reduction="none"))
            preq = sq
        return loss, (preq, abs_sum, sq, abs_sum * inv_std)

    def schedule(self, loss: float) -> None:
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

    # ------------------------------------------------------------------ state (a snapshot's state.pt)
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **({"sparse_optimizer": self.sparse_optimizer.state_dict()} if self.sparse_optimizer is not None else {}),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "normalizer": self.normalizer.state_dict(),
            "target": self.target.state_dict(),
            "prequential": self.prequential.state_dict(),
            **({"calibration": self.temperature.state_dict()} if self.temperature is not None else {}),
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

    def load_state_dict(self, state: dict[str, Any], where: str, trained_with: str) -> None:
        """Restore a snapshot's state; ``where``/``trained_with`` name the snapshot and its model in a mismatch's error."""
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # a config problem: restarting would fail the same way
            first = str(exc).splitlines()[1:2] or [str(exc)]
            raise ConfigError(
                [
                    f"model: snapshot {where} was trained with another model "
                    f"({trained_with}; {first[0].strip()}); restore the model config it was written with, "
                    "or point snapshot.dir at a new directory to start over"
                ]
            ) from exc
        self.optimizer.load_state_dict(state["optimizer"])
        if self.sparse_optimizer is not None and state.get("sparse_optimizer"):
            self.sparse_optimizer.load_state_dict(state["sparse_optimizer"])
        self._step_counts_on_host()
        if state["scaler"]:  # empty when written without a loss scaler (amp off or bf16): a fresh one starts
            self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.normalizer.load_state_dict(state["normalizer"])
        if "target" in state:
            self.target.load_state_dict(state["target"])
        self.prequential.load_state_dict(state.get("prequential", {}))
        if self.temperature is not None:  # a snapshot from before the temperature was fitted: it starts at 1
            self.temperature.load_state_dict(state.get("calibration", {}))
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

    def _step_counts_on_host(self) -> None:
        """Keep Adam's step counts on the CPU, where a fresh optimizer has them.

        A snapshot is loaded onto the device, and torch restores ``state["step"]`` where it
        finds it; Adam's (non-fused) update reads each count with ``.item()``: on CUDA that
        was a device sync per parameter tensor on every step after a restart.
        """
        for s in self.optimizer.state.values():
            step = s.get("step")
            if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                s["step"] = step.cpu()

    # ------------------------------------------------------------------ building
    def _check_output_size(self) -> None:
        """Probe the model with a zero batch: it must take the data width and give the task's outputs."""
        tc = self.cfg.trainer
        want = {"regression": 1, "binary": 1, "multiclass": tc.num_classes}[tc.task]
        width, fields = self.inputs.in_features, self.inputs.categorical
        if fields and len(inspect.signature(self.model.forward).parameters) < 2:
            raise ConfigError(
                [
                    f"data.categorical: model {self.cfg.model.name} takes no categorical input (its forward has no ids argument); "
                    "use linear, logistic, mlp, transformer or fm, or give your model forward(x, ids)"
                ]
            )
        self.model.eval()
        try:
            with torch.no_grad():
                x = torch.zeros(2, width, device=self.device)
                out = self.model(x, torch.zeros(2, fields, dtype=torch.int64, device=self.device)) if fields else self.model(x)
        except Exception as exc:
            marks = self.inputs.indicators
            what = f"{width - marks} features" + (f" ({width} inputs: each with its 'was missing' mark)" if marks else "")
            what += f" and {fields} categorical fields" if fields else ""
            raise ConfigError([f"model.name: {self.cfg.model.name} cannot take a batch of {what}: {exc}"]) from exc
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
        state = self._with_marks(state, path)
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

    def _with_marks(self, state: dict, path: str) -> dict:
        """Weights trained without "was missing" marks, widened for a model that has them (the marks start at zero).

        A tensor one dimension of which is short by the marks (a first layer's inputs, the fm's
        number factors) is copied into the leading part of this model's own, whose last
        entries along it are the marks' zeros: a model trained before missing numbers were
        imputed warm-starts one that imputes them, and predicts as it did where nothing is missing.
        """
        marks = self.inputs.indicators
        if not marks or self.inputs.categorical:  # with tables, the marks are not the last inputs of a first layer
            return state
        own = self.model.state_dict()
        out = dict(state)
        for key, t in state.items():
            mine = own.get(key)
            if not isinstance(t, torch.Tensor) or mine is None or mine.dim() != t.dim() or mine.shape == t.shape:
                continue
            grown = [d for d in range(t.dim()) if mine.shape[d] != t.shape[d]]
            if len(grown) == 1 and mine.shape[grown[0]] - t.shape[grown[0]] in (marks, getattr(self.model.config, "d_in", 0)):
                wider = torch.zeros_like(mine)
                wider.narrow(grown[0], 0, t.shape[grown[0]]).copy_(t)
                out[key] = wider
                log.info(
                    "warm start from %s: %s %s -> %s, the 'was missing' marks' weights at zero",
                    path,
                    key,
                    tuple(t.shape),
                    tuple(mine.shape),
                )
        return out

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

    def _make_optimizer(self, name: str, lr: float) -> torch.optim.Optimizer:
        tc, params = self.cfg.trainer, self.dense_params
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
