"""``streamtrain snapshots list|show|export``: read-only views of a snapshot directory (also while the
daemon holds its lock), with the cumulative prequential metrics, and exported models that load without
streamtrain and predict exactly as the trainer does (for regression: in the label's units)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from streamtrain.cli import main
from streamtrain.config.schema import config_from_dict
from streamtrain.daemon.export import export_model, sidecar_path
from streamtrain.daemon.metrics import Metrics
from streamtrain.daemon.snapshot import STATE_FILE, SnapshotStore
from streamtrain.daemon.trainer import Trainer
from streamtrain.models.registry import Inputs, build_model
from streamtrain.streams.ring import Batch
from tests.daemon_util import FEATURES, ROOT, Daemon, daemon_config, write_config

WIDTH = 3


def train(tmp_path, model: dict, task: str = "regression", snapshots: int = 2, label_offset: float = 0.0, **trainer) -> Trainer:
    """A trainer fed without Kafka, with ``snapshots`` snapshots written; features far from N(0, 1).

    Regression labels are ``x0 / 10 + x2`` (about 10 +- 3), times 1000 plus ``label_offset`` if one is given.
    """
    raw = {
        "kafka": {"topics": ["events"], "settings": {"sasl.password": "hunter2-literal"}},
        "data": {"format": "json", "features": ["a", "b", "c"], "label": "y"},
        "model": model,
        "trainer": {"task": task, "lr": 0.01, **trainer},
        "snapshot": {"dir": str(tmp_path / "snaps"), "keep": 5},
    }
    t = Trainer(config_from_dict(raw), Metrics())
    t.setup(stream=False)
    g = torch.Generator().manual_seed(1)
    for i in range(10 * snapshots):
        x = torch.randn(64, WIDTH, generator=g) * torch.tensor([10.0, 0.1, 3.0]) + torch.tensor([100.0, -5.0, 0.0])
        y = (x[:, 0] > 100).float() if task == "binary" else x[:, 0] * 0.1 + x[:, 2]
        if label_offset:
            y = y * 1000 + label_offset
        pos = {("events", 0): ((i + 1) * 40, 0), ("events", 1): ((i + 1) * 24, 0)}
        t.step(Batch(x, y, pos))
        t.trained.update(pos)
        if (i + 1) % 10 == 0:
            t.snapshot(final=True)
    return t


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["snapshots", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_table_and_json(tmp_path, capsys):
    t = train(tmp_path, {"name": "linear"})
    t.close()
    d = str(tmp_path / "snaps")
    code, out, _ = cli(capsys, "list", "--dir", d)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["NAME", "STEP", "CREATED"] and len(lines) == 3
    assert lines[0].split()[-3:] == ["CUM_LOSS", "CUM_METRIC", "POSITIONS"]
    assert lines[1].split()[1] == "20" and "events: 2 partition(s), offsets sum 1,280" in lines[1] and "mae" in lines[1]
    cum = t.learner.prequential.summary("regression")  # the trainer's totals at step 20, as the newest snapshot holds them
    assert f"{cum['loss']:.6g}  mae {cum['mae']:.6g}" in lines[1]
    code, out, _ = cli(capsys, "list", "--dir", d, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["step"] for r in rows] == [20, 10] and rows[0]["samples"] == 20 * 64
    assert rows[0]["positions"] == [
        {"topic": "events", "partition": 0, "offset": 800, "rows": 0},
        {"topic": "events", "partition": 1, "offset": 480, "rows": 0},
    ]
    assert rows[0]["metric"]["mae"] > 0 and rows[0]["loss_ewma"] > 0
    assert rows[0]["prequential"] == cum and set(cum) == {"samples", "loss", "mae", "rmse"} and cum["samples"] == 20 * 64
    assert rows[1]["prequential"]["samples"] == 10 * 64 and rows[1]["prequential"]["mae"] > cum["mae"]  # it learns


def test_list_and_show_cumulative_accuracy_for_classification(tmp_path, capsys):
    t = train(tmp_path, {"name": "logistic", "params": {"num_classes": 2}}, "binary")
    t.close()
    d = str(tmp_path / "snaps")
    cum = t.learner.prequential.summary("binary")
    assert set(cum) == {"samples", "loss", "accuracy", "brier", "ece", "calibration_ratio", "normalized_entropy"}
    assert cum["samples"] == 20 * 64 and 0 < cum["brier"] < 0.25 and 0 <= cum["ece"] <= 1 and 0.8 < cum["calibration_ratio"] < 1.25
    code, out, _ = cli(capsys, "list", "--dir", d)
    assert code == 0 and f"accuracy {cum['accuracy']:.6g}" in out.splitlines()[1]
    code, out, _ = cli(capsys, "list", "--dir", d, "--json")
    assert json.loads(out.splitlines()[0])["prequential"] == cum
    code, out, _ = cli(capsys, "show", "latest", "--dir", d)
    line = next(x for x in out.splitlines() if x.startswith("prequential"))
    calibration = f"brier {cum['brier']:.6g}, ece {cum['ece']:.6g}, calibration ratio {cum['calibration_ratio']:.6g}"
    scores = f"loss {cum['loss']:.6g}, accuracy {cum['accuracy']:.6g}"
    assert code == 0 and line.startswith(f"prequential  1,280 samples: {scores}, {calibration}")
    code, out, _ = cli(capsys, "show", "latest", "--dir", d, "--json")
    assert code == 0 and json.loads(out)["prequential"] == cum


def older_snapshot(tmp_path, t: Trainer):
    """The trainer's newest snapshot as one written before the label standardization and the prequential totals."""
    info, state = SnapshotStore(tmp_path / "snaps").load_latest()
    meta = {k: v for k, v in info.meta.items() if k != "prequential"}
    meta["config"]["trainer"].pop("standardize_target")
    state = {k: v for k, v in state.items() if k not in ("target", "prequential")}
    return SnapshotStore(tmp_path / "old").write(state, meta)


