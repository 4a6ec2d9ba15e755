"""The ingest loop in its own process: ``python -m streamtrain.streams.ingest_process``.

The child runs the same :class:`streams.ingest.Ingest` as the thread mode -- source,
decoder, dead-letter producer -- writing into a :class:`streams.shared_ring.ChildRing`.
It imports no torch, so it starts in a fraction of a second.  It is started as a plain
subprocess (not ``multiprocessing``), so the daemon's ``__main__`` is never imported
again in the child.

The child ignores SIGTERM and SIGINT: a signal to the whole process group (``systemctl
stop`` with ``KillMode=control-group``, a supervisor, Ctrl-C in a terminal) reaches the
daemon, which finishes its step, stops the child by closing its control pipe, and writes
its final snapshot.  If the daemon dies, the pipe's end stops the child all the same.

The parent keeps :class:`IngestProcess`: it starts and stops the child and mirrors what
the metrics and health checks read (assignment, pauses, watermarks, reachability,
counters) from the status the child sends four times a second.  Offsets are committed
from the parent through a consumer of its own, so a commit never waits on the child.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, fields
from typing import Any

from streamtrain.streams.config import DataConfig, DeadLetterConfig, KafkaConfig, RingConfig
from streamtrain.streams.decode import LabelRule
from streamtrain.streams.ingest import IngestStats
from streamtrain.streams.join import JoinStats
from streamtrain.streams.quarantine import keep_crashed_marker
from streamtrain.streams.shared_ring import SharedRing
from streamtrain.streams.slots import Position
from streamtrain.streams.slots import TopicPartition as TP
from streamtrain.streams.source import KafkaSource
from streamtrain.streams.split import EVERYTHING, Share

log = logging.getLogger("streamtrain.ingest")

STATUS_EVERY_S = 0.25
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class SourceMirror:
    """The parent's view of the child's consumer: what metrics, lag and /readyz read.

    Plain values, as of the last status taken in: readers call the dataset's ``pump()``
    first (the training loop takes statuses in between steps anyway).
    """

    def __init__(self, kafka: KafkaConfig, client_id: str) -> None:
        self.assigned: dict[TP, int] = {}
        self.paused = False
        self.pauses = 0
        self.errors: dict[str, int] = {}
        self._hwm: dict[TP, int] = {}
        self._last_ok = 0.0
        self._committer = KafkaSource(kafka, client_id)  # commits only; never assigned

    def update(self, s: dict[str, Any]) -> None:
        self.assigned = {(t, p): o for t, p, o in s["assigned"]}
        self._hwm = {(t, p): h for t, p, h in s["hwm"]}
        self.paused, self.pauses, self.errors = s["paused"], s["pauses"], s["errors"]
        if s["ok_age"] is not None:
            self._last_ok = time.monotonic() - s["ok_age"]

    def high_watermarks(self) -> dict[TP, int]:
        return dict(self._hwm)

    def reachable(self, within: float) -> bool:
        return time.monotonic() - self._last_ok < within

    def commit(self, positions: dict[TP, Position], timeout: float = 10.0) -> None:
        self._committer.open_for_commits()
        self._committer.commit(positions, timeout)

    def close(self) -> None:
        self._committer.close()


class IngestProcess:
    """Starts, watches and stops the ingest child; the same surface the dataset uses of :class:`Ingest`."""

    def __init__(
        self,
        kafka: KafkaConfig,
        data: DataConfig,
        ring_config: RingConfig,
        dead_letter: DeadLetterConfig,
        label_rule: LabelRule,
        ring: SharedRing,
        positions: dict[TP, Position],
        stats: IngestStats,
        dead_letter_counts: list[int],
        client_id: str = "streamtrain",
        share: Share = EVERYTHING,
        lock: threading.Lock | None = None,
        markers: str | None = None,
        done: dict | None = None,
    ) -> None:
        self.ring = ring
        self.source = SourceMirror(kafka, client_id)
        self.stats = stats
        self.opened = threading.Event()
        self._dl_counts = dead_letter_counts  # DeadLetterQueue.counts(), cumulative over restarts (the dataset's)
        self._last_child: dict[str, Any] = {"stats": asdict(IngestStats()), "dead_letter": [0, 0, 0, 0]}
        self._lock = lock or threading.Lock()  # shared by the workers folding into the same counters
        self._params = {
            "kafka": kafka,
            "data": data,
            "ring_config": ring_config,
            "dead_letter": dead_letter,
            "label_rule": label_rule,
            "positions": dict(positions),
            "client_id": client_id,
            "share": share,
            "markers": markers,
            "done": done or {},
            "geometry": (ring.slots, ring.batch_size, ring.width, ring.fields),
            "log": (logging.getLogger("streamtrain").getEffectiveLevel(), os.environ.get("STREAMTRAIN_LOG_FORMAT", "text")),
        }
        self.proc: subprocess.Popen | None = None
        self._stopping = False

    def start(self) -> None:
        ann_r, ann_w = os.pipe()  # child -> parent: batches, status, errors
        give_r, give_w = os.pipe()  # parent -> child: given-back slots, one byte each
        ctl_r, ctl_w = os.pipe()  # parent -> child: the parameters; then its EOF means stop
        child_fds = (self.ring.fd, ann_w, give_r, ctl_r)
        # The child leaves stopping to us: a SIGTERM or SIGINT to the whole process group
        # (systemctl stop, a supervisor, Ctrl-C) must not kill it mid-batch.  It starts with
        # them blocked (the mask is inherited through exec), ignores them, then unblocks.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamtrain.streams.ingest_process", *map(str, child_fds)],
                pass_fds=child_fds,
                close_fds=True,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for fd in (ann_w, give_r, ctl_r):
            os.close(fd)
        self._control = os.fdopen(ctl_w, "wb")
        pickle.dump(self._params, self._control)
        self._control.flush()
        self.ring.on_status = self._on_status
        self.ring.on_end = self._on_end
        self.ring.connect(ann_r, give_w)
        log.debug("ingest process %d started", self.proc.pid)

    def _on_status(self, s: dict[str, Any]) -> None:
        """Fold the child's counters (which start at zero in each child) into the cumulative ones."""
        with self._lock:
            prev = self._last_child
            for f in fields(IngestStats):
                new, old = s["stats"][f.name], prev["stats"][f.name]
                if f.name == "join":
                    if new is not None:
                        self.stats.join = self.stats.join or JoinStats()
                        _fold(self.stats.join, new, old or asdict(JoinStats()))
                elif isinstance(new, dict):
                    total = getattr(self.stats, f.name)
                    for k, v in new.items():
                        total[k] = total.get(k, 0) + v - old.get(k, 0)
                else:
                    setattr(self.stats, f.name, getattr(self.stats, f.name) + new - old)
            for i, (new, old) in enumerate(zip(s["dead_letter"], prev["dead_letter"])):
                self._dl_counts[i] += new - old
            self._last_child = s
        self.source.update(s["source"])
        if s["opened"]:
            self.opened.set()

    def _on_end(self) -> BaseException | None:
        """The child's announcements ended: an error if it was not asked to stop."""
        from streamtrain.streams.errors import StreamtrainError

        proc = self.proc
        if proc is None or self._stopping:
            return None
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            code = "still running"
        if code != 0:  # a crash while decoding: the next start checks those records first (streams/quarantine.py)
            keep_crashed_marker(self._params["markers"], self._params["share"], f"exit code {code}")
        return StreamtrainError(f"the ingest process exited unexpectedly (exit code {code}); see the log above")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.ring.error is None

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or self._stopping:  # not started, or stopped already
            return
        self._stopping = True
        self._control.close()  # EOF: the child stops reading, closes its clients, exits
        self.ring.detach()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("ingest process %d did not stop within %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.wait(10)
        else:
            if code != 0:  # killed by a signal, say: its clients were not closed cleanly
                log.warning("the ingest process %d ended with exit code %s while being stopped", proc.pid, code)
        self.source.close()

    def close(self) -> None:
        """Stop the child (it closes its own clients); the mirror's committer too."""
        self.stop()

    def pump(self) -> None:
        """Take in the child's latest status (the trainer does this between steps; readers call it too)."""
        self.ring.pump()


# ---------------------------------------------------------------------------- the child
def _batch_scheduling() -> None:
    """SCHED_BATCH for this process and the threads it starts (librdkafka's too).

    A wake-up of the ingest process (a slot given back, a fetch arriving) then does not
    preempt the trainer on its core; the ingest still gets its full share of CPU.
    """
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:  # pragma: no cover - refused by a seccomp profile, say
            log.debug("SCHED_BATCH refused: %s", exc)


def _child(ring_fd: int, ann_fd: int, give_fd: int, control_fd: int) -> int:
    control = os.fdopen(control_fd, "rb")
    p = pickle.load(control)
    level, fmt = p["log"]
    from streamtrain.streams.logs import setup_logging  # stdlib only: the child logs like the daemon

    setup_logging(logging.getLevelName(level), fmt)
    _batch_scheduling()
    from streamtrain.streams.deadletter import DeadLetterQueue
    from streamtrain.streams.ingest import Ingest
    from streamtrain.streams.shared_ring import ChildRing

    slots, batch_size, width, fields = p["geometry"]
    ring = ChildRing(ring_fd, slots, batch_size, width, ann_fd, give_fd, fields)
    kafka, rc = p["kafka"], p["ring_config"]
    source = KafkaSource(kafka, p["client_id"], share=p["share"])
    dlq = DeadLetterQueue(kafka, p["dead_letter"])
    ingest = Ingest.from_config(
        source, dlq, ring, kafka, p["data"], rc, p["label_rule"], p["positions"], markers=p["markers"], done=p["done"]
    )
    # Say "open, assigned" before the first batch: the trainer may train records the moment
    # they come, and /readyz must not answer "connecting" meanwhile (seen in CI).
    ingest.on_opened = lambda: ring.send(("status", _status(ingest, source, dlq)))
    ingest.start()
    try:
        # the control pipe's EOF (a stop, or the daemon gone) ends the loop
        while ingest.alive and not select.select([control], [], [], STATUS_EVERY_S)[0]:
            ring.send(("status", _status(ingest, source, dlq)))
    finally:
        ingest.stop()
        dlq.close()
        source.close()
        ring.send(("status", _status(ingest, source, dlq)))
        ring.send(("closed",))
    return 0


def _fold(total: Any, new: dict[str, Any], old: dict[str, Any]) -> None:
    """Add one child's change of the join's numbers (counters and gauges alike: the workers' sum) into ``total``."""
    for name, v in new.items():
        was = old.get(name)
        cur = getattr(total, name)
        if isinstance(v, dict):
            for k, x in v.items():
                cur[k] = cur.get(k, 0) + x - (was or {}).get(k, 0)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                cur[i] += x - (was[i] if was else 0)
        else:
            setattr(total, name, cur + v - (was or 0))


def _status(ingest: Any, source: KafkaSource, dlq: Any) -> dict[str, Any]:
    ok_age = time.monotonic() - source._last_ok if source._last_ok else None
    return {
        "stats": asdict(ingest.stats),
        "dead_letter": list(dlq.counts()),
        "opened": ingest.opened.is_set(),
        "source": {
            "assigned": [[t, p, o] for (t, p), o in source.assigned.items()],
            "hwm": [[t, p, h] for (t, p), h in source.high_watermarks().items()],
            "paused": source.paused,
            "pauses": source.pauses,
            "errors": dict(source.errors),
            "ok_age": ok_age,
        },
    }


def _leave_stopping_to_the_parent() -> None:
    """Ignore SIGTERM/SIGINT (the parent stops us by closing the control pipe; its death closes it too)."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


if __name__ == "__main__":
    _leave_stopping_to_the_parent()
    sys.exit(_child(*map(int, sys.argv[1:5])))
