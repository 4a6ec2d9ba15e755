"""Hot reload: watch the repository, load a new version beside the served one, validate it, swap.

The served version is one reference, :attr:`ModelWatcher.current`; a request reads it
once and uses that model to the end, so a swap never waits for requests and requests
never wait for a reload (no lock is shared between them).  The version served is the
newest complete one that validates.  The one it replaced is kept loaded: if the served
version leaves the repository (an operator deleting a bad one), the watcher goes back to
the newest remaining one, at once when that is the one kept.  A version that fails
validation is refused, counted and logged once; the served one goes on.  It is tried
again only if its files change (a copy that was still going on, a repaired directory).
An empty repository never takes the served version away.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from streamtrain.serve.metrics import ServeMetrics
from streamtrain.serve.model import ServedModel, VersionRefused, load_version
from streamtrain.serve.repository import Version, list_versions

__all__ = ["ModelWatcher"]

log = logging.getLogger("streamtrain.serve")


class ModelWatcher:
    """Keeps :attr:`current` at the newest valid version of ``name`` under ``root``; see the module docstring."""

    def __init__(
        self, root: str | os.PathLike[str], name: str, metrics: ServeMetrics, poll_s: float = 1.0, runtime: str = "torch", threads: int = 1
    ) -> None:
        self.root = Path(root)
        self.name = name
        self.metrics = metrics
        self.poll_s = poll_s
        self.runtime = runtime  # torch, or onnx: each version's model.onnx in onnxruntime
        self.threads = threads
        self.current: ServedModel | None = None
        self.previous: ServedModel | None = None
        self.refused: dict[int, tuple[tuple, str]] = {}  # version -> (its files when refused, why)
        self.last_error: str | None = None
        self.polls = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamtrain-serve-watcher", daemon=True)
        metrics.state.current = lambda: self.current

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def nudge(self) -> None:
        """Look now rather than at the next poll (a record on the publish topic said a version is there)."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # the watcher must outlive a bad scan: the served version goes on
                self.last_error = str(exc)
                log.exception("scanning %s failed", self.root / self.name)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def check(self) -> ServedModel | None:
        """One scan: swap in the newest valid version if it is not the one served; returns the one served after."""
        self.polls += 1
        current = self.current
        for v in list_versions(self.root, self.name):
            if current is not None and v.version == current.version:
                return current  # nothing newer that validates
            files = _files(v)
            if files is None:
                continue  # gone meanwhile (pruned)
            refused = self.refused.get(v.version)
            if refused is not None and refused[0] == files:
                continue
            if self.previous is not None and v.version == self.previous.version:
                model = self.previous
            else:
                try:
                    model = load_version(v.path, self.name, self.runtime, self.threads)
                except VersionRefused as exc:
                    if _files(v) is None:
                        continue  # pruned while it was read: not its fault
                    self.refused[v.version] = (files, str(exc))
                    self.metrics.refused.inc()
                    self.last_error = f"version {v.version}: {exc}"
                    log.error("refusing version %d of %s (%s); still serving %s", v.version, self.name, exc, _name(current))
                    continue
            self._swap(model, current)
            return model
        return current  # nothing valid in the repository, or only older versions and the served one is still there

    def _swap(self, model: ServedModel, current: ServedModel | None) -> None:
        self.current = model  # one reference: requests that began before go on with the one they took
        self.previous = current if current is not model else self.previous
        self.refused.pop(model.version, None)
        self.metrics.reloads.inc()
        if current is not None and model.version < current.version:
            self.metrics.rollbacks.inc()
            log.warning("version %d of %s left the repository; back to version %d", current.version, self.name, model.version)
        else:
            log.info("serving version %d of %s (was %s)", model.version, self.name, _name(current))


def _files(v: Version) -> tuple | None:
    """What a version directory holds now (names, sizes, mtimes), or None once it is gone."""
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(v.path)))
    except FileNotFoundError:
        return None


def _name(m: ServedModel | None) -> str:
    return "nothing yet" if m is None else f"version {m.version}"
