"""Unit tests for streams.config: typed sections, defaults, and every problem reported at once with its key path."""

from __future__ import annotations

import dataclasses

import pytest

from streamtrain.streams.config import ConfigError, CsvConfig, DataConfig, DeadLetterConfig, KafkaConfig, RingConfig, parse
from streamtrain.streams.deadletter import producer_settings
from streamtrain.streams.errors import StreamtrainError
from streamtrain.streams.source import consumer_settings

DATA = {"format": "json", "features": ["a", "b"], "label": "y"}


def problems(cls: type, raw: object, path: str) -> list[str]:
    """The problems parse() reports (fails if it accepts the config)."""
    with pytest.raises(ConfigError) as info:
        parse(cls, raw, path)
    return info.value.problems


def assert_problems(found: list[str], *expected: tuple[str, str]) -> None:
    """Exactly these problems: each ``(key path, part of the message)`` matches one line, in any order."""
    assert len(found) == len(expected), found
    for path, text in expected:
        assert any(p.startswith(f"{path}: ") and text in p for p in found), f"no problem {path}: ...{text}... in {found}"


# ----------------------------------------------------------------------------- defaults


def test_defaults_of_each_section():
    assert parse(KafkaConfig, {"topics": ["events"]}, "kafka") == KafkaConfig(topics=("events",))
    assert parse(DataConfig, DATA, "data") == DataConfig(features=("a", "b"))
    assert parse(RingConfig, None, "ring") == RingConfig()
    assert parse(DeadLetterConfig, {}, "dead_letter") == DeadLetterConfig()
    assert parse(CsvConfig, {}, "data.csv") == CsvConfig()
    kafka = KafkaConfig()
    assert (kafka.auto_offset_reset, kafka.group_id, kafka.settings) == ("earliest", "streamtrain", {})
    assert (RingConfig().batch_size, RingConfig().slots) == (256, 32)
    assert RingConfig().ingest == "process"
    assert DeadLetterConfig().on_failure == "block"
    assert (DataConfig().format, DataConfig().label, DataConfig().csv.delimiter) == ("json", "y", ",")


