"""Errors of the daemon layer; all derive from :class:`streams.errors.StreamtrainError`."""

from __future__ import annotations

from streams.errors import StreamtrainError

__all__ = [
    "StreamtrainError",
    "ConfigError",
    "SnapshotError",
    "SnapshotLockedError",
    "TrainingError",
]


class ConfigError(StreamtrainError):
    """The configuration is invalid; lists every problem with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class SnapshotError(StreamtrainError):
    """A snapshot could not be written or read."""


class SnapshotLockedError(SnapshotError):
    """Another process holds the snapshot directory's lock."""


class TrainingError(StreamtrainError):
    """Training cannot continue (e.g. repeated non-finite steps with nothing to roll back to)."""
