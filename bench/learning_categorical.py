"""Categorical streams for ``python -m bench.learning --categorical``: records as producers write them.

Three streams, each a list of records (dicts with strings, integers, booleans and nulls)
produced as JSON into a one-partition topic, in order:

- ``mv``: River's ``Mv`` generator (regression; string features ``color``, ``flag``, ``size``
  among seven numbers);
- ``friedman_missing``: Friedman #1 with 5 % of the feature values ``null``;
- ``clicks``: a click stream made here: Zipf-distributed user and item ids (tens of
  thousands of each), a device and a country, a price that is missing one time in ten, and
  a boolean label drawn from a hidden model with per-id effects and a rank-4 user x item
  interaction.  The hidden model's own log loss on the rows (the Bayes rate) is the floor.

Side by side, on the same rows, prequential at batch 1: the daemon (its real data path,
defaults but ``model.name``), Vowpal Wabbit (``vowpalwabbit`` from PyPI: ``-b 18``, logistic
loss for clicks, with and without ``-q ui`` for the user x item pair) and River
(``StatImputer`` and ``StandardScaler`` for the numbers, ``OneHotEncoder`` for the
categories, then ``LinearRegression`` / ``LogisticRegression``).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from bench.learning import Scores


@dataclass
class CatStream:
    name: str
    task: str  # regression | binary
    records: list[dict]  # the fields by name, "y" the label
    features: list[str]  # numbers (null when missing)
    categorical: list[str]
    about: str = ""
    bayes_loss: float = math.nan  # the hidden model's log loss on these rows (clicks)
    num_classes: int = 0
    drifts: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def values(self) -> list[bytes]:
        return [json.dumps(r).encode() for r in self.records]


def mv(n: int = 0) -> CatStream:
    from river.datasets import synth

    n = n or 20_000
    records = []
    for x, y in itertools.islice(synth.Mv(seed=1), n):
        r = {f"x{k}": v for k, v in x.items()}
        r["y"] = float(y)
        records.append(r)
    cats = [k for k, v in records[0].items() if isinstance(v, str)]
    nums = [k for k in records[0] if k not in cats and k != "y"]
    return CatStream("mv", "regression", records, nums, cats, "River Mv: 7 numbers, 3 string features (color, flag, size)")


def friedman_missing(n: int = 0) -> CatStream:
    from river.datasets import synth

    n = n or 20_000
    rng = np.random.default_rng(4)
    records = []
    for x, y in itertools.islice(synth.Friedman(seed=2), n):
        r = {f"x{k}": (None if rng.random() < 0.05 else float(v)) for k, v in x.items()}
        r["y"] = float(y)
        records.append(r)
    nums = [k for k in records[0] if k != "y"]
    return CatStream("friedman_missing", "regression", records, nums, [], "Friedman #1, 5 % of the feature values null")


def clicks(n: int = 0, users: int = 30_000, items: int = 10_000, rank: int = 4, seed: int = 5) -> CatStream:
    """A click stream with per-id effects and a low-rank user x item interaction; its Bayes log loss is the floor."""
    n = n or 100_000
    rng = np.random.default_rng(seed)

    def zipf(count: int, size: int) -> np.ndarray:
        p = 1.0 / np.arange(1, count + 1) ** 1.05
        return rng.choice(count, size=size, p=p / p.sum())

    u, i = zipf(users, n), zipf(items, n)
    device, country = rng.integers(0, 4, n), rng.integers(0, 20, n)
    price = rng.normal(0, 1, n)
    b_u, b_i = rng.normal(0, 0.6, users), rng.normal(0, 0.6, items)
    uf, vf = rng.normal(0, 0.7, (users, rank)), rng.normal(0, 0.7, (items, rank))
    b_d, b_c = rng.normal(0, 0.4, 4), rng.normal(0, 0.3, 20)
    logit = -1.2 + b_u[u] + b_i[i] + (uf[u] * vf[i]).sum(1) + b_d[device] + b_c[country] - 0.5 * price
    p = 1 / (1 + np.exp(-logit))
    y = rng.random(n) < p
    bayes = float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))
    missing_price = rng.random(n) < 0.1
    names = ["ios", "android", "web", "tv"]
    records = [
        {
            "user": f"u{uu}",
            "item": int(ii),  # an integer id: a category, not a magnitude
            "device": names[dd],
            "country": f"c{cc}",
            "price": None if mp else float(pr),
            "y": bool(yy),
        }
        for uu, ii, dd, cc, pr, mp, yy in zip(
            u.tolist(), i.tolist(), device.tolist(), country.tolist(), price.tolist(), missing_price.tolist(), y.tolist()
        )
    ]
    about = f"{users:,} Zipf users x {items:,} items, device, country, a price missing 10 %; per-id effects + rank-{rank} user x item"
    return CatStream("clicks", "binary", records, ["price"], ["user", "item", "device", "country"], about, bayes)


CATEGORICAL_STREAMS = {"mv": mv, "friedman_missing": friedman_missing, "clicks": clicks}


# ---------------------------------------------------------------------------- Vowpal Wabbit
def vw_line(stream: CatStream, r: dict) -> str:
    """One record in VW's text format: a namespace per field (its first letter), numbers as name:value, absent when null."""
    label = ("1" if r["y"] else "-1") if stream.task == "binary" else repr(float(r["y"]))
    parts = [label]
    for name in stream.categorical:
        v = r.get(name)
        value = "missing" if v is None else str(v).replace(" ", "_").replace(":", "_").replace("|", "_")
        parts.append(f"|{name} {name}={value}")
    numbers = [f"{name}:{r[name]!r}" for name in stream.features if r.get(name) is not None]
    if numbers:
        parts.append("|n " + " ".join(numbers))
    return " ".join(parts)


