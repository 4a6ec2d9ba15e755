"""How well the daemon learns, against River on the same rows in the same run: ``python -m bench.learning``.

Each stream (``bench/learning_streams.py``: River's datasets, its drift generators, and
streams made to break standardization) is produced into a one-partition topic of the
embedded broker as JSON records, in order.  The daemon trains it through its real data
path (``Trainer.setup()`` + ``Trainer.train()``: ingest process, shared ring, the step)
at ``ring.batch_size`` 1 with the defaults: only ``data.*``, ``model.name``,
``trainer.task`` and the batch size are set.  River's pipeline learns the same float32
rows one by one.  Both are scored prequentially (predict, then learn), cumulatively:

- classification: accuracy and log loss (River's probabilities clipped at 1e-15);
- regression: MAE and RMSE;

and rows/s of each.  The daemon's figures are its own cumulative prequential totals
(``streamtrain_prequential_*_total``).  The models: the daemon's ``linear`` (regression)
or ``logistic`` against River's ``StandardScaler() | LinearRegression()`` /
``LogisticRegression()`` (one-vs-rest for multi-class); with ``--mlp`` also the daemon's
``mlp`` on the streams where the targets name it, and River's ``forest.ARFClassifier``
on the drift streams (``--arf``).

Drift recovery (``--actions``): on the streams with an abrupt drift, the daemon's
``--drift-model`` (default ``mlp``, the model a drift hurts most here) runs once per
``drift.action``; per drift, the table gives the samples until the prequential error
(mean over a sliding window of ``--window`` samples) is back within 10 % of its level
before the drift, the level before, the peak, and the mean error over the ten windows
after the drift.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from bench.common import Broker, fill_topic, machine, print_machine, quiet_logs, snapshot_dir, table, unique
from bench.learning_streams import DRIFT, STREAMS, Stream
from streamtrain.config.overrides import apply_overrides, parse_set
from streamtrain.config.schema import Config, config_from_dict
from streamtrain.daemon.calibration import BINS, WIDTH, measures
from streamtrain.daemon.metrics import Metrics
from streamtrain.daemon.trainer import Trainer
from streamtrain.streams.encode import encode

MLP_STREAMS = ("bananas", "friedman_drift", "sea_drift", "agrawal_drift", "hyperplane", "waveform_noisy", "led_drift", "rbf_drift")
ABRUPT = ("sea_drift", "agrawal_drift", "friedman_drift")
RECOVERY_TOLERANCE = 0.10


@dataclass
class Scores:
    """Cumulative prequential scores of one learner on one stream."""

    learner: str
    task: str
    samples: int = 0
    accuracy: float = math.nan
    loss: float = math.nan  # log loss (classification) or mean squared error
    brier: float = math.nan  # classification: Brier score and expected calibration error (daemon/calibration.py)
    ece: float = math.nan
    mae: float = math.nan
    rmse: float = math.nan
    seconds: float = math.nan
    skipped: int = 0
    rejected: int = 0  # records the daemon dead-lettered
    errors: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-sample 0/1 error or |error|, in order

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds else math.nan


# ---------------------------------------------------------------------------- the daemon
def daemon_config(
    bootstrap: str, topic: str, stream: Stream, model: str, batch_size: int, directory: str, drift: dict | None = None, sets: tuple = ()
):
    params: dict = {}
    if stream.task == "multiclass":
        params = {"num_classes": stream.num_classes} if model == "logistic" else {"out_features": stream.num_classes}
    trainer = {"task": stream.task, **({"num_classes": stream.num_classes} if stream.task == "multiclass" else {})}
    raw = {
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": unique("learn")},
        "dead_letter": {"topic": f"{topic}.dlq"},
        "data": {"format": "json", "features": stream.features, "label": "y", **_categorical(stream)},
        "ring": {"batch_size": batch_size},
        "model": {"name": model, "params": params},
        "trainer": trainer,
        "drift": drift or {},
        "snapshot": {"dir": directory, "every_seconds": 0},
        "metrics": {"enabled": False},
        "logging": {"progress_every_s": 0, "level": "WARNING"},
    }
    return config_from_dict(apply_overrides(raw, parse_set(sets, Config)))  # --set: a candidate to compare with the defaults


def _categorical(stream) -> dict:
    cats = getattr(stream, "categorical", None)  # a categorical stream (bench/learning_categorical.py)
    return {"categorical": list(cats)} if cats else {}


def fill(bootstrap: str, stream: Stream) -> str:
    topic = unique(f"learn-{stream.name}")
    records = getattr(stream, "records", None)  # a categorical stream: its records as they are
    values = stream.values() if records is not None else encode("json", stream.x, stream.y, stream.features, "y")
    fill_topic(bootstrap, topic, values, partitions=1)
    return topic


def run_daemon(
    bootstrap: str,
    topic: str,
    stream: Stream,
    model: str,
    batch_size: int = 1,
    drift: dict | None = None,
    timeout: float = 1800,
    sets: tuple = (),
) -> Scores:
    """The daemon's trainer on the topic, through its data path, until every row is trained."""
    directory = snapshot_dir()
    cfg = daemon_config(bootstrap, topic, stream, model, batch_size, directory, drift, sets)
    trainer = Trainer(cfg, Metrics())
    n = len(stream)
    errors: list[tuple[int, float]] = []
    skipped = [0]

    def recorded(batch, result) -> None:
        if result.skipped:
            skipped[0] += 1
        else:
            err = result.metric if stream.task == "regression" else 1.0 - result.metric
            errors.append((len(batch), err))

    def beat() -> None:
        trainer.dataset.pump()
        if trainer.samples + skipped[0] * batch_size + sum(trainer.dataset.stats.rejected.values()) >= n:
            trainer.stop.set()

    trainer.on_step = recorded
    trainer.on_beat = beat
    watchdog = threading.Timer(timeout, trainer.stop.set)
    watchdog.daemon = True
    try:
        trainer.setup()
        watchdog.start()
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    finally:
        watchdog.cancel()
        trainer.stop.set()
        trainer.ready = False  # no final snapshot: nothing here is kept
        trainer.dataset.pump()
        rejected = sum(trainer.dataset.stats.rejected.values())
        trainer.close()
        shutil.rmtree(directory, ignore_errors=True)
    p = trainer.learner.prequential
    if p.samples + skipped[0] * batch_size + rejected < n:
        raise RuntimeError(f"{stream.name}: only {p.samples} of {n} rows trained within {timeout:.0f} s")
    s = Scores(f"streamtrain {model}", stream.task, p.samples, seconds=seconds, skipped=skipped[0], rejected=rejected)
    s.loss = p.loss / p.samples
    if stream.task == "regression":
        s.mae, s.rmse = p.abs_error / p.samples, math.sqrt(p.squared_error / p.samples)
    else:
        s.accuracy = p.correct / p.samples
        cal = p.calibration(stream.task)
        s.brier, s.ece = cal["brier"], cal["ece"]
    s.errors = np.repeat([e for _, e in errors], [k for k, _ in errors]) if errors else np.zeros(0)
    return s


