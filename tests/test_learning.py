"""How the trainer learns, without Kafka: the standardizer on hostile features, label standardization,
the cumulative prequential totals, and the drift response.  (Against River: ``bench.learning``.)"""

from __future__ import annotations

import math

import pytest
import torch

from streamtrain.config.schema import config_from_dict
from streamtrain.daemon.drift_response import DriftMonitor
from streamtrain.daemon.metrics import Metrics
from streamtrain.daemon.normalizer import RunningStandardizer
from streamtrain.daemon.trainer import Trainer
from streamtrain.streams.ring import Batch


def make_trainer(tmp_path, width=3, **sections) -> Trainer:
    raw = {
        "kafka": {"topics": ["t"]},
        "data": {"format": "raw", "num_features": width},
        "model": {"name": "linear"},
        "ring": {"batch_size": 1},
        "snapshot": {"dir": str(tmp_path / "snaps")},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    t = Trainer(config_from_dict(raw), Metrics())
    t.setup(stream=False)
    return t


def batch(x, y) -> Batch:
    return Batch(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32), {})


# ---------------------------------------------------------------------------- the standardizer
def test_zero_variance_maps_to_zero_not_infinity():
    s = RunningStandardizer(2)
    for _ in range(50):
        s.update(torch.tensor([[3.0, -7.5]]))
    out = s.transform(torch.tensor([[3.0, -7.5]]))
    assert torch.equal(out, torch.zeros(1, 2))
    assert torch.equal(s.scale, torch.ones(2))  # centred only


def test_a_feature_constant_then_changing_stays_bounded():
    """1,000 rows of a constant, then a new value: its standardized value is bounded by sqrt(n), not 1/sqrt(eps)."""
    s = RunningStandardizer(1)
    for _ in range(1000):
        s.update(torch.tensor([[1.0]]))
    x = torch.tensor([[2.0]])
    s.update(x)  # the trainer folds a batch in before it standardizes it
    z = float(s.transform(x))
    assert 0 < z <= math.sqrt(1001)
    assert z == pytest.approx(math.sqrt(1000), rel=1e-3)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 7.4e5, 1.7e9])
def test_features_of_any_scale_come_out_standardized(scale):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    x = (scale + base * scale * 1e-2).to(torch.float32)  # a large offset, a small spread: a timestamp, a price
    s = RunningStandardizer(1)
    for i in range(0, 4000, 100):
        s.update(x[i : i + 100])
    z = s.transform(x)
    assert torch.isfinite(z).all()
    assert abs(float(z.mean())) < 0.05 and float(z.std()) == pytest.approx(1.0, rel=0.05)


def test_state_round_trip_standardizes_the_same():
    a = RunningStandardizer(3)
    a.update(torch.randn(64, 3) * 100 + 5)
    b = RunningStandardizer(3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 3)
    assert torch.equal(a.transform(x), b.transform(x))


def test_a_skipped_step_still_updates_the_standardizer(tmp_path):
    t = make_trainer(tmp_path)
    r = t.step(batch([[1.0, 2.0, 3.0]], [math.nan]))  # a NaN label: the loss is non-finite, the step skipped
    assert r.skipped == "loss_nonfinite"
    assert int(t.learner.normalizer.count) == 1 and t.step_count == 0 and t.learner.prequential.samples == 0
    t.close()


def test_a_date_ordinal_first_batch_trains_with_sgd_and_no_clipping(tmp_path):
    """The issue's crash: a first feature of ~7.4e5 with plain SGD used to overflow on the first batch, forever."""
    t = make_trainer(tmp_path, trainer={"optimizer": "sgd", "lr": 0.01, "grad_clip_norm": 0})
    for i in range(300):
        r = t.step(batch([[736389.0 + i, 43.0 + 0.01 * i, 1.0]], [44.0 + 0.01 * i]))
        assert r.skipped is None
    assert t.learner.prequential.summary("regression")["mae"] < 1.0
    t.close()


