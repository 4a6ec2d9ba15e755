"""The daemon's lifecycle: start the pieces, train until SIGTERM, stop cleanly.

SIGTERM or SIGINT: the current step finishes, reading stops, a final snapshot is
written and its offsets committed, and the process exits 0.  A second signal exits at
once (the last durable snapshot still holds a consistent state).  SIGUSR1 asks for a
snapshot now.

Exit codes: 0 clean stop, 1 a runtime failure (named in the log), 2 invalid
configuration, 3 the snapshot directory is locked by another process.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) each
process is one rank (``daemon/ranks.py``): it serves ``/metrics`` on ``metrics.port +
LOCAL_RANK``, and only rank 0 speaks to systemd and writes snapshots.  A signal to
torchrun reaches every rank; they stop at the same step and rank 0 writes the final
snapshot.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from streamtrain.config.schema import Config
from streamtrain.daemon.errors import ConfigError, SnapshotLockedError, StreamtrainError
from streamtrain.daemon.launch import report
from streamtrain.daemon.metrics import Health, Metrics, MetricsServer
from streamtrain.daemon.notify import Heartbeat, Notifier
from streamtrain.daemon.ranks import World
from streamtrain.daemon.trainer import Trainer
from streamtrain.streams.ingest import IngestStats
from streamtrain.streams.logs import setup_logging

log = logging.getLogger("streamtrain.service")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3


def run(cfg: Config) -> int:
    """Run the daemon with a validated config; returns the process exit code."""
    setup_logging(cfg.logging.level, cfg.logging.format)
    try:
        world = World.from_env()
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    report(world.rank, "started")  # to `streamtrain run --nproc-per-node`, when it launched this rank
    stop = threading.Event()
    metrics = Metrics()
    health = Health(cfg.metrics.stall_after_s)
    trainer = Trainer(cfg, metrics, stop, on_beat=health.beat, world=world)
    # systemd Type=notify; a no-op without $NOTIFY_SOCKET.  Several ranks: rank 0 speaks for them
    notifier = Notifier.from_env() if world.leader else Notifier.from_env({})
    _install_signals(stop, trainer)
    server = None
    code = EXIT_OK
    try:
        if world.ranked:
            log.info("%s (local rank %d)", world.label(), world.local_rank)
        if cfg.metrics.enabled:
            server = MetricsServer(metrics, health, cfg.metrics.host, cfg.metrics.port + world.local_rank)
            server.start()
        log.info("starting: topics %s at %s, model %s", ", ".join(cfg.kafka.topics), cfg.kafka.bootstrap_servers, cfg.model.name)
        notifier.status("starting: loading the model and the newest snapshot")
        trainer.setup()
        _wire(cfg, trainer, metrics, health)
        if notifier.enabled:  # READY=1 once ready, WATCHDOG=1 from the loop, STATUS= lines
            trainer.on_beat = Heartbeat(notifier, health.beat, health.ready, health.live, lambda: _status_line(trainer, health))
        trainer.train()
        log.info("stopping: finishing up (final snapshot, commit)")
    except ConfigError as exc:
        log.error("%s", exc)
        code = EXIT_CONFIG
    except SnapshotLockedError as exc:
        log.error("%s", exc)
        code = EXIT_LOCKED
    except StreamtrainError as exc:
        log.error("stopping after an error: %s", exc)
        code = EXIT_FAILURE
    except Exception:
        log.exception("stopping after an unexpected error")
        code = EXIT_FAILURE
    finally:
        notifier.stopping("stopping: final snapshot and commit" if code == EXIT_OK else f"stopping after an error (exit {code})")
        try:
            trainer.close()
        except Exception:
            log.exception("error while shutting down")
            code = code or EXIT_FAILURE
        if server is not None:
            server.close()
    log.info("stopped (exit %d) at step %d, %s samples trained", code, trainer.step_count, f"{trainer.samples:,}")
    # a failed collective is another rank's failure seen from here: the launcher names the rank that failed first
    report(world.rank, str(code), peer=bool(code) and trainer.coll is not None and trainer.coll.broken)
    if world.ranked:
        # A process group whose peers died can leave torch.distributed threads that hold the
        # interpreter's exit until torchrun's SIGKILL, 30 s later (seen after a failed start):
        # everything is closed and written by now, so leave at once.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _status_line(trainer: Trainer, health: Health) -> str:
    """The one line ``systemctl status`` shows."""
    line = f"step {trainer.step_count}, {trainer.samples:,} samples, loss ewma {trainer.loss_ewma:.4g}, lag {sum(trainer.lag().values()):,}"
    ok, checks = health.ready()
    return line if ok else f"{line}; not ready: " + ", ".join(f"{k}: {v}" for k, v in checks.items())


def _wire(cfg: Config, trainer: Trainer, metrics: Metrics, health: Health) -> None:
    """Point the scrape-time collector and the health checks at the running pieces."""
    ds = trainer.dataset
    src = metrics.scrape.sources

    def ingest_stats() -> IngestStats:
        ds.pump()  # take in the ingest process's latest report first
        return ds.stats

    src.ingest_stats = ingest_stats
    src.dead_letter = lambda: ds.dead_letter_counts
    src.lag = trainer.lag
    src.trained_positions = lambda: dict(trainer.trained)
    src.learning = trainer.learning_totals
    src.candidates = lambda: trainer.learner.report() if hasattr(trainer.learner, "report") else None  # trainer.candidates
    src.ring = lambda: (ds.ring.fill(), ds.ring.slots)

    def consumer() -> tuple[bool, int, dict[str, int]]:
        ds.pump()
        return ds.source.paused, ds.source.pauses, dict(ds.source.errors)

    src.consumer = consumer
    reach_within = max(15.0, 2 * cfg.kafka.metadata_refresh_s + 5.0)

    def kafka_ready() -> tuple[bool, str]:
        ds.pump()
        if not ds.connected:
            return False, f"connecting to {cfg.kafka.bootstrap_servers}"
        if not ds.source.assigned:
            return False, f"no partition of {', '.join(cfg.kafka.topics)} exists yet"
        if not ds.source.reachable(reach_within):
            return False, f"no answer from Kafka for over {reach_within:.0f} s"
        return True, f"{len(ds.source.assigned)} partition(s) assigned"

    def model_ready() -> tuple[bool, str]:
        return (True, "loaded") if trainer.ready else (False, "loading")

    def ingest_alive() -> tuple[bool, str]:
        return (True, "ok") if ds.reading else (False, "the ingest thread has stopped")

    health.checks.update({"model": model_ready, "kafka": kafka_ready})
    health.live_checks["ingest"] = ingest_alive
    src.ready = lambda: health.ready()[0]


# Under torchrun a stop can arrive twice at once: to the whole process group (a terminal's
# Ctrl-C, systemd) and forwarded by torchrun.  A second signal this soon is the same stop.
SAME_STOP_S = 2.0


def _install_signals(stop: threading.Event, trainer: Trainer) -> None:
    first: list[float] = []

    def on_stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            if trainer.world.ranked and time.monotonic() - first[0] < SAME_STOP_S:
                log.info("%s again (forwarded by torchrun): already stopping", name)
                return
            log.warning("second %s: exiting now; the last durable snapshot is kept", name)
            os._exit(EXIT_FAILURE)
        log.info("%s received: finishing the current step", name)
        first.append(time.monotonic())
        stop.set()

    def on_usr1(_signum: int, _frame: object) -> None:
        trainer.snapshot_requested.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_usr1)
