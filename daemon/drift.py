"""Concept-drift detectors for the stream of prequential errors the trainer produces.

Each training step yields one error figure for the batch it is about to learn from (the
mean 0/1 misclassification, or a standardized absolute error for regression).  While the
data's concept holds still that figure wanders around a steady level; when the concept
changes the model starts to be wrong more often and the level moves.  A detector watches
the figures one at a time and says on which step the move became statistically clear, so
the trainer can react (log it, count it, raise the learning rate, reset a model ...).

Two detectors are offered:

``ADWIN`` (Bifet & Gavaldà 2007, "Learning from Time-Changing Data with Adaptive
Windowing", in its ADWIN2 form).  It keeps a window of recent values that is as long as
the data allow: whenever some split of the window into an older and a newer part shows
means further apart than a Hoeffding/Bernstein-style bound allows at confidence
``delta``, the older part is dropped.  It has no threshold to tune to the errors' scale,
it bounds the false-alarm rate (the guarantee is stated for values in [0, 1]; for
standardized errors it is approximate), and its window mean estimates the current error
level.  The old part goes in steps, as the evidence grows, so one change is usually
signalled a few times within a few hundred values.
The window is summarised by an exponential histogram (buckets of 1, 2, 4, ... values, at
most ``max_buckets`` of each size), so memory and the cost of a check grow with the
logarithm of the window's length, and a check runs every ``clock`` values only.

``PageHinkley`` (Page 1954, "Continuous Inspection Schemes"; Hinkley 1971).  A CUSUM of
each value's deviation from the running mean, less a tolerance ``delta``, compared with
its own historical extreme; a drift is the excess passing ``threshold``.  ``alpha`` fades
old deviations so the statistic cannot grow without bound on a long stream.  It is
cheaper than ADWIN and reacts within a few values to a large shift, but ``delta`` and
``threshold`` are in the units of the values: the defaults suit per-step noise of about
0.1 (a batch mean error), and a stream with unit-variance noise needs a higher threshold
or it will alarm on noise.  ``mode`` says which way of moving counts: ``"up"`` (the
default: errors rising), ``"down"`` or ``"both"``.

After a detection either detector goes on at once: ADWIN has already dropped the old part
of its window, Page-Hinkley has restarted its statistics from the next value.  Both
``state_dict`` methods return plain Python data (for ``torch.save`` and
``torch.load(weights_only=True)``), and a detector restored with ``load_state_dict``
decides exactly as the one it was saved from on whatever values follow; the state carries
the parameters too, which the restored detector adopts, as a torch optimizer does.
"""

from __future__ import annotations

import copy
import math
from typing import Any

__all__ = ["ADWIN", "DETECTORS", "PageHinkley", "make_detector"]

_FORMAT = 1  # version of the state_dict layout


def _check_finite(value: float) -> float:
    """``value`` as a float; a NaN or infinity would poison every later decision, so it is refused."""
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"drift detector got a non-finite value {value!r}")
    return x


def _check_header(state: dict, kind: str) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{kind} state must be a dict, got {type(state).__name__}")
    if state.get("detector") != kind:
        raise ValueError(f"state is for detector {state.get('detector')!r}, not {kind!r}")
    if state.get("format") != _FORMAT:
        raise ValueError(f"{kind} state has format {state.get('format')!r}; this version reads format {_FORMAT}")


