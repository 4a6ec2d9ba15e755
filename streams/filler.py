"""Filling ring slots: decoded rows in, slots out, each carrying the positions its rows bring their partitions to.

A slot closes when full or ``max_batch_wait_ms`` after its first row, so slow streams
still train promptly.  Its positions are ``(offset, rows)`` per partition: "records
before ``offset`` are done, and the first ``rows`` rows of the record at ``offset``
too" -- an Arrow record's rows can be split across two slots.  A position with no rows
(a partition's start, or where reading goes on after an offset out of range) travels
alone in an empty slot if no row comes, so the trainer, and so the snapshot, learns it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamtrain.streams.deadletter import Ticket
from streamtrain.streams.slots import Position, SlotProducer
from streamtrain.streams.slots import TopicPartition as TP


@dataclass
class Pending:
    """A decoded consumed batch whose rows are being placed into slots."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray  # (rows, categorical fields) int64
    part: np.ndarray  # per message: index into tps
    offset: np.ndarray  # per message
    ts: np.ndarray  # per message: record timestamp, unix seconds (nan if none)
    row_start: np.ndarray  # per message: first row
    row_end: np.ndarray  # per message: one past the last row
    row_base: np.ndarray  # per message: rows skipped before the first decoded row (resume inside a record)
    msg_of_row: np.ndarray
    tps: list[TP]
    has_ts: bool = True
    ticket: Ticket | None = None  # its rejects' dead-letter writes: placed only once done
    row: int = 0  # next row to place
    done: int = 0  # messages fully handled
    # data.labels (streams/join/): per row the (partition index, offset) pairs it makes done, feature's and label's (-1:
    # none), and the offsets done without a row; they travel with the rows' slot.  ``after``: the positions once placed.
    marks: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    after: dict[TP, Position] | None = None


class SlotFiller:
    """Copies rows into the slot being filled and publishes it; ``positions`` is where every partition is."""

    def __init__(self, ring: SlotProducer, max_wait_s: float, positions: dict[TP, Position], stats: Any) -> None:
        self.ring = ring
        self.max_wait_s = max_wait_s
        self.positions = dict(positions)  # every partition's position, placed rows included
        self.stats = stats  # IngestStats: counts the slots published
        self.last_slot_at = time.monotonic()  # when the trainer last freed a slot we could take
        self.deadline = math.inf  # when the open slot must be published
        self._slot: int | None = None
        self._fill = 0
        self._slot_positions: dict[TP, Position] = {}
        self._slot_done: list[tuple[np.ndarray, np.ndarray]] = []  # (partition index, offset) arrays (data.labels)
        self._tps: list[TP] = []
        self._oldest = math.inf

    @property
    def open(self) -> bool:
        """Something waits to be published: rows, positions, or done offsets alone."""
        return bool(self._fill or self._slot_positions or self._slot_done)

    def place(self, p: Pending) -> bool:
        """Copy ``p``'s rows into slots; False if the ring is full before all are placed."""
        total = len(p.y)
        while True:
            if self._slot is None:
                self._slot = self.ring.acquire(timeout=0)
                if self._slot is None:
                    return False
                self.last_slot_at = time.monotonic()
                self._fill = 0
            k = min(total - p.row, self.ring.batch_size - self._fill)
            if k > 0:
                s, f, r = self._slot, self._fill, p.row
                self.ring.x_np[s, f : f + k] = p.x[r : r + k]
                self.ring.y_np[s, f : f + k] = p.y[r : r + k]
                if p.ids.shape[1]:
                    self.ring.ids_np[s, f : f + k] = p.ids[r : r + k]
                if p.marks is not None:  # the offsets these rows make done go in their slot
                    self._note_done(p, p.marks[0][r : r + k].ravel(), p.marks[1][r : r + k].ravel())
                if p.has_ts:
                    oldest = np.nanmin(p.ts[p.msg_of_row[r : r + k]])
                    if not math.isnan(oldest):
                        self._oldest = min(self._oldest, oldest)
                self._fill += k
                p.row += k
            self._advance_positions(p)
            if p.row == total and p.marks is not None:
                self._note_done(p, p.marks[2], p.marks[3])
                for tp, pos in (p.after or {}).items():
                    self.set_position(tp, pos)
                p.marks = None
            if self._fill == self.ring.batch_size:
                self.publish()
            if p.row == total:
                return True

    def _advance_positions(self, p: Pending) -> None:
        """Positions reached once rows before ``p.row`` are placed."""
        done = int(np.searchsorted(p.row_end, p.row, side="right")) if p.row < len(p.y) else len(p.offset)
        if done > p.done:
            seg = p.part[p.done : done][::-1]
            parts, first = np.unique(seg, return_index=True)
            for i, j in zip(parts.tolist(), first.tolist()):
                last = done - 1 - j
                self.set_position(p.tps[i], (int(p.offset[last]) + 1, 0))
            p.done = done
        if done < len(p.offset) and p.row_start[done] < p.row:
            # a record split across slots: note how many of its rows are placed
            self.set_position(p.tps[p.part[done]], (int(p.offset[done]), int(p.row_base[done] + p.row - p.row_start[done])))

    def _note_done(self, p: Pending, part: np.ndarray, off: np.ndarray) -> None:
        if len(part):
            self._tps = p.tps
            self._slot_done.append((part, off))
            if self.deadline == math.inf:
                self.deadline = time.monotonic() + self.max_wait_s

    def _done_of_slot(self) -> dict[TP, np.ndarray] | None:
        if not self._slot_done:
            return None
        part = np.concatenate([a for a, _ in self._slot_done])
        off = np.concatenate([b for _, b in self._slot_done])
        keep = part >= 0
        part, off = part[keep], off[keep]
        return {self._tps[i]: off[part == i] for i in np.unique(part).tolist()}

    def set_position(self, tp: TP, pos: Position) -> None:
        """``tp`` is at ``pos`` from now on; the next slot published tells the trainer."""
        self._slot_positions[tp] = pos
        self.positions[tp] = pos
        if self.deadline == math.inf:
            self.deadline = time.monotonic() + self.max_wait_s

    def flush_if_due(self) -> None:
        if self.open and time.monotonic() >= self.deadline:
            self.publish()

    def publish(self) -> None:
        if self._slot is None:  # nothing placed since the last publish ...
            if not self._slot_positions:
                return
            self._slot = self.ring.acquire(timeout=0)  # ... but positions to report (a partition's start): an empty slot
            if self._slot is None:
                return  # the ring is full: the next flush tries again
            self._fill = 0
        oldest = self._oldest if self._oldest != math.inf else math.nan
        done = self._done_of_slot()
        if done is None:
            self.ring.publish(self._slot, self._fill, self._slot_positions, oldest)
        else:
            self.ring.publish(self._slot, self._fill, self._slot_positions, oldest, done)
        self.stats.batches += 1
        self._slot = None
        self._fill = 0
        self._slot_positions = {}
        self._slot_done = []
        self._oldest = math.inf
        self.deadline = math.inf

    def give_back_unused(self) -> None:
        """At the end: a slot taken but holding nothing goes back."""
        if self._slot is not None and not self.open:
            self.ring.give_back(self._slot)
            self._slot = None
