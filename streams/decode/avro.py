"""Avro: one record per message, Confluent-framed (a schema registry) or unframed (``data.schema``).

Each record is read with its writer's schema (the one its id names, or the local file) by
fastavro's ``schemaless_reader`` into a dict, and the dicts become rows by the JSON rules
(:meth:`~streamtrain.streams.decode.json.JsonDecoder.decode_objects`): a field the config
asks for that the writer's schema lacks (a field removed since) is a missing value per
``data.missing``; a field it has that the config does not ask for (one added since) is
ignored.  A record that is not framed, is cut short, has bytes left over or does not parse
fails only itself; a record whose schema id cannot be looked up is rejected as
``unknown_schema``, the lookup made once per id (:mod:`~streamtrain.streams.decode.registry`).
"""

from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path
from typing import Any

from streamtrain.streams.decode.common import Decoded
from streamtrain.streams.decode.json import JsonDecoder
from streamtrain.streams.decode.registry import HEADER, SchemaLookup, decode_batch, need, schema_id
from streamtrain.streams.errors import DecodeError


class AvroDecoder:
    """Avro records read with their writer's schema, then typed as JSON records are."""

    def __init__(self, rows: JsonDecoder, max_bytes: int, registry: Any = None, schema: str = "") -> None:
        (self._fastavro,) = need("avro", "fastavro")
        self.rows = rows
        self.width = rows.width
        self.max_bytes = max_bytes
        self._lookup = SchemaLookup(registry, self._parse, "avro") if registry is not None and registry.url else None
        self._schema = self._fastavro.parse_schema(json.loads(Path(schema).read_text())) if schema else None

    def decode(self, values: list[bytes | None]) -> Decoded:
        return decode_batch(values, self.max_bytes, self.rows, self._lookup, self._framed, partial(self._read, self._schema, start=0))

    def _parse(self, schema: Any) -> Any:
        if schema.schema_type not in (None, "AVRO"):
            raise ValueError(f"is a {schema.schema_type} schema, not Avro")
        if schema.references:
            raise ValueError("references other schemas, which streamtrain does not resolve yet")
        return self._fastavro.parse_schema(json.loads(schema.schema_str))

    def _framed(self, schemas: dict[int, Any], value: bytes) -> dict:
        writer = schemas[schema_id(value)]
        if isinstance(writer, str):
            raise DecodeError("unknown_schema", writer)
        return self._read(writer, value, start=HEADER)

    def _read(self, writer: Any, value: bytes, start: int) -> dict:
        buf = io.BytesIO(value)
        buf.seek(start)
        try:
            record = self._fastavro.schemaless_reader(buf, writer, None)
        except Exception as exc:  # cut short, a bad length or union index, bad UTF-8: the record's own fault
            raise DecodeError("undecodable", f"not a valid Avro record: {type(exc).__name__}: {exc}"[:300]) from None
        if buf.tell() != len(value):
            raise DecodeError("undecodable", f"{len(value) - buf.tell()} bytes left after the Avro record (a different schema?)")
        if not isinstance(record, dict):
            raise DecodeError("wrong_shape", f"expected an Avro record, got {type(record).__name__}")
        return record
