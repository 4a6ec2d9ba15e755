"""Avro and Protobuf records: Confluent-framed through a (loopback) schema registry, or unframed with data.schema.

Records are written by confluent-kafka's own AvroSerializer / ProtobufSerializer against
tests/schema_registry_util.py, and must decode to exactly the arrays the JSON decoder gives
for the same fields; schema evolution, unknown ids, a registry that is down and hostile
bytes each fail only the records they touch.
"""

from __future__ import annotations

import io
import json
import struct

import fastavro
import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from streamtrain.streams.config import DataConfig, parse
from streamtrain.streams.decode import LabelRule, make_decoder
from streamtrain.streams.decode.protobuf import message_indexes
from streamtrain.streams.features.spec import MISSING_NUMBER
from tests.avro_util import (
    CLASSES,
    CLICK_V1,
    CLICK_V2,
    CLICK_V3,
    DATA,
    as_json,
    avro_serializer,
    click_message,
    messages,
    protobuf_serializer,
    records,
    serialize,
)
from tests.kafka_util import free_port, read_topic
from tests.schema_registry_util import LoopbackRegistry

RULE = LabelRule("binary", 2, CLASSES)


@pytest.fixture
def registry():
    with LoopbackRegistry() as r:
        yield r
    assert not r.unknown, f"the client called endpoints the stand-in does not know: {r.unknown}"


def decoder(fmt: str, rule: LabelRule = RULE, **data):
    return make_decoder(parse(DataConfig, {"format": fmt, **DATA, **data}, "data"), rule)


def framed(fmt: str, url: str, rows: list[dict], topic: str = "t", schema: dict = CLICK_V1, **cls_args) -> list[bytes]:
    if fmt == "avro":
        return serialize(avro_serializer(url, schema), rows, topic)
    cls, _ = click_message(**cls_args)
    return serialize(protobuf_serializer(url, cls), messages(cls, rows), topic)


def same(out, ref) -> None:
    assert [(r.index, r.reason) for r in out.rejects] == [(r.index, r.reason) for r in ref.rejects]
    np.testing.assert_array_equal(out.msg_index, ref.msg_index)
    np.testing.assert_array_equal(out.x.view(np.uint32), ref.x.view(np.uint32))  # the missing mark's payload too
    np.testing.assert_array_equal(out.y, ref.y)
    np.testing.assert_array_equal(out.ids, ref.ids)


@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
@pytest.mark.parametrize("missing", ["impute", "reject"])
def test_framed_records_decode_to_the_json_decoders_arrays(registry, fmt, missing):
    rows = records(40)
    out = decoder(fmt, missing=missing, schema_registry={"url": registry.url}).decode(framed(fmt, registry.url, rows))
    ref = decoder("json", missing=missing).decode(as_json(rows))
    same(out, ref)
    assert len(out.y) == (40 if missing == "impute" else 32) and (out.x.view(np.uint32) == MISSING_NUMBER.view(np.uint32)).any() == (
        missing == "impute"
    )
    assert registry.lookups(1) == 1


def test_unframed_avro_with_a_local_schema_file(tmp_path):
    path = tmp_path / "click.avsc"
    path.write_text(json.dumps(CLICK_V1))
    parsed = fastavro.parse_schema(CLICK_V1)
    values = []
    for r in records(20):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, r)
        values.append(buf.getvalue())
    same(decoder("avro", schema=str(path)).decode(values), decoder("json").decode(as_json(records(20))))


def test_unframed_protobuf_with_a_descriptor_set(tmp_path):
    cls, fd = click_message()
    path = tmp_path / "click.desc"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[fd]).SerializeToString())
    values = [m.SerializeToString() for m in messages(cls, records(20))]
    out = decoder("protobuf", schema=str(path), schema_message="st.Click").decode(values)
    same(out, decoder("json").decode(as_json(records(20))))
    same(decoder("protobuf", schema=str(path)).decode(values), out)  # the file's first message by default


