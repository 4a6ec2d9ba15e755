"""Publishing (``publish.*``): every durable snapshot's model becomes ``<dir>/<name>/<step>/``, written atomically,
the newest K kept, a failure counted without stopping training, and a record per version on the publish topic."""

from __future__ import annotations

import json
import os

import pytest
import torch

from streamtrain.config.schema import config_from_dict
from streamtrain.daemon.metrics import Metrics
from streamtrain.daemon.trainer import Trainer
from streamtrain.serve.repository import MANIFEST_FILE, cleanup_debris, list_versions, verify, write_version
from streamtrain.streams.ring import Batch
from tests.kafka_util import read_topic, unique_name

FEATURES = ["a", "b", "c"]


def trainer(
    tmp_path, task: str = "regression", model: dict | None = None, data: dict | None = None, settings: dict | None = None, **publish
) -> Trainer:
    """A trainer fed without Kafka that publishes into ``tmp_path / "repo"`` (``settings``: more of ``trainer.*``)."""
    raw = {
        "kafka": {"topics": ["events"]},
        "data": {"format": "json", "features": FEATURES, "label": "y", **(data or {})},
        "model": model or {"name": "mlp", "params": {"hidden": [8]}},
        "trainer": {"task": task, "lr": 0.01, **({"num_classes": 3} if task == "multiclass" else {}), **(settings or {})},
        "snapshot": {"dir": str(tmp_path / "snaps"), "keep": 10},
        "publish": {"dir": str(tmp_path / "repo"), "name": "m", **publish},
    }
    t = Trainer(config_from_dict(raw), Metrics())
    t.setup(stream=False)
    return t


def train(t: Trainer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed + t.step_count)
    for _ in range(steps):
        x = torch.randn(64, 3, generator=g) * torch.tensor([10.0, 0.1, 3.0]) + torch.tensor([100.0, -5.0, 0.0])
        y = label(t.cfg.trainer.task, x)
        i = t.step_count
        pos = {("events", 0): ((i + 1) * 64, 0)}
        t.step(Batch(x, y, pos))
        t.trained.update(pos)


def label(task: str, x: torch.Tensor) -> torch.Tensor:
    if task == "binary":
        return (x[:, 0] > 100).float()
    if task == "multiclass":
        return (x[:, 2] > 0).float() + (x[:, 2] > 2).float()
    return x[:, 0] * 0.1 + x[:, 2]


def snapshot(t: Trainer) -> None:
    """A background snapshot, as the schedule takes one, and its publish."""
    t.snapshot()
    assert t.writer.wait(30) and t.publisher.wait(30)


def value(t: Trainer, sample: str) -> float:
    from tests.daemon_util import parse_metrics

    return parse_metrics(t.metrics.render().decode())[sample]


def test_each_durable_snapshot_becomes_a_version_and_the_newest_k_stay(tmp_path):
    t = trainer(tmp_path, keep=2)
    for _ in range(4):
        train(t, 10)
        snapshot(t)
    versions = list_versions(tmp_path / "repo", "m")
    assert [v.version for v in versions] == [40, 30], "version = the snapshot's step; the newest publish.keep stay"
    manifest = verify(versions[0].path)  # sizes and sha256 match
    assert set(manifest["files"]) == {"model.pt", "model.pt.json", "model.pt2", "model.pt2.json"}
    assert (
        manifest["step"] == 40
        and manifest["samples"] == 40 * 64
        and manifest["positions"] == [{"topic": "events", "partition": 0, "offset": 40 * 64, "rows": 0}]
    )
    assert manifest["prequential"] == t.learner.prequential.summary("regression")
    spec = json.loads((versions[0].path / "model.pt.json").read_text())
    assert spec["inputs"]["features"] == FEATURES and spec["snapshot"]["step"] == 40
    weights = torch.load(versions[0].path / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in t.model.state_dict().items())
    assert sorted(os.listdir(tmp_path / "repo" / "m")) == ["30", "40"], "no temporary directory is left"
    assert value(t, "streamtrain_models_published_total") == 4 and value(t, "streamtrain_published_model_version") == 40
    assert value(t, 'streamtrain_publish_failures_total{stage="write"}') == 0
    t.close()


def test_the_champion_is_published_as_built_and_the_other_candidates_beside_it(tmp_path):
    """With candidates, the version under publish.name is the champion's model built with its own overrides (a candidate
    of another width, promoted, is exported at its width); with publish.candidates each other candidate is published
    from the same snapshot as <name>.<candidate>, its program predicting as its learner does."""
    cands = [{"model.params.hidden": [16]}, {"trainer.lr": 0.05}]
    t = trainer(tmp_path, settings={"candidates": cands}, candidates=True)
    train(t, 10)
    t.learner._promote("hidden=[16]", "better", 0.05)  # as the race does when it wins
    train(t, 5)
    snapshot(t)
    repo = tmp_path / "repo"
    assert sorted(p.name for p in repo.iterdir()) == ["m", "m.default", "m.lr_0.05"]
    x = torch.randn(32, 3) * torch.tensor([10.0, 0.1, 3.0]) + torch.tensor([100.0, -5.0, 0.0])
    for name, candidate in (("m", "hidden=[16]"), ("m.default", "default"), ("m.lr_0.05", "lr=0.05")):
        (version,) = list_versions(repo, name)
        assert version.version == 15
        learner = t.learner.learners[candidate]
        weights = torch.load(version.path / "model.pt", weights_only=True)
        assert all(torch.equal(weights[k], v) for k, v in learner.model.state_dict().items()), name
        program = torch.export.load(version.path / "model.pt2").module()
        with torch.no_grad():
            want = learner.model(learner.normalizer.inputs(x)).reshape(-1) * learner.target.std + learner.target.shift
            assert torch.allclose(program(x).reshape(-1), want, rtol=1e-5, atol=1e-4), name
    assert weights["net.0.weight"].shape[0] == 8 and torch.load(repo / "m" / "15" / "model.pt")["net.0.weight"].shape[0] == 16
    assert value(t, "streamtrain_published_model_version") == 15 and value(t, "streamtrain_models_published_total") == 3
    t.close()