def run_vw(stream: CatStream, args: str, label: str) -> Scores:
    """VW learning each record after predicting it (``vw.predict`` then ``vw.learn``), prequential."""
    import vowpalwabbit

    task = stream.task
    loss_args = "--loss_function logistic --link logistic" if task == "binary" else ""
    vw = vowpalwabbit.Workspace(f"{loss_args} {args} --quiet")
    lines = [vw_line(stream, r) for r in stream.records]
    n = len(lines)
    loss = abs_sum = sq = 0.0
    correct = 0
    t0 = time.perf_counter()
    for line, r in zip(lines, stream.records):
        pred = vw.predict(line)
        if task == "binary":
            p = min(max(float(pred), 1e-15), 1 - 1e-15)
            y = bool(r["y"])
            loss -= math.log(p if y else 1 - p)
            correct += (p > 0.5) == y
        else:
            err = float(pred) - r["y"]
            abs_sum += abs(err)
            sq += err * err
        vw.learn(line)
    seconds = time.perf_counter() - t0
    vw.finish()
    s = Scores(label, task, n, seconds=seconds)
    if task == "binary":
        s.loss, s.accuracy = loss / n, correct / n
    else:
        s.loss, s.mae, s.rmse = sq / n, abs_sum / n, math.sqrt(sq / n)
    return s


# ---------------------------------------------------------------------------- River
def run_river(stream: CatStream) -> Scores:
    """River's pipeline: numbers imputed (running mean) and scaled, categories one-hot, a linear model; prequential."""
    from river import compose, linear_model, preprocessing, stats

    parts = []
    if stream.features:
        imputer = preprocessing.StatImputer(*[(f, stats.Mean()) for f in stream.features])  # a null number: its running mean
        parts.append(compose.Select(*stream.features) | imputer | preprocessing.StandardScaler())
    if stream.categorical:
        parts.append(compose.Select(*stream.categorical) | preprocessing.OneHotEncoder())
    head = linear_model.LogisticRegression() if stream.task == "binary" else linear_model.LinearRegression()
    model = compose.TransformerUnion(*parts) | head if len(parts) > 1 else parts[0] | head
    n = len(stream)
    loss = abs_sum = sq = 0.0
    correct = 0
    t0 = time.perf_counter()
    for r in stream.records:
        x = {k: (str(v) if k in stream.categorical and v is not None else v) for k, v in r.items() if k != "y"}
        x = {k: v for k, v in x.items() if v is not None or k in stream.features}  # a null number stays: the imputer's
        y = r["y"]
        if stream.task == "binary":
            p = min(max(model.predict_proba_one(x).get(True, 0.0), 1e-15), 1 - 1e-15)
            loss -= math.log(p if y else 1 - p)
            correct += (p > 0.5) == bool(y)
        else:
            err = model.predict_one(x) - y
            abs_sum += abs(err)
            sq += err * err
        model.learn_one(x, y)
    s = Scores("River one-hot linear", stream.task, n, seconds=time.perf_counter() - t0)
    if stream.task == "binary":
        s.loss, s.accuracy = loss / n, correct / n
    else:
        s.loss, s.mae, s.rmse = sq / n, abs_sum / n, math.sqrt(sq / n)
    return s