# ---------------------------------------------------------------------------- River
def river_model(stream: Stream, kind: str):
    from river import forest, linear_model, multiclass, preprocessing

    if kind == "arf":
        return forest.ARFClassifier(seed=1)
    if stream.task == "regression":
        return preprocessing.StandardScaler() | linear_model.LinearRegression()
    if stream.task == "binary":
        return preprocessing.StandardScaler() | linear_model.LogisticRegression()
    return preprocessing.StandardScaler() | multiclass.OneVsRestClassifier(linear_model.LogisticRegression())


def run_river(stream: Stream, kind: str = "linear") -> Scores:
    """River's model, predict-then-learn on each row in order, as ``evaluate.progressive_val_score`` does."""
    model = river_model(stream, kind)
    name = {"linear": "River linear", "arf": "River ARF"}[kind]
    n = len(stream)
    errors = np.zeros(n)
    loss = 0.0
    cal = Calibration(stream.task, getattr(stream, "num_classes", 2))
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(stream.rows()):
        if stream.task == "regression":
            err = model.predict_one(x) - y
            errors[i] = abs(err)
            loss += err * err
        else:
            proba = model.predict_proba_one(x)
            if stream.task == "binary":
                p1 = proba.get(True, 0.0)
                pred, p_true = p1 > 0.5, (p1 if y else 1.0 - p1)
            else:
                pred = max(proba, key=proba.get) if proba else 0
                p_true = proba.get(y, 0.0)
            errors[i] = float(pred != y)
            loss -= math.log(min(max(p_true, 1e-15), 1 - 1e-15))
            cal.add(proba, y)
        model.learn_one(x, y)
    s = Scores(name, stream.task, n, seconds=time.perf_counter() - t0, loss=loss / n, errors=errors)
    if stream.task == "regression":
        s.mae, s.rmse = float(errors.mean()), math.sqrt(loss / n)
    else:
        s.accuracy = 1.0 - float(errors.mean())
        s.brier, s.ece = cal.scores(s.loss)
    return s


