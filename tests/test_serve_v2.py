"""``streamtrain serve``'s v2 (Open Inference Protocol) routes, through Triton's own HTTP client: the trainer's predictions
in binary and JSON tensors, metadata and health as the client reads them, categorical fields and missing numbers as v1
takes them, and a 400 naming what is wrong for a bad request."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from streamtrain.streams.ring import Batch
from tests.test_publish import snapshot, train, trainer

pytest.importorskip("fastapi", reason="the serve extra: pip install 'streamtrain[serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="Triton's client: pip install 'tritonclient[http]' (the test extra)")
from streamtrain.serve.server import build  # noqa: E402 -- needs the serve extra
from tests.serve_util import Client, InProcess  # noqa: E402
from tests.test_serve import raw_inputs  # noqa: E402


@pytest.fixture
def served():
    """Factory: ``served(repo)`` -> (Triton client, plain client, the model loaded) on a real uvicorn server."""
    running = []

    def start(repo):
        app, watcher, _metrics = build(repo, "m", poll_s=3600)
        watcher.start()  # liveness is the watcher's (polling); build() has loaded the version
        server = InProcess(app)
        triton = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        plain = Client(server.port)
        running.append((server, triton, plain, watcher))
        return triton, plain, watcher.current

    yield start
    for server, triton, plain, watcher in running:
        triton.close()
        plain.close()
        watcher.close()
        server.close()


def infer(triton, x: np.ndarray, binary: bool, outputs=None, categorical=None):
    inputs = [httpclient.InferInput("features", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=binary)
    if categorical is not None:
        inputs.append(httpclient.InferInput("categorical", list(categorical.shape), "BYTES"))
        inputs[1].set_data_from_numpy(categorical, binary_data=binary)
    wanted = None if outputs is None else [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    return triton.infer("m", inputs, outputs=wanted)


@pytest.mark.parametrize(
    ("task", "model"),
    [
        ("regression", {"name": "mlp", "params": {"hidden": [16]}}),
        ("binary", {"name": "mlp", "params": {"hidden": [16]}}),
        ("multiclass", {"name": "logistic", "params": {"num_classes": 3}}),
    ],
)
def test_tritons_client_gets_the_trainers_predictions(tmp_path, served, task, model):
    t = trainer(tmp_path, task, model, data={"missing": "reject"})
    train(t, 20)
    snapshot(t)
    x = raw_inputs(17)
    with torch.no_grad():
        out = t.model(t.learner.normalizer.inputs(x))
    triton, plain, _m = served(tmp_path / "repo")
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("m")
    assert triton.is_model_ready("m", "20") and not triton.is_model_ready("m", "19") and not triton.is_model_ready("other")
    meta = triton.get_model_metadata("m")
    assert meta["name"] == "m" and meta["versions"] == ["20"]
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["parameters"]["features"] == ["a", "b", "c"]
    assert triton.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    for binary in (True, False):  # the client's default (binary tensors both ways), and JSON tensors
        result = infer(triton, x.numpy(), binary)
        assert result.get_response()["model_version"] == "20"
        if task == "regression":
            want = (out * t.learner.target.std + t.learner.target.shift).reshape(-1)
            assert torch.equal(torch.tensor(result.as_numpy("prediction")), want), binary
        elif task == "binary":
            assert torch.equal(torch.tensor(result.as_numpy("probability")), torch.sigmoid(out.reshape(-1)))
            assert result.as_numpy("class").tolist() == (out.reshape(-1) > 0).long().tolist()
        else:
            probs = result.as_numpy("probabilities")
            assert probs.shape == (17, 3) and torch.equal(torch.from_numpy(probs), torch.softmax(out, 1))
            assert result.as_numpy("class").tolist() == out.argmax(1).tolist()
    _code, v1 = plain.post("/v1/models/m:predict", {"instances": x.tolist()})
    if task == "binary":
        assert [p["probabilities"][1] for p in v1["predictions"]] == result.as_numpy("probability").tolist(), "v1 and v2 alike"
    t.close()


def test_categorical_fields_missing_numbers_and_class_names_as_v1_takes_them(tmp_path, served):
    """BYTES categorical values hash as the records' (an integer as its digits), NaN is a missing number; the answers are
    v1's for the same rows, class names as BYTES; an output asked for alone comes alone."""
    t = trainer(
        tmp_path,
        "binary",
        {"name": "logistic", "params": {}},
        data={"features": ["a", "b"], "categorical": ["user", "item"], "hash_buckets": 1024},
        settings={"classes": ["no", "yes"]},
    )
    g = torch.Generator().manual_seed(3)
    for i in range(30):
        x = torch.randn(64, 2, generator=g)
        x[::7, 0] = float("nan")
        ids = torch.randint(0, 1024, (64, 2), generator=g)
        t.step(Batch(x, (x[:, 1] > 0).float(), {("events", 0): ((i + 1) * 64, 0)}, ids=ids))
        t.trained.update({("events", 0): ((i + 1) * 64, 0)})
    snapshot(t)
    triton, plain, _m = served(tmp_path / "repo")
    assert [i["name"] for i in triton.get_model_metadata("m")["inputs"]] == ["features", "categorical"]
    rows = [{"a": None if k % 3 == 0 else 0.1 * k, "b": 0.5 - 0.2 * k, "user": 100 + k, "item": f"i{k % 2}"} for k in range(6)]
    code, v1 = plain.post("/v1/models/m:predict", {"instances": rows, "probabilities": True})
    assert code == 200, v1
    x = np.array([[np.nan if r["a"] is None else r["a"], r["b"]] for r in rows], dtype=np.float32)
    cats = np.array([[str(r["user"]), r["item"]] for r in rows], dtype=np.object_)
    for binary in (True, False):
        result = infer(triton, x, binary, categorical=cats)
        assert [c.decode() if isinstance(c, bytes) else c for c in result.as_numpy("class").tolist()] == [
            p["class"] for p in v1["predictions"]
        ]
        assert result.as_numpy("probability").tolist() == pytest.approx([p["probabilities"]["yes"] for p in v1["predictions"]], abs=1e-7)
    only = infer(triton, x, True, outputs=["probability"], categorical=cats)
    assert [o["name"] for o in only.get_response()["outputs"]] == ["probability"]
    t.close()


