"""Config overrides (STREAMTRAIN__* variables, --set) and secrets (${env:...}, ${file:...}, redaction).

Overrides are validated like the file, with the same key paths; a secret given by
reference appears nowhere: not in check-config, the daemon's log, a snapshot's
meta.json or /metrics.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import typing

import numpy as np
import pytest
import yaml

from streamtrain.cli import main
from streamtrain.config.overrides import apply_overrides, env_overrides, parse_set
from streamtrain.config.schema import Config, config_to_dict, load_config
from streamtrain.config.secrets import Secret, is_secret_key, resolve_secrets
from streamtrain.daemon.errors import ConfigError
from streamtrain.streams.encode import encode
from tests.daemon_util import FEATURES, ROOT, Daemon, daemon_config, latest_meta, write_config
from tests.kafka_util import TestProducer

BASE = {
    "kafka": {"bootstrap_servers": "127.0.0.1:9", "topics": ["events"]},
    "data": {"format": "json", "features": ["a", "b"], "label": "y"},
}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m streamtrain ARGS`` with extra environment variables, bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "streamtrain", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cfg_file(tmp_path):
    def write(raw=None) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(raw if raw is not None else BASE))
        return str(path)

    return write


# ---------------------------------------------------------------- --set and STREAMTRAIN__*


def test_set_values_are_read_as_yaml(cfg_file):
    cfg = load_config(
        cfg_file(),
        ["trainer.lr=0.01", "kafka.topics=[a, b]", "model.params={hidden: [8, 8]}", "kafka.group_id='007'", "trainer.standardize=false"],
        environ={},
    )
    assert cfg.trainer.lr == 0.01 and cfg.kafka.topics == ("a", "b")
    assert cfg.model.params == {"hidden": [8, 8]} and cfg.kafka.group_id == "007" and cfg.trainer.standardize is False


def test_environment_overrides_lowercase_paths_with_double_underscores(cfg_file):
    env = {"STREAMTRAIN__TRAINER__LR": "0.02", "STREAMTRAIN__KAFKA__AUTO_OFFSET_RESET": "latest", "STREAMTRAIN_TEST_BOOTSTRAP": "x:1"}
    cfg = load_config(cfg_file(), environ=env)
    assert cfg.trainer.lr == 0.02 and cfg.kafka.auto_offset_reset == "latest"


def test_precedence_file_then_environment_then_set(cfg_file):
    path = cfg_file({**BASE, "trainer": {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.3}})
    env = {"STREAMTRAIN__TRAINER__LR": "0.2", "STREAMTRAIN__TRAINER__MOMENTUM": "0.6"}
    cfg = load_config(path, ["trainer.lr=0.3"], environ=env)
    assert (cfg.trainer.lr, cfg.trainer.momentum, cfg.trainer.weight_decay) == (0.3, 0.6, 0.3)
    assert load_config(path, ["trainer.lr=0.3", "trainer.lr=0.4"], environ=env).trainer.lr == 0.4  # the last --set wins


def test_dotted_librdkafka_keys_under_kafka_settings(cfg_file):
    env = {"STREAMTRAIN__KAFKA__SETTINGS__SASL__MECHANISMS": "SCRAM-SHA-512"}
    cfg = load_config(cfg_file(), ["kafka.settings.security.protocol=SASL_SSL", "kafka.settings.ssl.key.location=/k.pem"], environ=env)
    assert cfg.kafka.settings == {"sasl.mechanisms": "SCRAM-SHA-512", "security.protocol": "SASL_SSL", "ssl.key.location": "/k.pem"}
    assert parse_set(["kafka.settings.a.b.c=1"], Config) == [(("kafka", "settings", "a.b.c"), 1, "--set kafka.settings.a.b.c=1")]


def test_override_creates_missing_sections_and_keeps_the_rest():
    raw = {"kafka": {"topics": ["t"]}}
    out = apply_overrides(raw, [(("trainer", "schedule", "name"), "cosine", "--set"), (("kafka", "group_id"), "g", "--set")])
    assert out == {"kafka": {"topics": ["t"], "group_id": "g"}, "trainer": {"schedule": {"name": "cosine"}}}
    assert raw == {"kafka": {"topics": ["t"]}}  # not modified in place


@pytest.mark.parametrize(
    ("sets", "env", "expected"),
    [
        (["trainer.lrr=0.1"], {}, "trainer.lrr: unknown key; did you mean 'lr'?"),
        (["trainer.lr=-1"], {}, "trainer.lr: must be > 0, got -1"),
        (["trainer.lr=fast"], {}, "trainer.lr: must be a number, got 'fast'"),
        ([], {"STREAMTRAIN__TRAINR__LR": "1"}, "trainr: unknown key; did you mean 'trainer'?"),
        ([], {"STREAMTRAIN__KAFKA__TOPICS": "[]"}, "kafka.topics: must be a non-empty list"),
        (["kafka.settings.enable.auto.commit=true"], {}, "kafka.settings.enable.auto.commit: is managed by the daemon"),
        (["kafka.topics.x=1"], {}, "--set kafka.topics.x=1: kafka.topics is list in the config, not a section"),
    ],
)
def test_bad_override_names_the_key_path_like_the_file(cfg_file, capsys, monkeypatch, sets, env, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = ["check-config", cfg_file()]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("trainer.lr", "--set trainer.lr: must be key.path=value"),
        ("=3", "--set =3: '' is not a key path"),
        ("trainer..lr=3", "--set trainer..lr=3: 'trainer..lr' is not a key path"),
        ("kafka.topics=[a", "--set kafka.topics=[a: value '[a' is not valid YAML"),
    ],
)
def test_malformed_set_exits_2_with_a_clear_message(cfg_file, item, expected):
    r = cli("check-config", cfg_file(), "--set", item)
    assert r.returncode == 2 and expected in r.stderr, r.stderr


def test_malformed_environment_variable_is_reported():
    with pytest.raises(ConfigError, match="STREAMTRAIN__KAFKA____X: not a key path"):
        env_overrides({"STREAMTRAIN__KAFKA____X": "1"}, Config)


def test_run_takes_set_too(cfg_file):
    r = cli("run", "--config", cfg_file(), "--set", "trainer.lr=-1")
    assert r.returncode == 2 and "trainer.lr: must be > 0, got -1" in r.stderr


# ---------------------------------------------------------------- secrets


def test_env_and_file_references_resolve(tmp_path, cfg_file):
    (tmp_path / "pw").write_text("s3cret-from-file\n")  # `echo pw > file` style: one newline dropped
    raw = {**BASE, "kafka": {**BASE["kafka"], "settings": {"sasl.password": "${file:pw}", "sasl.username": "${env:USER_X}"}}}
    cfg = load_config(cfg_file(raw), environ={"USER_X": "alice"})
    assert cfg.kafka.settings == {"sasl.password": "s3cret-from-file", "sasl.username": "alice"}
    assert isinstance(cfg.kafka.settings["sasl.password"], Secret)


def test_references_also_work_in_overrides(tmp_path, cfg_file):
    env = {"STREAMTRAIN__KAFKA__SETTINGS__SASL__PASSWORD": "${env:PW}", "PW": "from-env"}
    cfg = load_config(cfg_file(), ["kafka.settings.sasl.username=${env:U}"], environ={**env, "U": "bob"})
    assert cfg.kafka.settings == {"sasl.password": "from-env", "sasl.username": "bob"}


def test_missing_secret_is_a_config_error_with_its_key_path(cfg_file, tmp_path):
    settings = {"sasl.password": "${env:NOPE_X}", "ssl.key.password": "${file:/nonexistent/pw}"}
    raw = {**BASE, "kafka": {**BASE["kafka"], "settings": settings}}
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file({**raw, "trainer": {"lr": -1}}), environ={})
    problems = "\n".join(info.value.problems)
    assert "kafka.settings.sasl.password: environment variable NOPE_X is not set" in problems
    assert "kafka.settings.ssl.key.password: cannot read secret file /nonexistent/pw" in problems
    assert "trainer.lr: must be > 0" in problems  # every problem at once
    _, bad = resolve_secrets({"a": "${vault:x}"})
    assert bad == ["a: unknown reference ${vault:x}; use ${env:NAME} or ${file:/path}"]


def test_secret_keys():
    for key in ("sasl.password", "ssl.key.password", "ssl.keystore.password", "ssl.key.pem", "sasl.oauthbearer.client.secret",
                "sasl.oauthbearer.config", "api_key", "access_token", "SASL.PASSWORD"):  # fmt: skip
        assert is_secret_key(key), key
    for key in ("ssl.key.location", "ssl.keystore.location", "ssl.certificate.location", "ssl.ca.location", "sasl.username",
                "sasl.mechanisms", "security.protocol", "sasl.kerberos.keytab", "key_dim", "hidden", "bootstrap_servers"):  # fmt: skip
        assert not is_secret_key(key), key
    typed_secrets = {"basic_auth_password"}  # data.schema_registry's: hidden in check-config and meta.json like sasl.password
    for f in _all_config_keys(Config):  # no other config key of the daemon's own is mistaken for a secret
        assert is_secret_key(f) == (f in typed_secrets), f


def test_a_typed_secret_is_hidden_too():
    from streamtrain.config.schema import config_from_dict

    registry = {"url": "http://r:8081", "basic_auth_user": "u", "basic_auth_password": "literal-pw-123"}
    cfg = config_from_dict({**BASE, "data": {"format": "avro", "features": ["a"], "schema_registry": registry}})
    shown = config_to_dict(cfg)["data"]["schema_registry"]
    assert shown["basic_auth_password"] == "***" and shown["basic_auth_user"] == "u"
    assert cfg.data.schema_registry.basic_auth_password == "literal-pw-123"


def _all_config_keys(cls) -> list[str]:
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        out.append(name)
        if dataclasses.is_dataclass(tp):
            out += _all_config_keys(tp)
    return out


def test_check_config_shows_references_and_stars_never_the_secret(tmp_path, cfg_file, capsys, monkeypatch):
    (tmp_path / "keypw").write_text("file-secret-123")
    monkeypatch.setenv("SASL_PW_X", "env-secret-456")
    monkeypatch.setenv("STREAMTRAIN__KAFKA__SETTINGS__SASL__OAUTHBEARER__CLIENT__SECRET", "literal-secret-789")
    raw = {**BASE, "kafka": {**BASE["kafka"], "settings": {"sasl.password": "${env:SASL_PW_X}", "ssl.key.password": "${file:keypw}",
                                                          "ssl.key.location": "/etc/k.pem"}}}  # fmt: skip
    assert main(["check-config", cfg_file(raw), "--set", "kafka.settings.sasl.username=alice"]) == 0
    out = capsys.readouterr().out
    for secret in ("file-secret-123", "env-secret-456", "literal-secret-789"):
        assert secret not in out
    settings = yaml.safe_load(out)["kafka"]["settings"]
    assert settings == {
        "sasl.password": "${env:SASL_PW_X}",
        "ssl.key.password": "${file:keypw}",
        "ssl.key.location": "/etc/k.pem",
        "sasl.oauthbearer.client.secret": "***",
        "sasl.username": "alice",
    }


def test_secret_value_stays_hidden_in_repr_and_survives_pickle():
    s = Secret("hunter2", "${env:PW}")
    assert "hunter2" not in repr(s) and "hunter2" not in repr({"k": s})
    back = pickle.loads(pickle.dumps(s))
    assert back == "hunter2" and back.ref == "${env:PW}"
    assert config_to_dict({"x": s}, redact=False) == {"x": "hunter2"} and type(config_to_dict(s, redact=False)) is str


@pytest.mark.integration
def test_secret_appears_in_no_output_of_a_running_daemon(tmp_path, bootstrap, make_topic):
    """A dummy sasl.password (harmless without security.protocol) from env and from a file: not in
    check-config, the log, meta.json or /metrics; the daemon still trains."""
    topic = make_topic(2)
    env_secret, file_secret = "envSecretValue-9f3a", "fileSecretValue-7c21"
    (tmp_path / "pw.txt").write_text(file_secret + "\n")
    cfg = daemon_config(tmp_path, bootstrap, [topic], logging={"level": "DEBUG", "progress_every_s": 0.5})
    cfg["kafka"]["settings"] = {"sasl.password": "${env:ST_TEST_SASL_PW}", "ssl.key.password": "${file:pw.txt}"}
    path = write_config(tmp_path / "c.yaml", cfg)
    env = {"ST_TEST_SASL_PW": env_secret, "STREAMTRAIN__KAFKA__SETTINGS__SASL__USERNAME": "${env:ST_TEST_SASL_PW}"}

    check = cli("check-config", str(path), env=env)
    assert check.returncode == 0, check.stderr
    d = Daemon(path, tmp_path / "daemon.log", env=env)
    producer = TestProducer(bootstrap)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, len(FEATURES))).astype(np.float32)
    producer.send_all(topic, encode("json", x, x[:, 0], FEATURES), partitions=2)
    producer.flush()
    d.wait_trained(600, timeout=60)
    _, metrics_text = d.get("/metrics")
    code, _ = d.terminate()
    assert code == 0
    meta_text = (sorted((tmp_path / "snapshots").glob("snap-*"))[-1] / "meta.json").read_text()
    for where, text in [
        ("check-config", check.stdout + check.stderr),
        ("log", d.log()),
        ("meta.json", meta_text),
        ("/metrics", metrics_text),
    ]:
        assert env_secret not in text and file_secret not in text, f"a secret leaked into {where}"
    settings = latest_meta(tmp_path / "snapshots")["config"]["kafka"]["settings"]
    assert settings == {
        "sasl.password": "${env:ST_TEST_SASL_PW}",
        "ssl.key.password": "${file:pw.txt}",
        "sasl.username": "${env:ST_TEST_SASL_PW}",
    }