class Calibration:
    """The daemon's calibration sums (daemon/calibration.py) for a learner giving a dict of probabilities, one row at a time."""

    def __init__(self, task: str, classes: int) -> None:
        self.task, self.classes = task, classes
        self.bins = [0.0] * WIDTH

    def add(self, proba: dict, y) -> None:
        if self.task == "binary":
            p = float(proba.get(True, 0.0))
            observed = float(bool(y))
            brier = (p - observed) ** 2
        else:
            probs = [float(proba.get(k, 0.0)) for k in range(self.classes)]
            top = max(range(self.classes), key=probs.__getitem__) if proba else 0
            p, observed = probs[top], float(top == y)
            brier = sum((q - (k == y)) ** 2 for k, q in enumerate(probs))
        b = min(int(p * BINS), BINS - 1)
        for part, value in enumerate((1.0, p, observed, brier)):
            self.bins[part * BINS + b] += value

    def scores(self, mean_loss: float) -> tuple[float, float]:
        m = measures(self.task, mean_loss, self.bins)
        return m["brier"], m["ece"]


# ---------------------------------------------------------------------------- recovery after a drift
def recovery(errors: np.ndarray, at: int, window: int, end: int) -> tuple[int | None, float, float, float]:
    """How the prequential error behaved after a drift at ``at`` (the next drift or the end at ``end``).

    Returns (samples from ``at`` until the error, as a mean over ``window`` samples, is back
    within the tolerance of its level over the ``2 * window`` samples before ``at``, after
    its peak: 0 when it never rose past it, None when it did not come back before ``end``;
    the level before; the peak; the mean error over the ``10 * window`` samples after ``at``).
    """
    before = float(errors[at - 2 * window : at].mean())
    after = errors[at:end]
    means = np.convolve(after, np.ones(window) / window, mode="valid")  # means[k]: the window ending at at + k + window - 1
    if len(means) == 0:
        return None, before, math.nan, math.nan
    limit = before * (1 + RECOVERY_TOLERANCE)
    peak = int(means[: 5 * window].argmax())
    mean_after = float(after[: 10 * window].mean())
    if means[peak] <= limit:
        return 0, before, float(means[peak]), mean_after
    back = np.nonzero(means[peak:] <= limit)[0]
    return (int(peak + back[0] + window) if len(back) else None), before, float(means[peak]), mean_after


# ---------------------------------------------------------------------------- the table
def _fmt(v: float, digits: int = 4) -> str:
    return "-" if v != v else f"{v:.{digits}g}" if abs(v) >= 1000 else f"{v:.{digits}f}"


def verdict(ours: Scores, river: Scores) -> str:
    """The issue's targets for the defaults: accuracy >= River's - 0.005, log loss / MAE <= 1.05 x River's."""
    if ours.skipped:
        return "no: skipped steps"
    if ours.task == "regression":
        return "yes" if ours.mae <= 1.05 * river.mae else "no"
    return "yes" if ours.accuracy >= river.accuracy - 0.005 and ours.loss <= 1.05 * river.loss else "no"


