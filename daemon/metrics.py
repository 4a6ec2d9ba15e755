"""Prometheus metrics, declared in one place against an injected registry, and the HTTP endpoint.

The metrics answer three questions an operator asks:
- *is it learning?* the cumulative prequential counters ``streamtrain_prequential_{samples,loss,
  correct,abs_error,squared_error}_total`` (``rate(correct[1h]) / rate(samples[1h])`` is the accuracy
  of the last hour), ``streamtrain_train_loss``, ``..._loss_ewma``, ``..._prequential_metric``,
  learning rate, gradient norm, skipped steps, drifts detected;
- *is it keeping up?* ``streamtrain_consumer_lag``, data-wait, step and record-freshness
  histograms (``rate(streamtrain_data_wait_seconds_sum[1m])`` is the data-wait fraction),
  ring fill, consumer pauses;
- *when was the last snapshot?* ``streamtrain_last_snapshot_timestamp_seconds`` and durations.

Counters that the ingest thread keeps as plain ints (consumed, rejected, ...) and values
only known at scrape time (lag, ring fill) come from :class:`ScrapeCollector`, so the
data path takes no lock per record.  Rates are left to PromQL.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from streamtrain.daemon.calibration import BINS, EDGES, PARTS, WIDTH, measures, totals

log = logging.getLogger("streamtrain.metrics")

# seconds: from 100 us (a small step) to 10 min (a stuck snapshot)
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FRESHNESS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_SNAPSHOT = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """Every metric the daemon exports (names are the metrics reference)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.samples_trained = Counter(
            "streamtrain_samples_trained", "Samples trained on (one per record; one per row for arrow).", registry=r
        )
        self.steps = Counter("streamtrain_steps", "Optimizer steps taken.", registry=r)
        self.steps_skipped = Counter(
            "streamtrain_steps_skipped", "Steps skipped with the weights untouched, by reason.", ["reason"], registry=r
        )
        for reason in ("loss_nonfinite", "grad_nonfinite", "amp_overflow"):
            self.steps_skipped.labels(reason)
        self.samples_dead_lettered = Counter(
            "streamtrain_samples_dead_lettered",
            "Samples the trainer wrote to the dead-letter topic, by reason (nonfinite_step: a skipped step's records).",
            ["reason"],
            registry=r,
        )
        self.samples_dead_lettered.labels("nonfinite_step")
        self.rollbacks = Counter(
            "streamtrain_rollbacks", "Roll-backs to the last good snapshot after repeated non-finite steps.", registry=r
        )
        self.train_loss = Gauge("streamtrain_train_loss", "Loss of the last batch, before its update (prequential).", registry=r)
        self.train_loss_ewma = Gauge("streamtrain_train_loss_ewma", "Exponentially weighted mean of the per-step loss.", registry=r)
        self.prequential_metric = Gauge(
            "streamtrain_prequential_metric", "Exponentially weighted prequential metric (accuracy or mae).", ["metric"], registry=r
        )
        self.learning_rate = Gauge("streamtrain_learning_rate", "Current learning rate.", registry=r)
        self.calibration_temperature = Gauge(
            "streamtrain_calibration_temperature",
            "trainer.calibration temperature: what the served probabilities divide the logits by, fitted online (1: as given).",
            registry=r,
        )
        self.calibration_temperature.set(1.0)  # trainer.calibration none: the logits as the model gives them
        self.embedding_rows = Gauge(
            "streamtrain_embedding_rows", "Rows of the model's categorical tables (data.hash_buckets per table).", registry=r
        )
        self.embedding_bytes = Gauge(
            "streamtrain_embedding_bytes", "Bytes of the model's categorical tables and their optimizer state.", registry=r
        )
        self.grad_norm = Gauge("streamtrain_grad_norm", "Global gradient norm of the last step, before clipping.", registry=r)
        self.data_wait = Histogram(
            "streamtrain_data_wait_seconds",
            "Time the trainer waited for a batch (sum / wall time = data-wait fraction).",
            buckets=_FAST,
            registry=r,
        )
        self.step_time = Histogram("streamtrain_step_seconds", "Time of one training step.", buckets=_FAST, registry=r)
        self.freshness = Histogram(
            "streamtrain_record_freshness_seconds",
            "Record timestamp to trained, per batch, for its oldest record.",
            buckets=_FRESHNESS,
            registry=r,
        )
        self.snapshot_duration = Histogram(
            "streamtrain_snapshot_duration_seconds",
            "Time to write a snapshot durably (off the training thread).",
            buckets=_SNAPSHOT,
            registry=r,
        )
        self.snapshot_pause = Histogram(
            "streamtrain_snapshot_pause_seconds", "Time the trainer paused to copy its state for a snapshot.", buckets=_FAST, registry=r
        )
        self.snapshots = Counter("streamtrain_snapshots", "Snapshots written.", registry=r)
        self.snapshot_failures = Counter("streamtrain_snapshot_failures", "Snapshot writes that failed.", registry=r)
        self.last_snapshot = Gauge("streamtrain_last_snapshot_timestamp_seconds", "Unix time of the last durable snapshot.", registry=r)
        self.snapshot_step = Gauge("streamtrain_last_snapshot_step", "Training step of the last durable snapshot.", registry=r)
        self.commit_failures = Counter("streamtrain_commit_failures", "Offset commits to the consumer group that failed.", registry=r)
        self.models_published = Counter(
            "streamtrain_models_published", "Model versions published to the repository (publish.dir).", registry=r
        )
        self.publish_failures = Counter(
            "streamtrain_publish_failures",
            "Publishes that failed, by stage (write: the version directory; topic: the record on publish.topic; "
            "onnx: model.onnx left out of a version that was published; mlflow: a try to log to MLflow, retried after "
            "publish.mlflow.retry_s).",
            ["stage"],
            registry=r,
        )
        for stage in ("write", "topic", "onnx", "mlflow"):
            self.publish_failures.labels(stage)
        self.publish_skipped = Counter(
            "streamtrain_publish_skipped",
            "Durable snapshots not published, by reason (superseded: a newer one came first; not_newer: its step is not above "
            "the newest version).",
            ["reason"],
            registry=r,
        )
        for reason in ("superseded", "not_newer"):
            self.publish_skipped.labels(reason)
        self.mlflow_versions = Counter(
            "streamtrain_mlflow_model_versions",
            "Published versions logged to MLflow and registered as a model version (publish.mlflow).",
            registry=r,
        )
        self.published_version = Gauge("streamtrain_published_model_version", "Newest model version published (a step).", registry=r)
        self.publish_duration = Histogram(
            "streamtrain_publish_duration_seconds",
            "Time to export and write one version (off the training thread).",
            buckets=_SNAPSHOT,
            registry=r,
        )
        self.info = Gauge(
            "streamtrain_info", "Constant 1, labelled with what runs.", ["version", "model", "device", "amp", "format"], registry=r
        )
        self.rank_info = Gauge(
            "streamtrain_rank_info",
            "Constant 1: which rank of how many this process is (several under torchrun; 0 of 1 alone).",
            ["rank", "world_size", "local_rank"],
            registry=r,
        )
        self.snapshots_incomplete = Counter(
            "streamtrain_snapshots_incomplete",
            "Snapshots not written because a rank's positions were missing (several ranks; rank 0 counts).",
            registry=r,
        )
        self.start_time = Gauge("streamtrain_start_time_seconds", "Unix time the daemon started.", registry=r)
        self.start_time.set(time.time())
        self.scrape = ScrapeCollector()
        r.register(self.scrape)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class ScrapeSources:
    """Callables read at scrape time; each returns plain data (no metric objects on the hot path)."""

    ingest_stats: Callable[[], Any] | None = None
    dead_letter: Callable[[], tuple[int, int, int, int]] | None = None  # DeadLetterQueue.counts()
    lag: Callable[[], dict[tuple[str, int], int]] | None = None
    trained_positions: Callable[[], dict[tuple[str, int], tuple[int, int]]] | None = None
    ring: Callable[[], tuple[int, int]] | None = None  # (filled, capacity)
    consumer: Callable[[], tuple[bool, int, dict[str, int]]] | None = None  # (paused, pauses, errors by name)
    ready: Callable[[], bool] | None = None
    learning: Callable[[], LearningTotals] | None = None
    candidates: Callable[[], dict[str, Any]] | None = None  # Candidates.report() (trainer.candidates, drift.action: challenger)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LearningTotals:
    """The trainer's cumulative prequential totals and drift record (training state: they continue across restarts)."""

    task: str
    samples: int
    loss: float
    correct: int
    abs_error: float
    squared_error: float
    drifts: int
    last_drift: float  # Unix time, 0 before any
    bins: tuple[float, ...] = ()  # classification: the calibration sums by probability bin (daemon/calibration.py)


