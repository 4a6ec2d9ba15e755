"""Hostile records: what any producer with write access to a topic can send, by mistake or not.

One catalogue for the property tests (tests/test_fuzz.py), the coverage-guided fuzzer
(``python -m bench.fuzz``), the integration tests through the broker and the "bad inputs
tried" table of docs/RELIABILITY.md (``python -m bench.hostile`` prints it: each kind
decoded in each format, and what became of it).

Every format decodes records of the same three features ``a, b, c`` and label ``y``
(the Arrow ones several rows each), so good records and their mutations mean the same in
each.  :data:`KINDS` are named hostile records, after the ones tried by hand; :func:`mutate`
applies one of the mutation operators (cut, bit flip, splice, ...) with parameters a
fuzzer or Hypothesis draws.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa

FEATURES = ("a", "b", "c")
FORMATS: dict[str, dict] = {
    "json": {"format": "json", "features": list(FEATURES), "label": "y"},
    "json-vector": {"format": "json", "feature_field": "v", "num_features": 3, "label": "y"},
    "csv": {"format": "csv", "features": list(FEATURES), "label": "y"},
    "arrow": {"format": "arrow", "features": list(FEATURES), "label": "y"},
    "raw": {"format": "raw", "num_features": 3},
}
MAX_RECORD_BYTES = 1 << 20  # data.max_record_bytes' default


def data_config(fmt: str, **override: object):
    from streamtrain.streams.config import DataConfig, parse

    return parse(DataConfig, {**FORMATS[fmt], **override}, "data")


def decoder(fmt: str, task: str = "regression", num_classes: int = 0, **override: object):
    from streamtrain.streams.decode import LabelRule, make_decoder

    return make_decoder(data_config(fmt, **override), LabelRule(task, num_classes))


def values_of(i: int) -> tuple[float, float, float, float]:
    """Sample ``i``: features and label that name it (the label is i % 2, so binary tasks read it too)."""
    return float(i), float(-i), i / 4, float(i % 2)


def good(fmt: str, i: int, rows: int = 3) -> bytes:
    """A good record of ``fmt`` for sample ``i`` (an Arrow record holds samples i .. i + rows - 1)."""
    a, b, c, y = values_of(i)
    if fmt == "json":
        return json.dumps({"a": a, "b": b, "c": c, "y": y}).encode()
    if fmt == "json-vector":
        return json.dumps({"v": [a, b, c], "y": y}).encode()
    if fmt == "csv":
        return f"{a:g},{b:g},{c:g},{y:g}".encode()
    if fmt == "raw":
        return np.asarray([a, b, c, y], "<f4").tobytes()
    if fmt == "arrow":
        cols = list(zip(*(values_of(j) for j in range(i, i + rows))))
        return ipc(pa.table(dict(zip((*FEATURES, "y"), (list(col) for col in cols)))))
    raise ValueError(fmt)


def ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _obj(fmt: str, a: bytes = b"1", b: bytes = b"0", c: bytes = b"0", y: bytes = b"1", extra: bytes = b"") -> bytes:
    """A JSON record of ``fmt`` (named fields, or the vector field) with these value texts."""
    if fmt == "json-vector":
        return b'{"v": [' + a + b", " + b + b", " + c + b'], "y": ' + y + extra + b"}"
    return b'{"a": ' + a + b', "b": ' + b + b', "c": ' + c + b', "y": ' + y + extra + b"}"


def _json_kinds(fmt: str) -> dict[str, bytes]:
    ok = good(fmt, 1)
    return {
        "nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
        "object nested 20,000 deep": b'{"a": ' * 20_000,
        "nested inside a good record": _obj(fmt, extra=b', "z": ' + b"[" * 50_000 + b"]" * 50_000),
        "NaN / Infinity literals": _obj(fmt, a=b"NaN", b=b"Infinity", c=b"-Infinity"),
        "1e400": _obj(fmt, a=b"1e400"),
        "400-digit integer": _obj(fmt, a=b"1" + b"0" * 400),
        "string in a numeric field": _obj(fmt, a=b'"1"'),
        "object in a numeric field": _obj(fmt, a=b'{"x": 1}'),
        "list in a numeric field": _obj(fmt, a=b"[1]"),
        "null in a numeric field": _obj(fmt, a=b"null"),
        "boolean label": _obj(fmt, y=b"true"),
        "trailing garbage": ok + b"garbage",
        "two objects": ok + ok,
        "a 900 KB string": _obj(fmt, extra=b', "s": "' + b"x" * 900_000 + b'"'),
        "NUL in a key": _obj(fmt, extra=b', "k\x00": 1'),
        "duplicate keys": _obj(fmt, extra=b', "y": 0'),
        "a BOM": b"\xef\xbb\xbf" + ok,
        "100 extra fields": _obj(fmt, extra=b"".join(b', "x%d": %d' % (k, k) for k in range(100))),
        "a scalar": b"42",
        "an array": b"[1, 2, 3, 1]",
    }


def _csv_kinds() -> dict[str, bytes]:
    return {
        "a blank line": b"\n",
        "CRLF blank line": b"\r\n",
        "CRLF line end": b"1,2,3,1\r\n",
        "too few columns": b"1,2,1",
        "too many columns": b"1,2,3,4,1",
        "empty cells": b",,,",
        "text in a number": b"x,2,3,1",
        "two lines": b"1,2,3,1\n4,5,6,0",
        "a quoted newline": b'"1\n",2,3,1',
        "an unclosed quote": b'"1,2,3,1',
        "a bare CR and an open quote": b'1,2,3,\r"\n',  # found by fuzzing: it ran into the next record
        "NUL": b"1,2\x00,3,1",
        "a BOM": b"\xef\xbb\xbf1,2,3,1",
        "nan / inf": b"nan,inf,-inf,1",
        "a 900 KB line": b"1," * 450_000 + b"1",
    }


def _arrow_kinds() -> dict[str, bytes]:
    ok = good("arrow", 1, rows=50)
    return {
        "cut in half": ok[: len(ok) // 2],
        "schema only": ipc(pa.table({f: pa.array([], pa.float64()) for f in (*FEATURES, "y")}))[:200],
        "a byte flipped in the body": ok[:-40] + bytes([ok[-40] ^ 0xFF]) + ok[-39:],
        "length prefix inflated": ok[:4] + b"\xff\xff\xff\x7f" + ok[8:],
        "string columns": ipc(pa.table({f: ["1", "2"] for f in (*FEATURES, "y")})),
        "a missing column": ipc(pa.table({"a": [1.0], "b": [2.0], "y": [1.0]})),
        "nulls in a feature": ipc(pa.table({"a": [1.0, None], "b": [2.0, 2.0], "c": [1.0, 1.0], "y": [1.0, 0.0]})),
        "list columns": ipc(pa.table({f: [[1.0]] for f in (*FEATURES, "y")})),
        "two streams": ok + ok,
        "JSON instead": good("json", 1),
    }


def _raw_kinds() -> dict[str, bytes]:
    return {
        "one byte short": good("raw", 1)[:-1],
        "one float more": good("raw", 1) + b"\x00\x00\x80\x3f",
        "NaN features": np.asarray([np.nan, 1, 2, 1], "<f4").tobytes(),
        "Inf label": np.asarray([1, 1, 2, np.inf], "<f4").tobytes(),
    }


COMMON: dict[str, Callable[[str], bytes | None]] = {
    "empty": lambda fmt: b"",
    "tombstone (null value)": lambda fmt: None,
    "2 MiB": lambda fmt: b"\x00" * (2 << 20),
    "invalid UTF-8": lambda fmt: b"\xff\xfe\xfd" + good(fmt, 1),
    "random bytes": lambda fmt: bytes(np.random.default_rng(3).integers(0, 256, 200, np.uint8)),
    "truncated": lambda fmt: good(fmt, 1)[: max(1, len(good(fmt, 1)) // 2)],
    "a blank line": lambda fmt: b"\n",
}
SPECIFIC = {
    "json": lambda: _json_kinds("json"),
    "json-vector": lambda: _json_kinds("json-vector"),
    "csv": _csv_kinds,
    "arrow": _arrow_kinds,
    "raw": _raw_kinds,
}


def kinds(fmt: str) -> dict[str, bytes | None]:
    """Every named hostile record for ``fmt``: the common ones, then the format's own."""
    out = {name: make(fmt) for name, make in COMMON.items()}
    out.update(SPECIFIC[fmt]())
    return out


