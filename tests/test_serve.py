"""``streamtrain serve``: the trainer's predictions over HTTP, a 422 naming the field for bad input, only versions that
verify and validate, hot reload without a failed request while a real daemon publishes, versions never going back."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra: pip install 'streamtrain[serve]'")

from demo.synthetic import SyntheticStream
from streamtrain.serve.repository import MANIFEST_FILE, list_versions, write_version
from streamtrain.serve.server import build
from streamtrain.streams.encode import encode
from tests.daemon_util import FEATURES, Daemon, daemon_config, parse_metrics, run_cli, write_config
from tests.kafka_util import TestProducer, read_topic, unique_name
from tests.serve_util import Client, InProcess, ServeProcess
from tests.test_publish import snapshot, train, trainer

PREDICT = "/v1/models/m:predict"


@pytest.fixture
def serve():
    """Factory: ``serve(repo, **limits)`` -> (client, watcher, metrics) on a real uvicorn server; the watcher is not polling."""
    running = []

    def start(repo: Path, **kw):
        app, watcher, metrics = build(repo, "m", **kw)
        server = InProcess(app)
        client = Client(server.port)
        running.append((server, client, watcher))
        return client, watcher, metrics

    yield start
    for server, client, watcher in running:
        client.close()
        watcher.close()
        server.close()


def raw_inputs(n: int, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g) * torch.tensor([10.0, 0.1, 3.0]) + torch.tensor([100.0, -5.0, 0.0])


@pytest.mark.parametrize(
    ("task", "model"),
    [
        ("regression", {"name": "mlp", "params": {"hidden": [16]}}),
        ("binary", {"name": "mlp", "params": {"hidden": [16]}}),
        ("multiclass", {"name": "logistic", "params": {"num_classes": 3}}),
    ],
)
def test_predictions_equal_the_trainers_model_outputs(tmp_path, serve, task, model):
    """Standardization (and for regression the label's) included: the served numbers are the trainer's, bit for bit."""
    t = trainer(tmp_path, task, model, data={"missing": "reject"})  # an absent feature is an error (imputed: tests/test_features.py)
    train(t, 20)
    snapshot(t)
    x = raw_inputs(33)
    t.model.eval()
    with torch.no_grad():
        out = t.model(t.learner.normalizer.inputs(x))
    as_dicts = [dict(zip(["a", "b", "c"], row)) for row in x.tolist()]
    inline = len(json.dumps({"instances": x.tolist()}))  # the lists on the event loop, the longer dicts on a worker thread
    assert len(json.dumps({"instances": as_dicts})) > inline
    client, _, _metrics = serve(tmp_path / "repo", inline_bytes=inline)
    code, doc = client.post(PREDICT, {"instances": as_dicts})
    assert code == 200 and doc["model_version"] == "20", doc
    code, by_list = client.post(PREDICT, {"instances": x.tolist()})
    assert code == 200 and by_list == doc, "lists in feature order answer the same"
    assert client.post(PREDICT, {"instances": [*as_dicts, {"a": 1.0}]}) == (422, {"error": "instances[33].b: missing feature"})
    preds = doc["predictions"]
    if task == "regression":
        want = (out * t.learner.target.std + t.learner.target.shift).reshape(-1)  # the trainer's prediction, in label units
        assert torch.equal(torch.tensor(preds, dtype=torch.float32), want)
        assert abs(float(want.mean()) - 10.0) < 3, "in the label's units (about 10), not standardized ones"
    elif task == "binary":
        logit = out.reshape(-1)
        assert [p["class"] for p in preds] == (logit > 0).long().tolist()
        assert torch.equal(torch.tensor([p["probabilities"][1] for p in preds], dtype=torch.float32), torch.sigmoid(logit))
        assert all(abs(sum(p["probabilities"]) - 1) < 1e-6 for p in preds)
    else:
        assert [p["class"] for p in preds] == out.argmax(1).tolist()
        assert torch.equal(torch.tensor([p["probabilities"] for p in preds], dtype=torch.float32), torch.softmax(out, 1))
    code, status = client.get("/v1/models/m")
    assert code == 200 and status["model_version_status"][0] == {
        "version": "20",
        "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }
    assert status["streamtrain"]["features"] == ["a", "b", "c"] and status["streamtrain"]["task"] == task
    code, text = client.get("/metrics")
    m = parse_metrics(text)
    assert m["streamtrain_serve_model_version"] == 20 and 0 <= m["streamtrain_serve_model_age_seconds"] < 120
    assert m['streamtrain_serve_requests_total{code="200",handler="predict"}'] == 2 and m["streamtrain_serve_instances_total"] == 66
    assert m['streamtrain_serve_request_duration_seconds_count{handler="predict"}'] == 3
    t.close()


def test_bad_input_is_a_422_naming_the_field_never_a_500(tmp_path, serve):
    t = trainer(tmp_path, data={"missing": "reject"})
    train(t, 10)
    snapshot(t)
    t.close()
    client, _, _metrics = serve(tmp_path / "repo", max_body_bytes=4000, max_instances=20)
    ok = {"a": 100.0, "b": -5, "c": 1.5}
    cases = [
        ({"instances": [ok, ok, ok, {"a": 1.0, "c": 2.0}]}, "instances[3].b: missing feature"),
        ({"instances": [{**ok, "c": "1.5"}]}, "instances[0].c: must be a number, got a string"),
        ({"instances": [{**ok, "a": [1.0]}]}, "instances[0].a: must be a number, got a list"),  # (true/false: 1/0, as in training)
        ({"instances": [{**ok, "b": None}]}, "instances[0].b: must be a number, got null"),
        ({"instances": [[1.0, 2.0]]}, "instances[0]: must have 3 values (the model's features), got 2"),
        ({"instances": [[1.0, [2.0], 3.0]]}, "instances[0][1]: must be a number, got a list"),
        ({"instances": [ok, "x"]}, "instances[1]: must be an object of features by name or a list of 3 numbers, got a string"),
        ({"instances": []}, "instances: must be a non-empty list"),
        ({"instances": None}, "instances: must be a non-empty list"),
        ({"inputs": [ok]}, 'body: must be a JSON object {"instances": [...]}'),
        ([ok], 'body: must be a JSON object {"instances": [...]}'),
        ({"instances": [ok] * 21}, "instances: at most 20 per request, got 21"),
    ]
    for body, error in cases:
        code, doc = client.post(PREDICT, body)
        assert (code, doc) == (422, {"error": error}), body
    for raw, error in [
        (b'{"instances": [[1e400, 0, 0]]}', "instances[0].a: must be a finite number"),  # JSON's 1e400 parses as inf
        (b'{"instances": [[NaN, 0, 0]]}', "instances[0].a: must be a finite number"),
        (b'{"instances": [[1e39, 0, 0]]}', "instances[0].a: must be a finite number"),  # beyond float32
        (b'{"instances": [[1' + b"0" * 400 + b", 0, 0]]}", "instances[0]: a value is out of range"),
        (b"{not json", "body: not valid JSON"),
        (b"\xff\xfe", "body: not valid JSON"),
        (b"[" * 1900 + b"]" * 1900, "body: JSON nested too deeply"),  # found by trying: a 500 and a traceback
        (b'{"instances": ' + b"[" * 1900 + b"]" * 1900 + b"}", "body: JSON nested too deeply"),
    ]:
        code, doc = client.post(PREDICT, raw=raw)
        assert code == 422 and doc["error"].startswith(error), (raw[:40], doc)
    code, doc = client.post(PREDICT, {"instances": [ok] * 150})  # over 4,000 bytes
    assert code == 413 and "larger than 4000 bytes" in doc["error"]
    code, doc = client.post("/v1/models/other:predict", {"instances": [ok]})
    assert code == 404 and doc["error"] == "no model 'other' here; this server serves 'm'"
    code, doc = client.post(PREDICT, {"instances": [ok, [100.0, -5.0, 1.5]]})
    assert code == 200 and doc["predictions"][0] == doc["predictions"][1], "and the server still answers"
    m = parse_metrics(client.get("/metrics")[1])
    assert m['streamtrain_serve_requests_total{code="422",handler="predict"}'] == len(cases) + 8
    assert not any('code="500"' in k for k in m), "no 500"


def test_not_ready_until_a_version_is_there(tmp_path, serve):
    client, watcher, _ = serve(tmp_path / "repo")
    code, doc = client.post(PREDICT, {"instances": [[1.0, 2.0, 3.0]]})
    assert code == 503 and "no valid version of 'm'" in doc["error"]
    assert client.get("/readyz")[0] == 503 and client.get("/v1/models/m")[0] == 503
    assert client.get("/healthz")[0] == 503, "the watcher is not running yet"
    watcher.poll_s = 0.05
    watcher.start()
    assert client.get("/healthz")[0] == 200
    t = trainer(tmp_path)
    train(t, 10)
    snapshot(t)
    t.close()
    deadline = time.monotonic() + 10
    while client.get("/readyz")[0] != 200:
        assert time.monotonic() < deadline, "the polling watcher did not load the new version"
        time.sleep(0.05)
    assert client.post(PREDICT, {"instances": [[1.0, 2.0, 3.0]]})[1]["model_version"] == "10"


class Planted:
    """A pickle that runs code when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def clone(root: Path, src: int, dst: int, change=None) -> Path:
    """Version ``dst`` as a copy of ``src``, ``change(tmp_dir)`` applied before its manifest is written."""

    def files(tmp: Path) -> None:
        for f in (root / "m" / str(src)).iterdir():
            if f.name != MANIFEST_FILE:
                shutil.copy2(f, tmp / f.name)
        if change is not None:
            change(tmp)

    write_version(root, "m", dst, files)
    return root / "m" / str(dst)


def test_corrupt_half_written_or_bad_versions_are_never_served(tmp_path, serve):
    t = trainer(tmp_path, program=False)
    train(t, 20)
    snapshot(t)
    t.close()
    root = tmp_path / "repo"
    client, watcher, _ = serve(root)

    def served() -> str:
        code, doc = client.post(PREDICT, {"instances": [[100.0, -5.0, 0.0]]})
        assert code == 200, doc
        return doc["model_version"]

    assert served() == "20"
    half = root / "m" / "30"  # a half-written copy: an integer name, no manifest
    half.mkdir()
    shutil.copy2(root / "m" / "20" / "model.pt", half / "model.pt")
    flipped = clone(root, 20, 40)  # its bytes changed after the manifest was written
    with open(flipped / "model.pt", "r+b") as f:
        f.seek(-20, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))

    def nan_weights(tmp: Path) -> None:
        w = torch.load(tmp / "model.pt", weights_only=True)
        next(iter(w.values())).fill_(float("nan"))
        torch.save(w, tmp / "model.pt")

    clone(root, 20, 50, nan_weights)  # verifies, loads, but its outputs are not finite
    marker = tmp_path / "pwned"
    clone(root, 20, 60, lambda tmp: torch.save({"w": Planted(marker)}, tmp / "model.pt"))  # code in the pickle
    clone(root, 20, 70, lambda tmp: torch.save({"other": torch.zeros(2)}, tmp / "model.pt"))  # weights of another model
    assert [v.version for v in list_versions(root, "m")] == [70, 60, 50, 40, 20]

    watcher.check()
    assert served() == "20", "the current version keeps serving"
    assert not marker.exists(), "weights_only=True: the pickle's code did not run"
    refused = {int(v): why for v, (_f, why) in watcher.refused.items()}
    assert sorted(refused) == [40, 50, 60, 70], "the half-written 30 is not even looked at"
    assert "sha256 mismatch for model.pt" in refused[40]
    assert "non-finite outputs on a probe batch" in refused[50]
    assert "weights_only=True" in refused[60]
    assert "do not fit model 'mlp'" in refused[70]
    watcher.check()  # refused once, not again and again
    m = parse_metrics(client.get("/metrics")[1])
    assert m["streamtrain_serve_versions_refused_total"] == 4 and m["streamtrain_serve_reloads_total"] == 1
    status = client.get("/v1/models/m")[1]["streamtrain"]
    assert [r["version"] for r in status["refused"]] == ["40", "50", "60", "70"]

    clone(root, 20, 80)  # a good one: swapped in, the old one kept
    watcher.check()
    assert served() == "80" and watcher.previous.version == 20
    shutil.rmtree(root / "m" / "80")  # an operator removes it: back to the newest valid one left, the one kept
    watcher.check()
    assert served() == "20"
    m = parse_metrics(client.get("/metrics")[1])
    assert m["streamtrain_serve_rollbacks_total"] == 1 and m["streamtrain_serve_reloads_total"] == 3
    for v in list_versions(root, "m"):
        shutil.rmtree(v.path)
    watcher.check()
    assert served() == "20", "an emptied repository does not take the served version away"


