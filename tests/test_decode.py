"""Unit tests for streams.decode: exact values, message order, and every reject reason per format."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from streamtrain.streams.config import DataConfig, parse
from streamtrain.streams.decode import REASONS, Decoded, LabelRule, make_decoder

# data.missing: reject keeps the contract these cases check (an absent or null number is wrong_shape);
# missing values imputed, categorical fields, booleans and class names: tests/test_features.py
NAMED = {"format": "json", "features": ["a", "b"], "label": "y", "missing": "reject"}
VECTOR = {"format": "json", "feature_field": "v", "num_features": 3, "label": "y"}
CSV = {"format": "csv", "features": ["a", "b"], "label": "y", "missing": "reject"}
RAW = {"format": "raw", "num_features": 3}
ARROW = {"format": "arrow", "features": ["a", "b"], "label": "y", "missing": "reject"}
SMALL = 64  # max_record_bytes in the oversized cases


def decoder(data: dict, task: str = "regression", num_classes: int = 0):
    return make_decoder(parse(DataConfig, data, "data"), LabelRule(task, num_classes))


def js(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def raw(*values: float) -> bytes:
    return np.asarray(values, "<f4").tobytes()


def ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def good_record(data: dict, i: int) -> bytes:
    """Record ``i`` of a format, features (i, -i[, 2i]) and label i % 2: values tell the rows apart."""
    fmt = data["format"]
    if fmt == "raw":
        return raw(i, -i, 2 * i, i % 2)
    if fmt == "csv":
        return f"{i},{-i},{i % 2}".encode()
    if "feature_field" in data:
        return js(v=[i, -i, 2 * i], y=i % 2)
    return js(a=i, b=-i, y=i % 2)


def expected_x(data: dict, idx: list[int]) -> np.ndarray:
    width = 3 if data.get("num_features") == 3 else 2
    cols = [[i, -i, 2 * i][:width] for i in idx]
    return np.asarray(cols, np.float32).reshape(len(idx), width)


def assert_rows(out: Decoded, data: dict, good: list[int], msg_index: list[int] | None = None) -> None:
    """``out`` holds exactly the good records ``good`` (by their value number), in order, as float32."""
    assert out.x.dtype == np.float32 and out.y.dtype == np.float32 and out.msg_index.dtype == np.int64
    np.testing.assert_array_equal(out.x, expected_x(data, good))
    np.testing.assert_array_equal(out.y, np.asarray([i % 2 for i in good], np.float32))
    np.testing.assert_array_equal(out.msg_index, good if msg_index is None else msg_index)


def rejected(out: Decoded) -> list[tuple[int, str]]:
    return [(r.index, r.reason) for r in out.rejects]


# ----------------------------------------------------------------------------- good records


@pytest.mark.parametrize("data", [NAMED, VECTOR, CSV, RAW], ids=["json", "json-vector", "csv", "raw"])
def test_good_records_decode_to_exact_float32_values_in_order(data):
    out = decoder(data).decode([good_record(data, i) for i in range(7)])
    assert_rows(out, data, list(range(7)))
    assert out.rejects == []


def test_values_are_the_float32_of_the_text():
    out = decoder(NAMED).decode([js(a=0.1, b=1e-3, y=2.5), js(a=-7, b=3.4028234e38, y=0)])
    np.testing.assert_array_equal(out.x, np.asarray([[0.1, 1e-3], [-7, 3.4028234e38]], np.float32))
    np.testing.assert_array_equal(out.y, np.asarray([2.5, 0], np.float32))


def test_json_ignores_other_fields_and_reads_pretty_printed_records():
    records = [json.dumps({"id": "x", "a": i, "nested": {"k": [1, 2]}, "b": -i, "y": i % 2}, indent=2).encode() for i in range(40)]
    records[13] = b"{\n  not json\n}"
    out = decoder(NAMED).decode(records)
    good = [i for i in range(40) if i != 13]
    assert_rows(out, NAMED, good)
    assert rejected(out) == [(13, "undecodable")]


def test_csv_with_custom_column_order_and_delimiter():
    data = {**CSV, "csv": {"columns": ["id", "y", "b", "a"], "delimiter": ";"}}
    out = decoder(data).decode([b"x;1;2.5;3", b"z;0;-1;4\r\n", b"1;1;1", b"q;1;;7"])
    np.testing.assert_array_equal(out.x, np.asarray([[3, 2.5], [4, -1]], np.float32))
    np.testing.assert_array_equal(out.y, np.asarray([1, 0], np.float32))
    assert rejected(out) == [(2, "wrong_shape"), (3, "wrong_shape")]


# ----------------------------------------------------------------------------- every reject reason

BIG = js(a=1, b=2, y=0, pad="x" * SMALL)
CASES = {
    "json": (
        NAMED,
        [
            (b"garbage{", "undecodable"),
            (b"", "undecodable"),
            (None, "undecodable"),
            (b" ", "undecodable"),
            (BIG, "oversized"),
            (b"[1, 2, 3]", "wrong_shape"),
            (js(a=1, y=1), "wrong_shape"),
            (js(a=1, b=None, y=1), "wrong_shape"),
            (js(a="1", b=2, y=1), "wrong_shape"),
            (js(a=1, b=2), "missing_label"),
            (js(a=1, b=2, y=None), "missing_label"),
            (b'{"a": NaN, "b": 2, "y": 1}', "non_finite"),
            (b'{"a": 1, "b": -Infinity, "y": 1}', "non_finite"),
            (b'{"a": 1e999, "b": 2, "y": 1}', "non_finite"),
            (b'{"a": 1, "b": 2, "y": NaN}', "non_finite"),
            (b'{"a": 1, "b": 2, "y": Infinity}', "non_finite"),
        ],
    ),
    "json-vector": (
        VECTOR,
        [
            (b"\x00\xff\xfe", "undecodable"),
            (js(v=[1, 2], y=1), "wrong_shape"),
            (js(v=[1, 2, 3, 4], y=1), "wrong_shape"),
            (js(y=1), "wrong_shape"),
            (js(v=[1, None, 3], y=1), "wrong_shape"),
            (js(v=[1, 2, 3]), "missing_label"),
            (b'{"v": [1, NaN, 3], "y": 1}', "non_finite"),
            (b'{"v": [1, 2, 3], "y": -Infinity}', "non_finite"),
        ],
    ),
    "csv": (
        CSV,
        [
            (b"", "undecodable"),
            (None, "undecodable"),
            (b"1,2", "wrong_shape"),
            (b"1,2,3,4", "wrong_shape"),
            (b"x,2,1", "wrong_shape"),
            (b"1,,1", "wrong_shape"),
            (b"1,2,1\n3,4,0", "wrong_shape"),
            (b"1,2,", "missing_label"),
            (b"nan,2,1", "non_finite"),
            (b"1,inf,1", "non_finite"),
            (b"1,2,nan", "non_finite"),
            (b"1,2,-inf", "non_finite"),
            (b"1," * SMALL + b"1", "oversized"),
            # found by trying: a blank line crashed the ingest process (IndexError) on every start
            (b"\n", "undecodable"),
            (b"\r\n", "undecodable"),
            (b",,", "wrong_shape"),
        ],
    ),
    "raw": (
        RAW,
        [
            (None, "undecodable"),
            (raw(1, 2, 3), "wrong_shape"),
            (raw(1, 2, 3, 4, 5), "wrong_shape"),
            (b"\x00" * (SMALL + 4), "oversized"),
            (raw(np.nan, 2, 3, 1), "non_finite"),
            (raw(1, np.inf, 3, 1), "non_finite"),
            (raw(1, 2, 3, np.nan), "non_finite"),
            (raw(1, 2, 3, -np.inf), "non_finite"),
        ],
    ),
}
BAD = [
    pytest.param(data, value, reason, id=f"{fmt}-{i}-{reason}")
    for fmt, (data, cases) in CASES.items()
    for i, (value, reason) in enumerate(cases)
]


@pytest.mark.parametrize("data, value, reason", BAD)
def test_bad_record_is_rejected_with_its_reason_and_neighbours_decode(data, value, reason):
    dec = decoder({**data, "max_record_bytes": SMALL})
    # a short batch (decoded one by one after the fast path fails) and a long one (bisected)
    for n, bad in ((3, 1), (50, 37)):
        values = [good_record(data, i) for i in range(n)]
        values[bad] = value
        out = dec.decode(values)
        good = [i for i in range(n) if i != bad]
        assert_rows(out, data, good)
        assert rejected(out) == [(bad, reason)]
        assert out.rejects[0].error and out.rejects[0].rows == ()
        assert out.nbytes == sum(len(v) for v in values if v is not None)  # the ingest's byte count


@pytest.mark.parametrize(
    "value", [b"[" * 100_000 + b"]" * 100_000, b'{"a": ' * 20_000, b'{"a": 1, "b": 2, "y": 1, "z": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"]
)
@pytest.mark.parametrize("data", [NAMED, VECTOR], ids=["json", "json-vector"])
def test_json_nested_past_the_recursion_limit_fails_only_itself(data, value):
    """Found by trying: a record of 100,000 brackets raised RecursionError out of the batch (the daemon exited, every start)."""
    for n, bad in ((1, 0), (3, 1), (50, 37)):
        values = [good_record(data, i) for i in range(n)]
        values[bad] = value
        out = decoder(data).decode(values)
        assert_rows(out, data, [i for i in range(n) if i != bad])
        assert rejected(out) == [(bad, "undecodable")] and "nested too deeply" in out.rejects[0].error


@pytest.mark.parametrize("bad", [b'1,2,3,\r"\n', b'"1,2,3,1', b"1,2\r,3,1", b'1,"2\r",3,1', b'"1",2,3,1'])
def test_csv_records_with_a_bare_cr_or_an_open_quote_decode_as_they_do_alone(bad):
    """Found by fuzzing (bench.fuzz, csv, 55 s): a CR ends a line for the parser and an open quote runs into the next
    record, so the record after ``1,2,3,\r"`` decoded differently in a batch than alone."""
    from bench.hostile import check_batch
    from bench.hostile import decoder as hostile_decoder
    from bench.hostile import good as hostile_good

    values = [hostile_good("csv", 1), bad, hostile_good("csv", 2), bad, hostile_good("csv", 3)]
    out = check_batch("csv", hostile_decoder("csv"), values)
    assert {0, 2, 4} <= set(out.msg_index.tolist())


