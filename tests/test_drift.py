"""Unit tests for daemon.drift: detection delay, no false alarms, exact resumption after a save."""

from __future__ import annotations

import io
import math
import random
import statistics

import pytest
import torch

from streamtrain.daemon.drift import ADWIN, PageHinkley, make_detector

CHANGE = 2000  # index of the first value after the change in the ADWIN shift streams
ADWIN_DELAY = 200  # measured: the first detection comes 47, 79 or at most 111 values after the change (300 seeds)
PH_PRE = 300  # values before the change in the Page-Hinkley shift streams
PH_DELAY = 30  # measured: 1 to 11 values after the change (300 seeds)


def bernoulli(rng: random.Random, p: float, n: int) -> list[float]:
    return [float(rng.random() < p) for _ in range(n)]


def gauss(rng: random.Random, mu: float, sigma: float, n: int) -> list[float]:
    return [rng.gauss(mu, sigma) for _ in range(n)]


def detections(detector: ADWIN | PageHinkley, values: list[float]) -> list[int]:
    """Indices of the values on which ``detector`` signalled a drift."""
    return [i for i, x in enumerate(values) if detector.update(x)]


def trace(detector: ADWIN | PageHinkley, values: list[float]) -> list[tuple]:
    """What the trainer can see after each value: the decision and the detector's public figures."""
    out = []
    for x in values:
        answer = detector.update(x)
        out.append((answer, detector.drift_detected, getattr(detector, "width", None), detector.estimation, detector.n_detections))
    return out


