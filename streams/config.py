"""Typed settings of the data path: Kafka, decoding, the ring, the dead-letter topic.

Frozen dataclasses, each field declared with its default and a one-line doc (the doc
feeds the configuration reference).  :func:`parse` builds any of them from plain
YAML-shaped data and gathers *every* problem with its key path
(``kafka.topics: must be a non-empty list``); unknown keys are errors with a
suggestion.  The daemon composes these sections into its own config; a user of
:class:`streams.dataset.KafkaIterableDataset` can build them directly.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from streamtrain.streams.errors import ConfigError

__all__ = [
    "ConfigError",
    "CsvConfig",
    "DataConfig",
    "DeadLetterConfig",
    "FrozenDict",
    "KafkaConfig",
    "LabelsConfig",
    "RingConfig",
    "SchemaRegistryConfig",
    "non_negative",
    "opt",
    "parse",
    "positive",
    "section",
]


class FrozenDict(dict):
    """A mapping in a frozen config section: it reads, compares, prints and pickles as a dict, and refuses changes."""

    def _refuse(self, *_args: Any, **_kwargs: Any) -> None:
        raise TypeError("a config section is frozen: make a changed copy with dict(...) instead")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return (FrozenDict, (dict(self),))


def opt(default: Any, doc: str) -> Any:
    """A config field with its default and the line that documents it."""
    if isinstance(default, dict):
        return field(default_factory=lambda: FrozenDict(default), metadata={"doc": doc})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def section(cls: type, doc: str) -> Any:
    """A nested config section."""
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = opt("127.0.0.1:9092", "Kafka bootstrap servers, host:port[,host:port].")
    topics: tuple[str, ...] = opt((), "Topics to train from; every partition of each is read.")
    group_id: str = opt("streamtrain", "Consumer group that mirrors the trained offsets (lag monitoring).")
    auto_offset_reset: str = opt("earliest", "Where to start with no snapshot and no committed offset: earliest|latest.")
    on_out_of_range: str = opt(
        "earliest",
        "When a partition's position is outside its offsets (records deleted by retention before they were trained, a topic "
        "deleted and recreated): earliest | latest (read on from there; logged as an error, skipped records counted) | stop (exit 1).",
    )
    consume_batch: int = opt(2000, "Most messages taken per consume() call; larger batches hold the GIL longer (docs/BENCHMARKS.md).")
    consume_timeout_ms: int = opt(20, "Longest a consume() call waits; keep it short so slow streams flow.")
    metadata_refresh_s: float = opt(10.0, "How often to look for new partitions and check the broker is reachable.")
    queued_max_kbytes: int = opt(
        16384, "Bound of librdkafka's local prefetch queue and of one fetch response (KiB); with the ring it bounds memory."
    )
    settings: dict[str, Any] = opt(
        {},
        "Any other librdkafka option, passed through (security.protocol, sasl.*, ssl.*, ...); it overrides the daemon's own "
        "librdkafka defaults (fetch.wait.max.ms 200, fetch.queue.backoff.ms 10: see docs/BENCHMARKS.md, Freshness).",
    )

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.bootstrap_servers.strip():
            problems.append(("bootstrap_servers", "must be host:port, got an empty string"))
        if not self.topics:
            problems.append(("topics", "must be a non-empty list of topic names, e.g. [events]"))
        for i, t in enumerate(self.topics):
            if not t or any(c.isspace() for c in t):
                problems.append((f"topics[{i}]", f"must be a topic name without spaces, got {t!r}"))
        if not self.group_id:
            problems.append(("group_id", "must be a non-empty string"))
        if self.auto_offset_reset not in ("earliest", "latest"):
            problems.append(("auto_offset_reset", f"must be earliest or latest, got {self.auto_offset_reset!r}"))
        if self.on_out_of_range not in ("earliest", "latest", "stop"):
            problems.append(("on_out_of_range", f"must be earliest, latest or stop, got {self.on_out_of_range!r}"))
        problems += positive(self, "consume_batch", "consume_timeout_ms", "metadata_refresh_s", "queued_max_kbytes")
        for key in self.settings:
            if key in _TYPED_KAFKA_KEYS:
                problems.append((f"settings.{key}", f"is set by the daemon; use kafka.{_TYPED_KAFKA_KEYS[key]} instead"))
            elif key in _DAEMON_OWNED_KEYS:
                problems.append((f"settings.{key}", f"is managed by the daemon and cannot be overridden ({_DAEMON_OWNED_KEYS[key]})"))
        return problems


_TYPED_KAFKA_KEYS = {
    "bootstrap.servers": "bootstrap_servers",
    "group.id": "group_id",
    "auto.offset.reset": "auto_offset_reset",
    "queued.max.messages.kbytes": "queued_max_kbytes",
}
_DAEMON_OWNED_KEYS = {
    "enable.auto.commit": "offsets are committed only after a snapshot is durable",
    "enable.auto.offset.store": "offsets are committed only after a snapshot is durable",
    "group.protocol": "the daemon assigns partitions itself",
}


@dataclass(frozen=True)
class DeadLetterConfig:
    topic: str = opt("streamtrain.dead-letter", "Topic that receives every rejected record with headers naming why.")
    on_failure: str = opt("block", "When the dead-letter topic cannot be written: block (retry until it can) or stop (exit with an error).")
    timeout_s: float = opt(30.0, "How long one delivery attempt may take; with on_failure=stop, how long before giving up.")
    bootstrap_servers: str | None = opt(None, "Kafka cluster of the dead-letter topic, host:port[,...]; default: kafka.bootstrap_servers.")
    max_value_bytes: int = opt(
        524288,
        "A rejected record's value longer than this goes to the dead-letter topic cut to this length, with headers giving "
        "its size and sha256 (under the usual 1 MB limit of a Kafka message, headers and key included).",
    )

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.bootstrap_servers is not None and not self.bootstrap_servers.strip():
            problems.append(("bootstrap_servers", "must be host:port, or left out to use kafka.bootstrap_servers"))
        if not self.topic or any(c.isspace() for c in self.topic):
            problems.append(("topic", f"must be a topic name without spaces, got {self.topic!r}"))
        if self.on_failure not in ("block", "stop"):
            problems.append(("on_failure", f"must be block or stop, got {self.on_failure!r}"))
        return problems + positive(self, "timeout_s", "max_value_bytes")


@dataclass(frozen=True)
class CsvConfig:
    columns: tuple[str, ...] = opt((), "Column names of a CSV line, in order; default: data.features then data.label.")
    delimiter: str = opt(",", "Field delimiter, one character.")

    def _validate(self) -> list[tuple[str, str]]:
        if len(self.delimiter) != 1:
            return [("delimiter", f"must be one character, got {self.delimiter!r}")]
        return []


@dataclass(frozen=True)
class LabelsConfig:
    """Labels that come later, on a topic of their own, joined to the feature records by a key (``streams/join/``)."""

    topic: str = opt("", "Topic of the label records; empty: every record carries its own label (data.label).")
    key_field: str = opt("request_id", "Field in both a feature record and a label record that pairs them (a string or an integer).")
    label_field: str = opt("label", "The label's field in a label record (a number, true/false, or a class name of trainer.classes).")
    window_seconds: float = opt(1800.0, "How long a feature record waits for its label (and a label for its features).")
    on_expiry: str = opt(
        "negative",
        "A feature record whose label did not come within the window: negative (trained with label 0 / false: implicit "
        "feedback) | default (trained with labels.default) | drop (not trained; its offset is done).",
    )
    default: float = opt(0.0, "The label of an expired feature record with on_expiry: default.")
    time: str = opt(
        "event",
        "The clock of the window: event (record timestamps; the window closes when both topics' partitions have read past "
        "it, or have nothing left to read) | ingest (when the daemon read the record).",
    )
    max_pending: int = opt(1000000, "Feature records (and, apart, label records) that may wait at once per ingest process.")
    at_max_pending: str = opt(
        "expire",
        "When max_pending feature records wait: expire (the oldest leave early, as on_expiry) | pause (stop fetching the "
        "feature topic until some leave; the label topic is read on, so the join cannot deadlock).",
    )
    guard: bool = opt(
        True, "Stop training on expiries while the join looks broken (guard_min_expired expiries in a window, too few joins)."
    )
    min_join_rate: float = opt(
        0.0, "The guard trips when joined / (joined + expired) over the last window is at or below this (0: not one joined)."
    )
    guard_seconds: float = opt(60.0, "The guard's window: joins and expiries over the last this many seconds (wall time).")
    guard_min_expired: int = opt(200, "Expiries in the last window before the guard may trip (make it several times 1 / your label rate).")

    @property
    def enabled(self) -> bool:
        return bool(self.topic)

    def _validate(self) -> list[tuple[str, str]]:
        problems = positive(self, "window_seconds", "max_pending", "guard_min_expired", "guard_seconds")
        if self.topic and any(c.isspace() for c in self.topic):
            problems.append(("topic", f"must be a topic name without spaces, got {self.topic!r}"))
        if self.topic and not self.key_field:
            problems.append(("key_field", "must name the field that pairs a label record with its feature record"))
        if self.topic and (not self.label_field or self.label_field == self.key_field):
            problems.append(("label_field", "must name the label field of a label record (not the key)"))
        if self.on_expiry not in ("negative", "default", "drop"):
            problems.append(("on_expiry", f"must be negative, default or drop, got {self.on_expiry!r}"))
        if self.time not in ("event", "ingest"):
            problems.append(("time", f"must be event or ingest, got {self.time!r}"))
        if self.at_max_pending not in ("expire", "pause"):
            problems.append(("at_max_pending", f"must be expire or pause, got {self.at_max_pending!r}"))
        if not 0.0 <= self.min_join_rate < 1.0:
            problems.append(("min_join_rate", f"must be in [0, 1), got {self.min_join_rate}"))
        return problems


@dataclass(frozen=True)
class SchemaRegistryConfig:
    """A Confluent-compatible schema registry: the writer's schema of each Avro / Protobuf record, by its id."""

    url: str = opt("", "Registry URL, e.g. https://registry:8081; empty: records are unframed, read with data.schema.")
    basic_auth_user: str = opt("", "HTTP basic auth user (with basic_auth_password); empty: no auth.")
    basic_auth_password: str = opt("", "HTTP basic auth password: give it as ${env:NAME} or ${file:/path}, like sasl.password.")
    ssl_ca_location: str = opt("", "CA bundle (PEM) that signs the registry's certificate; empty: the system's.")
    ssl_certificate_location: str = opt("", "Client certificate (PEM) for mutual TLS, with ssl_key_location.")
    ssl_key_location: str = opt("", "Client private key (PEM) for mutual TLS.")
    timeout_s: float = opt(5.0, "Longest one registry request may take (a lookup happens once per schema id, not per record).")
    retry_after_s: float = opt(
        30.0, "A schema id whose lookup failed (unknown id, registry down) rejects its records (unknown_schema) until then."
    )

    def _validate(self) -> list[tuple[str, str]]:
        problems = positive(self, "timeout_s", "retry_after_s")
        if self.url and not self.url.startswith(("http://", "https://")):
            problems.append(("url", f"must start with http:// or https://, got {self.url!r}"))
        if bool(self.basic_auth_user) != bool(self.basic_auth_password):
            problems.append(("basic_auth_password", "basic_auth_user and basic_auth_password go together"))
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            problems.append(("ssl_key_location", "ssl_certificate_location and ssl_key_location go together"))
        return problems