def test_raw_empty_value_is_rejected():
    out = decoder(RAW).decode([raw(1, 2, 3, 0), b""])
    assert [r.index for r in out.rejects] == [1] and out.rejects[0].reason in ("undecodable", "wrong_shape")


def test_every_reason_is_a_known_one():
    reasons = {reason for _, cases in CASES.values() for _, reason in cases}
    assert reasons <= set(REASONS)
    # bad_label: the label rule tests below; decoder_crash: tests/test_quarantine.py; unknown_class: tests/test_features.py;
    # missing_key: tests/test_join.py (a joined record without its key); unknown_schema: tests/test_avro.py
    assert set(REASONS) - reasons == {"bad_label", "decoder_crash", "unknown_class", "missing_key", "unknown_schema"}


def test_blank_record_next_to_a_two_object_record_is_not_mixed_up():
    """Row counts must not match by accident: one record with two objects, one with none."""
    two = js(a=1, b=-1, y=1) + js(a=2, b=-2, y=0)
    out = decoder(NAMED).decode([good_record(NAMED, 0), two, b" \n", good_record(NAMED, 3)])
    assert_rows(out, NAMED, [0, 3])
    assert rejected(out) == [(1, "undecodable"), (2, "undecodable")]


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "task, num_classes, labels, bad",
    [
        ("binary", 0, [0, 1, 2, 1, -1, 0.5], [2, 4, 5]),
        ("multiclass", 3, [0, 1, 2, 3.5, 3, -1, 2.0], [3, 4, 5]),
        ("regression", 0, [0, -1e30, 3.5, 1e30], []),
    ],
)
@pytest.mark.parametrize("data", [NAMED, RAW], ids=["json", "raw"])
def test_label_rule(data, task, num_classes, labels, bad):
    values = [js(a=i, b=-i, y=v) if data is NAMED else raw(i, -i, 2 * i, v) for i, v in enumerate(labels)]
    out = decoder(data, task, num_classes).decode(values)
    good = [i for i in range(len(labels)) if i not in bad]
    np.testing.assert_array_equal(out.msg_index, good)
    np.testing.assert_array_equal(out.y, np.asarray([labels[i] for i in good], np.float32))
    assert rejected(out) == [(i, "bad_label") for i in bad]
    for r in out.rejects:
        assert f"got {float(labels[r.index])!r}" in r.error


