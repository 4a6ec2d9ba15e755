"""The daemon's configuration: frozen, typed sections loaded once from YAML.

The data-path sections (kafka, dead_letter, data, ring) live in
:mod:`streams.config`; this module adds the model, trainer, snapshot, metrics and
logging sections, cross-section checks, and the file loader.  One
:class:`ConfigError` lists every problem with its key path.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from streamtrain.config.overrides import apply_overrides, env_overrides, parse_set
from streamtrain.config.secrets import Secret, redacted, resolve_secrets
from streamtrain.serve.repository import NAME_RE
from streamtrain.streams.config import (
    DataConfig,
    DeadLetterConfig,
    KafkaConfig,
    RingConfig,
    non_negative,
    opt,
    parse,
    positive,
    section,
)
from streamtrain.streams.errors import ConfigError

__all__ = ["Config", "ConfigError", "config_from_dict", "config_to_dict", "dump_config", "load_config"]


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("mlp", "Built-in model (linear, logistic, mlp, transformer) or a user model as package.module:Class.")
    params: dict[str, Any] = opt({}, "The model's config fields; in_features defaults to the data width.")
    init_weights: str | None = opt(None, "Warm start: a state_dict file (torch.save) to load before training.")
    freeze: tuple[str, ...] = opt((), "Parameter-name patterns (fnmatch) left untrained, e.g. [encoder.*].")

    def _validate(self) -> list[tuple[str, str]]:
        if self.init_weights and not Path(self.init_weights).is_file():
            return [("init_weights", f"no such file: {self.init_weights}")]
        return []


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = opt("none", "Learning-rate schedule: none | step | cosine | plateau (on the prequential loss).")
    step_size: int = opt(1000, "step: steps between decays.")
    gamma: float = opt(0.5, "step: decay factor.")
    t_max: int = opt(10000, "cosine: steps of one half-cosine.")
    eta_min: float = opt(0.0, "cosine: lowest learning rate.")
    factor: float = opt(0.5, "plateau: decay factor.")
    patience: int = opt(5, "plateau: windows without improvement before decaying.")
    window: int = opt(100, "plateau: steps per evaluation window (mean prequential loss).")
    min_lr: float = opt(0.0, "plateau: lowest learning rate.")

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        names = ("none", "step", "cosine", "plateau")
        if self.name not in names:
            problems.append(("name", f"must be one of {', '.join(names)}, got {self.name!r}"))
        for f in ("gamma", "factor"):
            if not 0 < getattr(self, f) < 1:
                problems.append((f, f"must be between 0 and 1, got {getattr(self, f)}"))
        return problems + positive(self, "step_size", "t_max", "window") + non_negative(self, "patience", "eta_min", "min_lr")


@dataclass(frozen=True)
class TrainerConfig:
    task: str = opt("regression", "regression | binary | multiclass.")
    num_classes: int = opt(0, "multiclass: number of classes (labels 0..num_classes-1); follows trainer.classes when that is given.")
    classes: tuple[str, ...] = opt(
        (),
        "Class names in order (multiclass, or binary: [negative, positive]): labels may be these names (or their index); "
        "a record with another class is dead-lettered as unknown_class. Predictions are served by name.",
    )
    loss: str = opt("auto", "auto (by task) | mse | huber | bce | cross_entropy.")
    huber_delta: float = opt(1.0, "huber: the delta.")
    optimizer: str = opt("auto", "auto (by model: see docs/LEARNING.md) | sgd | adam | adamw.")
    lr: float | None = opt(None, "Learning rate; null = the default of the optimizer auto picks (docs/LEARNING.md).")
    sparse_optimizer: str = opt(
        "auto", "The categorical tables' optimizer (only the rows a batch holds): auto (adagrad) | adagrad | sparse_adam | sgd."
    )
    sparse_lr: float | None = opt(None, "The categorical tables' learning rate; null = by model (docs/LEARNING.md, Categorical features).")
    weight_decay: float = opt(0.0, "Weight decay.")
    momentum: float = opt(0.0, "sgd: momentum.")
    betas: tuple[float, float] = opt((0.9, 0.999), "adam/adamw: betas.")
    schedule: ScheduleConfig = section(ScheduleConfig, "Learning-rate schedule.")
    device: str = opt("auto", "auto (cuda when available) | cpu | cuda | cuda:N.")
    amp: str = opt(
        "auto", "Mixed precision: auto (CUDA: bf16 where the GPU has it, else fp16 with a loss scaler; CPU: off) | off | fp16 (CUDA) | bf16"
    )
    grad_clip_norm: float | None = opt(
        None, "Clip the global gradient norm to this; 0 turns clipping off; null = by model (docs/LEARNING.md)."
    )
    standardize: bool = opt(True, "Standardize features with their running mean/variance (a batch is folded in, then scaled).")
    standardize_target: bool = opt(True, "regression: train on the label standardized by its running statistics (any label scale).")
    num_threads: int = opt(0, "torch intra-op threads; 0 = the cores the data path leaves free.")
    rank_timeout_s: float = opt(
        120.0, "Several ranks: how long a rank waits for the others at a collective before it exits 1 (a hung rank, a host cut off)."
    )
    seed: int = opt(0, "Seed for weight init and dropout.")
    max_consecutive_nonfinite: int = opt(
        10, "After this many non-finite steps in a row, roll back to the last good snapshot and replay the stream from it."
    )
    max_rollbacks: int = opt(3, "Roll-backs in a row without a new snapshot before giving up (training diverges again and again).")
    ewma_alpha: float = opt(0.05, "Smoothing of the loss/metric gauges (exponentially weighted, per step).")
    calibration: str = opt(
        "auto",
        "Classification: temperature = serve softmax(logits / T) (sigmoid for binary) with T fitted online on the "
        "prequential stream, kept in snapshots, applied by serve and exported models | none | auto = by model "
        "(temperature for the transformer, none otherwise; docs/LEARNING.md, Calibration).",
    )
    calibration_half_life: float = opt(10000.0, "calibration temperature: the fit's memory, in samples.")
    candidates: tuple[dict[str, Any], ...] = opt(
        (),
        "Candidates trained beside the default on the same batches, each a mapping of trainer.* / model.* overrides "
        "(e.g. [{trainer.lr: 0.01}, {model.params.hidden: [128]}]); the best by recent prequential loss is the champion "
        "that snapshots serve (docs/LEARNING.md, Candidates).",
    )
    candidates_half_life: float = opt(20000.0, "Candidates: the comparison's memory, in samples (older batches weigh half as much).")
    candidates_margin: float = opt(
        0.01, "Candidates: promoted when the recent loss is lower than the champion's by more than this (relative) ..."
    )
    candidates_z: float = opt(3.0, "... and the paired per-batch difference's z-score is above this ...")
    candidates_min_samples: int = opt(5000, "... over at least this many samples since the champion was chosen.")
    candidates_stack: str = opt(
        "auto",
        "Candidates of one model config (differing in trainer.* only): auto = trained as one stacked model (one forward, "
        "backward and update for all, docs/LEARNING.md) | off = one step each.",
    )

    def __post_init__(self) -> None:
        if self.classes and not self.num_classes and self.task == "multiclass":
            object.__setattr__(self, "num_classes", len(self.classes))  # one place for the number of classes

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        tasks = ("regression", "binary", "multiclass")
        if self.task not in tasks:
            problems.append(("task", f"must be one of {', '.join(tasks)}, got {self.task!r}"))
        if self.task == "multiclass" and self.num_classes < 2:
            problems.append(("num_classes", f"must be >= 2 for task multiclass (or list trainer.classes), got {self.num_classes}"))
        if self.classes:
            if len(set(self.classes)) != len(self.classes):
                problems.append(("classes", "must not name a class twice"))
            if self.task == "regression":
                problems.append(("classes", "is for classification (task binary or multiclass)"))
            elif self.task == "binary" and len(self.classes) != 2:
                problems.append(("classes", f"binary takes two names, [negative, positive], got {list(self.classes)}"))
            elif self.task == "multiclass" and self.num_classes != len(self.classes):
                problems.append(("num_classes", f"must equal the number of trainer.classes ({len(self.classes)}), got {self.num_classes}"))
        losses = {"regression": ("auto", "mse", "huber"), "binary": ("auto", "bce"), "multiclass": ("auto", "cross_entropy")}
        allowed = losses.get(self.task, ("auto",))
        if self.loss not in allowed:
            problems.append(("loss", f"must be one of {', '.join(allowed)} for task {self.task}, got {self.loss!r}"))
        if self.optimizer not in ("auto", "sgd", "adam", "adamw"):
            problems.append(("optimizer", f"must be auto, sgd, adam or adamw, got {self.optimizer!r}"))
        if self.lr is not None and not self.lr > 0:
            problems.append(("lr", f"must be > 0, got {self.lr}"))
        if self.sparse_optimizer not in ("auto", "adagrad", "sparse_adam", "sgd"):
            problems.append(("sparse_optimizer", f"must be auto, adagrad, sparse_adam or sgd, got {self.sparse_optimizer!r}"))
        if self.sparse_lr is not None and not self.sparse_lr > 0:
            problems.append(("sparse_lr", f"must be > 0, got {self.sparse_lr}"))
        if not all(0 <= b < 1 for b in self.betas):
            problems.append(("betas", f"must be two numbers in [0, 1), got {list(self.betas)}"))
        if not (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            problems.append(("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}"))
        if self.amp not in ("auto", "off", "fp16", "bf16"):
            problems.append(("amp", f"must be auto, off, fp16 or bf16, got {self.amp!r}"))
        if self.amp == "fp16" and self.device == "cpu":
            problems.append(("amp", "fp16 needs CUDA; on the CPU use bf16 or off"))
        if self.grad_clip_norm is not None and not self.grad_clip_norm >= 0:
            problems.append(("grad_clip_norm", f"must be >= 0, got {self.grad_clip_norm}"))
        if not 0 < self.ewma_alpha <= 1:
            problems.append(("ewma_alpha", f"must be in (0, 1], got {self.ewma_alpha}"))
        if self.calibration not in ("auto", "none", "temperature"):
            problems.append(("calibration", f"must be auto, none or temperature, got {self.calibration!r}"))
        if self.calibration == "temperature" and self.task == "regression":
            problems.append(("calibration", "is for classification (task binary or multiclass)"))
        problems += positive(self, "calibration_half_life")
        if self.candidates_stack not in ("auto", "off"):
            problems.append(("candidates_stack", f"must be auto or off, got {self.candidates_stack!r}"))
        if not 0 <= self.candidates_margin < 1:
            problems.append(("candidates_margin", f"must be in [0, 1), got {self.candidates_margin}"))
        problems += positive(self, "candidates_half_life") + non_negative(self, "candidates_z", "candidates_min_samples")
        return (
            problems
            + non_negative(self, "weight_decay", "momentum", "num_threads", "huber_delta")
            + positive(self, "max_consecutive_nonfinite", "max_rollbacks", "rank_timeout_s")
        )


@dataclass(frozen=True)
class DriftConfig:
    detector: str = opt("adwin", "Drift detector on the prequential error: adwin | page_hinkley | off.")
    action: str = opt(
        "reset_optimizer",
        "On a drift: log (metric + log line) | reset_optimizer | lr_boost | challenger (a fresh model trains beside the "
        "champion from the drift warning on, and replaces it when better; docs/LEARNING.md).",
    )
    warning_delta: float = opt(0.01, "challenger, adwin: the warning detector's delta (looser than delta: it warns first).")
    challenger: str = opt(
        "fresh",
        "challenger: what starts at a warning: fresh (a new model of the champion's config) | reset (the champion, its optimizer reset).",
    )
    challenger_max_samples: int = opt(
        20000,
        "challenger: dropped if not promoted within this many samples (a confirmed drift more than 5 x cooldown_samples "
        "after the warning that started it starts it over).",
    )
    delta: float = opt(0.002, "adwin: confidence of each test (smaller: fewer false alarms, later detections).")
    threshold: float = opt(50.0, "page_hinkley: alarm threshold, in units of the batch error.")
    cooldown_samples: int = opt(1000, "Detections within this many samples of the last drift are the same drift.")
    lr_boost_factor: float = opt(3.0, "lr_boost: the learning rate is multiplied by this at the drift ...")
    lr_boost_samples: int = opt(1000, "lr_boost: ... and the boost fades linearly back to the schedule over this many samples.")

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.detector not in ("adwin", "page_hinkley", "off"):
            problems.append(("detector", f"must be adwin, page_hinkley or off, got {self.detector!r}"))
        if self.action not in ("log", "reset_optimizer", "lr_boost", "challenger"):
            problems.append(("action", f"must be log, reset_optimizer, lr_boost or challenger, got {self.action!r}"))
        if self.challenger not in ("fresh", "reset"):
            problems.append(("challenger", f"must be fresh or reset, got {self.challenger!r}"))
        if not 0 < self.warning_delta < 1:
            problems.append(("warning_delta", f"must be in (0, 1), got {self.warning_delta}"))
        if not 0 < self.delta < 1:
            problems.append(("delta", f"must be in (0, 1), got {self.delta}"))
        if not self.lr_boost_factor >= 1:
            problems.append(("lr_boost_factor", f"must be >= 1, got {self.lr_boost_factor}"))
        return problems + positive(self, "threshold", "lr_boost_samples", "challenger_max_samples") + non_negative(self, "cooldown_samples")


@dataclass(frozen=True)
class SnapshotConfig:
    dir: str = opt("snapshots", "Directory of snapshots (locked by the running daemon).")
    every_seconds: float = opt(60.0, "Snapshot this often; 0 = not on a timer.")
    every_steps: int = opt(0, "Snapshot every N steps; 0 = not by steps.")
    keep: int = opt(3, "Newest snapshots to keep.")

    def _validate(self) -> list[tuple[str, str]]:
        problems = non_negative(self, "every_seconds", "every_steps")
        if self.keep < 1:
            problems.append(("keep", f"must be >= 1, got {self.keep}"))
        if not self.dir:
            problems.append(("dir", "must be a directory path"))
        return problems


@dataclass(frozen=True)
class MlflowConfig:
    """MLflow (the mlflow extra): each published version logged as a pyfunc model and registered; training metrics in a run."""

    tracking_uri: str = opt(
        "", "MLflow tracking server or store, e.g. http://mlflow:5000 (a URI with a scheme); empty = off (docs/OPERATIONS.md)."
    )
    experiment: str = opt("streamtrain", "Experiment of the run each daemon start opens (created when missing).")
    registered_model: str = opt(
        "", "Registered model each published version becomes a version of (alias champion moved to it); empty = publish.name."
    )
    every_steps: int = opt(100, "Steps between training-metric points in the run (loss, metric, lr, grad norm, cumulative prequential).")
    retry_s: float = opt(30.0, "After a failure (MLflow down, refused), wait this long before trying again; training never waits.")
    timeout_s: float = opt(10.0, "Longest one HTTP request to MLflow may take.")

    def _validate(self) -> list[tuple[str, str]]:
        problems = positive(self, "every_steps", "retry_s", "timeout_s")
        if self.tracking_uri and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", self.tracking_uri):
            problems.append(("tracking_uri", f"must be a URI with a scheme (http://host:5000, file:///path), got {self.tracking_uri!r}"))
        if not self.experiment.strip():
            problems.append(("experiment", "must be an experiment name"))
        if self.registered_model and (self.registered_model != self.registered_model.strip() or "/" in self.registered_model):
            problems.append(("registered_model", f"must be a name without '/' or surrounding spaces, got {self.registered_model!r}"))
        return problems


@dataclass(frozen=True)
class PublishConfig:
    dir: str | None = opt(
        None, "Model repository: each published version goes to <dir>/<name>/<version>/ (version = the snapshot's step); null = off."
    )
    name: str = opt("model", "The model's name in the repository, and in the serving URL /v1/models/<name>.")
    every_snapshots: int = opt(1, "Publish every Nth durable snapshot (the final one at shutdown always).")
    keep: int = opt(5, "Newest versions to keep in the repository.")
    program: bool = opt(True, "Also write the torch.export program (model.pt2: standardization included, no model code needed).")
    topic: str | None = opt(
        None, "Kafka topic (compacted: key = name) told about every version published; same cluster and client settings as kafka.*."
    )
    onnx: bool = opt(
        False,
        "Also write model.onnx (the program's graph as ONNX, the onnx extra), checked with onnxruntime against torch before it "
        "is kept; one that fails to export or to match is left out of that version and counted (docs/OPERATIONS.md).",
    )
    candidates: bool = opt(
        False,
        "Also publish each candidate that is not the champion (trainer.candidates, a drift challenger) as <name>.<candidate>, "
        "to be shadow-served beside the champion (docs/OPERATIONS.md).",
    )
    mlflow: MlflowConfig = section(MlflowConfig, "Log each published version to MLflow and register it (the mlflow extra).")

    def _validate(self) -> list[tuple[str, str]]:
        problems = positive(self, "every_snapshots", "keep")
        if self.dir is not None and not self.dir.strip():
            problems.append(("dir", "must be a directory path, or null to publish nothing"))
        if not NAME_RE.match(self.name):
            problems.append(("name", f"must be letters, digits, '.', '_' or '-' (one path component), got {self.name!r}"))
        if self.topic is not None and (not self.topic or any(c.isspace() for c in self.topic)):
            problems.append(("topic", f"must be a topic name without spaces, got {self.topic!r}"))
        if self.topic is not None and self.dir is None:
            problems.append(("topic", "needs publish.dir (the topic tells where the versions written there are)"))
        if self.mlflow.tracking_uri and self.dir is None:
            problems.append(("mlflow.tracking_uri", "needs publish.dir (what MLflow gets is the version written there)"))
        return problems


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = opt(True, "Serve /metrics, /healthz and /readyz.")
    host: str = opt("127.0.0.1", "Address to bind (0.0.0.0 inside a container).")
    port: int = opt(9100, "Port to bind; 0 picks a free one (logged).")
    stall_after_s: float = opt(120.0, "/healthz fails when the trainer has not advanced for this long while data waits.")

    def _validate(self) -> list[tuple[str, str]]:
        if not 0 <= self.port <= 65535:
            return [("port", f"must be in 0..65535, got {self.port}")]
        return positive(self, "stall_after_s")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = opt("INFO", "DEBUG | INFO | WARNING | ERROR.")
    format: str = opt("text", "text (for a terminal) | json (one object per line, for journald/Docker).")
    progress_every_s: float = opt(10.0, "Seconds between progress lines; 0 = none.")
    tensorboard_dir: str | None = opt(
        None, "Write TensorBoard scalars here (loss, metrics, lr, grad norm, drifts); needs the tensorboard extra."
    )
    tensorboard_every_steps: int = opt(100, "Steps between TensorBoard points.")

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(("level", f"must be DEBUG, INFO, WARNING or ERROR, got {self.level!r}"))
        if self.format not in ("text", "json"):
            problems.append(("format", f"must be text or json, got {self.format!r}"))
        return problems + non_negative(self, "progress_every_s") + positive(self, "tensorboard_every_steps")


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = section(KafkaConfig, "Where records come from.")
    dead_letter: DeadLetterConfig = section(DeadLetterConfig, "Where rejected records go.")
    data: DataConfig = section(DataConfig, "How a record becomes features and a label.")
    ring: RingConfig = section(RingConfig, "Batching and the prefetch ring.")
    model: ModelConfig = section(ModelConfig, "What is trained.")
    trainer: TrainerConfig = section(TrainerConfig, "How it is trained.")
    drift: DriftConfig = section(DriftConfig, "Concept drift: detected on the prequential error, and acted on.")
    snapshot: SnapshotConfig = section(SnapshotConfig, "Durable training state.")
    publish: PublishConfig = section(PublishConfig, "Publish each snapshot's model as a version for serving (streamtrain serve).")
    metrics: MetricsConfig = section(MetricsConfig, "Prometheus metrics and health endpoints.")
    logging: LoggingConfig = section(LoggingConfig, "Logs.")

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.dead_letter.topic in self.kafka.topics:
            problems.append(("dead_letter.topic", "must not be one of kafka.topics (rejected records would come back)"))
        if self.publish.topic is not None and self.publish.topic in (*self.kafka.topics, self.dead_letter.topic):
            problems.append(("publish.topic", "must not be one of kafka.topics or the dead-letter topic"))
        lt = self.data.labels
        if lt.enabled:
            if lt.topic in (*self.kafka.topics, self.dead_letter.topic):
                problems.append(("data.labels.topic", "must not be one of kafka.topics or the dead-letter topic"))
            if len(self.kafka.topics) != 1:
                problems.append(("kafka.topics", "with data.labels.topic, name the one feature topic its partitions pair with"))
            if self.trainer.task == "regression" and lt.on_expiry == "negative":
                problems.append(
                    ("data.labels.on_expiry", "negative is for classifiers; for regression use default (with labels.default) or drop")
                )
        problems += _model_problems(self)
        if self.trainer.candidates:
            from streamtrain.config.candidates import candidate_configs

            try:
                candidate_configs(self)
            except ConfigError as exc:
                problems += [_split_path(p) for p in exc.problems]
        return problems


def _model_problems(cfg: Config) -> list[tuple[str, str]]:
    """Check model.params against the model's own config class (no module is built)."""
    from streamtrain.models.registry import ModelConfigError, ModelSpecError, make_config

    try:
        # with no data width, data.* already says why; a placeholder keeps other param checks
        make_config(cfg.model.name, dict(cfg.model.params), cfg.data.width or 1)
    except ModelConfigError as exc:
        return [_split_path(p) for p in exc.problems]
    except ModelSpecError as exc:
        return [("model.name", str(exc))]
    return []


