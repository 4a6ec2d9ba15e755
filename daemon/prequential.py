"""Cumulative prequential (test-then-train) totals: what the model scored on each sample before learning from it.

They are training state: saved in every snapshot and restored with the model, so after a
restart they continue exactly like the weights (a sample replayed after a crash was not in
the surviving totals and is counted once).  Prometheus reads them as counters
(``streamtrain_prequential_*_total``); ``rate(correct[1h]) / rate(samples[1h])`` is the
accuracy of the last hour, and ``correct / samples`` the cumulative accuracy.

Classifiers also keep the sums their calibration is made of (``daemon/calibration.py``):
per probability bin, the samples, their predicted probability, what happened and their
Brier scores.  The bins' samples are fewer than ``samples`` after resuming a snapshot
made before they were kept (they start at zero then).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from streamtrain.daemon.calibration import WIDTH, measures


@dataclass
class Prequential:
    samples: int = 0
    loss: float = 0.0  # sum over samples of the loss (label units for regression)
    correct: int = 0  # classification: predictions that were right
    abs_error: float = 0.0  # regression: sum of |prediction - label|
    squared_error: float = 0.0  # regression: sum of (prediction - label)^2
    # classification: the calibration sums by probability bin (daemon/calibration.py)
    bins: list[float] = field(default_factory=lambda: [0.0] * WIDTH)

    def add(
        self,
        n: int,
        loss: float,
        correct: int = 0,
        abs_error: float = 0.0,
        squared_error: float = 0.0,
        calibration: list[float] | None = None,
    ) -> None:
        self.samples += n
        self.loss += loss
        self.correct += correct
        self.abs_error += abs_error
        self.squared_error += squared_error
        if calibration is not None:  # calibration.batch_sums' values
            self.bins = [a + b for a, b in zip(self.bins, calibration)]

    def summary(self, task: str) -> dict[str, float | None]:
        """Cumulative metrics for a task: accuracy or MAE/RMSE, and the mean loss; None before any sample."""
        n = self.samples
        if not n:
            if task == "regression":
                return {"samples": 0, "loss": None, "mae": None, "rmse": None}
            return {"samples": 0, "loss": None, "accuracy": None, **self.calibration(task)}
        if task == "regression":
            scores = {"mae": self.abs_error / n, "rmse": math.sqrt(self.squared_error / n)}
        else:
            scores = {"accuracy": self.correct / n, **self.calibration(task)}
        return {"samples": n, "loss": self.loss / n, **scores}

    def calibration(self, task: str) -> dict[str, float | None]:
        """Brier, ECE and, for binary, the calibration ratio and normalized entropy (cumulative)."""
        return measures(task, self.loss / self.samples if self.samples else math.nan, self.bins)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A snapshot's totals; those it lacks (an older snapshot's) start at zero."""
        for f in fields(self):
            if f.name == "bins":
                bins = state.get("bins")
                self.bins = [float(v) for v in bins] if bins is not None and len(bins) == WIDTH else [0.0] * WIDTH
            else:
                setattr(self, f.name, type(getattr(self, f.name))(state.get(f.name, 0)))