_PREQUENTIAL = {
    "samples": "Samples scored before they were trained on (test-then-train); continues across restarts from the snapshot.",
    "loss": "Sum of the prequential loss (label units for regression); rate(loss) / rate(samples) is the windowed mean loss.",
    "correct": "Classification: prequential predictions that were right; rate(correct) / rate(samples) is the windowed accuracy.",
    "abs_error": "Regression: sum of |prediction - label| of the prequential predictions; over rate(samples): the windowed MAE.",
    "squared_error": "Regression: sum of (prediction - label)^2 of the prequential predictions; over rate(samples): the windowed MSE.",
    "brier": "Classification: sum of the prequential predictions' Brier scores; over rate(samples): the windowed Brier score.",
    "predicted_positive": "Binary: sum of the predicted probability of the positive class; over rate(positives): the calibration ratio.",
    "positives": "Binary: positive labels among the prequential samples.",
}
_BINS = {
    "samples": "Classification: prequential samples by predicted probability (binary: of the positive class; multiclass: the top class's).",
    "predicted": "Classification: sum of the predicted probability in each bin (binary: the positive class's; multiclass: the top one's).",
    "observed": "Classification: what happened in each bin (binary: positive labels; multiclass: top class right); "
    "sum(abs(rate(predicted) - rate(observed))) / rate(samples): the windowed ECE.",
}


