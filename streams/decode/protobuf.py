"""Protobuf: one message per record, Confluent-framed (a schema registry) or unframed (``data.schema``).

With a registry, the writer's schema of each id is asked for as a serialized
FileDescriptorProto (``?format=serialized``, which Confluent-compatible registries answer),
built into a descriptor pool of its own, and the record's message indexes (after the
schema id: a zigzag varint count, then the indexes; a lone 0 means the first message)
pick its message type.  Unframed records are all one message of a FileDescriptorSet
(``data.schema``, from ``protoc --include_imports --descriptor_set_out``;
``data.schema_message``).  The fields the config asks for are read off the message into a
dict and typed by the JSON rules: a field the writer's message lacks, or an unset field
with presence (``optional``, a message), is missing; a proto3 scalar without presence
reads as its value (0 when unset, as protobuf defines); an enum reads as its number.
Imports of the well-known types resolve; imports of other registered schemas do not (yet).
"""

from __future__ import annotations

import base64
from functools import partial
from typing import Any

from streamtrain.streams.decode.common import Decoded
from streamtrain.streams.decode.json import JsonDecoder
from streamtrain.streams.decode.registry import HEADER, SchemaLookup, decode_batch, need, schema_id
from streamtrain.streams.errors import DecodeError


class ProtobufDecoder:
    """Protobuf messages read with their writer's descriptor, then typed as JSON records are."""

    def __init__(self, rows: JsonDecoder, max_bytes: int, registry: Any = None, schema: str = "", message: str = "") -> None:
        self._pb = need("protobuf", "google.protobuf.descriptor_pb2", "google.protobuf.descriptor_pool", "google.protobuf.message_factory")
        self.rows = rows
        self.width = rows.width
        self.max_bytes = max_bytes
        wanted = [rows.feature_field] if rows.feature_field else list(rows.features)
        self._wanted = tuple(dict.fromkeys([*wanted, *rows.spec.categorical, *([rows.label] if rows.label else [])]))
        self._lookup = SchemaLookup(registry, self._parse, "protobuf", fmt="serialized") if registry is not None and registry.url else None
        self._types: dict[tuple[int, tuple[int, ...]], tuple[Any, list]] = {}  # (schema id, indexes) -> reader
        self._local = self._from_set(schema, message) if schema else None

    def decode(self, values: list[bytes | None]) -> Decoded:
        return decode_batch(values, self.max_bytes, self.rows, self._lookup, self._framed, partial(self._read, self._local, start=0))

    # ------------------------------------------------------------------ schemas

    def _parse(self, schema: Any) -> tuple[Any, Any]:
        """A registry schema as (its FileDescriptorProto, a pool holding it)."""
        descriptor_pb2, descriptor_pool, _ = self._pb
        if schema.schema_type != "PROTOBUF":
            raise ValueError(f"is a {schema.schema_type or 'AVRO'} schema, not Protobuf")
        try:
            fd = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(schema.schema_str, validate=True))
        except Exception:  # a registry that ignored ?format=serialized and sent .proto text, which this does not parse
            raise ValueError("the registry sent .proto text, not a serialized FileDescriptorProto (?format=serialized)") from None
        pool = descriptor_pool.DescriptorPool()
        self._add_imports(pool, fd, set())
        pool.Add(fd)
        return fd, pool

    def _add_imports(self, pool: Any, fd: Any, added: set[str]) -> None:
        descriptor_pb2, descriptor_pool, _ = self._pb
        for dep in fd.dependency:
            if dep in added:
                continue
            try:
                known = descriptor_pool.Default().FindFileByName(dep)
            except KeyError:
                raise ValueError(f"imports {dep!r}: schema references are not resolved yet (only the well-known types)") from None
            proto = descriptor_pb2.FileDescriptorProto.FromString(known.serialized_pb)
            self._add_imports(pool, proto, added)
            pool.Add(proto)
            added.add(dep)

    def _from_set(self, path: str, message: str) -> tuple[Any, list]:
        descriptor_pb2, descriptor_pool, _ = self._pb
        with open(path, "rb") as f:
            files = descriptor_pb2.FileDescriptorSet.FromString(f.read()).file
        pool = descriptor_pool.DescriptorPool()
        for fd in files:  # --include_imports lists each file after its imports
            pool.Add(fd)
        if not message:
            last = files[-1]
            message = f"{last.package}.{last.message_type[0].name}" if last.package else last.message_type[0].name
        return self._reader(pool.FindMessageTypeByName(message))

    def _reader(self, desc: Any) -> tuple[Any, list]:
        """The message class and, per wanted field, how to read it: (name, field or None if the writer lacks it)."""
        fields = desc.fields_by_name
        return self._pb[2].GetMessageClass(desc), [(name, fields.get(name)) for name in self._wanted]

    def _type(self, sid: int, schema: tuple[Any, Any], indexes: tuple[int, ...]) -> tuple[Any, list]:
        key = (sid, indexes)
        reader = self._types.get(key)
        if reader is None:
            fd, pool = schema
            names, level = [], fd.message_type
            for i in indexes:
                if not 0 <= i < len(level):
                    raise DecodeError("undecodable", f"message index {list(indexes)} names no message of schema id {sid}")
                names.append(level[i].name)
                level = level[i].nested_type
            full = ".".join([fd.package, *names] if fd.package else names)
            reader = self._types[key] = self._reader(pool.FindMessageTypeByName(full))
        return reader

    # ------------------------------------------------------------------ records

    def _framed(self, schemas: dict[int, Any], value: bytes) -> dict:
        sid = schema_id(value)
        writer = schemas[sid]
        if isinstance(writer, str):
            raise DecodeError("unknown_schema", writer)
        indexes, start = message_indexes(value, HEADER)
        return self._read(self._type(sid, writer, indexes), value, start)

    def _read(self, reader: tuple[Any, list], value: bytes, start: int) -> dict:
        cls, fields = reader
        msg = cls()
        try:
            msg.ParseFromString(value[start:] if start else value)
        except Exception as exc:  # cut short, a bad wire type: the record's own fault
            raise DecodeError("undecodable", f"not a valid {cls.DESCRIPTOR.full_name} message: {exc}"[:300]) from None
        record = {}
        for name, field in fields:
            if field is None or (field.has_presence and not msg.HasField(name)):
                continue  # missing: the writer has no such field, or left it unset
            v = getattr(msg, name)
            record[name] = list(v) if field.is_repeated else v
        return record


def message_indexes(value: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    """Confluent's message indexes at ``pos``: (the indexes, where the message starts); a count of 0 is [0]."""
    count, pos = _varint(value, pos)
    count = (count >> 1) ^ -(count & 1)  # zigzag
    if count == 0:
        return (0,), pos
    if not 0 < count <= 100:
        raise DecodeError("undecodable", f"bad Confluent message-index count {count}")
    out = []
    for _ in range(count):
        i, pos = _varint(value, pos)
        out.append((i >> 1) ^ -(i & 1))
    return tuple(out), pos


def _varint(value: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(value) or shift > 63:
            raise DecodeError("undecodable", "Confluent message indexes cut short")
        b = value[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
