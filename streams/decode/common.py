"""What every format shares: the result types, the label rule and the row checks.

Also the up-front screen (nulls, empties, oversized records), the per-record boundary
every decoder goes through (:func:`each_record`: a record can only ever fail itself), and
the batch logic of the line formats, json and csv: fast path, bisect on failure, one
record at a time at the leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamtrain.streams.errors import DecodeError

T = TypeVar("T")
REASONS = ("undecodable", "oversized", "wrong_shape", "missing_label", "non_finite", "bad_label", "decoder_crash")

_LEAF = 8  # below this many records a failing chunk is decoded one record at a time
_MAX_CUTS = 16  # records a parser's error may name in one chunk before the rest is bisected (each cut copies the rest)


@dataclass(frozen=True)
class Reject:
    """A record (or some rows of an Arrow record) that cannot be trained on."""

    index: int  # position of the message in the consumed batch
    reason: str  # one of REASONS
    error: str  # what exactly was wrong, for the dead-letter headers and logs
    rows: tuple[int, ...] = ()  # arrow: the bad rows inside the message; empty = the whole record
    exception: str = ""  # the class of an exception no decoder expected (a bug, or a parser's limit), else ""


@dataclass
class Decoded:
    """Rows decoded from a batch, in message order."""

    x: np.ndarray  # (rows, width) float32
    y: np.ndarray  # (rows,) float32
    msg_index: np.ndarray  # (rows,) int64: the message each row came from
    rejects: list[Reject] = field(default_factory=list)
    nbytes: int = 0  # bytes of the record values (nulls count 0): the decoders measure lengths anyway

    @classmethod
    def empty(cls, width: int) -> Decoded:
        return cls(np.empty((0, width), np.float32), np.empty(0, np.float32), np.empty(0, np.int64))


@dataclass(frozen=True)
class LabelRule:
    """Which labels a task accepts: any finite number, {0, 1}, or integers 0..C-1."""

    task: str = "regression"
    num_classes: int = 0

    def check(self, y: np.ndarray) -> tuple[np.ndarray, str]:
        """Mask of acceptable labels (finite ones only are passed in) and the rule in words."""
        if self.task == "binary":
            return (y == 0) | (y == 1), "binary labels must be 0 or 1"
        if self.task == "multiclass":
            ok = (y == np.round(y)) & (y >= 0) & (y < self.num_classes)
            return ok, f"multiclass labels must be integers 0..{self.num_classes - 1}"
        return np.ones(len(y), bool), ""


class Decoder(Protocol):
    width: int

    def decode(self, values: list[bytes | None]) -> Decoded: ...


def unexpected(index: int, exc: BaseException, reason: str = "undecodable") -> Reject:
    """The reject for an exception no decoder raised on purpose: its class and message, for the headers."""
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return Reject(index, reason, f"{type(exc).__name__}: {text}" if text else type(exc).__name__, exception=type(exc).__name__)


def each_record(
    one: Callable[[bytes], T], values: Sequence[bytes | None], indices: Iterable[int], rejects: list[Reject]
) -> Iterator[tuple[int, T]]:
    """The per-record boundary: ``(i, one(values[i]))`` for each record that decodes; the rest become rejects.

    Every decoder turns one record's bytes into a row through here (its slow path, the
    fallback when a batch path fails), so a record can only ever fail itself: a
    :class:`DecodeError` is a reject with its reason, and any other exception (a parser's
    recursion limit, an index error in code that met an input nobody thought of) is a
    reject naming the exception, never an error of the batch.
    """
    for i in indices:
        try:
            out = one(values[i])
        except DecodeError as exc:
            rejects.append(Reject(i, exc.reason, exc.message))
        except Exception as exc:  # the boundary: whatever one record's bytes do, they fail only that record
            rejects.append(unexpected(i, exc))
        else:
            yield i, out


@np.errstate(over="ignore")  # a value beyond float32 becomes inf, rejected below as non_finite
def _finish(
    x: np.ndarray,
    y: np.ndarray,
    idx: np.ndarray,
    rule: LabelRule,
    rejects: list[Reject],
    row: np.ndarray | None = None,
    nbytes: int = 0,
) -> Decoded:
    """Common row checks (finite features, label present/finite/valid), vectorized.

    ``row`` (Arrow) is each row's number inside its message, named in the rejects.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    bad = np.zeros(len(y), bool)
    checks = []
    missing = np.isnan(y) & _null_marker(y)
    checks.append((missing, "missing_label", "label is missing"))
    x_ok = np.isfinite(x).all(axis=1) if x.size else np.ones(len(y), bool)
    checks.append((~x_ok, "non_finite", "features contain NaN or Inf"))
    y_fin = np.isfinite(y)
    checks.append((~y_fin & ~missing, "non_finite", "label is NaN or Inf"))
    ok_label, rule_text = rule.check(np.where(y_fin, y, 0))
    checks.append((y_fin & ~ok_label, "bad_label", rule_text))
    for mask, reason, text in checks:
        mask = mask & ~bad
        if mask.any():
            rejects.extend(_row_rejects(idx, mask, reason, text, y, row))
            bad |= mask
    if bad.any():
        keep = ~bad
        x, y, idx = x[keep], y[keep], idx[keep]
    return Decoded(x, y, idx, rejects, nbytes)