def test_parsed_values_are_typed_and_frozen():
    kafka = parse(
        KafkaConfig,
        {"topics": ["a", "b"], "metadata_refresh_s": 1, "consume_batch": 500, "settings": {"security.protocol": "SSL"}},
        "kafka",
    )
    assert kafka.topics == ("a", "b") and kafka.metadata_refresh_s == 1.0 and isinstance(kafka.metadata_refresh_s, float)
    assert kafka.settings == {"security.protocol": "SSL"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        kafka.topics = ("c",)
    data = parse(DataConfig, {"format": "csv", "features": ["a"], "csv": {"columns": ["y", "a"], "delimiter": ";"}}, "data")
    assert data.csv == CsvConfig(columns=("y", "a"), delimiter=";") and data.width == 1
    # YAML reads 1e-3 (no dot) as a string; a number is accepted where a string is expected
    assert parse(DeadLetterConfig, {"timeout_s": "1e-3", "topic": 123}, "dead_letter") == DeadLetterConfig("123", "block", 0.001)


def test_width():
    assert parse(DataConfig, DATA, "data").width == 2
    assert parse(DataConfig, {"format": "raw", "num_features": 5}, "data").width == 5
    assert parse(DataConfig, {"feature_field": "v", "num_features": 3}, "data").width == 3


# ----------------------------------------------------------------------------- every problem at once


def test_every_problem_is_reported_with_its_key_path():
    found = problems(
        KafkaConfig,
        {
            "topic": ["events"],
            "topics": "events",
            "consume_batch": "many",
            "consume_timeout_ms": 0,
            "queued_max_kbytes": True,
            "metadata_refresh_s": -1,
            "auto_offset_reset": "middle",
            "bootstrap_servers": " ",
            "settings": {"enable.auto.commit": True, "bootstrap.servers": "x:1", "security.protocol": "SSL"},
        },
        "kafka",
    )
    assert_problems(
        found,
        ("kafka.topic", "unknown key; did you mean 'topics'?"),
        ("kafka.topics", "must be a list, got 'events'"),
        ("kafka.consume_batch", "must be an integer, got 'many'"),
        ("kafka.consume_timeout_ms", "must be > 0, got 0"),
        ("kafka.queued_max_kbytes", "must be an integer, got True"),
        ("kafka.metadata_refresh_s", "must be > 0, got -1"),
        ("kafka.auto_offset_reset", "must be earliest or latest, got 'middle'"),
        ("kafka.bootstrap_servers", "must be host:port"),
        ("kafka.settings.enable.auto.commit", "managed by the daemon"),
        ("kafka.settings.bootstrap.servers", "use kafka.bootstrap_servers instead"),
    )


def test_config_error_is_one_message_listing_every_problem():
    with pytest.raises(StreamtrainError) as info:
        parse(RingConfig, {"batch_size": 0, "slots": 1, "max_batch_wait_ms": -5}, "ring")
    message = str(info.value)
    assert message.startswith("invalid configuration (3 problem(s)):")
    for line in ("ring.batch_size: must be > 0, got 0", "ring.slots: must be >= 2", "ring.max_batch_wait_ms: must be > 0, got -5"):
        assert f"\n  {line}" in message


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    assert_problems(
        problems(RingConfig, {"zzzz": 1}, "ring"), ("ring.zzzz", "unknown key; known keys: batch_size, slots, max_batch_wait_ms")
    )


def test_nested_section_problems_carry_the_full_path():
    found = problems(DataConfig, {**DATA, "format": "csv", "csv": {"colums": ["a"], "delimiter": ";;"}}, "data")
    assert_problems(found, ("data.csv.colums", "did you mean 'columns'?"), ("data.csv.delimiter", "must be one character, got ';;'"))


@pytest.mark.parametrize(
    "cls, raw, expected",
    [
        (KafkaConfig, "events", [("kafka", "must be a mapping"), ("kafka.topics", "must be a non-empty list")]),
        (KafkaConfig, {"topics": []}, [("kafka.topics", "must be a non-empty list")]),
        (KafkaConfig, {"topics": ["ok", "has space", ""]}, [("kafka.topics[1]", "without spaces"), ("kafka.topics[2]", "without spaces")]),
        (KafkaConfig, {"topics": ["a"], "settings": ["x"]}, [("kafka.settings", "must be a mapping")]),
        (KafkaConfig, {"topics": ["a"], "group_id": ""}, [("kafka.group_id", "non-empty")]),
        (RingConfig, {"batch_size": 1.5, "slots": "2"}, [("ring.batch_size", "must be an integer"), ("ring.slots", "must be an integer")]),
        (RingConfig, {"batch_size": [1]}, [("ring.batch_size", "must be an integer, got [1]")]),
        (DataConfig, {**DATA, "features": "a"}, [("data.features", "must be a list, got 'a'")]),
        (DataConfig, {**DATA, "max_record_bytes": 0}, [("data.max_record_bytes", "must be > 0")]),
        (
            DeadLetterConfig,
            {"topic": "a b", "on_failure": "ignore", "timeout_s": 0},
            [
                ("dead_letter.topic", "without spaces"),
                ("dead_letter.on_failure", "must be block or stop, got 'ignore'"),
                ("dead_letter.timeout_s", "must be > 0"),
            ],
        ),
    ],
)
def test_wrong_types_lists_and_ranges(cls, raw, expected):
    path = {KafkaConfig: "kafka", RingConfig: "ring", DataConfig: "data", DeadLetterConfig: "dead_letter"}[cls]
    assert_problems(problems(cls, raw, path), *expected)


# ----------------------------------------------------------------------------- data rules


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"format": "raw"}, [("data.num_features", "must be > 0")]),
        ({"format": "xml", "features": ["a"]}, [("data.format", "must be one of json, csv, arrow, raw, avro, protobuf, got 'xml'")]),
        ({"format": "avro", "features": ["a"]}, [("data.schema", "need a schema: data.schema_registry.url")]),
        ({"format": "avro", "features": ["a"], "schema": "/no/such.avsc"}, [("data.schema", "no such file")]),
        ({"format": "protobuf", "features": ["a"], "schema": "m.proto"}, [("data.schema", "must be a FileDescriptorSet")]),
        ({"format": "json", "features": ["a"], "schema_registry": {"url": "http://r:8081"}}, [("data.schema_registry.url", "is for")]),
        (
            {"format": "avro", "features": ["a"], "schema_registry": {"url": "r:8081", "basic_auth_user": "u"}},
            [("data.schema_registry.url", "must start with http"), ("data.schema_registry.basic_auth_password", "go together")],
        ),
        ({"format": "json"}, [("data.features", "must list the feature fields")]),
        ({"format": "arrow", "features": ["a"], "feature_field": "v", "num_features": 1}, [("data.feature_field", "not both")]),
        ({"format": "json", "feature_field": "v"}, [("data.num_features", "must be > 0")]),
        ({"format": "csv", "feature_field": "v", "num_features": 2}, [("data.feature_field", "not available for csv")]),
        ({**DATA, "num_features": 3}, [("data.num_features", "must equal the length of data.features (2), got 3")]),
        ({**DATA, "features": ["a", "a"]}, [("data.features", "must not name a field twice")]),
        ({**DATA, "features": ["a", "y"]}, [("data.label", "must not also be a feature, got 'y'")]),
        (
            {**DATA, "format": "csv", "csv": {"columns": ["a", "z"]}},
            [("data.csv.columns", "must contain every feature and the label; missing ['b', 'y']")],
        ),
    ],
)
def test_data_rules(raw, expected):
    assert_problems(problems(DataConfig, raw, "data"), *expected)


