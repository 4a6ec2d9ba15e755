"""Publishes durable snapshots' models as versions for serving, on a thread of its own.

After a snapshot is durable the writer thread hands its state here (``publish.dir`` set).
The model is exported as ``daemon/export.py`` does for ``snapshots export`` (the
``state_dict`` with its sidecar, and the ``torch.export`` program) into
``<publish.dir>/<publish.name>/<step>/``, written atomically by
:func:`streamtrain.serve.repository.write_version`; the newest ``publish.keep`` stay.
With ``publish.topic`` a record per version (key = the name) tells serving fleets about
it without polling.  With ``publish.candidates`` each candidate that is not the champion
is published too, as ``<publish.name>.<candidate>`` (its name made a path component), from
the same snapshot and at the same version: a shadow server can answer with it beside the
champion's.  With ``publish.mlflow`` each champion version is handed on to MLflow
(:mod:`streamtrain.daemon.mlflow_sink`, a thread of its own) once it is in the repository.

Like the committer, nothing here may hold up training or snapshots: exporting takes tens
of milliseconds to seconds, and a slow disk longer.  Only the newest snapshot waiting
matters (a newer one replaces one not yet published); a failure is counted and logged,
and training goes on.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streamtrain.config.schema import PublishConfig
from streamtrain.daemon.errors import ConfigError
from streamtrain.daemon.export import export_model
from streamtrain.daemon.metrics import Metrics
from streamtrain.daemon.mlflow_sink import MlflowSink, cleanup_staging
from streamtrain.daemon.newest import NewestOnly
from streamtrain.daemon.snapshot import SnapshotInfo
from streamtrain.serve.repository import VersionExistsError, cleanup_debris, list_versions, prune, write_version
from streamtrain.streams.config import KafkaConfig
from streamtrain.streams.source import client_settings, make_client

__all__ = ["Publisher"]

log = logging.getLogger("streamtrain.publish")

# what the export reads of a snapshot's state; the rest (optimizer, RNG) is not held on to
_EXPORTED = ("model", "normalizer", "target", "calibration")


def shadow_name(name: str, candidate: str) -> str:
    """``model`` and ``lr=0.003,hidden=[128]`` -> ``model.lr_0.003_hidden_128``: a candidate's name in the repository."""
    return f"{name}.{re.sub(r'[^A-Za-z0-9._-]+', '_', candidate).strip('_.') or 'candidate'}"


