"""Mirrors durable snapshots' positions into the consumer group, on a thread of its own.

The group's offsets are for lag monitoring; the snapshot is the authority.  So a commit
must never hold up a snapshot: while the broker is down a synchronous commit can wait a
minute, and done on the snapshot writer it stopped every later snapshot (and the final
one at shutdown).  Here commits wait on their own thread; a newer position replaces one
not yet committed (only the latest matters), a failure is counted and logged, and at
shutdown the last commit gets a few seconds before it is abandoned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from streamtrain.daemon.newest import NewestOnly
from streamtrain.streams.config import KafkaConfig
from streamtrain.streams.offsets import OffsetTracker
from streamtrain.streams.ring import Position
from streamtrain.streams.ring import TopicPartition as TP
from streamtrain.streams.source import KafkaSource

log = logging.getLogger("streamtrain.trainer")


class Committer:
    def __init__(
        self,
        kafka: KafkaConfig,
        offsets: OffsetTracker,
        on_failure: Callable[[BaseException], None],
        client_id: str = "streamtrain-committer",
    ) -> None:
        self.kafka = kafka
        self.offsets = offsets  # what is committed already: only the changes are sent
        self.client_id = client_id
        self.on_failure = on_failure
        self._source: KafkaSource | None = None
        self._worker = NewestOnly("streamtrain-committer", self._commit, lambda _positions, exc: self.on_failure(exc))

    def submit(self, positions: dict[TP, Position]) -> None:
        """Commit ``positions`` soon (replacing any not yet committed)."""
        self._worker.submit(dict(positions))

    def wait(self, timeout: float) -> bool:
        """Until everything submitted is committed (or has failed); False if ``timeout`` passed first."""
        return self._worker.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Give the last commit ``timeout`` seconds, then stop (an abandoned one leaves the group behind the snapshot)."""
        if not self._worker.close(timeout):
            log.warning(
                "the consumer group commit did not finish within %.0f s (broker unreachable?); it lags the final snapshot, "
                "which holds the positions",
                timeout,
            )
            return  # the thread may be inside librdkafka: leave its consumer alone
        if self._source is not None:
            self._source.close()

    def _commit(self, positions: dict[TP, Position]) -> None:
        # the group is a mirror; the snapshot is the authority: a failure goes to on_failure
        changed = self.offsets.to_commit(positions)
        if changed:
            if self._source is None:
                self._source = KafkaSource(self.kafka, self.client_id)
                self._source.open_for_commits()
            self._source.commit(changed)
            self.offsets.note_committed(changed)
