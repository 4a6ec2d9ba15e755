"""Errors of the daemon layer; all derive from :class:`streams.errors.StreamtrainError`."""

from __future__ import annotations

from streamtrain.streams.errors import ConfigError, StreamtrainError

__all__ = [
    "ConfigError",
    "RankError",
    "SnapshotError",
    "SnapshotLockedError",
    "StreamtrainError",
    "TrainingError",
]


class SnapshotError(StreamtrainError):
    """A snapshot could not be written or read."""


class SnapshotLockedError(SnapshotError):
    """Another process holds the snapshot directory's lock."""


class TrainingError(StreamtrainError):
    """Training cannot continue (e.g. repeated non-finite steps with nothing to roll back to)."""


class RankError(StreamtrainError):
    """A collective failed: another rank died, or could not be reached within ``trainer.rank_timeout_s``."""