def torch_round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_plain(obj: object, where: str = "state") -> None:
    """Only dict/list/int/float/str/bool, as the snapshot's weights_only load accepts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert type(k) is str, f"{where}: key {k!r}"
            assert_plain(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert type(obj) in (int, float, str, bool), f"{where}: {type(obj).__name__}"


# ---------------------------------------------------------------------------------------- ADWIN


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adwin_detects_bernoulli_mean_shift(seed: int) -> None:
    rng = random.Random(seed)
    values = bernoulli(rng, 0.2, CHANGE) + bernoulli(rng, 0.6, 1000)
    adwin = ADWIN()
    hits = detections(adwin, values)
    assert hits, "the shift 0.2 -> 0.6 was not detected"
    assert hits[0] >= CHANGE, f"false alarm at {hits[0]} before the change"
    assert hits[0] - CHANGE <= ADWIN_DELAY
    # The window has shed the old concept: what is left is (nearly) all after the change, and its mean is the new one.
    assert adwin.width < 1000 + 200
    assert abs(adwin.estimation - 0.6) < 0.06


def test_adwin_window_is_the_latest_values() -> None:
    """The window is always a suffix of the stream, and its mean and variance are those of that suffix."""
    rng = random.Random(7)
    values = bernoulli(rng, 0.2, 1500) + bernoulli(rng, 0.7, 1500) + bernoulli(rng, 0.1, 1500)
    adwin = ADWIN(clock=8)
    checked = 0
    for i, x in enumerate(values):
        adwin.update(x)
        if adwin.drift_detected or i % 499 == 0 or i == len(values) - 1:
            window = values[i + 1 - adwin.width : i + 1]
            assert adwin.estimation == pytest.approx(statistics.fmean(window), abs=1e-9)
            assert adwin.variance == pytest.approx(statistics.pvariance(window), abs=1e-9)
            checked += 1
    assert adwin.n_detections >= 2
    assert checked > adwin.n_detections


def test_adwin_goes_on_after_a_detection() -> None:
    rng = random.Random(3)
    values = bernoulli(rng, 0.2, 2000) + bernoulli(rng, 0.6, 2000) + bernoulli(rng, 0.1, 2000)
    adwin = ADWIN()
    hits = detections(adwin, values)
    assert hits[0] >= 2000
    assert any(2000 <= h <= 2000 + ADWIN_DELAY for h in hits)
    assert any(4000 <= h <= 4000 + ADWIN_DELAY for h in hits), f"the second change went unseen: {hits}"
    assert abs(adwin.estimation - 0.1) < 0.05
    assert adwin.n_detections == len(hits)


@pytest.mark.parametrize("seed", [0, 1])
def test_adwin_no_false_alarm_on_stationary_bernoulli(seed: int) -> None:
    rng = random.Random(seed)
    adwin = ADWIN()
    assert detections(adwin, bernoulli(rng, 0.3, 100_000)) == []
    assert adwin.width == 100_000
    assert abs(adwin.estimation - 0.3) < 0.01
    # The histogram stays logarithmic in the window's length.
    buckets = sum(len(level) for level in adwin.state_dict()["bucket_sums"])
    assert buckets <= adwin.max_buckets * (math.floor(math.log2(100_000)) + 1)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda rng: abs(rng.gauss(0.0, 1.0)), id="standardized-abs-error"),
        pytest.param(lambda rng: rng.gauss(0.5, 0.2), id="gauss-0.5-0.2"),
    ],
)
def test_adwin_no_false_alarm_on_stationary_gaussian(make) -> None:
    rng = random.Random(11)
    adwin = ADWIN()
    assert detections(adwin, [make(rng) for _ in range(100_000)]) == []
    assert adwin.width == 100_000


def test_adwin_grace_period_and_clock() -> None:
    adwin = ADWIN(clock=1, grace_period=200)
    values = [0.0] * 100 + [1.0] * 100  # a blatant change, but the window has not passed the grace period
    assert detections(adwin, values) == []
    assert adwin.width == 200
    assert adwin.update(1.0)  # 201 values: the first check, and the change is plain
    assert adwin.width < 201
    rng = random.Random(9)
    values = bernoulli(rng, 0.1, 1000) + bernoulli(rng, 0.9, 1000)
    hits = detections(ADWIN(clock=16), values)
    assert hits and all((i + 1) % 16 == 0 for i in hits), hits


def test_adwin_round_trip_through_torch_save() -> None:
    rng = random.Random(5)
    head = bernoulli(rng, 0.25, 1500)
    tail = bernoulli(rng, 0.25, 300) + bernoulli(rng, 0.75, 1200)
    original = ADWIN(delta=0.01, clock=4, max_buckets=3, min_window_length=8, grace_period=20)
    detections(original, head)
    state = original.state_dict()
    assert_plain(state)
    restored = ADWIN()  # defaults: the parameters come from the state
    restored.load_state_dict(torch_round_trip(state))
    assert restored.state_dict() == state
    expected, got = trace(original, tail), trace(restored, tail)
    assert got == expected
    assert sum(row[0] for row in expected) >= 1, "the tail should hold a detection"
    assert restored.state_dict() == original.state_dict()


def test_adwin_state_is_a_copy() -> None:
    adwin = ADWIN()
    detections(adwin, bernoulli(random.Random(1), 0.5, 200))
    state = adwin.state_dict()
    frozen = torch_round_trip(state)
    detections(adwin, bernoulli(random.Random(2), 0.5, 200))
    assert state == frozen


# ---------------------------------------------------------------------------------- Page-Hinkley


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_page_hinkley_detects_mean_shift(seed: int) -> None:
    rng = random.Random(seed)
    values = gauss(rng, 0.0, 1.0, PH_PRE) + gauss(rng, 5.0, 1.0, 200)
    ph = PageHinkley(threshold=50.0)
    hits = detections(ph, values)
    assert hits, "the shift 0 -> 5 was not detected"
    assert hits[0] >= PH_PRE, f"false alarm at {hits[0]} before the change"
    assert hits[0] - PH_PRE <= PH_DELAY
    assert ph.n_detections == len(hits)


def test_page_hinkley_goes_on_after_a_detection() -> None:
    rng = random.Random(4)
    values = gauss(rng, 0.0, 1.0, PH_PRE) + gauss(rng, 5.0, 1.0, PH_PRE) + gauss(rng, 10.0, 1.0, 100)
    hits = detections(PageHinkley(), values)
    assert len(hits) == 2, hits
    assert 0 <= hits[0] - PH_PRE <= PH_DELAY
    assert 0 <= hits[1] - 2 * PH_PRE <= PH_DELAY


def test_page_hinkley_modes() -> None:
    rng = random.Random(8)
    falling = gauss(rng, 5.0, 1.0, PH_PRE) + gauss(rng, 0.0, 1.0, 200)
    rising = gauss(rng, 0.0, 1.0, PH_PRE) + gauss(rng, 5.0, 1.0, 200)
    assert detections(PageHinkley(mode="up"), falling) == []
    assert detections(PageHinkley(mode="down"), rising) == []
    for mode, values in (("down", falling), ("both", falling), ("both", rising)):
        hits = detections(PageHinkley(mode=mode), values)
        assert hits and 0 <= hits[0] - PH_PRE <= PH_DELAY, (mode, hits)


@pytest.mark.parametrize("seed", [0, 1])
def test_page_hinkley_no_false_alarm_on_stationary_errors(seed: int) -> None:
    """The defaults' scale: a batch-mean 0/1 error (p 0.3, batch of 32: sd 0.08) never alarms."""
    rng = random.Random(seed)
    ph = PageHinkley()
    assert detections(ph, gauss(rng, 0.3, 0.08, 100_000)) == []
    assert abs(ph.estimation - 0.3) < 0.01