def _split_path(problem: str) -> tuple[str, str]:
    path, _, msg = problem.partition(": ")
    return path, msg


def config_from_dict(raw: Any) -> Config:
    """Validate a raw mapping (as read from YAML) into a :class:`Config`."""
    return parse(Config, raw)


def load_config(path: str | os.PathLike[str], overrides: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file; raises :class:`ConfigError`.

    ``STREAMTRAIN__*`` variables of ``environ`` (default ``os.environ``), then the
    ``key.path=value`` strings of ``overrides`` (``--set``), are applied to the file's
    mapping; then ``${env:NAME}`` / ``${file:/path}`` references are resolved; then it
    is validated. See :mod:`streamtrain.config.overrides` and :mod:`streamtrain.config.secrets`.
    """
    env = os.environ if environ is None else environ
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read the config file ({exc.strerror})"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: not valid YAML: {exc}"]) from exc
    found, problems = [], []
    for source in (lambda: env_overrides(env, Config), lambda: parse_set(overrides, Config)):
        try:
            found += source()
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    raw = apply_overrides(raw, found)
    raw, problems = resolve_secrets(raw, p.parent, env)
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def config_to_dict(cfg: Any, redact: bool = True) -> Any:
    """Plain-data form of a config, for printing and for snapshots.

    With ``redact``, a value from a ``${env:...}``/``${file:...}`` reference shows as
    the reference and a secret-looking key's value (``sasl.password``) as ``***``.
    """
    if dataclasses.is_dataclass(cfg):  # a typed secret (data.schema_registry.basic_auth_password) is hidden as a settings key is
        return {
            f.name: redacted(v, f.name) if redact and isinstance(v, str) else config_to_dict(v, redact)
            for f in dataclasses.fields(cfg)
            for v in [getattr(cfg, f.name)]
        }
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v, redact) for v in cfg]
    if isinstance(cfg, dict):
        nested = (dict, tuple, list)
        return {k: redacted(v, k) if redact and not isinstance(v, nested) else config_to_dict(v, redact) for k, v in cfg.items()}
    if isinstance(cfg, Secret):
        return cfg.ref if redact else str(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    """The effective config as YAML, secrets redacted."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
