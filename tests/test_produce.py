"""``streamtrain produce``: CSV, JSON-lines and Parquet files (local paths and file:// URIs) into a
topic in each of the daemon's formats, read back and decoded by the daemon's own decoders,
values compared exactly; skipped rows, limits, keys, rate, failures and exit codes."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from streamtrain.cli import main
from streamtrain.streams.config import DataConfig, parse
from streamtrain.streams.decode import LabelRule, make_decoder
from streamtrain.streams.features import is_missing
from streamtrain.tools.progress import RateLimiter
from tests.kafka_util import free_port, read_topic

pytestmark = pytest.mark.integration

N = 300


def table(n: int = N, seed: int = 0) -> pa.Table:
    """Columns i (a row id, to match rows across partitions), a, b, c, label y, and a vector v."""
    rng = np.random.default_rng(seed)
    a, b, c = (rng.normal(size=n).astype(np.float32) * scale for scale in (1, 1000, 1 / 7))
    return pa.table(
        {
            "i": np.arange(n, dtype=np.int64),
            "a": a,
            "b": b,
            "c": c,
            "y": (a > 0).astype(np.int64),
            "v": pa.array(np.column_stack([a, b]).tolist(), pa.list_(pa.float32())),
            "name": [f"row{k % 7}" for k in range(n)],
        }
    )


def write(t: pa.Table, path, kind: str):
    if kind == "parquet":
        pq.write_table(t, path)
    elif kind == "csv":
        flat = t.drop_columns(["v"])
        with open(path, "w") as f:
            f.write(",".join(flat.column_names) + "\n")
            for row in flat.to_pylist():
                f.write(
                    ",".join("" if v is None else (repr(float(np.float32(v))) if isinstance(v, float) else str(v)) for v in row.values())
                    + "\n"
                )
    else:
        with open(path, "w") as f:
            for row in t.to_pylist():
                row = {k: (float(np.float32(v)) if isinstance(v, float) else v) for k, v in row.items()}
                f.write(json.dumps(row) + "\n")
    return path


def expected(t: pa.Table, cols: list[str]) -> np.ndarray:
    return np.column_stack([t.column(c).to_numpy().astype(np.float32) for c in cols])


def decoded(bootstrap: str, topic: str, data: dict, expect: int) -> tuple[np.ndarray, np.ndarray, list]:
    msgs = read_topic(bootstrap, topic, expect)
    d = make_decoder(parse(DataConfig, data, "data"), LabelRule())
    out = d.decode([m.value() for m in msgs])
    assert not out.rejects, out.rejects[:3]
    return out.x, out.y, msgs


def by_id(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x[:, 0])
    return x[order], y[order]


def produce(capsys, *args: str) -> tuple[int, dict]:
    code = main(["produce", "--json", *args])
    out = capsys.readouterr().out.strip().splitlines()
    return code, (json.loads(out[-1]) if out else {})


CASES = [  # input file type, record format
    ("csv", "json"),
    ("json", "csv"),
    ("parquet", "arrow"),
    ("parquet", "raw"),
    ("json", "arrow"),
    ("csv", "raw"),
]


@pytest.mark.parametrize(("kind", "fmt"), CASES, ids=[f"{k}-to-{f}" for k, f in CASES])
def test_each_input_type_in_each_format_round_trips_exactly(tmp_path, bootstrap, make_topic, capsys, kind, fmt):
    topic = make_topic(3)
    t = table()
    src = write(t, tmp_path / f"in.{'jsonl' if kind == 'json' else kind}", kind)
    feats = ["i", "a", "b", "c"]
    args = ["-b", bootstrap, "-t", topic, "-f", fmt, "--label", "y", "--rows-per-message", "64"]
    args += ["--input-features", ",".join(feats)] if fmt == "raw" else ["--features", ",".join(feats)]
    code, s = produce(capsys, *args, str(src))
    assert code == 0, s
    messages = N if fmt != "arrow" else 5  # 64+64+64+64+44
    assert (s["rows_read"], s["rows_delivered"], s["messages_delivered"], s["messages_failed"]) == (N, N, messages, 0)
    assert s["bytes_delivered"] > 0 and s["elapsed_s"] > 0

    data = {"format": fmt, "features": feats, "label": "y"} if fmt != "raw" else {"format": "raw", "num_features": 4}
    x, y, msgs = decoded(bootstrap, topic, data, messages)
    assert len(msgs) == messages
    x, y = by_id(x, y)
    np.testing.assert_array_equal(x, expected(t, feats))
    np.testing.assert_array_equal(y, t.column("y").to_numpy().astype(np.float32))


def test_file_uri_directory_feature_field_and_config(tmp_path, bootstrap, make_topic, capsys):
    """A directory of JSON-lines files by file:// URI, into a daemon config's layout (one vector field)."""
    topic = make_topic(2)
    parts = [table(100, seed=s) for s in range(3)]
    (tmp_path / "in").mkdir()
    for k, part in enumerate(parts):
        write(part, tmp_path / "in" / f"part-{k}.jsonl", "json")
    cfg = {
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic]},
        "data": {"format": "json", "feature_field": "v", "num_features": 2, "label": "y"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, s = produce(capsys, "--config", str(tmp_path / "c.yaml"), f"file://{tmp_path / 'in'}")
    assert code == 0 and s["rows_delivered"] == 300 and s["topic"] == topic and s["format"] == "json"
    x, _, _ = decoded(bootstrap, topic, cfg["data"], 300)
    want = np.concatenate([expected(p, ["a", "b"]) for p in parts])
    got = x[np.lexsort(x.T[::-1])]
    np.testing.assert_array_equal(got, want[np.lexsort(want.T[::-1])])


def test_csv_columns_order_of_the_config(tmp_path, bootstrap, make_topic, capsys):
    topic = make_topic(1)
    t = table(50)
    cfg = {
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic]},
        "data": {"format": "csv", "features": ["i", "a"], "label": "y", "csv": {"columns": ["y", "i", "a"], "delimiter": ";"}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, s = produce(capsys, "--config", str(tmp_path / "c.yaml"), str(write(t, tmp_path / "in.parquet", "parquet")))
    assert code == 0 and s["rows_delivered"] == 50
    msgs = read_topic(bootstrap, topic, 50)
    first = sorted(m.value() for m in msgs)[0].decode()
    assert first.count(";") == 2 and first.split(";")[0] in ("0", "1")  # the label leads, as data.csv.columns says
    x, y, _ = decoded(bootstrap, topic, cfg["data"], 50)
    x, y = by_id(x, y)
    np.testing.assert_array_equal(x, expected(t, ["i", "a"]))
    np.testing.assert_array_equal(y, t.column("y").to_numpy().astype(np.float32))


def test_unusable_rows_are_skipped_and_counted(tmp_path, bootstrap, make_topic, capsys):
    topic = make_topic(1)
    path = tmp_path / "in.csv"
    path.write_text("a,y\n1,0\n,1\n2,\ninf,1\n3.5,1\n")  # a null feature, a null label, an infinite feature
    code, s = produce(capsys, "-b", bootstrap, "-t", topic, "--features", "a", str(path))
    # the null feature goes on (the daemon imputes it: data.missing's default); the others would only be dead-lettered
    assert code == 0 and (s["rows_read"], s["rows_skipped"], s["rows_delivered"]) == (5, 2, 3)
    x, _, msgs = decoded(bootstrap, topic, {"format": "json", "features": ["a"]}, 3)
    assert sorted(v for v in x[:, 0].tolist() if v == v) == [1.0, 3.5] and is_missing(x[:, 0]).sum() == 1
    assert sorted(json.loads(m.value())["a"] or 0 for m in msgs) == [0, 1.0, 3.5], "written as null"
    path.write_text("a,y\n1,0\nlots,1\n")  # not a number: the input cannot be read as asked
    assert main(["produce", "-b", bootstrap, "-t", topic, "--features", "a", str(path)]) == 1
    assert "stopped early" in capsys.readouterr().err


def test_limit_key_and_summary_text(tmp_path, bootstrap, make_topic, capsys):
    topic = make_topic(4)
    src = write(table(), tmp_path / "in.csv", "csv")
    code = main(["produce", "-b", bootstrap, "-t", topic, "--features", "i,a", "--key", "name", "--limit", "120", "--progress", str(src)])
    out, err = capsys.readouterr()
    assert code == 0
    assert "rows delivered  120" in out and "0 failed" in out
    assert "\r" in err and "rows/s" in err  # a progress line was drawn
    msgs = read_topic(bootstrap, topic, 120)
    assert len(msgs) == 120
    partitions: dict[bytes, set[int]] = {}
    for m in msgs:
        partitions.setdefault(m.key(), set()).add(m.partition())
    assert set(partitions) == {f"row{k}".encode() for k in range(7)}
    assert all(len(p) == 1 for p in partitions.values())  # one key, one partition


def test_rate_limit(tmp_path, bootstrap, make_topic, capsys):
    topic = make_topic(1)
    src = write(table(200), tmp_path / "in.parquet", "parquet")
    t0 = time.monotonic()
    code, s = produce(capsys, "-b", bootstrap, "-t", topic, "--features", "a", "--rate", "400", str(src))
    took = time.monotonic() - t0
    assert code == 0 and s["rows_delivered"] == 200
    assert took >= 0.4, took  # 200 rows at 400/s, less the first burst of 40


def test_rate_limiter_token_bucket():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    lim = RateLimiter(100, burst=10, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        assert lim.acquire() == 0  # the burst
    lim.acquire(50)  # a big message: waits for its debt
    assert slept == [pytest.approx(0.5)]
    now[0] += 10  # idle: the bucket refills only up to the burst
    assert lim.acquire(10) == 0 and lim.acquire(1) == pytest.approx(0.01)


def test_failed_deliveries_make_exit_1(tmp_path, bootstrap, make_topic, capsys):
    topic = make_topic(1)
    src = write(table(), tmp_path / "in.parquet", "parquet")
    # arrow records of 300 rows are far over a 1000-byte message limit: librdkafka refuses each
    code, s = produce(capsys, "-b", bootstrap, "-t", topic, "-f", "arrow", "--features", "a,b", "--rows-per-message", "300",
                      "-X", "message.max.bytes=1000", str(src))  # fmt: skip
    assert code == 1 and s["messages_failed"] == 1 and s["messages_delivered"] == 0
    assert any("too large" in e.lower() for e in s["errors"]), s["errors"]
    # and over data.max_record_bytes of the daemon's config: refused before sending
    cfg = {
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic]},
        "data": {"format": "arrow", "features": ["a"], "max_record_bytes": 512},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, s = produce(capsys, "--config", str(tmp_path / "c.yaml"), str(src))
    assert code == 1 and s["messages_failed"] == 1 and "data.max_record_bytes" in next(iter(s["errors"]))


def test_usage_errors_exit_2(tmp_path, capsys):
    src = write(table(10), tmp_path / "in.csv", "csv")
    assert main(["produce", "-b", "127.0.0.1:9", "-t", "x", "--features", "a,bb", str(src)]) == 2
    assert "no column 'bb' (did you mean 'b'?)" in capsys.readouterr().err
    assert main(["produce", "-b", "127.0.0.1:9", "-t", "x", str(tmp_path / "missing.csv")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["produce", "-b", "127.0.0.1:9", "-t", "x", "-f", "arrow", "--key", "name", "--features", "a", str(src)]) == 2
    assert "--key: arrow records hold many rows" in capsys.readouterr().err
    assert main(["produce", "-b", "127.0.0.1:9", "-t", "x", "--features", "a", "--rate", "0", "-X", "nokey", str(src)]) == 2
    err = capsys.readouterr().err
    assert "--rate: must be > 0" in err and "-X nokey: must be key=value" in err
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("kafka: {topics: [a, b]}\ndata: {features: [a]}\n")
    assert main(["produce", "--config", str(bad_cfg), str(src)]) == 2
    assert "--topic: which topic?" in capsys.readouterr().err


def test_unreachable_broker_fails_fast(tmp_path, capsys):
    src = write(table(10), tmp_path / "in.csv", "csv")
    t0 = time.monotonic()
    code = main(["produce", "-b", f"127.0.0.1:{free_port()}", "-t", "x", "--features", "a", "--timeout", "2", str(src)])
    assert code == 1 and time.monotonic() - t0 < 15
    assert "cannot reach Kafka" in capsys.readouterr().err
    assert main(["produce", "-b", "127.0.0.1:9", "-t", "x", "--features", "a", "-X", "no.such.property=1", str(src)]) == 1
    assert "librdkafka refused the producer settings" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["json", "csv", "arrow"])
def test_categorical_columns_nulls_and_class_names_are_written_as_they_are(tmp_path, bootstrap, make_topic, capsys, fmt):
    """Strings, integer ids and class names as the file holds them; the daemon's own decoder reads them back, nothing rejected."""
    import yaml

    topic = make_topic(1)
    path = tmp_path / "in.csv"
    path.write_text("a,user,item,y\n1.5,alice,7,cat\n,bob,8,dog\n2.5,,9,cat\n")
    data = {"format": fmt, "features": ["a"], "categorical": ["user", "item"], "label": "y"}
    cfg = {
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic]},
        "data": data,
        "trainer": {"task": "binary", "classes": ["cat", "dog"]},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, s = produce(capsys, "--config", str(tmp_path / "c.yaml"), str(path))
    assert code == 0 and s["rows_delivered"] == 3 and s["rows_skipped"] == 0
    msgs = read_topic(bootstrap, topic, 1 if fmt == "arrow" else 3)
    out = make_decoder(parse(DataConfig, data, "data"), LabelRule("binary", 0, ("cat", "dog"))).decode([m.value() for m in msgs])
    assert out.rejects == [] and out.y.tolist() == [0, 1, 0]
    assert is_missing(out.x[:, 0]).tolist() == [False, True, False]
    from streamtrain.streams.features import FeatureSpec

    spec = FeatureSpec(categorical=("user", "item"))
    assert out.ids[:, 1].tolist() == spec.rows(1, [7, 8, 9]).tolist()  # integer ids as their digits, in every format
    assert out.ids[2, 0] == spec.missing_row(0)