def score_cells(s: Scores) -> list[str]:
    """Accuracy or MAE, log loss or RMSE, and for classifiers the Brier score and the ECE."""
    if s.task == "regression":
        return [_fmt(s.mae), _fmt(s.rmse), "-", "-"]
    return [_fmt(s.accuracy), _fmt(s.loss), _fmt(s.brier), _fmt(s.ece)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default=",".join(STREAMS), help=f"comma-separated, of: {', '.join(STREAMS)}")
    ap.add_argument("--rows", type=int, default=0, help="rows per stream (default: each stream's full length; generated: 100k/30k/5k)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--mlp", action="store_true", help=f"also the daemon's mlp on {', '.join(MLP_STREAMS)}")
    ap.add_argument("--models", default="", help="other daemon models to run where --mlp runs the mlp, e.g. mlp,transformer")
    ap.add_argument("--arf", action="store_true", help="also River's ARFClassifier on the classification drift streams (slow)")
    ap.add_argument("--actions", default="", help="drift actions to compare on the abrupt-drift streams, e.g. log,reset_optimizer,lr_boost")
    ap.add_argument("--window", type=int, default=1000, help="samples of the sliding window of the recovery measure")
    ap.add_argument("--drift-model", default="mlp", help="the daemon's model in the drift recovery runs (default mlp)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a daemon config override, e.g. trainer.lr=0.02")
    ap.add_argument("--bootstrap", help="an existing broker instead of the embedded one")
    ap.add_argument(
        "--categorical",
        nargs="?",
        const="mv,friedman_missing,clicks",
        default="",
        help="also the categorical streams (bench/learning_categorical.py) against Vowpal Wabbit and River; a list to pick",
    )
    args = ap.parse_args(argv)
    names = [s for s in args.streams.split(",") if s] if not (args.categorical and argv_streams_default(argv)) else []
    bad = [s for s in names if s not in STREAMS]
    if bad:
        ap.error(f"unknown stream(s) {bad}; known: {', '.join(STREAMS)}")
    actions = [a for a in args.actions.split(",") if a]
    others = [m for m in args.models.split(",") if m] or (["mlp"] if args.mlp else [])
    sets = tuple(args.set)
    if sets:
        print(f"daemon config overrides: {', '.join(sets)}")
    quiet_logs()
    print_machine(machine())
    rows, drift_rows = [], []
    with Broker(args.bootstrap) as broker:
        for name in names:
            stream = STREAMS[name](args.rows)
            topic = fill(broker.bootstrap, stream)
            base = "linear" if stream.task == "regression" else "logistic"
            river = run_river(stream)
            ours = run_daemon(broker.bootstrap, topic, stream, base, args.batch_size, sets=sets)
            print(f"{name}: {len(stream):,} rows; {ours.learner} {score_cells(ours)}, {river.learner} {score_cells(river)}", flush=True)
            rows.append(_row(stream, ours, river, verdict(ours, river)))
            for model in others if name in MLP_STREAMS else ():
                run = run_daemon(broker.bootstrap, topic, stream, model, args.batch_size, sets=sets)
                rows.append(_row(stream, run, river, "beats" if _better(run, river) else "does not beat"))
                print(f"{name}: {run.learner} {score_cells(run)}", flush=True)
                if model == "mlp" and args.arf and name in DRIFT and stream.task != "regression":
                    arf = run_river(stream, "arf")
                    gap = run.accuracy - arf.accuracy
                    rows.append(_row(stream, arf, river, f"mlp {gap:+.4f} vs ARF: {'yes' if gap >= -0.01 else 'no'}"))
                    print(f"{name}: {arf.learner} {score_cells(arf)}", flush=True)
            if actions and name in ABRUPT and stream.drifts:
                for action in actions:
                    run = run_daemon(
                        broker.bootstrap, topic, stream, args.drift_model, args.batch_size, drift={"action": action}, sets=sets
                    )
                    for at in stream.drifts:
                        end = next((d for d in stream.drifts if d > at), len(stream))
                        back, before, peak, after = recovery(run.errors, at, args.window, end)
                        print(
                            f"{name} @ {at:,}, {args.drift_model} with {action}: back in {back}, error {before:.4g} -> {peak:.4g}",
                            flush=True,
                        )
                        drift_rows.append(
                            [
                                name,
                                f"{at:,}",
                                run.learner,
                                action,
                                "never" if back is None else f"{back:,}",
                                *(_fmt(v) for v in (before, peak, after)),
                                _fmt(run.mae if run.task == "regression" else run.accuracy),
                            ]
                        )
        cat_rows = run_categorical(broker.bootstrap, args) if args.categorical else []
        headers = [
            "stream",
            "rows",
            "learner",
            "acc / MAE",
            "log loss / RMSE",
            "Brier",
            "ECE",
            "River linear (the same four)",
            "rows/s",
            "River rows/s",
            "skipped",
            "target met",
        ]
    if rows:
        print()
        print(table(headers, rows))
    if cat_rows:
        print()
        print("categorical streams (prequential, batch 1; the log loss floor of clicks is its hidden model's):")
        headers = ["stream", "rows", "learner", "acc / MAE", "log loss / RMSE", "Brier", "ECE", "rows/s", "dead-lettered", "target"]
        print(table(headers, cat_rows))
    if drift_rows:
        print()
        print(
            f"after each drift: samples until the error (mean of {args.window}) is back within {RECOVERY_TOLERANCE:.0%} "
            f"of its level before, after its peak (0: it never rose past that); the error before, at the peak, "
            f"and over the {10 * args.window:,} samples after the drift; the run's prequential accuracy / MAE over the whole stream"
        )
        headers = [
            "stream",
            "drift at",
            "learner",
            "drift.action",
            "samples to recover",
            "error before",
            "peak",
            "next 10 windows",
            "overall acc / MAE",
        ]
        print(table(headers, drift_rows))
    return 0


