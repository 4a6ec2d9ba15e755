"""Property tests, with Hypothesis, for every parser of bytes a producer or a client sends.

For each decoder, batches that mix good records with hostile ones (arbitrary bytes, the
named kinds of bench/hostile.py, good records mutated: cut, bit flips, splices, nesting,
huge numbers, NUL, BOM, CRLF, blank lines, corrupt Arrow IPC):

- decoding never raises;
- every message is accounted for exactly once: its rows, or one reject naming it (an Arrow
  message: its rows out plus the rows its rejects name are its rows);
- a batch is its records: each record decodes in the batch as it does alone.

For serving, any body: the parser raises only ``InputError`` (a 4xx), and through the real
app no generated body is answered with a 500.  The coverage-guided long runs are
``python -m bench.fuzz`` (atheris); what they find becomes a case here or in test_decode.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.hostile import FORMATS, OPERATORS, check_batch, decoder, good, kinds, mutate
from streamtrain.streams.quarantine import Quarantine

EXAMPLES = int(os.environ.get("STREAMTRAIN_FUZZ_EXAMPLES", "120"))  # per property; raise it for a longer run by hand
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DECODERS = {fmt: decoder(fmt) for fmt in FORMATS}
KINDS = {fmt: [v for v in kinds(fmt).values() if v is None or len(v) < 300_000] for fmt in FORMATS}  # the big ones: test_decode


@st.composite
def hostile_value(draw, fmt: str) -> bytes | None:
    i = draw(st.integers(0, 10_000))
    how = draw(st.sampled_from(["good", "mutated", "mutated twice", "bytes", "named"]))
    if how == "good":
        return good(fmt, i)
    if how == "bytes":
        return draw(st.binary(max_size=400))
    if how == "named":
        return draw(st.sampled_from(KINDS[fmt]))
    value = good(fmt, i)
    for _ in range(1 if how == "mutated" else 2):
        op = draw(st.sampled_from(OPERATORS))
        value = mutate(value, op, draw(st.integers(0, 4096)), draw(st.integers(0, 255)), good(fmt, i + 1))
    return value


def batches(fmt: str):
    return st.lists(hostile_value(fmt), min_size=1, max_size=40)


@pytest.mark.parametrize("fmt", list(FORMATS))
@PROPERTY
@given(data=st.data())
def test_every_decoder_never_raises_and_accounts_for_each_message_once(fmt, data):
    values = data.draw(batches(fmt))
    check_batch(fmt, DECODERS[fmt], values)


@pytest.mark.parametrize("fmt", list(FORMATS))
@PROPERTY
@given(data=st.data())
def test_a_good_record_decodes_the_same_among_hostile_ones(fmt, data):
    """The good records of a hostile batch come out exactly as a batch of good records alone gives them."""
    values = data.draw(batches(fmt))
    good_at = [i for i, v in enumerate(values) if v == good(fmt, 0)] or [0]
    values[good_at[0]] = good(fmt, 0)
    out = DECODERS[fmt].decode(values)
    clean = DECODERS[fmt].decode([good(fmt, 0)])
    np.testing.assert_array_equal(out.x[out.msg_index == good_at[0]], clean.x)
    assert not [r for r in out.rejects if r.index == good_at[0]]


@pytest.fixture(scope="module")
def schema_framed():
    """Avro and Protobuf decoders on a loopback registry, and good framed records written by confluent-kafka's serializers."""
    from streamtrain.streams.config import DataConfig, parse
    from streamtrain.streams.decode import LabelRule, make_decoder
    from tests.avro_util import CLASSES, DATA, avro_serializer, click_message, messages, protobuf_serializer, records, serialize
    from tests.avro_util import CLICK_V1 as SCHEMA
    from tests.schema_registry_util import LoopbackRegistry

    with LoopbackRegistry() as registry:
        cls, _ = click_message()
        good_records = {
            "avro": serialize(avro_serializer(registry.url, SCHEMA), records(30)),
            "protobuf": serialize(protobuf_serializer(registry.url, cls), messages(cls, records(30)), "p"),
        }
        data = {**DATA, "schema_registry": {"url": registry.url, "timeout_s": 1}}
        rule = LabelRule("binary", 2, CLASSES)
        decoders = {f: make_decoder(parse(DataConfig, {"format": f, **data}, "data"), rule) for f in good_records}
        yield decoders, good_records


