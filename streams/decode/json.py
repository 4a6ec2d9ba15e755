"""JSON: one object per record, named feature fields or one vector field, plus a label.

Each record is parsed on its own by msgspec into a typed row (a float per feature, or a
list of exactly ``width`` floats, and a float label; other fields skipped unparsed).  A
batch whose every record fits the type is decoded in one C loop; when one does not, that
batch is decoded record by record through :func:`~streamtrain.streams.decode.common.each_record`
(so a bad record can only ever fail itself) and each failing record is looked at again
with Python's ``json`` to name its reason.
"""

from __future__ import annotations

import json
from itertools import chain
from operator import attrgetter
from typing import Annotated

import msgspec
import numpy as np

from streamtrain.streams.decode.common import Decoded, LabelRule, _check_finite, _finish, _screen, each_record
from streamtrain.streams.errors import DecodeError


class JsonDecoder:
    """One JSON object per record: named feature fields, or one vector field, plus a label."""

    def __init__(
        self, features: tuple[str, ...], label: str, feature_field: str | None, width: int, rule: LabelRule, max_bytes: int
    ) -> None:
        self.width = width
        self.rule = rule
        self.max_bytes = max_bytes
        self.features = features
        self.label = label
        self.feature_field = feature_field
        # attributes a0.. stand for the JSON names (which need not be identifiers); bools, strings and nulls
        # are not floats to msgspec, so the type alone rejects what the trainer cannot take
        names = [feature_field] if feature_field else list(features)
        vector = Annotated[list[float], msgspec.Meta(min_length=width, max_length=width)]
        fields = [(f"a{i}", vector if feature_field else float) for i in range(len(names))] + [("label", float)]
        row = msgspec.defstruct("Row", fields, rename={**{f"a{i}": n for i, n in enumerate(names)}, "label": label}, gc=False)
        self._make = row
        self._row = msgspec.json.Decoder(row).decode
        self._vector = attrgetter("a0")
        self._label = attrgetter("label")

    def decode(self, values: list[bytes | None]) -> Decoded:
        good, rejects, nbytes = _screen(values, self.max_bytes)
        chunk = values if len(good) == len(values) else [values[i] for i in good]
        try:
            rows = list(map(self._row, chunk))
            idx = np.arange(len(values), dtype=np.int64) if chunk is values else np.asarray(good, np.int64)
        except Exception:  # some record does not fit the type (or trips the parser): each on its own
            rows, ok = [], []
            for i, row in each_record(self._record, values, good, rejects):
                rows.append(row)
                ok.append(i)
            idx = np.asarray(ok, np.int64)
            rejects.sort(key=lambda r: r.index)
        x, y = self._arrays(rows)
        return _finish(x, y, idx, self.rule, rejects, nbytes=nbytes)

    def _record(self, value: bytes) -> object:
        """One record's typed row; when msgspec refuses it, Python's json names the reason (or reads it: a huge integer)."""
        try:
            return self._row(value)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            fx, fy = self._one(value)
            return self._make(fx, fy) if self.feature_field else self._make(*fx, fy)

    @np.errstate(over="ignore")  # a value beyond float32 becomes inf, rejected as non_finite by _finish
    def _arrays(self, rows: list) -> tuple[np.ndarray, np.ndarray]:
        n, w = len(rows), self.width
        if self.feature_field:
            x = np.fromiter(chain.from_iterable(map(self._vector, rows)), np.float32, n * w).reshape(n, w)
            return x, np.fromiter(map(self._label, rows), np.float32, n)
        table = np.fromiter(chain.from_iterable(map(msgspec.structs.astuple, rows)), np.float32, n * (w + 1)).reshape(n, w + 1)
        return table[:, :w], table[:, w]

    def _one(self, value: bytes) -> tuple[list[float], float]:
        try:
            record = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError("undecodable", f"not valid JSON: {exc}") from None
        except RecursionError:
            raise DecodeError("undecodable", "JSON nested too deeply (past Python's recursion limit)") from None
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
        try:
            fx = [float(v) for v in fx]
        except OverflowError:
            raise DecodeError("non_finite", "a feature is an integer too large for a float") from None
        _check_finite(fx, fy)
        return fx, fy


def _label_value(record: dict, label: str) -> float:
    if label not in record or record[label] is None:
        raise DecodeError("missing_label", f"field {label!r} is missing")
    v = record[label]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DecodeError("missing_label", f"field {label!r} must be a number, got {v!r}")
    try:
        return float(v)
    except OverflowError:
        raise DecodeError("non_finite", "the label is an integer too large for a float") from None