# ----------------------------------------------------------------------------- bisection


@pytest.mark.parametrize("data", [NAMED, VECTOR, CSV, RAW], ids=["json", "json-vector", "csv", "raw"])
def test_one_percent_garbage_in_a_big_batch(data):
    n = 5000
    rng = np.random.default_rng(7)
    bad = sorted(rng.choice(n, n // 100, replace=False).tolist())
    values = [good_record(data, i) for i in range(n)]
    junk = [b"\xff garbage", b"", None, good_record(data, 1)[:-3]]
    for k, i in enumerate(bad):
        values[i] = junk[k % len(junk)]
    out = decoder(data).decode(values)
    good = sorted(set(range(n)) - set(bad))
    assert_rows(out, data, good)
    assert [r.index for r in out.rejects] == bad


@pytest.mark.parametrize("fmt", ["json", "json-vector", "csv", "raw"])
@pytest.mark.parametrize("every", [3, 50])
def test_every_kind_of_bad_record_among_good_ones_keeps_its_own_reason(fmt, every):
    """However the batch is cut to isolate them (a parser naming the row, or bisecting), each reject is the one it has alone."""
    data, cases = CASES[fmt]
    n = 3000
    values = [good_record(data, i) for i in range(n)]
    want = {}
    for k, i in enumerate(range(every // 2, n, every)):
        value, reason = cases[k % len(cases)]
        values[i] = value
        want[i] = reason
    out = decoder({**data, "max_record_bytes": SMALL}).decode(values)
    assert_rows(out, data, sorted(set(range(n)) - set(want)))
    assert sorted(rejected(out)) == sorted(want.items())


def test_a_batch_of_nothing_but_garbage_is_all_rejected():
    values = [b"{garbage %d" % i for i in range(5000)]
    out = decoder(NAMED).decode(values)
    assert len(out.y) == 0 and [r.index for r in out.rejects] == list(range(5000))


# ----------------------------------------------------------------------------- arrow


def arrow_table(start: int, rows: int, **override: list) -> pa.Table:
    seq = list(range(start, start + rows))
    cols = {"a": [float(i) for i in seq], "b": [float(-i) for i in seq], "y": [float(i % 2) for i in seq]}
    cols.update(override)
    return pa.table(cols)


def test_arrow_many_rows_per_message():
    values = [ipc(arrow_table(0, 100)), ipc(arrow_table(100, 1)), ipc(arrow_table(101, 0)), ipc(arrow_table(101, 250))]
    out = decoder(ARROW).decode(values)
    assert_rows(out, ARROW, list(range(351)), [0] * 100 + [1] + [3] * 250)
    assert out.rejects == []


def test_arrow_accepts_other_numeric_types_and_vector_columns():
    ints = pa.table({"a": pa.array([1, 2], pa.int32()), "b": pa.array([-1, -2], pa.int64()), "y": pa.array([1, 0], pa.int8())})
    out = decoder(ARROW).decode([ipc(ints)])
    assert_rows(out, ARROW, [1, 2], [0, 0])
    vec = pa.table({"v": pa.array([[1, -1, 2], [2, -2, 4]], pa.list_(pa.float32(), 3)), "y": [1.0, 0.0]})
    out = decoder({**ARROW, "features": [], "feature_field": "v", "num_features": 3}).decode([ipc(vec)])
    assert_rows(out, VECTOR, [1, 2], [0, 0])


def test_arrow_bad_rows_reject_the_message_once_per_reason_naming_the_rows():
    a = [float(i) for i in range(10)]
    a[7] = float("nan")
    y = [float(i % 2) for i in range(10)]
    y[2] = None
    y[5] = 2.0
    y[9] = None
    values = [ipc(arrow_table(0, 10, a=a, y=y)), ipc(arrow_table(10, 5))]
    out = decoder(ARROW, "binary").decode(values)
    assert_rows(out, ARROW, [0, 1, 3, 4, 6, 8, 10, 11, 12, 13, 14], [0] * 6 + [1] * 5)
    # one reject per reason, so every row is counted under its own reason
    got = {r.reason: (r.index, r.rows, r.error) for r in out.rejects}
    assert got == {
        "missing_label": (0, (2, 9), "2 row(s) rejected; first: label is missing"),
        "bad_label": (0, (5,), "1 row(s) rejected; first: binary labels must be 0 or 1, got 2.0"),
        "non_finite": (0, (7,), "1 row(s) rejected; first: features contain NaN or Inf"),
    }


@pytest.mark.parametrize(
    "table, reason",
    [
        (pa.table({"a": [1.0], "y": [0.0]}), "wrong_shape"),
        (pa.table({"a": [1.0], "b": [2.0]}), "missing_label"),
        (pa.table({"a": ["x"], "b": [2.0], "y": [0.0]}), "wrong_shape"),
        (pa.table({"a": [1.0, None], "b": [2.0, 3.0], "y": [0.0, 1.0]}), "wrong_shape"),
    ],
    ids=["missing-column", "missing-label-column", "text-column", "null-feature"],
)
def test_arrow_message_level_rejects(table, reason):
    values = [ipc(arrow_table(0, 3)), ipc(table), b"not arrow", None, ipc(arrow_table(3, 2))]
    out = decoder(ARROW).decode(values)
    assert_rows(out, ARROW, [0, 1, 2, 3, 4], [0, 0, 0, 4, 4])
    assert rejected(out) == [(1, reason), (2, "undecodable"), (3, "undecodable")]
    assert all(r.rows == () for r in out.rejects)


def test_arrow_oversized_message():
    out = decoder({**ARROW, "max_record_bytes": 2000}).decode([ipc(arrow_table(0, 2)), ipc(arrow_table(2, 500))])
    assert_rows(out, ARROW, [0, 1], [0, 0])
    assert rejected(out) == [(1, "oversized")]


def test_empty_batch_and_all_rejected_batch():
    for data in (NAMED, CSV, RAW, ARROW):
        dec = decoder(data)
        for values in ([], [None, b""]):
            out = dec.decode(values)
            assert out.x.shape == (0, dec.width) and out.x.dtype == np.float32
            assert len(out.y) == 0 and len(out.msg_index) == 0
            assert [r.index for r in out.rejects] == list(range(len(values)))


# ----------------------------------------------------------------------------- a batch is its records


def _mutations(rng: np.random.Generator, good: bytes) -> bytes:
    """A random kind of damage to a good JSON record: cut, a byte changed, a value swapped for another type."""
    kind = int(rng.integers(6))
    if kind == 0:
        return good[: int(rng.integers(len(good)))]
    if kind == 1:
        i = int(rng.integers(len(good)))
        return good[:i] + bytes([int(rng.integers(256))]) + good[i + 1 :]
    record = json.loads(good)
    key = str(rng.choice(sorted(record)))
    record[key] = [None, True, "1", [], {}, 1e300 * 10, 10**400][int(rng.integers(7))] if kind < 5 else None
    if kind == 5:
        del record[key]
    try:
        return json.dumps(record).encode()
    except (ValueError, OverflowError):
        return good + b"}"


@pytest.mark.parametrize("data", [NAMED, VECTOR], ids=["json", "json-vector"])
def test_json_batch_decodes_as_its_records_do_alone(data):
    """Whatever a batch holds, each record is trained or rejected as it would be alone, with the same reason."""
    rng = np.random.default_rng(11)
    dec = decoder(data)
    for _ in range(20):
        n = int(rng.integers(1, 300))
        values = [good_record(data, i) for i in range(n)]
        for i in rng.choice(n, int(rng.integers(0, 8)), replace=False):
            values[i] = _mutations(rng, values[i])
        out = dec.decode(values)
        alone = [dec.decode([v]) for v in values]
        assert [i for i, a in enumerate(alone) if len(a.y)] == out.msg_index.tolist()
        assert [(i, a.rejects[0].reason) for i, a in enumerate(alone) if a.rejects] == sorted(rejected(out))
        kept = [a for a in alone if len(a.y)]
        if kept:
            np.testing.assert_array_equal(out.x, np.concatenate([a.x for a in kept]))
            np.testing.assert_array_equal(out.y, np.concatenate([a.y for a in kept]))