def test_the_serve_command_finds_its_model_or_says_what_to_give(tmp_path):
    (tmp_path / "repo" / "a").mkdir(parents=True)
    (tmp_path / "repo" / "b").mkdir()
    r = run_cli("serve", "--repo", str(tmp_path / "repo"))
    assert r.returncode == 2 and "give --name: it holds a, b" in r.stderr
    r = run_cli("serve", "--repo", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "it holds no model yet" in r.stderr
    r = run_cli("serve", "--repo", str(tmp_path / "repo"), "--name", "a", "--grpc-port", "8081")
    assert r.returncode == 2 and "--grpc-port needs --server kserve" in r.stderr


# ---------------------------------------------------------------------------- under load, while a real daemon publishes

LOAD_THREADS, LOAD_REQUESTS = 4, int(os.environ.get("STREAMTRAIN_SERVE_LOAD_REQUESTS", "2000"))


@pytest.mark.integration
def test_no_request_fails_while_the_daemon_publishes_new_versions(tmp_path, bootstrap, make_topic):
    """4 threads x 2,000 requests (STREAMTRAIN_SERVE_LOAD_REQUESTS changes the count) while the daemon trains
    from the broker and publishes >= 5 versions: no failed request, every version answered was published, none goes back."""
    topic = make_topic(2)
    versions_topic = unique_name("st-versions")
    repo = tmp_path / "repo"
    cfg = daemon_config(
        tmp_path,
        bootstrap,
        [topic],
        snapshot={"every_seconds": 0.4, "keep": 3},
        publish={"dir": str(repo), "name": "m", "keep": 3, "topic": versions_topic, "program": False},
    )
    daemon = Daemon(write_config(tmp_path / "c.yaml", cfg), tmp_path / "daemon.log")
    feeding = threading.Event()
    stream = SyntheticStream(len(FEATURES), seed=3)

    def feed() -> None:  # a live stream: records keep coming, so every snapshot has something new to publish
        p = TestProducer(bootstrap)
        while not feeding.is_set():
            x, y = stream.batch(200)
            p.send_all(topic, encode("json", x, y, FEATURES), partitions=2)
            p.flush()
            feeding.wait(0.05)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    server = None
    try:
        deadline = time.monotonic() + 60
        while not list_versions(repo, "m"):
            assert daemon.proc.poll() is None and time.monotonic() < deadline, f"no version published:\n{daemon.log()[-3000:]}"
            time.sleep(0.1)
        server = ServeProcess(
            tmp_path / "serve.log",
            *("--repo", str(repo), "--name", "m", "--poll-seconds", "0.1", "--topic", versions_topic, "--bootstrap", bootstrap),
        )
        server.wait_ready()
        published_before = daemon.value("streamtrain_models_published_total")
        x, _ = stream.batch(LOAD_THREADS * 8)
        results: list[list[tuple[int, str | None]]] = [[] for _ in range(LOAD_THREADS)]
        errors: list[str] = []
        stop_at = time.monotonic() + 120

        def load(i: int) -> None:
            client = Client(server.port)
            n = 0
            try:  # the full count, and on until the daemon has published 5 versions more (bounded in time)
                while n < LOAD_REQUESTS or (published() < 5 and time.monotonic() < stop_at):
                    rows = x[(n % 8) * LOAD_THREADS + i : (n % 8) * LOAD_THREADS + i + 1 + n % 3]
                    body = {"instances": [dict(zip(FEATURES, map(float, r))) for r in rows]}
                    code, doc = client.post(PREDICT, body)
                    results[i].append((code, doc.get("model_version") if isinstance(doc, dict) else None))
                    if code != 200 or len(doc["predictions"]) != len(rows) or not all(np.isfinite(doc["predictions"])):
                        errors.append(f"thread {i} request {n}: {code} {doc}")
                    n += 1
            except Exception as exc:
                errors.append(f"thread {i} request {n}: {exc!r}")
            finally:
                client.close()

        publish_count = [0.0]

        def published() -> float:
            return publish_count[0] - published_before

        def watch() -> None:
            while any(th.is_alive() for th in threads):
                publish_count[0] = daemon.value("streamtrain_models_published_total", publish_count[0])
                time.sleep(0.2)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(LOAD_THREADS)]
        started = time.monotonic()
        for th in threads:
            th.start()
        watcher = threading.Thread(target=watch)
        watcher.start()
        for th in threads:
            th.join(180)
        watcher.join(10)
        seconds = time.monotonic() - started
        served = parse_metrics(Client(server.port).get("/metrics")[1])
    finally:
        feeding.set()
        feeder.join(10)
        if server is not None:
            code = server.terminate()
    assert code == 0, server.log()[-2000:]
    assert f"listening to {versions_topic} for new versions of m" in server.log(), "the topic wakes the reload too"
    assert daemon.terminate()[0] == 0
    announced = {json.loads(r.value())["version"] for r in read_topic(bootstrap, versions_topic, 1, timeout=20)}

    total = sum(len(r) for r in results)
    assert not errors, f"{len(errors)} of {total} requests failed: {errors[:5]}"
    assert all(len(r) >= LOAD_REQUESTS for r in results)
    assert published() >= 5, f"only {published()} versions were published during the load"
    answered = [int(v) for r in results for _, v in r]
    assert set(answered) <= announced, f"answered versions that were never published: {sorted(set(answered) - announced)}"
    for r in results:
        seq = [int(v) for _, v in r]
        assert seq == sorted(seq), "a version went backwards"
    assert len(set(answered)) >= 3 and served["streamtrain_serve_reloads_total"] >= 3, "swapped under load"
    assert served["streamtrain_serve_versions_refused_total"] == 0
    print(
        f"\nserve under load: {total} requests from {LOAD_THREADS} threads in {seconds:.1f} s, {published():.0f} versions published, "
        f"{len(set(answered))} answered, {served['streamtrain_serve_reloads_total']:.0f} reloads, 0 failed"
    )