ROW_SCHEMA = {"type": "record", "name": "Row", "fields": [{"name": k, "type": "double"} for k in ("i", "a", "b", "c", "y")]}


def row_descriptor_set(path) -> str:
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto(name="row.proto", package="t", syntax="proto3")
    msg = fd.message_type.add(name="Row")
    for number, k in enumerate(("i", "a", "b", "c", "y"), 1):
        msg.field.add(name=k, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE)
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[fd]).SerializeToString())
    return str(path)


@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
@pytest.mark.parametrize("framed", [True, False], ids=["registry", "unframed"])
def test_avro_and_protobuf_round_trip_with_a_registry_or_a_schema_file(tmp_path, bootstrap, make_topic, capsys, fmt, framed):
    from tests.schema_registry_util import LoopbackRegistry

    topic = make_topic(2)
    t = table(120)
    src = write(t, tmp_path / "in.parquet", "parquet")
    if fmt == "avro":
        schema = tmp_path / "row.avsc"
        schema.write_text(json.dumps(ROW_SCHEMA))
        schema = str(schema)
    else:
        schema = row_descriptor_set(tmp_path / "row.desc")
    feats = ["i", "a", "b", "c"]
    with LoopbackRegistry() as registry:
        where = ["--schema-registry", registry.url] if framed else []
        args = ["-b", bootstrap, "-t", topic, "-f", fmt, "--features", ",".join(feats), "--schema", schema, *where]
        code, s = produce(capsys, *args, str(src))
        assert code == 0 and s["messages_delivered"] == 120, s
        data = {"format": fmt, "features": feats, "label": "y"}
        data.update({"schema_registry": {"url": registry.url}} if framed else {"schema": schema})
        x, y, msgs = decoded(bootstrap, topic, data, 120)
        assert all(m.value()[0] == 0 for m in msgs) if framed else True
        assert list(registry.subjects) == ([f"{topic}-value"] if framed else [])
    x, y = by_id(x, y)
    np.testing.assert_array_equal(x, expected(t, feats))
    np.testing.assert_array_equal(y, t.column("y").to_numpy().astype(np.float32))


def test_avro_without_a_schema_is_a_usage_error(tmp_path, capsys):
    src = write(table(5), tmp_path / "in.csv", "csv")
    args = ["-b", "127.0.0.1:9", "-t", "x", "-f", "avro", "--features", "a", "--schema-registry", "http://r:1"]
    assert main(["produce", *args, str(src)]) == 2
    assert "--schema" in capsys.readouterr().err