def test_every_nth_snapshot_the_final_one_always_and_a_step_once(tmp_path):
    t = trainer(tmp_path, every_snapshots=2, program=False)
    for _ in range(3):
        train(t, 5)
        snapshot(t)
    assert [v.version for v in list_versions(tmp_path / "repo", "m")] == [10]
    assert "model.pt2" not in verify(tmp_path / "repo" / "m" / "10")["files"], "publish.program: false"
    train(t, 2)
    t.close()  # the final snapshot (step 17) is published whatever its turn
    assert [v.version for v in list_versions(tmp_path / "repo", "m")] == [17, 10]

    again = trainer(tmp_path, every_snapshots=1)  # restarts from step 17: the same step is not published twice
    info, state = again.store.load_latest()
    assert info.step == 17 and again.publisher.publish(info, state) is None
    assert value(again, 'streamtrain_publish_skipped_total{reason="not_newer"}') == 1
    assert value(again, "streamtrain_published_model_version") == 17, "the newest version found at start"
    again.close()


def test_a_failed_publish_is_counted_and_training_goes_on(tmp_path):
    (tmp_path / "repo").write_text("a file where the repository should be")
    t = trainer(tmp_path)
    train(t, 10)
    snapshot(t)
    assert value(t, 'streamtrain_publish_failures_total{stage="write"}') == 1
    assert value(t, "streamtrain_snapshots_total") == 1, "the snapshot itself is durable"
    train(t, 10)  # and training goes on
    assert t.step_count == 20
    t.close()


def test_readers_skip_debris_and_directories_without_a_manifest(tmp_path):
    root = tmp_path / "repo"
    write_version(root, "m", 5, lambda d: (d / "model.pt").write_bytes(b"x"))
    (root / "m" / "7").mkdir()  # a copy in progress, or a crashed writer that did not rename
    (root / "m" / "7" / "model.pt").write_bytes(b"half")
    (root / "m" / ".tmp-9-999999999").mkdir()  # an interrupted publish of a process that is gone
    (root / "m" / "not-a-version").mkdir()
    assert [v.version for v in list_versions(root, "m")] == [5]
    assert cleanup_debris(root, "m") == [".tmp-9-999999999"]
    assert sorted(os.listdir(root / "m")) == ["5", "7", "not-a-version"]
    (root / "m" / "5" / "model.pt").write_bytes(b"y")  # same size, other bytes
    with pytest.raises(Exception, match=r"sha256 mismatch for model\.pt"):
        verify(root / "m" / "5")
    (root / "m" / "5" / MANIFEST_FILE).write_text("{")
    with pytest.raises(Exception, match=r"MANIFEST\.json unreadable"):
        verify(root / "m" / "5")


def test_config_checks_the_publish_section():
    base = {"kafka": {"topics": ["events"]}, "data": {"features": FEATURES}}
    with pytest.raises(Exception) as err:
        config_from_dict({**base, "publish": {"name": "../x", "keep": 0, "topic": "events", "every_snapshots": 0}})
    text = str(err.value)
    for line in (
        "publish.name: must be letters",
        "publish.keep: must be > 0",
        "publish.every_snapshots: must be > 0",
        "publish.topic: needs publish.dir",
        "publish.topic: must not be one of kafka.topics",
    ):
        assert line in text
    assert config_from_dict(base).publish.dir is None, "off by default"


@pytest.mark.integration
def test_each_version_is_announced_on_the_publish_topic(tmp_path, bootstrap):
    topic = unique_name("st-published")
    t = Trainer(
        config_from_dict(
            {
                "kafka": {"topics": ["events"], "bootstrap_servers": bootstrap},
                "data": {"format": "json", "features": FEATURES, "label": "y"},
                "model": {"name": "linear"},
                "trainer": {"task": "regression"},
                "snapshot": {"dir": str(tmp_path / "snaps")},
                "publish": {"dir": str(tmp_path / "repo"), "name": "m", "topic": topic},
            }
        ),
        Metrics(),
    )
    t.setup(stream=False)
    for _ in range(2):
        train(t, 10)
        snapshot(t)
    t.close()
    records = read_topic(bootstrap, topic, 2, timeout=30)
    assert [r.key() for r in records] == [b"m", b"m"], "key = the model's name (a compacted topic keeps the newest)"
    values = [json.loads(r.value()) for r in records]
    assert [v["version"] for v in values] == [10, 20]
    newest = values[-1]
    manifest = verify(tmp_path / "repo" / "m" / "20")
    assert newest["path"] == "m/20" and newest["dir"] == str((tmp_path / "repo" / "m" / "20").resolve())
    assert newest["sha256"] == manifest["files"]["model.pt"]["sha256"]
    assert newest["step"] == 20 and newest["positions"] == [{"topic": "events", "partition": 0, "offset": 20 * 64, "rows": 0}]
    assert newest["prequential"]["samples"] == 20 * 64
    assert value(t, 'streamtrain_publish_failures_total{stage="topic"}') == 0
