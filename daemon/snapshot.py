"""Atomic, verified snapshots of the training state on disk (the writer thread is in snapshot_writer).

A snapshot is one directory ``snap-<step:012d>-<unix_ms:013d>/`` holding ``state.pt``
(``torch.save`` of the state), ``meta.json`` (step, trained offsets, ...) and
``MANIFEST.json`` (size and sha256 of the other two). The directory is written under a
temporary name, fsynced and renamed into place; the manifest comes last and is the
commit marker, so a directory without one is an interrupted write. Loading checks the
manifest and uses ``torch.load(weights_only=True)`` so a planted pickle cannot run code;
whatever fails is moved aside as ``corrupt-<name>`` and the previous snapshot is used,
loudly. What the state and meta may hold is checked before anything is written, in
snapshot_state.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from streamtrain.daemon.errors import SnapshotError, SnapshotLockedError
from streamtrain.serve.repository import fsync_dir, sha256, write_synced

__all__ = ["SnapshotInfo", "SnapshotStore"]

log = logging.getLogger("streamtrain.snapshot")

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "MANIFEST.json"
_NAME_RE = re.compile(r"^snap-(\d{12})-(\d{13})$")


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot on disk: where it is, the step it holds and when it was written."""

    path: Path
    name: str
    step: int
    created: float
    meta: dict