# ---------------------------------------------------------------------------- label standardization
def test_regression_on_a_1e5_label_scale_learns_at_the_same_pace(tmp_path):
    """The same stream in units and in 1e5 units: the same relative error (the label is standardized)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 3.0
    maes = []
    for k, scale in enumerate((1.0, 1e5)):
        t = make_trainer(tmp_path / str(k))
        for i in range(2000):
            t.step(batch(x[i : i + 1], y[i : i + 1] * scale))
        maes.append(t.learner.prequential.summary("regression")["mae"] / scale)
        t.close()
    assert maes[1] == pytest.approx(maes[0], rel=1e-3)
    assert maes[0] < 0.2


def test_the_prequential_prediction_uses_only_earlier_labels(tmp_path):
    t = make_trainer(tmp_path, trainer={"lr": 1e-9})  # barely learns: the prediction is the running label mean
    for v in (10.0, 20.0):
        t.step(batch([[0.0, 0.0, 0.0]], [v]))
    r = t.step(batch([[0.0, 0.0, 0.0]], [90.0]))
    assert r.metric == pytest.approx(90.0 - 15.0, rel=1e-4)  # predicted the mean of 10 and 20, not of all three
    t.close()


# ---------------------------------------------------------------------------- cumulative totals
def test_cumulative_totals_match_the_steps_and_survive_a_snapshot(tmp_path):
    t = make_trainer(tmp_path, data={"num_features": 2}, model={"name": "logistic"}, trainer={"task": "binary"})
    hits = 0
    loss = 0.0
    for i in range(200):
        x = [[float(i % 3), float(i % 5)]]
        r = t.step(batch(x, [float(i % 2)]))
        hits += round(r.metric)
        loss += r.loss
    assert t.learner.prequential.samples == 200 and t.learner.prequential.correct == hits
    assert t.learner.prequential.loss == pytest.approx(loss)
    t.snapshot(final=True)
    t.close()
    u = make_trainer(tmp_path, data={"num_features": 2}, model={"name": "logistic"}, trainer={"task": "binary"})
    assert u.learner.prequential.samples == 200 and u.learner.prequential.correct == hits
    totals = u.learning_totals()
    assert totals.samples == 200 and totals.correct == hits
    u.close()


# ---------------------------------------------------------------------------- drift
def drift_cfg(**kw):
    return config_from_dict({"kafka": {"topics": ["t"]}, "data": {"format": "raw", "num_features": 1}, "drift": kw}).drift


def feed(monitor: DriftMonitor, opt, values) -> list[int]:
    return [i for i, v in enumerate(values) if monitor.observe(v, 1, opt)]


def errors(n_before: int, n_after: int, p0: float, p1: float, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n_before + n_after, generator=g)
    p = torch.tensor([p0] * n_before + [p1] * n_after)
    return (u < p).float().tolist()


def test_a_rise_in_error_is_one_drift_and_a_fall_is_none():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    m = DriftMonitor(drift_cfg(action="log"))
    found = feed(m, opt, errors(3000, 3000, 0.1, 0.5))
    assert len(found) == 1 and 3000 < found[0] < 3400  # ADWIN cuts in steps: the cooldown makes it one drift
    m = DriftMonitor(drift_cfg(action="log"))
    assert feed(m, opt, errors(3000, 3000, 0.5, 0.1)) == []  # learning, not drift


def test_lr_boost_raises_then_fades_back_to_the_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    m = DriftMonitor(drift_cfg(action="lr_boost", lr_boost_factor=5.0, lr_boost_samples=100))
    found = feed(m, opt, errors(3000, 400, 0.1, 0.6))
    assert found
    m.boost_left = 100  # right at the drift
    saved = m.boost(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    m.unboost(opt, saved)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    m.boost_left = 50
    saved = m.boost(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3)  # half-way: 1 + 4 * 0.5
    m.unboost(opt, saved)
    m.boost_left = 0
    assert m.boost(opt) is None


def test_reset_optimizer_forgets_the_moments():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=0.01)
    p.grad = torch.ones(2)
    opt.step()
    assert opt.state
    m = DriftMonitor(drift_cfg(action="reset_optimizer"))
    assert feed(m, opt, errors(3000, 600, 0.1, 0.7))
    assert not opt.state


def test_drift_state_in_the_snapshot_decides_the_same_after_a_restart(tmp_path):
    """Train up to just before a drift, snapshot, restart: the restored daemon detects the drift where the first one does."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, 1, generator=g)
    y = torch.where(torch.arange(5000) < 3000, (x[:, 0] > 0).float(), (x[:, 0] < 0).float())  # the concept flips at 3,000
    kw = {"data": {"num_features": 1}, "model": {"name": "logistic"}, "trainer": {"task": "binary"}}

    def run(t: Trainer, start: int, stop: int) -> list[int]:
        seen = []
        for i in range(start, stop):
            before = t.learner.drift.drifts
            t.step(batch(x[i : i + 1], y[i : i + 1]))
            if t.learner.drift.drifts > before:
                seen.append(i)
        return seen

    a = make_trainer(tmp_path / "a", **kw)
    whole = run(a, 0, 5000)
    a.close()
    b = make_trainer(tmp_path / "b", **kw)
    first = run(b, 0, 2900)
    b.snapshot(final=True)
    b.close()
    c = make_trainer(tmp_path / "b", **kw)
    assert c.learner.drift.samples == 2900
    rest = run(c, 2900, 5000)
    c.close()
    assert whole and first + rest == whole


