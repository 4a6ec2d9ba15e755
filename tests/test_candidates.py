"""Candidates trained side by side (trainer.candidates, drift.action: challenger): promoted when, and only when, better."""

from __future__ import annotations

import copy
import io
import re
import time

import numpy as np
import pytest
import torch

from streamtrain.config.schema import config_from_dict
from streamtrain.daemon.candidates import Candidates, Race, make_learner
from streamtrain.daemon.step import Learner
from streamtrain.streams.errors import ConfigError
from streamtrain.streams.ring import Batch

W = np.array([1.5, -2.0, 1.0, 0.5, -1.0, 0.0, 2.0, -0.5], np.float32)


def config(**trainer):
    drift = trainer.pop("drift", {})
    model = trainer.pop("model", {"name": "logistic"})
    return config_from_dict(
        {
            "kafka": {"topics": ["t"]},
            "data": {"format": "json", "features": [f"f{i}" for i in range(8)]},
            "model": model,
            "trainer": {"task": "binary", "device": "cpu", "lr": 0.1, "num_threads": 1, **trainer},
            "drift": drift,
        }
    )


def stream(n: int, flip_at: int | None = None, seed: int = 0, batch: int = 64):
    """Logistic click-like batches; the weights change sign at ``flip_at`` (a drift a fresh model learns faster)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch):
        x = rng.normal(size=(batch, 8)).astype(np.float32)
        w = -W if flip_at is not None and start >= flip_at else W
        p = 1 / (1 + np.exp(-(x @ w)))
        y = (rng.random(batch) < p).astype(np.float32)
        yield Batch(torch.from_numpy(x), torch.from_numpy(y))


def test_candidates_are_checked_like_the_file():
    with pytest.raises(ConfigError) as e:
        config(candidates=[{"trainer.lrr": 0.1}, {"data.format": "csv"}, {"trainer.task": "regression"}])
    text = str(e.value)
    assert "trainer.candidates[0].trainer.lrr: unknown key" in text
    assert "trainer.candidates[1]: data.format: a candidate differs in trainer.* or model.* only" in text
    assert "every candidate learns the same task" in text
    assert isinstance(make_learner(config()), Learner), "no candidates: the one learner, as before"


def test_no_false_promotion_on_a_stationary_stream():
    """Three MLPs alike but for their initial weights (seeds), 100k stationary samples: none is better but by chance,
    and the comparison must not promote on chance."""
    c = Candidates(config(model={"name": "mlp", "params": {"hidden": [16]}}, candidates=[{"trainer.seed": 1}, {"trainer.seed": 2}]))
    for batch in stream(100_000, seed=1):
        c.step(batch)
    assert c.promotions == {}, c.promotions
    assert c.champion == "default"
    assert c.prequential.samples == 100_032, "the served track counts every sample once"


def test_a_clearly_better_candidate_is_promoted_and_served():
    c = Candidates(config(lr=0.0005, candidates=[{"trainer.lr": 0.2}]))
    promoted = []
    c.on_promotion = lambda old, new, reason: promoted.append((old, new, reason, c.lead.samples))
    for batch in stream(40_000, seed=2):
        c.step(batch)
    assert c.champion == "lr=0.2" and promoted and promoted[0][:3] == ("default", "lr=0.2", "better")
    assert promoted[0][3] >= 5000, "not before candidates_min_samples"
    assert c.model is c.learners["lr=0.2"].model, "the champion's model is the one served"
    # the served track: the default's scores before the promotion, the candidate's after
    own = c.learners["lr=0.2"].prequential
    assert c.prequential.samples == own.samples and c.prequential.loss > own.loss


def test_a_drift_warning_starts_a_fresh_challenger_that_wins_after_the_flip():
    c = Candidates(config(drift={"action": "challenger"}))
    events = []
    c.on_promotion = lambda old, new, reason: events.append((new, reason, c.lead.samples))
    for batch in stream(60_000, flip_at=20_000, seed=3):
        c.step(batch)
    assert any(r == "challenger" for _, r, _ in events), (events, c.promotions)
    at = next(s for _, r, s in events if r == "challenger")
    assert 20_000 < at < 40_000, f"promoted at sample {at}"
    assert c.champion == "default" and set(c.learners) == {"default"}, "the challenger took the beaten champion's place"


def test_a_reset_challenger_starts_as_the_champion_with_its_optimizer_forgotten():
    c = Candidates(config(lr=0.01, optimizer="adam", drift={"action": "challenger", "challenger": "reset"}))
    batches = list(stream(30_000, flip_at=15_000, seed=5))
    for b in batches:
        c.step(b)
        if "challenger" in c.learners:
            break
    ch, lead = c.learners["challenger"], c.lead
    assert all(torch.equal(a, b) for a, b in zip(ch.model.parameters(), lead.model.parameters()))
    assert not ch.optimizer.state and lead.optimizer.state, "the same weights, the optimizer's moments forgotten"


def test_a_roll_back_to_a_snapshot_before_the_challenger_drops_it():
    c = Candidates(config(drift={"action": "challenger"}))
    batches = list(stream(30_000, flip_at=10_000, seed=3))
    for b in batches[:100]:
        c.step(b)
    before = copy.deepcopy(c.state_dict())
    for b in batches[100:]:
        c.step(b)
        if "challenger" in c.learners:
            break
    assert "challenger" in c.learners
    c.load_state_dict(before, "test", "logistic")
    assert set(c.learners) == {"default"} and c.lead.samples == before["trainer"]["samples"]


def test_a_restart_mid_comparison_resumes_it_exactly():
    """Snapshot the candidates half way (state_dict through torch.save), restore into new ones, go on: the same promotion
    at the same sample, the same champion weights, as an uninterrupted run."""
    cfg = config(lr=0.0005, candidates=[{"trainer.lr": 0.2}, {"trainer.lr": 0.05}])
    batches = list(stream(30_000, seed=4))

    def run(cut: int | None):
        events = []
        box = [Candidates(cfg)]
        box[0].on_promotion = lambda old, new, reason: events.append((new, box[0].lead.samples))
        for i, b in enumerate(batches):
            if i == cut:
                state = copy.deepcopy(box[0].state_dict())
                box[0] = Candidates(cfg)
                box[0].on_promotion = lambda old, new, reason: events.append((new, box[0].lead.samples))
                box[0].load_state_dict(state, "test", "logistic")
            box[0].step(b)
        return box[0], events

    whole, ev1 = run(None)
    cut, ev2 = run(len(batches) // 3)
    assert ev1 == ev2 and ev1, ev1
    assert whole.champion == cut.champion
    for name in whole.learners:
        for a, b in zip(whole.learners[name].model.parameters(), cut.learners[name].model.parameters()):
            assert torch.equal(a, b), name
    assert whole.prequential.loss == pytest.approx(cut.prequential.loss, rel=1e-12)


MLP16 = {"name": "mlp", "params": {"hidden": [16]}}
STACKED = [  # task, model, optimizer, candidates, the stacks' sizes, more of trainer.*
    ("binary", {"name": "logistic"}, "sgd", [{"trainer.lr": 0.3}, {"trainer.weight_decay": 0.01, "trainer.momentum": 0.9}], [3], {}),
    ("binary", MLP16, "adamw", [{"trainer.lr": 0.003}, {"trainer.lr": 0.03, "trainer.weight_decay": 0.1}], [3], {}),
    ("multiclass", MLP16, "adam", [{"trainer.weight_decay": 0.01, "trainer.grad_clip_norm": 0.1}, {"model.params.hidden": [8]}], [2], {}),
    ("regression", MLP16, "adamw", [{"trainer.betas": [0.8, 0.99]}, {"trainer.seed": 3}], [3], {}),
    ("regression", {"name": "linear"}, "sgd", [{"trainer.lr": 0.003}, {"trainer.lr": 1e4}], [3], {}),  # the last one diverges
    # each with its own fitted temperature (fitted after 1,000 samples: 80 steps of 16)
    ("multiclass", MLP16, "adamw", [{"trainer.lr": 0.05}], [2], {"calibration": "temperature"}),
]


def _stepped(cfg, steps: int = 40, state=None):
    """Candidates of ``cfg`` over fixed batches; half way, one candidate's optimizer state is reset (as a drift's
    reset_optimizer does) and another's learning rate changed (as a schedule or an LR boost does)."""
    c = Candidates(cfg)
    if state is not None:
        c.load_state_dict(state, "test", cfg.model.name)
    g = torch.Generator().manual_seed(0)
    names = list(c.learners)
    for i in range(steps):
        x = torch.randn(16, 8, generator=g)
        task = cfg.trainer.task
        y = {"binary": (x[:, 0] > 0).float(), "multiclass": (x[:, 0] > 0).float() + (x[:, 1] > 0).float()}.get(task, x.sum(1) * 3 + 5)
        if i == steps // 2:
            c.learners[names[1]].optimizer.state.clear()
            c.learners[names[0]].optimizer.param_groups[0]["lr"] *= 0.5
        c.step(Batch(x, y))
    return c