def test_csv_columns_may_hold_extra_columns_in_any_order():
    data = parse(DataConfig, {**DATA, "format": "csv", "csv": {"columns": ["id", "y", "b", "a"]}}, "data")
    assert data.csv.columns == ("id", "y", "b", "a")


# ----------------------------------------------------------------------------- kafka pass-through


@pytest.mark.parametrize(
    "key, replacement",
    [
        ("bootstrap.servers", "kafka.bootstrap_servers"),
        ("group.id", "kafka.group_id"),
        ("auto.offset.reset", "kafka.auto_offset_reset"),
        ("queued.max.messages.kbytes", "kafka.queued_max_kbytes"),
    ],
)
def test_typed_kafka_keys_are_refused_in_settings_naming_the_replacement(key, replacement):
    found = problems(KafkaConfig, {"topics": ["a"], "settings": {key: "x"}}, "kafka")
    assert_problems(found, (f"kafka.settings.{key}", f"use {replacement} instead"))


@pytest.mark.parametrize("key", ["enable.auto.commit", "enable.auto.offset.store", "group.protocol"])
def test_daemon_owned_kafka_keys_are_refused_in_settings(key):
    found = problems(KafkaConfig, {"topics": ["a"], "settings": {key: True}}, "kafka")
    assert_problems(found, (f"kafka.settings.{key}", "managed by the daemon and cannot be overridden"))


def test_settings_pass_through_to_the_clients():
    kafka = parse(
        KafkaConfig,
        {"topics": ["a"], "bootstrap_servers": "127.0.0.1:1", "settings": {"security.protocol": "SSL", "fetch.min.bytes": 10}},
        "kafka",
    )
    consumer = consumer_settings(kafka, "me")
    assert consumer["bootstrap.servers"] == "127.0.0.1:1" and consumer["client.id"] == "me"
    assert consumer["security.protocol"] == "SSL" and consumer["fetch.min.bytes"] == 10
    assert consumer["enable.auto.commit"] is False and consumer["enable.auto.offset.store"] is False
    producer = producer_settings(kafka, DeadLetterConfig())
    assert producer["security.protocol"] == "SSL" and producer["acks"] == "all"
    assert "fetch.min.bytes" not in producer  # consumer-only keys stay out of the producer


def test_the_daemons_librdkafka_defaults_give_way_to_settings():
    kafka = parse(KafkaConfig, {"topics": ["a"]}, "kafka")
    assert consumer_settings(kafka)["fetch.wait.max.ms"] == 200  # freshness on brokers that poll (docs/BENCHMARKS.md)
    tuned = parse(KafkaConfig, {"topics": ["a"], "settings": {"fetch.wait.max.ms": 50, "fetch.queue.backoff.ms": 100}}, "kafka")
    assert consumer_settings(tuned)["fetch.wait.max.ms"] == 50 and consumer_settings(tuned)["fetch.queue.backoff.ms"] == 100


def test_a_frozen_section_holds_no_mutable_mapping():
    """``kafka.settings`` and ``model.params`` refuse changes like the sections around them, and still pickle (to the ingest child)."""
    import pickle

    from streamtrain.config.schema import config_from_dict

    cfg = config_from_dict(
        {"kafka": {"topics": ["a"], "settings": {"security.protocol": "SSL"}}, "data": {"format": "raw", "num_features": 3}}
    )
    for mapping in (cfg.kafka.settings, cfg.model.params, KafkaConfig().settings):
        with pytest.raises(TypeError, match="frozen"):
            mapping["x"] = 1
        with pytest.raises(TypeError, match="frozen"):
            mapping.update(x=1)
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and again.kafka.settings == {"security.protocol": "SSL"}
    assert dict(cfg.kafka.settings) | {"x": 1} == {"security.protocol": "SSL", "x": 1}  # a changed copy is a plain dict
