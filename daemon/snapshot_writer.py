"""Writes snapshots off the training thread, and the helpers that prepare the state for it.

The trainer's pause per snapshot is only :func:`state_to_host` (copying tensors to host
memory); serialization, fsyncs and pruning happen on the writer's thread.  Kafka
offsets are committed only once a snapshot is durable (docs/ARCHITECTURE.md), which is
what the ``on_durable`` callback is for; ``on_state`` then gets the state just written
(the trainer publishes its model for serving from it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from streamtrain.daemon.errors import SnapshotError
from streamtrain.daemon.snapshot import SnapshotInfo, SnapshotStore
from streamtrain.daemon.snapshot_state import _map_tensors

__all__ = ["SnapshotWriter", "state_to_host", "tensors_finite"]

log = logging.getLogger("streamtrain.snapshot")


class SnapshotWriter:
    """Writes snapshots off the training thread; one in flight at a time."""

    def __init__(
        self,
        store: SnapshotStore,
        on_durable: Callable[[SnapshotInfo, float], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_state: Callable[[SnapshotInfo, dict], None] | None = None,
    ) -> None:
        self.store = store
        self._on_durable = on_durable
        self._on_error = on_error
        self._on_state = on_state
        self._mutex = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False

    def busy(self) -> bool:
        """True while a write (and its ``on_durable`` callback) is in flight."""
        return not self._idle.is_set()

    def submit(self, state: dict, meta: dict) -> bool:
        """Start writing in the background; False (nothing done) if a write is in flight.

        ``state`` must not change while it is written: hand over :func:`state_to_host`'s copy.
        """
        with self._mutex:
            if self._closed:
                raise SnapshotError("the snapshot writer is closed")
            if not self._idle.is_set():
                return False
            self._idle.clear()
        try:
            threading.Thread(target=self._run, args=(state, meta), name="streamtrain-snapshot", daemon=True).start()
        except BaseException:
            self._idle.set()
            raise
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing is in flight; False if ``timeout`` passed first."""
        return self._idle.wait(timeout)

    def write_now(self, state: dict, meta: dict) -> SnapshotInfo:
        """Wait for any in-flight write, then write in the caller's thread (e.g. on SIGTERM)."""
        while True:
            with self._mutex:
                if self._closed:
                    raise SnapshotError("the snapshot writer is closed")
                if self._idle.is_set():
                    self._idle.clear()
                    break
            self._idle.wait()
        try:
            return self._write(state, meta)
        finally:
            self._idle.set()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new writes and wait for the one in flight (a cut-off write is discarded at next start)."""
        with self._mutex:
            self._closed = True
        if not self._idle.wait(timeout):
            log.warning("a snapshot write is still in flight after %s s; not waiting any longer", timeout)

    def _write(self, state: dict, meta: dict) -> SnapshotInfo:
        started = time.monotonic()
        info = self.store.write(state, meta)
        if self._on_durable is not None:
            self._on_durable(info, time.monotonic() - started)
        if self._on_state is not None:
            try:
                self._on_state(info, state)
            except Exception:  # the snapshot is durable: what is done with its state after must not undo that
                log.exception("the snapshot on_state callback failed")
        return info

    def _run(self, state: dict, meta: dict) -> None:
        try:
            if not tensors_finite(state):  # here, not on the training thread: ~4x the copy's time for 300 MB
                raise SnapshotError(f"not writing a snapshot with non-finite tensors (step {meta.get('step')})")
            self._write(state, meta)
        except BaseException as exc:  # a failed snapshot must not take the daemon down
            log.error("background snapshot write failed: %s", exc, exc_info=exc)
            if self._on_error is not None:
                try:
                    self._on_error(exc)
                except Exception:
                    log.exception("the snapshot on_error callback failed")
        finally:
            self._idle.set()


def state_to_host(obj: Any) -> Any:
    """Copy every tensor in nested dicts/lists/tuples to CPU so training can go on meanwhile.

    Non-tensor values are shared, not copied; OrderedDicts keep their ``_metadata``.
    """
    return _map_tensors(obj, lambda t: t.detach().to("cpu", copy=True))


def tensors_finite(obj: Any) -> bool:
    """True if every floating (or complex) tensor in the nested state is free of NaN/Inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            return bool(torch.isfinite(obj).all())
        return True
    if isinstance(obj, dict):
        return all(tensors_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(tensors_finite(v) for v in obj)
    return True