@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
@PROPERTY
@given(data=st.data())
def test_mutated_avro_and_protobuf_frames_fail_only_themselves(schema_framed, fmt, data):
    """Cut, flipped, spliced Confluent frames (a schema id changed: an unknown one) decode to rows or rejects, never raise."""
    decoders, good_records = schema_framed
    pool = good_records[fmt]
    values = []
    for _ in range(data.draw(st.integers(1, 20))):
        value = pool[data.draw(st.integers(0, len(pool) - 1))]
        for _ in range(data.draw(st.integers(0, 2))):
            op = data.draw(st.sampled_from(OPERATORS))
            value = mutate(value, op, data.draw(st.integers(0, 4096)), data.draw(st.integers(0, 255)), pool[0])
        values.append(value)
    check_batch(fmt, decoders[fmt], values)


JOIN = {"topic": "clicks", "key_field": "request_id", "label_field": "clicked"}


def join_record(side: str, i: int) -> bytes:
    """A good record of one side of a join (data.labels): an impression, or its click."""
    if side == "features":
        return json.dumps({"request_id": f"r{i}", "a": float(i), "b": float(-i), "c": i / 4}).encode()
    return json.dumps({"request_id": f"r{i}", "clicked": i % 2 == 0}).encode()


@pytest.mark.parametrize("side", ["features", "labels"])
@PROPERTY
@given(data=st.data())
def test_the_join_decoders_never_raise_and_account_for_each_message_once(side, data):
    """The two decoders of a join (feature records without a label, label records with only key and label) hold the
    same promise as every decoder; each row carries its key's 64-bit hash as the last ids column."""
    from bench.hostile import data_config
    from streamtrain.streams.decode import LabelRule, make_decoder

    dec = make_decoder(data_config("json", labels=JOIN), LabelRule("binary"), side)
    values = []
    for _ in range(data.draw(st.integers(1, 30))):
        i = data.draw(st.integers(0, 10_000))
        how = data.draw(st.sampled_from(["good", "mutated", "bytes"]))
        v = join_record(side, i) if how != "bytes" else data.draw(st.binary(max_size=300))
        if how == "mutated":
            op = data.draw(st.sampled_from(OPERATORS))
            v = mutate(v, op, data.draw(st.integers(0, 400)), data.draw(st.integers(0, 255)), join_record(side, i + 1))
        values.append(v)
    check_batch("json", dec, values)
    out = dec.decode(values)
    assert out.ids.shape[1] == 1, "the key: a categorical column of its own, last"


@PROPERTY
@given(data=st.data(), fmt=st.sampled_from(["json", "csv", "arrow"]))
def test_the_quarantine_takes_out_exactly_the_records_that_crash_the_decoder(data, fmt):
    """Whatever the batch, with a decoder that raises on some records: the others decode as they would without them."""
    values = data.draw(batches(fmt))
    bad = set(data.draw(st.lists(st.integers(0, len(values) - 1), max_size=5)))
    marked = [b"CRASH" + (v or b"") if i in bad else v for i, v in enumerate(values)]

    class Buggy:
        width = 3

        def decode(self, vs):
            if any(v is not None and v.startswith(b"CRASH") for v in vs):
                raise ZeroDivisionError("a bug")
            return DECODERS[fmt].decode(vs)

    part, offset = np.zeros(len(values), np.int32), np.arange(len(values), dtype=np.int64)
    out = Quarantine(Buggy(), None, None).decode(marked, part, offset, [("t", 0)], str)
    want = DECODERS[fmt].decode([None if i in bad else v for i, v in enumerate(values)])
    np.testing.assert_array_equal(out.msg_index, want.msg_index)
    np.testing.assert_array_equal(out.x, want.x)
    got = {(r.index, r.reason) for r in out.rejects}
    assert got == {(r.index, r.reason) for r in want.rejects if r.index not in bad} | {(i, "decoder_crash") for i in bad}


# ----------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A published version (mlp on a, b, c) on the real app and server; the model, and a client."""
    pytest.importorskip("fastapi", reason="the serve extra")
    from streamtrain.serve.server import build
    from tests.serve_util import Client, InProcess
    from tests.test_publish import snapshot, train, trainer

    tmp = tmp_path_factory.mktemp("served")
    t = trainer(tmp)
    train(t, 5)
    snapshot(t)
    t.close()
    app, watcher, _metrics = build(tmp / "repo", "m", max_body_bytes=64 << 10, max_instances=64)
    watcher.check()
    server = InProcess(app)
    client = Client(server.port)
    yield watcher.current, client
    client.close()
    watcher.close()
    server.close()


