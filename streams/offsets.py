"""``OffsetTracker``: how far the stream is, per partition, in the four steps a record goes through.

- **read**: handed out in a batch (the dataset's ``state_dict()``; a plain training loop
  that keeps it with its checkpoint resumes there);
- **trained**: its batch went through a step (or was dead-lettered, or skipped and
  dead-lettered); what the next snapshot records;
- **durable**: in a snapshot on disk, with the state it produced; where a restart
  resumes;
- **committed**: mirrored into the consumer group, for lag monitoring by other tools.

A position is ``(offset, rows)``: records before ``offset`` are done, and the first
``rows`` rows of the record at ``offset`` too (an Arrow record's rows can be split
across two batches).  Positions only move forward, except that a roll-back sets read
and trained back to the durable ones.  Each is a plain dict replaced or updated from one
thread; a reader on another thread copies it with ``dict(...)`` (atomic under the GIL).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamtrain.streams.join.done import compact, decode, encode
from streamtrain.streams.slots import Position
from streamtrain.streams.slots import TopicPartition as TP


def positions_from_rows(rows: list) -> dict[TP, Position]:
    """``[[topic, partition, offset, rows], ...]`` (a snapshot's meta, a state_dict) -> positions."""
    return {(t, int(p)): (int(o), int(r)) for t, p, o, r in rows}


def positions_to_rows(positions: dict[TP, Position]) -> list[list]:
    return [[t, p, o, r] for (t, p), (o, r) in sorted(positions.items())]


def describe_positions(positions: dict[TP, Position]) -> str:
    """``t[0]@120, t[1]@7+300, ...`` for a log line (the first eight partitions)."""
    if not positions:
        return "{}"
    parts = [f"{t}[{p}]@{o}" + (f"+{r}" if r else "") for (t, p), (o, r) in sorted(positions.items())]
    return ", ".join(parts[:8]) + (f" ... ({len(parts)} partitions)" if len(parts) > 8 else "")


class OffsetTracker:
    """Read -> trained -> durable -> committed positions per partition (Stateful: ``state_dict``/``load_state_dict``)."""

    def __init__(self) -> None:
        self.read: dict[TP, Position] = {}
        self.trained: dict[TP, Position] = {}
        self.durable: dict[TP, Position] = {}
        self.durable_step = 0
        self.committed: dict[TP, Position] = {}
        # data.labels: offsets past the trained positions that are done (trained out of order, or done without a row),
        # appended per batch and compacted when a snapshot is taken (streams/join/done.py)
        self.done: dict[TP, list[np.ndarray]] = {}

    # ------------------------------------------------------------------ moving on
    def note_read(self, positions: dict[TP, Position]) -> None:
        """A batch was handed out: its positions are where the stream is read to."""
        self.read.update(positions)

    def note_trained(self, positions: dict[TP, Position], done: dict[TP, np.ndarray] | None = None) -> None:
        self.trained.update(positions)
        if done:
            for tp, offsets in done.items():
                self.done.setdefault(tp, []).append(offsets)

    def done_rows(self, positions: dict[TP, Position] | None = None) -> list[list]:
        """The done offsets past ``positions`` (default: the trained ones), as a snapshot's meta keeps them.

        ``[[topic, partition, first, bitmap], ...]`` (``streams/join/done.py``); compacts what it keeps on the way.
        """
        positions = self.trained if positions is None else positions
        rows = []
        for tp, chunks in sorted(self.done.items()):
            base = positions.get(tp, (0, 0))[0]
            kept = compact(chunks, base)
            self.done[tp] = [kept] if len(kept) else []
            if len(kept):
                rows.append([tp[0], tp[1], *encode(kept)])
        return rows

    def done_offsets(self) -> dict[TP, np.ndarray]:
        """Every partition's done offsets past its trained position (what a new ingest skips when it reads from there)."""
        self.done_rows()
        return {tp: chunks[0] for tp, chunks in self.done.items() if chunks}

    def note_durable(self, step: int, positions: dict[TP, Position]) -> None:
        """A snapshot holding ``positions`` is on disk (called from the writer thread)."""
        self.durable_step, self.durable = step, dict(positions)

    def to_commit(self, positions: dict[TP, Position]) -> dict[TP, Position]:
        """The part of ``positions`` not yet committed."""
        return {tp: pos for tp, pos in positions.items() if self.committed.get(tp) != pos}

    def note_committed(self, positions: dict[TP, Position]) -> None:
        self.committed.update(positions)

    def trained_since_durable(self, step: int) -> bool:
        """Whether a snapshot at ``step`` would hold anything the last durable one does not."""
        return (step, self.trained) != (self.durable_step, self.durable)

    def resume(self, step: int, positions: dict[TP, Position], done: list[list] | None = None) -> None:
        """Start over from a snapshot (at start-up, or a roll-back): every stage is at its positions (and done offsets)."""
        self.read = dict(positions)
        self.trained = dict(positions)
        self.done = {(t, int(p)): [decode(first, bits)] for t, p, first, bits in done or () if (t, int(p)) in positions}
        self.note_durable(step, positions)

    # ------------------------------------------------------------------ lag
    def lag(self, high_watermarks: dict[TP, int], starts: dict[TP, int]) -> dict[TP, int]:
        """End offset minus trained offset, per partition with a known end.

        A partition with nothing trained yet counts from where reading started (its
        resolved start offset; 0 when unknown), so a quiet partition read from "latest"
        shows no lag.
        """
        trained = dict(self.trained)  # the training thread updates it meanwhile
        out = {}
        for tp, hi in high_watermarks.items():
            done = trained[tp][0] if tp in trained else max(starts.get(tp, 0), 0)
            out[tp] = max(0, hi - done)
        return out

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        """The read positions: ``{"positions": [[topic, partition, offset, rows], ...]}`` (the dataset's state)."""
        return {"positions": positions_to_rows(self.read)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.read = positions_from_rows(state.get("positions", []))
