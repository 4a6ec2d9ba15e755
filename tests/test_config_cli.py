"""Bad configuration is refused at start: every problem with its key path, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from streamtrain.cli import main
from streamtrain.config.doc import to_markdown, to_yaml
from tests.daemon_util import ROOT, run_cli

GOOD = {
    "kafka": {"bootstrap_servers": "127.0.0.1:9", "topics": ["events"]},
    "data": {"format": "json", "features": ["a", "b"], "label": "y"},
}


def merged(**sections):
    cfg = {k: dict(v) for k, v in GOOD.items()}
    for name, values in sections.items():
        if values is None:
            cfg.pop(name, None)
        else:
            cfg.setdefault(name, {}).update(values)
    return cfg


BAD = [
    ("no topics", merged(kafka={"topics": []}), "kafka.topics: must be a non-empty list"),
    ("typo'd key", merged(kafka={"topcs": ["x"]}), "kafka.topcs: unknown key; did you mean 'topics'?"),
    ("unknown section", {**merged(), "trainr": {}}, "trainr: unknown key; did you mean 'trainer'?"),
    ("negative lr", merged(trainer={"lr": -1}), "trainer.lr: must be > 0, got -1"),
    ("lr not a number", merged(trainer={"lr": "fast"}), "trainer.lr: must be a number, got 'fast'"),
    ("unknown optimizer", merged(trainer={"optimizer": "rmsprop"}), "trainer.optimizer: must be auto, sgd, adam or adamw"),
    ("multiclass without classes", merged(trainer={"task": "multiclass"}), "trainer.num_classes: must be >= 2 for task multiclass"),
    ("loss for another task", merged(trainer={"task": "binary", "loss": "mse"}), "trainer.loss: must be one of auto, bce for task binary"),
    ("fp16 on cpu", merged(trainer={"device": "cpu", "amp": "fp16"}), "trainer.amp: fp16 needs CUDA"),
    ("batch size 0", merged(ring={"batch_size": 0}), "ring.batch_size: must be > 0, got 0"),
    ("one slot", merged(ring={"slots": 1}), "ring.slots: must be >= 2"),
    ("raw without width", merged(data={"format": "raw", "features": []}), "data.num_features: must be > 0 for this format"),
    ("bad format", merged(data={"format": "xml"}), "data.format: must be one of json, csv, arrow, raw, avro, protobuf, got 'xml'"),
    ("label is a feature", merged(data={"label": "a"}), "data.label: must not also be a feature"),
    (
        "daemon-owned kafka key",
        merged(kafka={"settings": {"enable.auto.commit": True}}),
        "kafka.settings.enable.auto.commit: is managed by the daemon",
    ),
    ("typed kafka key in settings", merged(kafka={"settings": {"group.id": "x"}}), "use kafka.group_id instead"),
    ("dead letter = source", merged(dead_letter={"topic": "events"}), "dead_letter.topic: must not be one of kafka.topics"),
    ("unknown model", merged(model={"name": "gpt"}), "model.name: unknown model 'gpt'"),
    ("unknown model param", merged(model={"name": "mlp", "params": {"hiden": [4]}}), "model.params.hiden: unknown parameter"),
    ("bad model param", merged(model={"name": "mlp", "params": {"hidden": [8, 0]}}), "model.params.hidden:"),
    ("missing warm-start file", merged(model={"init_weights": "/nonexistent.pt"}), "model.init_weights: no such file: /nonexistent.pt"),
    ("bad port", merged(metrics={"port": 70000}), "metrics.port: must be in 0..65535, got 70000"),
    ("keep 0", merged(snapshot={"keep": 0}), "snapshot.keep: must be >= 1, got 0"),
    ("bad log format", merged(logging={"format": "xml"}), "logging.format: must be text or json"),
    ("not a mapping", ["a", "b"], "(top level): must be a mapping"),
]


@pytest.mark.parametrize(("case", "cfg", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_key_and_exits_2(case, cfg, expected, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err, f"{case}: {expected!r} not in:\n{err}"


def test_every_problem_is_reported_at_once(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(merged(kafka={"topics": []}, trainer={"lr": 0, "optimizer": "x"}, ring={"batch_size": -2})))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    for key in ("kafka.topics", "trainer.lr", "trainer.optimizer", "ring.batch_size"):
        assert f"  {key}: " in err


def test_good_config_prints_effective_config_with_secrets_redacted(tmp_path, capsys):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(merged(kafka={"settings": {"sasl.password": "hunter2", "security.protocol": "SASL_SSL"}})))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    effective = yaml.safe_load(out)
    assert effective["trainer"]["lr"] is None and effective["trainer"]["optimizer"] == "auto" and effective["kafka"]["topics"] == ["events"]
    assert "hunter2" not in out and effective["kafka"]["settings"]["sasl.password"] == "***"


def test_the_process_exits_2_before_anything_starts(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kafka: {topics: []}\ntrainer: {lr: -1}\n")
    for args in (["check-config", str(path)], ["run", "--config", str(path)]):
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        assert "trainer.lr: must be > 0, got -1" in r.stderr
        assert "metrics on" not in r.stderr  # nothing started


def test_unreadable_and_invalid_yaml(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the config file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: [unclosed\n")
    assert main(["check-config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["demo.yaml", "default.yaml"])
def test_shipped_configs(name, capsys):
    path = ROOT / "config" / name
    code = main(["check-config", str(path)])
    if name == "default.yaml":  # the reference lists defaults; topics and features are the user's to fill in
        err = capsys.readouterr().err
        assert code == 2 and "kafka.topics" in err and "data.features" in err
    else:
        assert code == 0


def test_reference_docs_are_generated_from_the_definitions():
    assert (ROOT / "config" / "default.yaml").read_text() == to_yaml(), "run: python -m streamtrain.config.doc yaml > config/default.yaml"
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    assert to_markdown() in doc, "regenerate docs/CONFIG.md with: python -m streamtrain.config.doc markdown"


def test_default_yaml_documents_every_key():
    text = Path(ROOT / "config" / "default.yaml").read_text()
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "  # " in line, f"undocumented key: {line}"


@pytest.mark.integration
def test_settings_librdkafka_refuses_exit_2_naming_the_key(tmp_path, bootstrap, make_topic):
    """A pass-through setting librdkafka rejects is a configuration error (exit 2), not a crash to restart."""
    from tests.daemon_util import Daemon, daemon_config, write_config

    cfg = daemon_config(tmp_path, bootstrap, [make_topic(1)], kafka={"settings": {"socket.timeout.ms": "soon"}})
    d = Daemon(write_config(tmp_path / "d.yaml", cfg), tmp_path / "d.log")
    assert d.wait_exit(60) == 2
    log = d.log()
    assert 'kafka.settings: librdkafka refused the settings: Invalid value for configuration property "socket.timeout.ms"' in log
    assert "Traceback" not in log