@dataclass(frozen=True)
class DataConfig:
    format: str = opt(
        "json",
        "Record format: json | csv | arrow (IPC stream, many rows per message) | raw (little-endian float32, label last) | "
        "avro | protobuf (Confluent-framed with data.schema_registry, or unframed with data.schema; docs/FORMATS.md).",
    )
    features: tuple[str, ...] = opt((), "Numeric feature field names (every format but raw); true/false read as 1/0.")
    categorical: tuple[str, ...] = opt(
        (),
        "Categorical fields (every format but raw): strings, integers (an id is a category, not a magnitude) or booleans; each "
        "value becomes a row of one hashed table the fields share (docs/LEARNING.md, Categorical features).",
    )
    hash_buckets: int = opt(1048576, "Rows of the table the categorical fields share (each field's name salts the hash): 2^20.")
    max_category_bytes: int = opt(256, "A categorical value longer than this (UTF-8 bytes) is rejected (wrong_shape), never cut.")
    missing: str = opt(
        "impute",
        "A missing number (null, an absent key, an empty CSV cell, an Arrow null): impute (its running mean, with a 0/1 "
        "'was missing' input beside it; counted per feature) | reject (dead-letter the record). A missing category is a value of its own.",
    )
    feature_field: str | None = opt(None, "json/arrow: one field holding the whole feature vector, instead of data.features.")
    label: str = opt("y", "Label field name (every format but raw).")
    num_features: int = opt(0, "Features per sample; required for raw (and with feature_field), else the length of data.features.")
    max_record_bytes: int = opt(1048576, "Records larger than this are rejected as oversized.")
    on_decoder_crash: str = opt(
        "dead_letter",
        "A record that crashes the decoder (an exception no decoder expected, or the ingest process dying on it: a bug): "
        "dead_letter (reason decoder_crash, logged as an error; training goes on) | stop (exit 1 naming the record).",
    )
    schema: str = opt(
        "",
        "avro | protobuf without a registry: the schema of every record, unframed: an Avro schema (.avsc) or a protobuf "
        "FileDescriptorSet (protoc --include_imports --descriptor_set_out=FILE).",
    )
    schema_message: str = opt("", "protobuf with data.schema: the message's full name (package.Message); empty: the file's first message.")
    schema_registry: SchemaRegistryConfig = section(SchemaRegistryConfig, "avro and protobuf: the Confluent-compatible schema registry.")
    csv: CsvConfig = section(CsvConfig, "CSV specifics.")
    labels: LabelsConfig = section(LabelsConfig, "Labels on a topic of their own, joined to the feature records by a key.")

    @property
    def width(self) -> int:
        """Numbers per sample (the categorical fields travel apart, as table rows)."""
        return self.num_features or len(self.features)

    @property
    def indicators(self) -> bool:
        """Missing numbers are imputed, with a "was missing" input each: named numeric features of any format but raw."""
        return self.missing == "impute" and bool(self.features) and self.format in _NAMED

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        formats = ("json", "csv", "arrow", "raw", "avro", "protobuf")
        if self.format not in formats:
            problems.append(("format", f"must be one of {', '.join(formats)}, got {self.format!r}"))
        named = self.format in _NAMED
        if named and not self.features and not self.feature_field and not self.categorical:
            problems.append(("features", f"must list the feature fields for format {self.format}, e.g. [f0, f1]"))
        if self.categorical and self.format == "raw":
            problems.append(("categorical", "raw records carry float32 numbers only; use json, csv or arrow for categorical fields"))
        if len(set(self.categorical)) != len(self.categorical):
            problems.append(("categorical", "must not name a field twice"))
        both = sorted(set(self.categorical) & set(self.features))
        if both:
            problems.append(("categorical", f"a field is numeric (data.features) or categorical, not both: {both}"))
        if self.label in self.categorical:
            problems.append(("label", f"must not also be a categorical feature, got {self.label!r}"))
        if self.missing not in ("impute", "reject"):
            problems.append(("missing", f"must be impute or reject, got {self.missing!r}"))
        problems += positive(self, "hash_buckets", "max_category_bytes")
        if self.features and self.feature_field:
            problems.append(("feature_field", "set either data.features or data.feature_field, not both"))
        if self.feature_field and self.format == "csv":
            problems.append(("feature_field", "is not available for csv; list the columns in data.features"))
        if (self.format == "raw" or self.feature_field) and self.num_features <= 0:
            problems.append(("num_features", f"must be > 0 for this format (the length of a feature vector), got {self.num_features}"))
        if self.features and self.num_features and self.num_features != len(self.features):
            problems.append(("num_features", f"must equal the length of data.features ({len(self.features)}), got {self.num_features}"))
        if len(set(self.features)) != len(self.features):
            problems.append(("features", "must not name a field twice"))
        if self.label in self.features:
            problems.append(("label", f"must not also be a feature, got {self.label!r}"))
        if self.format == "csv" and self.csv.columns:
            missing = [c for c in (*self.features, *self.categorical, self.label) if c not in self.csv.columns]
            if missing:
                problems.append(("csv.columns", f"must contain every feature and the label; missing {missing}"))
        if self.on_decoder_crash not in ("dead_letter", "stop"):
            problems.append(("on_decoder_crash", f"must be dead_letter or stop, got {self.on_decoder_crash!r}"))
        problems += self._schema_problems()
        if self.labels.enabled:
            if self.format != "json":
                problems.append(("labels.topic", f"joins JSON records (one key per record); data.format is {self.format}"))
            if self.labels.key_field in (*self.features, *self.categorical):
                key = self.labels.key_field
                problems.append(("labels.key_field", f"pairs the records and is not a feature: remove {key!r} from the features"))
            if self.feature_field and self.labels.key_field == self.feature_field:
                problems.append(("labels.key_field", "must not be data.feature_field"))
        return problems + positive(self, "max_record_bytes")

    def _schema_problems(self) -> list[tuple[str, str]]:
        registry = bool(self.schema_registry.url)
        if self.format not in ("avro", "protobuf"):
            if self.schema or registry:
                key = "schema" if self.schema else "schema_registry.url"
                return [(key, f"is for data.format avro or protobuf; data.format is {self.format}")]
            return []
        if registry == bool(self.schema):
            need = "data.schema_registry.url (Confluent-framed) or data.schema (unframed), one of them"
            return [("schema", f"{self.format} records need a schema: {need}")]
        if not self.schema:
            return [("schema_message", "is for data.schema; with a registry each record names its message")] if self.schema_message else []
        if self.schema_message and self.format == "avro":
            return [("schema_message", "is for protobuf; an Avro schema names its own record")]
        if self.format == "protobuf" and self.schema.endswith(".proto"):
            compile_it = f"protoc --include_imports --descriptor_set_out={self.schema[:-6]}.desc {self.schema}"
            return [("schema", f"must be a FileDescriptorSet, not .proto text: compile it with {compile_it} (or grpc_tools.protoc)")]
        if not os.path.isfile(self.schema):
            return [("schema", f"no such file {self.schema!r}")]
        return []


