"""Arrow: an IPC stream per record, many rows each.

Numeric columns of any numeric or boolean type (nulls are the missing mark when
``data.missing`` is impute), categorical columns of strings, binary, dictionary-encoded
strings, integers or booleans (nulls: the field's missing value; a dictionary is hashed
once per message, not per row), a numeric label (or strings naming ``trainer.classes``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamtrain.streams.decode.common import _MISSING, UNKNOWN_CLASS, Decoded, LabelRule, Reject, _column, _finish, _screen, each_record
from streamtrain.streams.errors import DecodeError
from streamtrain.streams.features.spec import FeatureSpec


class ArrowDecoder:
    """An Arrow IPC stream per record, many rows each; bad rows rejected, good rows kept."""

    def __init__(
        self,
        features: tuple[str, ...],
        label: str,
        feature_field: str | None,
        width: int,
        rule: LabelRule,
        max_bytes: int,
        spec: FeatureSpec | None = None,
    ) -> None:
        self.features = features
        self.label = label
        self.feature_field = feature_field
        self.width = width
        self.rule = rule
        self.max_bytes = max_bytes
        self.spec = spec or FeatureSpec(numbers=features)
        self.impute = self.spec.impute and not feature_field
        self.fields = len(self.spec.categorical)
        self._classes = pa.array(list(rule.classes), pa.string())

    def decode(self, values: list[bytes | None]) -> Decoded:
        good, rejects, nbytes = _screen(values, self.max_bytes)
        tables = list(each_record(self._read, values, good, rejects))
        xs, ys, ids, idxs, counts = [], [], [], [], []
        # Runs of messages with one schema are converted as one table: one cast per column
        # per run, not per message (~9 us each); 0.35 -> 0.12 us a row, docs/BENCHMARKS.md.
        for run in _schema_runs(tables):
            if len(run) > 1:
                try:
                    x, y, i_ = self._columns(pa.concat_tables([t for _, t in run]))
                except Exception:
                    pass  # some message in the run is bad: find it one by one
                else:
                    xs.append(x)
                    ys.append(y)
                    ids.append(i_)
                    idxs.extend(i for i, _ in run)
                    counts.extend(t.num_rows for _, t in run)
                    continue
            tables_of_run = dict(run)
            for i, (x, y, i_) in each_record(self._columns, tables_of_run, tables_of_run, rejects):
                xs.append(x)
                ys.append(y)
                ids.append(i_)
                idxs.append(i)
                counts.append(len(y))
        if not xs:
            empty = Decoded.empty(self.width, self.fields)
            return _finish(empty.x, empty.y, empty.msg_index, self.rule, rejects, nbytes=nbytes, ids=empty.ids)
        counts_np = np.asarray(counts, np.int64)
        msg_index = np.repeat(np.asarray(idxs, np.int64), counts_np)
        rows = np.arange(len(msg_index), dtype=np.int64) - np.repeat(np.cumsum(counts_np) - counts_np, counts_np)
        out = _finish(
            np.concatenate(xs), np.concatenate(ys), msg_index, self.rule, [], rows, nbytes, ids=np.concatenate(ids), impute=self.impute
        )
        rejects.extend(_group_rows(out.rejects))
        rejects.sort(key=lambda r: r.index)
        out.rejects = rejects
        return out

    @staticmethod
    def _read(value: bytes) -> pa.Table:
        reader = pa.BufferReader(pa.py_buffer(value))
        try:
            table = pa.ipc.open_stream(reader).read_all()
            # a stream's buffers are not checked as it is read: offsets or lengths out of bounds in a
            # corrupt record would be followed later, outside any exception's reach
            table.validate(full=True)
        except (pa.ArrowException, OSError) as exc:
            raise DecodeError("undecodable", f"not an Arrow IPC stream: {exc}") from None
        if reader.tell() != len(value):  # a second stream, or garbage, after the end: not one record's rows
            raise DecodeError("undecodable", f"{len(value) - reader.tell()} byte(s) after the end of the Arrow IPC stream")
        return table

    @np.errstate(over="ignore")  # a value beyond float32 becomes inf, rejected as non_finite by _finish
    def _columns(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        names = set(table.column_names)
        wanted = [self.feature_field] if self.feature_field else list(self.features)
        missing = [c for c in (*wanted, *self.spec.categorical) if c not in names]
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
                if not self.impute and any(table.column(f).null_count for f in self.features):
                    raise DecodeError("wrong_shape", "a feature column has nulls (data.missing: reject)")
                x = np.empty((table.num_rows, len(self.features)), np.float32)
                for j, f in enumerate(self.features):
                    col = table.column(f).cast(pa.float64())  # via float64, as a float64 column would round
                    if col.null_count:
                        x[:, j] = pc.fill_null(col, 0.0).to_numpy()
                        x[pc.is_null(col).to_numpy(zero_copy_only=False), j] = _MISSING
                    else:
                        x[:, j] = col.to_numpy()
            label = table.column(self.label)
            if self.rule.classes and (
                pa.types.is_string(label.type) or pa.types.is_large_string(label.type) or pa.types.is_dictionary(label.type)
            ):
                index = pc.index_in(label.cast(pa.string()), value_set=self._classes)
                y = pc.fill_null(index.cast(pa.float32()), float(UNKNOWN_CLASS)).to_numpy().astype(np.float32)
                y[pc.is_null(label).to_numpy(zero_copy_only=False)] = _MISSING
            else:
                y = _column(table.set_column(table.column_names.index(self.label), self.label, label.cast(pa.float64())), self.label)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise DecodeError("wrong_shape", f"columns must be numeric: {exc}") from None
        ids = np.empty((table.num_rows, self.fields), np.int64)
        for j, name in enumerate(self.spec.categorical):
            ids[:, j] = self.spec.rows_arrow(j, table.column(name))
        return x, y, ids


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
