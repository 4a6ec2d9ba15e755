"""Calibration, prequential: the sums a step adds equal the measures computed sample by sample."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from streamtrain.config.schema import config_from_dict, config_to_dict
from streamtrain.daemon.calibration import BINS, WIDTH, Temperature, batch_sums, measures, temperature_sums, totals
from streamtrain.daemon.prequential import Prequential
from streamtrain.daemon.step import Learner
from streamtrain.streams.ring import Batch


def reference(task: str, logits: np.ndarray, y: np.ndarray) -> dict:
    """Brier, ECE, calibration ratio and normalized entropy, one sample at a time (the textbook definitions)."""
    n = len(y)
    if task == "binary":
        p = 1 / (1 + np.exp(-logits))
        conf, hit = p, y.astype(float)  # reliability diagram of P(positive)
        brier = float(np.mean((p - y) ** 2))
        loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    else:
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs = e / e.sum(1, keepdims=True)
        conf, hit = probs.max(1), (probs.argmax(1) == y).astype(float)  # top-label
        brier = float(np.mean(((probs - np.eye(logits.shape[1])[y]) ** 2).sum(1)))
        loss = float(-np.mean(np.log(probs[np.arange(n), y])))
    ece = 0.0
    for b in range(BINS):
        inside = (np.floor(conf * BINS).clip(0, BINS - 1)) == b
        if inside.any():
            ece += inside.mean() * abs(conf[inside].mean() - hit[inside].mean())
    out = {"brier": brier, "ece": ece}
    if task == "binary":
        rate = y.mean()
        out["calibration_ratio"] = float(p.mean() / rate)
        out["normalized_entropy"] = loss / float(-(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)))
    return out, loss


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_batch_sums_give_the_textbook_measures_and_add_over_batches(task):
    rng = np.random.default_rng(3)
    n = 3000
    logits = rng.normal(0, 2, (n,) if task == "binary" else (n, 4)).astype(np.float32)
    if task == "binary":
        y = (rng.random(n) < 1 / (1 + np.exp(-0.6 * logits))).astype(np.float32)  # overconfident logits
    else:
        y = rng.integers(0, 4, n)
    want, loss = reference(task, logits.astype(np.float64), y)
    p = Prequential()
    for i in range(0, n, 257):  # batches of uneven size add up to the whole
        out, yb = torch.from_numpy(logits[i : i + 257]), torch.from_numpy(y[i : i + 257]).float()
        p.add(len(yb), 0.0, calibration=batch_sums(out[:, None] if task == "binary" else out, yb, task).tolist())
    got = measures(task, loss, p.bins)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert totals(p.bins)[0] == n
    if task == "binary":
        assert got["ece"] > 0.05, "overconfident logits are measured as miscalibrated"


def test_calibrated_predictions_measure_as_calibrated():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 1.5, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    m = measures("binary", 0.5, batch_sums(torch.from_numpy(logits).float(), torch.from_numpy(y), "binary").tolist())
    assert m["ece"] < 0.02 and abs(m["calibration_ratio"] - 1) < 0.03


def test_measures_are_none_before_anything_or_without_both_classes():
    nothing = [0.0] * WIDTH
    assert measures("binary", math.nan, nothing) == {"brier": None, "ece": None, "calibration_ratio": None, "normalized_entropy": None}
    only_negatives = [0.0] * WIDTH
    only_negatives[0], only_negatives[BINS] = 10, 0.5  # 10 samples in the first bin, none positive
    m = measures("binary", 0.1, only_negatives)
    assert m["calibration_ratio"] is None and m["normalized_entropy"] is None and m["ece"] == pytest.approx(0.05)
    assert set(measures("multiclass", math.nan, nothing)) == {"brier", "ece"}


def learner(task: str, **trainer) -> Learner:
    raw = {
        "kafka": {"topics": ["t"]},
        "data": {"format": "json", "features": ["a", "b"], "label": "y"},
        "model": {"name": "logistic", "params": {"num_classes": 3} if task == "multiclass" else {}},
        "trainer": {"task": task, **({"num_classes": 3} if task == "multiclass" else {}), **trainer},
        "snapshot": {"dir": "/nonexistent"},
    }
    return Learner(config_from_dict(raw))


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_a_step_scores_the_prediction_made_before_it_learns(task):
    """The totals a step adds are those of the model's predictions before that step (as the loss is)."""
    lr = learner(task)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=g)
    y = (x[:, 0] > 0).float() if task == "binary" else (x[:, 0] > 0).float() + (x[:, 1] > 0).float()
    lr.step(Batch(x[:32], y[:32]))  # the standardizer and the weights move first
    ahead = copy.deepcopy(lr)
    ahead.normalizer.update(x[32:])  # what step() does first: the features are known before the prediction
    with torch.no_grad():
        want = batch_sums(ahead.model(ahead.normalizer.inputs(x[32:])), y[32:], task).tolist()
    before = copy.deepcopy(lr.prequential)
    lr.step(Batch(x[32:], y[32:]))
    after = lr.prequential
    assert totals(after.bins)[0] == totals(before.bins)[0] + 32 == 64
    assert [a - b for a, b in zip(after.bins, before.bins)] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_calibration_totals_survive_a_snapshot_and_an_older_snapshot_starts_them_at_zero():
    lr = learner("binary")
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x = torch.randn(16, 2, generator=g)
        lr.step(Batch(x, (x[:, 0] > 0).float()))
    state = lr.state_dict()
    again = learner("binary")
    again.load_state_dict(state, "test", "logistic")
    assert again.prequential == lr.prequential and totals(again.prequential.bins)[0] == 80
    old = {k: v for k, v in state["prequential"].items() if k != "bins"}
    older = Prequential()
    older.load_state_dict(old)
    assert older.samples == 80 and older.bins == [0.0] * WIDTH
    assert older.summary("binary")["ece"] is None and older.summary("binary")["accuracy"] is not None