def json_values(max_leaves: int = 30):
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=10),
    )
    return st.recursive(
        leaves, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=5), kids, max_size=5), max_leaves=max_leaves
    )


@st.composite
def bodies(draw) -> bytes:
    """Request bodies: good ones, good ones mutated, JSON of any shape, arbitrary bytes."""
    row = {"a": draw(st.floats(-1e3, 1e3)), "b": draw(st.floats(-1e3, 1e3)), "c": draw(st.floats(-1e3, 1e3))}
    ok = json.dumps({"instances": [row, list(row.values())]}).encode()
    how = draw(st.sampled_from(["good", "mutated", "json", "instances", "bytes"]))
    if how == "good":
        return ok
    if how == "bytes":
        return draw(st.binary(max_size=300))
    if how == "json":
        return json.dumps(draw(json_values())).encode()
    if how == "instances":
        return json.dumps({"instances": draw(st.lists(json_values(10), max_size=4))}).encode()
    return mutate(ok, draw(st.sampled_from(OPERATORS)), draw(st.integers(0, 400)), draw(st.integers(0, 255)), ok)


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=bodies())
def test_the_serving_parser_raises_only_input_errors(served, body):
    from streamtrain.serve.app import _predict
    from streamtrain.serve.model import InputError

    model, _client = served
    try:
        answer, n = _predict(model, body, 64)
    except InputError as exc:
        assert str(exc), "an input error says what is wrong"
    else:
        assert n >= 1 and json.loads(answer)["predictions"]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=bodies())
def test_no_body_gets_a_500_from_the_server(served, body):
    _model, client = served
    code, doc = client.post("/v1/models/m:predict", raw=body)
    assert code in (200, 413, 422), (code, doc, body[:80])
    assert code == 200 or (isinstance(doc, dict) and doc.get("error")), "a 4xx says why"


@st.composite
def v2_requests(draw) -> tuple[bytes, str | None]:
    """v2 infer requests (serve/v2.py) and their Inference-Header-Content-Length: good ones with JSON or binary tensors,
    those mutated, JSON of any shape with and without a header length, arbitrary bytes."""
    import struct

    n = draw(st.integers(1, 3))
    values = draw(st.lists(st.floats(-1e3, 1e3), min_size=3 * n, max_size=3 * n))
    tensor = {"name": "features", "datatype": "FP32", "shape": [n, 3]}
    how = draw(st.sampled_from(["json", "binary", "mutated", "mutated_binary", "any_json", "bytes"]))
    if how in ("json", "mutated"):
        body, header = json.dumps({"inputs": [{**tensor, "data": values}], "outputs": [{"name": "prediction"}]}).encode(), None
    elif how == "any_json":
        return json.dumps(draw(json_values())).encode(), draw(st.sampled_from([None, "0", "5", "x", "999999"]))
    elif how == "bytes":
        return draw(st.binary(max_size=300)), draw(st.sampled_from([None, "0", "10", "-1"]))
    else:
        blob = struct.pack(f"<{3 * n}f", *values)
        head = json.dumps(
            {"inputs": [{**tensor, "parameters": {"binary_data_size": len(blob)}}], "parameters": {"binary_data_output": True}}
        )
        body, header = head.encode() + blob, str(len(head))
    if how.startswith("mutated"):
        body = mutate(body, draw(st.sampled_from(OPERATORS)), draw(st.integers(0, 400)), draw(st.integers(0, 255)), body)
    return body, header


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=v2_requests())
def test_the_v2_parser_raises_only_input_errors(served, request):
    from streamtrain.serve.model import InputError
    from streamtrain.serve.v2 import infer

    model, _client = served
    body, header = request
    try:
        answer, _headers, n = infer(model, body, header, 64)
    except InputError as exc:
        assert str(exc), "an input error says what is wrong"
    else:
        assert n >= 1 and answer


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=v2_requests())
def test_no_v2_request_gets_a_500_from_the_server(served, request):
    _model, client = served
    body, header = request
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    code, doc = client.request("POST", "/v2/models/m/infer", raw=body, headers=headers)
    assert code in (200, 400, 413), (code, doc, body[:80])
    assert code == 200 or (isinstance(doc, dict) and doc.get("error")), "a 4xx says why"
