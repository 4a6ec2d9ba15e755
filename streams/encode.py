"""Encode feature/label arrays as Kafka record values in each format the decoders read.

The inverse of :mod:`streams.decode`, for producers: the demo, the benchmark, tests and
``streamtrain produce`` all write records through here.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

FORMATS = ("json", "csv", "arrow", "raw")


def encode(
    fmt: str,
    x: np.ndarray,
    y: np.ndarray,
    features: Sequence[str] = (),
    label: str = "y",
    *,
    feature_field: str | None = None,
    rows_per_message: int = 1000,
    delimiter: str = ",",
    categorical: dict[str, Sequence[object]] | None = None,
    labels: Sequence[object] | None = None,
    columns: Sequence[str] | None = None,
) -> list[bytes]:
    """Record values for samples ``x`` (n, width) and labels ``y`` (n,).

    json/csv/raw give one record per sample; arrow packs ``rows_per_message`` rows into
    each record (an Arrow IPC stream).  A NaN in ``x`` is written as a missing value (JSON
    ``null``, an empty CSV cell, an Arrow null); ``categorical`` adds fields by name as
    they are (strings, integers, booleans, None); ``labels`` writes these labels (class
    names, say) instead of ``y``; ``columns`` orders a CSV line (``data.csv.columns``).
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    names = list(features) or [f"f{i}" for i in range(x.shape[1])]
    cats = dict(categorical or {})
    ys = list(labels) if labels is not None else None
    if fmt == "raw":
        if cats or ys is not None:
            raise ValueError("raw records carry float32 numbers only")
        flat = np.ascontiguousarray(np.column_stack([x, y]).astype("<f4"))
        size = flat.shape[1] * 4
        buf = flat.tobytes()
        return [buf[i : i + size] for i in range(0, len(buf), size)]
    missing = bool(np.isnan(x).any())
    if fmt == "json":
        return [json.dumps(r).encode() for r in records(x, y, names, label, feature_field=feature_field, categorical=cats, labels=ys)]
    if fmt == "csv":
        order = list(columns) if columns else [*names, *cats, label]
        if not cats and ys is None and not missing and order == [*names, label]:
            lines = io.StringIO()
            np.savetxt(lines, np.column_stack([x, y]), fmt="%.9g", delimiter=delimiter)
            return [line.encode() for line in lines.getvalue().splitlines()]
        texts = {n: [("" if v != v else f"{v:.9g}") for v in col] for n, col in zip(names, x.T.tolist())}
        texts.update({c: ["" if v is None else _csv_text(v, delimiter) for v in values] for c, values in cats.items()})
        texts[label] = [_csv_text(v, delimiter) for v in ys] if ys is not None else [f"{v:.9g}" for v in y.tolist()]
        blank = [""] * len(y)
        return [delimiter.join(cells).encode() for cells in zip(*(texts.get(c, blank) for c in order))]
    if fmt == "arrow":
        out = []
        for i in range(0, len(y), rows_per_message):
            xs, part = x[i : i + rows_per_message], slice(i, i + rows_per_message)
            if feature_field:
                cols = {feature_field: pa.FixedSizeListArray.from_arrays(pa.array(xs.reshape(-1)), xs.shape[1])}
            else:
                cols = {n: pa.array(xs[:, j], from_pandas=True) for j, n in enumerate(names)}  # NaN: null
            cols.update({name: pa.array(list(values[part])) for name, values in cats.items()})
            cols[label] = pa.array(ys[part]) if ys is not None else y[part]
            out.append(arrow_ipc(pa.table(cols)))
        return out
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def records(
    x: np.ndarray,
    y: np.ndarray,
    features: Sequence[str] = (),
    label: str = "y",
    *,
    feature_field: str | None = None,
    categorical: dict[str, Sequence[object]] | None = None,
    labels: Sequence[object] | None = None,
) -> list[dict]:
    """The samples as the dicts a JSON record holds (a NaN as None); Avro and Protobuf writers serialize these."""
    x = np.asarray(x, np.float32)
    names = list(features) or [f"f{i}" for i in range(x.shape[1])]
    if feature_field:
        rows = [{feature_field: row} for row in x.tolist()]
    else:
        rows = [dict(zip(names, row)) for row in x.tolist()]
        if np.isnan(x).any():
            rows = [{k: (None if v != v else v) for k, v in r.items()} for r in rows]
    for name, values in (categorical or {}).items():
        for r, v in zip(rows, values):
            r[name] = v
    if label:  # no label: feature records whose label comes on a topic of its own (data.labels)
        for r, v in zip(rows, list(labels) if labels is not None else np.asarray(y, np.float32).tolist()):
            r[label] = v
    return rows


def _csv_text(v: object, delimiter: str) -> str:
    text = "true" if v is True else "false" if v is False else str(v)
    if delimiter in text or '"' in text or "\n" in text or "\r" in text:
        text = '"' + text.replace('"', '""') + '"'
    return text


def arrow_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()