def test_snapshots_older_than_the_prequential_totals_show_dashes(tmp_path, capsys):
    t = train(tmp_path, {"name": "linear"}, snapshots=1)
    t.close()
    older_snapshot(tmp_path, t)
    d = str(tmp_path / "old")
    code, out, _ = cli(capsys, "list", "--dir", d)
    head, row = out.splitlines()
    columns = dict(zip(head.replace("CREATED (UTC)", "CREATED").split(), row.split()[:2] + row.split()[4:]))
    assert code == 0 and columns["CUM_LOSS"] == "-" and columns["CUM_METRIC"] == "-"
    code, out, _ = cli(capsys, "list", "--dir", d, "--json")
    assert code == 0 and json.loads(out)["prequential"] is None
    code, out, _ = cli(capsys, "show", "latest", "--dir", d)
    assert code == 0 and "prequential  -\n" in out


def test_show_verifies_and_redacts_and_moves_nothing(tmp_path, capsys):
    t = train(tmp_path, {"name": "linear"})
    t.close()
    d = tmp_path / "snaps"
    code, out, _ = cli(capsys, "show", "latest", "--dir", str(d))
    assert code == 0 and "verified     ok" in out and "step         20" in out and "events [1]  offset 480" in out
    cum = t.learner.prequential.summary("regression")
    assert f"prequential  1,280 samples: loss {cum['loss']:.6g}, mae {cum['mae']:.6g}, rmse {cum['rmse']:.6g} (cumulative" in out
    assert "hunter2-literal" not in out and "sasl.password: '***'" in out
    newest, older = sorted(d.glob("snap-*"), reverse=True)
    with open(newest / "state.pt", "r+b") as f:  # flip a byte: sha256 no longer matches
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    before = sorted(p.name for p in d.iterdir())
    code, out, _ = cli(capsys, "show", newest.name, "--dir", str(d), "--json")
    doc = json.loads(out)
    assert code == 1 and doc["verified"] is False and "sha256 mismatch for state.pt" in doc["problem"]
    code, out, _ = cli(capsys, "show", "latest", "--dir", str(d))  # the newest that verifies
    assert code == 0 and older.name in out
    code, _, err = cli(capsys, "export", newest.name, str(tmp_path / "m.pt"), "--dir", str(d))
    assert code == 1 and "sha256 mismatch" in err and not (tmp_path / "m.pt").exists()
    assert sorted(p.name for p in d.iterdir()) == before  # read-only: nothing quarantined
    code, _, err = cli(capsys, "show", "snap-nope", "--dir", str(d))
    assert code == 1 and "no snapshot 'snap-nope'" in err