@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
def test_schema_evolution_an_added_field_is_ignored_a_removed_one_is_missing(registry, fmt):
    v1 = framed(fmt, registry.url, records(10))
    v2 = framed(fmt, registry.url, records(10, 10), schema=CLICK_V2, extra=True)
    v3 = framed(fmt, registry.url, records(10, 20), schema=CLICK_V3, with_b=False)
    assert len({v[1:5] for v in (v1[0], v2[0], v3[0])}) == 3  # three schema ids
    out = decoder(fmt, schema_registry={"url": registry.url}).decode(v1 + v2 + v3)
    gone = [{**r, "b": None} for r in records(10, 20)]
    same(out, decoder("json").decode(as_json(records(20) + gone)))
    assert (out.x[20:, 1].view(np.uint32) == MISSING_NUMBER.view(np.uint32)).all()
    strict = decoder(fmt, missing="reject", schema_registry={"url": registry.url}).decode(v3)
    assert {r.reason for r in strict.rejects} == {"wrong_shape"} and len(strict.rejects) == 10  # data.missing: reject


@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
def test_an_unknown_schema_id_rejects_its_records_and_is_looked_up_once_per_back_off(registry, fmt):
    good = framed(fmt, registry.url, records(6))
    unknown = [v[:1] + struct.pack(">I", 999) + v[5:] for v in good[:3]]
    dec = decoder(fmt, schema_registry={"url": registry.url, "retry_after_s": 30})
    lookup = dec._lookup
    now = [0.0]
    lookup.clock = lambda: now[0]
    for _ in range(3):  # three batches, each with the unknown id three times
        out = dec.decode(good + unknown)
        assert [(r.index, r.reason) for r in out.rejects] == [(i, "unknown_schema") for i in (6, 7, 8)]
        assert "schema id 999" in out.rejects[0].error and len(out.y) == 6
    assert registry.lookups(999) == 1 and registry.lookups(1) == 1
    now[0] = 31.0  # past the back-off: asked once more
    dec.decode(unknown)
    assert registry.lookups(999) == 2


@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
def test_truncated_garbage_and_unframed_records_fail_only_themselves(registry, fmt):
    good = framed(fmt, registry.url, records(8))
    bad = [good[0][:-3], b"\x01" + good[1][1:], b"\x00\x00", b"garbage!", good[2] + b"\xff\xff\xff"]
    batch = [good[3], *bad, good[4]]
    out = decoder(fmt, schema_registry={"url": registry.url}).decode(batch)
    assert out.msg_index.tolist()[0] == 0 and out.msg_index.tolist()[-1] == len(batch) - 1
    rejected = {r.index for r in out.rejects}
    assert rejected >= {2, 3, 4}  # unframed, too short, not magic
    assert set(out.msg_index.tolist()) | rejected == set(range(len(batch))) and not set(out.msg_index.tolist()) & rejected
    assert all(r.reason in ("undecodable", "wrong_shape", "unknown_schema", "missing_label") for r in out.rejects)


def test_a_nan_written_as_a_double_is_non_finite_not_missing(registry):
    rows = records(3)
    rows[1]["a"] = float("nan")
    out = decoder("avro", schema_registry={"url": registry.url}).decode(framed("avro", registry.url, rows))
    assert [(r.index, r.reason) for r in out.rejects] == [(1, "non_finite")]


@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
def test_a_registry_that_is_down_rejects_only_the_ids_not_yet_known(fmt):
    with LoopbackRegistry() as registry:
        first = framed(fmt, registry.url, records(5))
        later = framed(fmt, registry.url, records(5, 5), topic="other", schema=CLICK_V2, extra=True)
        dec = decoder(fmt, schema_registry={"url": registry.url, "timeout_s": 1})
        assert len(dec.decode(first).y) == 5  # schema 1 known from here on
    out = dec.decode(first + later)  # the registry is gone: schema 2 cannot be looked up
    assert out.msg_index.tolist() == list(range(5))
    assert [(r.index, r.reason) for r in out.rejects] == [(i, "unknown_schema") for i in range(5, 10)]


