"""Records written the way producers write them: confluent-kafka's own Avro / Protobuf serializers, for the tests."""

from __future__ import annotations

import json

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# The fields of every test record: numbers (one nullable), categorical fields (a string, an integer id), a boolean, the label.
CLICK_V1 = {
    "type": "record",
    "name": "Click",
    "namespace": "st",
    "fields": [
        {"name": "a", "type": "double"},
        {"name": "b", "type": ["null", "double"], "default": None},
        {"name": "user", "type": ["null", "string"], "default": None},
        {"name": "item", "type": "long"},
        {"name": "flag", "type": "boolean"},
        {"name": "y", "type": "string"},
    ],
}
# v2 adds an optional field with a default (the config does not ask for it); v3 drops b (the config still does).
CLICK_V2 = {**CLICK_V1, "fields": [*CLICK_V1["fields"], {"name": "country", "type": ["null", "string"], "default": None}]}
CLICK_V3 = {**CLICK_V1, "fields": [f for f in CLICK_V1["fields"] if f["name"] != "b"]}
DATA = {"features": ["a", "b", "flag"], "categorical": ["user", "item"], "label": "y"}
CLASSES = ("no", "yes")


def records(n: int, start: int = 0) -> list[dict]:
    """Click records; every fifth b and every seventh user missing (None)."""
    return [
        {
            "a": i * 0.5,
            "b": None if i % 5 == 0 else -float(i),
            "user": None if i % 7 == 0 else f"u{i % 4}",
            "item": 100 + i % 3,
            "flag": i % 2 == 0,
            "y": CLASSES[i % 2],
        }
        for i in range(start, start + n)
    ]


def as_json(rows: list[dict]) -> list[bytes]:
    return [json.dumps(r).encode() for r in rows]


def avro_serializer(url: str, schema: dict) -> AvroSerializer:
    return AvroSerializer(SchemaRegistryClient({"url": url}), json.dumps(schema))


def serialize(serializer, rows: list, topic: str = "t") -> list[bytes]:
    ctx = SerializationContext(topic, MessageField.VALUE)
    return [serializer(r, ctx) for r in rows]


def click_message(with_b: bool = True, extra: bool = False):
    """The Click message as a class built from a descriptor (as protoc's output would give), without protoc."""
    fd = descriptor_pb2.FileDescriptorProto(name=f"click{int(with_b)}{int(extra)}.proto", package="st", syntax="proto3")
    msg = fd.message_type.add(name="Click")
    F = descriptor_pb2.FieldDescriptorProto
    fields = [("a", F.TYPE_DOUBLE, False), ("b", F.TYPE_DOUBLE, True), ("user", F.TYPE_STRING, True), ("item", F.TYPE_INT64, False)]
    fields += [("flag", F.TYPE_BOOL, False), ("y", F.TYPE_STRING, False)] + ([("country", F.TYPE_STRING, True)] if extra else [])
    for number, (name, kind, optional) in enumerate(fields, 1):
        if name == "b" and not with_b:
            continue
        f = msg.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL)
        if optional:  # proto3 `optional`: presence, through a synthetic oneof
            f.proto3_optional = True
            f.oneof_index = len(msg.oneof_decl)
            msg.oneof_decl.add(name=f"_{name}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("st.Click")), fd


def messages(cls, rows: list[dict]) -> list:
    return [cls(**{k: v for k, v in r.items() if v is not None and k in cls.DESCRIPTOR.fields_by_name}) for r in rows]


def protobuf_serializer(url: str, cls) -> ProtobufSerializer:
    return ProtobufSerializer(cls, SchemaRegistryClient({"url": url}), {"use.deprecated.format": False})
