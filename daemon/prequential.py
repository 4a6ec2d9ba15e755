"""Cumulative prequential (test-then-train) totals: what the model scored on each sample before learning from it.

They are training state: saved in every snapshot and restored with the model, so after a
restart they continue exactly like the weights (a sample replayed after a crash was not in
the surviving totals and is counted once).  Prometheus reads them as counters
(``streamtrain_prequential_*_total``); ``rate(correct[1h]) / rate(samples[1h])`` is the
accuracy of the last hour, and ``correct / samples`` the cumulative accuracy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class Prequential:
    samples: int = 0
    loss: float = 0.0  # sum over samples of the loss (label units for regression)
    correct: int = 0  # classification: predictions that were right
    abs_error: float = 0.0  # regression: sum of |prediction - label|
    squared_error: float = 0.0  # regression: sum of (prediction - label)^2

    def add(self, n: int, loss: float, correct: int = 0, abs_error: float = 0.0, squared_error: float = 0.0) -> None:
        self.samples += n
        self.loss += loss
        self.correct += correct
        self.abs_error += abs_error
        self.squared_error += squared_error

    def summary(self, task: str) -> dict[str, float | None]:
        """Cumulative metrics for a task: accuracy or MAE/RMSE, and the mean loss; None before any sample."""
        n = self.samples
        if not n:
            return {"samples": 0, "loss": None, **({"mae": None, "rmse": None} if task == "regression" else {"accuracy": None})}
        if task == "regression":
            scores = {"mae": self.abs_error / n, "rmse": math.sqrt(self.squared_error / n)}
        else:
            scores = {"accuracy": self.correct / n}
        return {"samples": n, "loss": self.loss / n, **scores}

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))(state.get(f.name, 0)))
