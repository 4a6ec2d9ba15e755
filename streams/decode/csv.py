"""CSV: one line per record, no header; column names from the config.

Numeric columns are read as float64 (an empty cell is the missing mark when
``data.missing`` is impute), categorical columns as strings (an empty cell is the field's
missing value; an integer id hashes as its digits, as in JSON), the label as a number, or
as a class name with ``trainer.classes``.  ``true``/``false`` are not numbers in CSV:
write 1/0.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from streamtrain.streams.decode.common import _MISSING, UNKNOWN_CLASS, LabelRule, _BisectingDecoder, _column, _stack
from streamtrain.streams.errors import DecodeError
from streamtrain.streams.features.spec import FeatureSpec


class CsvDecoder(_BisectingDecoder):
    """One CSV line per record, no header; column names from the config."""

    def __init__(
        self,
        columns: tuple[str, ...],
        features: tuple[str, ...],
        label: str,
        delimiter: str,
        rule: LabelRule,
        max_bytes: int,
        spec: FeatureSpec | None = None,
    ) -> None:
        super().__init__(len(features), rule, max_bytes)
        self.columns = columns
        self.features = features
        self.label = label
        self.spec = spec or FeatureSpec(numbers=features)
        self.fields = len(self.spec.categorical)
        self.impute = self.spec.impute
        wanted = [*features, *self.spec.categorical, label]
        self._read = pa_csv.ReadOptions(column_names=list(columns), use_threads=False, block_size=1 << 24)
        self._parse = pa_csv.ParseOptions(delimiter=delimiter)
        # the batch path skips a line with the wrong number of fields (an empty one too) and notes it
        self._parse_batch = pa_csv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False, invalid_row_handler=self._invalid_row)
        self._invalid: list[int] = []  # line numbers (1-based) skipped by the current read
        types = {c: pa.float64() for c in features} | {c: pa.string() for c in self.spec.categorical}
        types[label] = pa.string() if rule.classes else pa.float64()
        self._convert = pa_csv.ConvertOptions(
            column_types=types, include_columns=wanted, null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True
        )
        self._classes = pa.array(list(rule.classes), pa.string())

    def _invalid_row(self, row: pa_csv.InvalidRow) -> str:
        self._invalid.append(row.number)
        return "skip"

    def _fast(self, chunk: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        lines = [v.rstrip(b"\r\n") for v in chunk]
        joined = b"\n".join(lines)
        bom = _BOM in joined
        if bom:  # the parser drops a BOM at the start of its input only: each record's one, as alone
            lines = [line.removeprefix(_BOM) for line in lines]
            joined = b"\n".join(lines)
        alone: list[int] = []
        parsed = range(len(lines))  # chunk position of each line parsed
        if b"\r" in joined or b'"' in joined or not all(lines) or bom:
            # found by fuzzing: a bare CR ends a line for the parser, an open quote runs on into the next record,
            # a blank line is a row of nulls to the batch parse, and a second BOM would be dropped at the start of
            # the batch only: such records are decoded alone
            alone = [i for i, line in enumerate(lines) if not line or b"\r" in line or line.count(b'"') % 2 or line.startswith(_BOM)]
            if alone:
                parsed = [i for i in range(len(lines)) if i not in set(alone)]
                joined = b"\n".join(lines[i] for i in parsed)
        if joined.count(b"\n") != len(parsed) - 1:
            raise DecodeError("wrong_shape", "a record holds more than one line")
        if not parsed:
            return np.empty((0, self.width), np.float32), np.empty(0, np.float32), np.empty((0, self.fields), np.int64), alone
        self._invalid = []
        # pyarrow hands the handler a line as text: one that is not UTF-8 would fail inside the callback
        parse = self._parse_batch if joined.isascii() or _is_utf8(joined) else self._parse
        table = pa_csv.read_csv(io.BytesIO(joined + b"\n"), self._read, parse, self._convert)
        invalid = [n - 1 for n in self._invalid]  # one line per record: line n is the record parsed n - 1th
        if table.num_rows != len(parsed) - len(invalid) or not all(0 <= i < len(parsed) for i in invalid):
            raise DecodeError("wrong_shape", "row count mismatch")
        rows = np.delete(np.asarray(parsed, np.int64), invalid)  # chunk position of each row of the table
        if not self.impute:
            empty = None
            for f in self.features:
                if table.column(f).null_count:
                    nulls = pc.is_null(table.column(f)).to_numpy(zero_copy_only=False)
                    empty = nulls if empty is None else empty | nulls
            if empty is not None:  # a blank line, an empty cell: those records are decoded alone, for their reason
                alone += rows[empty].tolist()
                table = table.filter(pa.array(~empty))
        skipped = sorted(alone + [parsed[i] for i in invalid])
        x, y, ids = self._columns(table)
        return x, y, ids, skipped

    def _columns(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = _stack(table, self.features, table.num_rows)
        if self.rule.classes:
            names = table.column(self.label)
            index = pc.index_in(names, value_set=self._classes)
            y = pc.fill_null(index.cast(pa.float32()), float(UNKNOWN_CLASS)).to_numpy().astype(np.float32)
            y[pc.is_null(names).to_numpy(zero_copy_only=False)] = _MISSING
        else:
            y = _column(table, self.label)
        ids = np.empty((table.num_rows, self.fields), np.int64)
        for j, name in enumerate(self.spec.categorical):
            ids[:, j] = self.spec.rows_arrow(j, table.column(name))
        return x, y, ids

    def _one(self, value: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        line = value.rstrip(b"\r\n")
        if b"\n" in line:
            raise DecodeError("wrong_shape", "a CSV record must be one line")
        try:
            table = pa_csv.read_csv(io.BytesIO(line + b"\n"), self._read, self._parse, self._convert)
        except pa.ArrowInvalid as exc:
            text = str(exc)
            reason = "wrong_shape" if "columns" in text or "conversion" in text.lower() else "undecodable"
            raise DecodeError(reason, text.splitlines()[0][:300]) from None
        if table.num_rows != 1:
            raise DecodeError(
                "undecodable", "a CSV record must be one line of values, got a blank line" if not line.strip() else "not one CSV row"
            )
        if not self.impute and any(table.column(f).null_count for f in self.features):
            raise DecodeError("wrong_shape", "a feature column is empty (data.missing: reject)")
        return self._columns(table)


_BOM = b"\xef\xbb\xbf"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
