"""``streamtrain serve --server kserve``: KServe's own ModelServer over our watcher and decoders, through real clients --
Triton's HTTP and gRPC clients, kserve's ``InferenceRESTClient`` (v1 and v2) and ``InferenceGRPCClient`` -- answering what the
FastAPI app answers for the same version, not ready until a version is there, reloading a new one, bad input a 400 with
our message, our metrics beside kserve's on its /metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from streamtrain.streams.ring import Batch
from tests.kafka_util import free_port
from tests.test_publish import snapshot, trainer

pytest.importorskip("fastapi", reason="the serve extra: pip install 'streamtrain[serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="Triton's client: pip install 'tritonclient[http]' (the test extra)")
_argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses sys.argv when it is imported (pytest's would be taken for its own)
try:
    kserve = pytest.importorskip("kserve", reason="the kserve extra: pip install 'streamtrain[kserve]'")
finally:
    sys.argv = _argv
from streamtrain.serve.server import build  # noqa: E402 -- needs the serve extra
from tests.serve_util import Client, InProcess, ServeProcess  # noqa: E402

ROWS = [{"a": None if k % 3 == 0 else 0.1 * k, "b": 0.5 - 0.2 * k, "user": 100 + k, "item": f"i{k % 2}"} for k in range(6)]
X = np.array([[np.nan if r["a"] is None else r["a"], r["b"]] for r in ROWS], dtype=np.float32)
CATS = np.array([[str(r["user"]), r["item"]] for r in ROWS], dtype=np.object_)


def fit(t, steps: int) -> None:
    """Binary, missing numbers, two categorical fields: every tensor kind the v2 decoder takes."""
    g = torch.Generator().manual_seed(3 + t.step_count)
    for _ in range(steps):
        i = t.step_count
        x = torch.randn(64, 2, generator=g)
        x[::7, 0] = float("nan")
        ids = torch.randint(0, 1024, (64, 2), generator=g)
        t.step(Batch(x, (x[:, 1] > 0).float(), {("events", 0): ((i + 1) * 64, 0)}, ids=ids))
        t.trained.update({("events", 0): ((i + 1) * 64, 0)})


def triton_infer(port: int, binary: bool = True):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    inputs = [httpclient.InferInput("features", list(X.shape), "FP32"), httpclient.InferInput("categorical", list(CATS.shape), "BYTES")]
    inputs[0].set_data_from_numpy(X, binary_data=binary)
    inputs[1].set_data_from_numpy(CATS, binary_data=binary)
    try:
        r = c.infer("m", inputs)
        return r.get_response()["model_version"], [v.decode() for v in r.as_numpy("class")], r.as_numpy("probability").tolist()
    finally:
        c.close()


TRITON_GRPC = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
x, cats = np.array(json.loads(sys.argv[2]), np.float32), np.array(json.loads(sys.argv[3]), np.object_)
c = grpcclient.InferenceServerClient("127.0.0.1:" + sys.argv[1])
inputs = [grpcclient.InferInput("features", list(x.shape), "FP32"), grpcclient.InferInput("categorical", list(cats.shape), "BYTES")]
inputs[0].set_data_from_numpy(x)
inputs[1].set_data_from_numpy(cats)
assert c.is_model_ready("m")
r = c.infer("m", inputs, client_timeout=10)
print(json.dumps([[v.decode() for v in r.as_numpy("class")], r.as_numpy("probability").tolist()]))
"""


