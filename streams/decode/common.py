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
from streamtrain.streams.features.spec import MISSING_NUMBER

T = TypeVar("T")
REASONS = (
    "undecodable",
    "oversized",
    "wrong_shape",
    "missing_label",
    "non_finite",
    "bad_label",
    "unknown_class",
    "decoder_crash",
    "missing_key",
    "unknown_schema",  # avro/protobuf: the record's schema id could not be looked up (unknown id, registry down)
)

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

    x: np.ndarray  # (rows, width) float32; a missing number is MISSING_NUMBER (data.missing: impute)
    y: np.ndarray  # (rows,) float32
    msg_index: np.ndarray  # (rows,) int64: the message each row came from
    rejects: list[Reject] = field(default_factory=list)
    nbytes: int = 0  # bytes of the record values (nulls count 0): the decoders measure lengths anyway
    ids: np.ndarray | None = None  # (rows, categorical fields) int64: rows of the hashed table; None: (rows, 0)

    def __post_init__(self) -> None:
        if self.ids is None:
            self.ids = np.empty((len(self.y), 0), np.int64)

    @classmethod
    def empty(cls, width: int, fields: int = 0) -> Decoded:
        return cls(np.empty((0, width), np.float32), np.empty(0, np.float32), np.empty(0, np.int64), ids=np.empty((0, fields), np.int64))


# A label that names no class of trainer.classes is marked with this NaN payload (rejected as unknown_class).
UNKNOWN_CLASS = np.array([0x7FC0BEEF], dtype=np.uint32).view(np.float32)[0]