# A label read as missing is marked with this NaN payload so it can be told from a real NaN.
_MISSING = np.array([0x7FC0DEAD], dtype=np.uint32).view(np.float32)[0]


def _null_marker(y: np.ndarray) -> np.ndarray:
    return y.view(np.uint32) == np.uint32(0x7FC0DEAD)


def _row_rejects(idx: np.ndarray, mask: np.ndarray, reason: str, text: str, y: np.ndarray, row: np.ndarray | None) -> list[Reject]:
    out = []
    for i in np.flatnonzero(mask):
        detail = text if reason != "bad_label" else f"{text}, got {float(y[i])!r}"
        out.append(Reject(int(idx[i]), reason, detail, (int(row[i]),) if row is not None else ()))
    return out


def _lengths(values: list[bytes | None]) -> np.ndarray:
    """Each record value's length, -1 for a null (tombstone).

    ``map(len, ...)`` runs without a Python frame per record (~4x faster than a
    generator, and the ingest thread holds the GIL the less); a null makes it raise.
    """
    try:
        return np.fromiter(map(len, values), np.int64, len(values))
    except TypeError:
        return np.fromiter((len(v) if v is not None else -1 for v in values), np.int64, len(values))


def _screen(values: list[bytes | None], max_bytes: int) -> tuple[range | list[int], list[Reject], int]:
    """Indices worth decoding, and the values' bytes; nulls, empties and oversized records rejected up front."""
    lengths = _lengths(values)
    ok = (lengths > 0) & (lengths <= max_bytes)
    if ok.all():
        return range(len(values)), [], int(lengths.sum())
    rejects = []
    for i in np.flatnonzero(~ok):
        n = int(lengths[i])
        if n > max_bytes:
            rejects.append(Reject(int(i), "oversized", f"record is {n} bytes, limit is {max_bytes} (data.max_record_bytes)"))
        else:
            rejects.append(Reject(int(i), "undecodable", "record value is empty" if n == 0 else "record value is null (tombstone)"))
    return [int(i) for i in np.flatnonzero(ok)], rejects, int(np.maximum(lengths, 0).sum())


