"""JSON: one object per record: numeric fields (or one vector field), categorical fields, and a label.

Each record is parsed on its own by msgspec into a typed row: a number per numeric
feature (true/false read as 1/0; ``null`` or an absent key is the missing mark when
``data.missing`` is impute), a string, integer or boolean per categorical field (``null``
or absent: the field's missing value), a number or boolean label (or a class name, with
``trainer.classes``); other fields are skipped unparsed.  A batch whose every record fits
the type is decoded in one C loop; when one does not, that batch is decoded record by
record through :func:`~streamtrain.streams.decode.common.each_record` (so a bad record can
only ever fail itself) and each failing record is looked at again with Python's ``json``
to name its reason.  The categorical values of the batch are hashed column by column
(:mod:`streamtrain.streams.features.hashing`).
"""

from __future__ import annotations

import json
from itertools import chain
from operator import attrgetter
from typing import Annotated

import msgspec
import numpy as np

from streamtrain.streams.decode.common import Decoded, LabelRule, Reject, _check_finite, _finish, _screen, each_record
from streamtrain.streams.errors import DecodeError
from streamtrain.streams.features.hashing import canonical
from streamtrain.streams.features.spec import MISSING_NUMBER, FeatureSpec

_NUMBER = float | bool  # msgspec: a JSON number, or true/false (read as 1/0)
_CATEGORY = str | int | bool | None


