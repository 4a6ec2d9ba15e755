"""CSV: one line per record, no header; column names from the config."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from streamtrain.streams.decode.common import LabelRule, _BisectingDecoder, _check_finite, _column, _stack
from streamtrain.streams.errors import DecodeError


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
        lines = [v.rstrip(b"\r\n") for v in chunk]
        joined = b"\n".join(lines)
        alone: list[int] = []
        parsed = range(len(lines))  # chunk position of each line parsed
        if b"\r" in joined or b'"' in joined:
            # found by fuzzing: a bare CR ends a line for the parser, and an open quote runs on into the next
            # record, so such records would not decode as they do alone: they are decoded alone
            alone = [i for i, line in enumerate(lines) if b"\r" in line or line.count(b'"') % 2]
            if alone:
                parsed = [i for i in range(len(lines)) if i not in set(alone)]
                joined = b"\n".join(lines[i] for i in parsed)
        if joined.count(b"\n") != len(parsed) - 1:
            raise DecodeError("wrong_shape", "a record holds more than one line")
        if not parsed:
            return np.empty((0, self.width), np.float32), np.empty(0, np.float32), alone
        self._invalid = []
        # pyarrow hands the handler a line as text: one that is not UTF-8 would fail inside the callback
        parse = self._parse_batch if joined.isascii() or _is_utf8(joined) else self._parse
        table = pa_csv.read_csv(io.BytesIO(joined + b"\n"), self._read, parse, self._convert)
        invalid = [n - 1 for n in self._invalid]  # one line per record: line n is the record parsed n - 1th
        if table.num_rows != len(parsed) - len(invalid) or not all(0 <= i < len(parsed) for i in invalid):
            raise DecodeError("wrong_shape", "row count mismatch")
        rows = np.delete(np.asarray(parsed, np.int64), invalid)  # chunk position of each row of the table
        empty = None
        for f in self.features:
            if table.column(f).null_count:
                nulls = pc.is_null(table.column(f)).to_numpy(zero_copy_only=False)
                empty = nulls if empty is None else empty | nulls
        if empty is not None:  # a blank line, an empty cell: those records are decoded alone, for their reason
            alone += rows[empty].tolist()
            table = table.filter(pa.array(~empty))
        skipped = sorted(alone + [parsed[i] for i in invalid])
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
        if table.num_rows != 1:
            raise DecodeError(
                "undecodable", "a CSV record must be one line of values, got a blank line" if not line.strip() else "not one CSV row"
            )
        if any(table.column(f).null_count for f in self.features):
            raise DecodeError("wrong_shape", "a feature column is empty")
        if table.column(self.label).null_count:
            raise DecodeError("missing_label", f"column {self.label!r} is empty")
        fx = [float(table.column(f)[0].as_py()) for f in self.features]
        fy = float(table.column(self.label)[0].as_py())
        _check_finite(fx, fy)
        return fx, fy


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