class ADWIN:
    """Adaptive windowing: detects a change in the mean and keeps the window since the last one.

    ``delta`` is the confidence of each test (smaller: fewer false alarms, later
    detections); ``clock`` how many values pass between checks; ``max_buckets`` how many
    buckets of each size the histogram keeps (more: finer cut points, more work);
    ``min_window_length`` the fewest values either side of a cut point may hold; and no
    check is made while the window holds ``grace_period`` values or fewer.
    """

    def __init__(
        self, delta: float = 0.002, clock: int = 32, max_buckets: int = 5, min_window_length: int = 5, grace_period: int = 10
    ) -> None:
        self._set_params(delta, clock, max_buckets, min_window_length, grace_period)
        # Level i of the histogram holds buckets of 2**i values, oldest first; each bucket is
        # its values' sum and sum of squared deviations from their mean (M2).
        self._sums: list[list[float]] = [[]]
        self._m2s: list[list[float]] = [[]]
        self.width = 0
        self._total = 0.0
        self._m2 = 0.0  # of the whole window
        self._tick = 0  # values seen since construction; the clock runs on it
        self.drift_detected = False
        self.n_detections = 0

    def _set_params(self, delta: float, clock: int, max_buckets: int, min_window_length: int, grace_period: int) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"ADWIN delta must be in (0, 1), got {delta!r}")
        integers = {
            "clock": (clock, 1),
            "max_buckets": (max_buckets, 1),
            "min_window_length": (min_window_length, 1),
            "grace_period": (grace_period, 0),
        }
        for name, (value, least) in integers.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"ADWIN {name} must be an integer >= {least}, got {value!r}")
        self.delta = float(delta)
        self.clock = clock
        self.max_buckets = max_buckets
        self.min_window_length = min_window_length
        self.grace_period = grace_period

    @property
    def estimation(self) -> float:
        """Mean of the values in the current window (0.0 while it is empty)."""
        return self._total / self.width if self.width else 0.0

    @property
    def variance(self) -> float:
        """Population variance of the values in the current window (0.0 while it is empty)."""
        return max(self._m2, 0.0) / self.width if self.width else 0.0

    def update(self, value: float) -> bool:
        """Add one value; True when it completes the evidence of a change (the window has then been cut)."""
        x = _check_finite(value)
        w = self.width
        if w:
            d = x - self._total / w
            self._m2 += d * d * w / (w + 1)
        self.width = w + 1
        self._total += x
        newest = self._sums[0]
        newest.append(x)
        self._m2s[0].append(0.0)
        if len(newest) > self.max_buckets:
            self._merge()
        self._tick += 1
        detected = False
        if self._tick % self.clock == 0 and self.width > self.grace_period:
            while self._has_cut():
                self._drop_oldest()
                detected = True
        if detected:
            self.n_detections += 1
        self.drift_detected = detected
        return detected

    def _merge(self) -> None:
        """Restore the histogram's shape: a level over ``max_buckets`` merges its two oldest buckets into one of the next size."""
        level = 0
        while len(self._sums[level]) > self.max_buckets:
            sums, m2s = self._sums[level], self._m2s[level]
            half = float(1 << level)
            a, b = sums.pop(0), sums.pop(0)
            m2_a, m2_b = m2s.pop(0), m2s.pop(0)
            gap = (a - b) / half  # difference of the two buckets' means
            if level + 1 == len(self._sums):
                self._sums.append([])
                self._m2s.append([])
            self._sums[level + 1].append(a + b)
            self._m2s[level + 1].append(m2_a + m2_b + gap * gap * half / 2.0)
            level += 1

    def _drop_oldest(self) -> None:
        """Forget the oldest bucket and take its values out of the window's statistics."""
        top = len(self._sums) - 1
        n = 1 << top
        s = self._sums[top].pop(0)
        m2 = self._m2s[top].pop(0)
        while len(self._sums) > 1 and not self._sums[-1]:
            self._sums.pop()
            self._m2s.pop()
        rest = self.width - n
        self._total -= s
        self.width = rest
        if rest:
            gap = s / n - self._total / rest
            self._m2 = max(self._m2 - m2 - gap * gap * n * rest / (n + rest), 0.0)
        else:
            self._total = 0.0
            self._m2 = 0.0

    def _has_cut(self) -> bool:
        """Whether some split between buckets has older and newer means further apart than the bound allows."""
        w = self.width
        least = self.min_window_length
        if w < 2 * least:
            return False
        variance = max(self._m2, 0.0) / w
        # delta' = delta / ln(w): the confidence is shared among the O(log w) cut points tested.
        log_term = math.log(2.0 * math.log(w) / self.delta)
        total = self._total
        n0 = 0
        sum0 = 0.0
        for level in range(len(self._sums) - 1, -1, -1):
            size = 1 << level
            for s in self._sums[level]:
                n0 += size
                sum0 += s
                n1 = w - n0
                if n1 < least:
                    return False
                if n0 < least:
                    continue
                inv_m = 1.0 / n0 + 1.0 / n1  # the paper's 1/m
                eps = math.sqrt(2.0 * inv_m * variance * log_term) + (2.0 / 3.0) * inv_m * log_term
                if abs(sum0 / n0 - (total - sum0) / n1) > eps:
                    return True
        return False

    def state_dict(self) -> dict:
        """Everything needed to go on exactly as this detector would, as plain Python data."""
        return {
            "detector": "adwin",
            "format": _FORMAT,
            "params": {
                "delta": self.delta,
                "clock": self.clock,
                "max_buckets": self.max_buckets,
                "min_window_length": self.min_window_length,
                "grace_period": self.grace_period,
            },
            "bucket_sums": copy.deepcopy(self._sums),
            "bucket_m2s": copy.deepcopy(self._m2s),
            "width": self.width,
            "total": self._total,
            "m2": self._m2,
            "tick": self._tick,
            "drift_detected": self.drift_detected,
            "n_detections": self.n_detections,
        }

    def load_state_dict(self, state: dict) -> None:
        """Become the detector ``state`` was taken from, parameters included."""
        _check_header(state, "adwin")
        try:
            params: dict[str, Any] = dict(state["params"])
            sums = [[float(v) for v in level] for level in state["bucket_sums"]]
            m2s = [[float(v) for v in level] for level in state["bucket_m2s"]]
            width, total, m2 = int(state["width"]), float(state["total"]), float(state["m2"])
            tick, detected, n_detections = int(state["tick"]), bool(state["drift_detected"]), int(state["n_detections"])
            checked = ADWIN(**params)  # validates the parameters before anything of self changes
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed ADWIN state: {exc!r}") from exc
        shape_ok = len(sums) >= 1 and [len(level) for level in sums] == [len(level) for level in m2s]
        if not shape_ok or sum(len(level) << i for i, level in enumerate(sums)) != width:
            raise ValueError("malformed ADWIN state: the buckets do not add up to the window's width")
        if any(len(level) > checked.max_buckets for level in sums):
            raise ValueError("malformed ADWIN state: a level holds more than max_buckets buckets")
        self._set_params(**params)
        self._sums, self._m2s = sums, m2s
        self.width, self._total, self._m2 = width, total, m2
        self._tick, self.drift_detected, self.n_detections = tick, detected, n_detections