# The formats whose records name their fields (data.features, data.categorical, data.label).
_NAMED = ("json", "csv", "arrow", "avro", "protobuf")


@dataclass(frozen=True)
class RingConfig:
    batch_size: int = opt(256, "Samples per training batch (1 works).")
    slots: int = opt(
        32,
        "Preallocated batch slots in the prefetch ring; bounds memory (32 x 256 x 17 floats = 0.5 MiB). "
        "The process mode hands trained slots back a quarter of the ring at a time.",
    )
    max_batch_wait_ms: int = opt(50, "A batch closes at batch_size samples or after this long, whichever is first.")
    ingest: str = opt(
        "process",
        "Where consume + decode run: process (their own process, sharing no GIL with the trainer: 1.3-1.7x a "
        "small model's throughput on CPU, docs/BENCHMARKS.md) or thread (one process, e.g. a notebook).",
    )
    ingest_workers: int = opt(
        0,
        "Ingest processes, each reading its own share of the partitions into its own part of the ring (process "
        "mode). 0: from the cores the trainer leaves over (1 on 2-4 cores, 3 on 8, 7 on 16).",
    )
    pause_after_ms: int = opt(
        1000,
        "Pause fetching once the ring has stayed full this long (a slow or stalled trainer); "
        "pausing drops librdkafka's prefetched records, so brief full spells only wait.",
    )

    def _validate(self) -> list[tuple[str, str]]:
        problems = positive(self, "batch_size", "max_batch_wait_ms", "pause_after_ms")
        if self.ingest not in ("process", "thread"):
            problems.append(("ingest", f"must be process or thread, got {self.ingest!r}"))
        if self.ingest_workers < 0:
            problems.append(("ingest_workers", f"must be >= 0 (0: from the cores), got {self.ingest_workers}"))
        elif self.ingest_workers > 1 and self.ingest == "thread":
            problems.append(("ingest_workers", "more than one needs ring.ingest: process"))
        if self.slots < 2:
            problems.append(("slots", f"must be >= 2 (one filling while one trains), got {self.slots}"))
        return problems