def candidate_families(r: dict[str, Any]):
    """Candidates trained side by side: the champion, each one's own prequential totals, the promotions."""
    info = GaugeMetricFamily("streamtrain_champion_info", "1 for the candidate that is champion (served).", labels=["candidate"])
    samples = CounterMetricFamily(
        "streamtrain_candidate_prequential_samples", "Samples each candidate scored before learning them.", labels=["candidate"]
    )
    loss = CounterMetricFamily(
        "streamtrain_candidate_prequential_loss",
        "Sum of each candidate's prequential loss; rate(loss) / rate(samples) compares them on the same rows.",
        labels=["candidate"],
    )
    recent = GaugeMetricFamily(
        "streamtrain_candidate_recent_loss", "Each candidate's decayed mean loss, as the comparison sees it.", labels=["candidate"]
    )
    for name, (n, total) in sorted(r["own"].items()):
        info.add_metric([name], 1.0 if name == r["champion"] else 0.0)
        samples.add_metric([name], n)
        loss.add_metric([name], total)
        if not math.isnan(r["recent"].get(name, math.nan)):
            recent.add_metric([name], r["recent"][name])
    yield info
    yield samples
    yield loss
    yield recent
    promotions = CounterMetricFamily(
        "streamtrain_promotions",
        "Candidates promoted to champion (better: by the paired comparison; challenger: the drift challenger won), "
        "and challengers dropped, by reason (this process).",
        labels=["reason"],
    )
    for reason in ("better", "challenger", "challenger_dropped"):
        promotions.add_metric([reason], r["promotions"].get(reason, 0))
    yield promotions