# ----------------------------------------------------------------------------- mutation operators

OPERATORS = (
    "cut",
    "flip",
    "set_byte",
    "insert",
    "delete",
    "splice",
    "nest",
    "repeat",
    "huge_number",
    "nul",
    "bom",
    "crlf",
    "blank",
    "cr",
    "quote",
)


def mutate(value: bytes, op: str, pos: int, byte: int, other: bytes = b"") -> bytes:
    """``value`` changed by operator ``op`` at ``pos`` (taken modulo the length) with ``byte`` and ``other``."""
    n = len(value)
    i = pos % (n + 1)
    if op == "cut":
        return value[:i]
    if op == "flip":
        return value[:i] + bytes([value[i] ^ (1 << (byte % 8))]) + value[i + 1 :] if i < n else value
    if op == "set_byte":
        return value[:i] + bytes([byte % 256]) + value[i + 1 :]
    if op == "insert":
        return value[:i] + bytes([byte % 256]) + value[i:]
    if op == "delete":
        return value[:i] + value[i + 1 + byte % 8 :]
    if op == "splice":
        j = byte % (len(other) + 1)
        return value[:i] + other[j:]
    if op == "nest":
        depth = 1 + (byte * 97) % 5000
        return value[:i] + b"[" * depth + b"]" * depth + value[i:]
    if op == "repeat":
        return value * (2 + byte % 3)
    if op == "huge_number":
        return value[:i] + b"9" * (1 + byte * 4) + b"e" + str(byte * 40).encode() + value[i:]
    if op == "nul":
        return value[:i] + b"\x00" + value[i:]
    if op == "bom":
        return b"\xef\xbb\xbf" + value
    if op == "crlf":
        return value + b"\r\n"
    if op == "blank":
        return b"\n" * (1 + byte % 3)
    if op == "cr":
        return value[:i] + b"\r" + value[i:]
    if op == "quote":
        return value[:i] + b'"' + value[i:]
    raise ValueError(op)


