"""What the trainer does about concept drift: watch the prequential error, act when it rises.

Each step gives the detector (:mod:`streamtrain.daemon.drift`) one value: the batch's error rate, or
for regression its mean absolute error in units of the label's running std.  A drift is
a detected change *upwards* (the error falling is learning, not drift); detections within
``cooldown_samples`` of the last drift are the same change (ADWIN cuts its window in a
few steps) and count once.  The action, ``drift.action``:

- ``log``: the metric ``streamtrain_drift_detected_total`` and a log line, nothing else;
- ``reset_optimizer``: also forget the optimizer's state (Adam's moments, SGD's momentum),
  so it adapts to the new concept at its full step size;
- ``lr_boost``: also raise the learning rate ``lr_boost_factor`` times, the boost fading
  linearly back to the schedule's rate over ``lr_boost_samples`` samples;
- ``challenger``: a second, looser detector (``warning_delta``, or half the threshold) gives
  a *warning* first, as in ARF; at a warning a fresh model starts training beside the
  champion on the same batches and replaces it when it is better (``daemon/candidates.py``).

The detector and any boost in progress are training state (saved in every snapshot), so
a restart decides exactly as the run it resumes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from streamtrain.daemon.drift import make_detector

log = logging.getLogger("streamtrain.drift")

ACTIONS = ("log", "reset_optimizer", "lr_boost", "challenger")
ERROR_CAP = 10.0  # one wild regression error must not dominate the detector's window


class DriftMonitor:
    """The drift detector on the prequential error, and the action in progress."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.enabled = cfg.detector != "off"
        params = {"delta": cfg.delta} if cfg.detector == "adwin" else {"threshold": cfg.threshold}
        self.detector = make_detector(cfg.detector, **params) if self.enabled else None
        self.samples = 0  # samples observed
        self.drifts = 0
        self.last_drift = 0.0  # Unix time
        self.last_drift_sample = -(10**18)
        self.boost_left = 0  # samples of the lr boost still to go
        self.warner = None  # challenger: the warning detector
        if self.enabled and cfg.action == "challenger":
            loose = {"delta": cfg.warning_delta} if cfg.detector == "adwin" else {"threshold": cfg.threshold / 2}
            self.warner = make_detector(cfg.detector, **loose)
        self.warned = False  # the last step's error tripped the warning detector (upwards)

    def observe(self, error: float, n: int, optimizer: torch.optim.Optimizer) -> bool:
        """Feed one step's error over ``n`` samples; True when it is a new drift (the action has been taken)."""
        if not self.enabled:
            return False
        self.samples += n
        self.boost_left = max(0, self.boost_left - n)
        self.warned = False
        if self.warner is not None:
            was = self.warner.estimation
            self.warned = self.warner.update(min(error, ERROR_CAP)) and self.warner.estimation > was
        before = self.detector.estimation
        if not self.detector.update(min(error, ERROR_CAP)):
            return False
        after = self.detector.estimation
        if after <= before or self.samples - self.last_drift_sample < self.cfg.cooldown_samples:
            return False
        self.drifts += 1
        self.last_drift = time.time()
        self.last_drift_sample = self.samples
        action = self.cfg.action
        if action == "reset_optimizer":
            optimizer.state.clear()
        elif action == "lr_boost":
            self.boost_left = self.cfg.lr_boost_samples
        log.warning(
            "concept drift detected at sample %s: prequential error %.4g -> %.4g (%s); action: %s",
            f"{self.samples:,}",
            before,
            after,
            self.cfg.detector,
            action,
        )
        return True

    def boost(self, optimizer: torch.optim.Optimizer) -> list[float] | None:
        """Raise the learning rates for the boost in progress; returns what :meth:`unboost` restores (None: no boost)."""
        if not self.boost_left:
            return None
        fade = self.boost_left / self.cfg.lr_boost_samples
        factor = 1.0 + (self.cfg.lr_boost_factor - 1.0) * fade
        saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * factor
        return saved

    @staticmethod
    def unboost(optimizer: torch.optim.Optimizer, saved: list[float] | None) -> None:
        if saved is not None:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict() if self.detector is not None else None,
            "samples": self.samples,
            "drifts": self.drifts,
            "last_drift": self.last_drift,
            "last_drift_sample": self.last_drift_sample,
            "boost_left": self.boost_left,
            **({"warner": self.warner.state_dict()} if self.warner is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        saved = state.get("detector")
        if self.detector is not None and saved:
            # the window is kept only for the detector the config asks for now: a changed drift.detector,
            # delta or threshold starts a fresh one (a restored detector would keep the old parameters)
            if saved.get("detector") == self.cfg.detector and saved.get("params") == self.detector.state_dict()["params"]:
                self.detector.load_state_dict(saved)
            else:
                log.info("drift detector settings changed since the snapshot: the detector starts over (%s)", self.cfg.detector)
        self.samples = int(state["samples"])
        self.drifts = int(state["drifts"])
        self.last_drift = float(state["last_drift"])
        self.last_drift_sample = int(state["last_drift_sample"])
        self.boost_left = int(state["boost_left"])
        if self.warner is not None and state.get("warner"):
            self.warner.load_state_dict(state["warner"])
