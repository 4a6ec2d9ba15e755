"""The fields of a record as the model takes them: numbers, categories, and how a missing one is marked.

A missing number (JSON ``null`` or an absent key, an empty CSV cell, an Arrow null) is
carried as a NaN with a payload of its own (:data:`MISSING_NUMBER`), so a NaN a producer
wrote is still told from it and rejected as ``non_finite``; the trainer replaces a missing
number by its running mean and adds a 0/1 "was missing" input beside it
(``data.missing: impute``, the default; ``reject`` dead-letters the record instead).  A
categorical value becomes a row of the shared embedding table (:mod:`.hashing`); a missing
one is its field's own "missing" row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from streamtrain.streams.errors import DecodeError
from streamtrain.streams.features.hashing import buckets_of, canonical, field_seed, hash_arrow, hash_bytes, missing_hash

# A number read as missing: a quiet NaN with this payload, told apart from a NaN the producer wrote.
MISSING_NUMBER = np.array([0x7FC0DEAD], dtype=np.uint32).view(np.float32)[0]


def is_missing(x: np.ndarray) -> np.ndarray:
    """Where ``x`` (float32) holds the missing mark."""
    return x.view(np.uint32) == np.uint32(0x7FC0DEAD)


@dataclass(frozen=True)
class FeatureSpec:
    """The configured fields: ``data.features`` (numbers) and ``data.categorical`` (rows of the shared table)."""

    numbers: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    buckets: int = 1 << 20
    missing: str = "impute"  # impute | reject
    max_category_bytes: int = 256
    keys: int = 0  # the last ``keys`` categorical fields are join keys: their whole 64-bit hash, not a table row
    _seeds: tuple[int, ...] = field(default=(), repr=False, compare=False)
    _missing_rows: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        seeds = tuple(field_seed(f) for f in self.categorical)
        object.__setattr__(self, "_seeds", seeds)
        rows = [int(missing_hash(s) % np.uint64(self.buckets)) for s in seeds]
        for j in range(len(seeds) - self.keys, len(seeds)):
            rows[j] = int(np.uint64(missing_hash(seeds[j])).view(np.int64))
        object.__setattr__(self, "_missing_rows", tuple(rows))

    @classmethod
    def from_data(cls, data: object) -> FeatureSpec:
        """The spec of a ``DataConfig`` (raw: numbers only, nothing missing)."""
        return cls(
            numbers=tuple(getattr(data, "features", ()) or ()),
            categorical=tuple(getattr(data, "categorical", ()) or ()),
            buckets=int(getattr(data, "hash_buckets", 1 << 20)),
            missing=str(getattr(data, "missing", "impute")),
            max_category_bytes=int(getattr(data, "max_category_bytes", 256)),
        )

    @property
    def impute(self) -> bool:
        return self.missing == "impute"

    # ------------------------------------------------------------------ categories
    def rows(self, j: int, values: Sequence[object]) -> np.ndarray:
        """Table rows (int64) for the values of categorical field ``j`` (Python values: str, int, bool, None).

        Raises :class:`DecodeError` for a value that is not a category or is too long (the
        caller decodes that record alone for its reason, as for any field).
        """
        n = len(values)
        try:
            data = list(map(str.encode, values))  # the common case: every value a string
        except TypeError:
            data = None
        if data is None:
            present = [i for i, v in enumerate(values) if v is not None]
            try:
                data = [canonical(values[i]) for i in present]
            except TypeError as exc:
                raise DecodeError("wrong_shape", f"field {self.categorical[j]!r}: {exc}") from None
        else:
            present = None
        if data and max(map(len, data)) > self.max_category_bytes:
            raise DecodeError(
                "wrong_shape", f"field {self.categorical[j]!r}: a value is over {self.max_category_bytes} bytes (data.max_category_bytes)"
            )
        hashed = self._reduce(j, hash_bytes(data, self._seeds[j]))
        if present is None:
            return hashed
        out = np.full(n, self._missing_rows[j], np.int64)
        out[present] = hashed
        return out

    def rows_arrow(self, j: int, array) -> np.ndarray:
        """Table rows for an Arrow column (string, binary, dictionary, integer or boolean; nulls are the missing value)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        name = self.categorical[j]
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        t = array.type.value_type if pa.types.is_dictionary(array.type) else array.type
        if not (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or pa.types.is_integer(t)
            or pa.types.is_boolean(t)
        ):
            raise DecodeError("wrong_shape", f"column {name!r} must hold strings, integers or booleans to be categorical, got {t}")
        if array.null_count:
            valid = pc.is_valid(array).to_numpy(zero_copy_only=False)
            out = np.full(len(array), self._missing_rows[j], np.int64)
            present = array.filter(pc.is_valid(array))
            out[valid] = self._check_and_hash(j, present)
            return out
        return self._check_and_hash(j, array)

    def _check_and_hash(self, j: int, array) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        t = array.type.value_type if pa.types.is_dictionary(array.type) else array.type
        if len(array) and not (pa.types.is_integer(t) or pa.types.is_boolean(t)):
            values = array.dictionary if pa.types.is_dictionary(array.type) else array
            longest = pc.max(pc.binary_length(values)).as_py() if len(values) else 0
            if longest is not None and longest > self.max_category_bytes:
                raise DecodeError(
                    "wrong_shape",
                    f"column {self.categorical[j]!r}: a value is over {self.max_category_bytes} bytes (data.max_category_bytes)",
                )
        return self._reduce(j, hash_arrow(array, self._seeds[j]))

    def _reduce(self, j: int, hashes: np.ndarray) -> np.ndarray:
        """A table row, or for a join key the hash itself (as int64)."""
        if j >= len(self.categorical) - self.keys:
            return hashes.view(np.int64)
        return buckets_of(hashes, self.buckets)

    def missing_row(self, j: int) -> int:
        return self._missing_rows[j]
