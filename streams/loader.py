"""Read feature/label rows from CSV, JSON-lines or Parquet files, local or at any pyarrow URI.

The reading half of ``streamtrain produce``: files and object storage (``s3://``,
``gs://``, ``file://``, ...) into numpy batches the encoders turn into Kafka records.
Files are scanned in record batches through :mod:`pyarrow.dataset`, never loaded
whole, so a file larger than memory streams through.  Categorical columns are passed on
as they are (strings, integers, booleans, nulls), and a null number too when the daemon
imputes it (``data.missing: impute``).  Rows the daemon could not train on (a null label,
a non-finite number, a null number it would reject, a feature vector of the wrong length)
are dropped here and counted: they would only end up in the dead-letter topic.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.json as pa_json

from streamtrain.streams.errors import StreamtrainError

if TYPE_CHECKING:
    import pyarrow.dataset as pads

__all__ = ["INPUT_FORMATS", "Columns", "InputError", "Rows", "Source", "open_source"]

INPUT_FORMATS = ("csv", "tsv", "json", "parquet")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")


class InputError(StreamtrainError):
    """An input file cannot be read as asked (missing, unknown format, missing or non-numeric column)."""


@dataclass(frozen=True)
class Columns:
    """Which input columns make a sample."""

    features: tuple[str, ...] = ()  # feature columns in order; empty: every numeric column but label and key
    feature_field: str | None = None  # or one list column holding the whole feature vector
    label: str = "y"  # "": none (feature records whose label comes on a topic of its own, data.labels)
    width: int = 0  # with feature_field: the vector length (0 = the first row's)
    key: str | None = None  # a column whose value becomes the record key
    categorical: tuple[str, ...] = ()  # columns passed on as they are (the daemon hashes them)
    nulls: bool = False  # a null number is passed on (as NaN: the encoders write it as missing), not dropped
    label_names: bool = False  # the label is a class name, passed on as text


@dataclass
class Rows:
    """Usable rows of one record batch, and how many were dropped."""

    x: np.ndarray  # (n, width) float32; NaN: a null passed on (Columns.nulls)
    y: np.ndarray  # (n,) float32
    keys: list[bytes | None] | None
    skipped: int
    categorical: dict[str, list] | None = None  # categorical columns' values, by name
    labels: list | None = None  # the labels as text (Columns.label_names)


@dataclass
class Source:
    """One input (a file or a directory of files) opened as a dataset."""

    uri: str
    format: str
    dataset: pads.Dataset  # as discovered: for the schema and the row count
    filesystem: pafs.FileSystem
    path: str

    def total_rows(self) -> int | None:
        """Rows in the input when that is cheap to know (Parquet footers), else None."""
        return self.dataset.count_rows() if self.format == "parquet" else None

    def resolve(self, cols: Columns) -> Columns:
        """``cols`` with the feature columns filled in and every named column checked against the input."""
        names = self.dataset.schema.names
        wanted = [*cols.features, *([cols.feature_field] if cols.feature_field else []), *cols.categorical, cols.label]
        wanted = [c for c in wanted if c] + ([cols.key] if cols.key and cols.key not in cols.categorical else [])
        missing = [c for c in wanted if c not in names]
        if missing:
            hints = [f"{c!r}" + "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(c, names, 1)) for c in missing]
            raise InputError(f"{self.uri}: no column {', '.join(hints)}; its columns are {', '.join(names)}")
        if cols.features or cols.feature_field:
            return cols
        skip = {cols.label, cols.key, *cols.categorical}
        numeric = [f.name for f in self.dataset.schema if f.name not in skip and _numeric(f.type)]
        if not numeric and not cols.categorical:
            raise InputError(f"{self.uri}: no numeric column besides the label {cols.label!r}; name the features")
        return dataclasses.replace(cols, features=tuple(numeric))

    def vector_width(self, name: str) -> int:
        """The length of the first non-empty vector in list column ``name`` (0 if none is found early)."""
        for value in self.dataset.head(100, columns=[name]).column(0).to_pylist():
            if value:
                return len(value)
        return 0

    def batches(self, cols: Columns, batch_rows: int = 65536) -> Iterator[Rows]:
        """The input's usable rows in record batches; ``cols`` must come from :meth:`resolve`."""
        wanted = [*cols.features, *([cols.feature_field] if cols.feature_field else []), *cols.categorical, cols.label]
        wanted = [c for c in wanted if c] + ([cols.key] if cols.key and cols.key not in cols.categorical else [])
        width = cols.width
        try:
            # text formats: read the wanted columns with fixed types (a column of ints then floats would fail)
            types = {c: pa.float64() for c in (*cols.features, cols.label) if c}
            if cols.label_names:
                types[cols.label] = pa.string()
            if cols.feature_field:
                types[cols.feature_field] = pa.list_(pa.float64())
            if cols.key and cols.key not in cols.categorical:
                types[cols.key] = pa.string()
            dataset = _dataset(self.path, self.filesystem, _file_format(self.format, types))
            for batch in dataset.to_batches(columns=wanted, batch_size=batch_rows):
                if batch.num_rows == 0:
                    continue
                n = batch.num_rows
                if cols.feature_field:
                    x, width = self._vectors(batch.column(cols.feature_field), width)
                elif cols.features:
                    x = np.column_stack([self._floats(batch.column(c), c) for c in cols.features]).astype(np.float32)
                else:
                    x = np.empty((n, 0), np.float32)
                labels = None
                if not cols.label:
                    y = np.zeros(n, np.float32)
                elif cols.label_names:
                    labels = pc.cast(batch.column(cols.label), pa.string()).to_pylist()
                    y = np.where([v is None for v in labels], np.nan, 0.0).astype(np.float32)
                else:
                    y = self._floats(batch.column(cols.label), cols.label).astype(np.float32)
                keys = None
                if cols.key:
                    keys = [None if k is None else k.encode() for k in pc.cast(batch.column(cols.key), pa.string()).to_pylist()]
                cats = {c: _categories(batch.column(c)) for c in cols.categorical}
                finite = np.isfinite(x)
                if cols.nulls and not cols.feature_field and cols.features:
                    finite |= np.column_stack([pc.is_null(batch.column(c)).to_numpy(zero_copy_only=False) for c in cols.features])
                ok = finite.all(axis=1) & np.isfinite(y)
                skipped = int(len(ok) - ok.sum())
                if skipped:
                    x, y = x[ok], y[ok]
                    keys = [k for k, good in zip(keys, ok) if good] if keys is not None else None
                    cats = {c: [v for v, good in zip(vs, ok) if good] for c, vs in cats.items()}
                    labels = [v for v, good in zip(labels, ok) if good] if labels is not None else None
                yield Rows(x, y, keys, skipped, cats or None, labels)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
            raise InputError(f"{self.uri}: {_first_line(exc)}") from exc

    def _floats(self, arr: pa.Array, name: str) -> np.ndarray:
        try:
            return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InputError(f"{self.uri}: column {name!r} holds {arr.type} values that are not numbers ({_first_line(exc)})") from exc

    def _vectors(self, arr: pa.Array, width: int) -> tuple[np.ndarray, int]:
        """A list column as (rows, width) floats; rows of another length become NaN (dropped)."""
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
            raise InputError(f"{self.uri}: the feature field holds {arr.type}, not a list of numbers")
        lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)
        if not width:
            found = lengths[lengths > 0]
            width = int(found[0]) if len(found) else 0
        x = np.full((len(arr), max(width, 1)), np.nan, np.float32)
        ok = lengths == width
        if width and ok.any():
            values = self._floats(arr.filter(pa.array(ok)).flatten(), "feature field")
            x[ok] = values.reshape(-1, width)
        return x, width