# ---------------------------------------------------------------------------- TensorBoard
def test_tensorboard_gets_loss_curves_and_drifts(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    t = make_trainer(
        tmp_path,
        data={"num_features": 1},
        model={"name": "logistic"},
        trainer={"task": "binary"},
        logging={"tensorboard_dir": str(logdir), "tensorboard_every_steps": 10},
    )
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4000, 1, generator=g)
    y = torch.where(torch.arange(4000) < 2500, (x[:, 0] > 0).float(), (x[:, 0] < 0).float())
    for i in range(4000):
        t.step(batch(x[i : i + 1], y[i : i + 1]))
    t.close()
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/prequential", "loss/ewma", "accuracy/ewma", "accuracy/cumulative", "ece/cumulative", "learning_rate", "grad_norm"} <= tags
    assert len(acc.Scalars("loss/prequential")) == 400
    assert "drift/detected" in tags and acc.Scalars("drift/detected")[0].value == 1


def test_tensorboard_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    import builtins

    from streamtrain.daemon.errors import ConfigError

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"logging\.tensorboard_dir: writing TensorBoard logs needs the tensorboard package"):
        make_trainer(tmp_path, logging={"tensorboard_dir": str(tmp_path / "tb")})


def test_a_changed_drift_setting_is_not_overridden_by_the_snapshot(tmp_path):
    """The detector in a snapshot keeps its own parameters; a new drift.delta in the config must win."""
    kw = {"data": {"num_features": 1}, "model": {"name": "logistic"}, "trainer": {"task": "binary"}}
    a = make_trainer(tmp_path, **kw)
    for i in range(200):
        a.step(batch([[float(i % 7)]], [float(i % 2)]))
    a.snapshot(final=True)
    a.close()
    same = make_trainer(tmp_path, **kw)
    assert same.learner.drift.detector.width > 0, "unchanged settings: the window is restored"
    same.close()
    changed = make_trainer(tmp_path, drift={"delta": 0.05}, **kw)
    assert changed.learner.drift.detector.delta == 0.05 and changed.learner.drift.detector.width == 0
    assert changed.learner.drift.samples == 200  # the rest of the drift record continues
    changed.close()