class Publisher:
    """Turns durable snapshots into versions in the model repository; see the module docstring."""

    def __init__(
        self,
        cfg: PublishConfig,
        kafka: KafkaConfig,
        metrics: Metrics,
        about: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """``about`` (what trains: model, task, format) and ``settings`` (config sections): the MLflow run's tags and params."""
        assert cfg.dir is not None, "publish.dir is not set: nothing to publish"
        self.cfg = cfg
        self.kafka = kafka
        self.metrics = metrics
        self.root = Path(cfg.dir)
        self._durable = 0  # durable snapshots seen, for publish.every_snapshots
        self._producer: Producer | None = None
        self._topic_ready = False
        if cfg.onnx:
            from streamtrain.models.onnx_export import available

            why = available()
            if why is not None:
                raise ConfigError([f"publish.onnx: {why}"])
        self.mlflow: MlflowSink | None = None
        if cfg.mlflow.tracking_uri:
            cleanup_staging(self.root / cfg.name)
            self.mlflow = MlflowSink(cfg.mlflow, cfg.name, metrics, about, settings)
        self.newests: dict[str, int] = {}  # by name in the repository: the newest version there (versions only grow)
        self.newest = self._newest(cfg.name)
        if self.newest >= 0:
            metrics.published_version.set(self.newest)
        self._worker = NewestOnly("streamtrain-publisher", lambda item: self.publish(*item), self._failed)

    def durable(self, info: SnapshotInfo, state: dict[str, Any], final: bool = False) -> None:
        """Snapshot ``info`` (with ``state``, not to be changed) is durable: publish it soon, if it is its turn.

        Every ``publish.every_snapshots``-th one, and the ``final`` one at shutdown.
        """
        self._durable += 1
        if not final and self._durable % self.cfg.every_snapshots:
            return
        exported = {k: state[k] for k in _EXPORTED if k in state}
        if self.cfg.candidates and "candidates" in state:  # the others' models, from the same snapshot
            others = state["candidates"]["states"]
            exported["candidates"] = {n: {k: sub[k] for k in _EXPORTED if k in sub} for n, sub in others.items()}
        replaced = self._worker.submit((info, exported))
        if replaced is not None:
            self.metrics.publish_skipped.labels("superseded").inc()
            log.info("snapshot %s not published: %s came before it was its turn", replaced[0].name, info.name)

    def wait(self, timeout: float) -> bool:
        """Until everything handed over is published (or has failed); False if ``timeout`` passed first."""
        return self._worker.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Give the last publish ``timeout`` seconds, then stop (an abandoned one leaves only debris, removed at next start)."""
        if not self._worker.close(timeout):
            log.warning("the last model publish did not finish within %.0f s; the repository keeps the versions before it", timeout)
        elif self._producer is not None:
            self._producer.flush(5.0)
        if self.mlflow is not None:
            self.mlflow.close(self.cfg.mlflow.timeout_s)

    @staticmethod
    def _failed(item: tuple[SnapshotInfo, dict[str, Any]], exc: Exception) -> None:
        log.error("publishing snapshot %s failed unexpectedly", item[0].name, exc_info=exc)

    def _newest(self, name: str) -> int:
        if name not in self.newests:
            cleanup_debris(self.root, name)
            versions = list_versions(self.root, name)
            self.newests[name] = versions[0].version if versions else -1
        return self.newests[name]

    def publish(self, info: SnapshotInfo, state: dict[str, Any]) -> dict | None:
        """Write version ``info.step`` now (on the calling thread); returns its manifest, or None if skipped or failed.

        Then (``publish.candidates``) each other candidate's, under its own name; what becomes of those is logged and
        counted as for the champion, and does not change what this returns.
        """
        manifest = self._publish_as(self.cfg.name, info, state)
        if manifest is not None:
            self.newest = manifest["version"]
            self.metrics.published_version.set(self.newest)
            if self.mlflow is not None:
                self._to_mlflow(manifest)
        others = (info.meta.get("candidates") or {}).get("others", {})
        for candidate, sub in state.get("candidates", {}).items():
            if candidate in others:  # the model and trainer sections it was built and trained with
                config = {**info.meta["config"], **others[candidate]}
                meta = {**info.meta, "model": config["model"]["name"], "config": config}
                self._publish_as(
                    shadow_name(self.cfg.name, candidate), SnapshotInfo(info.path, info.name, info.step, info.created, meta), sub
                )
        return manifest

    def _to_mlflow(self, manifest: dict) -> None:
        try:
            self.mlflow.version(self.root / self.cfg.name / str(manifest["version"]), manifest)
        except OSError as exc:  # linking the files aside failed (the disk): the version stays local only
            self.metrics.publish_failures.labels("mlflow").inc()
            log.error("version %d of %s is in the repository, but not handed to MLflow: %s", manifest["version"], self.cfg.name, exc)

    def _write_onnx(self, name: str, info: SnapshotInfo, state: dict[str, Any], tmp: Path) -> None:
        """model.onnx, checked; a model that does not export, or does not match torch, is published without it."""
        from streamtrain.models.onnx_export import OnnxMismatch

        try:
            export_model(info, state, tmp / "model.onnx", "onnx")
        except Exception as exc:  # the exporter's errors are many and its own; the version goes out without ONNX
            for f in (tmp / "model.onnx", tmp / "model.onnx.json", tmp / "model.onnx.data"):
                f.unlink(missing_ok=True)
            self.metrics.publish_failures.labels("onnx").inc()
            what = "does not match torch" if isinstance(exc, OnnxMismatch) else "could not be exported as ONNX"
            log.warning("version %d of %s is published without model.onnx: the model %s (%s)", info.step, name, what, str(exc)[:500])

    def _publish_as(self, name: str, info: SnapshotInfo, state: dict[str, Any]) -> dict | None:
        cfg, version = self.cfg, info.step
        newest = self._newest(name)
        if version <= newest:
            self.metrics.publish_skipped.labels("not_newer").inc()
            log.info("snapshot %s not published as %s: version %d is not newer than %d in the repository", info.name, name, version, newest)
            return None
        started = time.monotonic()

        def write_files(tmp: Path) -> None:
            export_model(info, state, tmp / "model.pt", "state_dict")
            if cfg.program:
                export_model(info, state, tmp / "model.pt2", "program")
            if cfg.onnx:
                self._write_onnx(name, info, state, tmp)

        meta = info.meta
        about = {
            "step": version,
            "snapshot": info.name,
            "created": info.created,
            "samples": meta.get("samples"),
            "positions": [{"topic": t, "partition": p, "offset": o, "rows": r} for t, p, o, r in meta.get("positions", [])],
            "prequential": meta.get("prequential"),
        }
        try:
            manifest = write_version(self.root, name, version, write_files, about)
        except VersionExistsError:
            self.metrics.publish_skipped.labels("not_newer").inc()
            log.info("snapshot %s not published as %s: version %d is in the repository already", info.name, name, version)
            return None
        except Exception as exc:  # a failed publish is counted and logged; training goes on
            self.metrics.publish_failures.labels("write").inc()
            log.error("could not publish snapshot %s as version %d of %s: %s", info.name, version, name, exc)
            return None
        self.newests[name] = version
        seconds = time.monotonic() - started
        pruned = prune(self.root, name, cfg.keep, protect=version)
        self.metrics.models_published.inc()
        self.metrics.publish_duration.observe(seconds)
        log.info(
            "published version %d of %s in %.2f s (%s)%s",
            version,
            name,
            seconds,
            self.root / name / str(version),
            f"; pruned {', '.join(map(str, pruned))}" if pruned else "",
        )
        if cfg.topic:
            self._announce(name, manifest)
        return manifest

    # ------------------------------------------------------------------ the topic
    def _announce(self, name: str, manifest: dict) -> None:
        """One record on ``publish.topic``: key = the name, value = where the version is and what it holds."""
        cfg = self.cfg
        files = manifest["files"]
        value = {
            "name": name,
            "version": manifest["version"],
            "path": f"{name}/{manifest['version']}",
            "dir": str((self.root / name / str(manifest["version"])).resolve()),
            "sha256": files["model.pt"]["sha256"],
            "files": {f: e["sha256"] for f, e in files.items()},
            **{k: manifest[k] for k in ("step", "snapshot", "created", "samples", "positions", "prequential", "published")},
        }
        try:
            if self._producer is None:
                settings = {**client_settings(self.kafka, "streamtrain-publish"), "acks": "all", "linger.ms": 0}
                self._producer = make_client(Producer, settings, "kafka.settings", logger=log)
            self._ensure_topic()
            errors: list[KafkaError] = []
            self._producer.produce(
                cfg.topic, json.dumps(value).encode(), name.encode(), on_delivery=lambda err, _m: err and errors.append(err)
            )
            left = self._producer.flush(30.0)
            if errors or left:
                raise RuntimeError(errors[0].str() if errors else "no acknowledgement within 30 s")
        except Exception as exc:
            self.metrics.publish_failures.labels("topic").inc()
            log.error("version %d of %s is in the repository, but telling %s failed: %s", manifest["version"], name, cfg.topic, exc)

    def _ensure_topic(self) -> None:
        """Create ``publish.topic`` compacted (one partition) when it does not exist; leave an existing one alone."""
        if self._topic_ready:
            return
        admin = AdminClient(client_settings(self.kafka, "streamtrain-publish-admin"))
        md = admin.list_topics(self.cfg.topic, timeout=10).topics.get(self.cfg.topic)
        if md is None or md.error is not None:
            topic = NewTopic(self.cfg.topic, 1, -1, config={"cleanup.policy": "compact"})
            try:
                admin.create_topics([topic])[self.cfg.topic].result(10)
                log.info("created the compacted topic %s for published versions", self.cfg.topic)
            except Exception as exc:
                err = exc.args[0] if exc.args else None
                if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                    log.warning("could not create %s (%s); producing to it anyway", self.cfg.topic, exc)
        self._topic_ready = True