class _BisectingDecoder:
    """Shared batch logic for the line formats: fast path, bisect on failure, leaf per record."""

    width: int

    def __init__(self, width: int, rule: LabelRule, max_bytes: int) -> None:
        self.width = width
        self.rule = rule
        self.max_bytes = max_bytes

    def decode(self, values: list[bytes | None]) -> Decoded:
        good, rejects, nbytes = _screen(values, self.max_bytes)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if good:
            self._decode_range(values, good, parts, rejects)
        if not parts:
            return _finish(np.empty((0, self.width)), np.empty(0), np.empty(0, np.int64), self.rule, rejects, nbytes=nbytes)
        x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        idx = np.concatenate([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
        if len(idx) > 1 and (np.diff(idx) < 0).any():  # a record the parser skipped decoded on its own
            order = np.argsort(idx, kind="stable")
            x, y, idx = x[order], y[order], idx[order]
        rejects.sort(key=lambda r: r.index)
        return _finish(x, y, idx, self.rule, rejects, nbytes=nbytes)

    def _decode_range(self, values: list, idx: range | list[int], parts: list, rejects: list[Reject]) -> None:
        cuts = 0
        while len(idx):
            # idx is sorted and unique: as long as values, it is all of them (the common case, no copy)
            chunk = values if len(idx) == len(values) else [values[i] for i in idx]
            try:
                x, y, skipped = self._fast(chunk)
            except Exception as exc:  # some record in the chunk: find it (the records themselves go through each_record)
                row = self._failed_row(exc, len(idx)) if cuts < _MAX_CUTS else None
                if row is not None:
                    # the parser named the record: the ones before it, that one alone, then on after it
                    # (one more pass over the batch per bad record, where bisecting takes several;
                    # bad records close together are bisected: each cut copies the rest)
                    cuts += 1 if row >= _LEAF else _MAX_CUTS // 2
                    if row:
                        self._decode_range(values, idx[:row], parts, rejects)
                    self._leaf(values, idx[row : row + 1], parts, rejects)
                    idx = idx[row + 1 :]
                    continue
                if len(idx) <= _LEAF:
                    self._leaf(values, idx, parts, rejects)
                    return
                half = len(idx) // 2
                self._decode_range(values, idx[:half], parts, rejects)
                self._decode_range(values, idx[half:], parts, rejects)
                return
            ids = np.arange(idx.start, idx.stop, dtype=np.int64) if isinstance(idx, range) else np.asarray(idx, np.int64)
            if skipped:  # rows the parser left out (and said which): each decoded alone, for its reason
                keep = np.ones(len(ids), bool)
                keep[skipped] = False
                self._leaf(values, ids[~keep].tolist(), parts, rejects)
                ids = ids[keep]
            parts.append((x, y, ids))
            return

    def _failed_row(self, exc: Exception, n: int) -> int | None:
        """The record a failed fast path names, if the parser says (0 <= row < n); else None: bisect."""
        return None

    def _leaf(self, values: list, idx: list[int], parts: list, rejects: list[Reject]) -> None:
        xs, ys, ok = [], [], []
        for i, (fx, fy) in each_record(self._one, values, idx, rejects):
            xs.append(fx)
            ys.append(fy)
            ok.append(i)
        if ok:
            parts.append((np.asarray(xs, np.float64).reshape(len(ok), self.width), np.asarray(ys, np.float64), np.asarray(ok, np.int64)))

    def _fast(self, chunk: list[bytes]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Decode a whole chunk at once: x, y and the chunk positions it left out (rows of x are the rest)."""
        raise NotImplementedError

    def _one(self, value: bytes) -> tuple[list[float], float]:
        raise NotImplementedError


@np.errstate(over="ignore")
def _column(table: pa.Table, name: str) -> np.ndarray:
    """A float64 column as numpy, nulls marked with the missing-label NaN payload."""
    col = table.column(name)
    arr = col.to_numpy() if col.null_count == 0 else pc.fill_null(col, float(_MISSING)).to_numpy()
    if col.null_count:
        arr = arr.astype(np.float32)
        arr[pc.is_null(col).to_numpy(zero_copy_only=False)] = _MISSING
    return arr


@np.errstate(over="ignore")  # beyond float32: inf, rejected as non_finite by _finish
def _stack(table: pa.Table, names: tuple[str, ...], rows: int) -> np.ndarray:
    """Numeric columns side by side as one float32 (rows, len(names)) array: one copy, no float64 detour."""
    x = np.empty((rows, len(names)), np.float32)
    for j, name in enumerate(names):
        x[:, j] = table.column(name).to_numpy()
    return x


def _check_finite(fx: list[float], fy: float) -> None:
    if not all(math.isfinite(v) for v in fx):
        raise DecodeError("non_finite", "features contain NaN or Inf")
    if not math.isfinite(fy):
        raise DecodeError("non_finite", "label is NaN or Inf")