def _assert_alike(a: Candidates, b: Candidates) -> None:
    a.state_dict(), b.state_dict()  # what a snapshot takes (a stack writes its step counts in)
    for name in a.learners:
        la, lb = a.learners[name], b.learners[name]
        assert (la.step_count, la.prequential.samples) == (lb.step_count, lb.prequential.samples), name
        assert lb.prequential.loss == pytest.approx(la.prequential.loss, rel=1e-4), name
        assert lb.prequential.bins == pytest.approx(la.prequential.bins, rel=1e-4, abs=1e-3), name
        if la.temperature is not None:
            assert lb.temperature.beta == pytest.approx(la.temperature.beta, rel=1e-4) and la.temperature.beta != 1.0, name
        for p, q in zip(la.model.parameters(), lb.model.parameters()):
            assert torch.allclose(p, q, rtol=1e-3, atol=1e-4), (name, (p - q).abs().max())
        sa, sb = la.optimizer.state_dict()["state"], lb.optimizer.state_dict()["state"]
        assert sa.keys() == sb.keys(), name
        for i in sa:
            for key in sa[i]:
                assert torch.allclose(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key]), rtol=1e-3, atol=1e-5), (name, key)


@pytest.mark.parametrize(
    "task,model,optimizer,candidates,sizes,extra", STACKED, ids=[f"{c[0]}-{c[1]['name']}-{c[2]}{'-t' if c[5] else ''}" for c in STACKED]
)
def test_stacked_candidates_learn_as_looped_ones(task, model, optimizer, candidates, sizes, extra):
    """Candidates of one shape trained as one stacked model: each one's weights, optimizer state and scores are those it
    has stepping on its own, to float rounding -- with its own learning rate, weight decay, betas, momentum, clipping and
    seed; a reset of its optimizer or a new learning rate reaches it alone; a candidate that diverges skips its steps alone;
    one of another shape steps on its own beside the stack."""
    kw = dict(model=model, optimizer=optimizer, candidates=candidates, task=task, **({"num_classes": 3} if task == "multiclass" else {}))
    steps = 80 if extra else 40
    looped = _stepped(config(candidates_stack="off", **kw, **extra), steps)
    stacked = _stepped(config(**kw, **extra), steps)
    assert [len(s.learners) for s in stacked.stacks] == sizes and looped.stacks == []
    _assert_alike(looped, stacked)
    if candidates[-1] == {"trainer.lr": 1e4}:
        assert stacked.learners["lr=10000"].step_count < stacked.lead.step_count, "its non-finite steps skipped, the others' not"