class SnapshotStore:
    """A directory of snapshots: lock it, write, list, verify and load the newest valid one."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the directory's exclusive lock so a second daemon cannot write into it.

        flock is released by the kernel when the process dies, so a crash leaves no stale lock.
        """
        if self._lock_fd is not None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SnapshotError(f"cannot open the lock file in {self.directory}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise SnapshotError(f"cannot lock snapshot directory {self.directory}: {exc}") from exc
            raise SnapshotLockedError(
                f"snapshot directory {self.directory} is in use by another streamtrain process "
                f"(pid {holder}); stop it or point snapshot.dir elsewhere"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (the file stays: removing it would race with a new locker)."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def cleanup_debris(self) -> list[Path]:
        """Clear what interrupted writes left; call at start, after :meth:`lock`.

        Removes ``.tmp-*`` entries, moves aside final-named directories without a manifest,
        and deletes quarantined directories beyond the newest ``keep``. Returns the paths
        it removed or moved, as they were named before.
        """
        touched: list[Path] = []
        for path in self._entries():
            if path.name.startswith(".tmp-"):
                log.warning("removing %s, left by an interrupted snapshot write", path.name)
                _remove(path)
                touched.append(path)
            elif _NAME_RE.match(path.name) and not (path / MANIFEST_FILE).is_file():
                self.quarantine(path, "manifest missing (incomplete write)")
                touched.append(path)
        corrupt = sorted((p for p in self._entries() if p.name.startswith("corrupt-")), reverse=True)
        for path in corrupt[self.keep :]:
            log.info("deleting old quarantined snapshot %s", path.name)
            _remove(path)
            touched.append(path)
        return touched

    def write(self, state: dict, meta: dict) -> SnapshotInfo:
        """Write ``state`` and ``meta`` (which must hold an int ``step``) durably, then prune.

        Nothing is left behind on failure. ``created`` and ``format_version`` in ``meta``
        are set here, so a meta read back from a snapshot can be passed in again.
        """
        import torch  # here, not at the top: `streamtrain snapshots list/show` read meta and manifests only

        from streamtrain.daemon.snapshot_state import _check

        step = _check(state, meta)
        created = time.time()
        unix_ms = int(created * 1000)
        while (self.directory / _snapshot_name(step, unix_ms)).exists():
            unix_ms += 1  # two writes of one step in one millisecond
        name = _snapshot_name(step, unix_ms)
        final = self.directory / name
        tmp = self.directory / f".tmp-{name}-{os.getpid()}"
        full_meta = {**meta, "step": step, "created": unix_ms / 1000, "format_version": FORMAT_VERSION}
        started = time.monotonic()
        renamed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            write_synced(tmp / META_FILE, json.dumps(full_meta, indent=2).encode())
            fsync_dir(tmp)
            os.rename(tmp, final)
            renamed = True
            fsync_dir(self.directory)
            files = {f: {"size": (final / f).stat().st_size, "sha256": sha256(final / f)} for f in (STATE_FILE, META_FILE)}
            manifest = {"format_version": FORMAT_VERSION, "name": name, "files": files}
            part = final / f"{MANIFEST_FILE}.tmp"
            write_synced(part, json.dumps(manifest, indent=2).encode())
            os.replace(part, final / MANIFEST_FILE)
            fsync_dir(final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if renamed:
                shutil.rmtree(final, ignore_errors=True)
            if not isinstance(exc, Exception):
                raise
            raise SnapshotError(f"could not write snapshot {name} in {self.directory}: {exc}") from exc
        info = SnapshotInfo(path=final, name=name, step=step, created=unix_ms / 1000, meta=full_meta)
        log.info("wrote snapshot %s (step %d, %.1f MiB, %.2f s)", name, step, files[STATE_FILE]["size"] / 2**20, time.monotonic() - started)
        self._prune(final)
        return info

    def load_latest(self, map_location: str = "cpu") -> tuple[SnapshotInfo, dict] | None:
        """Load the newest snapshot that verifies; quarantine each failing one on the way.

        Returns ``(info, state)``, or None when no valid snapshot exists.
        """
        skipped: list[str] = []
        for path in self._snapshot_dirs():
            try:
                meta = self._verify(path)
                state = _load_state(path / STATE_FILE)
            except SnapshotError as exc:
                log.warning("skipping %s: %s", path.name, exc)
                skipped.append(f"{path.name} ({exc})")
                try:
                    self.quarantine(path, str(exc))
                except SnapshotError as move_exc:
                    log.error("%s", move_exc)
                continue
            if map_location != "cpu":
                from streamtrain.daemon.snapshot_state import _map_tensors

                try:
                    state = _map_tensors(state, lambda t: t.to(map_location))
                except (RuntimeError, ValueError) as exc:  # not the snapshot's fault: no quarantine
                    raise SnapshotError(f"could not move snapshot {path.name} to {map_location}: {exc}") from exc
            info = self._info(path, meta)
            log.info("loaded snapshot %s (step %d)", info.name, info.step)
            if skipped:
                log.warning("loaded %s only after skipping %d newer snapshot(s): %s", info.name, len(skipped), "; ".join(skipped))
            return info, state
        if skipped:
            log.warning("no valid snapshot in %s; skipped %d: %s", self.directory, len(skipped), "; ".join(skipped))
        return None

    def list(self) -> list[SnapshotInfo]:
        """Snapshots with a manifest, newest first; cheap (nothing is hashed)."""
        return [self._info(p) for p in self._snapshot_dirs() if (p / MANIFEST_FILE).is_file()]

    def verify(self, info_or_path: SnapshotInfo | str | Path) -> None:
        """Check manifest, sizes, sha256 and meta; raise SnapshotError naming the problem."""
        path = info_or_path.path if isinstance(info_or_path, SnapshotInfo) else Path(info_or_path)
        self._verify(path)

    def quarantine(self, path: str | Path, reason: str) -> Path:
        """Move a bad snapshot aside as ``corrupt-<name>`` (kept for inspection, never loaded)."""
        path = Path(path)
        target = self.directory / f"corrupt-{path.name}"
        n = 1
        while target.exists():
            target = self.directory / f"corrupt-{path.name}.{n}"
            n += 1
        try:
            os.rename(path, target)
            fsync_dir(self.directory)
        except OSError as exc:
            raise SnapshotError(f"could not move {path} aside to {target.name}: {exc}") from exc
        try:
            (target / "QUARANTINED.txt").write_text(f"{reason}\n")
        except OSError:
            pass  # the reason is in the log too
        log.warning("moved %s aside to %s: %s", path.name, target.name, reason)
        return target

    def _entries(self) -> list[Path]:
        try:
            return sorted(Path(e.path) for e in os.scandir(self.directory))
        except FileNotFoundError:
            return []

    def _snapshot_dirs(self) -> list[Path]:
        """Final-named directories, newest first (the zero-padded name sorts by step, then time)."""
        found = [p for p in self._entries() if _NAME_RE.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def _info(self, path: Path, meta: dict | None = None) -> SnapshotInfo:
        """Step and time come from the name (write() puts the same values in meta.json)."""
        if meta is None:
            try:
                meta = json.loads((path / META_FILE).read_text())
            except (OSError, ValueError):
                meta = None
        step, unix_ms = _NAME_RE.match(path.name).groups()  # type: ignore[union-attr]
        return SnapshotInfo(
            path=path, name=path.name, step=int(step), created=int(unix_ms) / 1000, meta=meta if isinstance(meta, dict) else {}
        )

    def _verify(self, path: Path) -> dict:
        """Return the parsed meta.json of a snapshot whose files all match its manifest."""
        if not (path / MANIFEST_FILE).is_file():
            raise SnapshotError("manifest missing (incomplete write)")
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            files = {str(f): (int(e["size"]), str(e["sha256"])) for f, e in manifest["files"].items()}
            version = manifest.get("format_version")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SnapshotError(f"manifest unreadable: {exc!r}") from exc
        if version != FORMAT_VERSION:
            raise SnapshotError(f"unsupported format_version {version!r} (this build reads {FORMAT_VERSION})")
        for required in (STATE_FILE, META_FILE):
            if required not in files:
                raise SnapshotError(f"manifest does not list {required}")
        for fname, (size, digest) in files.items():
            if "/" in fname or fname in ("", ".", ".."):
                raise SnapshotError(f"manifest names an unsafe path {fname!r}")
            try:
                found = (path / fname).stat().st_size
            except OSError as exc:
                raise SnapshotError(f"{fname} missing: {exc}") from exc
            if found != size:
                raise SnapshotError(f"size mismatch for {fname} (manifest says {size} bytes, found {found}: truncated or overwritten)")
            if sha256(path / fname) != digest:
                raise SnapshotError(f"sha256 mismatch for {fname}")
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"meta.json unreadable: {exc}") from exc
        if not isinstance(meta, dict) or type(meta.get("step")) is not int:
            raise SnapshotError("meta.json has no int 'step'")
        named = _NAME_RE.match(path.name)
        if named and meta["step"] != int(named[1]):
            raise SnapshotError(f"meta.json step {meta['step']} does not match the name {path.name}")
        return meta

    def _prune(self, just_written: Path) -> None:
        """Delete complete snapshots beyond the newest ``keep``, never the one just written."""
        for info in self.list()[self.keep :]:
            if info.path == just_written:
                log.warning(
                    "snapshot %s is older than %d others in %s (did the step go back?); keeping it anyway",
                    info.name,
                    self.keep,
                    self.directory,
                )
                continue
            # Rename first so a crash mid-delete leaves .tmp-* debris, never a half snapshot.
            trash = self.directory / f".tmp-{info.name}-{os.getpid()}-pruned"
            try:
                os.rename(info.path, trash)
            except OSError as exc:
                log.warning("could not prune snapshot %s: %s", info.name, exc)
                continue
            _remove(trash)
            log.debug("pruned snapshot %s", info.name)


def _load_state(path: Path) -> dict:
    """torch.load without pickle code execution; any failure means the snapshot is unusable."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", text, re.MULTILINE)
        reason = found[1] if found else (text.splitlines() or [type(exc).__name__])[0]
        raise SnapshotError(f"refused to load {STATE_FILE}: {reason}") from exc
    if not isinstance(state, dict):
        raise SnapshotError(f"{STATE_FILE} holds a {type(state).__name__}, not a dict")
    return state


def _snapshot_name(step: int, unix_ms: int) -> str:
    return f"snap-{step:012d}-{unix_ms:013d}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if path.exists() or path.is_symlink():
        log.warning("could not remove %s", path)
