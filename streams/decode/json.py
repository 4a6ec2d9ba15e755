"""JSON: one object per record, named feature fields or one vector field, plus a label.

Each record is parsed on its own by msgspec into a typed row (a float per feature, or a
list of exactly ``width`` floats, and a float label; other fields skipped unparsed), so a
bad record can only ever fail itself.  A batch whose every record fits the type is
decoded in one C loop; when one does not, that batch is decoded record by record and
each failing record is looked at again with Python's ``json`` to name its reason.
"""

from __future__ import annotations

import json
from itertools import chain
from operator import attrgetter
from typing import Annotated

import msgspec
import numpy as np

from streamtrain.streams.decode.common import Decoded, LabelRule, Reject, _check_finite, _finish, _screen
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
        except (msgspec.DecodeError, UnicodeDecodeError):
            rows, idx = self._one_by_one(values, good, rejects)
            rejects.sort(key=lambda r: r.index)
        x, y = self._arrays(rows)
        return _finish(x, y, idx, self.rule, rejects, nbytes=nbytes)

    def _one_by_one(self, values: list, good: range | list[int], rejects: list[Reject]) -> tuple[list, np.ndarray]:
        rows, ok = [], []
        for i in good:
            try:
                rows.append(self._row(values[i]))
            except (msgspec.DecodeError, UnicodeDecodeError):
                try:
                    fx, fy = self._one(values[i])  # the reason; or a record only Python's json reads (a huge integer)
                except DecodeError as exc:
                    rejects.append(Reject(i, exc.reason, exc.message))
                    continue
                rows.append(self._make(fx, fy) if self.feature_field else self._make(*fx, fy))
            ok.append(i)
        return rows, np.asarray(ok, np.int64)

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