def test_a_snapshot_of_stacked_candidates_is_one_of_looped_ones():
    """Stacked candidates' state through torch.save, loaded with stacking off (and the other way): the same run on."""
    kw = dict(model=MLP16, optimizer="adamw", candidates=[{"trainer.lr": 0.003}, {"trainer.weight_decay": 0.1}])
    for first, then in (("auto", "off"), ("off", "auto")):
        half = _stepped(config(candidates_stack=first, **kw), steps=20)
        buf = io.BytesIO()
        torch.save(half.state_dict(), buf)
        state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        a = _stepped(config(candidates_stack=first, **kw), state=copy.deepcopy(state))
        b = _stepped(config(candidates_stack=then, **kw), state=state)
        _assert_alike(a, b)


def test_the_race_is_a_paired_test():
    """The same losses plus a constant: a clear winner; the same noise on both: no signal."""
    r = Race(["a", "b"], half_life=10_000)
    rng = np.random.default_rng(0)
    for _ in range(500):
        noise = float(rng.normal(0.5, 0.2))
        r.observe(64, {"a": noise * 64, "b": (noise - 0.01) * 64}, "a")
    assert r.z("b") > 100 and r.mean_loss("b") < r.mean_loss("a")
    r2 = Race(["a", "b"], half_life=10_000)
    for _ in range(500):
        noise = float(rng.normal(0.5, 0.2))
        r2.observe(64, {"a": noise * 64, "b": (noise + float(rng.normal(0, 0.01))) * 64}, "a")
    assert abs(r2.z("b")) < 4


