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

With missing numbers (``missing=True``: ``data.missing: impute``) a missing value is a NaN:
each column keeps its own count and folds in only its present values, and the model is
given the running mean in its place (0 once standardized) with a "was missing" mark
beside it (:meth:`inputs`).  The same operations run on every batch, with or without a
NaN: no branch on the data, so no device wait on a GPU.
"""

from __future__ import annotations

import torch

from streamtrain.models.served import model_inputs

# a variance below (REL_TOL * |mean|)**2 is round-off of the mean, not spread
REL_TOL = 1e-9


class RunningStandardizer:
    """Per-column running mean/variance; ``transform`` is ``(x - mean) / std``, centring only where std is not meaningful."""

    def __init__(self, width: int, device: torch.device | str = "cpu", enabled: bool = True, missing: bool = False) -> None:
        self.enabled = enabled
        self.missing = missing  # a NaN is a missing value: per-column counts, and the marks beside the inputs
        self.n = 0  # samples folded in (a Python int: the per-batch arithmetic on it costs no tensor op)
        self.counts = torch.zeros(width, dtype=torch.float64, device=device)  # missing: values folded in per column
        self.mean = torch.zeros(width, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(width, dtype=torch.float64, device=device)
        self.shift = torch.zeros(width, dtype=torch.float32, device=device)  # float32 copies used on every batch
        self.scale = torch.ones(width, dtype=torch.float32, device=device)  # 1 / std, or 1 where only centred
        self.std = torch.ones(width, dtype=torch.float32, device=device)  # std, or 1 where only centred

    @property
    def count(self) -> torch.Tensor:
        return torch.tensor(float(self.n), dtype=torch.float64)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.shift) * self.scale

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the model takes for raw rows ``x``: standardized, and with ``missing`` each NaN as the mean plus its 0/1 mark."""
        return model_inputs(x, self.shift, self.scale, self.enabled, self.missing)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` (B, width) into the statistics."""
        n_b = x.shape[0]
        if not self.enabled or n_b == 0:
            return
        if self.missing:
            self._update_present(x)
            return
        xb = x.to(torch.float64)
        if n_b > 1:
            var_b, mean_b = torch.var_mean(xb, 0, correction=0)
        else:
            var_b, mean_b = None, xb[0]
        n_a, total = self.n, self.n + n_b
        delta = mean_b - self.mean
        self.mean.add_(delta, alpha=n_b / total)
        if var_b is not None:
            self.m2.add_(var_b, alpha=float(n_b))
        self.m2.addcmul_(delta, delta, value=n_a * n_b / total)
        self.n = total
        self._refresh()

    def _update_present(self, x: torch.Tensor) -> None:
        """Fold in the present values of each column (NaN: missing), Chan's update per column."""
        xb = x.to(torch.float64)
        present = ~torch.isnan(xb)
        n_b = present.sum(0, dtype=torch.float64)
        mean_b = torch.where(present, xb, 0.0).sum(0) / n_b.clamp(min=1.0)
        m2_b = torch.where(present, xb - mean_b, 0.0).square().sum(0)
        self._merge_columns(n_b, mean_b, m2_b)
        self.n += x.shape[0]

    def _merge_columns(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a = self.counts
        total = n_a + n_b
        delta = mean_b - self.mean
        share = torch.where(total > 0, n_b / total.clamp(min=1.0), 0.0)
        self.mean.addcmul_(delta, share)
        self.m2.add_(m2_b + delta.square() * n_a * share)
        self.counts = total
        self._refresh()

    @torch.no_grad()
    def merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor, counts_b: torch.Tensor | None = None) -> None:
        """Fold in a batch known by its count, mean and sum of squared deviations (the batch of every rank).

        ``counts_b``: with missing values, the present values per column (``mean_b`` and ``m2_b`` are theirs).
        """
        if not self.enabled or n_b == 0:
            return
        if self.missing:
            counts = counts_b.to(self.counts) if counts_b is not None else torch.full_like(self.counts, float(n_b))
            self._merge_columns(counts, mean_b.to(self.mean), m2_b.to(self.m2))
            self.n += n_b
            return
        n_a, total = self.n, self.n + n_b
        delta = mean_b.to(self.mean) - self.mean
        self.mean.add_(delta, alpha=n_b / total)
        self.m2.add_(m2_b.to(self.m2))
        self.m2.addcmul_(delta, delta, value=n_a * n_b / total)
        self.n = total
        self._refresh()

    def _refresh(self) -> None:
        var = self.m2 / (self.counts.clamp(min=1.0) if self.missing else max(self.n, 1))
        # where the variance is within round-off of the mean (or zero), centre only
        std = torch.where(var > self.mean.square().mul_(REL_TOL**2), var.sqrt(), 1.0)
        self.shift = self.mean.to(torch.float32)
        self.std = std.to(torch.float32)
        self.scale = self.std.reciprocal()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"count": self.count, "mean": self.mean.clone(), "m2": self.m2.clone()}
        if self.missing:
            state["counts"] = self.counts.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.mean.device
        self.n = int(state["count"])
        self.mean = state["mean"].to(device, torch.float64)
        self.m2 = state["m2"].to(device, torch.float64)
        counts = state.get("counts")  # written with missing values imputed; before that, every column saw every sample
        self.counts = counts.to(device, torch.float64) if counts is not None else torch.full_like(self.mean, float(self.n))
        self._refresh()