# ----------------------------------------------------------------------------- the properties


def arrow_rows(value: bytes | None) -> int | None:
    """Rows of an Arrow record that reads as one valid stream (None: it does not)."""
    if not value:
        return None
    reader = pa.BufferReader(pa.py_buffer(value))
    try:
        table = pa.ipc.open_stream(reader).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError):
        return None
    return table.num_rows if reader.tell() == len(value) else None


def check_batch(fmt: str, dec, values: list[bytes | None]):
    """Decode ``values`` and assert what must hold for any input (raises AssertionError, or what decode raised).

    Every message is accounted for exactly once (its rows, or one reject naming it; an Arrow
    message's rows out plus the rows its rejects name are its rows), the rows are finite and
    in message order, and the batch is its records: each decodes in the batch as it does alone.
    """
    out = dec.decode(values)
    n = len(values)
    assert out.x.dtype == np.float32 and out.y.dtype == np.float32 and out.msg_index.dtype == np.int64
    assert out.x.shape == (len(out.y), dec.width) and out.msg_index.shape == out.y.shape
    assert out.ids.dtype == np.int64 and out.ids.shape[0] == len(out.y)
    from streamtrain.streams.features import is_missing

    assert (np.isfinite(out.x) | is_missing(out.x)).all() and np.isfinite(out.y).all(), "a non-finite value got through"
    assert (np.diff(out.msg_index) >= 0).all(), "rows out of message order"
    assert out.nbytes == sum(len(v) for v in values if v is not None)
    rows = np.bincount(out.msg_index, minlength=n) if len(out.msg_index) else np.zeros(n, np.int64)
    for i, v in enumerate(values):
        whole = [r for r in out.rejects if r.index == i and not r.rows]
        parts = [r for r in out.rejects if r.index == i and r.rows]
        assert len(whole) <= 1, f"message {i} rejected twice: {whole}"
        if whole:
            assert rows[i] == 0 and not parts, f"message {i} both rejected and trained"
        elif fmt == "arrow":
            named = sum(len(r.rows) for r in parts)
            assert rows[i] + named == arrow_rows(v), f"message {i}: {rows[i]} rows out + {named} rejected"
        else:
            assert rows[i] == 1 and not parts, f"message {i} neither trained once nor rejected: {rows[i]} rows"
        alone = dec.decode([v])
        mine = out.msg_index == i
        np.testing.assert_array_equal(out.x[mine], alone.x, err_msg=f"record {i} decodes differently in the batch")
        np.testing.assert_array_equal(out.y[mine], alone.y)
        np.testing.assert_array_equal(out.ids[mine], alone.ids)
        assert sorted((r.reason, r.rows) for r in out.rejects if r.index == i) == sorted((r.reason, r.rows) for r in alone.rejects)
    return out


# ----------------------------------------------------------------------------- the table


def outcome(fmt: str, value: bytes | None) -> str:
    """What decoding ``value`` alone among good records does: trained (n rows) or rejected (reason)."""
    values = [good(fmt, 10), value, good(fmt, 20)]
    out = decoder(fmt).decode(values)
    reasons = sorted({r.reason for r in out.rejects if r.index == 1})
    rows = int((out.msg_index == 1).sum())
    neighbours = int((out.msg_index != 1).sum())
    expected_neighbours = 2 * (3 if fmt == "arrow" else 1)
    assert neighbours == expected_neighbours, f"{fmt}: the good records next to it were not all decoded"
    if rows and reasons:
        return f"{rows} row(s) trained, some rejected: {', '.join(reasons)}"
    if rows:
        return f"trained ({rows} row{'s' if rows > 1 else ''})"
    return f"rejected: {', '.join(reasons)}"


def table() -> str:
    fmts = list(FORMATS)
    names: list[str] = []
    for fmt in fmts:
        names += [n for n in kinds(fmt) if n not in names]
    lines = ["| kind | " + " | ".join(fmts) + " |", "|---|" + "---|" * len(fmts)]
    for name in names:
        cells = []
        for fmt in fmts:
            k = kinds(fmt)
            cells.append(outcome(fmt, k[name]) if name in k else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    print(table())


if __name__ == "__main__":
    main()
