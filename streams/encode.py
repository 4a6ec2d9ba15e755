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
) -> list[bytes]:
    """Record values for samples ``x`` (n, width) and labels ``y`` (n,).

    json/csv/raw give one record per sample; arrow packs ``rows_per_message`` rows into
    each record (an Arrow IPC stream).
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    names = list(features) or [f"f{i}" for i in range(x.shape[1])]
    if fmt == "raw":
        flat = np.ascontiguousarray(np.column_stack([x, y]).astype("<f4"))
        size = flat.shape[1] * 4
        buf = flat.tobytes()
        return [buf[i : i + size] for i in range(0, len(buf), size)]
    if fmt == "json":
        if feature_field:
            return [json.dumps({feature_field: row, label: v}).encode() for row, v in zip(x.tolist(), y.tolist())]
        return [json.dumps({**dict(zip(names, row)), label: v}).encode() for row, v in zip(x.tolist(), y.tolist())]
    if fmt == "csv":
        lines = io.StringIO()
        np.savetxt(lines, np.column_stack([x, y]), fmt="%.9g", delimiter=delimiter)
        return [line.encode() for line in lines.getvalue().splitlines()]
    if fmt == "arrow":
        out = []
        for i in range(0, len(y), rows_per_message):
            xs, ys = x[i : i + rows_per_message], y[i : i + rows_per_message]
            if feature_field:
                cols = {feature_field: pa.FixedSizeListArray.from_arrays(pa.array(xs.reshape(-1)), xs.shape[1]), label: ys}
            else:
                cols = {**{n: xs[:, j] for j, n in enumerate(names)}, label: ys}
            out.append(arrow_ipc(pa.table(cols)))
        return out
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def arrow_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()