def positive(obj: Any, *names: str) -> list[tuple[str, str]]:
    return [(n, f"must be > 0, got {getattr(obj, n)}") for n in names if not getattr(obj, n) > 0]


def non_negative(obj: Any, *names: str) -> list[tuple[str, str]]:
    return [(n, f"must be >= 0, got {getattr(obj, n)}") for n in names if not getattr(obj, n) >= 0]


# --------------------------------------------------------------------------- loading

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Turn a YAML value into ``tp``, recording a problem (and returning None) if it can't."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = next(a for a in args if a is not type(None))
        return _convert(value, inner, path, problems)
    if tp is Any:
        return value
    if origin is dict:
        if value is None:
            return FrozenDict()
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            problems.append(f"{path}: must be a mapping of names to values, got {value!r}")
            return None
        return FrozenDict(value)
    if origin is tuple:
        if value is None:
            return ()
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            problems.append(f"{path}: must be a list, got {value!r}")
            return None
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                problems.append(f"{path}: must be a list of {len(args)} items, got {list(value)!r}")
                return None
            item_types = list(args)
        return tuple(_convert(v, t, f"{path}[{i}]", problems) for i, (v, t) in enumerate(zip(value, item_types)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    problems.append(f"{path}: must be {_TYPE_NAMES.get(tp, str(tp))}, got {value!r}")
    return None


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, recording problems with key paths.

    A field that cannot be converted keeps its default so the section's own checks
    still run and every problem is reported at once; checks about that field are
    dropped (it is already reported).
    """
    prefix = f"{path}." if path else ""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path or '(top level)'}: must be a mapping of keys to values, got {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    broken = set()
    for name in fields:
        if name not in raw:
            if dataclasses.is_dataclass(hints[name]):  # an absent section still gets its checks
                kwargs[name] = _build(hints[name], {}, f"{prefix}{name}", problems)
            continue
        before = len(problems)
        value = _convert(raw[name], hints[name], f"{prefix}{name}", problems)
        if len(problems) > before and not dataclasses.is_dataclass(hints[name]):
            broken.add(name)
        else:
            kwargs[name] = value
    obj = cls(**kwargs)
    if hasattr(obj, "_validate"):
        problems.extend(f"{prefix}{k}: {msg}" for k, msg in obj._validate() if k.split(".")[0].split("[")[0] not in broken)
    return obj


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def parse(cls: type, raw: Any, path: str = "") -> Any:
    """Build config dataclass ``cls`` from YAML-shaped data or raise one ConfigError listing every problem."""
    problems: list[str] = []
    obj = _build(cls, raw, path, problems)
    if problems:
        raise ConfigError(problems)
    return obj
