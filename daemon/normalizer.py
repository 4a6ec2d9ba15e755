"""Online standardization of features (and of a regression label): running mean and variance.

A batch's features are folded into the statistics *before* it is standardized: the
features are known when the prediction is made, so this leaks no label, and it has two
consequences the trainer relies on.  Every standardized value of a batch is bounded
(a sample's distance to the mean of a set that contains it is at most ``sqrt(n - 1)``
standard deviations), so a finite input never becomes an overflow, whatever its scale:
a timestamp, a price, a feature constant for a thousand rows that then changes.  And
the statistics see every record, also those of a step that is skipped.

Where the variance is not meaningful (zero, or at the round-off of the mean: a feature
constant so far) the feature is only centred, which maps it to 0, as River's
``StandardScaler`` does with its safe division.

Statistics are kept in float64 (Chan et al.'s parallel update) and are part of the
training state, so a restart standardizes exactly as the run it resumes.
"""

from __future__ import annotations

import torch

# a variance below (REL_TOL * |mean|)**2 is round-off of the mean, not spread
REL_TOL = 1e-9


class RunningStandardizer:
    """Per-column running mean/variance; ``transform`` is ``(x - mean) / std``, centring only where std is not meaningful."""

    def __init__(self, width: int, device: torch.device | str = "cpu", enabled: bool = True) -> None:
        self.enabled = enabled
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(width, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(width, dtype=torch.float64, device=device)
        self.shift = torch.zeros(width, dtype=torch.float32, device=device)  # float32 copies used on every batch
        self.scale = torch.ones(width, dtype=torch.float32, device=device)  # 1 / std, or 1 where only centred
        self.std = torch.ones(width, dtype=torch.float32, device=device)  # std, or 1 where only centred

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.shift) * self.scale

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` (B, width) into the statistics."""
        if not self.enabled or x.shape[0] == 0:
            return
        xb = x.to(torch.float64)
        n_b = xb.shape[0]
        mean_b = xb.mean(0)
        m2_b = ((xb - mean_b) ** 2).sum(0)
        n_a = self.count
        total = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta**2 * (n_a * n_b / total)
        self.count = total
        self._refresh()

    def _refresh(self) -> None:
        var = self.m2 / self.count.clamp(min=1)
        meaningful = var > (REL_TOL * self.mean) ** 2
        std = torch.where(meaningful, var.sqrt(), torch.ones_like(var))
        self.shift = self.mean.to(torch.float32)
        self.std = std.to(torch.float32)
        self.scale = std.reciprocal().to(torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count.clone(), "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.mean.device
        self.count = state["count"].to(device, torch.float64)
        self.mean = state["mean"].to(device, torch.float64)
        self.m2 = state["m2"].to(device, torch.float64)
        self._refresh()
