"""Online feature standardization: running mean and variance, used before they are updated.

Prequential order: a batch is standardized with the statistics of the records *before*
it, then folded in (Chan et al.'s parallel update, in float64).  The statistics are part
of the training state, so a restart standardizes exactly as the run it resumes.
"""

from __future__ import annotations

import torch


class RunningStandardizer:
    """Per-feature running mean/variance; ``transform`` is the identity until two samples are seen."""

    def __init__(self, width: int, device: torch.device | str = "cpu", eps: float = 1e-6, enabled: bool = True) -> None:
        self.enabled = enabled
        self.eps = eps
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(width, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(width, dtype=torch.float64, device=device)
        self._scale = torch.ones(width, dtype=torch.float32, device=device)
        self._shift = torch.zeros(width, dtype=torch.float32, device=device)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self._shift) * self._scale

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
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
        if self.count.item() >= 2:
            var = self.m2 / self.count
            self._shift = self.mean.to(torch.float32)
            self._scale = torch.rsqrt(var + self.eps).to(torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count.clone(), "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.mean.device
        self.count = state["count"].to(device, torch.float64)
        self.mean = state["mean"].to(device, torch.float64)
        self.m2 = state["m2"].to(device, torch.float64)
        self._refresh()
