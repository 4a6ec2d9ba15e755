"""Turn a consumed batch of Kafka record values into feature and label arrays.

One vectorized decode per batch (``b"".join`` + one ``np.frombuffer`` for raw,
``pyarrow.json`` / ``pyarrow.csv`` over the joined lines, Arrow IPC streams with many
rows each): decoding record by record in Python next to the trainer starves it.
When a batch holds a record the fast path cannot parse, the batch is bisected so
good records keep the fast path and only the bad ones are looked at one by one.

Records that cannot be used are returned as :class:`Reject` with a reason from
:data:`REASONS`; the caller counts them and sends them to the dead-letter topic.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from itertools import compress
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

from streamtrain.streams.errors import DecodeError

REASONS = ("undecodable", "oversized", "wrong_shape", "missing_label", "non_finite", "bad_label")

_LEAF = 8  # below this many records a failing chunk is decoded one record at a time
_MAX_CUTS = 16  # records a parser's error may name in one chunk before the rest is bisected (each cut copies the rest)
_ROW_IN_ERROR = re.compile(r" in row (\d+)$")


@dataclass(frozen=True)
class Reject:
    """A record (or some rows of an Arrow record) that cannot be trained on."""

    index: int  # position of the message in the consumed batch
    reason: str  # one of REASONS
    error: str  # what exactly was wrong, for the dead-letter headers and logs
    rows: tuple[int, ...] = ()  # arrow: the bad rows inside the message; empty = the whole record


@dataclass
class Decoded:
    """Rows decoded from a batch, in message order."""

    x: np.ndarray  # (rows, width) float32
    y: np.ndarray  # (rows,) float32
    msg_index: np.ndarray  # (rows,) int64: the message each row came from
    rejects: list[Reject] = field(default_factory=list)

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


def _finish(
    x: np.ndarray, y: np.ndarray, idx: np.ndarray, rule: LabelRule, rejects: list[Reject], row: np.ndarray | None = None
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
    return Decoded(x, y, idx, rejects)


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


def value_bytes(values: list[bytes | None]) -> int:
    """Total bytes of the record values (nulls count 0)."""
    return int(np.maximum(_lengths(values), 0).sum())


def _screen(values: list[bytes | None], max_bytes: int) -> tuple[range | list[int], list[Reject]]:
    """Indices worth decoding; nulls, empties and oversized records rejected up front."""
    lengths = _lengths(values)
    ok = (lengths > 0) & (lengths <= max_bytes)
    if ok.all():
        return range(len(values)), []
    rejects = []
    for i in np.flatnonzero(~ok):
        n = int(lengths[i])
        if n > max_bytes:
            rejects.append(Reject(int(i), "oversized", f"record is {n} bytes, limit is {max_bytes} (data.max_record_bytes)"))
        else:
            rejects.append(Reject(int(i), "undecodable", "record value is empty" if n == 0 else "record value is null (tombstone)"))
    return [int(i) for i in np.flatnonzero(ok)], rejects


class _BisectingDecoder:
    """Shared batch logic for the line formats: fast path, bisect on failure, leaf per record."""

    width: int

    def __init__(self, width: int, rule: LabelRule, max_bytes: int) -> None:
        self.width = width
        self.rule = rule
        self.max_bytes = max_bytes

    def decode(self, values: list[bytes | None]) -> Decoded:
        good, rejects = _screen(values, self.max_bytes)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if good:
            self._decode_range(values, good, parts, rejects)
        if not parts:
            return _finish(np.empty((0, self.width)), np.empty(0), np.empty(0, np.int64), self.rule, rejects)
        x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        idx = np.concatenate([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
        if len(idx) > 1 and (np.diff(idx) < 0).any():  # a record the parser skipped decoded on its own
            order = np.argsort(idx, kind="stable")
            x, y, idx = x[order], y[order], idx[order]
        rejects.sort(key=lambda r: r.index)
        return _finish(x, y, idx, self.rule, rejects)

    def _decode_range(self, values: list, idx: range | list[int], parts: list, rejects: list[Reject]) -> None:
        cuts = 0
        while len(idx):
            # idx is sorted and unique: as long as values, it is all of them (the common case, no copy)
            chunk = values if len(idx) == len(values) else [values[i] for i in idx]
            try:
                x, y, skipped = self._fast(chunk)
            except (pa.ArrowException, ValueError, DecodeError) as exc:
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
        for i in idx:
            try:
                fx, fy = self._one(values[i])
            except DecodeError as exc:
                rejects.append(Reject(i, exc.reason, exc.message))
                continue
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


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _column(table: pa.Table, name: str) -> np.ndarray:
    """A float64 column as numpy, nulls marked with the missing-label NaN payload."""
    col = table.column(name)
    arr = col.to_numpy() if col.null_count == 0 else pc.fill_null(col, float(_MISSING)).to_numpy()
    if col.null_count:
        arr = arr.astype(np.float32)
        arr[pc.is_null(col).to_numpy(zero_copy_only=False)] = _MISSING
    return arr


def _stack(table: pa.Table, names: tuple[str, ...], rows: int) -> np.ndarray:
    """Numeric columns side by side as one float32 (rows, len(names)) array: one copy, no float64 detour."""
    x = np.empty((rows, len(names)), np.float32)
    for j, name in enumerate(names):
        x[:, j] = table.column(name).to_numpy()
    return x


def _label_value(record: dict, label: str) -> float:
    if label not in record or record[label] is None:
        raise DecodeError("missing_label", f"field {label!r} is missing")
    v = record[label]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DecodeError("missing_label", f"field {label!r} must be a number, got {v!r}")
    return float(v)


def _check_finite(fx: list[float], fy: float) -> None:
    if not all(math.isfinite(v) for v in fx):
        raise DecodeError("non_finite", "features contain NaN or Inf")
    if not math.isfinite(fy):
        raise DecodeError("non_finite", "label is NaN or Inf")


class JsonDecoder(_BisectingDecoder):
    """One JSON object per record: named feature fields, or one vector field, plus a label."""

    def __init__(
        self, features: tuple[str, ...], label: str, feature_field: str | None, width: int, rule: LabelRule, max_bytes: int
    ) -> None:
        super().__init__(width, rule, max_bytes)
        self.features = features
        self.label = label
        self.feature_field = feature_field
        fields = [pa.field(f, pa.float64()) for f in features]
        if feature_field:
            fields.append(pa.field(feature_field, pa.list_(pa.float64())))
        fields.append(pa.field(label, pa.float64()))
        self._parse = pa_json.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore")
        self._parse_ml = pa_json.ParseOptions(
            explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore", newlines_in_values=True
        )
        self._read = pa_json.ReadOptions(use_threads=False, block_size=1 << 24)

    def _fast(self, chunk: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        if any(map(bytes.isspace, chunk)):
            # a blank record parses to no row: with a two-object record next to it the row count would match
            raise DecodeError("undecodable", "a blank record")
        joined = b"\n".join(chunk)
        multiline = joined.count(b"\n") != len(chunk) - 1
        table = pa_json.read_json(io.BytesIO(joined), read_options=self._read, parse_options=self._parse_ml if multiline else self._parse)
        if table.num_rows != len(chunk):
            raise DecodeError("undecodable", "row count mismatch")
        if self.feature_field:
            col = table.column(self.feature_field).combine_chunks()
            flat = col.flatten()
            if col.null_count or flat.null_count or not pc.all(pc.equal(pc.list_value_length(col), self.width)).as_py():
                raise DecodeError("wrong_shape", "vector length or a null value")
            x = flat.to_numpy(zero_copy_only=False).reshape(len(chunk), self.width)
        else:
            if any(table.column(f).null_count for f in self.features):
                raise DecodeError("wrong_shape", "missing feature")
            x = _stack(table, self.features, len(chunk))
        return x, _column(table, self.label), []

    def _failed_row(self, exc: Exception, n: int) -> int | None:
        m = _ROW_IN_ERROR.search(str(exc)) if isinstance(exc, pa.ArrowInvalid) else None
        row = int(m.group(1)) if m else -1
        return row if 0 <= row < n else None

    def _one(self, value: bytes) -> tuple[list[float], float]:
        try:
            record = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError("undecodable", f"not valid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise DecodeError("wrong_shape", f"expected a JSON object, got {type(record).__name__}")
        if self.feature_field:
            vec = record.get(self.feature_field)
            if not isinstance(vec, list) or len(vec) != self.width:
                got = f"{len(vec)} values" if isinstance(vec, list) else repr(vec)
                raise DecodeError("wrong_shape", f"field {self.feature_field!r} must be a list of {self.width} numbers, got {got}")
            fx = vec
        else:
            missing = [f for f in self.features if record.get(f) is None]
            if missing:
                raise DecodeError("wrong_shape", f"missing feature field(s) {missing[:5]}")
            fx = [record[f] for f in self.features]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fx):
            raise DecodeError("wrong_shape", "every feature must be a number")
        fy = _label_value(record, self.label)
        fx = [float(v) for v in fx]
        _check_finite(fx, fy)
        return fx, fy


class CsvDecoder(_BisectingDecoder):
    """One CSV line per record, no header; column names from the config."""

    def __init__(
        self, columns: tuple[str, ...], features: tuple[str, ...], label: str, delimiter: str, rule: LabelRule, max_bytes: int
    ) -> None:
        super().__init__(len(features), rule, max_bytes)
        self.columns = columns
        self.features = features
        self.label = label
        wanted = [*features, label]
        self._read = pa_csv.ReadOptions(column_names=list(columns), use_threads=False, block_size=1 << 24)
        self._parse = pa_csv.ParseOptions(delimiter=delimiter)
        # the batch path skips a line with the wrong number of fields (an empty one too) and notes it
        self._parse_batch = pa_csv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False, invalid_row_handler=self._invalid_row)
        self._invalid: list[int] = []  # line numbers (1-based) skipped by the current read
        self._convert = pa_csv.ConvertOptions(
            column_types={c: pa.float64() for c in wanted}, include_columns=wanted, null_values=[""], strings_can_be_null=False
        )

    def _invalid_row(self, row: pa_csv.InvalidRow) -> str:
        self._invalid.append(row.number)
        return "skip"

    def _fast(self, chunk: list[bytes]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        joined = b"\n".join(v.rstrip(b"\r\n") for v in chunk)
        if joined.count(b"\n") != len(chunk) - 1:
            raise DecodeError("wrong_shape", "a record holds more than one line")
        self._invalid = []
        # pyarrow hands the handler a line as text: one that is not UTF-8 would fail inside the callback
        parse = self._parse_batch if joined.isascii() or _is_utf8(joined) else self._parse
        table = pa_csv.read_csv(io.BytesIO(joined + b"\n"), self._read, parse, self._convert)
        skipped = [n - 1 for n in self._invalid]  # one line per record: line n is record n - 1
        if table.num_rows != len(chunk) - len(skipped) or not all(0 <= i < len(chunk) for i in skipped):
            raise DecodeError("wrong_shape", "row count mismatch")
        if any(table.column(f).null_count for f in self.features):
            raise DecodeError("wrong_shape", "empty feature")
        x = _stack(table, self.features, table.num_rows)
        return x, _column(table, self.label), skipped

    def _one(self, value: bytes) -> tuple[list[float], float]:
        line = value.rstrip(b"\r\n")
        if b"\n" in line:
            raise DecodeError("wrong_shape", "a CSV record must be one line")
        try:
            table = pa_csv.read_csv(io.BytesIO(line + b"\n"), self._read, self._parse, self._convert)
        except pa.ArrowInvalid as exc:
            text = str(exc)
            reason = "wrong_shape" if "columns" in text or "conversion" in text.lower() else "undecodable"
            raise DecodeError(reason, text.splitlines()[0][:300]) from None
        if any(table.column(f).null_count for f in self.features):
            raise DecodeError("wrong_shape", "a feature column is empty")
        if table.column(self.label).null_count:
            raise DecodeError("missing_label", f"column {self.label!r} is empty")
        fx = [float(table.column(f)[0].as_py()) for f in self.features]
        fy = float(table.column(self.label)[0].as_py())
        _check_finite(fx, fy)
        return fx, fy


class RawDecoder:
    """Little-endian float32 features followed by the label: ``4 * (width + 1)`` bytes."""

    def __init__(self, width: int, rule: LabelRule, max_bytes: int) -> None:
        self.width = width
        self.rule = rule
        self.max_bytes = max_bytes
        self.record_bytes = 4 * (width + 1)

    def decode(self, values: list[bytes | None]) -> Decoded:
        n = len(values)
        lengths = _lengths(values)
        ok = lengths == self.record_bytes
        rejects: list[Reject] = []
        if ok.all():
            good = values
            idx = np.arange(n, dtype=np.int64)
        else:
            for i in np.flatnonzero(~ok):
                got = int(lengths[i])
                if got > self.max_bytes:
                    rejects.append(Reject(int(i), "oversized", f"record is {got} bytes, limit is {self.max_bytes} (data.max_record_bytes)"))
                elif got <= 0:
                    rejects.append(
                        Reject(int(i), "undecodable", "record value is empty" if got == 0 else "record value is null (tombstone)")
                    )
                else:
                    rejects.append(
                        Reject(
                            int(i),
                            "wrong_shape",
                            f"raw record must be {self.record_bytes} bytes ({self.width} features + label as float32), got {got}",
                        )
                    )
            good = list(compress(values, ok))
            idx = np.flatnonzero(ok).astype(np.int64)
        flat = np.frombuffer(b"".join(good), dtype="<f4").reshape(len(good), self.width + 1)
        return _finish(flat[:, : self.width], flat[:, self.width], idx, self.rule, rejects)


class ArrowDecoder:
    """An Arrow IPC stream per record, many rows each; bad rows rejected, good rows kept."""

    def __init__(
        self, features: tuple[str, ...], label: str, feature_field: str | None, width: int, rule: LabelRule, max_bytes: int
    ) -> None:
        self.features = features
        self.label = label
        self.feature_field = feature_field
        self.width = width
        self.rule = rule
        self.max_bytes = max_bytes

    def decode(self, values: list[bytes | None]) -> Decoded:
        good, rejects = _screen(values, self.max_bytes)
        tables: list[tuple[int, pa.Table]] = []
        for i in good:
            try:
                tables.append((i, self._read(values[i])))
            except DecodeError as exc:
                rejects.append(Reject(i, exc.reason, exc.message))
        xs, ys, idxs, counts = [], [], [], []
        # Runs of messages with one schema are converted as one table: one cast per column
        # per run, not per message (~9 us each); 0.35 -> 0.12 us a row, docs/BENCHMARKS.md.
        for run in _schema_runs(tables):
            if len(run) > 1:
                try:
                    x, y = self._columns(pa.concat_tables([t for _, t in run]))
                except DecodeError:
                    pass  # some message in the run is bad: find it one by one
                else:
                    xs.append(x)
                    ys.append(y)
                    idxs.extend(i for i, _ in run)
                    counts.extend(t.num_rows for _, t in run)
                    continue
            for i, table in run:
                try:
                    x, y = self._columns(table)
                except DecodeError as exc:
                    rejects.append(Reject(i, exc.reason, exc.message))
                    continue
                xs.append(x)
                ys.append(y)
                idxs.append(i)
                counts.append(len(y))
        if not xs:
            return _finish(np.empty((0, self.width)), np.empty(0), np.empty(0, np.int64), self.rule, rejects)
        counts_np = np.asarray(counts, np.int64)
        msg_index = np.repeat(np.asarray(idxs, np.int64), counts_np)
        rows = np.arange(len(msg_index), dtype=np.int64) - np.repeat(np.cumsum(counts_np) - counts_np, counts_np)
        out = _finish(np.concatenate(xs), np.concatenate(ys), msg_index, self.rule, [], rows)
        rejects.extend(_group_rows(out.rejects))
        rejects.sort(key=lambda r: r.index)
        out.rejects = rejects
        return out

    def _one(self, value: bytes) -> tuple[np.ndarray, np.ndarray]:
        return self._columns(self._read(value))

    @staticmethod
    def _read(value: bytes) -> pa.Table:
        try:
            return pa.ipc.open_stream(pa.py_buffer(value)).read_all()
        except (pa.ArrowException, OSError) as exc:
            raise DecodeError("undecodable", f"not an Arrow IPC stream: {exc}") from None

    def _columns(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        names = set(table.column_names)
        wanted = [self.feature_field] if self.feature_field else list(self.features)
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DecodeError("wrong_shape", f"Arrow stream lacks column(s) {missing[:5]}")
        if self.label not in names:
            raise DecodeError("missing_label", f"Arrow stream lacks the label column {self.label!r}")
        try:
            if self.feature_field:
                col = table.column(self.feature_field).combine_chunks()
                if col.null_count or (len(col) and not pc.all(pc.equal(pc.list_value_length(col), self.width)).as_py()):
                    raise DecodeError("wrong_shape", f"column {self.feature_field!r} must hold lists of {self.width} numbers")
                x = col.flatten().cast(pa.float64()).to_numpy(zero_copy_only=False).reshape(len(col), self.width)
            else:
                if any(table.column(f).null_count for f in self.features):
                    raise DecodeError("wrong_shape", "a feature column has nulls")
                x = np.empty((table.num_rows, len(self.features)), np.float32)
                for j, f in enumerate(self.features):
                    x[:, j] = table.column(f).cast(pa.float64()).to_numpy()  # via float64, as a float64 column would round
            y = _column(
                table.set_column(table.column_names.index(self.label), self.label, table.column(self.label).cast(pa.float64())), self.label
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise DecodeError("wrong_shape", f"columns must be numeric: {exc}") from None
        return x, y


def _schema_runs(tables: list[tuple[int, pa.Table]]) -> list[list[tuple[int, pa.Table]]]:
    """Consecutive messages grouped while their schemas are equal (message order is kept)."""
    runs: list[list[tuple[int, pa.Table]]] = []
    for item in tables:
        if runs and runs[-1][-1][1].schema.equals(item[1].schema):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _group_rows(row_rejects: list[Reject]) -> list[Reject]:
    """Arrow: fold row-level rejects into one reject per message and reason, naming the bad rows."""
    by_msg: dict[tuple[int, str], list[Reject]] = {}
    for r in row_rejects:
        by_msg.setdefault((r.index, r.reason), []).append(r)
    out = []
    for (msg, _reason), rs in by_msg.items():
        rs.sort(key=lambda r: r.rows[0])
        out.append(Reject(msg, rs[0].reason, f"{len(rs)} row(s) rejected; first: {rs[0].error}", tuple(r.rows[0] for r in rs)))
    return out


def make_decoder(data: object, rule: LabelRule) -> Decoder:
    """The decoder for a :class:`daemon.config.DataConfig`-shaped object."""
    fmt = data.format
    if fmt == "raw":
        return RawDecoder(data.width, rule, data.max_record_bytes)
    if fmt == "json":
        return JsonDecoder(tuple(data.features), data.label, data.feature_field, data.width, rule, data.max_record_bytes)
    if fmt == "csv":
        columns = tuple(data.csv.columns) or (*data.features, data.label)
        return CsvDecoder(columns, tuple(data.features), data.label, data.csv.delimiter, rule, data.max_record_bytes)
    if fmt == "arrow":
        return ArrowDecoder(tuple(data.features), data.label, data.feature_field, data.width, rule, data.max_record_bytes)
    raise ValueError(f"unknown data.format {fmt!r}")
