"""Turn a consumed batch of Kafka record values into feature and label arrays.

One vectorized decode per batch (``b"".join`` + one ``np.frombuffer`` for raw,
``pyarrow.csv`` over the joined lines, Arrow IPC streams with many rows each, msgspec's
typed parser mapped over the JSON records in C; Avro and Protobuf records read with their
writer's schema into dicts that msgspec types by the JSON rules): decoding record by record in Python
next to the trainer starves it.  When a csv batch holds a record the fast path cannot
parse, the batch is bisected so good records keep the fast path and only the bad ones
are looked at one by one; a JSON batch with a bad record is parsed record by record.

Records that cannot be used are returned as :class:`Reject` with a reason from
:data:`REASONS`; the caller counts them and sends them to the dead-letter topic.  A
decoder turns one record's bytes into a row only through :func:`each_record`, the
per-record boundary: whatever a record holds, it can only ever fail itself.  A new
decoder (a format of its own) keeps that by doing the same.
"""

from __future__ import annotations

from streamtrain.streams.decode.arrow import ArrowDecoder
from streamtrain.streams.decode.avro import AvroDecoder
from streamtrain.streams.decode.common import REASONS, Decoded, Decoder, LabelRule, Reject, each_record
from streamtrain.streams.decode.csv import CsvDecoder
from streamtrain.streams.decode.json import JsonDecoder
from streamtrain.streams.decode.protobuf import ProtobufDecoder
from streamtrain.streams.decode.raw import RawDecoder
from streamtrain.streams.failpoints import wrap_decoder
from streamtrain.streams.features import FeatureSpec

__all__ = ["REASONS", "Decoded", "Decoder", "LabelRule", "Reject", "each_record", "make_decoder"]


def make_decoder(data: object, rule: LabelRule, side: str = "") -> Decoder:
    """The decoder for a :class:`streamtrain.streams.config.DataConfig`-shaped object.

    ``side``: with ``data.labels.topic`` (``streams/join/``), ``"features"`` for the feature
    records (no label; the key's 64-bit hash as the last ids column) or ``"labels"`` for the
    label records (the key's hash as the one ids column, the label).
    """
    if side:
        return wrap_decoder(_join_decoder(data, rule, side))
    return wrap_decoder(_decoder(data, rule))


def _join_decoder(data: object, rule: LabelRule, side: str) -> Decoder:
    lt = data.labels
    spec = FeatureSpec.from_data(data)
    if side == "features":
        spec = FeatureSpec(spec.numbers, (*spec.categorical, lt.key_field), spec.buckets, spec.missing, spec.max_category_bytes, keys=1)
        return JsonDecoder(tuple(data.features), None, data.feature_field, data.width, rule, data.max_record_bytes, spec)
    spec = FeatureSpec((), (lt.key_field,), spec.buckets, spec.missing, spec.max_category_bytes, keys=1)
    return JsonDecoder((), lt.label_field, None, 0, rule, data.max_record_bytes, spec)


def _decoder(data: object, rule: LabelRule) -> Decoder:
    fmt = data.format
    if fmt == "raw":
        return RawDecoder(data.width, rule, data.max_record_bytes)
    spec = FeatureSpec.from_data(data)
    if fmt == "json":
        return JsonDecoder(tuple(data.features), data.label, data.feature_field, data.width, rule, data.max_record_bytes, spec)
    if fmt == "csv":
        columns = tuple(data.csv.columns) or (*data.features, *spec.categorical, data.label)
        return CsvDecoder(columns, tuple(data.features), data.label, data.csv.delimiter, rule, data.max_record_bytes, spec)
    if fmt == "arrow":
        return ArrowDecoder(tuple(data.features), data.label, data.feature_field, data.width, rule, data.max_record_bytes, spec)
    if fmt in ("avro", "protobuf"):  # read into dicts with the writer's schema, then typed as JSON records are
        rows = JsonDecoder(tuple(data.features), data.label, data.feature_field, data.width, rule, data.max_record_bytes, spec)
        if fmt == "avro":
            return AvroDecoder(rows, data.max_record_bytes, data.schema_registry, data.schema)
        return ProtobufDecoder(rows, data.max_record_bytes, data.schema_registry, data.schema, data.schema_message)
    raise ValueError(f"unknown data.format {fmt!r}")
