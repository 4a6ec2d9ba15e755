"""The streams ``bench.learning`` trains on: River's offline datasets, its drift generators, and streams made to break things.

Each is materialized once as float32 arrays (what the daemon receives), so streamtrain and
River see exactly the same rows in the same order.  Nothing is downloaded: River ships
every dataset used here, and the generators are seeded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Stream:
    name: str
    task: str  # regression | binary | multiclass
    x: np.ndarray  # (n, d) float32
    y: np.ndarray  # (n,) float32: the label (class index for multiclass)
    features: list[str]
    num_classes: int = 0
    drifts: tuple[int, ...] = ()  # row indices where a concept drift starts (generated streams)
    about: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def rows(self) -> Iterable[tuple[dict[str, float], float | int | bool]]:
        """The rows as River takes them: a dict of Python floats and a label of the task's type."""
        xs = self.x.astype(np.float64).tolist()
        for row, label in zip(xs, self.y.tolist()):
            x = dict(zip(self.features, row))
            if self.task == "binary":
                yield x, bool(label)
            elif self.task == "multiclass":
                yield x, int(label)
            else:
                yield x, float(label)


def _materialize(
    name: str, task: str, pairs: Iterable[tuple[dict, object]], n: int, about: str, drifts: tuple[int, ...] = (), classes=None
) -> Stream:
    rows = list(itertools.islice(pairs, n))
    features = [str(k) for k in rows[0][0]]
    keys = list(rows[0][0])
    x = np.array([[float(r[0][k]) for k in keys] for r in rows], dtype=np.float32)
    labels = [r[1] for r in rows]
    num_classes = 0
    if task == "multiclass":
        classes = classes or sorted({str(v) for v in labels})
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[str(v)] for v in labels], dtype=np.float32)
        num_classes = len(classes)
    else:
        y = np.array([float(v) for v in labels], dtype=np.float32)
    safe = [f"f{i}_{''.join(c if c.isalnum() else '_' for c in f)}" for i, f in enumerate(features)]
    return Stream(name, task, x, y, safe, num_classes, drifts, about)


# ---------------------------------------------------------------------------- River's datasets
def _river(name: str, dataset: str, task: str, about: str) -> Callable[[int], Stream]:
    def load(n: int = 0) -> Stream:
        from river import datasets

        ds = getattr(datasets, dataset)()
        return _materialize(name, task, ds, n or ds.n_samples, about)

    load.__name__ = name
    return load


phishing = _river("phishing", "Phishing", "binary", "River Phishing: 9 features valued 0, 0.5, 1")
trump_approval = _river("trump_approval", "TrumpApproval", "regression", "River TrumpApproval: a date ordinal (~7.4e5) + 5 polls")
bananas = _river("bananas", "Bananas", "binary", "River Bananas: 2 features, a non-linear boundary")
image_segments = _river("image_segments", "ImageSegments", "multiclass", "River ImageSegments: 18 features, 7 classes")
chick_weights = _river("chick_weights", "ChickWeights", "regression", "River ChickWeights: time, chick, diet -> weight")
shuttle = _river("shuttle", "Shuttle", "binary", "River Shuttle: 9 features, imbalanced (7 % positive)")


