"""Confluent framing and the schema registry: each record's writer schema, looked up once per id.

A Confluent-framed record is a magic byte 0, the writer schema's id (4 bytes, big-endian)
and the payload (for Protobuf, message indexes first).  The decoders group a batch by id
and ask :class:`SchemaLookup` once per id; confluent-kafka's ``SchemaRegistryClient`` does
the HTTP (auth, TLS) and caches what it found.  A lookup that failed (an unknown id, the
registry down) is remembered and tried again only after ``retry_after_s``: its records are
rejected as ``unknown_schema`` meanwhile, and the registry never sees a call per record.

confluent-kafka's schema-registry module needs packages of its own (httpx, attrs,
cachetools, authlib): they come with the ``avro`` / ``protobuf`` extras and are imported
only when a decoder of those formats is made.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Generic, TypeVar

from streamtrain.streams.decode.common import Decoded, _screen, each_record
from streamtrain.streams.errors import ConfigError, DecodeError

T = TypeVar("T")
MAGIC = 0
HEADER = 5  # magic byte + schema id


def need(extra: str, *modules: str) -> list[Any]:
    """Import the modules a format needs, or say which extra brings them."""
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as exc:
        raise ConfigError([f"data.format: {extra} records need the {extra} extra: pip install 'streamtrain[{extra}]' ({exc})"]) from exc


def schema_id(value: bytes) -> int:
    """The writer schema's id of a Confluent-framed record, or a DecodeError (undecodable) for one that is not framed."""
    if len(value) < HEADER or value[0] != MAGIC:
        what = f"{len(value)} bytes" if len(value) < HEADER else f"magic byte {value[0]}"
        raise DecodeError("undecodable", f"not a Confluent-framed record (magic byte 0, 4-byte schema id): {what}")
    return int.from_bytes(value[1:HEADER], "big")


def batch_ids(values: list, indices: Iterable[int]) -> set[int]:
    """The schema ids of a batch's framed records (unframed ones fail later, alone)."""
    return {int.from_bytes(values[i][1:HEADER], "big") for i in indices if len(values[i]) >= HEADER and values[i][0] == MAGIC}


def decode_batch(values: list[bytes | None], max_bytes: int, rows: Any, lookup: Any, framed: Callable, local: Callable) -> Decoded:
    """A batch of Avro or Protobuf records through ``rows`` (a JsonDecoder's dict rules), each record failing only itself.

    With a registry (``lookup``) the batch's schema ids are resolved first, once each, and ``framed(schemas, value)``
    reads a record; without, ``local(value)`` reads an unframed one.
    """
    good, rejects, nbytes = _screen(values, max_bytes)
    one = partial(framed, lookup.resolve(batch_ids(values, good))) if lookup is not None else local
    objects, idx = [], []
    for i, record in each_record(one, values, good, rejects):
        objects.append(record)
        idx.append(i)
    rejects.sort(key=lambda r: r.index)
    return rows.decode_objects(objects, idx, rejects, nbytes)


def registry_conf(cfg: Any) -> dict[str, Any]:
    """confluent-kafka ``SchemaRegistryClient`` settings of a :class:`~streamtrain.streams.config.SchemaRegistryConfig`."""
    conf: dict[str, Any] = {"url": cfg.url, "timeout": cfg.timeout_s, "max.retries": 0}
    if cfg.basic_auth_user:
        conf["basic.auth.user.info"] = f"{cfg.basic_auth_user}:{cfg.basic_auth_password}"
    for key in ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location"):
        if getattr(cfg, key):
            conf[key.replace("_", ".")] = getattr(cfg, key)
    return conf


class SchemaLookup(Generic[T]):
    """Parsed writer schemas by id: one registry call per id, a failed one retried after ``retry_after_s``.

    ``parse`` turns the registry's ``Schema`` into what a decoder reads with (a parsed Avro
    schema, a protobuf descriptor pool); each ingest process has its own, so an id is asked
    for once per process; ``fmt`` is the ``format`` asked of the registry
    (``serialized`` for Protobuf: the FileDescriptorProto, not .proto text).  The client is
    made on the first lookup, not here: no network in ``__init__``.
    """

    def __init__(
        self, cfg: Any, parse: Callable[[Any], T], extra: str, fmt: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cfg = cfg
        self.parse = parse
        self.extra = extra  # the package extra that brings the client (avro | protobuf), named if it is missing
        self.fmt = fmt
        self.clock = clock
        self._found: dict[int, T] = {}
        self._failed: dict[int, tuple[float, str]] = {}  # id -> (when to try again, why it failed)
        self._client: Any = None

    def resolve(self, ids: Iterable[int]) -> dict[int, T | str]:
        """Each id's parsed schema, or the error text of a lookup that failed (now or within the back-off)."""
        out: dict[int, T | str] = {}
        for i in ids:
            if i in self._found:
                out[i] = self._found[i]
                continue
            failed = self._failed.get(i)
            if failed is not None and self.clock() < failed[0]:
                out[i] = failed[1]
                continue
            out[i] = self._lookup(i)
        return out

    def _lookup(self, i: int) -> T | str:
        try:
            schema = self.client().get_schema(i, fmt=self.fmt)
            parsed = self.parse(schema)
        except Exception as exc:  # a 404, the registry unreachable, a schema we cannot read: its records wait for a retry
            why = f"schema id {i}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            self._failed[i] = (self.clock() + self.cfg.retry_after_s, why)
            return why
        self._failed.pop(i, None)
        self._found[i] = parsed
        return parsed

    def client(self) -> Any:
        if self._client is None:
            (sr,) = need(self.extra, "confluent_kafka.schema_registry")
            self._client = sr.SchemaRegistryClient(registry_conf(self.cfg))
        return self._client
