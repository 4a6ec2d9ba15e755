"""What ``streamtrain produce`` will do: the daemon config's Kafka and data sections with the flags applied.

Checked the way the daemon checks its config (the record layout is a
:class:`streams.config.DataConfig`), against the first input's columns, before
anything is sent; every problem is reported at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from streamtrain.config.secrets import resolve_secrets
from streamtrain.streams.config import DataConfig, DeadLetterConfig, KafkaConfig, parse
from streamtrain.streams.deadletter import producer_settings
from streamtrain.streams.errors import ConfigError
from streamtrain.streams.loader import Columns, Source, open_source

__all__ = ["Plan", "make_plan"]


@dataclass
class Plan:
    """What to produce where: resolved from the config and the flags."""

    topic: str
    kafka: KafkaConfig
    data: DataConfig
    columns: Columns
    settings: dict[str, Any]
    sources: list[Source]  # every input, opened and checked; the first one's columns decided the layout
    rows_per_message: int = 1000
    write: Any = None  # avro/protobuf: row dicts -> record values (tools/produce_schema.py)


def make_plan(args: argparse.Namespace) -> Plan:
    """The config's kafka/data sections with the flags applied, checked like the daemon checks them."""
    from streamtrain.config.args import load_or_explain

    if args.config:
        cfg = load_or_explain(args.config, args.overrides)
        if cfg is None:
            raise ConfigError([f"{args.config}: invalid (see above)"])
        kafka, data, dl = cfg.kafka, cfg.data, cfg.dead_letter
        if data.labels.enabled:  # the two topics of a join: feature records, or with --labels the label records
            kafka, data, key = _join_side(kafka, data, getattr(args, "labels", False))
            args.key = args.key or key
    else:
        if getattr(args, "labels", False):
            raise ConfigError(["--labels needs --config with data.labels.topic (the label topic, key and field)"])
        if args.overrides:
            raise ConfigError(["--set needs --config (flags set everything else)"])
        kafka, data, dl = KafkaConfig(), DataConfig(), DeadLetterConfig()
    if args.bootstrap_servers:
        kafka = dataclasses.replace(kafka, bootstrap_servers=args.bootstrap_servers)
    topic = args.topic or (kafka.topics[0] if len(kafka.topics) == 1 else "")
    if not topic:
        raise ConfigError([f"--topic: which topic? the config reads {len(kafka.topics)} ({', '.join(kafka.topics)}); name one"])

    flags = {
        "format": args.format,
        "features": _names(args.features),
        "feature_field": args.feature_field,
        "label": args.label,
        "num_features": args.num_features,
    }
    raw = dataclasses.asdict(data)
    if args.features is not None and args.feature_field is None:
        raw["feature_field"] = None  # the flag's layout replaces the config's
    if args.feature_field is not None and args.features is None:
        raw["features"] = []
    raw.update({k: v for k, v in flags.items() if v is not None})
    if args.delimiter is not None:
        raw["csv"] = {**raw["csv"], "delimiter": args.delimiter}
    if getattr(args, "schema_registry", None):
        raw["schema_registry"] = {**raw["schema_registry"], "url": args.schema_registry}
    writer_schema = getattr(args, "schema", None) or raw.get("schema", "")
    if raw["schema_registry"]["url"]:
        raw["schema"] = ""  # framed: the registry has the schema, the daemon asks it by id
    elif writer_schema:
        raw["schema"] = writer_schema
    if getattr(args, "schema_message", None):
        raw["schema_message"] = args.schema_message

    first = open_source(args.sources[0], args.input_format)
    input_features = _names(args.input_features)
    label_col = args.input_label or raw["label"]
    cats = tuple(raw.get("categorical") or ())
    # records as the daemon reads them: null numbers go on when it imputes them, class names as text
    kept = dict(
        categorical=cats,
        nulls=raw.get("missing", "impute") == "impute" and raw["format"] != "raw",
        label_names=bool(cfg_classes(args)),
    )
    if input_features:
        cols = Columns(input_features, None, label_col, 0, args.key, **kept)
    elif raw["feature_field"] and not raw["features"]:
        cols = Columns((), raw["feature_field"], label_col, raw["num_features"], args.key, **kept)
    else:
        cols = Columns(tuple(raw["features"]), None, label_col, 0, args.key, **kept)
    cols = first.resolve(cols)
    width = len(cols.features) or cols.width or (first.vector_width(cols.feature_field) if cols.feature_field else 0)
    if raw["format"] not in ("raw",) and not raw["features"] and not raw["feature_field"]:
        raw["features"] = list(cols.features)  # records named like the input columns
    if raw["format"] == "raw" or raw["feature_field"]:
        raw["num_features"] = raw["num_features"] or width
    if cols.feature_field:
        cols = dataclasses.replace(cols, width=raw["num_features"] or width)

    problems: list[str] = []
    try:
        data = parse(DataConfig, raw, "data")
    except ConfigError as exc:
        problems += exc.problems
    else:
        if width and width != data.width:
            given = ", ".join(cols.features) or cols.feature_field
            problems.append(f"data: the records hold {data.width} features, the input gives {width} ({given})")
    if args.key and raw["format"] == "arrow":
        problems.append("--key: arrow records hold many rows each; a key per row is only for json, csv and raw")
    for name in ("rows_per_message", "rate", "limit", "timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            problems.append(f"--{name.replace('_', '-')}: must be > 0, got {value}")
    extra, bad = _settings(args.settings)
    problems += bad
    write = None
    if not problems and data.format in ("avro", "protobuf"):
        from streamtrain.tools.produce_schema import writer

        try:
            write = writer(data.format, data, writer_schema, data.schema_message, topic)
        except ConfigError as exc:
            problems += exc.problems
        except Exception as exc:  # the schema file: unreadable, not JSON, not an Avro schema, not a descriptor set
            problems.append(f"--schema: cannot use {writer_schema!r}: {type(exc).__name__}: {exc}")
    if problems:
        raise ConfigError(problems)

    settings = producer_settings(kafka, dl)  # kafka.settings without the consumer-only keys
    settings.update(
        {
            "bootstrap.servers": kafka.bootstrap_servers,  # not a separate dead-letter cluster
            "client.id": "streamtrain-produce",
            "linger.ms": 20,
            "enable.idempotence": True,  # retries neither duplicate nor reorder records
            "message.timeout.ms": int(args.timeout * 1000),
            **extra,
        }
    )
    sources = [first]
    for uri in args.sources[1:]:
        sources.append(open_source(uri, args.input_format))
        sources[-1].resolve(cols)  # the same columns, or an InputError naming the input
    return Plan(topic, kafka, data, cols, settings, sources, args.rows_per_message, write)


def _join_side(kafka: KafkaConfig, data: DataConfig, labels: bool) -> tuple[KafkaConfig, DataConfig, str]:
    """What ``produce`` writes for a join: feature records (the key, no label) or label records (the key and the label).

    Both keyed by the join key, so Kafka's partitioner puts a record and its label in the same partition number.
    """
    lt = data.labels
    off = dataclasses.replace(lt, topic="")
    if labels:
        side = dataclasses.replace(data, features=(), feature_field=None, categorical=(lt.key_field,), label=lt.label_field, labels=off)
        return dataclasses.replace(kafka, topics=(lt.topic,)), side, lt.key_field
    side = dataclasses.replace(data, categorical=(*data.categorical, lt.key_field), label="", labels=off)
    return kafka, side, lt.key_field


def cfg_classes(args: argparse.Namespace) -> tuple[str, ...]:
    """The daemon's trainer.classes (labels are class names), if --config gives them."""
    if not args.config:
        return ()
    from streamtrain.config.args import load_or_explain

    cfg = load_or_explain(args.config, args.overrides)
    return tuple(cfg.trainer.classes) if cfg is not None else ()


def _names(text: str | None) -> tuple[str, ...] | None:
    """``a, b`` -> ("a", "b"); None when the flag was not given."""
    return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def _settings(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``-X key=value`` pairs; values may be ``${env:NAME}`` / ``${file:/path}`` references."""
    out, problems = {}, []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            problems.append(f"-X {item}: must be key=value, e.g. -X compression.type=lz4")
            continue
        out[key.strip()] = value
    resolved, bad = resolve_secrets(out)
    return resolved, problems + [f"-X {p}" for p in bad]