def join_families(j):
    """data.labels: the join's counters and gauges (streams/join/joiner.py's JoinStats)."""
    from prometheus_client.core import HistogramMetricFamily

    from streamtrain.streams.join.joiner import DELAY_BUCKETS

    yield CounterMetricFamily("streamtrain_labels_joined", "Feature records trained with the label that came for them.", value=j.joined)
    expired = CounterMetricFamily(
        "streamtrain_labels_expired",
        "Feature records whose label did not come within data.labels.window_seconds, by what was done: negative and "
        "default trained with that label, drop not trained.",
        labels=["action"],
    )
    for action in ("negative", "default", "drop"):
        expired.add_metric([action], j.expired.get(action, 0))
    yield expired
    yield CounterMetricFamily(
        "streamtrain_labels_expired_early",
        "Of the expired, those that left before their window because data.labels.max_pending were waiting.",
        value=j.early,
    )
    yield CounterMetricFamily(
        "streamtrain_labels_late", "Label records that came after their feature record had expired (not trained again).", value=j.late
    )
    yield CounterMetricFamily(
        "streamtrain_labels_unmatched", "Label records whose feature record never came within the window.", value=j.unmatched
    )
    pending = GaugeMetricFamily("streamtrain_join_pending", "Records waiting in the join, by side.", labels=["side"])
    pending.add_metric(["features"], j.pending_features)
    pending.add_metric(["labels"], j.pending_labels)
    yield pending
    yield GaugeMetricFamily(
        "streamtrain_join_pending_bytes", "Memory the waiting feature records hold (slab rows and index, estimated).", value=j.pending_bytes
    )
    yield GaugeMetricFamily("streamtrain_join_held", "Expired feature records the join-breakage guard holds back.", value=j.held)
    yield GaugeMetricFamily(
        "streamtrain_join_guard", "1 while the join-breakage guard holds expiries (too few joins: the label topic stopped?).", value=j.guard
    )
    yield CounterMetricFamily("streamtrain_join_guard_trips", "Times the join-breakage guard tripped.", value=j.guard_trips)
    yield GaugeMetricFamily(
        "streamtrain_join_paused", "1 while the feature topic is paused because data.labels.max_pending records wait.", value=j.paused
    )
    cumulative, total = [], 0
    for bound, n in zip((*DELAY_BUCKETS, float("inf")), j.delay_counts):
        total += n
        cumulative.append((str(bound) if bound != float("inf") else "+Inf", total))
    yield HistogramMetricFamily(
        "streamtrain_label_delay_seconds",
        "Label time minus its feature record's time, for joined records (a label that came first counts 0).",
        buckets=cumulative,
        sum_value=j.delay_sum,
    )