@dataclass(frozen=True)
class LabelRule:
    """Which labels a task accepts: any finite number, {0, 1}, or integers 0..C-1; class names by ``classes``."""

    task: str = "regression"
    num_classes: int = 0
    classes: tuple[str, ...] = ()  # names in order: a label may be one of these (its index), else unknown_class

    @classmethod
    def of(cls, trainer: object) -> LabelRule:
        """The rule of a ``trainer`` config section (task, num_classes, classes)."""
        return cls(trainer.task, trainer.num_classes, tuple(getattr(trainer, "classes", ()) or ()))

    def index(self, label: object) -> float:
        """A label as the number trained on: a class name its index (UNKNOWN_CLASS if none), a boolean 1/0, a number itself."""
        if isinstance(label, str):
            if not self.classes:
                return float(UNKNOWN_CLASS)
            return float(self._names.get(label, UNKNOWN_CLASS))
        return float(label)

    @property
    def _names(self) -> dict[str, int]:
        names = self.__dict__.get("_names_cache")
        if names is None:
            names = {c: i for i, c in enumerate(self.classes)}
            object.__setattr__(self, "_names_cache", names)
        return names

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
    ids: np.ndarray | None = None,
    impute: bool = False,
) -> Decoded:
    """Common row checks (finite or, with ``impute``, missing features; label present/finite/valid), vectorized.

    ``row`` (Arrow) is each row's number inside its message, named in the rejects.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    bad = np.zeros(len(y), bool)
    checks = []
    missing = np.isnan(y) & _null_marker(y)
    checks.append((missing, "missing_label", "label is missing"))
    unknown = np.isnan(y) & (y.view(np.uint32) == np.uint32(0x7FC0BEEF))
    if unknown.any():
        checks.append((unknown, "unknown_class", f"the label names no class of trainer.classes {list(rule.classes)[:10]}"))
    if x.size:
        finite = np.isfinite(x)
        if impute and not finite.all():
            finite |= _null_marker(x)
        x_ok = finite.all(axis=1)
    else:
        x_ok = np.ones(len(y), bool)
    checks.append((~x_ok, "non_finite", "features contain NaN or Inf"))
    y_fin = np.isfinite(y)
    checks.append((~y_fin & ~missing & ~unknown, "non_finite", "label is NaN or Inf"))
    ok_label, rule_text = rule.check(np.where(y_fin, y, 0))
    checks.append((y_fin & ~ok_label, "bad_label", rule_text))
    for mask, reason, text in checks:
        mask = mask & ~bad
        if mask.any():
            rejects.extend(_row_rejects(idx, mask, reason, text, y, row))
            bad |= mask
    if ids is None:
        ids = np.empty((len(y), 0), np.int64)
    if bad.any():
        keep = ~bad
        x, y, idx, ids = x[keep], y[keep], idx[keep], ids[keep]
    return Decoded(x, y, idx, rejects, nbytes, np.ascontiguousarray(ids, np.int64))


# A number (or label) read as missing is marked with this NaN payload so it can be told from a real NaN.
_MISSING = MISSING_NUMBER


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
    """Batch logic of a line format (CSV): fast path, bisect on failure, leaf per record.

    A subclass gives ``_fast(chunk) -> (x, y, ids, skipped)`` (the chunk decoded at once; rows
    for every record but the ``skipped`` positions) and ``_one(value) -> (x, y, ids)`` (one
    record's row, or a :class:`DecodeError` with its reason).
    """

    width: int
    fields = 0  # categorical fields
    impute = False

    def __init__(self, width: int, rule: LabelRule, max_bytes: int) -> None:
        self.width = width
        self.rule = rule
        self.max_bytes = max_bytes

    def decode(self, values: list[bytes | None]) -> Decoded:
        good, rejects, nbytes = _screen(values, self.max_bytes)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        if good:
            self._decode_range(values, good, parts, rejects)
        if not parts:
            empty = Decoded.empty(self.width, self.fields)
            return _finish(empty.x, empty.y, empty.msg_index, self.rule, rejects, nbytes=nbytes, ids=empty.ids)
        x, y, ids, idx = (np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in range(4))
        if len(idx) > 1 and (np.diff(idx) < 0).any():  # a record the parser skipped decoded on its own
            order = np.argsort(idx, kind="stable")
            x, y, ids, idx = x[order], y[order], ids[order], idx[order]
        rejects.sort(key=lambda r: r.index)
        return _finish(x, y, idx, self.rule, rejects, nbytes=nbytes, ids=ids, impute=self.impute)

    def _decode_range(self, values: list, idx: range | list[int], parts: list, rejects: list[Reject]) -> None:
        cuts = 0
        while len(idx):
            # idx is sorted and unique: as long as values, it is all of them (the common case, no copy)
            chunk = values if len(idx) == len(values) else [values[i] for i in idx]
            try:
                x, y, ids, skipped = self._fast(chunk)
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
            positions = np.arange(idx.start, idx.stop, dtype=np.int64) if isinstance(idx, range) else np.asarray(idx, np.int64)
            if skipped:  # rows the parser left out (and said which): each decoded alone, for its reason
                keep = np.ones(len(positions), bool)
                keep[skipped] = False
                self._leaf(values, positions[~keep].tolist(), parts, rejects)
                positions = positions[keep]
            parts.append((x, y, ids, positions))
            return

    def _failed_row(self, exc: Exception, n: int) -> int | None:
        """The record a failed fast path names, if the parser says (0 <= row < n); else None: bisect."""
        return None

    def _leaf(self, values: list, idx: list[int], parts: list, rejects: list[Reject]) -> None:
        rows, ok = [], []
        for i, row in each_record(self._one, values, idx, rejects):
            rows.append(row)
            ok.append(i)
        if ok:
            x, y, ids = (np.concatenate([r[k] for r in rows]) for k in range(3))
            parts.append((x.astype(np.float32), y.astype(np.float32), ids, np.asarray(ok, np.int64)))

    def _fast(self, chunk: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        raise NotImplementedError

    def _one(self, value: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError


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
    """Numeric columns side by side as one float32 (rows, len(names)) array, nulls as the missing mark."""
    x = np.empty((rows, len(names)), np.float32)
    for j, name in enumerate(names):
        col = table.column(name)
        if col.null_count:
            x[:, j] = pc.fill_null(col, 0.0).to_numpy()
            x[pc.is_null(col).to_numpy(zero_copy_only=False), j] = _MISSING
        else:
            x[:, j] = col.to_numpy()
    return x


def _check_finite(fx: list[float], fy: float) -> None:
    if not all(math.isfinite(v) for v in fx):
        raise DecodeError("non_finite", "features contain NaN or Inf")
    if not math.isfinite(fy):
        raise DecodeError("non_finite", "label is NaN or Inf")
