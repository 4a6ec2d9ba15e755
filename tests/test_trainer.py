"""The trainer's step without Kafka: losses and metrics per task, AMP, clipping, non-finite skips,
schedules, online standardization, warm start, snapshot round trips.  CUDA tests skip without CUDA."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamtrain.config.schema import config_from_dict
from streamtrain.daemon.errors import ConfigError, TrainingError
from streamtrain.daemon.metrics import Metrics
from streamtrain.daemon.normalizer import RunningStandardizer
from streamtrain.daemon.step import pick_amp
from streamtrain.daemon.trainer import Trainer
from streamtrain.models.registry import build_model
from streamtrain.streams.ring import Batch

WIDTH = 4


def make_trainer(tmp_path, stream=False, **sections) -> Trainer:
    raw = {
        "kafka": {"topics": ["t"]},
        "data": {"format": "raw", "num_features": WIDTH},
        "model": {"name": "linear"},
        "trainer": {"lr": 0.05, "optimizer": "sgd"},
        "snapshot": {"dir": str(tmp_path / "snaps")},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    t = Trainer(config_from_dict(raw), Metrics())
    t.setup(stream=stream)
    return t


def batch(x, y, positions=None) -> Batch:
    return Batch(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32), positions or {})


def linear_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, WIDTH, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def test_regression_learns_and_reports_prequential_mae(tmp_path):
    t = make_trainer(tmp_path)
    first = last = None
    for i in range(200):
        r = t.step(batch(*linear_data(seed=i)))
        first = first or r
        last = r
    assert last.loss < 0.05 * first.loss
    assert last.metric < first.metric  # MAE on the batch before its update
    assert t.step_count == 200 and t.samples == 200 * 256
    t.close()


@pytest.mark.parametrize(("task", "model", "extra"), [("binary", "logistic", {}), ("multiclass", "logistic", {"num_classes": 3})])
def test_classification_tasks_learn_with_accuracy(tmp_path, task, model, extra):
    params = {"num_classes": extra.get("num_classes", 2)}
    t = make_trainer(tmp_path, model={"name": model, "params": params}, trainer={"task": task, "optimizer": "adam", **extra})
    accs = []
    for i in range(150):
        x, _ = linear_data(seed=i)
        y = (x[:, 0] > 0).float() + (x[:, 0] > 1).float() * (task == "multiclass")  # linearly separable
        accs.append(t.step(batch(x, y)).metric)
    assert sum(accs[-10:]) / 10 > 0.9 > sum(accs[:3]) / 3
    t.close()


def test_model_must_take_the_data_width(tmp_path):
    with pytest.raises(ConfigError, match="cannot take a batch of 4 features"):
        make_trainer(tmp_path, model={"name": "linear", "params": {"in_features": 7}})


def test_output_size_must_fit_the_task(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.params\.num_classes: the model gives outputs of shape \(2, 3\)"):
        make_trainer(tmp_path, model={"name": "logistic", "params": {"num_classes": 3}}, trainer={"task": "binary"})


class _Poisonable(nn.Module):
    """A linear model whose output or gradient can be made non-finite on demand."""

    def __init__(self, in_features: int = WIDTH) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, 1)
        self.poison_output = False
        self.poison_grad = False

    def forward(self, x):
        out = self.lin(x)
        if self.poison_output:
            out = out * math.nan
        if self.poison_grad:
            out.register_hook(lambda g: g * math.inf)
        return out


def test_non_finite_loss_or_gradient_skips_with_weights_bit_identical(tmp_path):
    t = make_trainer(tmp_path, model={"name": "tests.test_trainer:_Poisonable"}, trainer={"optimizer": "adam"})
    x, y = linear_data()
    t.step(batch(x, y))  # optimizer state exists now
    before, opt_before, norm_before = weights(t), t.learner.optimizer.state_dict(), t.learner.normalizer.state_dict()
    for attr, reason in (("poison_output", "loss_nonfinite"), ("poison_grad", "grad_nonfinite")):
        setattr(t.model, attr, True)
        r = t.step(batch(x, y))
        setattr(t.model, attr, False)
        assert r.skipped == reason
        for k, v in weights(t).items():
            assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
        assert torch.equal(t.learner.normalizer.state_dict()["mean"], norm_before["mean"])
        assert t.learner.optimizer.state_dict()["state"][0]["step"] == opt_before["state"][0]["step"]
        assert t.metrics.steps_skipped.labels(reason)._value.get() == 1
    assert t.step_count == 1
    assert not t.step(batch(x, y)).skipped and t.consecutive_nonfinite == 0
    t.close()


def plain_torch_steps(model_name, params, opt, batches, poisoned, clip):
    """The step as a plain torch loop (regression, standardized features and label): what the learner must match bit for bit."""
    torch.manual_seed(0)  # trainer.seed, before the model is built
    model = build_model(model_name, params, WIDTH)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=1e-2) if opt == "adam" else torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.0)
    features, label = RunningStandardizer(WIDTH), RunningStandardizer(1)
    for i, (x, y) in enumerate(batches):
        if poisoned:
            model.poison_output, model.poison_grad = poisoned.get(i) == "output", poisoned.get(i) == "grad"
        features.update(x)
        out = model(features.transform(x)).reshape(-1)
        label.update(y[:, None])
        loss = F.mse_loss(out, (y - label.shift) * label.scale)
        if math.isfinite(loss.item()):
            loss.backward()
            if math.isfinite(torch.nn.utils.clip_grad_norm_(trained, clip).item()):
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


@pytest.mark.parametrize(
    ("model", "opt", "clip"),
    [({"name": "tests.test_trainer:_Poisonable"}, "adam", 0.0), ({"name": "mlp", "params": {"hidden": [16, 8]}}, "adamw", 1.0)],
)
def test_steps_give_the_weights_of_a_plain_torch_loop(tmp_path, model, opt, clip):
    """The learner's step (one device read per step, the update decided from it) changes nothing a plain loop would not."""
    trainer = {"optimizer": opt, "lr": 1e-2, "grad_clip_norm": clip, "num_threads": 1}
    t = make_trainer(tmp_path, model=model, trainer=trainer, drift={"detector": "off"})
    batches = [linear_data(n=32, seed=i) for i in range(30)]
    batches = [(x * (1 + i % 5), y) for i, (x, y) in enumerate(batches)]
    poisoned = {4: "output", 9: "grad"} if "Poisonable" in model["name"] else {}  # steps skipped, weights untouched
    skipped = []
    for i, (x, y) in enumerate(batches):
        if poisoned.get(i):
            setattr(t.model, f"poison_{poisoned[i]}", True)
        skipped.append(t.step(batch(x, y)).skipped)
        if poisoned.get(i):
            t.model.poison_output = t.model.poison_grad = False
    ref_model, ref_opt = plain_torch_steps(model["name"], dict(model.get("params", {})), opt, batches, poisoned, clip or math.inf)
    assert [i for i, why in enumerate(skipped) if why] == sorted(poisoned)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(t.model.state_dict()[k], v), k
    for a, b in zip(t.learner.optimizer.state_dict()["state"].values(), ref_opt.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    t.close()


def test_repeated_non_finite_steps_roll_back_to_the_last_snapshot(tmp_path):
    t = make_trainer(tmp_path, model={"name": "tests.test_trainer:_Poisonable"}, trainer={"max_consecutive_nonfinite": 3})
    x, y = linear_data()
    t.step(batch(x, y))
    good = t.snapshot(final=True)
    snap_weights = weights(t)
    for _ in range(5):
        t.step(batch(x, y))  # the weights move on after the snapshot
    t.model.poison_output = True
    for _ in range(3):
        t.step(batch(x, y))
    assert t.metrics.rollbacks._value.get() == 1
    for k, v in weights(t).items():
        assert torch.equal(v, snap_weights[k])
    assert t.step_count == good.step
    t.close()


def test_rollback_without_a_snapshot_stops_with_advice(tmp_path):
    t = make_trainer(tmp_path, model={"name": "tests.test_trainer:_Poisonable"}, trainer={"max_consecutive_nonfinite": 2})
    t.model.poison_output = True
    x, y = linear_data()
    t.step(batch(x, y))
    with pytest.raises(TrainingError, match="no snapshot to roll back to"):
        t.step(batch(x, y))
    t.close()


def test_gradient_clipping_bounds_the_update(tmp_path):
    t = make_trainer(tmp_path, trainer={"grad_clip_norm": 0.01, "lr": 1.0, "standardize": False})
    before = weights(t)
    x, y = linear_data()
    r = t.step(batch(x, y * 100))
    assert r.grad_norm > 0.01  # reported before clipping
    delta = torch.sqrt(sum(((weights(t)[k] - before[k]) ** 2).sum() for k in before))
    assert delta <= 0.01 * 1.0 + 1e-6  # lr * clipped norm
    t.close()


@pytest.mark.parametrize(("name", "extra"), [("step", {"step_size": 10, "gamma": 0.5}), ("cosine", {"t_max": 20, "eta_min": 0.0})])
def test_lr_schedules(tmp_path, name, extra):
    t = make_trainer(tmp_path, trainer={"lr": 0.1, "schedule": {"name": name, **extra}})
    for i in range(20):
        t.step(batch(*linear_data(seed=i)))
    lr = t.learner.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(0.025 if name == "step" else 0.0, abs=1e-9)
    t.close()


def test_plateau_schedule_on_prequential_loss(tmp_path):
    t = make_trainer(tmp_path, trainer={"lr": 0.1, "schedule": {"name": "plateau", "window": 2, "patience": 0, "factor": 0.5}})
    for i in range(20):
        x, _ = linear_data(seed=i)
        t.step(batch(x, torch.randn(256)))  # fresh noise: nothing to learn, the loss does not improve
    assert t.learner.optimizer.param_groups[0]["lr"] < 0.1
    t.close()


def test_bf16_autocast_on_cpu(tmp_path):
    t = make_trainer(tmp_path, trainer={"amp": "bf16", "device": "cpu"}, model={"name": "mlp", "params": {"hidden": [8]}})
    assert t.learner.amp_dtype == torch.bfloat16 and not t.learner.scaler.is_enabled()
    for i in range(50):
        r = t.step(batch(*linear_data(seed=i)))
    assert math.isfinite(r.loss) and t.model.net[0].weight.dtype == torch.float32
    t.close()


@pytest.mark.parametrize(("native_bf16", "want"), [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_on_cuda_is_bf16_where_the_gpu_has_it(monkeypatch, native_bf16, want):
    """The choice alone (the GPU faked): bf16 without a loss scaler where native, else fp16 with one; the CPU gets none."""
    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext(asked.append(device)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 and not including_emulation)
    assert pick_amp("auto", torch.device("cuda:1")) == want and asked == [torch.device("cuda:1")]
    assert pick_amp("auto", torch.device("cpu")) is None
    assert pick_amp("fp16", torch.device("cuda")) == torch.float16 and pick_amp("bf16", torch.device("cuda")) == torch.bfloat16


def test_standardization_uses_statistics_from_before_the_batch():
    s = RunningStandardizer(2)
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    assert torch.equal(s.transform(x), x)  # nothing seen yet: identity
    s.update(x)
    x2 = torch.tensor([[2.0, 20.0]])
    assert torch.allclose(s.transform(x2), torch.zeros(1, 2), atol=1e-3)  # mean of the first batch
    s.update(torch.tensor([[5.0, 50.0], [7.0, 70.0]]))
    assert torch.allclose(s.mean, torch.tensor([4.0, 40.0], dtype=torch.float64))
    assert torch.allclose(s.m2 / s.count, torch.tensor([5.0, 500.0], dtype=torch.float64))
    restored = RunningStandardizer(2)
    restored.load_state_dict(s.state_dict())
    assert torch.equal(restored.transform(x2), s.transform(x2))


def test_snapshot_restores_everything(tmp_path):
    t = make_trainer(tmp_path, trainer={"optimizer": "adamw", "schedule": {"name": "cosine", "t_max": 100}})
    for i in range(10):
        t.step(batch(*linear_data(seed=i), positions={("t", 0): (100 * (i + 1), 0)}))
        t.trained.update({("t", 0): (100 * (i + 1), 0)})
    t.snapshot(final=True)
    probe = batch(*linear_data(seed=99))
    t.close()
    t2 = make_trainer(tmp_path, trainer={"optimizer": "adamw", "schedule": {"name": "cosine", "t_max": 100}})
    assert t2.step_count == 10 and t2.trained == {("t", 0): (1000, 0)}
    assert torch.equal(t2.learner.normalizer.mean, t.learner.normalizer.mean)
    assert t2.learner.optimizer.param_groups[0]["lr"] == t.learner.optimizer.param_groups[0]["lr"]
    r1, r2 = t.step(probe), t2.step(probe)
    assert r1.loss == r2.loss  # same state, same prequential loss
    t2.close()


def test_warm_start_freeze_and_bad_patterns(tmp_path):
    src = nn.Linear(WIDTH, 1)
    torch.save({f"linear.{k}": v for k, v in src.state_dict().items()}, tmp_path / "w.pt")
    t = make_trainer(tmp_path, model={"name": "linear", "init_weights": str(tmp_path / "w.pt"), "freeze": ["linear.bias"]})
    assert torch.equal(t.model.linear.weight, src.weight) and not t.model.linear.bias.requires_grad
    t.close()
    with pytest.raises(ConfigError, match=r"model.freeze\[0\]: 'nope.\*' matches no parameter"):
        make_trainer(tmp_path / "b", model={"name": "linear", "freeze": ["nope.*"]})
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        make_trainer(tmp_path / "c", model={"name": "linear", "freeze": ["*"]})


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_fp16_amp_with_grad_scaler(tmp_path):
    t = make_trainer(tmp_path, trainer={"device": "cuda", "amp": "fp16"}, model={"name": "mlp", "params": {"hidden": [64]}})
    assert t.learner.amp_dtype == torch.float16 and t.learner.scaler.is_enabled()
    first = None
    for i in range(300):
        x, y = linear_data(seed=i)
        r = t.step(batch(x.pin_memory(), y.pin_memory()))
        first = first or r
    assert r.loss < 0.1 * first.loss
    t.snapshot(final=True)
    t.close()
    t2 = make_trainer(tmp_path, trainer={"device": "cuda", "amp": "fp16"}, model={"name": "mlp", "params": {"hidden": [64]}})
    assert t2.learner.scaler.get_scale() == t.learner.scaler.get_scale()
    t2.close()


bf16_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0), reason="needs bf16 on the GPU")


@pytest.mark.gpu
@bf16_gpu
def test_cuda_amp_auto_is_bf16_without_a_loss_scaler(tmp_path):
    mlp = {"name": "mlp", "params": {"hidden": [64]}}
    t = make_trainer(tmp_path, trainer={"device": "cuda", "amp": "auto"}, model=mlp)
    assert t.learner.amp_dtype == torch.bfloat16 and not t.learner.scaler.is_enabled()
    first = None
    for i in range(300):
        x, y = linear_data(seed=i)
        r = t.step(batch(x.pin_memory(), y.pin_memory()))
        first = first or r
    assert r.loss < 0.1 * first.loss and t.learner.step_count == 300  # no step lost to a loss-scale overflow
    t.snapshot(final=True)
    t.close()
    t2 = make_trainer(tmp_path, trainer={"device": "cuda", "amp": "fp16"}, model=mlp)  # the snapshot has no scaler: a fresh one
    assert t2.step_count == 300 and t2.learner.scaler.is_enabled()
    t2.close()


def device_syncs(fn) -> int:
    """How many times the host waits for the device while ``fn`` runs (torch's sync debug mode warns at each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("amp", ["off", "fp16", "bf16"])
@pytest.mark.parametrize("opt", [{"optimizer": "adamw", "grad_clip_norm": 1.0}, {"optimizer": "sgd", "momentum": 0.9, "grad_clip_norm": 0}])
def test_cuda_a_step_waits_for_the_device_once(tmp_path, amp, opt):
    """Steady state, and again after a restart from a snapshot: one read of the step's statistics per step, nothing else."""
    if amp == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs bf16 on the GPU")
    sections = {"trainer": {"device": "cuda", "amp": amp, **opt}, "model": {"name": "mlp", "params": {"hidden": [64]}}}
    data = [linear_data(seed=i) for i in range(8)]
    batches = [batch(x.pin_memory(), y.pin_memory(), {("t", 0): (i + 1, 0)}) for i, (x, y) in enumerate(data)]

    def steps(t: Trainer, n: int) -> None:
        for b in batches[:n]:
            t.step(b)
            t.trained.update(b.positions)

    t = make_trainer(tmp_path, **sections)
    steps(t, 3)  # warm up: optimizer state, the loss scale, cuBLAS handles
    assert device_syncs(lambda: steps(t, 5)) == 5
    t.snapshot(final=True)
    t.close()
    t2 = make_trainer(tmp_path, **sections)
    assert t2.step_count == 8
    steps(t2, 2)
    assert device_syncs(lambda: steps(t2, 5)) == 5  # the restored optimizer state adds none
    t2.close()


@pytest.mark.gpu
@cuda
def test_cuda_ring_slots_are_pinned():
    from streamtrain.streams.ring import Ring

    r = Ring(2, 8, 4, pin_memory=True)
    assert r.x.is_pinned() and r.y.is_pinned()


def test_a_snapshot_of_another_model_is_a_config_error(tmp_path):
    t = make_trainer(tmp_path)
    t.step(batch(*linear_data()))
    t.snapshot(final=True)
    t.close()
    with pytest.raises(ConfigError, match=r"model: snapshot snap-\S+ .* was trained with another model \(linear"):
        make_trainer(tmp_path, model={"name": "mlp", "params": {"hidden": [4]}})


def test_a_snapshot_request_during_a_write_waits_for_it(tmp_path):
    """SIGUSR1 while a write is in flight used to be dropped: the request was cleared unserved."""
    import time

    t = make_trainer(tmp_path, snapshot={"every_seconds": 0})
    for i in range(3):
        t.step(batch(*linear_data(seed=i)))
    t.snapshot_requested.set()
    busy = t.writer.busy
    t.writer.busy = lambda: True  # a write in flight
    t.snapshot_if_due(time.monotonic())
    assert t.snapshot_requested.is_set(), "the request is kept while the writer is busy"
    t.writer.busy = busy
    t.snapshot_if_due(time.monotonic())
    assert not t.snapshot_requested.is_set()
    t.writer.wait()
    assert [i.step for i in t.store.list()] == [3]
    t.close()
