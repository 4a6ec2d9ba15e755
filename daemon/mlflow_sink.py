"""MLflow (``publish.mlflow``): each published version logged as a model and registered; training metrics in a run.

Per published version (the champion's, under ``publish.name``): an MLflow logged model whose
artifact is the version directory and whose pyfunc takes raw records
(:mod:`streamtrain.serve.mlflow_model`), registered as a new version of
``publish.mlflow.registered_model`` with the snapshot step, the trained offsets and the
prequential summary as tags, the prequential summary also as the logged model's metrics, and
the alias ``champion`` moved to it.  Training metrics (every ``publish.mlflow.every_steps``
steps) go to one run per daemon start, which the logged models name as their source.

Like the dead-letter topic and the committer, MLflow never holds up training or the local
version: the trainer and the publisher only hand things over (a point appended, a version
hard-linked aside); one thread of its own talks to MLflow.  A failed try is counted
(``streamtrain_publish_failures_total{stage="mlflow"}``), logged, and tried again after
``retry_s``: only the newest version waiting is kept (a newer one replaces it), and the
newest ``MAX_POINTS`` training points.  ``mlflow`` is imported only here, and only when the
section is set.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from streamtrain.config.schema import MlflowConfig
from streamtrain.daemon.errors import ConfigError
from streamtrain.daemon.metrics import Metrics

__all__ = ["ALIAS", "MlflowSink"]

log = logging.getLogger("streamtrain.mlflow")

ALIAS = "champion"
MAX_POINTS = 100_000  # training points held while MLflow is away; the oldest go first
_BATCH = 1000  # metrics per log_batch request (MLflow's own limit)
_PARAMS = 100  # params per log_batch request (its limit)
_PARAM_CHARS = 6000  # the longest param value MLflow takes
_STAGING = ".mlflow-"  # <publish.dir>/<name>/.mlflow-<version>-*: a version's files, linked aside until logged


class MlflowSink:
    """Hands published versions and training points to MLflow on a thread of its own; see the module docstring."""

    def __init__(
        self,
        cfg: MlflowConfig,
        name: str,
        metrics: Metrics,
        about: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """``about``: the run's tags (``streamtrain.<key>``); ``settings``: config sections, the run's params (``trainer.lr``)."""
        try:
            import mlflow  # noqa: F401
        except ImportError as exc:
            raise ConfigError([f"publish.mlflow: {exc.name or exc} is not installed: pip install 'streamtrain[mlflow]'"]) from exc
        self.cfg = cfg
        self.name = name  # the repository's name: the pyfunc's model_config
        self.registered = cfg.registered_model or name
        self.metrics = metrics
        self.about = dict(about or {})  # the run's tags: what trains (model, data format, ...)
        self.params = flat_params(settings or {})
        self.run_id: str | None = None  # this start's run, once it has its params
        self._created: str | None = None  # the run, created
        self.experiment_id: str | None = None
        self.failures = 0  # tries that failed in a row (logged louder at the first)
        self._version: tuple[Path, dict] | None = None  # where it is linked aside (<staged>/<version>/), manifest
        self._points: collections.deque = collections.deque(maxlen=MAX_POINTS)
        self._busy = False
        self._closing = False  # close() called: one more try now, and what fails then is dropped
        self._closed = False
        self._done: dict[int, dict[str, str]] = {}  # version -> what of it MLflow has already (model_id, model_version)
        self._retry_at = 0.0
        self._now = False  # wait() asked for the points to go without waiting for the next flush
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="streamtrain-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ handing over (other threads)
    def version(self, directory: Path, manifest: dict) -> None:
        """Version ``directory`` (just published) goes to MLflow soon: its files are hard-linked aside first, so a prune
        of the repository before MLflow answers does not take them."""
        staged = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{manifest['version']}-", dir=directory.parent))
        try:
            shutil.copytree(directory, staged / directory.name, copy_function=_link_or_copy)  # the artifact: <version>/
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        with self._cond:
            replaced, self._version = self._version, (staged, manifest)
            self._cond.notify_all()
        if replaced is not None:
            shutil.rmtree(replaced[0], ignore_errors=True)
            log.info("version %d not logged to MLflow: version %d came before it was its turn", replaced[1]["version"], manifest["version"])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Training points at ``step`` for the run (the training thread: an append, nothing more)."""
        now = int(time.time() * 1000)
        points = [(k, float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(v)]
        with self._cond:
            idle = not self._points
            self._points.extend(points)
            if idle:
                self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Until the version handed over and the points so far are in MLflow; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._now = True  # points waiting: send them now, not at the next flush
            self._cond.notify_all()
            while self._busy or self._version is not None or self._points:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """One last try now for what is waiting (at most ``timeout`` seconds), end the run, and stop; what fails is logged as lost.

        A daemon stopping while MLflow is down stops at once: the try fails (no waiting out ``retry_s``) and drops it.
        """
        with self._cond:
            self._closing, self._retry_at = True, 0.0
        self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            version, points = self._version, len(self._points)
        if version is not None:
            shutil.rmtree(version[0], ignore_errors=True)
            log.warning("version %d was not logged to MLflow before shutdown (%s)", version[1]["version"], self.cfg.tracking_uri)
        if points:
            log.warning("%d training points were not logged to MLflow before shutdown", points)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        _client_settings(self.cfg)
        flush_every = 5.0
        last_flush = 0.0
        while True:
            with self._cond:
                while not self._closed:
                    if self._version is not None or (self._points and self._now):
                        ready_at = self._retry_at
                    elif self._points:
                        ready_at = max(self._retry_at, last_flush + flush_every)
                    else:
                        ready_at = None
                    now = time.monotonic()
                    if ready_at is not None and now >= ready_at:
                        break
                    self._cond.wait(None if ready_at is None else ready_at - now)
                if self._closed:
                    break
                version, points = self._version, list(self._points)
                self._version, self._now = None, False
                self._points.clear()
                self._busy = True
            try:
                self._send(version, points)
                last_flush = time.monotonic()
                if self.failures:
                    log.info("MLflow (%s) answers again after %d failed tries", self.cfg.tracking_uri, self.failures)
                self.failures = 0
            except Exception as exc:  # MLflow's errors are many (HTTP, REST, its stores): count, log, try again later
                self._failed(version, points, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        self._end_run()

    def _failed(self, version: tuple[Path, dict] | None, points: list, exc: Exception) -> None:
        self.failures += 1
        self.metrics.publish_failures.labels("mlflow").inc()
        with self._cond:
            if self._closing:  # the last try: nothing is kept for another
                if version is not None:
                    shutil.rmtree(version[0], ignore_errors=True)
                    log.warning("version %d was not logged to MLflow before shutdown: %s", version[1]["version"], _first_line(exc))
                if points:
                    log.warning("%d training points were not logged to MLflow before shutdown", len(points))
                return
            if version is not None and self._version is None:  # tried again, unless a newer one came meanwhile
                self._version = version
            elif version is not None:
                shutil.rmtree(version[0], ignore_errors=True)
            held = points[-(MAX_POINTS - len(self._points)) :] if len(self._points) < MAX_POINTS else []
            self._points.extendleft(reversed(held))
            self._retry_at = time.monotonic() + self.cfg.retry_s
        what = f"version {version[1]['version']}" if version is not None else f"{len(points)} training points"
        level = logging.WARNING if self.failures == 1 or self.failures % 10 == 0 else logging.INFO
        log.log(
            level,
            "could not log %s to MLflow at %s (try %d; again in %.3g s, training goes on): %s",
            what,
            self.cfg.tracking_uri,
            self.failures,
            self.cfg.retry_s,
            _first_line(exc),
        )

    def _send(self, version: tuple[Path, dict] | None, points: list) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(tracking_uri=self.cfg.tracking_uri, registry_uri=self.cfg.tracking_uri)
        self._ensure_run(client)
        while points:  # what was sent is not sent again after a failure
            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in points[:_BATCH]])
            del points[:_BATCH]
        if version is not None:
            self._log_version(client, *version)
            shutil.rmtree(version[0], ignore_errors=True)

    def _ensure_run(self, client) -> None:
        """The experiment (created when missing) and this daemon start's run with its params, once."""
        from mlflow.entities import Param

        if self.run_id is not None:
            return
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            try:
                self.experiment_id = client.create_experiment(self.cfg.experiment)
            except Exception:  # another daemon created it meanwhile
                experiment = client.get_experiment_by_name(self.cfg.experiment)
                if experiment is None:
                    raise
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        tags = {"streamtrain.name": self.name, "mlflow.source.type": "JOB", **{f"streamtrain.{k}": v for k, v in self.about.items()}}
        if self._created is None:  # a retry after the params failed goes on with the run it created
            run = client.create_run(self.experiment_id, run_name=f"{self.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
            self._created = run.info.run_id
        params = [Param(k, v) for k, v in self.params.items()]
        for i in range(0, len(params), _PARAMS):
            client.log_batch(self._created, params=params[i : i + _PARAMS])
        self.run_id = self._created
        log.info("MLflow run %s in experiment %s (%s)", self.run_id, self.cfg.experiment, self.cfg.tracking_uri)

    def _log_version(self, client, staged: Path, manifest: dict) -> None:
        """One version: a logged model (the pyfunc over the version's files), registered, the alias moved to it."""
        import mlflow
        from mlflow.entities import Metric

        from streamtrain.serve import mlflow_model

        started = time.monotonic()
        version, tags = manifest["version"], version_tags(manifest)
        done = self._done.setdefault(version, {})  # a retry goes on from the step that failed: no second model or version
        if "model_id" not in done:
            mlflow.set_tracking_uri(self.cfg.tracking_uri)  # the fluent log_model reads the process's URI: this thread sets it
            logged = mlflow.initialize_logged_model(
                name=f"{self.name}-{version}", source_run_id=self.run_id, tags=tags, experiment_id=self.experiment_id
            )
            mlflow.pyfunc.log_model(
                model_id=logged.model_id,
                python_model=mlflow_model.ENTRY,  # a file MLflow copies into the model, not a pickled object
                artifacts={mlflow_model.ARTIFACT: str(staged / str(version))},
                model_config={"name": self.name},
                pip_requirements=_requirements(),  # given: inferring them would load the model in a subprocess
                metadata={"streamtrain": {k: manifest.get(k) for k in ("version", "step", "snapshot", "created", "samples")}},
            )
            summary = {k: v for k, v in (manifest.get("prequential") or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
            now = int(time.time() * 1000)
            metrics = [Metric(f"prequential.{k}", float(v), now, version, model_id=logged.model_id) for k, v in summary.items()]
            if metrics:
                client.log_batch(self.run_id, metrics=metrics)
            done["model_id"] = logged.model_id
        registered = self._registered_model(client)
        if "version" not in done:
            model_id = done["model_id"]
            mv = client.create_model_version(registered, source=f"models:/{model_id}", run_id=self.run_id, tags=tags, model_id=model_id)
            done["version"] = mv.version
        client.set_registered_model_alias(registered, ALIAS, done["version"])
        self._done = {}  # versions only grow: none before this one is tried again
        self.metrics.mlflow_versions.inc()
        log.info(
            "version %d is MLflow model version %s of %s (alias %s) in %.2f s",
            version,
            done["version"],
            registered,
            ALIAS,
            time.monotonic() - started,
        )

    def _registered_model(self, client) -> str:
        from mlflow.exceptions import MlflowException

        try:
            client.get_registered_model(self.registered)
        except MlflowException:
            try:
                client.create_registered_model(self.registered, tags={"streamtrain.name": self.name})
            except MlflowException:  # created meanwhile by another daemon
                client.get_registered_model(self.registered)
        return self.registered

    def _end_run(self) -> None:
        if self._created is None:
            return
        try:
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=self.cfg.tracking_uri).set_terminated(self._created, "FINISHED")
        except Exception as exc:
            log.warning("could not end MLflow run %s: %s", self._created, _first_line(exc))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def flat_params(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"trainer": {"lr": 0.01}}`` -> ``{"trainer.lr": "0.01"}``; lists as JSON, values cut to what MLflow takes."""
    out: dict[str, str] = {}
    for k, v in settings.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{key}."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:_PARAM_CHARS]
    return out


def version_tags(manifest: dict) -> dict[str, str]:
    """A version's tags in MLflow: its step and snapshot, the trained offsets, the prequential summary."""
    tags = {
        "streamtrain.step": str(manifest["step"]),
        "streamtrain.snapshot": str(manifest.get("snapshot")),
        "streamtrain.samples": str(manifest.get("samples")),
    }
    for p in manifest.get("positions") or ():
        tags[f"streamtrain.offset.{p['topic']}.{p['partition']}"] = str(p["offset"])
    for k, v in (manifest.get("prequential") or {}).items():
        tags[f"streamtrain.prequential.{k}"] = str(v)
    return tags


def cleanup_staging(directory: Path) -> None:
    """Versions linked aside by a daemon that stopped before MLflow took them (``<publish.dir>/<name>/.mlflow-*``)."""
    for p in directory.glob(f"{_STAGING}*"):
        shutil.rmtree(p, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("streamtrain", "torch", "numpy", "mlflow"):
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            out.append(dist)
    return out


def _client_settings(cfg: MlflowConfig) -> None:
    """A failed request fails the try quickly (this thread retries after retry_s), unless the environment says otherwise."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(cfg.timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
