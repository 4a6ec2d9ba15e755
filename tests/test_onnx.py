"""ONNX (publish.onnx, streamtrain serve --runtime onnx): each published version carries model.onnx that onnxruntime
runs as torch runs the model -- standardization, missing numbers, the label's units, a fitted temperature, categorical
table rows -- checked before it is kept; one that fails is left out and counted, and the server answers the same with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamtrain.serve.repository import list_versions, verify
from streamtrain.streams.ring import Batch
from tests.test_publish import snapshot, train, trainer, value

ort = pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'streamtrain[onnx]'")
pytest.importorskip("onnxscript", reason="the onnx extra")

CASES = [  # task, model, data, trainer settings
    ("regression", {"name": "mlp", "params": {"hidden": [16]}}, {}, {}),
    ("binary", {"name": "logistic", "params": {}}, {}, {"calibration": "temperature"}),
    ("multiclass", {"name": "transformer", "params": {"d_model": 16, "nhead": 2, "num_layers": 1, "dim_feedforward": 32}}, {}, {}),
    ("binary", {"name": "fm", "params": {"embedding_dim": 4}}, {"features": ["a", "b"], "categorical": ["user"], "hash_buckets": 256}, {}),
]


def trained(tmp_path, task, model, data, settings, steps=25):
    t = trainer(tmp_path, task, model, data=data, settings=settings, onnx=True)
    if data.get("categorical"):
        g = torch.Generator().manual_seed(2)
        for i in range(steps):
            x = torch.randn(64, 2, generator=g)
            ids = torch.randint(0, 256, (64, 1), generator=g)
            pos = {("events", 0): ((i + 1) * 64, 0)}
            t.step(Batch(x, ((x[:, 0] > 0) ^ (ids[:, 0] % 2 == 0)).float(), pos, ids=ids))
            t.trained.update(pos)
    else:
        train(t, steps)
    snapshot(t)
    return t


@pytest.mark.parametrize(("task", "model", "data", "settings"), CASES, ids=[f"{c[0]}-{c[1]['name']}" for c in CASES])
def test_each_version_carries_an_onnx_file_that_runs_as_the_program_does(tmp_path, task, model, data, settings):
    t = trained(tmp_path, task, model, data, settings)
    (version,) = list_versions(tmp_path / "repo", "m")
    manifest = verify(version.path)
    assert {"model.onnx", "model.onnx.json"} <= set(manifest["files"]), manifest["files"]
    spec = json.loads((version.path / "model.onnx.json").read_text())
    assert spec["format"] == "onnx" and spec["onnx"]["checked"]["max_abs_diff"] <= 1e-3
    assert spec["inputs"]["standardize"]["included_in_program"] is True
    session = ort.InferenceSession(str(version.path / "model.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(version.path / "model.pt2").module()
    width = len(data.get("features", ["a", "b", "c"]))
    g = torch.Generator().manual_seed(9)
    for n in (1, 37):  # a dynamic batch
        x = torch.randn(n, width, generator=g) * 5
        if t.learner.normalizer.missing:
            x[0, -1] = float("nan")
        args = (x, torch.randint(0, 256, (n, 1), generator=g)) if data.get("categorical") else (x,)
        got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
        with torch.no_grad():
            want = program(*args).numpy()
        assert got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=1e-4), (task, np.abs(got - want).max())
    assert value(t, 'streamtrain_publish_failures_total{stage="onnx"}') == 0
    t.close()


def test_a_model_that_does_not_export_is_published_without_onnx_and_counted(tmp_path, monkeypatch):
    """The exporter fails (here made to: the real failures are the exporter's own, many and version-bound): the version
    is published with its other files, the failure counted and logged, and serve --runtime onnx refuses that version."""
    import streamtrain.models.onnx_export as onnx_export
    from streamtrain.serve.model import VersionRefused, load_version

    def broken(*_a, **_k):
        raise onnx_export.OnnxMismatch("made to differ")

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    t = trained(tmp_path, "regression", {"name": "linear", "params": {}}, {}, {}, steps=5)
    (version,) = list_versions(tmp_path / "repo", "m")
    files = set(verify(version.path)["files"])
    assert "model.pt" in files and "model.pt2" in files and not any(f.startswith("model.onnx") for f in files)
    assert value(t, 'streamtrain_publish_failures_total{stage="onnx"}') == 1
    assert load_version(version.path, "m").version == 5, "torch serves it"
    with pytest.raises(VersionRefused, match=r"no model\.onnx"):
        load_version(version.path, "m", runtime="onnx")
    t.close()


def test_serve_with_the_onnx_runtime_answers_as_with_torch(tmp_path):
    """v1 and v2 requests to two servers of the same version, one on torch and one on onnxruntime: the same answers."""
    pytest.importorskip("fastapi", reason="the serve extra")
    from streamtrain.serve.server import build
    from tests.serve_util import Client, InProcess
    from tests.test_serve import raw_inputs

    t = trained(tmp_path, "binary", {"name": "mlp", "params": {"hidden": [16]}}, {}, {"calibration": "temperature"})
    answers = {}
    for runtime in ("torch", "onnx"):
        app, watcher, _metrics = build(tmp_path / "repo", "m", runtime=runtime)
        assert watcher.current is not None, watcher.last_error
        server, client = InProcess(app), None
        try:
            client = Client(server.port)
            x = raw_inputs(9).tolist()
            code, v1 = client.post("/v1/models/m:predict", {"instances": x})
            tensor = {"name": "features", "datatype": "FP32", "shape": [9, 3], "data": [v for row in x for v in row]}
            code2, v2 = client.post("/v2/models/m/infer", {"inputs": [tensor]})
            assert code == code2 == 200, (v1, v2)
            answers[runtime] = ([p["probabilities"][1] for p in v1["predictions"]], v2["outputs"][0]["data"])
        finally:
            if client is not None:
                client.close()
            watcher.close()
            server.close()
    for a, b in zip(answers["torch"], answers["onnx"]):
        assert a == pytest.approx(b, abs=1e-5)
    t.close()
