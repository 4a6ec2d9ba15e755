"""The TLS and SASL examples of docs/SECURITY.md, as written: TLS end to end against a broker behind
a TLS proxy that requires a client certificate; SASL as far as the test broker allows (librdkafka
accepts the settings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streamtrain.config.schema import dump_config, load_config
from streamtrain.daemon.errors import ConfigError
from streamtrain.streams.deadletter import producer_settings
from tests.daemon_util import FEATURES, ROOT, Daemon, daemon_config
from tests.kafka_util import ENV_BOOTSTRAP, unique_name
from tests.tls_util import KEY_PASSWORD, make_certs, start_tls_broker

DOC = ROOT / "docs" / "SECURITY.md"
DOC_DIR = "/etc/streamtrain/tls/"


def example(tag: str) -> str:
    """The ```yaml block of docs/SECURITY.md that starts with ``# example: TAG``."""
    for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.DOTALL):
        if block.startswith(f"# example: {tag}\n"):
            return block
    raise AssertionError(f"no '# example: {tag}' yaml block in {DOC}")


@pytest.fixture
def tls_broker(tmp_path):
    if os.environ.get(ENV_BOOTSTRAP):
        pytest.skip("needs its own broker behind a TLS proxy; an external broker is configured")
    try:
        certs = make_certs(tmp_path / "tls")
    except FileNotFoundError:
        pytest.skip("openssl is not installed")
    broker, proxy = start_tls_broker(certs, str(tmp_path / "tansu.log"))
    yield broker, proxy, certs
    proxy.close()
    broker.close()


def tls_settings(text: str, certs_dir) -> str:
    return text.replace(DOC_DIR, f"{certs_dir}/")


@pytest.mark.integration
def test_tls_example_end_to_end(tmp_path, tls_broker):
    broker, proxy, certs = tls_broker
    topic = unique_name("st-tls")
    raw = yaml.safe_load(tls_settings(example("tls"), certs["ca.pem"].parent))
    cfg = daemon_config(tmp_path, broker.bootstrap, [topic])  # the test's data, model, ports and directories
    cfg["kafka"]["settings"] = raw["kafka"]["settings"]  # the example's security settings, as written
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    assert loaded.kafka.settings["ssl.key.password"] == KEY_PASSWORD
    assert KEY_PASSWORD not in dump_config(loaded)

    settings = {"bootstrap.servers": broker.bootstrap, **loaded.kafka.settings}
    admin = AdminClient(settings)
    for t in (topic, cfg["dead_letter"]["topic"]):
        for fut in admin.create_topics([NewTopic(t, 2, 1)]).values():
            fut.result(30)

    n = 500
    x = np.random.default_rng(5).normal(size=(n, len(FEATURES))).astype(np.float32)
    pq.write_table(pa.table({**{f: x[:, i] for i, f in enumerate(FEATURES)}, "y": x[:, 0]}), tmp_path / "rows.parquet")
    r = subprocess.run([sys.executable, "-m", "streamtrain", "produce", "--config", str(path), "--json", str(tmp_path / "rows.parquet")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows_delivered"] == n
    p = Producer(settings)
    p.produce(topic, b"not json {", partition=0)
    assert p.flush(30) == 0

    d = Daemon(path, tmp_path / "daemon.log")
    d.wait_trained(n, timeout=60)
    d.wait_for("the bad record in the dead-letter topic", lambda m: m.get("streamtrain_dead_letter_records_total", 0) >= 1, timeout=30)
    code, _ = d.terminate()
    assert code == 0
    # the dead-letter copy was acknowledged: the broker advertises only the TLS address, so it went over TLS
    assert proxy.handshakes >= 3 and KEY_PASSWORD not in d.log()


@pytest.mark.integration
def test_plain_client_and_wrong_key_password_are_refused(tmp_path, tls_broker):
    broker, _, certs = tls_broker
    rows = tmp_path / "rows.csv"
    rows.write_text("a,y\n1,2\n")
    r = subprocess.run([sys.executable, "-m", "streamtrain", "produce", "-b", broker.bootstrap, "-t", "x", "--timeout", "3", str(rows)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "cannot reach Kafka" in r.stderr  # the broker speaks only TLS

    (tmp_path / "wrong").write_text("not-the-password\n")
    cfg = daemon_config(tmp_path, broker.bootstrap, [unique_name("st-tls")])
    cfg["kafka"]["settings"] = yaml.safe_load(tls_settings(example("tls"), certs["ca.pem"].parent))["kafka"]["settings"]
    cfg["kafka"]["settings"]["ssl.key.password"] = "${file:wrong}"
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    d = Daemon(path, tmp_path / "daemon.log")
    code = d.wait_exit(60)
    assert code != 0 and "not-the-password" not in d.log()
    assert "ssl.key.location failed" in d.log(), d.log()[-2000:]  # librdkafka could not decrypt the key


def test_sasl_example_passes_check_config_and_librdkafka_accepts_it(tmp_path, monkeypatch):
    try:
        certs = make_certs(tmp_path / "tls")
    except FileNotFoundError:
        pytest.skip("openssl is not installed")
    path = tmp_path / "sasl.yaml"
    path.write_text(tls_settings(example("sasl"), certs["ca.pem"].parent))
    monkeypatch.setenv("KAFKA_PASSWORD", "scram-secret-5e2b")
    cfg = load_config(path)
    shown = dump_config(cfg)
    assert "scram-secret-5e2b" not in shown and "sasl.password: ${env:KAFKA_PASSWORD}" in shown
    settings = producer_settings(cfg.kafka, cfg.dead_letter)
    assert settings["sasl.password"] == "scram-secret-5e2b" and settings["security.protocol"] == "SASL_SSL"
    Producer(settings).flush(0)  # librdkafka checks every property and loads the CA when the client is built
    monkeypatch.delenv("KAFKA_PASSWORD")
    with pytest.raises(ConfigError, match=r"kafka\.settings\.sasl\.password: environment variable KAFKA_PASSWORD is not set"):
        load_config(path)