@pytest.mark.parametrize(
    ("model", "task"),
    [
        ({"name": "mlp", "params": {"hidden": [16, 16]}}, "binary"),
        ({"name": "transformer", "params": {"d_model": 16, "nhead": 2}}, "regression"),
    ],
    ids=["mlp-binary", "transformer-regression"],
)
def test_exported_weights_load_without_streamtrain_and_predict_like_the_trainer(tmp_path, capsys, model, task):
    t = train(tmp_path, model, task)
    x = torch.randn(33, WIDTH) * torch.tensor([10.0, 0.1, 3.0]) + torch.tensor([100.0, -5.0, 0.0])
    t.model.eval()
    with torch.no_grad():
        want = t.model(t.learner.normalizer.inputs(x))  # what the trainer's model says on the standardized inputs
    if task == "regression":  # in the label's units, as the trainer scores its prequential prediction
        assert t.learner.target.enabled and t.learner.target.count.item() == 20 * 64
        want_label = want * t.learner.target.std + t.learner.target.shift
    else:
        assert not t.learner.target.enabled
        want_label = want
    out = tmp_path / "export" / "model.pt"
    code, text, _ = cli(capsys, "export", "latest", str(out), "--dir", str(tmp_path / "snaps"))
    assert code == 0 and "model.pt.json" in text
    spec = json.loads((tmp_path / "export" / "model.pt.json").read_text())
    assert spec["model"]["name"] == model["name"] and spec["inputs"]["features"] == ["a", "b", "c"]
    assert spec["outputs"]["task"] == task and spec["snapshot"]["step"] == 20

    # the serving side: plain torch, the model class, the sidecar's statistics
    weights = torch.load(out, weights_only=True)
    served = build_model(spec["model"]["name"], spec["model"]["params"], Inputs(**spec["model"]["inputs"])).eval()  # numbers and marks
    served.load_state_dict(weights)
    std = spec["inputs"]["standardize"]
    mean, scale = torch.tensor(std["mean"]), torch.tensor(std["scale"])
    assert spec["inputs"]["missing"] == "impute" and spec["model"]["in_features"] == 2 * WIDTH
    with torch.no_grad():  # as the sidecar says: nothing is missing here, so every mark is 0
        got = served(torch.cat([(x - mean) * scale, torch.zeros_like(x)], 1))
    assert torch.equal(got, want)
    dst = spec["outputs"]["destandardize"]
    assert dst["included_in_program"] is False and dst["formula"] == "y = output * std + mean"
    if task != "regression":
        assert (dst["mean"], dst["std"]) == (0.0, 1.0)
    assert torch.equal(got * torch.tensor([dst["std"]]) + torch.tensor([dst["mean"]]), want_label)

    program = tmp_path / "export" / "model.pt2"
    assert cli(capsys, "export", "20", str(program), "--format", "program", "--dir", str(tmp_path / "snaps"))[0] == 0
    with torch.no_grad():
        raw_in = torch.export.load(program).module()(x)  # raw features in: standardization is inside
    torch.testing.assert_close(raw_in, want_label, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "export" / "model.pt2.json").read_text())["outputs"]["destandardize"]["included_in_program"] is True
    t.close()