def _categories(arr: pa.Array) -> list:
    """A categorical column's values as the records carry them: integers and booleans as they are, the rest as text."""
    t = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return pc.cast(arr, t).to_pylist() if pa.types.is_dictionary(arr.type) else arr.to_pylist()
    return pc.cast(arr, pa.string()).to_pylist()


def open_source(uri: str, input_format: str | None = None) -> Source:
    """Open a path or URI (``s3://bucket/prefix``, ``file:///data/x.csv``) as a dataset; raises InputError."""
    try:
        if "://" in uri:
            fs, path = pafs.FileSystem.from_uri(uri)
        else:
            fs, path = pafs.LocalFileSystem(), str(uri)
        info = fs.get_file_info(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputError(f"{uri}: cannot open ({_first_line(exc)})") from exc
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{uri}: no such file or directory")
    fmt = input_format or _guess_format(fs, path, info)
    if fmt not in INPUT_FORMATS:
        raise InputError(f"{uri}: cannot tell the input format from the name; give --input-format ({', '.join(INPUT_FORMATS)})")
    try:
        dataset = _dataset(path, fs, _file_format(fmt))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{uri}: cannot read as {fmt} ({_first_line(exc)})") from exc
    return Source(uri, fmt, dataset, fs, path)


def _guess_format(fs: pafs.FileSystem, path: str, info: pafs.FileInfo) -> str | None:
    names: Sequence[str] = [path]
    if info.type == pafs.FileType.Directory:
        names = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File)
    for name in names:
        base = name.lower()
        for comp in _COMPRESSED:
            base = base.removesuffix(comp)
        for suffix, fmt in _SUFFIXES.items():
            if base.endswith(suffix):
                return fmt
    return None


def _dataset(path: str, fs: pafs.FileSystem, fmt: pads.FileFormat) -> pads.Dataset:
    import pyarrow.dataset as pads  # here, not at the top: it imports pandas where pandas is installed (0.2 s of every command)

    return pads.dataset(path, filesystem=fs, format=fmt)


def _file_format(fmt: str, types: dict[str, pa.DataType] | None = None) -> pads.FileFormat:
    import pyarrow.dataset as pads

    """The pyarrow file format; ``types`` fixes the types of those columns of CSV and JSON."""
    if fmt in ("csv", "tsv"):
        return pads.CsvFileFormat(
            parse_options=pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
            convert_options=pa_csv.ConvertOptions(column_types=types or {}, strings_can_be_null=True),  # an empty cell: null
        )
    if fmt == "json":
        schema = pa.schema(list((types or {}).items())) if types else None
        return pads.JsonFileFormat(parse_options=pa_json.ParseOptions(explicit_schema=schema))
    return pads.ParquetFileFormat()


def _numeric(tp: pa.DataType) -> bool:
    return pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_boolean(tp) or pa.types.is_decimal(tp)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