class ScrapeCollector:
    """Reads the data path's own counters, the lag and the learning totals when Prometheus scrapes."""

    def __init__(self) -> None:
        self.sources = ScrapeSources()
        # learning totals go back with a roll-back to a snapshot; a counter never does, so it holds its highest value
        self._high: dict[str, float] = {}

    def _monotonic(self, name: str, value: float) -> float:
        value = max(self._high.get(name, 0.0), value)
        self._high[name] = value
        return value

    def describe(self) -> list:
        return []

    def collect(self):
        s = self.sources
        if s.ingest_stats is not None:
            st = s.ingest_stats()
            yield CounterMetricFamily("streamtrain_records_consumed", "Records (Kafka messages) consumed.", value=st.messages)
            yield CounterMetricFamily("streamtrain_bytes_consumed", "Bytes of record values consumed.", value=st.bytes)
            yield CounterMetricFamily("streamtrain_samples_decoded", "Samples decoded from consumed records.", value=st.rows)
            rej = CounterMetricFamily(
                "streamtrain_records_rejected", "Records rejected and sent to the dead-letter topic, by reason.", labels=["reason"]
            )
            from streamtrain.streams.decode import REASONS

            for reason in REASONS:
                rej.add_metric([reason], st.rejected.get(reason, 0))
            yield rej
            missing = CounterMetricFamily(
                "streamtrain_missing_values",
                "Numbers read as missing (null, absent, an empty cell, an Arrow null) and imputed, by feature (data.missing: impute).",
                labels=["feature"],
            )
            for feature, n in sorted(st.missing.items()):
                missing.add_metric([feature], n)
            yield missing
            oor = CounterMetricFamily(
                "streamtrain_offset_out_of_range",
                "Times a partition's position was outside its offsets (kafka.on_out_of_range decides what follows).",
                labels=["topic", "partition"],
            )
            skipped = CounterMetricFamily(
                "streamtrain_records_skipped_out_of_range",
                "Records known to be skipped when a position was out of range (deleted by retention before they were trained).",
                labels=["topic", "partition"],
            )
            for key, n in sorted(st.out_of_range.items()):
                t, _, p = key.rpartition("|")
                oor.add_metric([t, p], n)
                skipped.add_metric([t, p], st.skipped_out_of_range.get(key, 0))
            yield oor
            yield skipped
            yield CounterMetricFamily("streamtrain_batches_formed", "Batches published to the ring.", value=st.batches)
            yield CounterMetricFamily("streamtrain_decode_seconds", "Time spent decoding consumed batches.", value=st.decode_seconds)
            if st.join is not None:
                yield from join_families(st.join)
        if s.dead_letter is not None:
            sent, failed, truncated, dropped = s.dead_letter()
            yield CounterMetricFamily("streamtrain_dead_letter_records", "Records written to the dead-letter topic.", value=sent)
            yield CounterMetricFamily(
                "streamtrain_dead_letter_failures", "Failed attempts to write to the dead-letter topic (retried).", value=failed
            )
            yield CounterMetricFamily(
                "streamtrain_dead_letter_truncated",
                "Dead letters written with their value cut to fit the topic (dead_letter.max_value_bytes; headers give the "
                "original size and sha256).",
                value=truncated,
            )
            yield CounterMetricFamily(
                "streamtrain_dead_letter_dropped",
                "Dead letters the topic refused for good (an invalid record): logged as errors with the record's coordinates, not retried.",
                value=dropped,
            )
        if s.lag is not None:
            lag = GaugeMetricFamily(
                "streamtrain_consumer_lag",
                "Records in the partition not yet trained (end offset - trained offset).",
                labels=["topic", "partition"],
            )
            for (t, p), v in sorted(s.lag().items()):
                lag.add_metric([t, str(p)], v)
            yield lag
        if s.trained_positions is not None:
            off = GaugeMetricFamily("streamtrain_trained_offset", "Next offset to train, per partition.", labels=["topic", "partition"])
            for (t, p), (o, _rows) in sorted(s.trained_positions().items()):
                off.add_metric([t, str(p)], o)
            yield off
        if s.ring is not None:
            filled, capacity = s.ring()
            yield GaugeMetricFamily("streamtrain_ring_filled_slots", "Ring slots holding batches waiting for the trainer.", value=filled)
            yield GaugeMetricFamily("streamtrain_ring_slots", "Ring capacity in slots.", value=capacity)
        if s.consumer is not None:
            paused, pauses, errors = s.consumer()
            yield GaugeMetricFamily(
                "streamtrain_consumer_paused", "1 while fetching is paused because the ring is full.", value=int(paused)
            )
            yield CounterMetricFamily("streamtrain_consumer_pauses", "Times fetching was paused because the ring was full.", value=pauses)
            err = CounterMetricFamily("streamtrain_kafka_errors", "Kafka client errors, by librdkafka error name.", labels=["error"])
            for name, count in sorted(errors.items()):
                err.add_metric([name], count)
            yield err
        if s.ready is not None:
            yield GaugeMetricFamily("streamtrain_ready", "1 when /readyz answers ready.", value=int(s.ready()))
        if s.learning is not None:
            yield from self._learning(s.learning())
        report = s.candidates() if s.candidates is not None else None
        if report:
            yield from candidate_families(report)

    def _learning(self, t: LearningTotals):
        names = ["samples", "loss", *(("abs_error", "squared_error") if t.task == "regression" else ("correct",))]
        for name in names:
            value = self._monotonic(name, getattr(t, name))
            yield CounterMetricFamily(f"streamtrain_prequential_{name}", _PREQUENTIAL[name], value=value)
        if t.task != "regression":
            yield from self._calibration(t)
        yield CounterMetricFamily(
            "streamtrain_drift_detected",
            "Concept drifts the detector found in the prequential error (drift.detector); continues across restarts.",
            value=self._monotonic("drifts", t.drifts),
        )
        yield GaugeMetricFamily(
            "streamtrain_drift_last_timestamp_seconds", "Unix time of the last drift detected; 0 before any.", value=t.last_drift
        )

    def _calibration(self, t: LearningTotals):
        bins = list(t.bins) or [0.0] * WIDTH
        _, predicted, positives, brier = totals(bins)
        values = {"brier": brier, **({"predicted_positive": predicted, "positives": positives} if t.task == "binary" else {})}
        for name, value in values.items():
            yield CounterMetricFamily(f"streamtrain_prequential_{name}", _PREQUENTIAL[name], value=self._monotonic(name, value))
        for k, part in enumerate(PARTS[:3]):
            help_ = _BINS[part]
            fam = CounterMetricFamily(f"streamtrain_prequential_calibration_bin_{part}", help_, labels=["bin"])
            for b, edge in enumerate(EDGES):
                fam.add_metric([edge], self._monotonic(f"bin_{part}_{edge}", bins[k * BINS + b]))
            yield fam
        gauge = GaugeMetricFamily(
            "streamtrain_prequential_calibration",
            "Cumulative calibration of the prequential predictions: brier, ece (10 bins), and for binary calibration_ratio "
            "(mean predicted / observed positive rate) and normalized_entropy (log loss / the base rate's entropy).",
            labels=["measure"],
        )
        for measure, value in measures(t.task, t.loss / t.samples if t.samples else math.nan, bins).items():
            if value is not None:
                gauge.add_metric([measure], value)
        yield gauge