def test_a_bad_request_is_a_400_naming_what_is_wrong(tmp_path, served):
    t = trainer(tmp_path, "regression", {"name": "linear", "params": {}}, data={"missing": "reject"})
    train(t, 5)
    snapshot(t)
    _triton, plain, _m = served(tmp_path / "repo")
    infer_path = "/v2/models/m/infer"

    def tensor(**kw):
        return {"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6], **kw}]}

    assert plain.post(infer_path, tensor())[0] == 200
    cases = [
        (tensor(shape=[2, 4]), "shape: must be [n, 3]"),
        (tensor(data=[1, 2, 3]), "6 elements for its shape, got 3"),
        (tensor(datatype="STRING"), "must be a numeric datatype"),
        (tensor(data=[1, 2, 3, 4, 5, None]), "this model does not impute"),
        (tensor(name="x"), "this model takes ['features']"),
        ({"inputs": []}, "inputs: must be a non-empty list"),
        ({**tensor(), "outputs": [{"name": "probability"}]}, "outputs[0]: must name one of ['prediction']"),
        (tensor(parameters={"binary_data_size": 24}), "binary_data_size: 24 bytes are not in the body"),
    ]
    for body, want in cases:
        code, doc = plain.post(infer_path, body)
        assert code == 400 and want in doc["error"], (body, code, doc)
    header = json.dumps(tensor(parameters={"binary_data_size": 24}, data=None)).encode()
    blob = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    code, doc = plain.request("POST", infer_path, raw=header + blob + b"x", headers={"Inference-Header-Content-Length": str(len(header))})
    assert code == 400 and "1 bytes after the JSON header" in doc["error"], doc
    code, doc = plain.request("POST", infer_path, raw=header + blob, headers={"Inference-Header-Content-Length": "99999"})
    assert code == 400 and "Inference-Header-Content-Length" in doc["error"], doc
    code, _doc = plain.request("POST", infer_path, raw=header + blob, headers={"Inference-Header-Content-Length": str(len(header))})
    assert code == 200
    assert plain.get("/v2/models/m/versions/4")[0] == 404 and plain.get("/v2/models/other")[0] == 404
    t.close()