@pytest.mark.parametrize("model", [{"name": "linear"}, {"name": "mlp", "params": {"hidden": [16]}}], ids=["linear", "mlp"])
def test_exported_regression_predicts_in_label_units(tmp_path, capsys, model):
    """Labels around 1e5: the model learns them standardized; both export forms give the trainer's prediction in label units."""
    t = train(tmp_path, model, label_offset=1e5, lr=0.1)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(50, WIDTH, generator=g) * torch.tensor([10.0, 0.1, 3.0]) + torch.tensor([100.0, -5.0, 0.0])
    y = (x[:, 0] * 0.1 + x[:, 2]) * 1000 + 1e5
    t.model.eval()
    with torch.no_grad():  # the trainer's prequential prediction: the raw output in the label's running statistics
        want = (t.model(t.learner.normalizer.inputs(x)) * t.learner.target.std + t.learner.target.shift).reshape(-1)
    assert abs(t.learner.target.shift.item() - 1.1e5) < 1e3 and t.learner.target.std.item() > 1e3  # labels 1.1e5 +- 3e3
    assert (want - y).abs().mean() < 0.3 * y.std()  # in label units, and learned: far better than predicting the mean
    d = str(tmp_path / "snaps")

    program = tmp_path / "model.pt2"
    code, text, _ = cli(capsys, "export", "latest", str(program), "--format", "program", "--dir", d)
    assert code == 0 and "label's units" in text
    with torch.no_grad():
        got = torch.export.load(program).module()(x).reshape(-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.05)  # float32 at 1e5: one ulp is 0.008
    spec = json.loads(sidecar_path(program).read_text())
    dst = spec["outputs"]["destandardize"]
    assert spec["streamtrain_export"] == 4 and dst["included_in_program"] is True
    assert dst["mean"] == t.learner.target.shift.item() and dst["std"] == t.learner.target.std.item()
    assert spec["snapshot"]["prequential"] == t.learner.prequential.summary("regression")

    weights_file = tmp_path / "model.pt"
    code, text, _ = cli(capsys, "export", "latest", str(weights_file), "--dir", d)
    assert code == 0 and "y = output * std + mean" in text
    spec = json.loads(sidecar_path(weights_file).read_text())
    served = build_model(spec["model"]["name"], spec["model"]["params"], Inputs(**spec["model"]["inputs"])).eval()  # numbers and marks
    served.load_state_dict(torch.load(weights_file, weights_only=True))
    std, dst = spec["inputs"]["standardize"], spec["outputs"]["destandardize"]
    assert dst["included_in_program"] is False
    with torch.no_grad():  # the serving side, from the sidecar's numbers alone (nothing missing: the marks are 0)
        out = served(torch.cat([(x - torch.tensor(std["mean"])) * torch.tensor(std["scale"]), torch.zeros_like(x)], 1))
        label = (out * torch.tensor([dst["std"]]) + torch.tensor([dst["mean"]])).reshape(-1)
    assert torch.equal(label, want)
    t.close()


def test_export_without_label_standardization(tmp_path):
    """``standardize_target: false``, and a snapshot older than it: the output is the label itself (mean 0, std 1)."""
    t = train(tmp_path, {"name": "linear"}, snapshots=1, standardize_target=False)
    x = torch.randn(9, WIDTH) * torch.tensor([10.0, 0.1, 3.0]) + torch.tensor([100.0, -5.0, 0.0])
    t.model.eval()
    with torch.no_grad():
        want = t.model(t.learner.normalizer.inputs(x))
    info, state = SnapshotStore(tmp_path / "snaps").load_latest()
    spec = export_model(info, state, tmp_path / "off.pt2", "program")
    assert (spec["outputs"]["destandardize"]["mean"], spec["outputs"]["destandardize"]["std"]) == (0.0, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(tmp_path / "off.pt2").module()(x), want, rtol=1e-5, atol=1e-5)
    t.close()

    t = train(tmp_path / "again", {"name": "linear"}, snapshots=1)
    t.close()
    old = older_snapshot(tmp_path / "again", t)
    state = torch.load(old.path / STATE_FILE, weights_only=True)
    spec = export_model(old, state, tmp_path / "old.pt", "state_dict")
    assert (spec["outputs"]["destandardize"]["mean"], spec["outputs"]["destandardize"]["std"]) == (0.0, 1.0)
    assert spec["inputs"]["standardize"]["mean"] == t.learner.normalizer.shift.tolist() and spec["snapshot"]["prequential"] is None


