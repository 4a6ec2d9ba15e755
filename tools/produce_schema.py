"""Avro and Protobuf records for ``streamtrain produce``: the input's rows serialized with a writer schema.

With a schema registry (``data.schema_registry.url`` or ``--schema-registry``) the records
are written by confluent-kafka's own ``AvroSerializer`` / ``ProtobufSerializer``: the
schema (``--schema``) is registered under the topic's subject (``<topic>-value``) and each
record framed with its id, as any Confluent producer does.  Without one, ``data.schema``
(or ``--schema``) writes unframed records, which the daemon reads with the same file.
The schema's numeric fields should be ``double`` / ``float`` (the rows' numbers are
floats), the categorical ones whatever the input holds (strings, integers).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from streamtrain.streams.decode.registry import need, registry_conf
from streamtrain.streams.errors import ConfigError


def writer(fmt: str, data: Any, schema_path: str, message: str, topic: str) -> Callable[[list[dict]], list[bytes]]:
    """A function from row dicts to record values in ``fmt`` (avro | protobuf)."""
    framed = bool(data.schema_registry.url)
    if not schema_path:
        raise ConfigError([f"--schema: {fmt} records need the writer's schema (an .avsc, or a protobuf FileDescriptorSet)"])
    if fmt == "avro":
        return _avro(data, schema_path, topic) if framed else _avro_plain(schema_path)
    cls = _message_class(schema_path, message)
    if not framed:
        return lambda rows: [_message(cls, r).SerializeToString() for r in rows]
    modules = ("confluent_kafka.schema_registry", "confluent_kafka.schema_registry.protobuf", "confluent_kafka.serialization")
    sr, pb, ser = need("protobuf", *modules)
    serializer = pb.ProtobufSerializer(cls, sr.SchemaRegistryClient(registry_conf(data.schema_registry)), {"use.deprecated.format": False})
    ctx = ser.SerializationContext(topic, ser.MessageField.VALUE)
    return lambda rows: [serializer(_message(cls, r), ctx) for r in rows]


def _avro(data: Any, path: str, topic: str) -> Callable[[list[dict]], list[bytes]]:
    sr, avro, ser = need("avro", "confluent_kafka.schema_registry", "confluent_kafka.schema_registry.avro", "confluent_kafka.serialization")
    with open(path) as f:
        schema = f.read()
    serializer = avro.AvroSerializer(sr.SchemaRegistryClient(registry_conf(data.schema_registry)), schema)
    ctx = ser.SerializationContext(topic, ser.MessageField.VALUE)
    return lambda rows: [serializer(r, ctx) for r in rows]


def _avro_plain(path: str) -> Callable[[list[dict]], list[bytes]]:
    (fastavro,) = need("avro", "fastavro")
    with open(path) as f:
        parsed = fastavro.parse_schema(json.load(f))

    def write(rows: list[dict]) -> list[bytes]:
        out = []
        for r in rows:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, parsed, r)
            out.append(buf.getvalue())
        return out

    return write


def _message_class(path: str, message: str) -> Any:
    descriptor_pb2, descriptor_pool, message_factory = need(
        "protobuf", "google.protobuf.descriptor_pb2", "google.protobuf.descriptor_pool", "google.protobuf.message_factory"
    )
    with open(path, "rb") as f:
        files = descriptor_pb2.FileDescriptorSet.FromString(f.read()).file
    pool = descriptor_pool.DescriptorPool()
    for fd in files:
        pool.Add(fd)
    if not message:
        last = files[-1]
        message = f"{last.package}.{last.message_type[0].name}" if last.package else last.message_type[0].name
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(message))


def _message(cls: Any, row: dict) -> Any:
    """A message of the row's fields the message has (a None left unset: missing)."""
    fields = cls.DESCRIPTOR.fields_by_name
    return cls(**{k: v for k, v in row.items() if v is not None and k in fields})