def argv_streams_default(argv: list[str] | None) -> bool:
    """--categorical without --streams: only the categorical streams."""
    given = sys.argv[1:] if argv is None else argv
    return not any(a == "--streams" or a.startswith("--streams=") for a in given)


def run_categorical(bootstrap: str, args: argparse.Namespace) -> list[list[str]]:
    """The categorical streams: the daemon (its default and its interaction model), VW and River on the same rows."""
    from bench.learning_categorical import CATEGORICAL_STREAMS, run_vw
    from bench.learning_categorical import run_river as run_river_cat

    out = []
    for name in [s for s in args.categorical.split(",") if s]:
        stream = CATEGORICAL_STREAMS[name](args.rows)
        topic = fill(bootstrap, stream)
        base = "linear" if stream.task == "regression" else "logistic"
        river = run_river_cat(stream)
        vw = run_vw(stream, "-b 18", "VW -b 18")
        learners = [vw, river]
        if "user" in stream.categorical and "item" in stream.categorical:
            learners.append(run_vw(stream, "-b 18 -q ui", "VW -b 18 -q ui"))
        ours = run_daemon(bootstrap, topic, stream, base, args.batch_size, sets=tuple(args.set))
        best_vw = min((s for s in learners if s.learner.startswith("VW")), key=lambda s: s.loss)
        if stream.task == "binary":
            verdict_ = f"log loss {ours.loss / vw.loss:.3f} x VW linear (target <= 1.01): {'yes' if ours.loss <= 1.01 * vw.loss else 'no'}"
        else:
            ok = ours.mae <= river.mae and ours.rejected == 0
            verdict_ = f"MAE {ours.mae / river.mae:.3f} x River (target <= 1), {ours.rejected} dead-lettered: {'yes' if ok else 'no'}"
        print(f"{name}: {len(stream):,} rows; {ours.learner} {score_cells(ours)}; {verdict_}", flush=True)
        rows = [ours]
        verdicts = [verdict_]
        if stream.task == "binary":
            fm = run_daemon(bootstrap, topic, stream, "fm", args.batch_size, sets=tuple(args.set))
            ratio = fm.loss / best_vw.loss
            rows.append(fm)
            verdicts.append(f"log loss {ratio:.3f} x best VW ({best_vw.learner}; target <= 0.95): {'yes' if ratio <= 0.95 else 'no'}")
            print(f"{name}: {fm.learner} {score_cells(fm)}; {verdicts[-1]}", flush=True)
        for s, v in zip([*rows, *learners], [*verdicts, *[""] * len(learners)]):
            out.append(
                [
                    name,
                    f"{len(stream):,}",
                    s.learner,
                    *score_cells(s),
                    f"{s.rate:,.0f}",
                    str(s.rejected) if s.learner.startswith("stream") else "-",
                    v,
                ]
            )
        if not math.isnan(stream.bayes_loss):
            out.append(
                [name, f"{len(stream):,}", "the hidden model (Bayes)", "-", _fmt(stream.bayes_loss), "-", "-", "-", "-", "the floor"]
            )
    return out


def _better(ours: Scores, river: Scores) -> bool:
    return ours.mae < river.mae if ours.task == "regression" else ours.accuracy > river.accuracy


def _row(stream: Stream, s: Scores, river: Scores, verdict_: str) -> list[str]:
    return [
        stream.name,
        f"{len(stream):,}",
        s.learner,
        *score_cells(s),
        " / ".join(score_cells(river)),
        f"{s.rate:,.0f}",
        f"{river.rate:,.0f}",
        str(s.skipped),
        verdict_,
    ]


if __name__ == "__main__":
    sys.exit(main())