def test_page_hinkley_min_instances() -> None:
    ph = PageHinkley(min_instances=30, threshold=1.0)
    values = [0.0] * 10 + [100.0] * 19  # the excess is huge, but only 29 values have been seen
    assert detections(ph, values) == []
    assert ph.update(100.0)
    assert ph.estimation == 0.0  # the statistics restarted


def test_page_hinkley_round_trip_through_torch_save() -> None:
    rng = random.Random(6)
    head = gauss(rng, 0.0, 1.0, 150)
    tail = gauss(rng, 0.0, 1.0, 100) + gauss(rng, -4.0, 1.0, 200) + gauss(rng, 3.0, 1.0, 200)
    original = PageHinkley(min_instances=20, delta=0.01, threshold=40.0, alpha=0.999, mode="both")
    detections(original, head)
    state = original.state_dict()
    assert_plain(state)
    restored = PageHinkley()
    restored.load_state_dict(torch_round_trip(state))
    assert restored.state_dict() == state
    expected, got = trace(original, tail), trace(restored, tail)
    assert got == expected
    assert sum(row[0] for row in expected) >= 2, "the tail should hold a fall and a rise"
    assert restored.state_dict() == original.state_dict()


# ------------------------------------------------------------------------------- shared behaviour


def test_make_detector() -> None:
    adwin = make_detector("adwin", delta=0.01, clock=16)
    assert type(adwin) is ADWIN and adwin.delta == 0.01 and adwin.clock == 16
    ph = make_detector("page_hinkley", threshold=20.0, mode="both")
    assert type(ph) is PageHinkley and ph.threshold == 20.0 and ph.mode == "both"
    assert type(make_detector("adwin")) is ADWIN
    with pytest.raises(ValueError, match=r"'kswin'.*adwin, page_hinkley"):
        make_detector("kswin")
    with pytest.raises(TypeError):
        make_detector("adwin", threshold=3.0)  # a Page-Hinkley parameter


@pytest.mark.parametrize(
    "name, params",
    [
        ("adwin", {"delta": 0.0}),
        ("adwin", {"delta": 1.5}),
        ("adwin", {"clock": 0}),
        ("adwin", {"max_buckets": 0}),
        ("adwin", {"min_window_length": 2.5}),
        ("adwin", {"grace_period": -1}),
        ("page_hinkley", {"mode": "sideways"}),
        ("page_hinkley", {"threshold": 0.0}),
        ("page_hinkley", {"alpha": 0.0}),
        ("page_hinkley", {"alpha": 1.01}),
        ("page_hinkley", {"delta": -0.1}),
        ("page_hinkley", {"min_instances": 0}),
    ],
)
def test_bad_parameters(name: str, params: dict) -> None:
    with pytest.raises(ValueError):
        make_detector(name, **params)


@pytest.mark.parametrize("name", ["adwin", "page_hinkley"])
def test_non_finite_value_is_refused(name: str) -> None:
    detector = make_detector(name)
    detector.update(0.5)
    before = detector.state_dict()
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="non-finite"):
            detector.update(bad)
    assert detector.state_dict() == before


def test_load_state_dict_refuses_foreign_or_broken_state() -> None:
    adwin, ph = ADWIN(), PageHinkley()
    detections(adwin, [0.0, 1.0] * 50)
    with pytest.raises(ValueError, match="page_hinkley"):
        adwin.load_state_dict(ph.state_dict())
    with pytest.raises(ValueError, match="adwin"):
        ph.load_state_dict(adwin.state_dict())
    state = adwin.state_dict()
    for broken in ({**state, "width": state["width"] + 1}, {**state, "format": 99}, {k: v for k, v in state.items() if k != "tick"}):
        fresh = ADWIN()
        with pytest.raises(ValueError):
            fresh.load_state_dict(broken)
        assert fresh.state_dict() == ADWIN().state_dict()  # a refused state changes nothing
    broken_params = {**ph.state_dict(), "params": {**ph.state_dict()["params"], "mode": "sideways"}}
    with pytest.raises(ValueError):
        ph.load_state_dict(broken_params)
    assert ph.mode == "up"
