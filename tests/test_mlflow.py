"""MLflow (publish.mlflow) against a real tracking server on loopback (``mlflow server``, sqlite, artifacts proxied):
each published version becomes a registered model version with its step, offsets and prequential summary, the alias
champion on it, and a pyfunc that a fresh process loads from ``models:/<name>@champion`` and that answers raw records
exactly as ``streamtrain serve`` does; training metrics go to one run; an MLflow that is not there never holds up
training or the local version, is counted, and is caught up with once it answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from streamtrain.serve.model import load_version, parse_instances
from streamtrain.serve.repository import list_versions
from streamtrain.streams.ring import Batch
from tests.test_publish import snapshot, trainer, value

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'streamtrain[mlflow]'")

DATA = {"features": ["a", "b"], "categorical": ["user"], "hash_buckets": 256, "missing": "impute"}
MODEL = {"name": "fm", "params": {"embedding_dim": 4}}
RECORDS = [
    {"a": 0.5, "b": -1.0, "user": "u7", "ignored": "x"},
    {"a": None, "b": 2.0, "user": "u8"},  # a missing number, imputed as in training
    {"a": -3.0, "b": 0.25},  # a missing category
    {"a": 1.5, "b": 0.0, "user": 42},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` with a sqlite store and proxied artifacts on a loopback port; its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    # no job runner (a second process importing MLflow, for its GenAI scorers): 8 s to health instead of 13-20 s here
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        wait_for(lambda: proc.poll() is not None or _healthy(uri), 90, "mlflow server start")
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        print(f"mlflow server up in {time.monotonic() - started:.1f} s")
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _healthy(uri: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def train_fm(t, steps: int, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed + t.step_count)
    for _ in range(steps):
        x = torch.randn(64, 2, generator=g)
        ids = torch.randint(0, 256, (64, 1), generator=g)
        i = t.step_count
        pos = {("events", 0): ((i + 1) * 64, 0)}
        t.step(Batch(x, ((x[:, 0] > 0) ^ (ids[:, 0] % 2 == 0)).float(), pos, ids=ids))
        t.trained.update(pos)


def mlflow_trainer(tmp_path, uri: str, name: str, **mlflow_cfg):
    cfg = {"tracking_uri": uri, "experiment": f"exp-{name}", "registered_model": name, "every_steps": 5, **mlflow_cfg}
    return trainer(tmp_path, "binary", MODEL, data=DATA, keep=1, mlflow=cfg)


def served(repo: Path, name: str = "m"):
    """``streamtrain serve``'s answers for RECORDS, from the newest version in the repository."""
    m = load_version(list_versions(repo, name)[0].path, name)
    return m.predict(*parse_instances({"instances": RECORDS}, m, 100))