# ---------------------------------------------------------------------------- drift generators
def sea_drift(n: int = 0) -> Stream:
    from river.datasets import synth

    n = n or 100_000
    at = n // 2
    gen = synth.ConceptDriftStream(
        synth.SEA(variant=0, seed=1, noise=0.1), synth.SEA(variant=2, seed=2, noise=0.1), position=at, width=max(1, n // 200), seed=3
    )
    return _materialize("sea_drift", "binary", gen, n, "SEA variant 0 -> 2 at the half (10 % label noise)", (at,))


def agrawal_drift(n: int = 0) -> Stream:
    from river.datasets import synth

    n = n or 100_000
    at = n // 2
    gen = synth.ConceptDriftStream(
        synth.Agrawal(classification_function=1, seed=1),
        synth.Agrawal(classification_function=3, seed=2),
        position=at,
        width=max(1, n // 200),
        seed=3,
    )
    return _materialize("agrawal_drift", "binary", gen, n, "Agrawal function 1 -> 3 at the half (salaries ~1e5, loans ~5e5)", (at,))


def hyperplane(n: int = 0) -> Stream:
    from river.datasets import synth

    n = n or 100_000
    gen = synth.Hyperplane(seed=1, n_features=10, n_drift_features=5, mag_change=0.001, noise_percentage=0.05, sigma=0.1)
    return _materialize("hyperplane", "binary", gen, n, "rotating hyperplane, 10 features, gradual drift (mag 0.001)")


def friedman_drift(n: int = 0) -> Stream:
    from river.datasets import synth

    n = n or 30_000
    at = (n // 3, 2 * n // 3)
    gen = synth.FriedmanDrift(drift_type="gra", position=at, seed=1)
    return _materialize("friedman_drift", "regression", gen, n, "Friedman #1 with global recurring abrupt drift at 1/3, 2/3", at)


# ---------------------------------------------------------------------------- multiclass generators (calibration)
def waveform_noisy(n: int = 0) -> Stream:
    from river.datasets import synth

    n = n or 20_000
    gen = synth.Waveform(seed=1, has_noise=True)
    return _materialize(
        "waveform_noisy", "multiclass", gen, n, "Waveform: 3 classes, 21 features + 19 noise features", classes=["0", "1", "2"]
    )


def led_drift(n: int = 0) -> Stream:
    from river.datasets import synth

    n = n or 20_000
    at = n // 2
    gen = synth.ConceptDriftStream(
        synth.LEDDrift(seed=1, noise_percentage=0.1, irrelevant_features=True, n_drift_features=0),
        synth.LEDDrift(seed=2, noise_percentage=0.1, irrelevant_features=True, n_drift_features=7),
        position=at,
        width=max(1, n // 200),
        seed=3,
    )
    about = "LED digits: 10 classes, 7 segments + 17 irrelevant, 10 % noise, 7 segments swapped at the half"
    return _materialize("led_drift", "multiclass", gen, n, about, (at,), classes=[str(k) for k in range(10)])


def rbf_drift(n: int = 0) -> Stream:
    from river.datasets import synth

    n = n or 20_000
    gen = synth.RandomRBFDrift(
        seed_model=1, seed_sample=2, n_classes=4, n_features=10, n_centroids=20, change_speed=0.001, n_drift_centroids=20
    )
    about = "random RBF: 4 classes, 10 features, 20 centroids all drifting (speed 0.001)"
    return _materialize("rbf_drift", "multiclass", gen, n, about, classes=["0", "1", "2", "3"])


# ---------------------------------------------------------------------------- streams made to break things
def _linear_rows(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    return x, x @ w


def timestamp_feature(n: int = 0) -> Stream:
    """A Unix timestamp (~1.7e9, one second apart) next to ordinary features; binary label from the others."""
    n = n or 5_000
    x, score = _linear_rows(n, 4, seed=11)
    ts = 1.7e9 + np.arange(n, dtype=np.float64)
    rng = np.random.default_rng(12)
    y = (score + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    xs = np.column_stack([ts, x]).astype(np.float32)
    return Stream("timestamp_1e9", "binary", xs, y, ["ts", "a", "b", "c", "d"], about="a Unix timestamp feature (1.7e9) + 4 N(0,1)")


def constant_then_changing(n: int = 0) -> Stream:
    """A feature that is constant for the first 1,000 rows, then carries the signal."""
    n = n or 5_000
    x, score = _linear_rows(n, 3, seed=21)
    rng = np.random.default_rng(22)
    late = np.where(np.arange(n) < min(1_000, n // 2), 1.0, rng.normal(size=n))
    score = score + 2 * np.where(np.arange(n) < min(1_000, n // 2), 0.0, late)
    y = (score + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    xs = np.column_stack([late, x]).astype(np.float32)
    return Stream("constant_1000", "binary", xs, y, ["late", "a", "b", "c"], about="feature 0 constant for 1,000 rows, then informative")


def house_prices(n: int = 0) -> Stream:
    """Label on a 1e5 scale (house prices) from features of mixed scales (area, rooms, age, a price index)."""
    n = n or 5_000
    rng = np.random.default_rng(31)
    area = rng.uniform(40, 250, n)
    rooms = rng.integers(1, 7, n).astype(np.float64)
    age = rng.uniform(0, 80, n)
    index = 100 + np.cumsum(rng.normal(0, 0.05, n))
    price = 2_500 * area + 8_000 * rooms - 900 * age + 600 * (index - 100) + rng.normal(0, 15_000, n)
    xs = np.column_stack([area, rooms, age, index]).astype(np.float32)
    about = "price ~3e5 from area, rooms, age, an index"
    return Stream("house_prices_1e5", "regression", xs, price.astype(np.float32), ["area", "rooms", "age", "index"], about=about)


STREAMS: dict[str, Callable[[int], Stream]] = {
    f.__name__: f
    for f in (
        phishing,
        trump_approval,
        bananas,
        image_segments,
        chick_weights,
        shuttle,
        sea_drift,
        agrawal_drift,
        hyperplane,
        friedman_drift,
        waveform_noisy,
        led_drift,
        rbf_drift,
        timestamp_feature,
        constant_then_changing,
        house_prices,
    )
}
DRIFT = ("sea_drift", "agrawal_drift", "hyperplane", "friedman_drift")