def test_a_registry_that_never_answered_rejects_with_a_reason():
    url = f"http://127.0.0.1:{free_port()}"
    value = b"\x00\x00\x00\x00\x07" + b"\x00" * 20
    out = decoder("avro", schema_registry={"url": url, "timeout_s": 1}).decode([value, value])
    assert [r.reason for r in out.rejects] == ["unknown_schema"] * 2 and "schema id 7" in out.rejects[0].error


def test_message_indexes_are_read_the_confluent_way():
    assert message_indexes(b"\x00rest", 0) == ((0,), 1)  # a lone 0: the first message
    assert message_indexes(bytes([4, 2, 6]), 0) == ((1, 3), 3)  # zigzag count 2, then zigzag 1 and 3


@pytest.mark.integration
def test_the_daemon_trains_avro_records_from_the_broker_and_dead_letters_the_bad_ones(tmp_path, bootstrap, make_topic, registry):
    from tests.daemon_util import Daemon, daemon_config, write_config
    from tests.kafka_util import TestProducer

    topic = make_topic(2)
    values = framed("avro", registry.url, records(3000), topic=topic)
    unknown = [v[:1] + struct.pack(">I", 4242) + v[5:] for v in values[:3]]
    bad = [*unknown, b"garbage", values[0][:-4]]  # three of an unknown id, one not framed, one cut short
    producer = TestProducer(bootstrap)
    producer.send_all(topic, values[:1500] + bad + values[1500:], partitions=2)
    producer.flush()
    data = {"format": "avro", **DATA, "schema_registry": {"url": registry.url}}
    cfg = daemon_config(tmp_path, bootstrap, [topic], trainer={"task": "binary", "classes": list(CLASSES)}, ring={"ingest_workers": 1})
    cfg["data"] = data
    d = Daemon(write_config(tmp_path / "c.yaml", cfg), tmp_path / "d.log")
    d.wait_for("3000 trained", lambda m: m.get("streamtrain_samples_trained_total", 0) >= 3000, 90)
    m = d.settled()
    assert d.terminate()[0] == 0
    assert m["streamtrain_samples_trained_total"] == 3000
    rejected = {k: v for k, v in m.items() if k.startswith("streamtrain_records_rejected_total") and v}
    assert rejected == {
        'streamtrain_records_rejected_total{reason="unknown_schema"}': 3,
        'streamtrain_records_rejected_total{reason="undecodable"}': 2,
    }, rejected
    assert registry.lookups(4242) == 1 and registry.lookups(1) == 1  # once per id, not per record
    dead = read_topic(bootstrap, f"{topic}.dlq", 5, timeout=15)
    reasons = sorted(dict(m.headers())["streamtrain.error.class"].decode() for m in dead)
    assert reasons == ["undecodable"] * 2 + ["unknown_schema"] * 3
    assert sorted(m.value() for m in dead) == sorted(bad)


def test_without_the_extra_the_error_names_it(monkeypatch):
    import importlib

    from streamtrain.streams.errors import ConfigError

    real = importlib.import_module

    def missing(name, *args):
        if name == "fastavro" or name.startswith("google.protobuf"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    for fmt in ("avro", "protobuf"):
        with pytest.raises(ConfigError, match=rf"pip install 'streamtrain\[{fmt}\]'"):
            decoder(fmt, schema_registry={"url": "http://127.0.0.1:9"})


def test_a_protobuf_schema_sent_as_proto_text_is_an_unknown_schema_saying_why(registry):
    sid = registry.register("p-value", 'syntax = "proto3";\nmessage Click { double a = 1; }\n', "PROTOBUF")
    value = b"\x00" + struct.pack(">I", sid) + b"\x00" + b"\x09" + b"\x00" * 8
    out = decoder("protobuf", schema_registry={"url": registry.url}).decode([value])
    assert [r.reason for r in out.rejects] == ["unknown_schema"] and "format=serialized" in out.rejects[0].error