class Health:
    """Liveness and readiness, decided from heartbeats the daemon updates."""

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self.heartbeat = time.monotonic()  # the training loop's last turn
        self.checks: dict[str, Callable[[], tuple[bool, str]]] = {}
        self.live_checks: dict[str, Callable[[], tuple[bool, str]]] = {}

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def live(self) -> tuple[bool, dict[str, str]]:
        out = {}
        ok = True
        age = time.monotonic() - self.heartbeat
        if age > self.stall_after_s:
            ok = False
            out["trainer"] = f"no turn of the training loop for {age:.0f} s"
        else:
            out["trainer"] = "ok"
        for name, check in self.live_checks.items():
            good, why = check()
            ok &= good
            out[name] = why
        return ok, out

    def ready(self) -> tuple[bool, dict[str, str]]:
        out = {}
        ok = True
        for name, check in self.checks.items():
            good, why = check()
            ok &= good
            out[name] = why
        return ok, out


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a small threaded HTTP server."""

    def __init__(self, metrics: Metrics, health: Health, host: str, port: int) -> None:
        self.metrics = metrics
        self.health = health
        handler = _make_handler(metrics, health)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="streamtrain-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics (health: /healthz, /readyz)", self.host, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(metrics: Metrics, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, detail = health.live() if path == "/healthz" else health.ready()
                body = json.dumps({"status": "ok" if ok else "fail", "checks": detail}).encode() + b"\n"
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
            pass

    return Handler
