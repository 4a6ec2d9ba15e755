"""JSON: one object per record, named feature fields or one vector field, plus a label."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from streamtrain.streams.decode.common import LabelRule, _BisectingDecoder, _check_finite, _column, _stack
from streamtrain.streams.errors import DecodeError

_ROW_IN_ERROR = re.compile(r" in row (\d+)$")


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

    def _fast(self, chunk: list[bytes]) -> tuple[np.ndarray, np.ndarray, list[int]]:
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


def _label_value(record: dict, label: str) -> float:
    if label not in record or record[label] is None:
        raise DecodeError("missing_label", f"field {label!r} is missing")
    v = record[label]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DecodeError("missing_label", f"field {label!r} must be a number, got {v!r}")
    return float(v)