@pytest.fixture
def fresh_python():
    """A new interpreter that, told a tracking URI and a model URI on stdin, answers
    ``mlflow.pyfunc.load_model(model_uri).predict(RECORDS)`` as a list and as a DataFrame.

    Started before the server (its imports, seconds, overlap the server's start); it shares nothing with this one.
    """
    code = (
        "import json, sys, mlflow, mlflow.pyfunc, pandas as pd, torch\n"
        "ask = json.loads(sys.stdin.readline())\n"
        "mlflow.set_tracking_uri(ask['tracking_uri'])\n"
        "m = mlflow.pyfunc.load_model(ask['model_uri'])\n"
        "print(json.dumps({'list': m.predict(ask['records']), 'frame': m.predict(pd.DataFrame(ask['records']))}))\n"
    )
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )

    def ask(tracking_uri: str, model_uri: str) -> dict:
        ask = {"tracking_uri": tracking_uri, "model_uri": model_uri, "records": RECORDS}
        out, err = proc.communicate(json.dumps(ask) + "\n", timeout=120)
        assert proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    yield ask
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_each_version_is_registered_with_its_tags_and_champion_loads_in_a_fresh_process(tmp_path, fresh_python, mlflow_server):
    t = mlflow_trainer(tmp_path, mlflow_server, "fm-records")
    sink = t.publisher.mlflow
    started = time.monotonic()
    for _ in range(2):
        train_fm(t, 10)
        snapshot(t)
        assert sink.wait(60), "the version and the points reach MLflow"
    print(f"two versions logged and registered in {time.monotonic() - started:.1f} s (training included)")
    client = mlflow.MlflowClient(mlflow_server)
    versions = sorted(client.search_model_versions("name='fm-records'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    champion = client.get_model_version_by_alias("fm-records", "champion")
    assert champion.version == "2", "the alias moves to the newest version"
    manifest = json.loads((list_versions(tmp_path / "repo", "m")[0].path / "MANIFEST.json").read_text())
    tags = champion.tags
    assert tags["streamtrain.step"] == "20" == str(manifest["step"]) and tags["streamtrain.snapshot"] == manifest["snapshot"]
    assert tags["streamtrain.offset.events.0"] == str(20 * 64)
    assert float(tags["streamtrain.prequential.samples"]) == manifest["prequential"]["samples"] == 20 * 64
    assert champion.source.startswith("models:/m-"), champion.source  # the logged model (MLflow 3), not a run's artifact path
    logged = client.get_logged_model(champion.source.removeprefix("models:/"))
    assert logged.source_run_id == sink.run_id
    assert {m.key for m in logged.metrics} >= {"prequential.loss", "prequential.accuracy"}
    run = client.get_run(sink.run_id)
    assert "loss/prequential" in run.data.metrics and "grad_norm" in run.data.metrics
    params, run_tags = run.data.params, run.data.tags
    assert params["model.name"] == "fm" and params["trainer.lr"] == "0.01" and params["data.categorical"] == '["user"]'
    assert run_tags["streamtrain.model"] == "fm" and run_tags["streamtrain.task"] == "binary"
    history = client.get_metric_history(sink.run_id, "loss/prequential")
    assert [p.step for p in history] == [5, 10, 15, 20], "a point every publish.mlflow.every_steps steps, in one run"
    assert value(t, "streamtrain_mlflow_model_versions_total") == 2
    assert value(t, 'streamtrain_publish_failures_total{stage="mlflow"}') == 0

    ours = served(tmp_path / "repo")
    started = time.monotonic()
    theirs = fresh_python(mlflow_server, "models:/fm-records@champion")
    print(f"a fresh process answered from models:/fm-records@champion {time.monotonic() - started:.1f} s after it was asked")
    assert theirs["list"] == ours and theirs["frame"] == ours, "the same answers, exactly: the same decoding and the same weights"
    m = load_version(list_versions(tmp_path / "repo", "m")[0].path, "m")
    x, ids = (torch.from_numpy(a) for a in parse_instances({"instances": RECORDS}, m, 100))
    with torch.no_grad():  # the trainer's own model on the same rows: what it predicts before it learns
        p1 = torch.sigmoid(t.learner.model(t.learner.normalizer.inputs(x), ids).reshape(-1))
    got = torch.tensor([p["probabilities"][1] for p in theirs["list"]])
    assert torch.allclose(got, p1, rtol=0, atol=1e-6), (got, p1)
    assert not list((tmp_path / "repo" / "m").glob(".mlflow-*")), "nothing is left linked aside"
    files = Path(
        mlflow.artifacts.download_artifacts("models:/fm-records@champion", dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server)
    )
    assert (files / "artifacts" / "20" / "MANIFEST.json").is_file() and (files / "mlflow_entry.py").is_file()
    assert not list(files.rglob("*.pkl")), "models from code: no pickle in the model"
    t.close()
    assert client.get_run(sink.run_id).info.status == "FINISHED", "the run ends with the daemon"


class Forwarder:
    """Nothing listens on ``port`` until :meth:`start`; then every connection goes on to ``target``: MLflow coming up."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self.server: socket.socket | None = None

    def start(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=30)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_mlflow_down_does_not_hold_up_training_is_counted_and_caught_up_with(tmp_path, mlflow_server):
    port = free_port()  # nothing listens there yet
    down = Forwarder(port, ("127.0.0.1", int(mlflow_server.rsplit(":", 1)[1])))
    t = mlflow_trainer(tmp_path, f"http://127.0.0.1:{port}", "fm-late", retry_s=0.3, timeout_s=2)
    sink = t.publisher.mlflow
    try:
        train_fm(t, 10)
        started = time.monotonic()
        snapshot(t)  # the snapshot and the local version, while MLflow is down
        local = time.monotonic() - started
        assert [v.version for v in list_versions(tmp_path / "repo", "m")] == [10], "the local version is published"
        wait_for(lambda: value(t, 'streamtrain_publish_failures_total{stage="mlflow"}') >= 2, 20, "failed tries counted")
        started = time.monotonic()
        train_fm(t, 10)  # training goes on while the sink keeps failing
        steps = time.monotonic() - started
        assert t.step_count == 20 and steps < 10, f"10 steps took {steps:.1f} s"
        snapshot(t)  # version 20 replaces 10 waiting (keep=1 prunes 10 from the repository; MLflow gets the newest)
        assert value(t, "streamtrain_mlflow_model_versions_total") == 0
        print(f"snapshot + local publish with MLflow down: {local:.2f} s")
        down.start()
        assert sink.wait(30), "caught up once MLflow answers"
        client = mlflow.MlflowClient(mlflow_server)
        (only,) = client.search_model_versions("name='fm-late'")
        assert only.tags["streamtrain.step"] == "20" and client.get_model_version_by_alias("fm-late", "champion").version == only.version
        assert [p.step for p in client.get_metric_history(sink.run_id, "loss/prequential")] == [5, 10, 15, 20], "no point lost"
        assert value(t, "streamtrain_mlflow_model_versions_total") == 1
        failures = value(t, 'streamtrain_publish_failures_total{stage="mlflow"}')
        time.sleep(0.5)
        assert value(t, 'streamtrain_publish_failures_total{stage="mlflow"}') == failures, "no more failures once it answers"
    finally:
        t.close()
        down.close()


def test_config_checks_the_mlflow_section():
    from streamtrain.config.schema import config_from_dict
    from streamtrain.streams.errors import ConfigError

    raw = {"kafka": {"topics": ["e"]}, "data": {"features": ["a"], "label": "y"}}
    with pytest.raises(ConfigError) as err:
        config_from_dict({**raw, "publish": {"mlflow": {"tracking_uri": "/no/scheme", "every_steps": 0, "experiment": " "}}})
    text = str(err.value)
    for problem in (
        "publish.mlflow.tracking_uri: must be a URI with a scheme",
        "publish.mlflow.tracking_uri: needs publish.dir",
        "publish.mlflow.every_steps: must be > 0",
        "publish.mlflow.experiment: must be an experiment name",
    ):
        assert problem in text, text
    cfg = config_from_dict({**raw, "publish": {"dir": "/tmp/r", "mlflow": {"tracking_uri": "http://127.0.0.1:5000"}}})
    assert cfg.publish.mlflow.experiment == "streamtrain" and cfg.publish.mlflow.registered_model == ""


def test_without_the_extra_the_config_error_names_the_pip_install(tmp_path, monkeypatch):
    """A config error (exit 2 from the daemon) before anything starts, not a failure at the first publish."""
    from streamtrain.streams.errors import ConfigError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError, as without the extra
    with pytest.raises(ConfigError, match=r"publish\.mlflow: .*pip install 'streamtrain\[mlflow\]'"):
        mlflow_trainer(tmp_path, "http://127.0.0.1:9", "absent")


def test_a_try_that_failed_half_way_goes_on_from_there(tmp_path, mlflow_server, monkeypatch):
    """The alias failed after the model was logged and registered: the retry moves the alias, with no second model version."""
    real, calls = mlflow.MlflowClient.set_registered_model_alias, []

    def flaky(self, *args):
        calls.append(args)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException("the alias could not be set (injected)")
        return real(self, *args)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", flaky)
    t = mlflow_trainer(tmp_path, mlflow_server, "fm-half", retry_s=0.2)
    train_fm(t, 5)
    snapshot(t)
    assert t.publisher.mlflow.wait(30)
    client = mlflow.MlflowClient(mlflow_server)
    (only,) = client.search_model_versions("name='fm-half'")
    assert len(calls) == 2 and client.get_model_version_by_alias("fm-half", "champion").version == only.version
    assert len(client.search_logged_models(experiment_ids=[t.publisher.mlflow.experiment_id])) == 1
    assert value(t, 'streamtrain_publish_failures_total{stage="mlflow"}') == 1
    t.close()


def test_a_daemon_stopping_while_mlflow_is_down_stops_at_once(tmp_path, caplog):
    t = mlflow_trainer(tmp_path, f"http://127.0.0.1:{free_port()}", "fm-gone", retry_s=60)
    train_fm(t, 5)
    snapshot(t)
    wait_for(lambda: value(t, 'streamtrain_publish_failures_total{stage="mlflow"}') >= 1, 20, "the first failed try")
    started = time.monotonic()
    t.close()  # the final snapshot's version too: one last try each, not retry_s of waiting
    assert time.monotonic() - started < 10
    assert "was not logged to MLflow before shutdown" in caplog.text
    assert not list((tmp_path / "repo" / "m").glob(".mlflow-*")), "what was linked aside is removed"
