"""Hear about new versions from ``publish.topic`` instead of waiting for the next poll of the repository.

The daemon writes one record per published version (key = the model's name).  A record
for the served name only wakes the watcher: the repository stays the source of truth
(the record may come before a network file system shows the directory; the poll catches
up), so a lost or late record costs at most one poll interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import OFFSET_END, Consumer, TopicPartition

__all__ = ["TopicNudger"]

log = logging.getLogger("streamtrain.serve")


class TopicNudger:
    """Reads ``topic`` from its end on a thread; calls ``nudge()`` for each record keyed ``name``."""

    def __init__(self, bootstrap: str, topic: str, name: str, nudge: Callable[[], None], settings: dict | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.name = name.encode()
        self.nudge = nudge
        self.settings = dict(settings or {})
        self.heard = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamtrain-serve-topic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "streamtrain-serve",  # no commits: assign() from the end, as a standalone consumer
                "enable.auto.commit": False,
                "client.id": "streamtrain-serve",
                **self.settings,
            }
        )
        try:
            assigned = False
            while not self._stop.is_set():
                if not assigned:
                    md = consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
                    if md is None or md.error is not None or not md.partitions:
                        self._stop.wait(1.0)  # not created yet: the daemon creates it with its first version
                        continue
                    consumer.assign([TopicPartition(self.topic, p, OFFSET_END) for p in md.partitions])
                    assigned = True
                    log.info("listening to %s for new versions of %s", self.topic, self.name.decode())
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error():
                    log.warning("reading %s: %s", self.topic, msg.error())
                    continue
                if msg.key() == self.name:
                    self.heard += 1
                    self.nudge()
        except Exception:
            log.exception("listening to %s stopped; the repository is still polled", self.topic)
        finally:
            consumer.close()