class JsonDecoder:
    """One JSON object per record: named numeric fields or one vector field, categorical fields, a label."""

    def __init__(
        self,
        features: tuple[str, ...],
        label: str | None,
        feature_field: str | None,
        width: int,
        rule: LabelRule,
        max_bytes: int,
        spec: FeatureSpec | None = None,
    ) -> None:
        self.width = width
        self.rule = rule
        self.max_bytes = max_bytes
        self.features = features
        self.label = label
        self.feature_field = feature_field
        self.spec = spec or FeatureSpec(numbers=features)
        self.impute = self.spec.impute and not feature_field
        cats = self.spec.categorical
        # attributes a0.., c0.. stand for the JSON names (which need not be identifiers); the type alone rejects
        # what the trainer cannot take (a string for a number, a list for a category)
        names = [feature_field] if feature_field else list(features)
        vector = Annotated[list[float], msgspec.Meta(min_length=width, max_length=width)]
        number = (_NUMBER | None, None) if self.impute else (_NUMBER,)
        label_type = float | bool | str if rule.classes else float | bool
        fields = [(f"a{i}", vector) if feature_field else (f"a{i}", *number) for i in range(len(names))]
        fields += [(f"c{j}", _CATEGORY, None) for j in range(len(cats))] + ([("label", label_type)] if label else [])
        rename = {**{f"a{i}": n for i, n in enumerate(names)}, **{f"c{j}": c for j, c in enumerate(cats)}}
        if label:  # None: the label comes on a topic of its own (streams/join/); y is 0 until the join sets it
            rename["label"] = label
        row = msgspec.defstruct("Row", fields, rename=rename, gc=False, kw_only=True)
        self._make = row
        self._row = msgspec.json.Decoder(row).decode
        self._numbers = attrgetter(*[f"a{i}" for i in range(len(names))]) if names else None
        self._categories = [attrgetter(f"c{j}") for j in range(len(cats))]
        self._label = attrgetter("label")

    def decode(self, values: list[bytes | None]) -> Decoded:
        good, rejects, nbytes = _screen(values, self.max_bytes)
        chunk = values if len(good) == len(values) else [values[i] for i in good]
        try:
            rows = list(map(self._row, chunk))
            idx = np.arange(len(values), dtype=np.int64) if chunk is values else np.asarray(good, np.int64)
            x, y, ids = self._arrays(rows)
        except Exception:  # some record does not fit the type (or trips the parser, or has a category too long): each alone
            rows, ok = [], []
            for i, row in each_record(self._record, values, good, rejects):
                rows.append(row)
                ok.append(i)
            idx = np.asarray(ok, np.int64)
            rejects.sort(key=lambda r: r.index)
            x, y, ids = self._arrays(rows)
        return _finish(x, y, idx, self.rule, rejects, nbytes=nbytes, ids=ids, impute=self.impute)

    def _record(self, value: bytes) -> object:
        """One record's typed row; when msgspec refuses it, Python's json names the reason (or reads it: a huge integer)."""
        try:
            row = self._row(value)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            row = self._one(value)
        self._arrays([row])  # its categories' lengths, its label's class: what fails it fails it here, alone
        return row

    def decode_objects(self, objects: list[dict], idx: list[int], rejects: list[Reject], nbytes: int) -> Decoded:
        """Rows of records already read into dicts (Avro, Protobuf), by the same rules as JSON ones.

        ``idx`` is each object's message in the batch; ``rejects`` already holds the batch's
        other rejects.  The dicts are typed by msgspec in C (``msgspec.convert``); when one
        does not fit, each is looked at alone, for its reason, as a JSON record would be.
        """
        try:
            rows = list(map(self._convert, objects))
            x, y, ids = self._arrays(rows, nan_in_data=True)
            positions = np.asarray(idx, np.int64)
        except Exception:  # some record does not fit the type: each alone, through the per-record boundary
            rows, ok = [], []
            for k, row in each_record(self._object_row, objects, range(len(objects)), rejects):
                rows.append(row)
                ok.append(idx[k])
            positions = np.asarray(ok, np.int64)
            rejects.sort(key=lambda r: r.index)
            x, y, ids = self._arrays(rows, nan_in_data=True)
        return _finish(x, y, positions, self.rule, rejects, nbytes=nbytes, ids=ids, impute=self.impute)

    def _convert(self, record: dict) -> object:
        return msgspec.convert(record, self._make)

    def _object_row(self, record: dict) -> object:
        try:
            row = self._convert(record)
        except msgspec.ValidationError:
            row = self._row_of(record)
        self._arrays([row], nan_in_data=True)
        return row

    @np.errstate(over="ignore")  # a value beyond float32 becomes inf, rejected as non_finite by _finish
    def _arrays(self, rows: list, nan_in_data: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, w = len(rows), self.width
        y = None
        if self.feature_field:
            x = np.fromiter(chain.from_iterable(map(attrgetter("a0"), rows)), np.float32, n * w).reshape(n, w)
        elif w and not self._categories and not self.rule.classes and self.label:  # numbers and label only: one pass over the rows
            table = np.fromiter(chain.from_iterable(map(msgspec.structs.astuple, rows)), np.float32, n * (w + 1)).reshape(n, w + 1)
            x, y = table[:, :w], table[:, w]
        elif w:
            numbers = map(self._numbers, rows) if w > 1 else zip(map(self._numbers, rows))
            x = np.fromiter(chain.from_iterable(numbers), np.float32, n * w).reshape(n, w)
        else:
            x = np.empty((n, 0), np.float32)
        if self.impute and w:
            # numpy reads None (a missing number) as NaN; no NaN comes from the data on this path (a NaN
            # literal is not JSON to msgspec, and Python's json path rejects it as non_finite): each is a None
            absent = np.isnan(x)
            if absent.any():
                if nan_in_data:  # a dict's NaN may be a real one (an Avro/Protobuf double): only a None is missing
                    self._real_nans(rows, absent)
                x = np.where(absent, MISSING_NUMBER, x)
        if y is None and not self.label:
            y = np.zeros(n, np.float32)
        if y is None:
            labels = list(map(self._label, rows))
            try:
                y = np.fromiter(labels, np.float32, n)
            except (TypeError, ValueError):  # class names: their index
                y = np.fromiter(map(self.rule.index, labels), np.float32, n)
        ids = np.empty((n, len(self._categories)), np.int64)
        for j, get in enumerate(self._categories):
            ids[:, j] = self.spec.rows(j, list(map(get, rows)))
        return x, y, ids

    def _real_nans(self, rows: list, absent: np.ndarray) -> None:
        """Unmark (in ``absent``) the NaNs that are values, not None: they stay NaN and are rejected as non_finite."""
        for r in np.flatnonzero(absent.any(axis=1)):
            values = self._numbers(rows[r])
            values = values if isinstance(values, tuple) else (values,)
            for j in np.flatnonzero(absent[r]):
                if values[j] is not None:
                    absent[r, j] = False

    def _one(self, value: bytes) -> object:
        """The record as a typed row, read with Python's json: the reason it cannot be one, or a value msgspec would not read."""
        try:
            record = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError("undecodable", f"not valid JSON: {exc}") from None
        except RecursionError:
            raise DecodeError("undecodable", "JSON nested too deeply (past Python's recursion limit)") from None
        if not isinstance(record, dict):
            raise DecodeError("wrong_shape", f"expected a JSON object, got {type(record).__name__}")
        return self._row_of(record)

    def _row_of(self, record: dict) -> object:
        """A record's typed row, or the reason it cannot be one (a DecodeError)."""
        if self.feature_field:
            vec = record.get(self.feature_field)
            if not isinstance(vec, list) or len(vec) != self.width:
                got = f"{len(vec)} values" if isinstance(vec, list) else repr(vec)
                raise DecodeError("wrong_shape", f"field {self.feature_field!r} must be a list of {self.width} numbers, got {got}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vec):
                raise DecodeError("wrong_shape", "every feature must be a number")
            numbers = [_float(v, "a feature") for v in vec]
        else:
            absent = [f for f in self.features if record.get(f) is None]
            if absent and not self.impute:
                raise DecodeError("wrong_shape", f"missing feature field(s) {absent[:5]} (data.missing: reject)")
            raw = [record.get(f) for f in self.features]
            if not all(v is None or isinstance(v, (int, float)) for v in raw):
                raise DecodeError("wrong_shape", "every feature must be a number (or true/false)")
            numbers = [None if v is None else _float(v, "a feature") for v in raw]
        cats = []
        for name in self.spec.categorical:
            v = record.get(name)
            if v is not None:
                try:
                    canonical(v)
                except TypeError as exc:
                    raise DecodeError("wrong_shape", f"field {name!r}: {exc}") from None
            cats.append(v)
        fy = _label_value(record, self.label, bool(self.rule.classes)) if self.label else 0.0
        _check_finite([v for v in numbers if v is not None], fy if isinstance(fy, float) else 0.0)
        labelled = {"label": fy} if self.label else {}
        if self.feature_field:
            return self._make(a0=numbers, **{f"c{j}": v for j, v in enumerate(cats)}, **labelled)
        return self._make(**{f"a{i}": v for i, v in enumerate(numbers)}, **{f"c{j}": v for j, v in enumerate(cats)}, **labelled)


def _float(v: int | float, what: str) -> float:
    try:
        return float(v)
    except OverflowError:
        raise DecodeError("non_finite", f"{what} is an integer too large for a float") from None


def _label_value(record: dict, label: str, names: bool) -> float | str:
    if label not in record or record[label] is None:
        raise DecodeError("missing_label", f"field {label!r} is missing")
    v = record[label]
    if isinstance(v, str) and names:
        return v
    if not isinstance(v, (int, float)):  # bool is an int: true/false is 1/0
        raise DecodeError("missing_label", f"field {label!r} must be a number{' or a class name' if names else ''}, got {v!r}")
    return _float(v, "the label")