def triton_grpc(grpc_port: int) -> tuple:
    """The same rows through Triton's gRPC client (raw tensor contents, as it sends them), in a process of its own:
    tritonclient.grpc and kserve register the same protobuf symbols (``inference.ServerLiveRequest``), so one process
    cannot import both."""
    x = json.dumps([[None if np.isnan(v) else float(v) for v in row] for row in X])
    r = subprocess.run(
        [sys.executable, "-c", TRITON_GRPC, str(grpc_port), x, json.dumps(CATS.tolist())], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr[-3000:]
    classes, probability = json.loads(r.stdout)
    return classes, probability


def answered(port: int) -> tuple:
    """Triton's client's answer, or (None,) while the server answers 503 (no version yet)."""
    try:
        return triton_infer(port)
    except httpclient.InferenceServerException as exc:
        assert exc.status() == "503", exc
        return (None,)


async def kserve_clients(port: int, grpc_port: int) -> dict[str, tuple]:
    """The same rows through kserve's own clients: REST v2 (binary tensors), gRPC v2, REST v1."""
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    def request() -> InferRequest:
        x, cats = InferInput("features", list(X.shape), "FP32"), InferInput("categorical", list(CATS.shape), "BYTES")
        x.set_data_from_numpy(X)
        cats.set_data_from_numpy(CATS)
        return InferRequest("m", [x, cats])

    out = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=10))
    grpc = InferenceGRPCClient(f"127.0.0.1:{grpc_port}", timeout=10)
    v1 = InferenceRESTClient(RESTConfig(protocol="v1", timeout=10))
    try:
        assert await rest.is_model_ready(f"http://127.0.0.1:{port}", "m") and await grpc.is_model_ready("m")
        for label, r in (
            ("rest v2", await rest.infer(f"http://127.0.0.1:{port}", request(), model_name="m")),
            ("grpc v2", await grpc.infer(request())),
        ):
            by = {o.name: o.as_numpy() for o in r.outputs}
            out[label] = ([c.decode() if isinstance(c, bytes) else c for c in by["class"].tolist()], by["probability"].tolist())
        doc = await v1.infer(f"http://127.0.0.1:{port}", {"instances": ROWS, "probabilities": True}, model_name="m")
        out["rest v1"] = ([p["class"] for p in doc["predictions"]], [p["probabilities"]["yes"] for p in doc["predictions"]])
        out["rest v1 version"] = doc["model_version"]
    finally:
        await rest.close()
        await grpc.close()
        await v1.close()
    return out


def fastapi_answers(repo) -> tuple:
    """What the FastAPI app answers for the same rows from the same repository (v2, through Triton's client)."""
    app, watcher, _metrics = build(repo, "m", poll_s=3600)
    server = InProcess(app)
    try:
        return triton_infer(server.port)
    finally:
        server.close()
        watcher.close()


def test_kserve_serves_the_fastapi_answers_reloads_and_refuses_bad_input(tmp_path):
    t = trainer(
        tmp_path,
        "binary",
        {"name": "logistic", "params": {}},
        data={"features": ["a", "b"], "categorical": ["user", "item"], "hash_buckets": 1024},
        settings={"classes": ["no", "yes"]},
    )
    grpc_port = free_port()
    repo = tmp_path / "repo"
    args = ("--server", "kserve", "--repo", str(repo), "--name", "m", "--poll-seconds", "0.1", "--grpc-port", str(grpc_port))
    server = ServeProcess(tmp_path / "serve.log", *args)
    plain = None
    try:
        server.wait_ready(path="/v2/health/live", timeout=60)  # up with no version yet: kserve itself would refuse to start
        plain = Client(server.port)
        assert plain.get("/v2/models/m/ready")[0] == 503 and plain.get("/v1/models/m")[0] == 503
        for version, steps in ((30, 30), (40, 10)):
            fit(t, steps)
            snapshot(t)  # published: the server's watcher swaps it in
            deadline = time.monotonic() + 30
            while (got := answered(server.port))[0] != str(version):  # a 503 until the first version, then the older one
                assert time.monotonic() < deadline, f"version {version} not served after 30 s:\n{server.log()[-3000:]}"
                time.sleep(0.1)
            want = fastapi_answers(repo)
            assert want[0] == str(version) and got[1] == want[1] and got[2] == pytest.approx(want[2], abs=1e-7), "Triton's client, binary"
            answers = asyncio.run(kserve_clients(server.port, grpc_port))
            assert answers.pop("rest v1 version") == str(version)
            answers["triton grpc"] = triton_grpc(grpc_port)
            for label, (classes, probability) in answers.items():
                assert classes == want[1] and probability == pytest.approx(want[2], abs=1e-6), label
        code, doc = plain.post("/v1/models/m:predict", {"instances": [{"a": 1.0, "b": "x", "user": 1, "item": "x"}]})
        assert code == 400 and doc == {"error": "instances[0].b: must be a number, got a string"}, "our decoder's message, kserve's 400"
        bad = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        x = httpclient.InferInput("features", [2, 3], "FP32")
        x.set_data_from_numpy(np.zeros((2, 3), np.float32))
        with pytest.raises(httpclient.InferenceServerException, match=r"\[400\] inputs: this model takes \['categorical', 'features'\]"):
            bad.infer("m", [x])
        bad.close()
        code, text = plain.get("/metrics")
        assert code == 200
        assert "streamtrain_serve_model_version 40.0" in text and "streamtrain_serve_reloads_total 2.0" in text, "ours"
        assert 'streamtrain_serve_requests_total{code="400",handler="predict"} 1.0' in text, "our request counter, on kserve's app"
        assert "request_predict_seconds" in text, "kserve's own"
        plain.close()
        assert server.terminate() == 0, server.log()[-3000:]
    finally:
        if plain is not None:
            plain.close()
        server.kill()
        t.close()