def test_works_while_the_directory_is_locked_and_reads_config(tmp_path, capsys):
    t = train(tmp_path, {"name": "linear"}, snapshots=1)  # the trainer holds the lock, as the daemon does
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"kafka": {"topics": ["e"]}, "data": {"features": ["a"]}, "snapshot": {"dir": "elsewhere"}}))
    code, out, _ = cli(capsys, "list", "--config", str(cfg), "--set", f"snapshot.dir={tmp_path / 'snaps'}", "--json")
    assert code == 0 and len(out.splitlines()) == 1
    assert cli(capsys, "export", "latest", str(tmp_path / "m.pt"), "--dir", str(tmp_path / "snaps"))[0] == 0
    with pytest.raises(Exception, match="in use by another streamtrain process"):
        SnapshotStore(tmp_path / "snaps").lock()  # still held by the trainer
    t.close()
    code, _, err = cli(capsys, "list", "--dir", str(tmp_path / "missing"))
    assert code == 1 and "no such directory" in err


@pytest.mark.integration
def test_produce_then_train_then_export_from_the_running_daemon(tmp_path, bootstrap, make_topic):
    """The whole path: a Parquet file into the topic with the daemon's config, the daemon trains every
    row, and its snapshots are listed and exported while it runs."""
    topic = make_topic(2)
    n = 1000
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, len(FEATURES))).astype(np.float32)
    cols = {f: x[:, i] for i, f in enumerate(FEATURES)}
    pq.write_table(pa.table({**cols, "y": x[:, 0] * 2 + 1}), tmp_path / "train.parquet")
    path = write_config(tmp_path / "c.yaml", daemon_config(tmp_path, bootstrap, [topic]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "streamtrain", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)

    r = run("produce", "--config", str(path), "--json", str(tmp_path / "train.parquet"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows_delivered"] == n
    d = Daemon(path, tmp_path / "daemon.log")
    d.wait_trained(n, timeout=60)
    d.wait_for("a snapshot of every row", lambda m: m.get("streamtrain_last_snapshot_step", 0) > 0, timeout=30)
    listed = run("snapshots", "list", "--config", str(path), "--json")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip(), "no snapshot listed"
    exported = run("snapshots", "export", "latest", str(tmp_path / "model.pt"), "--config", str(path))
    assert exported.returncode == 0, exported.stderr
    assert d.proc.poll() is None  # the daemon kept running: nothing was locked or moved
    code, _ = d.terminate()
    assert code == 0
    final = json.loads(run("snapshots", "list", "--config", str(path), "--json").stdout.splitlines()[0])
    assert final["samples"] == n and sum(p["offset"] for p in final["positions"]) == n
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(weights) == set(build_model("mlp", {"hidden": [32]}, len(FEATURES)).state_dict())


def test_the_commands_that_do_not_train_never_import_torch(tmp_path):
    """--help, check-config, snapshots list/show and produce --help start without torch (seconds to import): only `run`,
    `serve` and `snapshots export` need it (and none of them mlflow; nor pandas, which pyarrow.dataset imports where it is
    installed).  In a fresh interpreter, as a user's shell runs them."""
    from streamtrain.daemon.export import EXPORT_FORMATS
    from streamtrain.tools import snapshots

    assert snapshots.EXPORT_FORMATS == EXPORT_FORMATS  # the CLI's copy, kept without importing daemon/export.py
    train(tmp_path, {"name": "linear"}, snapshots=1)
    cfg = tmp_path / "c.yaml"
    kafka = {"bootstrap_servers": "127.0.0.1:9", "topics": ["t"]}
    cfg.write_text(yaml.safe_dump({"kafka": kafka, "data": {"features": ["a"], "label": "y"}}))
    probe = (
        "import contextlib, io, sys\n"
        "from streamtrain.cli import main\n"
        "for argv in sys.argv[1:]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv.split())\n"
        "    print(argv.split()[0], any(m in sys.modules for m in ('torch', 'mlflow', 'pandas')))\n"
    )
    snaps = tmp_path / "snaps"
    argvs = ["--help", f"check-config {cfg}", f"snapshots list --dir {snaps}", f"snapshots show latest --dir {snaps}", "produce --help"]
    done = subprocess.run([sys.executable, "-c", probe, *argvs], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == [f"{a.split()[0]} False" for a in argvs], done.stdout