def overconfident(task: str, n: int, true_beta: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z and labels drawn from softmax(true_beta * z) (sigmoid for binary): a model ``1 / true_beta`` times too sure."""
    g = torch.Generator().manual_seed(seed)
    if task == "binary":
        z = torch.randn(n, generator=g) * 4
        y = (torch.rand(n, generator=g) < torch.sigmoid(true_beta * z)).float()
        return z[:, None], y
    z = torch.randn(n, 3, generator=g) * 4
    y = torch.multinomial(torch.softmax(true_beta * z, 1), 1, generator=g)[:, 0].float()
    return z, y


@pytest.mark.parametrize("task", ["binary", "multiclass"])
@pytest.mark.parametrize("batch", [1, 64])
def test_the_temperature_fit_finds_how_overconfident_the_logits_are(task, batch):
    """Labels drawn from softmax(z / 3): the fitted inverse temperature goes to 1/3 whatever the batch size, and the log
    loss of the scaled logits is that of the true probabilities."""
    z, y = overconfident(task, 20_000, 1 / 3)
    t = Temperature(half_life=5000)
    for i in range(0, len(y), batch):
        g, h = temperature_sums(z[i : i + batch], y[i : i + batch], task, t.beta).tolist()
        t.update(g, h, len(y[i : i + batch]))
    assert t.beta == pytest.approx(1 / 3, abs=0.04), t.beta
    assert t.temperature == pytest.approx(3, rel=0.15)
    fresh = Temperature(half_life=5000)
    fresh.load_state_dict(t.state_dict())
    assert fresh.state_dict() == t.state_dict()


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_temperature_sums_are_the_derivatives_of_the_log_loss(task):
    """The gradient and curvature in beta, summed over the batch, against autograd's of the same log loss."""
    z, y = overconfident(task, 50, 0.5, seed=3)
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    zz = z.double()
    if task == "binary":
        loss = torch.nn.functional.binary_cross_entropy_with_logits(beta * zz[:, 0], y.double(), reduction="sum")
    else:
        loss = torch.nn.functional.cross_entropy(beta * zz, y.long(), reduction="sum")
    (grad,) = torch.autograd.grad(loss, beta, create_graph=True)
    (curv,) = torch.autograd.grad(grad, beta)
    got = temperature_sums(z, y, task, 0.7).tolist()
    assert got == pytest.approx([grad.item(), curv.item()], rel=1e-4)
    stacked = temperature_sums(torch.stack([z, 2 * z]), y, task, torch.tensor([0.7, 0.35]), stacked=True)
    assert stacked.reshape(-1).tolist() == pytest.approx([*got, 2 * got[0], 4 * got[1]], rel=1e-4), "2z at beta/2: the same loss"


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_a_fitted_temperature_is_what_the_step_scores_snapshots_and_serves(task, tmp_path):
    """With trainer.calibration: temperature the prequential loss and calibration sums are those of the scaled logits
    (the temperature fitted before the batch); the fit is in the snapshot, and the exported program and streamtrain
    serve's module give the scaled logits."""
    from streamtrain.daemon.export import export_model
    from streamtrain.daemon.snapshot import SnapshotInfo
    from streamtrain.serve.model import load_version
    from streamtrain.serve.repository import write_version

    lr = learner(task, calibration="temperature", lr=0.5)
    g = torch.Generator().manual_seed(4)

    def batch():
        x = torch.randn(64, 2, generator=g)
        flip = torch.rand(64, generator=g) < 0.25  # noisy labels, and an lr this high: not calibrated as it is
        y = (x[:, 0] > 0).float() if task == "binary" else (x[:, 0] > 0).float() + (x[:, 1] > 0).float()
        return x, torch.where(flip, (y + 1) % (2 if task == "binary" else 3), y)

    for _ in range(60):
        lr.step(Batch(*batch()))
    beta = lr.temperature.beta
    assert abs(beta - 1) > 1e-3, f"fitted after its 1,000 samples of warm-up: beta {beta}"
    x, y = batch()
    ahead = copy.deepcopy(lr)
    ahead.normalizer.update(x)
    with torch.no_grad():
        z = ahead.model(ahead.normalizer.inputs(x))
    loss = (
        torch.nn.functional.binary_cross_entropy_with_logits(beta * z[:, 0], y, reduction="sum")
        if task == "binary"
        else torch.nn.functional.cross_entropy(beta * z, y.long(), reduction="sum")
    )
    before = copy.deepcopy(lr.prequential)
    lr.step(Batch(x, y))
    assert lr.prequential.loss - before.loss == pytest.approx(loss.item(), rel=1e-4), "the served probabilities' loss"
    want = batch_sums(beta * z, y, task).tolist()
    assert [a - b for a, b in zip(lr.prequential.bins, before.bins)] == pytest.approx(want, rel=1e-4, abs=1e-4)

    state = lr.state_dict()
    again = learner(task, calibration="temperature", lr=0.5)
    again.load_state_dict(state, "test", "logistic")
    assert again.temperature.state_dict() == lr.temperature.state_dict()
    info = SnapshotInfo(tmp_path, "snap-1", 61, 0.0, {"config": config_to_dict(lr.cfg), "samples": 61 * 64})

    def files(out):
        export_model(info, state, out / "model.pt", "state_dict")
        export_model(info, state, out / "model.pt2", "program")

    write_version(tmp_path / "repo", "m", 61, files, {"step": 61})
    path = tmp_path / "repo" / "m" / "61"
    x = torch.randn(8, 2, generator=g)
    with torch.no_grad():
        raw = lr.model(lr.normalizer.inputs(x))
        program = torch.export.load(path / "model.pt2").module()(x)
        served = load_version(path, "m").module(x)
    scale = lr.temperature.beta
    assert torch.allclose(program, raw * scale, atol=1e-5) and torch.allclose(served, raw * scale, atol=1e-5)


def test_calibration_auto_fits_a_temperature_for_the_transformer_only():
    """auto (the default) is by model: a temperature where it never made the probabilities worse on the benchmark
    streams (the transformer); asked for, the mlp gets one too; regression never does, and asking for it is an error."""
    from streamtrain.daemon.step import calibration_of
    from streamtrain.streams.errors import ConfigError

    assert calibration_of("transformer", "binary", "auto") == "temperature"
    assert calibration_of("mlp", "multiclass", "auto") == calibration_of("logistic", "binary", "auto") == "none"
    assert calibration_of("mlp", "binary", "temperature") == "temperature"
    assert calibration_of("transformer", "regression", "auto") == "none"
    assert learner("binary").temperature is None and learner("binary", calibration="temperature").temperature is not None
    with pytest.raises(ConfigError, match="calibration: is for classification"):
        learner("regression", calibration="temperature")