@pytest.mark.integration
def test_two_ranks_promote_at_the_same_step_and_a_restart_keeps_the_champion(tmp_path, bootstrap, make_topic):
    """The daemon under torchrun, two ranks, a default that learns too slowly and a candidate that does not: both ranks
    promote the candidate at the same step; the snapshot holds it, and a restart (one process) serves it on."""
    from demo.broker import TestProducer
    from demo.synthetic import SyntheticStream
    from streamtrain.streams.encode import encode
    from tests.daemon_util import FEATURES, Daemon, daemon_config, write_config
    from tests.test_ranks import launch_ranks, stop_ranks

    topic = make_topic(4)
    x, y = SyntheticStream(16, seed=5).batch(24_000)
    producer = TestProducer(bootstrap)
    producer.send_all(topic, encode("json", x, y, FEATURES), partitions=4)
    producer.flush()
    cfg = daemon_config(
        tmp_path,
        bootstrap,
        [topic],
        model={"name": "linear", "params": {}},
        trainer={"lr": 0.0002, "optimizer": "sgd", "candidates": [{"trainer.lr": 0.02}], "candidates_min_samples": 2000},
        ring={"batch_size": 64},
    )
    d = launch_ranks(tmp_path, cfg, "cands", 2)
    deadline = time.monotonic() + 120
    while True:
        ms = d.rank_metrics()
        if len(ms) == 2 and all(m.get('streamtrain_promotions_total{reason="better"}', 0) >= 1 for m in ms):
            break
        assert d.proc.poll() is None and time.monotonic() < deadline, d.log()[-4000:]
        time.sleep(0.3)
    assert "candidates stacked: default, lr=0.02" in d.log(), "the two linear models step as one stacked model"
    for m in ms:
        assert m['streamtrain_champion_info{candidate="lr=0.02"}'] == 1 and m['streamtrain_champion_info{candidate="default"}'] == 0
        assert m['streamtrain_candidate_prequential_samples_total{candidate="default"}'] > 0
    from tests.test_packaging import TASK_ONLY, query_problems

    code, text = d.get("/metrics")
    assert code == 200
    query_problems(text, "regression+candidates", only={n for n, kind in TASK_ONLY.items() if kind == "candidates"})
    steps = re.findall(r"promoted candidate 'lr=0.02' over 'default' \(better\) at step (\d+)", d.log())
    assert len(steps) == 2 and steps[0] == steps[1], steps  # one line per rank, the same step
    stop_ranks(d, 2)
    one = Daemon(write_config(tmp_path / "one.yaml", cfg), tmp_path / "one.log")
    m = one.wait_for("up", lambda m: 'streamtrain_champion_info{candidate="lr=0.02"}' in m, 60)
    assert m['streamtrain_champion_info{candidate="lr=0.02"}'] == 1, "the snapshot's champion is served after a restart"
    assert one.terminate()[0] == 0