class PageHinkley:
    """Page-Hinkley test: detects a sustained shift of the mean away from the running mean.

    ``min_instances`` values must be seen (since the start or the last detection) before
    a drift can be signalled; ``delta`` is the shift tolerated per value; ``threshold``
    the excess of the cumulative sum that signals a drift; ``alpha`` the fading factor of
    the cumulative sums (1 for none); ``mode`` one of ``"up"``, ``"down"``, ``"both"``.
    """

    MODES = ("up", "down", "both")

    def __init__(
        self, min_instances: int = 30, delta: float = 0.005, threshold: float = 50.0, alpha: float = 1 - 0.0001, mode: str = "up"
    ) -> None:
        self._set_params(min_instances, delta, threshold, alpha, mode)
        self.drift_detected = False
        self.n_detections = 0
        self._restart()

    def _set_params(self, min_instances: int, delta: float, threshold: float, alpha: float, mode: str) -> None:
        if isinstance(min_instances, bool) or not isinstance(min_instances, int) or min_instances < 1:
            raise ValueError(f"PageHinkley min_instances must be an integer >= 1, got {min_instances!r}")
        if not (math.isfinite(delta) and delta >= 0.0):
            raise ValueError(f"PageHinkley delta must be >= 0, got {delta!r}")
        if not (math.isfinite(threshold) and threshold > 0.0):
            raise ValueError(f"PageHinkley threshold must be > 0, got {threshold!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"PageHinkley alpha must be in (0, 1], got {alpha!r}")
        if mode not in self.MODES:
            raise ValueError(f"PageHinkley mode must be one of {', '.join(self.MODES)}; got {mode!r}")
        self.min_instances = min_instances
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.mode = mode
        self._up = mode in ("up", "both")
        self._down = mode in ("down", "both")

    def _restart(self) -> None:
        self._count = 0
        self._mean = 0.0
        self._sum_up = 0.0  # faded sum of (x - mean - delta); a rise shows as it climbing above its minimum
        self._min_up = 0.0
        self._sum_down = 0.0  # faded sum of (x - mean + delta); a fall shows as it sinking below its maximum
        self._max_down = 0.0

    @property
    def estimation(self) -> float:
        """Mean of the values since the start or the last detection (0.0 before the first)."""
        return self._mean

    def update(self, value: float) -> bool:
        """Add one value; True when it makes the cumulative excess pass the threshold (the statistics then restart)."""
        x = _check_finite(value)
        n = self._count + 1
        self._count = n
        self._mean += (x - self._mean) / n
        dev = x - self._mean
        up = self.alpha * self._sum_up + dev - self.delta
        self._sum_up = up
        if up < self._min_up:
            self._min_up = up
        down = self.alpha * self._sum_down + dev + self.delta
        self._sum_down = down
        if down > self._max_down:
            self._max_down = down
        detected = n >= self.min_instances and (
            (self._up and up - self._min_up > self.threshold) or (self._down and self._max_down - down > self.threshold)
        )
        if detected:
            self.n_detections += 1
            self._restart()
        self.drift_detected = detected
        return detected

    def state_dict(self) -> dict:
        """Everything needed to go on exactly as this detector would, as plain Python data."""
        return {
            "detector": "page_hinkley",
            "format": _FORMAT,
            "params": {
                "min_instances": self.min_instances,
                "delta": self.delta,
                "threshold": self.threshold,
                "alpha": self.alpha,
                "mode": self.mode,
            },
            "count": self._count,
            "mean": self._mean,
            "sum_up": self._sum_up,
            "min_up": self._min_up,
            "sum_down": self._sum_down,
            "max_down": self._max_down,
            "drift_detected": self.drift_detected,
            "n_detections": self.n_detections,
        }

    def load_state_dict(self, state: dict) -> None:
        """Become the detector ``state`` was taken from, parameters included."""
        _check_header(state, "page_hinkley")
        try:
            params: dict[str, Any] = dict(state["params"])
            count = int(state["count"])
            stats = [float(state[k]) for k in ("mean", "sum_up", "min_up", "sum_down", "max_down")]
            detected, n_detections = bool(state["drift_detected"]), int(state["n_detections"])
            PageHinkley(**params)  # validates the parameters before anything of self changes
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed PageHinkley state: {exc!r}") from exc
        self._set_params(**params)
        self._count = count
        self._mean, self._sum_up, self._min_up, self._sum_down, self._max_down = stats
        self.drift_detected, self.n_detections = detected, n_detections


DETECTORS: dict[str, type[ADWIN] | type[PageHinkley]] = {"adwin": ADWIN, "page_hinkley": PageHinkley}


def make_detector(name: str, **params: Any) -> ADWIN | PageHinkley:
    """The detector called ``name`` ("adwin" or "page_hinkley"), built with ``params``."""
    try:
        cls = DETECTORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown drift detector {name!r}; choose one of: {', '.join(DETECTORS)}") from None
    return cls(**params)
