"""The model repository: ``<root>/<name>/<version>/``, one directory per published version.

Integer version directories are what TF Serving and Triton watch; here the version is
the training step of the snapshot the model came from, so versions only grow.  A
version is written under a temporary name (``.tmp-<version>-<pid>``), its files fsynced,
``MANIFEST.json`` (size and sha256 of every other file) written last, and the directory
renamed into place: a poller sees a whole version or none.  Readers trust only
integer-named directories with a manifest whose files match it, so a directory copied
in by hand, half done, is never taken either.

The daemon writes (:func:`write_version`, :func:`prune`); ``streamtrain serve`` reads
(:func:`list_versions`, :func:`verify`).  Nothing here needs torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streamtrain.streams.errors import StreamtrainError

__all__ = [
    "MANIFEST_FILE",
    "NAME_RE",
    "RepositoryError",
    "Version",
    "VersionExistsError",
    "cleanup_debris",
    "fsync_dir",
    "list_versions",
    "prune",
    "sha256",
    "verify",
    "write_synced",
    "write_version",
]

log = logging.getLogger("streamtrain.publish")

FORMAT_VERSION = 1
MANIFEST_FILE = "MANIFEST.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a model name: one safe path component
_VERSION_RE = re.compile(r"^[0-9]{1,18}$")
_TMP_RE = re.compile(r"^\.tmp-(\d+)-(\d+)(?:-pruned)?$")


class RepositoryError(StreamtrainError):
    """A version could not be written, or does not match its manifest."""


class VersionExistsError(RepositoryError):
    """The version directory is there already (the same snapshot step published twice)."""


@dataclass(frozen=True)
class Version:
    """A complete version directory (it has a manifest; :func:`verify` checks the files)."""

    version: int
    path: Path


def write_version(
    root: str | os.PathLike[str],
    name: str,
    version: int,
    write_files: Callable[[Path], None],
    info: dict | None = None,
) -> dict:
    """Write ``<root>/<name>/<version>/`` atomically; returns its manifest.

    ``write_files(tmp_dir)`` puts the version's files into a fresh temporary directory;
    they are fsynced, the manifest (with ``info`` in it) written last, and the directory
    renamed into place.  Nothing is left on failure.  Raises :class:`VersionExistsError`
    if the version is there already.
    """
    if not NAME_RE.match(name):
        raise RepositoryError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (one path component)")
    parent = Path(root) / name
    final = parent / str(int(version))
    if final.exists():
        raise VersionExistsError(f"version {version} of {name!r} exists already in {Path(root)}")
    tmp = parent / f".tmp-{int(version)}-{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_files(tmp)
        files = {}
        for f in sorted(tmp.iterdir()):
            if not f.is_file() or f.name == MANIFEST_FILE:
                raise RepositoryError(f"a version holds plain files only, not {f.name!r}")
            _fsync_file(f)
            files[f.name] = {"size": f.stat().st_size, "sha256": sha256(f)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": int(version),
            "published": time.time(),
            **(info or {}),
            "files": files,
        }
        write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        fsync_dir(tmp)
        os.rename(tmp, final)  # a version appears whole, or not at all
        fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, RepositoryError) or not isinstance(exc, Exception):
            raise
        raise RepositoryError(f"could not write version {version} of {name!r} in {Path(root)}: {exc}") from exc
    return manifest


def list_versions(root: str | os.PathLike[str], name: str) -> list[Version]:
    """Integer-named directories of ``name`` that have a manifest, newest first (nothing is hashed)."""
    parent = Path(root) / name
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for e in entries:
        if _VERSION_RE.match(e.name) and e.is_dir() and os.path.isfile(os.path.join(e.path, MANIFEST_FILE)):
            found.append(Version(int(e.name), Path(e.path)))
    return sorted(found, key=lambda v: v.version, reverse=True)


def verify(path: str | os.PathLike[str]) -> dict:
    """The manifest of a version whose files all match it (sizes, sha256); else :class:`RepositoryError` saying why."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = {str(f): (int(e["size"]), str(e["sha256"])) for f, e in manifest["files"].items()}
        version = int(manifest["version"])
    except FileNotFoundError as exc:
        raise RepositoryError(f"{MANIFEST_FILE} missing (an incomplete version)") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RepositoryError(f"{MANIFEST_FILE} unreadable: {exc!r}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RepositoryError(f"unsupported format_version {manifest.get('format_version')!r} (this build reads {FORMAT_VERSION})")
    if _VERSION_RE.match(path.name) and version != int(path.name):
        raise RepositoryError(f"{MANIFEST_FILE} says version {version}, the directory is {path.name}")
    for fname, (size, digest) in files.items():
        if "/" in fname or fname in ("", ".", ".."):
            raise RepositoryError(f"{MANIFEST_FILE} names an unsafe path {fname!r}")
        try:
            found = (path / fname).stat().st_size
        except OSError as exc:
            raise RepositoryError(f"{fname} missing: {exc.strerror}") from exc
        if found != size:
            raise RepositoryError(f"size mismatch for {fname} ({MANIFEST_FILE} says {size} bytes, found {found}: truncated or overwritten)")
        if sha256(path / fname) != digest:
            raise RepositoryError(f"sha256 mismatch for {fname}")
    return manifest


def prune(root: str | os.PathLike[str], name: str, keep: int, protect: int | None = None) -> list[int]:
    """Delete complete versions beyond the newest ``keep`` (never ``protect``); returns the versions deleted.

    A version is renamed to a temporary name first, so a crash mid-delete leaves debris
    that readers ignore, never half a version under its number.
    """
    removed = []
    for v in list_versions(root, name)[keep:]:
        if v.version == protect:
            continue
        trash = v.path.parent / f".tmp-{v.version}-{os.getpid()}-pruned"
        try:
            os.rename(v.path, trash)
        except OSError as exc:
            log.warning("could not prune version %d of %s: %s", v.version, name, exc)
            continue
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(v.version)
    return removed


def cleanup_debris(root: str | os.PathLike[str], name: str) -> list[str]:
    """Remove ``.tmp-*`` directories left by writers that are no longer running; returns their names."""
    parent = Path(root) / name
    removed = []
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for e in entries:
        m = _TMP_RE.match(e.name)
        if m and not _alive(int(m[2])):
            log.warning("removing %s/%s, left by an interrupted publish", name, e.name)
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(e.name)
    return removed


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing it now: it is starting
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``path`` and fsync it (snapshots are written with these too: daemon/snapshot.py)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
